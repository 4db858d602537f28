"""Models: WILDCAT pooling, losses, mask, erasing, gradients, backbones (values, not smoke)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsltool.config import ModelConfig
from wsltool.errors import ConfigError
from wsltool.models import (
    MinMaxNet,
    WildcatHead,
    build_backbone,
    build_model,
    normalize_per_image,
    pseudo_binary,
    wildcat_pool,
)
from wsltool.models.erasing import recursive_erase
from wsltool.models.losses import ce_loss, log_barrier, size_loss, uniform_ce_loss

TINY = {"backbone": "tiny", "pretrained": "none", "output_stride": 8, "minmax_start": 0}  # min-max from epoch 0


def np_wildcat(maps: np.ndarray, kmax: int, kmin: int, alpha: float) -> np.ndarray:
    b, c = maps.shape[:2]
    out = np.zeros((b, c))
    for i in range(b):
        for j in range(c):
            v = np.sort(maps[i, j].ravel())[::-1]
            out[i, j] = v[:kmax].mean() + (alpha * v[-kmin:].mean() if kmin else 0.0)
    return out


def test_wildcat_pool_matches_numpy_with_kmin() -> None:
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 2, 5, 4)).astype(np.float32)
    t = torch.from_numpy(maps)
    # fractions: 20 positions, kmax 0.1 -> 2, kmin 0.25 -> 5
    got = wildcat_pool(t, kmax=0.1, kmin=0.25, alpha=0.7).numpy()
    np.testing.assert_allclose(got, np_wildcat(maps, 2, 5, 0.7), rtol=1e-5, atol=1e-6)
    # the kmin term really counts
    without = wildcat_pool(t, kmax=0.1, kmin=0.25, alpha=0.0).numpy()
    np.testing.assert_allclose(
        got - without, 0.7 * np.sort(maps.reshape(3, 2, -1), -1)[..., :5].mean(-1), rtol=1e-5, atol=1e-6
    )
    # absolute counts
    np.testing.assert_allclose(
        wildcat_pool(t, kmax=3, kmin=2, alpha=-0.5).numpy(), np_wildcat(maps, 3, 2, -0.5), rtol=1e-5, atol=1e-6
    )


def test_wildcat_dropout_only_in_training() -> None:
    t = torch.randn(2, 2, 6, 6)
    a = wildcat_pool(t, 0.3, dropout=0.75, training=False)
    torch.manual_seed(0)
    b = wildcat_pool(t, 0.3, dropout=0.75, training=True)
    assert torch.equal(a, wildcat_pool(t, 0.3))
    assert not torch.allclose(a, b)


def test_wildcat_head_classwise_mean_over_modalities() -> None:
    head = WildcatHead(4, num_classes=2, modalities=3, kmax=1.0, kmin=0, alpha=0)
    f = torch.randn(1, 4, 3, 3)
    scores, maps = head(f)
    raw = head.conv(f).view(1, 2, 3, 3, 3)
    torch.testing.assert_close(maps, raw.mean(2))
    torch.testing.assert_close(scores, maps.mean(dim=(2, 3)))  # kmax = all positions -> global mean


def test_losses_hand_computed() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    p0 = math.exp(2) / (math.exp(2) + 1)
    p1 = 1 / (1 + math.e)
    assert ce_loss(logits, y).item() == pytest.approx((-math.log(p0) - math.log(p1)) / 2, rel=1e-6)
    want = (-(math.log(p0) + math.log(1 - p0)) / 2 - (math.log(p1) + math.log(1 - p1)) / 2) / 2
    assert uniform_ce_loss(logits).item() == pytest.approx(want, rel=1e-6)
    # uniform prediction reaches the minimum log C
    assert uniform_ce_loss(torch.zeros(4, 3)).item() == pytest.approx(math.log(3), rel=1e-6)


def test_log_barrier_branches() -> None:
    t = 5.0
    z = torch.tensor([-0.5, -1 / t**2, 0.0, 0.3])
    got = log_barrier(z, t)
    assert got[0].item() == pytest.approx(-math.log(0.5) / t)
    assert got[1].item() == pytest.approx(-math.log(1 / t**2) / t)  # continuous at the junction
    assert got[2].item() == pytest.approx(-math.log(1 / t**2) / t + 1 / t)
    assert got[3].item() == pytest.approx(t * 0.3 - math.log(1 / t**2) / t + 1 / t)


def test_size_loss_values() -> None:
    m = torch.full((2, 1, 4, 4), 0.25)
    t = 5.0
    want_abs = log_barrier(torch.tensor(-0.25), t) + log_barrier(torch.tensor(-0.75), t)
    assert size_loss(m, t, "absolute").item() == pytest.approx(want_abs.item(), rel=1e-6)
    want_rng = log_barrier(torch.tensor(0.25 - 0.7), t) + log_barrier(torch.tensor(0.3 - 0.25), t)
    assert size_loss(m, t, "range", 0.3, 0.7).item() == pytest.approx(want_rng.item(), rel=1e-6)
    # the range prior pushes a too-small mask to grow
    mm = m.clone().requires_grad_(True)
    size_loss(mm, t, "range", 0.3, 0.7).backward()
    assert mm.grad is not None and (mm.grad < 0).all()


def test_batch_range_prior_bounds_the_batch_mean_not_each_image() -> None:
    t = 5.0
    # one crop with a 10 % mask, one with 90 %: the mean (0.5) is inside [0.3, 0.7]
    m = torch.stack([torch.full((1, 4, 4), 0.1), torch.full((1, 4, 4), 0.9)])
    per_image = (log_barrier(torch.tensor([-0.1, -0.9]), t) + log_barrier(torch.tensor([-0.9, -0.1]), t)).mean()
    want = per_image + log_barrier(torch.tensor(0.5 - 0.7), t) + log_barrier(torch.tensor(0.3 - 0.5), t)
    got = size_loss(m, t, "batch_range", 0.3, 0.7)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # the per-image range prior penalises both crops far more
    assert size_loss(m, t, "range", 0.3, 0.7).item() > got.item() + 0.1
    # with the mean in range, only the non-empty barrier pushes the small crop (less than half the range pull)
    mm = m.clone().requires_grad_(True)
    size_loss(mm, t, "batch_range", 0.3, 0.7).backward()
    assert mm.grad is not None
    g_range = m.clone().requires_grad_(True)
    size_loss(g_range, t, "range", 0.3, 0.7).backward()
    assert g_range.grad is not None
    assert (g_range.grad[0] < 0).all() and abs(mm.grad[0].mean().item()) < abs(g_range.grad[0].mean().item()) / 2
    # a batch whose mean is too small is pushed to grow
    small = torch.full((2, 1, 4, 4), 0.1, requires_grad=True)
    size_loss(small, t, "batch_range", 0.3, 0.7).backward()
    assert small.grad is not None and (small.grad < 0).all()


def test_per_image_normalisation_and_pseudo_binary() -> None:
    a = torch.rand(1, 1, 5, 5) * 3 + 7
    b = torch.rand(1, 1, 5, 5) * 0.01 - 2
    both = normalize_per_image(torch.cat([a, b]))
    torch.testing.assert_close(both[0:1], normalize_per_image(a))
    torch.testing.assert_close(both[1:2], normalize_per_image(b))
    for i in range(2):
        assert both[i].min().item() == pytest.approx(0.0, abs=1e-6)
        assert both[i].max().item() == pytest.approx(1.0, abs=1e-5)
    tiny = normalize_per_image(torch.tensor([[0.0, 5e-7, 1e-6]]))  # a small range is stretched all the way
    assert tiny.tolist() == [[0.0, 0.5, 1.0]]
    assert normalize_per_image(torch.full((1, 4), 3.0)).tolist() == [[0.0] * 4]  # a constant map becomes 0
    m = pseudo_binary(both, w=8.0, sigma=0.5)
    assert (m > 0).all() and (m < 1).all()
    assert m.min().item() == pytest.approx(1 / (1 + math.exp(4)), rel=1e-4)
    assert m.max().item() == pytest.approx(1 / (1 + math.exp(-4)), rel=1e-4)


def _step_from(scores: list[torch.Tensor], masks: list[torch.Tensor], calls: list[torch.Tensor]):
    def step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i = len(calls)
        calls.append(x.clone())
        return scores[i], masks[i]

    return step


def test_erasing_trust_zero_means_no_erasing() -> None:
    x = torch.rand(2, 3, 4, 4)
    y = torch.tensor([0, 1])
    wrong = torch.tensor([[0.0, 3.0], [3.0, 0.0]])  # both predictions wrong -> trust 0, all frozen
    calls: list[torch.Tensor] = []
    res = recursive_erase(x, y, _step_from([wrong] * 4, [torch.rand(2, 1, 4, 4)] * 4, calls), passes=4)
    assert res.passes == 1 and len(calls) == 1  # frozen after the first pass
    assert torch.equal(res.accumulated, torch.zeros(2, 1, 4, 4))
    assert torch.equal(res.trusts[0], torch.zeros(2))


def test_erasing_accumulates_pixelwise_max_and_stops_when_frozen() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 4)
    y = torch.tensor([0, 0])
    ok = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    ok_better = torch.tensor([[3.0, 0.0], [3.0, 0.0]])
    sample1_wrong = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    both_wrong = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    masks = [torch.rand(2, 1, 4, 4) for _ in range(5)]
    scores = [ok, ok_better, sample1_wrong, both_wrong, ok]
    calls: list[torch.Tensor] = []
    res = recursive_erase(x, y, _step_from(scores, masks, calls), passes=5, sigma_e=10.0)
    assert res.passes == 4  # pass 3 freezes the last sample: no pass 4
    pmax = [torch.softmax(s, 1).max(1).values for s in scores]
    expect_trust = [
        pmax[0],
        math.exp(-0.1) * pmax[1],
        torch.tensor([math.exp(-0.2) * pmax[2][0].item(), 0.0]),
        torch.zeros(2),
    ]
    for got, want in zip(res.trusts, expect_trust, strict=True):
        torch.testing.assert_close(got, want)
    acc = torch.zeros(2, 1, 4, 4)
    for tr, m in zip(expect_trust, masks, strict=False):
        acc = torch.maximum(acc, tr.view(2, 1, 1, 1) * m)
    torch.testing.assert_close(res.accumulated, acc)
    # the second pass saw the image erased by the first accumulated mask
    torch.testing.assert_close(calls[1], x * (1 - expect_trust[0].view(2, 1, 1, 1) * masks[0]))
    # sample 1 is not erased further after it was frozen (trust 0 at pass 2)
    torch.testing.assert_close(calls[3][1], calls[2][1])


@pytest.mark.parametrize("detach", [True, False])
def test_gradient_reaches_localizer_exactly_when_not_detached(detach: bool) -> None:
    torch.manual_seed(0)
    model = MinMaxNet(ModelConfig(**TINY, detach_mask=detach, neg_updates="all", size_prior="none", head_dropout=0.0))
    model.train()
    x = model.normalize(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8))
    out = model.training_losses(x, torch.tensor([0, 1]))
    (out["_pos"] + out["_neg"]).backward()
    g = model.loc_head.conv.weight.grad
    if detach:
        assert g is None or float(g.abs().sum()) == 0.0
    else:
        assert g is not None and float(g.abs().sum()) > 0
    assert model.cls_head.conv.weight.grad is not None


def test_localize_contract_and_batch_independence() -> None:
    torch.manual_seed(0)
    for method in ("minmax", "wildcat", "cam"):
        model = build_model(ModelConfig(**TINY, method=method)).eval()
        x = torch.randint(0, 255, (3, 3, 40, 48), dtype=torch.uint8)
        with torch.inference_mode():
            out = model.localize(x, size=(20, 24))
            one = model.localize(x[1:2], size=(20, 24))
        assert out["probs"].shape == (3, 2) and out["probs"].dtype == torch.float32
        torch.testing.assert_close(out["probs"].sum(1), torch.ones(3))
        assert out["mplus"].shape == (3, 20, 24) and out["mplus"].dtype == torch.float32
        assert out["class_maps"].shape == (3, 2, 20, 24)
        assert float(out["mplus"].min()) >= 0 and float(out["mplus"].max()) <= 1
        torch.testing.assert_close(out["mplus"][1:2], one["mplus"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["probs"][1:2], one["probs"], atol=1e-5, rtol=1e-5)


def test_cam_scores_are_the_linear_layer_on_pooled_features_and_its_maps_per_position() -> None:
    """CAM (Zhou et al. 2016): scores = fc(GAP(f)); class map c at each position = w_c . f + b_c (numpy)."""
    from wsltool.models.wildcat import CamHead

    torch.manual_seed(0)
    head = CamHead(5, 3)
    f = torch.randn(2, 5, 4, 6)
    scores, maps = head(f)
    fn, w, b = f.numpy().astype(np.float64), head.fc.weight.detach().numpy(), head.fc.bias.detach().numpy()
    want_maps = np.einsum("bkhw,ck->bchw", fn, w) + b[None, :, None, None]
    np.testing.assert_allclose(maps.detach().numpy(), want_maps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores.detach().numpy(), fn.mean(axis=(2, 3)) @ w.T + b, rtol=1e-5, atol=1e-5)
    assert maps[0, 1, 2, 3].item() == pytest.approx(float(fn[0, :, 2, 3] @ w[1] + b[1]), abs=1e-5)


def test_bn_modes() -> None:
    model = MinMaxNet(ModelConfig(**TINY, bn_mode="masked_running"))
    model.train()
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = model.normalize(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8))
    model.heads_out(x)
    after_x = bn.num_batches_tracked.item()
    model.classify(x)  # masked passes use (and do not update) the running statistics
    assert bn.num_batches_tracked.item() == after_x
    assert bn.training
    frozen = MinMaxNet(ModelConfig(**TINY, bn_mode="frozen")).train()
    assert not any(m.training for m in frozen.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_backbone_strides() -> None:
    for name, stride, ch, head in (
        ("resnet18", 16, 512, False),
        ("resnet18", 32, 512, True),  # no head convolution: ignored
        ("efficientnet_lite0", 16, 320, False),
        ("efficientnet_lite0", 32, 320, False),
        ("efficientnet_lite0", 16, 1280, True),
    ):
        net, info = build_backbone(name, "none", stride, head_conv=head)
        with torch.no_grad():
            f = net.eval()(torch.zeros(1, 3, 64, 96))
        assert f.shape == (1, ch, 64 // stride, 96 // stride)
        assert info.channels == ch
    for name, stride, ch in (
        ("resnet18", 16, 256 + 512),
        ("resnet18", 32, 256 + 512),
        ("efficientnet_lite0", 16, 112 + 320),
        ("efficientnet_lite0", 32, 112 + 320),
    ):
        net, info = build_backbone(name, "none", stride, multi_level=True)
        with torch.no_grad():
            f = net.eval()(torch.zeros(1, 3, 64, 96))
        assert f.shape == (1, ch, 64 // stride, 96 // stride)
        assert info.channels == ch
    with pytest.raises(ConfigError):
        build_backbone("resnet18", "imagenet")
    with pytest.raises(ConfigError):
        build_backbone("nope")
    with pytest.raises(ConfigError, match="multi_level"):
        build_backbone("tiny", "none", 8, multi_level=True)


def test_multi_level_features_are_the_stride16_stage_pooled_next_to_the_last_block() -> None:
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 96)
    single, _ = build_backbone("resnet18", "none", 32)
    multi, _ = build_backbone("resnet18", "none", 32, multi_level=True)
    assert list(single.state_dict()) == list(multi.state_dict())  # saved ResNet models keep their keys
    multi.load_state_dict(single.state_dict())
    with torch.no_grad():
        mid = single.eval().body[:7](x)  # layer3: stride 16
        want = torch.cat([torch.nn.functional.avg_pool2d(mid, 2), single(x)], dim=1)
        torch.testing.assert_close(multi.eval()(x), want)
    lite, _ = build_backbone("efficientnet_lite0", "imagenet", 16)
    lite_m, _ = build_backbone("efficientnet_lite0", "imagenet", 16, multi_level=True)
    with torch.no_grad():
        out = lite_m.eval()(x)
        torch.testing.assert_close(out[:, 112:], lite.eval()(x))
        h = torch.nn.functional.relu6(lite.net._bn0(lite.net._conv_stem(x)))
        for b in lite.net._blocks[:11]:
            h = b(h)
        torch.testing.assert_close(out[:, :112], h)


def test_lite0_features_without_head_conv_are_the_last_block_of_the_imagenet_network() -> None:
    from wsltool.models.backbones import efficientnet_lite0

    x = torch.rand(1, 3, 64, 64)
    full = efficientnet_lite0("imagenet", output_stride=16).eval()
    blocks, _ = build_backbone("efficientnet_lite0", "imagenet", 16)
    head, _ = build_backbone("efficientnet_lite0", "imagenet", 16, head_conv=True)
    assert not any(k.startswith(("net._conv_head", "net._bn1")) for k in blocks.state_dict())
    assert any(k.startswith("net._conv_head") for k in head.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(blocks.eval()(x), full.block_features(x))
        torch.testing.assert_close(head.eval()(x), full.features(x))


def test_efficientnet_lite0_imagenet_predictions_on_real_photos() -> None:
    from skimage import data

    from wsltool.models.backbones import efficientnet_lite0

    torch.set_num_threads(2)
    want = {"chelsea": range(281, 286), "coffee": (967, 968)}  # tabby..Egyptian cat; espresso, cup
    for stride in (32, 16):
        net = efficientnet_lite0("imagenet", output_stride=stride).eval()
        for name, classes in want.items():
            img = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1)[None].float() / 255
            img = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
            with torch.no_grad():
                p = net((img - 0.5) / 0.5).softmax(1)[0]
            assert int(p.argmax()) in classes, (name, stride, int(p.argmax()))
            assert float(p[list(classes)].sum()) > 0.5


def test_neg_updates_localizer_keeps_classifier_out_of_the_max_entropy_term() -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    for mode, cls_grad in (("all", True), ("localizer", False)):
        model = MinMaxNet(ModelConfig(**TINY, neg_updates=mode, head_dropout=0.0)).train()
        out = model.training_losses(model.normalize(x), torch.tensor([0, 1]))
        out["_neg"].backward()
        g = model.cls_head.conv.weight.grad
        assert (g is not None and float(g.abs().sum()) > 0) == cls_grad
        assert float(model.loc_head.conv.weight.grad.abs().sum()) > 0  # the mask still learns from it


def test_replicate_padding_removes_border_features() -> None:
    x = torch.full((1, 3, 64, 64), 0.3)  # a constant image: any spatial structure comes from the padding
    for name, weights in (("tiny", "none"), ("efficientnet_lite0", "imagenet"), ("resnet18", "none")):
        net, _ = build_backbone(name, weights, 16)
        net.eval()
        with torch.no_grad():
            zeros = net(x)
        from wsltool.models.backbones import set_padding_mode

        set_padding_mode(net, "replicate")
        with torch.no_grad():
            rep = net(x)
        assert float(zeros.std(dim=(2, 3)).max()) > 1e-4, name
        assert float(rep.std(dim=(2, 3)).max()) < 1e-5, name


def test_localize_under_autocast_returns_float32() -> None:
    model = build_model(ModelConfig(**TINY)).eval()
    x = torch.randint(0, 255, (2, 3, 40, 48), dtype=torch.uint8)
    with torch.inference_mode():
        out = model.localize(x, size=(10, 12), autocast=True)
    assert {k: v.dtype for k, v in out.items()} == dict.fromkeys(out, torch.float32)
    assert out["mplus"].shape == (2, 10, 12)
    assert float(out["mplus"].min()) >= 0 and float(out["mplus"].max()) <= 1


@pytest.mark.parametrize(
    ("backbone", "pretrained"), [("efficientnet_lite0", "imagenet"), ("resnet18", "none"), ("tiny", "none")]
)
def test_batchnorm_folding_keeps_outputs(backbone: str, pretrained: str) -> None:
    from wsltool.models.fuse import fuse_batchnorm

    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, pretrained=pretrained, output_stride=16, method="minmax")
    model = build_model(cfg)
    # non-trivial running statistics, as after training (the ImageNet weights come with their own)
    for m in model.modules():
        if pretrained == "none" and isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x = torch.randint(0, 255, (2, 3, 96, 128), dtype=torch.uint8)
    with torch.inference_mode():
        before = model.localize(x, size=(24, 32))
    with pytest.raises(ValueError, match="eval mode"):
        fuse_batchnorm(build_model(cfg).train())
    assert fuse_batchnorm(model) == n_bn > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.inference_mode():
        after = model.localize(x, size=(24, 32))
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=1e-3, atol=1e-4)


def test_minmax_start_trains_the_localizer_alone_before_it() -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    y = torch.tensor([0, 1])
    model = MinMaxNet(ModelConfig(**{**TINY, "minmax_start": 2}, head_dropout=0.0)).train()
    xn = model.normalize(x)
    early = model.training_losses(xn, y, epoch=1)
    assert set(k for k in early if not k.startswith("_")) == {"total", "loc"}
    scores, _ = model.heads_out(xn)
    torch.testing.assert_close(early["total"], torch.nn.functional.cross_entropy(scores, y))
    early["total"].backward()
    assert model.cls_head.conv.weight.grad is None  # the classifier is not used before minmax_start
    assert float(model.loc_head.conv.weight.grad.abs().sum()) > 0
    late = model.training_losses(xn, y, epoch=2)
    assert {"pos", "neg", "size"} <= set(late)


def test_neg_weight_scales_the_max_entropy_term_only() -> None:
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1])
    totals = []
    for wneg in (1.0, 0.25, 0.0):
        torch.manual_seed(0)
        model = MinMaxNet(ModelConfig(**TINY, head_dropout=0.0, neg_weight=wneg)).train()
        out = model.training_losses(model.normalize(x), y, barrier_t=5.0)
        torch.testing.assert_close(out["total"], out["loc"] + out["pos"] + wneg * out["neg"] + out["size"])
        totals.append(out)
    torch.testing.assert_close(totals[0]["neg"], totals[2]["neg"])  # the term is still measured and logged
    with pytest.raises(ConfigError, match="neg_weight"):
        ModelConfig(neg_weight=-1.0)


def test_own_classifier_backbone_starts_from_the_warmed_up_localizer_and_stays_apart() -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    y = torch.tensor([0, 1])
    cfg = ModelConfig(
        **{**TINY, "minmax_start": 1}, head_dropout=0.0, detach_mask=True, neg_updates="all", classifier_backbone="own"
    )
    model = MinMaxNet(cfg).train()
    xn = model.normalize(x)
    # warm-up: the localizer's backbone moves, the classifier's copy is untouched and not yet synced
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.05)
    model.training_losses(xn, y, epoch=0)["total"].backward()
    assert int(model.cls_synced) == 0
    assert all(p.grad is None for p in model.cls_backbone.parameters())
    loc_sd, cls_sd = model.backbone.state_dict(), model.cls_backbone.state_dict()
    assert not all(torch.equal(loc_sd[k], cls_sd[k]) for k in loc_sd)
    # first min-max step: the classifier's backbone is set to the localizer's, exactly
    model.zero_grad()
    out = model.training_losses(xn, y, epoch=1)
    assert int(model.cls_synced) == 1
    loc_sd, cls_sd = model.backbone.state_dict(), model.cls_backbone.state_dict()
    assert all(torch.equal(loc_sd[k], cls_sd[k]) for k in loc_sd)
    # mask detached + own backbone: X+ / X- reach neither the localizer's head nor its backbone
    (out["_pos"] + out["_neg"]).backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.backbone.parameters())
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.loc_head.parameters())
    assert sum(float(p.grad.abs().sum()) > 0 for p in model.cls_backbone.parameters() if p.grad is not None) > 0
    # a later step does not copy again (the classifier's backbone keeps what it learned)
    with torch.no_grad():
        for p in model.cls_backbone.parameters():
            p.add_(0.05)
    model.training_losses(xn, y, epoch=2)
    pairs = zip(model.backbone.parameters(), model.cls_backbone.parameters(), strict=True)
    assert not all(torch.equal(a, b) for a, b in pairs)
    # nor does a model that loads a synced state (a resumed run)
    resumed = MinMaxNet(cfg)
    resumed.load_state_dict(model.state_dict())
    resumed.train().training_losses(xn, y, epoch=2)
    pairs = zip(resumed.backbone.parameters(), resumed.cls_backbone.parameters(), strict=True)
    assert not all(torch.equal(a, b) for a, b in pairs)
    # shared (method.md, the default): the classifier's losses do train the localizer's backbone
    shared = MinMaxNet(
        ModelConfig(**TINY, head_dropout=0.0, detach_mask=True, neg_updates="all")
    ).train()  # the default
    o = shared.training_losses(shared.normalize(x), y)
    o["_pos"].backward()
    assert shared.cls_backbone is None
    assert sum(float(p.grad.abs().sum()) > 0 for p in shared.backbone.parameters() if p.grad is not None) > 0
    with pytest.raises(ConfigError, match="classifier_backbone"):
        ModelConfig(classifier_backbone="separate")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["resnet34", "resnet50"])
def test_resnet_weights_load_from_a_state_dict_file(name: str, tmp_path: pytest.TempPathFactory) -> None:
    import torchvision

    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)(weights=None)
    p = tmp_path / f"{name}.pth"  # type: ignore[operator]
    torch.save(tv.state_dict(), p)
    for stride in (16, 32):
        net, info = build_backbone(name, str(p), stride)
        want = [v for k, v in tv.state_dict().items() if not k.startswith("fc.")]
        got = list(net.state_dict().values())
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        with torch.no_grad():
            f = net.eval()(torch.zeros(1, 3, 64, 96))
        assert f.shape == (1, info.channels, 64 // stride, 96 // stride)
        assert info.channels == (512 if name == "resnet34" else 2048)


def test_resnet101_strides() -> None:
    for stride in (16, 32):
        net, info = build_backbone("resnet101", "none", stride)
        with torch.no_grad():
            f = net.eval()(torch.zeros(1, 3, 64, 64))
        assert f.shape == (1, 2048, 64 // stride, 64 // stride) and info.channels == 2048


def test_mplus_is_the_softmax_weighted_class_maps_normalised_per_image() -> None:
    from wsltool.models.minmax import weighted_map

    scores = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])  # softmax (1/4, 3/4) and (3/4, 1/4)
    maps = torch.stack([torch.ones(2, 2), torch.tensor([[3.0, 5.0], [7.0, 9.0]])])[None].repeat(2, 1, 1, 1)
    m = weighted_map(scores, maps)
    torch.testing.assert_close(m[0, 0], 0.25 + 0.75 * maps[0, 1])
    torch.testing.assert_close(m[1, 0], 0.75 + 0.25 * maps[0, 1])
    model = MinMaxNet(ModelConfig(**TINY))
    norm = model.mplus(scores, maps)
    torch.testing.assert_close(norm[0, 0], torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))  # both images span [0, 1]
    torch.testing.assert_close(norm[1, 0], norm[0, 0])


def test_classifier_sees_the_masked_image_at_cls_scale() -> None:
    sizes: list[tuple[int, int]] = []
    for scale in (0.5, 1.0):
        model = MinMaxNet(ModelConfig(**TINY, cls_scale=scale, head_dropout=0.0)).train()
        hook = model.classifier_features.register_forward_pre_hook(lambda _m, a: sizes.append(tuple(a[0].shape[-2:])))
        x = model.normalize(torch.randint(0, 255, (2, 3, 48, 64), dtype=torch.uint8))
        model.training_losses(x, torch.tensor([0, 1]))
        hook.remove()
    # each step runs the shared backbone on X (the localizer), then the classifier on X+ and on X-
    assert sizes == [(48, 64), (24, 32), (24, 32), (48, 64), (48, 64), (48, 64)]


def test_recursive_erasing_starts_at_its_epoch() -> None:
    torch.manual_seed(0)
    model = MinMaxNet(ModelConfig(**TINY, head_dropout=0.0, erase_passes=3, erase_start=2, erase_sigma=10.0)).train()
    x = model.normalize(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8))
    with torch.no_grad():
        y = model.heads_out(x)[0].argmax(1)  # every sample right at the first pass: erasing goes on
    assert float(model.training_losses(x, y, epoch=1)["passes"]) == 1
    assert float(model.training_losses(x, y, epoch=2)["passes"]) >= 2


def test_detached_mask_needs_the_max_entropy_term_to_train_something() -> None:
    with pytest.raises(ConfigError, match="neg_updates='all'"):
        ModelConfig(detach_mask=True)  # neg_updates="localizer" (default): the term would train nothing
    ModelConfig(detach_mask=True, neg_updates="all")
    ModelConfig(detach_mask=True, neg_weight=0.0)
    ModelConfig(method="wildcat", detach_mask=True)  # no max-entropy term at all
    model = MinMaxNet(ModelConfig(**TINY, detach_mask=True, neg_updates="all", head_dropout=0.0)).train()
    out = model.training_losses(
        model.normalize(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)), torch.tensor([0, 1])
    )
    assert out["_neg"].requires_grad  # with "all" it trains the classifier


def test_wildcat_dropout_acts_on_the_sorted_top_activations() -> None:
    maps = torch.arange(2 * 16, dtype=torch.float32).view(1, 2, 4, 4)[:, :, torch.randperm(4)]  # unsorted
    p, kmax = 0.5, 0.5  # 8 of 16 locations
    torch.manual_seed(3)
    got = wildcat_pool(maps, kmax, 0.0, 0.0, p, training=True)
    torch.manual_seed(3)
    keep = torch.nn.functional.dropout(torch.ones(1, 2, 8), p=p, training=True)  # the same draw
    top = maps.flatten(2).sort(dim=-1, descending=True).values[..., :8]
    torch.testing.assert_close(got, (top * keep).mean(-1))
    assert not torch.equal(got, top.mean(-1))  # dropout really changed the scores
    torch.testing.assert_close(wildcat_pool(maps, kmax, 0.0, 0.0, p, training=False), top.mean(-1))
