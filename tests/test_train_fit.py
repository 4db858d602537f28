"""Training loop, checkpoints and augmentation, on small synthetic images (CPU)."""

from __future__ import annotations

import itertools
import os
import pickle
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import wsltool
from wsltool.config import ModelConfig, TrainConfig, resolve_minmax_start, to_dict
from wsltool.errors import CheckpointError, ConfigError
from wsltool.evaluate import evaluate
from wsltool.models import build_model
from wsltool.train.checkpoint import load_checkpoint, model_differences, save_checkpoint
from wsltool.train.data import augment, color_augment, random_crop
from wsltool.train.labels import LabeledItem
from wsltool.train.loop import fit, lr_factor

TINY = {"backbone": "tiny", "pretrained": "none", "output_stride": 8, "minmax_start": 0}  # min-max from epoch 0


def make_squares(root: Path, n: int, seed: int, size: int = 128, side: int = 52) -> list[LabeledItem]:
    """Two classes (striped / checkered square) on a noisy grey background, masks next to the images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    items = []
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        lab = i % 2
        img = 150 + rng.normal(0, 8, (size, size, 3))
        y0, x0 = rng.integers(0, size - side, 2)
        tex = np.where((yy // 3) % 2 == 0, 60, 230) if lab == 0 else np.where((yy // 3 + xx // 3) % 2 == 0, 60, 230)
        m = (yy >= y0) & (yy < y0 + side) & (xx >= x0) & (xx < x0 + side)
        img[m] = tex[m][:, None] + rng.normal(0, 8, (int(m.sum()), 3))
        p = root / f"s{seed}_{i}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p)
        Image.fromarray((m * 255).astype(np.uint8)).save(root / f"s{seed}_{i}_anno.png")
        items.append(LabeledItem(p, ["stripes", "checks"][lab]))
    return items


CLASSES = ["checks", "stripes"]


def squares_model() -> ModelConfig:
    """The min-max model that localizes the squares of :func:`make_squares` (also the GPU tests')."""
    # a random-init backbone needs BatchNorm statistics from the data (the default freezes them: pretrained).
    # A 4-epoch warm-up (14 epochs, shared backbone): F1+ 84.1, F1- 97.2, pixel AUC 99.0, error 0; from epoch 0
    # 84.4 / 97.0 / 93.4 with error 50 % (the classifier never separated the classes).  With the classifier's
    # own backbone: 88.6 / 98.0 / 99.2 / 0 after the warm-up, but from epoch 0 (a random classifier backbone)
    # the mask spread to 58 % (F1+ 56).
    return ModelConfig(
        **{**TINY, "minmax_start": 4},
        kmax=0.1,
        head_dropout=0.0,
        size_prior="range",
        area_min=0.05,
        area_max=0.5,
        sigma=0.5,
        w=8.0,
        bn_mode="masked_running",
    )


def test_synthetic_square_is_localized(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    train = make_squares(tmp_path / "d", 24, 0)
    valid = make_squares(tmp_path / "d", 8, 1)
    mc = squares_model()
    tc = TrainConfig(epochs=14, batch_size=8, crop=128, lr=3e-3, backbone_lr_mult=1.0, color_jitter=0.0, num_threads=1)
    res = fit(train, valid, CLASSES, mc, tc, tmp_path / "out", progress=False)
    model, meta = load_checkpoint(res.last, class_names=CLASSES)
    _, s = evaluate(model, valid, CLASSES)
    assert s["f1_pos"] >= 80, s
    assert s["f1_pos"] - s["chance_pos"] > 50
    assert s["pixel_auc"] > 95
    assert s["error"] <= 12.5  # at most one of the 8 valid images misclassified
    assert meta["class_names"] == CLASSES and meta["method"] == "minmax"
    assert len(res.history) == 14 and (tmp_path / "out" / "history.jsonl").exists()
    assert res.history[0]["loc"] > res.history[-1]["loc"]


def test_resume_reproduces_uninterrupted_training(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    items = make_squares(tmp_path / "d", 8, 0, size=64, side=24)
    mc = ModelConfig(**TINY)
    tc = TrainConfig(epochs=2, batch_size=4, crop=48, num_threads=1)
    fit(items[:6], items[6:], CLASSES, mc, tc, tmp_path / "a", progress=False)
    fit(
        items[:6],
        items[6:],
        CLASSES,
        mc,
        TrainConfig(epochs=2, batch_size=4, crop=48, num_threads=1),
        tmp_path / "b",
        progress=False,
    )
    a, _ = load_checkpoint(tmp_path / "a" / "last.pt")
    b, _ = load_checkpoint(tmp_path / "b" / "last.pt")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k  # seeded training is reproducible on CPU
    # interrupted after one epoch, then resumed: same weights as the uninterrupted run
    tc1 = TrainConfig(epochs=2, batch_size=4, crop=48, num_threads=1)
    c_dir = tmp_path / "c"
    fit(items[:6], items[6:], CLASSES, mc, tc1, c_dir, progress=False)
    first = load_checkpoint(c_dir / "last.pt")[0].state_dict()
    # rewind: rerun epoch 0 only in d, then resume to 2 epochs
    d_dir = tmp_path / "d_run"
    import dataclasses

    fit(items[:6], items[6:], CLASSES, mc, dataclasses.replace(tc1, epochs=1), d_dir, progress=False)
    blob = torch.load(d_dir / "last.pt", weights_only=True)
    blob["meta"]["train_config"]["epochs"] = 2  # same run, stopped after its first epoch
    torch.save(blob, d_dir / "last.pt")
    res = fit(items[:6], items[6:], CLASSES, mc, tc1, d_dir, resume=True, progress=False)
    assert [h["epoch"] for h in res.history] == [0, 1]
    resumed = load_checkpoint(d_dir / "last.pt")[0].state_dict()
    for k in first:
        assert torch.allclose(first[k].float(), resumed[k].float(), atol=1e-6), k


def test_checkpoint_round_trip_and_task_checks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, method="wildcat")).eval()
    p = tmp_path / "m.pt"
    meta = save_checkpoint(p, model, class_names=["a", "b"], mpp=0.5, input_size=64)
    loaded, meta2 = load_checkpoint(p)
    assert meta2["fingerprint"] == meta["fingerprint"] and meta2["mpp"] == 0.5 and meta2["method"] == "wildcat"
    assert (
        meta2["class_names"] == ["a", "b"]
        and meta2["input_size"] == 64
        and meta2["wsltool_version"] == wsltool.__version__
    )
    assert meta2["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    x = torch.randint(0, 255, (2, 3, 32, 40), dtype=torch.uint8)
    with torch.inference_mode():
        o1, o2 = model.localize(x), loaded.localize(x)
    for k in o1:
        torch.testing.assert_close(o1[k], o2[k])
    with pytest.raises(CheckpointError, match="task has 3"):
        load_checkpoint(p, num_classes=3)
    with pytest.raises(CheckpointError, match="differ"):
        load_checkpoint(p, class_names=["benign", "malignant"])
    # weights that do not fit the stored config
    blob = torch.load(p, weights_only=True)
    blob["meta"]["config"]["num_classes"] = 3
    blob["meta"]["class_names"] = ["a", "b", "c"]
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_minmax_start_longer_than_half_the_run_is_honoured(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An explicit warm-up is the user's: kept (with a warning) when longer than half the run, so experiments can
    try it; the checkpoint records it."""
    items = make_squares(tmp_path / "d", 4, 0, size=64, side=24)
    mc = ModelConfig(**{**TINY, "minmax_start": 2}, method="minmax")
    with caplog.at_level("WARNING", logger="wsltool.config"):
        tc = TrainConfig(epochs=3, batch_size=2, crop=48)
        res = fit(items[:2], items[2:], CLASSES, mc, tc, tmp_path / "o", progress=False)
    assert "warm-up longer than half the run" in caplog.text and "last 1 epochs only" in caplog.text
    assert ["pos" in h for h in res.history] == [False, False, True]
    _, meta = load_checkpoint(res.last, class_names=CLASSES)
    assert meta["config"]["minmax_start"] == 2
    with pytest.raises(ConfigError, match="minmax_start=3 with 3 epochs: the min-max terms would never run"):
        fit(items[:2], items[2:], CLASSES, replace(mc, minmax_start=3), tc, tmp_path / "o2", progress=False)
    assert not (tmp_path / "o2" / "last.pt").exists()


def test_default_warm_up_is_half_the_run(tmp_path: Path) -> None:
    """``minmax_start="half"`` (the default): WILDCAT epochs for the first half, min-max terms from epoch
    ``epochs // 2``; the checkpoint of the run records the epoch."""
    assert ModelConfig().minmax_start == "half"
    items = make_squares(tmp_path / "d", 4, 0, size=64, side=24)
    mc = ModelConfig(**{**TINY, "minmax_start": "half"}, method="minmax")
    res = fit(
        items[:2], items[2:], CLASSES, mc, TrainConfig(epochs=5, batch_size=2, crop=48), tmp_path / "o", progress=False
    )
    assert ["pos" in h for h in res.history] == [False, False, True, True, True]
    _, meta = load_checkpoint(res.last, class_names=CLASSES)
    assert meta["config"]["minmax_start"] == 2


def test_resume_with_other_settings_names_them(tmp_path: Path) -> None:
    """Resuming under other settings is refused with the differing settings named (e.g. a run started when the
    warm-up default was a fixed 10 epochs), and the interrupted run's files are left as they were."""
    items = make_squares(tmp_path / "d", 4, 0, size=64, side=24)
    mc = ModelConfig(**{**TINY, "minmax_start": "half"}, method="minmax")
    tc = TrainConfig(epochs=4, batch_size=2, crop=48)
    fit(items[:2], items[2:], CLASSES, mc, tc, tmp_path / "o", progress=False)
    before = (tmp_path / "o" / "last.pt").read_bytes()
    with pytest.raises(
        CheckpointError,
        match=r"last\.pt: configuration differs .*minmax_start: saved 2, given 1; "
        r"train\.epochs: saved 4, given 3\); cannot resume",
    ):
        fit(items[:2], items[2:], CLASSES, mc, replace(tc, epochs=3), tmp_path / "o", resume=True, progress=False)
    assert (tmp_path / "o" / "last.pt").read_bytes() == before


def test_wildcat_run_resumes_whatever_its_saved_warm_up(tmp_path: Path) -> None:
    """WILDCAT never uses ``minmax_start``: a run saved when the default was 10 resumes under "half"."""
    items = make_squares(tmp_path / "d", 4, 0, size=64, side=24)
    mc = ModelConfig(**{**TINY, "minmax_start": "half"}, method="wildcat")
    tc = TrainConfig(epochs=2, batch_size=2, crop=48)
    fit(items[:2], items[2:], CLASSES, mc, replace(tc, epochs=1), tmp_path / "o", progress=False)
    blob = torch.load(tmp_path / "o" / "last.pt", weights_only=True)
    blob["meta"]["config"]["minmax_start"] = 10  # as the previous version saved it
    blob["meta"]["train_config"]["epochs"] = 2  # the same run, interrupted after its first epoch
    torch.save(blob, tmp_path / "o" / "last.pt")
    res = fit(items[:2], items[2:], CLASSES, mc, tc, tmp_path / "o", resume=True, progress=False)
    assert [h["epoch"] for h in res.history] == [0, 1]


def test_a_detached_mask_trains_and_records_no_size_prior(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The size prior acts through the mask's gradient: with the mask detached the run says so, trains without
    it, and its checkpoint records ``size_prior='none'`` rather than a term that never acted."""
    items = make_squares(tmp_path / "d", 4, 0, size=64, side=24)
    mc = ModelConfig(**TINY, method="minmax", detach_mask=True, neg_updates="all", size_prior="range")
    with caplog.at_level("WARNING", logger="wsltool.config"):
        res = fit(items[:2], items[2:], CLASSES, mc, TrainConfig(epochs=1, batch_size=2, crop=48), tmp_path / "o")
    assert "cannot act on a detached mask" in caplog.text
    assert "size" not in res.history[0] and "neg" in res.history[0]
    _, meta = load_checkpoint(res.last, class_names=CLASSES)
    assert meta["config"]["size_prior"] == "none" and meta["config"]["detach_mask"] is True
    # a run saved before detached masks recorded 'none' (it said 'range', the default) still resumes
    old_saved = {**meta["config"], "size_prior": "range"}
    assert model_differences(old_saved, ModelConfig(**meta["config"])) == []
    assert model_differences(old_saved, replace(ModelConfig(**meta["config"]), detach_mask=False)) == [
        "detach_mask: saved True, given False",
        "size_prior: saved 'range', given 'none'",
    ]
    assert to_dict(ModelConfig(**meta["config"]))["size_prior"] == "none"
    attached = ModelConfig(**TINY, method="minmax", size_prior="range")
    res2 = fit(items[:2], items[2:], CLASSES, attached, TrainConfig(epochs=1, batch_size=2, crop=48), tmp_path / "a")
    assert res2.history[0]["size"] >= 0  # the same prior on an attached mask is a logged term


def test_the_progress_bar_shows_each_loss_term(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    items = make_squares(tmp_path / "d", 4, 0, size=64, side=24)
    mc = ModelConfig(**TINY, method="minmax")
    res = fit(items[:2], items[2:], CLASSES, mc, TrainConfig(epochs=1, batch_size=2, crop=48), tmp_path / "o")
    err = capsys.readouterr().err
    assert "epoch 1/1" in err
    for term in ("loc", "pos", "neg", "size", "total"):
        shown = re.findall(rf"{term}=(-?[0-9.]+)", err)
        assert shown, term
        assert float(shown[-1]) == pytest.approx(res.history[0][term], abs=6e-4), term  # epoch mean, 3 decimals


def test_resolve_minmax_start_values(caplog: pytest.LogCaptureFixture) -> None:
    """ "half" becomes epochs // 2 at every budget; numbers stay, unless longer than half the run; other methods
    are left alone; an unresolved "half" is refused by the training step rather than compared with an epoch."""
    half = ModelConfig(backbone="tiny", pretrained="none")
    assert [resolve_minmax_start(half, e).minmax_start for e in (1, 3, 20, 60)] == [0, 1, 10, 30]
    ten = ModelConfig(backbone="tiny", pretrained="none", minmax_start=10)
    assert resolve_minmax_start(ten, 60) is ten
    with caplog.at_level("WARNING", logger="wsltool.config"):
        assert resolve_minmax_start(ten, 12) is ten  # honoured, with a warning
    assert "last 2 epochs only" in caplog.text
    with pytest.raises(ConfigError, match="use at most 9"):
        resolve_minmax_start(ten, 10)
    wc = ModelConfig(backbone="tiny", pretrained="none", method="wildcat", minmax_start=10)
    assert resolve_minmax_start(wc, 4).minmax_start == 10
    for bad in ("quarter", -1, 2.5):
        with pytest.raises(ConfigError, match="minmax_start"):
            ModelConfig(minmax_start=bad)  # type: ignore[arg-type]
    model = build_model(ModelConfig(**{**TINY, "minmax_start": "half"}, method="minmax")).train()
    with pytest.raises(ConfigError, match="resolve_minmax_start"):
        model.training_losses(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]), epoch=0)


def test_checkpoint_without_later_fields_loads_as_trained(tmp_path: Path) -> None:
    """A checkpoint written before ``padding``/``neg_updates``/``classifier_backbone`` existed loads as trained."""
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY, method="minmax", padding="zeros", neg_updates="all", classifier_backbone="shared")
    model = build_model(cfg).eval()
    p = tmp_path / "old.pt"
    save_checkpoint(p, model, class_names=["a", "b"], mpp=0.5, input_size=64)
    blob = torch.load(p, weights_only=True)
    for key in ("padding", "neg_updates", "classifier_backbone"):
        del blob["meta"]["config"][key]
    torch.save(blob, p)
    loaded, _ = load_checkpoint(p)
    assert loaded.cfg.padding == "zeros" and loaded.cfg.neg_updates == "all"
    assert loaded.cfg.classifier_backbone == "shared" and loaded.cls_backbone is None
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        torch.testing.assert_close(model.localize(x)["probs"], loaded.localize(x)["probs"])


def test_lite0_checkpoint_from_before_head_conv_existed_keeps_its_head_convolution(tmp_path: Path) -> None:
    """Lite0 checkpoints written before ``head_conv`` existed were trained on the 1280-channel head features."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="efficientnet_lite0", pretrained="none", head_conv=True, output_stride=32)
    model = build_model(cfg).eval()
    p = tmp_path / "old.pt"
    save_checkpoint(p, model, class_names=["a", "b"], mpp=0.5, input_size=64)
    blob = torch.load(p, weights_only=True)
    del blob["meta"]["config"]["head_conv"]
    torch.save(blob, p)
    loaded, _ = load_checkpoint(p)
    assert loaded.cfg.head_conv and loaded.channels == 1280
    x = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        torch.testing.assert_close(model.localize(x)["mplus"], loaded.localize(x)["mplus"])


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))

    marker = ""


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _Evil.marker = str(marker)
    p = tmp_path / "evil.pt"
    torch.save(
        {"format": "wsltool-checkpoint", "format_version": 1, "state_dict": {}, "meta": _Evil()},
        p,
        pickle_module=pickle,
    )
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(p)
    assert not marker.exists()
    msg = str(ei.value)
    assert str(p) in msg and "refused" in msg and "\n" not in msg


def test_augmentation_invariants() -> None:
    gen = torch.Generator().manual_seed(0)
    img = torch.randint(0, 255, (3, 50, 70), dtype=torch.uint8)
    out = augment(img, 40, 1.0, gen)
    assert out.shape == (3, 40, 40) and out.dtype == torch.uint8
    small = random_crop(img, 64, gen)  # reflect padding when the image is smaller
    assert small.shape == (3, 64, 64)
    assert torch.equal(color_augment(img, 0.0), img)
    c = color_augment(img, 1.0, gen)
    assert c.dtype == torch.uint8 and (c.float() - img.float()).abs().mean() < 40
    # crops without colour change keep pixel values from the image
    plain = augment(img, 30, 0.0, gen)
    assert set(plain.flatten().tolist()) <= set(img.flatten().tolist())


def test_color_augment_is_the_documented_optical_density_jitter() -> None:
    """Values against the docstring's formula, recomputed in numpy from the same random draws."""
    rng = np.random.default_rng(3)
    # haematoxylin-, eosin- and background-like pixels, plus random ones
    img = np.concatenate(
        [np.array([[[60, 40, 140], [230, 120, 200], [245, 245, 245]]], np.uint8), rng.integers(0, 256, (1, 3, 3))], 1
    ).transpose(2, 0, 1)
    img = np.concatenate([img, rng.integers(0, 256, (3, 16, 16)).astype(np.uint8).reshape(3, 1, -1)], 2)
    for seed, strength in itertools.product(range(8), (0.5, 1.0, 2.0)):
        gen = torch.Generator().manual_seed(seed)
        out = color_augment(torch.from_numpy(img.copy()), strength, gen).numpy()
        draws = torch.rand(8, generator=torch.Generator().manual_seed(seed)).double().numpy()
        s = strength
        scale = 1 - 0.1 * s + 0.2 * s * draws[0:3]
        shift = -0.03 * s + 0.06 * s * draws[3:6]
        od = -np.log((img.astype(np.float64) + 1) / 256) * scale[:, None, None] + shift[:, None, None]
        x = 256 * np.exp(-od) - 1 + 255 * (-0.05 * s + 0.1 * s * draws[6])
        x = (x - x.mean()) * (1 - 0.1 * s + 0.2 * s * draws[7]) + x.mean()
        want = np.clip(np.round(x), 0, 255)
        diff = np.abs(out.astype(np.float64) - want)
        assert diff.max() <= 1 and (diff == 0).mean() >= 0.98  # float32 against float64: a rounding step, rarely
        # one transform for the whole image, increasing in each channel: stain structure is kept, nothing
        # spatial is added (two pixels in one channel never swap order)
        for c in range(3):
            order = np.argsort(img[c].ravel(), kind="stable")
            assert np.all(np.diff(out[c].ravel()[order].astype(int)) >= 0)
    # a flat image stays flat
    flat = torch.full((3, 8, 8), 120, dtype=torch.uint8)
    assert color_augment(flat, 1.0, torch.Generator().manual_seed(0)).flatten(1).unique(dim=1).shape[1] == 1


def test_lr_schedule() -> None:
    tc = TrainConfig(epochs=10, warmup_epochs=1, schedule="cosine")
    assert lr_factor(0.0, tc) < 0.01
    assert lr_factor(1.0, tc) == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.1)))
    assert lr_factor(10.0, tc) == pytest.approx(0.0, abs=1e-12)
    st = TrainConfig(epochs=100, warmup_epochs=0, schedule="step", step_epochs=40, gamma=0.1)
    assert [lr_factor(e, st) for e in (0, 39, 40, 80)] == pytest.approx([1, 1, 0.1, 0.01])


def test_own_classifier_backbone_trains_saves_and_loads(tmp_path: Path) -> None:
    from wsltool.train.loop import _optimizer

    torch.set_num_threads(1)
    items = make_squares(tmp_path / "d", 6, 0, size=64, side=24)
    mc = ModelConfig(**{**TINY, "minmax_start": 1}, classifier_backbone="own")
    tc = TrainConfig(epochs=3, batch_size=2, crop=48, backbone_lr_mult=0.1, num_threads=1)
    # the classifier's backbone learns at the backbone rate, as the localizer's
    model = build_model(mc)
    names = {id(p): n for n, p in model.named_parameters()}
    opt = _optimizer(model, tc)
    bb_group = next(g for g in opt.param_groups if g["base_lr"] == pytest.approx(tc.lr * 0.1))
    in_group = {names[id(p)].split(".")[0] for p in bb_group["params"]}
    assert in_group == {"backbone", "cls_backbone"}
    res = fit(items[:4], items[4:], CLASSES, mc, tc, tmp_path / "o", progress=False)
    loaded, meta = load_checkpoint(res.last, class_names=CLASSES)
    assert meta["config"]["classifier_backbone"] == "own" and int(loaded.cls_synced) == 1
    sd = loaded.state_dict()
    # trained apart after the warm-up epoch: the two backbones hold different weights
    assert any(not torch.equal(sd[k], sd["cls_" + k]) for k in sd if k.startswith("backbone."))
    x = torch.randint(0, 255, (1, 3, 48, 48), dtype=torch.uint8)
    again, _ = load_checkpoint(res.last, class_names=CLASSES)
    with torch.inference_mode():
        o1, o2 = loaded.localize(x), again.localize(x)
    for k in o1:
        torch.testing.assert_close(o1[k], o2[k])


def test_checkpoint_selection_rule_lower_error_then_loss_ties_to_the_later_epoch() -> None:
    from wsltool.train.loop import improves, selection_key

    recs = [(10.0, 0.5), (0.0, 0.9), (0.0, 0.9), (0.0, 1.0), (5.0, 0.1)]
    best_key, best = None, -1
    for epoch, (err, loss) in enumerate(recs):
        key = selection_key({"valid_error": err, "valid_loss": loss}, "error_loss")
        if improves(key, best_key):
            best_key, best = key, epoch
    assert best == 2 and best_key == (0.0, 0.9)  # error first, then loss; the tie of epochs 1 and 2 -> 2
    best_key, best = None, -1
    for epoch, (err, loss) in enumerate(recs):  # method.md's rule: error alone, ties -> the later epoch
        key = selection_key({"valid_error": err, "valid_loss": loss}, "error")
        if improves(key, best_key):
            best_key, best = key, epoch
    assert best == 3 and best_key == (0.0, 0.0)
    assert selection_key({"valid_error": 5.0, "valid_loss": 0.1}, "loss") == (0.1, 0.0)
    assert selection_key({"valid_error": 5.0, "valid_loss": 0.1}, "last") == (0.0, 0.0)
    assert not improves(None, (1.0, 1.0))  # an epoch that was not validated never becomes the best


def test_fit_keeps_the_best_validated_epoch_without_any_mask(tmp_path: Path) -> None:
    """Checkpoint selection uses labels only: validation images here have no mask anywhere."""
    items = make_squares(tmp_path / "d", 6, seed=3, size=48, side=20)
    valid = []
    for it in items[4:]:
        q = tmp_path / "nomask" / it.path.name
        q.parent.mkdir(exist_ok=True)
        q.write_bytes(it.path.read_bytes())
        valid.append(LabeledItem(q, it.label))
    tc = TrainConfig(epochs=4, batch_size=2, crop=32, num_threads=1, seed=1)
    res = fit(items[:4], valid, CLASSES, ModelConfig(**TINY), tc, tmp_path / "r", progress=False)
    keys = [(h["valid_error"], h["valid_loss"]) for h in res.history]
    want = max(i for i, k in enumerate(keys) if k == min(keys))
    assert res.best_epoch == want
    extra = load_checkpoint(res.best)[1]["extra"]
    assert extra["epoch"] == want and (extra["valid_error"], extra["valid_loss"]) == keys[want]
    assert [h["best"] for h in res.history].count(True) >= 1


def test_a_plain_pickle_is_never_unpickled(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    marker = tmp_path / "pwned"
    _Evil.marker = str(marker)
    p = tmp_path / "plain.pt"
    p.write_bytes(pickle.dumps({"format": "wsltool-checkpoint", "meta": _Evil()}))
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(p)
    assert not marker.exists()
    want = "corrupt or not a checkpoint (not a torch zip archive; plain pickle files are never loaded)"
    assert str(ei.value) == f"{p}: {want}"
    assert not [w for w in recwarn if "pickle" in str(w.message)]  # torch never saw it


def test_optimizers_and_their_parameter_groups() -> None:
    from wsltool.train.loop import _optimizer

    model = build_model(ModelConfig(**TINY))
    sgd = _optimizer(model, TrainConfig(optimizer="sgd", lr=0.01, backbone_lr_mult=0.1, momentum=0.9))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    assert [g["base_lr"] for g in sgd.param_groups] == [0.01, pytest.approx(0.001)]
    n_bb = sum(1 for n, _ in model.named_parameters() if n.startswith("backbone."))
    assert len(sgd.param_groups[1]["params"]) == n_bb
    adamw = _optimizer(model, TrainConfig(optimizer="adamw", lr=0.002, weight_decay=1e-4))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 1e-4
    frozen = _optimizer(build_model(ModelConfig(**TINY)), TrainConfig(backbone_lr_mult=0.0))
    assert len(frozen.param_groups) == 1  # the backbone is frozen: not in the optimizer at all


def test_barrier_t_schedule() -> None:
    from wsltool.train.loop import barrier_t

    cfg = TrainConfig()
    assert barrier_t(0, cfg) == 5.0
    assert barrier_t(10, cfg) == pytest.approx(5.0 * 1.01**10)
    assert barrier_t(69, cfg) == pytest.approx(5.0 * 1.01**69) and barrier_t(69, cfg) < 10.0
    assert barrier_t(70, cfg) == 10.0 and barrier_t(400, cfg) == 10.0  # 1.01 ** 70 > 2: capped
    assert barrier_t(3, TrainConfig(barrier_t0=1.0, barrier_growth=2.0, barrier_tmax=100.0)) == 8.0


def test_augment_draws_every_flip_and_rotation_and_nothing_else() -> None:
    img = torch.arange(3 * 12 * 12, dtype=torch.int64).view(3, 12, 12) % 251  # no two pixels alike
    img = img.to(torch.uint8)
    views = [torch.rot90(v, k, dims=(-2, -1)) for v in (img, img.flip(-1)) for k in range(4)]
    assert len({bytes(v.contiguous().numpy()) for v in views}) == 8
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(80):
        out = augment(img, 12, 0.0, gen)  # the whole image: only the flips / rotations change it
        hits = [i for i, v in enumerate(views) if torch.equal(out, v)]
        assert len(hits) == 1
        seen.add(hits[0])
    assert seen == set(range(8))


def test_sigma_schedule_reaches_inference_checkpoints_and_ensembles(tmp_path: Path) -> None:
    """``TrainConfig.sigma_end`` (TMI: 0.15 -> 0.2) moves sigma over the epochs; validation, the saved
    checkpoints and their loaded models classify X+ with the epoch's sigma, not the start value."""
    from wsltool.models.minmax import pseudo_binary
    from wsltool.train.checkpoint import read_checkpoint, save_ensemble
    from wsltool.train.loop import sigma_at

    mc = ModelConfig(**TINY, sigma=0.15, w=5.0)
    tc = TrainConfig(epochs=3, batch_size=4, crop=48, num_threads=1, sigma_end=0.2, select="last")
    assert [sigma_at(e, mc, tc) for e in range(3)] == pytest.approx([0.15, 0.175, 0.2])
    assert sigma_at(2, mc, replace(tc, sigma_end=None)) is None
    torch.set_num_threads(1)
    items = make_squares(tmp_path / "d", 8, 0, size=64, side=24)
    res = fit(items[:6], items[6:], CLASSES, mc, tc, tmp_path / "run", progress=False)
    assert read_checkpoint(res.last)["meta"]["infer_sigma"] == pytest.approx(0.2)
    model, _ = load_checkpoint(res.last)
    assert model.infer_sigma == pytest.approx(0.2)
    x = model.normalize(torch.from_numpy(np.array(Image.open(items[6].path))).permute(2, 0, 1)[None])
    with torch.inference_mode():
        scores, maps = model.heads_out(x)
        mplus = model.mplus(scores, maps, (64, 64))
        want = {s: model.classify(x * pseudo_binary(mplus, 5.0, s)).softmax(1) for s in (0.15, 0.2)}
        got = model._infer(x)[2]
    assert torch.equal(got, want[0.2]) and not torch.equal(got, want[0.15])  # the same ops, bit for bit
    # an ensemble keeps each member's sigma; a model trained without a schedule has none
    plain_tc = replace(tc, sigma_end=None)
    plain = fit(items[:6], items[6:], CLASSES, ModelConfig(**TINY), plain_tc, tmp_path / "p", progress=False)
    assert read_checkpoint(plain.last)["meta"]["infer_sigma"] is None
    save_ensemble(tmp_path / "e.pt", [res.last, plain.last])
    ens, _ = load_checkpoint(tmp_path / "e.pt")
    assert [m.infer_sigma for m in ens.members] == [pytest.approx(0.2), None]
