"""Training from slide-level labels: input validation, MIL sampling, CLI end to end, resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsltool.cli import main as cli_main
from wsltool.config import MilConfig, ModelConfig, TrainConfig
from wsltool.errors import LabelsError
from wsltool.testing.cohort import make_cohort
from wsltool.train.labels import LabeledItem, read_labels
from wsltool.train.slides import (
    RegionReader,
    _select,
    fit_slides,
    prepare_sources,
    roc_auc,
    stratified_split,
    train_from_items,
)

TINY_MODEL = {"backbone": "efficientnet_lite0", "pretrained": "none"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cohort")
    make_cohort(d, {"train": (1, 1), "valid": (1, 1)}, size=(768, 1024), seed=3, lesion_range=(0.25, 0.3))
    return d


def test_roc_auc_values() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_stratified_split_is_seeded_and_per_class() -> None:
    items = [LabeledItem(Path(f"{c}{i}.svs"), c) for c in ("benign", "malignant") for i in range(8)]
    a, b = stratified_split(items, 0.25, seed=1), stratified_split(items, 0.25, seed=1)
    assert [i.split for i in a] == [i.split for i in b]
    for c in ("benign", "malignant"):
        assert sum(i.split == "valid" for i in a if i.label == c) == 2
    single = stratified_split([LabeledItem(Path("x.svs"), "benign"), LabeledItem(Path("y.svs"), "malignant")])
    assert all(i.split == "train" for i in single)  # never validate on a class's only slide


def test_bad_csv_reports_every_problem(tmp_path: Path, cohort: Path) -> None:
    good = next(cohort.glob("*malignant.svs"))
    (tmp_path / "broken.svs").write_text("not a slide")
    csv = tmp_path / "slides.csv"
    csv.write_text(f"slide,label\n{good},malignant\nmissing.svs,benign\n{good},malignant\nbroken.svs,\n")
    with pytest.raises(LabelsError) as ei:
        read_labels(csv, class_names=["benign", "malignant"])
    msg = str(ei.value)
    assert "\n" not in msg and str(csv) in msg
    assert "line 3: file not found: missing.svs" in msg
    assert "line 4: duplicate of line 2" in msg
    assert "line 5: missing label for broken.svs" in msg
    assert "class 'benign' has no item" in msg


def test_split_problem_names_the_labels_file_not_a_split_never_written(tmp_path: Path, cohort: Path) -> None:
    """With a split column of its own, a CSV whose rows are all ``valid`` is reported against that CSV (no
    ``splits.csv`` was written), and the run folder is not created."""
    rows = read_labels(cohort / "slides.csv")
    csv = tmp_path / "all_valid.csv"
    csv.write_text("path,label,split\n" + "".join(f"{it.path},{it.label},valid\n" for it in rows))
    out = tmp_path / "run"
    with pytest.raises(LabelsError) as ei:
        train_from_items(read_labels(csv), out)
    msg = str(ei.value)
    assert msg.startswith(f"{csv}:") and "split 'train' has no item" in msg and "splits.csv" not in msg
    assert not out.exists()


def test_unreadable_slides_reported_together_before_training(tmp_path: Path, cohort: Path) -> None:
    (tmp_path / "a.svs").write_text("not a slide")
    (tmp_path / "b.svs").write_bytes(next(cohort.glob("*.svs")).read_bytes()[:5000])
    items = [LabeledItem(tmp_path / "a.svs", "benign", row=2), LabeledItem(tmp_path / "b.svs", "malignant", row=3)]
    with pytest.raises(LabelsError) as ei:
        prepare_sources(items, ["benign", "malignant"], MilConfig(region=128))
    assert len(ei.value.problems) == 2
    assert "line 2:" in ei.value.problems[0] and "a.svs" in ei.value.problems[0]
    assert "line 3:" in ei.value.problems[1] and "b.svs" in ei.value.problems[1]


class BlueScorer(torch.nn.Module):
    """Scores a region by how much lesion-blue it holds (the lesion nuclei are dark blue-purple)."""

    def localize(self, x: torch.Tensor, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        xf = x.float() / 255.0
        dark = ((xf[:, 2] - xf[:, 0] > -0.2) & (xf.mean(1) < 0.45)).float().mean((1, 2))
        p = dark  # fraction of lesion-like pixels: no saturation, so no ties among lesion regions
        z = torch.zeros_like(xf[:, 0])
        return {
            "probs": torch.stack([1 - p, p], 1),
            "mplus": F.interpolate(z[:, None], size)[:, 0],
            "class_maps": z[:, None].repeat(1, 2, 1, 1),
        }


def test_mil_topk_picks_lesion_regions(cohort: Path) -> None:
    from PIL import Image

    item = next(it for it in read_labels(cohort / "slides.csv") if it.label == "malignant" and it.split == "train")
    mil = MilConfig(mpp=1.0, region=128, top_k=3, n_random=0, score_cap=1000, warmup_epochs=0, min_tissue=0.3)
    (src,) = prepare_sources([item], ["benign", "malignant"], mil)
    reader = RegionReader(mil)
    x, n_top = _select(BlueScorer(), reader, src, mil, 1, "cpu", epoch=1, rng=np.random.default_rng(0))
    assert n_top == 3 and len(x) == 3
    les = np.asarray(Image.open(item.mask)) > 0
    f = mil.mpp / 0.5

    def lesion_frac(o: np.ndarray) -> float:
        x0, y0 = int(o[0]), int(o[1])
        return float(les[y0 : y0 + int(128 * f), x0 : x0 + int(128 * f)].mean())

    all_fracs = np.array([lesion_frac(o) for o in src.origins])
    scores = BlueScorer().localize(reader.read(src, range(src.n)), (4, 4))["probs"][:, 1].numpy()
    top = np.argsort(-scores, kind="stable")[:3]
    # _select returned exactly the three best-scored regions (every region was a candidate here)
    np.testing.assert_array_equal(x.numpy(), reader.read(src, top).numpy())
    # and with a scorer that sees lesion nuclei, those regions hold far more lesion than average
    assert all_fracs[top].min() > 0.2 and all_fracs[top].mean() > 2 * all_fracs.mean()
    # the warm-up epoch samples at random instead
    _, n0 = _select(
        BlueScorer(),
        reader,
        src,
        dataclasses_replace(mil, warmup_epochs=1),
        1,
        "cpu",
        epoch=0,
        rng=np.random.default_rng(0),
    )
    assert n0 == 0
    reader.close()


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_cli_train_slides_end_to_end(tmp_path: Path, cohort: Path, capsys) -> None:
    out = tmp_path / "model"
    args = [
        "train",
        "--labels",
        str(cohort / "slides.csv"),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--backbone",
        "efficientnet_lite0",
        "--pretrained",
        "none",
        "--batch-size",
        "4",
        "--set",
        "region=128",
        "--set",
        "score_cap=6",
        "--set",
        "top_k=2",
        "--set",
        "n_random=1",
        "--set",
        "mpp=2.0",
        "--no-progress",
    ]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "trained from 4 slide labels" in printed and "slide AUC" in printed
    hist = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [0, 1]
    for h in hist:
        assert {"valid_error", "valid_auc", "loc", "pos", "neg", "regions", "regions_per_s"} <= set(h)
        assert h["regions"] == 2 * 3 and h["top_regions"] == (0 if h["epoch"] == 0 else 2 * 2)
    assert (out / "best.pt").exists() and (out / "curves.png").stat().st_size > 1000
    assert "valid_auc" in (out / "history.csv").read_text().splitlines()[0]
    from wsltool.train.checkpoint import load_checkpoint

    _, meta = load_checkpoint(out / "best.pt")
    assert meta["class_names"] == ["benign", "malignant"] and meta["mpp"] == 2.0 and meta["input_size"] == 128
    assert meta["train_config"]["positive_class"] == "malignant"
    # --resume of a finished run does no more epochs
    assert cli_main([*args, "--resume"]) == 0
    assert len((out / "history.jsonl").read_text().splitlines()) == 2


def test_resume_continues_interrupted_training(tmp_path: Path, cohort: Path) -> None:
    items = read_labels(cohort / "slides.csv")
    tr = [i for i in items if i.split == "train"]
    va = [i for i in items if i.split == "valid"]
    mcfg = ModelConfig(**TINY_MODEL)
    tcfg = TrainConfig(epochs=2, batch_size=4, schedule="constant", warmup_epochs=0)
    mil = MilConfig(mpp=2.0, region=128, score_cap=6, top_k=2, n_random=1)
    epochs_done: list[int] = []  # stop at the first batch after epoch 0 has finished (an interruption)
    r1 = fit_slides(
        tr,
        va,
        ["benign", "malignant"],
        mcfg,
        tcfg,
        mil,
        tmp_path,
        progress=False,
        on_epoch=lambda rec: epochs_done.append(rec["epoch"]),
        should_stop=lambda: bool(epochs_done),
    )
    assert r1.history[0]["epoch"] == 0
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["train_state"]
    assert saved["epoch"] == 0  # the interrupted epoch is not recorded as done
    r2 = fit_slides(tr, va, ["benign", "malignant"], mcfg, tcfg, mil, tmp_path, progress=False, resume=True)
    assert [h["epoch"] for h in r2.history] == [0, 1]


def test_fine_tuning_from_an_image_checkpoint_skips_the_warm_up(tmp_path: Path, cohort: Path) -> None:
    """Retrain (napari) from a checkpoint that recorded a long warm-up (an image model: 30 of 60 epochs, say)
    fine-tunes with the min-max terms from epoch 0, as slide training does, instead of refusing a 2-epoch
    retrain whose warm-up it could never reach."""
    from wsltool.testing.models import make_checkpoint
    from wsltool.train.checkpoint import load_checkpoint
    from wsltool.train.slides import train_from_rows

    init = make_checkpoint(tmp_path / "image.pt", minmax_start=30, mpp=2.0)
    rows = [(str(i.path), i.label) for i in read_labels(cohort / "slides.csv")]
    res = train_from_rows(
        rows,
        tmp_path / "out",
        epochs=2,
        init_from=str(init),
        mil={"mpp": 2.0, "region": 128, "score_cap": 6, "top_k": 2, "n_random": 1},
        train={"batch_size": 4},
        progress=False,
    )
    _, meta = load_checkpoint(res.best, class_names=["benign", "malignant"])
    assert meta["config"]["minmax_start"] == 0 and len(res.history) == 2


def test_slide_training_passes_the_sigma_schedule_to_the_losses() -> None:
    """The slide loop calls the losses through ``LossModule`` (DDP-ready): its sigma must reach the mask."""
    from wsltool.models import build_model
    from wsltool.train.distributed import LossModule

    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY_MODEL, head_dropout=0.0, minmax_start=0, num_classes=2)).eval()
    xn = torch.randn(2, 3, 64, 64)
    y = torch.tensor([0, 1])
    via = LossModule(model)
    with torch.no_grad():
        for sigma in (0.15, 0.6):
            got = via(xn, y, 0, 5.0, sigma)
            want = model.training_losses(xn, y, epoch=0, barrier_t=5.0, sigma=sigma)
            assert float(got["area"]) == float(want["area"])
        assert float(via(xn, y, 0, 5.0, 0.15)["area"]) > float(
            via(xn, y, 0, 5.0, 0.6)["area"]
        )  # lower sigma, larger mask


def test_only_rank_0_writes_the_split(tmp_path: Path, cohort: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun every rank makes the same seeded split; only rank 0 writes (and may take back) splits.csv."""
    items = [dataclasses.replace(i, split=None) for i in read_labels(cohort / "slides.csv")]
    kw: dict[str, Any] = {
        "model_cfg": ModelConfig(**TINY_MODEL),
        "train_cfg": TrainConfig(epochs=1, batch_size=4, schedule="constant", warmup_epochs=0),
        "mil": MilConfig(mpp=2.0, region=128, score_cap=6, top_k=2, n_random=1),
        "progress": False,
    }
    monkeypatch.setenv("RANK", "1")  # WORLD_SIZE unset: this process trains alone, as the test needs
    train_from_items(items, tmp_path / "r1", **kw)
    assert (tmp_path / "r1" / "last.pt").exists() and not (tmp_path / "r1" / "splits.csv").exists()
    monkeypatch.delenv("RANK")
    train_from_items(items, tmp_path / "r0", **kw)
    written = read_labels(tmp_path / "r0" / "splits.csv")
    assert sorted((i.path.name, i.split) for i in written) == sorted(
        (i.path.name, i.split) for i in stratified_split(items, 0.25, seed=0)
    )
