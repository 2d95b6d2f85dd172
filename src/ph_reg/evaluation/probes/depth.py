"""Linear-probe monocular depth on frozen tokens (docs/method.md section 6, NYUv2 protocol of the DINOv2 depth toolbox).

Every default below is the official PH-Reg setting, from ``0raiser0/PH-Reg``
``DINOv2_full/evaluation/depth/evaluation/configs/vitb_nyu_linear_config.py`` ("the NYU config"), its head
``.../depth/models/decode_heads/linear_head.py`` and the toolbox it runs on (``facebookresearch/dinov2``
``dinov2/eval/depth/``, identical to ``Jiawei-Yang/Denoising-ViT`` ``evaluation/depth/``: ``decode_head.py``,
``losses/sigloss.py``, ``losses/gradientloss.py``, ``depther/encoder_decoder.py``) and mmcv 1.x
(``mmcv/runner/hooks/lr_updater.py``, ``momentum_updater.py``, ``optimizer.py``, ``evaluation.py``).

Head (:class:`LinearDepthProbe`): patch tokens concatenated with the CLS token broadcast to every patch (2C
channels; ``channels=1536`` for ViT-B) -> ``Conv2d(2C, 256, 1)`` = one logit per depth bin, PyTorch's default
initialisation (the toolbox head defines no ``init_weights``). **No BatchNorm**: it is commented out in the
official ``linear_head.py`` (``# self.bn = nn.SyncBatchNorm(...)``, ``# feats = self.bn(x)``); ours is kept as the
option ``batch_norm=True``. The 256 bin centres are ``linspace(0.001, 10, 256)`` m (``bins_strategy="UD"``). The
logits are upsampled bilinearly by ``upsample`` (4; the toolbox upsamples the features before the 1x1 conv, which
is the same thing for a linear head since bilinear weights sum to 1), turned into bin weights with
``norm_strategy="linear"`` (AdaBins): ``w = (relu(l) + 0.1) / sum_k(relu(l_k) + 0.1)`` (``bin_norm="softmax"``
is the alternative), and the depth is ``sum_k w_k * centre_k``, upsampled bilinearly to the target size.

Loss (``decode_head.losses``: the prediction is resized to the ground truth, then SigLoss + 0.5 GradientLoss):

- SigLoss, ``g = log(pred + 0.001) - log(gt + 0.001)`` over the pixels ``0 < gt <= max_depth``:
  ``sqrt(var(g) + 0.15 mean(g)^2)`` with the *unbiased* ``torch.var`` (``0.15 = 1 - variance_focus``); during the
  first 100 iterations (``warm_up=True``) ``sqrt(0.15 mean(g)^2)``.
- GradientLoss (MegaDepth) with weight 0.5, **as the toolbox ran it** (``gradient_loss="toolbox"``): the loss is
  written for one (H, W) map, but ``decode_head.losses`` passes it the (B, 1, H, W) batch, so its ``[::2i, ::2i]``
  sub-sampling and its ``[0:-2] - [2:]`` / ``[:, 0:-2] - [:, 2:]`` differences act on the *batch* and *channel*
  axes. The channel axis has length 1, so the "horizontal" term is empty; with the official 2 images per GPU the
  batch axis has length 2, so the "vertical" term is empty too: **the gradient term is exactly 0** in the
  published runs. :func:`toolbox_gradient_loss` reproduces that indexing (with 3 or more images per group it
  differences whole images two apart, as the toolbox would); :func:`gradient_loss` (``gradient_loss="per_image"``)
  is the loss as intended, on each (H, W) map.
- Groups (``loss_group_size=2``): the official run used 8 GPUs x 2 images; DDP averages the per-GPU gradients,
  i.e. the optimised loss is the mean over GPUs of the loss of each GPU's 2 images (SigLoss's variance and mean are
  per GPU). We compute both losses per group of ``loss_group_size`` consecutive images and average the groups.
  ``loss_group_size=None``: one group = the whole batch.

Optimiser and schedule: AdamW (lr 5e-3, betas (0.9, 0.999), weight decay 0.01 on every head parameter: the
``paramwise_cfg`` keys ``pos_embed``/``cls_token``/``norm``/``backbone`` match no head parameter). mmcv's
``CosineAnnealing`` with ``warmup="linear"``, by iteration, sets at iteration ``t`` (0-based, before the step)
``lr = lr0 * c(t) * w(t)``: ``c(t) = r + (1 - r) (1 + cos(pi t / T)) / 2`` (``r = min_lr_ratio = 1e-8``, ``T`` =
all iterations, *including* the warm-up) and, for ``t < 12800``, ``w(t) = 1 - (1 - t / 12800) (1 - 1e-3)`` (else 1).
``momentum_config=dict(policy="OneCycle")`` (mmcv ``OneCycleMomentumUpdaterHook``, defaults) overrides Adam's beta1:
cosine from 0.95 to 0.85 over iterations ``0..0.3 T - 1`` then back to 0.95 at ``T - 1``
(``beta1_schedule="one_cycle"``; ``"constant"`` keeps ``betas[0]``). Gradients are clipped to a total L2 norm of
35 (``optimizer_config=dict(grad_clip=dict(max_norm=35, norm_type=2))``). Batch 16 (``samples_per_gpu=2`` x 8).

Evaluation (``test_cfg=dict(mode="whole")``, ``MultiScaleFlipAug(img_scale=(480, 640), flip=True)``): the whole
480x640 image, centre-padded with zeros (after normalisation) to a multiple of the patch size (``CenterPadding``
in ``evaluation/eval_utils/misc.py``: 490x644 for patch 14) -- a val feature cache built with ``stride=None``
(:mod:`.cache`) --, the prediction of the padded grid (inside ``[min_depth, max_depth]`` by construction, so the
toolbox's clamp is a no-op) resized bilinearly to 480x640 as a whole (the padded border is not cut off first, as in
``encode_decode``), averaged with the prediction of the horizontally flipped image flipped back. Metrics per
image over ``min_depth < gt < max_depth`` inside the Eigen crop (rows 45:471, columns 41:601;
``NYUDataset.eval_mask``), then averaged over the images: RMSE (m), AbsRel, delta1/2/3 in percent. The toolbox
evaluates every 500 iterations and keeps the best checkpoint by AbsRel (``evaluation=dict(interval=500,
save_best="abs_rel", rule="less")``): the published number is that best, selected **on the test set**.
:class:`BestProbeTracker` + ``eval_interval`` reproduce it; the final probe is reported too. The sliding-window val
cache (``stride`` set) is kept as our option.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ph_reg.io.shards import ShardReader
from ph_reg.config import from_mapping
from ph_reg.runtime import derive_seed, generator, module_device, resolve_device

from ph_reg.evaluation.probes.cache import BatchSource, CachedImage, as_batch_source, check_store, iter_val_images
from ph_reg.evaluation.probes.depth_recipe import depth_loss, one_cycle_beta1, warmup_cosine_lambda
from ph_reg.evaluation.probes.fit import fit_probe
from ph_reg.evaluation.probes.metrics import MAX_DEPTH, MIN_DEPTH, DepthMetrics
from ph_reg.evaluation.probes.segmentation import PERCENT, PROBE_SECTION, UPSAMPLE_MODE, _check_positive, stitch_windows

BIN_NORMS = ("linear", "softmax")
LINEAR_NORM_EPS = 0.1  # decode_head.depth_pred, norm_strategy "linear": relu(logit) + 0.1
GRADIENT_LOSSES = ("toolbox", "per_image")
BETA1_SCHEDULES = ("one_cycle", "constant")
EIGEN_CROP = (45, 471, 41, 601)  # top, bottom, left, right of the Eigen crop on 480x640 NYUv2
NYU_SIZE = (480, 640)
SELECTION_RULES = ("less", "greater")
SELECTION_METRIC = "AbsRel"  # the NYU config's evaluation: save_best="abs_rel", rule="less"
BEST_SUFFIX = "_best_on_test"  # metric-name suffix of the probe selected by test-set AbsRel


@dataclass
class DepthProbeConfig:
    """Training recipe of the linear depth probe. Defaults: the official NYUv2 recipe (see the module doc)."""

    iterations: int = 30_000
    batch_size: int = 16
    lr: float = 5e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    beta1_schedule: str = "one_cycle"
    warmup_iters: int = 12_800
    warmup_ratio: float = 1e-3
    min_lr_ratio: float = 1e-8
    grad_clip_norm: float | None = 35.0
    n_bins: int = 256
    min_depth: float = MIN_DEPTH
    max_depth: float = MAX_DEPTH
    bin_norm: str = "linear"
    batch_norm: bool = False
    upsample: int = 4
    use_cls: bool = True
    variance_focus: float = 0.85
    sigloss_warmup_iters: int = 100
    loss_group_size: int | None = 2
    gradient_loss: str = "toolbox"
    gradient_loss_weight: float = 0.5
    gradient_scales: tuple[int, ...] = (1, 2, 4, 6)
    eval_interval: int | None = 500
    device: str = "auto"

    def __post_init__(self) -> None:
        _check_positive(self, ("iterations", "batch_size", "lr", "n_bins", "upsample"))
        if not 0 < self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must be in (0, 1], got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio < 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1), got {self.min_lr_ratio}")
        if not 0 < self.min_depth < self.max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got {self.min_depth}, {self.max_depth}")
        for name, value, allowed in (("bin_norm", self.bin_norm, BIN_NORMS),
                                     ("gradient_loss", self.gradient_loss, GRADIENT_LOSSES),
                                     ("beta1_schedule", self.beta1_schedule, BETA1_SCHEDULES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not 0 <= self.variance_focus <= 1:
            raise ValueError(f"variance_focus must be in [0, 1], got {self.variance_focus}")
        for name in ("weight_decay", "gradient_loss_weight", "sigloss_warmup_iters", "warmup_iters"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        for name in ("grad_clip_norm", "loss_group_size", "eval_interval"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name} must be null or positive, got {value!r}")
        self.gradient_scales = tuple(int(s) for s in self.gradient_scales)
        if any(s < 1 for s in self.gradient_scales):
            raise ValueError(f"gradient_scales must be positive ints, got {self.gradient_scales}")


class LinearDepthProbe(nn.Module):
    """[patch, CLS] -> (optional BatchNorm) -> 1x1 conv to depth-bin logits -> bin weights . bin centres."""

    def __init__(self, embed_dim: int, n_bins: int = 256, min_depth: float = MIN_DEPTH, max_depth: float = MAX_DEPTH,
                 upsample: int = 4, bin_norm: str = "linear", use_cls: bool = True, batch_norm: bool = False):
        super().__init__()
        if bin_norm not in BIN_NORMS:
            raise ValueError(f"bin_norm must be one of {BIN_NORMS}, got {bin_norm!r}")
        self.embed_dim = embed_dim
        self.use_cls = use_cls
        self.upsample = upsample
        self.bin_norm = bin_norm
        self.min_depth = min_depth
        self.max_depth = max_depth
        in_channels = embed_dim * (2 if use_cls else 1)
        self.bn = nn.BatchNorm2d(in_channels) if batch_norm else nn.Identity()
        self.conv = nn.Conv2d(in_channels, n_bins, kernel_size=1)  # PyTorch's default init, as the toolbox head
        self.register_buffer("bin_centers", torch.linspace(min_depth, max_depth, n_bins))

    def logits(self, patch: Tensor, cls: Tensor) -> Tensor:
        """Bin logits (B, n_bins, h, w) of patch features (B, h, w, C) and CLS (B, C)."""
        if patch.ndim != 4 or patch.shape[-1] != self.embed_dim or cls.shape != (patch.shape[0], self.embed_dim):
            raise ValueError(f"expected patch (B, h, w, {self.embed_dim}) and cls (B, {self.embed_dim}), got "
                             f"{tuple(patch.shape)} and {tuple(cls.shape)}")
        x = patch.permute(0, 3, 1, 2)
        if self.use_cls:
            x = torch.cat([x, cls[:, :, None, None].expand(-1, -1, *x.shape[-2:])], dim=1)
        return self.conv(self.bn(x))

    def forward(self, patch: Tensor, cls: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Depth in metres (B, h * upsample, w * upsample), or (B, *size) upsampled bilinearly."""
        logits = self.logits(patch, cls)
        if self.upsample > 1:
            logits = F.interpolate(logits, scale_factor=self.upsample, mode=UPSAMPLE_MODE, align_corners=False)
        weights = bin_weights(logits, self.bin_norm)
        depth = torch.einsum("bkhw,k->bhw", weights, self.bin_centers.to(weights.dtype))
        if size is not None and tuple(size) != tuple(depth.shape[-2:]):
            depth = F.interpolate(depth[:, None], size=tuple(size), mode=UPSAMPLE_MODE, align_corners=False)[:, 0]
        return depth


def bin_weights(logits: Tensor, bin_norm: str = "linear") -> Tensor:
    """Bin weights over dim 1: ``linear`` ``(relu(l) + 0.1) / sum(relu(l) + 0.1)`` (the toolbox's and AdaBins'),
    or ``softmax``."""
    if bin_norm == "softmax":
        return logits.softmax(dim=1)
    if bin_norm == "linear":
        weights = logits.relu() + LINEAR_NORM_EPS
        return weights / weights.sum(dim=1, keepdim=True)
    raise ValueError(f"bin_norm must be one of {BIN_NORMS}, got {bin_norm!r}")


# --- training -------------------------------------------------------------------------------------------------
def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Scale the gradients so their total L2 norm is at most ``max_norm`` (mmcv ``OptimizerHook`` with
    ``grad_clip=dict(max_norm=..., norm_type=2)``: ``clip_grad_norm_`` over the parameters with a gradient);
    returns the norm before clipping."""
    params = [p for p in parameters if p.requires_grad and p.grad is not None]
    return nn.utils.clip_grad_norm_(params, max_norm=max_norm, norm_type=2.0)


class BestProbeTracker:
    """Keep the probe state with the best score of periodic evaluations (mmcv ``EvalHook(save_best=metric,
    rule=...)``: a later evaluation replaces the best only if strictly better).

    Pass it as ``on_eval`` to :func:`train_depth_probe`: it is called as ``tracker(iteration, probe)``.
    ``evaluate(probe)`` returns ``{metric: value}``. After training: ``best_iteration``, ``best_scores``,
    ``best_state`` (a CPU copy of the state dict), ``log`` (every ``(iteration, scores)``) and :meth:`best_probe`.
    """

    def __init__(self, evaluate: Callable[[nn.Module], Mapping[str, float]], metric: str = "AbsRel",
                 rule: str = "less"):
        if rule not in SELECTION_RULES:
            raise ValueError(f"rule must be one of {SELECTION_RULES}, got {rule!r}")
        self.evaluate = evaluate
        self.metric = metric
        self.rule = rule
        self.best_iteration: int | None = None
        self.best_scores: dict[str, float] | None = None
        self.best_state: dict[str, Tensor] | None = None
        self.log: list[tuple[int, dict[str, float]]] = []

    def _better(self, value: float) -> bool:
        if self.best_scores is None:
            return not math.isnan(value)
        best = self.best_scores[self.metric]
        return value < best if self.rule == "less" else value > best

    def __call__(self, iteration: int, probe: nn.Module) -> None:
        scores = {name: float(value) for name, value in self.evaluate(probe).items()}
        if self.metric not in scores:
            raise ValueError(f"the evaluation returned {sorted(scores)}, without the selection metric {self.metric!r}")
        self.log.append((iteration, scores))
        if self._better(scores[self.metric]):
            self.best_iteration, self.best_scores = iteration, scores
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in probe.state_dict().items()}

    def best_probe(self, probe: nn.Module) -> nn.Module:
        """A copy of ``probe`` (same architecture and device) with the best state, in eval mode."""
        if self.best_state is None:
            raise ValueError("no evaluation has run yet: nothing to select (is eval_interval > iterations?)")
        best = copy.deepcopy(probe)
        best.load_state_dict(self.best_state)
        return best.eval()


def train_depth_probe(train: ShardReader | BatchSource, config: DepthProbeConfig | Mapping[str, Any] | None = None,
                      seed: int = 0, history: list[float] | None = None,
                      on_eval: Callable[[int, LinearDepthProbe], None] | None = None) -> LinearDepthProbe:
    """Train a linear depth probe; returns the final probe, in eval mode on the config's device.

    ``train`` is a train feature cache (cached mode) or a :class:`~.cache.BatchSource` (e.g. the online source of
    :mod:`.online`). Initialisation and batch order are seeded from ``seed``. ``history``, when given, receives the
    training loss of every iteration. ``on_eval`` (e.g. a :class:`BestProbeTracker`), when given and
    ``config.eval_interval`` is set, is called as ``on_eval(t, probe)`` after iterations ``t = k * eval_interval``
    (mmcv's ``EvalHook`` by iteration; the probe's mode is restored by the evaluation).
    """
    config = from_mapping(DepthProbeConfig, config, PROBE_SECTION)
    source = as_batch_source(train)
    device = resolve_device(config.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "depth_probe_init"))
        probe = LinearDepthProbe(source.embed_dim, config.n_bins, config.min_depth, config.max_depth, config.upsample,
                                 config.bin_norm, config.use_cls, config.batch_norm).to(device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_lambda(
        config.iterations, config.warmup_iters, config.warmup_ratio, config.min_lr_ratio))
    batches = source.batches(config.batch_size, generator(seed, "depth_probe_batches"), ("patch", "cls", "depth"))

    def loss_at(it: int) -> Tensor:
        if config.beta1_schedule == "one_cycle":
            for group in optimizer.param_groups:
                group["betas"] = (one_cycle_beta1(it, config.iterations), group["betas"][1])
        batch = next(batches)
        target = batch["depth"].to(device)
        pred = probe(batch["patch"].to(device), batch["cls"].to(device), size=target.shape[-2:])
        return depth_loss(pred, target, config, it)

    def clip() -> None:
        clip_gradients(probe.parameters(), config.grad_clip_norm)

    def evaluate(it: int) -> None:
        if on_eval is not None and config.eval_interval and (it + 1) % config.eval_interval == 0:
            on_eval(it + 1, probe)

    return fit_probe(probe, optimizer, schedule, config.iterations, loss_at, history,
                     before_step=clip if config.grad_clip_norm is not None else None, after_iteration=evaluate)


# --- evaluation -----------------------------------------------------------------------------------------------
def eigen_crop_mask(height: int, width: int) -> Tensor:
    """The Eigen crop of NYUv2 (rows 45:471, columns 41:601) as a bool (480, 640) mask; only defined at 480x640."""
    if (height, width) != NYU_SIZE:
        raise ValueError(f"the Eigen crop is defined for {NYU_SIZE[0]}x{NYU_SIZE[1]} NYUv2 images, got "
                         f"{height}x{width}; pass mask_fn=None for other datasets")
    top, bottom, left, right = EIGEN_CROP
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


@torch.no_grad()
def predict_depth(probe: LinearDepthProbe, image: CachedImage, flip_tta: bool = False) -> Tensor:
    """Depth (H0, W0) at the ground truth's resolution (the resized image's if there is none).

    Each cached window's prediction is resized bilinearly to its box and the windows are averaged. A whole-image
    cache (one box = the whole image, features of the centre-padded image) thus gives the toolbox's ``whole``
    inference: the padded grid's prediction resized to the image as a whole. ``flip_tta`` averages with the
    prediction from the features of the flipped window, flipped back.
    """
    device = module_device(probe)
    top, left, bottom, right = image.boxes[0].tolist()
    window = (bottom - top, right - left)
    depth = probe(image.patch.to(device), image.cls.to(device), size=window)
    if flip_tta:
        if image.patch_flip is None:
            raise ValueError(f"image {image.name!r} has no flipped-window features: build the val cache with flip=True")
        flipped = probe(image.patch_flip.to(device), image.cls_flip.to(device), size=window)
        depth = 0.5 * (depth + flipped.flip(-1))
    depth = stitch_windows(depth[:, None], image.boxes, image.resized)
    out_size = image.resized if image.depth is None else tuple(image.depth.shape)
    if tuple(out_size) != tuple(image.resized):
        depth = F.interpolate(depth[None], size=out_size, mode=UPSAMPLE_MODE, align_corners=False)[0]
    return depth[0]


@torch.no_grad()
def evaluate_depth_probe(probe: LinearDepthProbe, val_store: ShardReader,
                         mask_fn: Callable[[int, int], Tensor] | None = None, flip_tta: bool | None = None,
                         per_image: bool = True, min_depth: float = MIN_DEPTH,
                         max_depth: float = MAX_DEPTH) -> dict[str, float]:
    """``{"RMSE", "AbsRel", "delta1", "delta2", "delta3"}`` over a val cache (deltas in percent).

    Evaluated pixels: ``min_depth < gt < max_depth`` (the toolbox's ``eval_mask``; strict at both ends) and
    ``mask_fn(height, width)`` when given (e.g. :func:`eigen_crop_mask`).
    ``flip_tta``: None = use it when the cache has flipped-window features; True requires them.
    ``per_image`` True averages the metrics per image (toolbox/DINOv2 protocol), False per pixel.
    """
    check_store(val_store, "val", ("depth",))
    has_flip = "patch_flip" in val_store.keys
    if flip_tta is None:
        flip_tta = has_flip
    elif flip_tta and not has_flip:
        raise ValueError(f"flip_tta=True needs a val cache built with flip=True; {val_store.folder} has no "
                         "'patch_flip' features")
    device = module_device(probe)
    metrics = DepthMetrics(per_image=per_image, min_depth=min_depth, max_depth=max_depth).to(device)
    was_training = probe.training
    probe.eval()
    try:
        for image in iter_val_images(val_store):
            pred = predict_depth(probe, image, flip_tta)
            target = image.depth.to(device)
            mask = target < max_depth
            if mask_fn is not None:
                mask &= mask_fn(*target.shape).to(device)
            metrics.update(pred, target, mask)
    finally:
        probe.train(was_training)
    result = {name: float(value) for name, value in metrics.compute().items()}
    for k in (1, 2, 3):
        result[f"delta{k}"] *= PERCENT
    return result


def depth_probe_scores(train: ShardReader | BatchSource, val_store: ShardReader,
                       config: DepthProbeConfig | Mapping[str, Any] | None = None, seed: int = 0,
                       history: list[float] | None = None, mask_fn: Callable[[int, int], Tensor] | None = None,
                       flip_tta: bool | None = None) -> dict[str, float]:
    """Train a depth probe and evaluate it: the final probe's metrics (``RMSE``, ``AbsRel``, ...) and, when
    ``config.eval_interval`` is set, the official number: the metrics of the probe with the lowest ``AbsRel`` among
    the evaluations every ``eval_interval`` iterations (``<metric>_best_on_test``; the selection uses the test set,
    as the toolbox's ``save_best`` did) and its iteration (``iteration_best_on_test``)."""
    config = from_mapping(DepthProbeConfig, config, PROBE_SECTION)

    def evaluate(probe: nn.Module) -> dict[str, float]:
        return evaluate_depth_probe(probe, val_store, mask_fn=mask_fn, flip_tta=flip_tta,
                                    min_depth=config.min_depth, max_depth=config.max_depth)

    tracker = BestProbeTracker(evaluate, SELECTION_METRIC, "less") if config.eval_interval else None
    probe = train_depth_probe(train, config, seed, history, on_eval=tracker)
    scores = evaluate(probe)
    if tracker is not None and tracker.best_scores is not None:
        scores.update({f"{name}{BEST_SUFFIX}": value for name, value in tracker.best_scores.items()})
        scores[f"iteration{BEST_SUFFIX}"] = float(tracker.best_iteration)
    return scores
