"""Issue 12, point 15: the depth probe reproduces the official NYU linear recipe (probes/depth.py module doc).

Official sources: 0raiser0/PH-Reg DINOv2_full/evaluation/depth/evaluation/configs/vitb_nyu_linear_config.py and
.../decode_heads/linear_head.py, the DINOv2 depth toolbox (decode_head.py, sigloss.py, gradientloss.py,
encoder_decoder.py, eval_utils/misc.py CenterPadding) and mmcv 1.x (lr_updater.py, momentum_updater.py).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence

import pytest
import torch
import torch.nn.functional as F
from kedro.config import OmegaConfigLoader
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ph_reg.config import from_mapping
from ph_reg.evaluation.benchmarks.base import DenseDataset, DenseSample
from ph_reg.io.shards import ShardReader, write_shards
from ph_reg.models import DenseOutput
from ph_reg.evaluation.probes import (
    BestProbeTracker,
    DepthProbeConfig,
    LinearDepthProbe,
    cached_image,
    evaluate_depth_probe,
    feature_records,
    gradient_loss,
    predict_depth,
    sig_loss,
    toolbox_gradient_loss,
    train_depth_probe,
)
import ph_reg.evaluation.probes.depth as depth_module
from ph_reg.evaluation.probes.depth import bin_weights, clip_gradients, depth_probe_scores
from ph_reg.evaluation.probes.depth_recipe import depth_loss, one_cycle_beta1, warmup_cosine_lambda

from conftest import PROJECT_ROOT

EMBED_DIM = 3


class FakeSource:
    """A BatchSource (the R-online contract): random features times ``scale`` and a depth in (0.5, 9.5)."""

    embed_dim = EMBED_DIM
    attrs: dict = {}

    def __init__(self, grid=(4, 4), size=(8, 8), scale=1.0):
        self.grid, self.size, self.scale = grid, size, scale

    def batches(self, batch_size: int, gen: torch.Generator, keys: Sequence[str]) -> Iterator[dict[str, Tensor]]:
        while True:
            patch = torch.rand(batch_size, *self.grid, EMBED_DIM, generator=gen) * self.scale
            yield {"patch": patch, "cls": patch.mean((1, 2)),
                   "depth": 0.5 + 9 * torch.rand(batch_size, *self.size, generator=gen)}


def fast_config(**overrides) -> DepthProbeConfig:
    return DepthProbeConfig(**{"iterations": 10, "batch_size": 4, "warmup_iters": 4, "eval_interval": None,
                               "upsample": 2, "device": "cpu", **overrides})


def load_depth_probe(env: str) -> dict:
    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), base_env="base", default_run_env=env,
                               merge_strategy={"parameters": "soft", "globals": "soft"})
    return copy.deepcopy(loader["parameters"]["evaluation"]["probes"]["tasks"]["depth"]["nyuv2"])


# --- configuration --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env", ["paper", "paper_dinov2"])
def test_paper_configs_use_the_official_depth_recipe(env):
    spec = load_depth_probe(env)
    config = from_mapping(DepthProbeConfig, spec["probe"], "probe")
    official = dict(iterations=30000, batch_size=16, loss_group_size=2, lr=5e-3, weight_decay=0.01,
                    betas=(0.9, 0.999), beta1_schedule="one_cycle", warmup_iters=12800, warmup_ratio=1e-3,
                    min_lr_ratio=1e-8, grad_clip_norm=35.0, batch_norm=False, bin_norm="linear", n_bins=256,
                    upsample=4, sigloss_warmup_iters=100, gradient_loss="toolbox", gradient_loss_weight=0.5,
                    eval_interval=500, min_depth=1e-3, max_depth=10.0, variance_focus=0.85, use_cls=True)
    assert {name: getattr(config, name) for name in official} == official
    assert spec["stride"] is None and spec["flip_tta"] is True and spec["eigen_crop"] is True  # whole image
    assert DepthProbeConfig() == config  # the dataclass defaults are the paper recipe


def test_config_validation_names_the_parameter():
    for bad, name in ((dict(bin_norm="sigmoid"), "bin_norm"), (dict(gradient_loss="x"), "gradient_loss"),
                      (dict(grad_clip_norm=0), "grad_clip_norm"), (dict(loss_group_size=0), "loss_group_size"),
                      (dict(warmup_ratio=0), "warmup_ratio"), (dict(beta1_schedule="x"), "beta1_schedule"),
                      (dict(eval_interval=-1), "eval_interval"), (dict(unknown=1), "unknown")):
        with pytest.raises(ValueError, match=name):
            from_mapping(DepthProbeConfig, bad, "probe")


# --- head -----------------------------------------------------------------------------------------------------
def test_paper_head_has_no_batchnorm():
    probe = train_depth_probe(FakeSource(), fast_config(iterations=1), seed=0)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in probe.modules())
    assert [name for name, _ in probe.named_parameters()] == ["conv.weight", "conv.bias"]
    with_bn = train_depth_probe(FakeSource(), fast_config(iterations=1, batch_norm=True), seed=0)
    assert any(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules())


def test_linear_bins_match_the_toolbox_formula():
    gen = torch.Generator().manual_seed(0)
    probe = LinearDepthProbe(EMBED_DIM, n_bins=8, upsample=1)
    nn.init.normal_(probe.conv.weight, std=3.0, generator=gen)
    patch, cls = torch.randn(2, 3, 5, EMBED_DIM, generator=gen), torch.randn(2, EMBED_DIM, generator=gen)
    x = torch.cat([patch, cls[:, None, None].expand(-1, 3, 5, -1)], dim=-1)          # (B, h, w, 2C)
    logits = x @ probe.conv.weight[:, :, 0, 0].T + probe.conv.bias                   # (B, h, w, K)
    weights = (logits.clamp_min(0) + 0.1) / (logits.clamp_min(0) + 0.1).sum(-1, keepdim=True)
    expected = (weights * torch.linspace(1e-3, 10, 8)).sum(-1)
    assert (logits < 0).any() and (logits > 0).any()  # the ReLU is exercised
    assert torch.allclose(probe(patch, cls), expected, atol=1e-5)
    assert not torch.allclose(probe(patch, cls), (logits.softmax(-1) * torch.linspace(1e-3, 10, 8)).sum(-1))
    assert torch.allclose(bin_weights(logits.permute(0, 3, 1, 2), "linear"), weights.permute(0, 3, 1, 2))


# --- schedule, momentum, clipping -----------------------------------------------------------------------------
def mmcv_lr(t: int, lr0=5e-3, total=30000, warmup=12800, ratio=1e-3, min_ratio=1e-8) -> float:
    """mmcv CosineAnnealingLrUpdaterHook(warmup="linear", by_epoch=False) at runner.iter = t, written out."""
    target = lr0 * min_ratio
    regular = target + 0.5 * (lr0 - target) * (math.cos(math.pi * t / total) + 1)
    if t < warmup:
        k = (1 - t / warmup) * (1 - ratio)
        return regular * (1 - k)
    return regular


def test_warmup_cosine_schedule_values():
    factor = warmup_cosine_lambda(30000, 12800, 1e-3, 1e-8)
    for t in (0, 1, 6400, 12799, 12800, 20000, 29999):
        assert 5e-3 * factor(t) == pytest.approx(mmcv_lr(t), rel=1e-12), t
    assert 5e-3 * factor(0) == pytest.approx(5e-6)                                       # lr0 * warmup_ratio
    assert 5e-3 * factor(12800) == pytest.approx(5e-3 * 0.5 * (1 + math.cos(math.pi * 12800 / 30000)))
    assert factor(12800) < 0.62  # the cosine runs from iteration 0, not from the end of the warm-up


def test_training_uses_the_official_lr_and_beta1_at_every_step():
    seen = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"])))
    try:
        train_depth_probe(FakeSource(), fast_config(iterations=10, warmup_iters=4, lr=0.1), seed=0)
    finally:
        handle.remove()
    assert len(seen) == 10
    for t, (lr, (beta1, beta2)) in enumerate(seen):
        assert lr == pytest.approx(mmcv_lr(t, lr0=0.1, total=10, warmup=4)), t
        end_first = 0.3 * 10 - 1                      # mmcv OneCycleMomentumUpdaterHook phases (pct_start 0.3)
        if t <= end_first:
            expected = 0.85 + 0.5 * (0.95 - 0.85) * (math.cos(math.pi * t / end_first) + 1)
        else:
            expected = 0.95 + 0.5 * (0.85 - 0.95) * (math.cos(math.pi * (t - end_first) / (9 - end_first)) + 1)
        assert beta1 == pytest.approx(expected) and beta2 == 0.999, t
    assert seen[0][1][0] == pytest.approx(0.95) and seen[2][1][0] == pytest.approx(0.85)
    assert seen[-1][1][0] == pytest.approx(0.95)
    assert one_cycle_beta1(8999, 30000) == pytest.approx(0.85) and one_cycle_beta1(0, 30000) == pytest.approx(0.95)


def test_gradients_are_clipped_at_35(monkeypatch):
    # the clipping itself: a total L2 norm above 35 is scaled down to exactly 35, one below is left alone
    probe = LinearDepthProbe(EMBED_DIM, n_bins=4)
    probe.conv.weight.grad = torch.full_like(probe.conv.weight, 100.0)
    probe.conv.bias.grad = torch.full_like(probe.conv.bias, -50.0)
    before = torch.cat([probe.conv.weight.grad.flatten(), probe.conv.bias.grad.flatten()]).norm()
    assert clip_gradients(probe.parameters(), 35.0) == pytest.approx(before.item())
    after = torch.cat([probe.conv.weight.grad.flatten(), probe.conv.bias.grad.flatten()])
    assert after.norm().item() == pytest.approx(35.0) and torch.allclose(after / after[0], torch.cat(
        [torch.ones(probe.conv.weight.numel()), torch.full((4,), -0.5)]))
    probe.conv.weight.grad, probe.conv.bias.grad = torch.full_like(probe.conv.weight, 1e-3), None
    clip_gradients(probe.parameters(), 35.0)
    assert torch.equal(probe.conv.weight.grad, torch.full_like(probe.conv.weight, 1e-3))
    # the training loop clips at 35 after every backward, before every optimizer step
    events = []
    real = depth_module.clip_gradients

    def spy(parameters, max_norm):
        events.append(("clip", max_norm))
        return real(parameters, max_norm)

    monkeypatch.setattr(depth_module, "clip_gradients", spy)
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: events.append(("step", None)))
    try:
        train_depth_probe(FakeSource(), fast_config(iterations=3), seed=0)
        events.append(("unclipped run", None))
        train_depth_probe(FakeSource(), fast_config(iterations=2, grad_clip_norm=None), seed=0)
    finally:
        handle.remove()
    assert events == [("clip", 35.0), ("step", None)] * 3 + [("unclipped run", None)] + [("step", None)] * 2


# --- losses ---------------------------------------------------------------------------------------------------
def _pred_target(batch, gen):
    pred = 0.5 + 9 * torch.rand(batch, 1, 6, 7, generator=gen)
    target = 0.5 + 9 * torch.rand(batch, 1, 6, 7, generator=gen)
    target[:, :, 0, :3] = 0.0  # invalid pixels
    return pred, target


def test_toolbox_gradient_loss_is_exactly_zero_on_two_images():
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 2):
        pred, target = _pred_target(batch, gen)
        pred.requires_grad_(True)
        loss = toolbox_gradient_loss(pred, target)
        assert loss.item() == 0.0
        loss.backward()                                               # differentiable, zero gradient
        assert torch.equal(pred.grad, torch.zeros_like(pred))
        assert gradient_loss(pred[:, 0], target[:, 0], target[:, 0] > 0).item() > 0  # the intended loss is not 0
    # with 3 images the toolbox indexing compares images 0 and 2 (stride 1 only: [::2] leaves 2 images)
    pred, target = _pred_target(3, gen)
    mask = (target > 0).float()
    diff = ((pred + 1e-3).log() - (target + 1e-3).log()) * mask
    expected = ((diff[0] - diff[2]).abs() * mask[0] * mask[2]).sum() / mask.sum()
    assert toolbox_gradient_loss(pred, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert expected > 0


def test_sigloss_and_group_averaging_match_the_toolbox():
    gen = torch.Generator().manual_seed(1)
    pred, target = _pred_target(4, gen)
    pred, target = pred[:, 0], target[:, 0]

    def toolbox_sigloss(p, t, warm=False):
        valid = (t > 0) & (t <= 10)
        g = torch.log(p[valid] + 1e-3) - torch.log(t[valid] + 1e-3)
        return torch.sqrt(0.15 * g.mean() ** 2) if warm else torch.sqrt(torch.var(g) + 0.15 * g.mean() ** 2)

    assert sig_loss(pred, target, target > 0).item() == pytest.approx(toolbox_sigloss(pred, target).item(), rel=1e-6)
    assert sig_loss(pred, target, target > 0, warmup=True).item() == pytest.approx(
        toolbox_sigloss(pred, target, warm=True).item(), rel=1e-6)
    config = DepthProbeConfig()                                  # groups of 2, toolbox gradient loss (= 0)
    per_gpu = (toolbox_sigloss(pred[:2], target[:2]) + toolbox_sigloss(pred[2:], target[2:])) / 2
    assert depth_loss(pred, target, config, iteration=500).item() == pytest.approx(per_gpu.item(), rel=1e-6)
    warm = (toolbox_sigloss(pred[:2], target[:2], True) + toolbox_sigloss(pred[2:], target[2:], True)) / 2
    assert depth_loss(pred, target, config, iteration=99).item() == pytest.approx(warm.item(), rel=1e-6)
    intended = DepthProbeConfig(gradient_loss="per_image", loss_group_size=None)
    assert depth_loss(pred, target, intended, 500).item() > toolbox_sigloss(pred, target).item()


# --- whole-image inference ------------------------------------------------------------------------------------
class MeanColourModel(nn.Module):
    """Stand-in backbone: per-patch mean of the normalised image and a column ramp (not flip-equivariant)."""

    patch_size = 4
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)
    embed_dim = EMBED_DIM

    def __init__(self):
        super().__init__()
        self.inputs: list[Tensor] = []

    def forward(self, images):
        self.inputs.append(images.clone())
        colour = F.avg_pool2d(images, self.patch_size).permute(0, 2, 3, 1)
        ramp = torch.linspace(0, 1, colour.shape[2]).view(1, 1, -1, 1).expand(*colour.shape[:3], 1)
        patch = torch.cat([colour[..., :2], ramp], -1)
        return DenseOutput(patch=patch, cls=patch.mean((1, 2)))


class ListDataset(DenseDataset):
    name = "fake_nyu"

    def __init__(self, samples):
        self.samples = samples
        self.class_names = []

    def __len__(self):
        return len(self.samples)

    def _load(self, index):
        return self.samples[index]


def _depth_samples(count, height, width, seed):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(count):
        image = (torch.rand(3, height, width, generator=gen) * 255).round().to(torch.uint8)
        depth = 0.5 + 9 * torch.rand(height, width, generator=gen)
        depth[0, 0] = 10.0   # == max_depth: left out by the toolbox's eval mask (gt < max_depth)
        depth[1, 1] = 0.0    # invalid
        samples.append(DenseSample(image, None, depth, f"n{i}"))
    return ListDataset(samples)


def test_whole_image_inference_with_centre_padding(tmp_path):
    model = MeanColourModel()
    dataset = _depth_samples(2, 10, 13, seed=0)                 # 10x13 is not a multiple of the patch size 4
    write_shards(tmp_path / "val", feature_records(model, dataset, 8, None, "val", flip=True))
    store = ShardReader(tmp_path / "val")
    image = cached_image(store, 0)
    # CenterPadding(4): 10 -> 12 (1 top, 1 bottom), 13 -> 16 (1 left, 2 right), zeros after normalisation
    normalised = dataset[0].image.float()[None] / 255.0
    padded = F.pad(normalised, (1, 2, 1, 1))
    assert torch.allclose(model.inputs[0][0], padded[0])
    assert torch.allclose(model.inputs[0][1], F.pad(normalised.flip(-1), (1, 2, 1, 1))[0])  # flipped, then padded
    assert tuple(image.patch.shape) == (1, 3, 4, EMBED_DIM) and image.boxes.tolist() == [[0, 0, 10, 13]]
    assert image.resized == (10, 13)
    assert torch.allclose(image.patch[0, ..., :2], F.avg_pool2d(padded, 4)[0, :2].permute(1, 2, 0), atol=1e-3)
    probe = LinearDepthProbe(EMBED_DIM, n_bins=16, upsample=4)
    nn.init.normal_(probe.conv.weight, std=5.0)
    with torch.no_grad():
        # the padded grid's prediction (3x4 patches -> 12x16 after x4) resized to 10x13 as a whole, no un-padding
        logits = F.interpolate(probe.logits(image.patch, image.cls), scale_factor=4, mode="bilinear")
        depth = (bin_weights(logits) * probe.bin_centers[:, None, None]).sum(1, keepdim=True)
        plain = F.interpolate(depth, size=(10, 13), mode="bilinear", align_corners=False)[0, 0]
        flipped = probe(image.patch_flip, image.cls_flip, size=(10, 13))[0].flip(-1)
    assert torch.allclose(predict_depth(probe, image), plain, atol=1e-5)
    assert torch.allclose(predict_depth(probe, image, flip_tta=True), 0.5 * (plain + flipped), atol=1e-5)
    assert not torch.allclose(plain, flipped, atol=1e-3)
    # metrics over 0.001 < gt < 10 (strict): the pixel at exactly 10 m does not count
    result = evaluate_depth_probe(probe, store, per_image=True)
    pred = predict_depth(probe, image, flip_tta=True)
    gt = image.depth
    valid = (gt > 1e-3) & (gt < 10)
    assert valid.sum() == gt.numel() - 2
    first = ((pred[valid].clamp(1e-3, 10) - gt[valid]).abs() / gt[valid]).mean()
    second_image = cached_image(store, 1)
    pred2, gt2 = predict_depth(probe, second_image, flip_tta=True), second_image.depth
    valid2 = (gt2 > 1e-3) & (gt2 < 10)
    second = ((pred2[valid2].clamp(1e-3, 10) - gt2[valid2]).abs() / gt2[valid2]).mean()
    assert result["AbsRel"] == pytest.approx(float((first + second) / 2), rel=1e-5)


# --- best-by-AbsRel selection ---------------------------------------------------------------------------------
def test_best_by_absrel_keeps_the_best_evaluated_state():
    scripted = iter([0.5, 0.3, 0.4, 0.3])  # iterations 2, 4, 6, 8: the best is at 4 (a later tie does not replace)
    snapshots = {}

    def evaluate(probe):
        value = next(scripted)
        snapshots[len(snapshots) + 1] = {k: v.clone() for k, v in probe.state_dict().items()}
        return {"AbsRel": value, "RMSE": 10 * value}

    tracker = BestProbeTracker(evaluate)
    final = train_depth_probe(FakeSource(), fast_config(iterations=8, eval_interval=2, lr=0.5), seed=0,
                              on_eval=tracker)
    assert [it for it, _ in tracker.log] == [2, 4, 6, 8]
    assert tracker.best_iteration == 4 and tracker.best_scores == {"AbsRel": 0.3, "RMSE": 3.0}
    best = tracker.best_probe(final)
    for name, value in best.state_dict().items():
        assert torch.equal(value, snapshots[2][name]), name
    assert not torch.equal(best.conv.weight, final.conv.weight)      # the final probe is a different state
    assert torch.equal(final.conv.weight, snapshots[4]["conv.weight"])  # evaluated at iteration 8 = final


def test_depth_probe_scores_report_final_and_best_on_test(tmp_path):
    model = MeanColourModel()
    write_shards(tmp_path / "train", feature_records(model, _depth_samples(8, 16, 16, 1), 16, None, "train"))
    write_shards(tmp_path / "val", feature_records(model, _depth_samples(2, 10, 13, 2), 8, None, "val", flip=True))
    train, val = ShardReader(tmp_path / "train"), ShardReader(tmp_path / "val")
    config = dict(iterations=12, batch_size=4, warmup_iters=3, eval_interval=4, lr=0.5, device="cpu")
    scores = depth_probe_scores(train, val, config, seed=0, flip_tta=True)
    final = evaluate_depth_probe(train_depth_probe(train, config, seed=0), val, flip_tta=True)
    assert {k: scores[k] for k in final} == pytest.approx(final)
    evaluated = []
    tracker = BestProbeTracker(lambda p: evaluated.append(evaluate_depth_probe(p, val, flip_tta=True))
                               or evaluated[-1])
    train_depth_probe(train, config, seed=0, on_eval=tracker)
    best = min(range(3), key=lambda i: evaluated[i]["AbsRel"])
    assert scores["AbsRel_best_on_test"] == pytest.approx(evaluated[best]["AbsRel"])
    assert scores["RMSE_best_on_test"] == pytest.approx(evaluated[best]["RMSE"])
    assert scores["iteration_best_on_test"] == 4 * (best + 1)
    assert scores["AbsRel_best_on_test"] <= scores["AbsRel"]  # the final probe (iteration 12) is a candidate
    without = depth_probe_scores(train, val, {**config, "eval_interval": None}, seed=0, flip_tta=True)
    assert set(without) == set(final)
