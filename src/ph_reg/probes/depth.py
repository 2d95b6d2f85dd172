"""Linear-probe monocular depth on frozen tokens (method.md section 6, NYUv2 protocol of DINOv2).

Head (:class:`LinearDepthProbe`): input = patch tokens concatenated with the window's CLS token broadcast to every
patch (2C channels) -> ``BatchNorm2d(2C)`` -> ``Conv2d(2C, 256, 1)`` = one logit per depth bin. The 256 bin
centres are ``torch.linspace(0.001, 10, 256)`` m (uniform, "UD"). The logits are upsampled bilinearly by
``upsample`` (4, as DINOv2 upsamples its features before the 1x1 conv; for a linear head the two orders agree
at test time), turned into bin weights with ``softmax`` over the bins (``bin_norm="linear"`` is DINOv2's default
``(relu(l) + 0.1) / sum(relu(l) + 0.1)``), and the depth is ``sum_k weight_k * centre_k``. That map is
upsampled bilinearly to the target size.

Loss over the valid pixels ``min_depth < gt <= max_depth`` of the batch, with ``g = log(pred) - log(gt)``:

- SigLoss (scale-invariant log loss, Eigen et al. 2014, variance focus ``lambda = 0.85``)
  ``sqrt(mean(g^2) - lambda * mean(g)^2)``; during the first ``sigloss_warmup_iters`` iterations it is
  ``sqrt((1 - lambda) * mean(g)^2)`` (the toolbox's warm-up);
- plus ``0.5 *`` gradient loss: multi-scale gradient matching on the log-depth residual (MegaDepth,
  Li & Snavely 2018). With ``R = g`` on valid pixels (0 elsewhere), at each scale ``s`` in (1, 2, 4, 8) on the
  ``s``-subsampled maps: ``sum(|R[y, x] - R[y + 2, x]| m m' + |R[y, x] - R[y, x + 2]| m m') / n_valid(s)``,
  summed over the scales (``m m'``: both pixels valid).

Optimiser: AdamW (lr 5e-3, wd 0.01), linear warm-up from ``warmup_start_factor * lr`` over
``warmup_fraction * iterations`` iterations, then cosine decay to ``min_lr_ratio * lr``. No data augmentation
(see :mod:`.cache`).

Evaluation: sliding-window depth (windows averaged, resized bilinearly to the ground-truth size), optional flip
TTA (average with the prediction from the *backbone features of the flipped window*, flipped back; needs a val
cache built with ``flip=True``), valid pixels ``0.001 < gt <= 10`` further restricted by ``mask_fn`` (e.g.
:func:`eigen_crop_mask` for 480x640 NYUv2). RMSE (m), AbsRel, and delta1/2/3 in percent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ph_reg.io import ShardReader
from ph_reg.utils import derive_seed, generator, resolve_device

from .cache import CachedImage, check_store, iter_train_batches, iter_val_images
from .metrics import MAX_DEPTH, MIN_DEPTH, DepthMetrics
from .segmentation import HEAD_INIT_STD, PERCENT, UPSAMPLE_MODE, _check_positive, config_from_dict, stitch_windows

BIN_NORMS = ("softmax", "linear")
LINEAR_NORM_EPS = 0.1  # DINOv2's "linear" bin normalisation
SIGLOSS_MIN = 1e-12  # floor under the square root of SigLoss (gradient-safe at a perfect fit)
GRADIENT_STEP = 2  # pixel offset of the finite differences in the gradient loss
EIGEN_CROP = (45, 471, 41, 601)  # top, bottom, left, right of the Eigen crop on 480x640 NYUv2
NYU_SIZE = (480, 640)


@dataclass
class DepthProbeConfig:
    """Training recipe of the linear depth probe (defaults: the paper's NYUv2 recipe, 30k iterations)."""

    iterations: int = 30_000
    batch_size: int = 8
    lr: float = 5e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    warmup_start_factor: float = 1e-3
    min_lr_ratio: float = 0.0
    n_bins: int = 256
    min_depth: float = MIN_DEPTH
    max_depth: float = MAX_DEPTH
    bin_norm: str = "softmax"
    upsample: int = 4
    use_cls: bool = True
    variance_focus: float = 0.85
    sigloss_warmup_iters: int = 100
    gradient_loss_weight: float = 0.5
    gradient_scales: tuple[int, ...] = (1, 2, 4, 8)
    device: str = "auto"

    def __post_init__(self) -> None:
        _check_positive(self, ("iterations", "batch_size", "lr", "n_bins", "upsample",
                               "warmup_start_factor"))
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 < self.min_depth < self.max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got {self.min_depth}, {self.max_depth}")
        if self.bin_norm not in BIN_NORMS:
            raise ValueError(f"bin_norm must be one of {BIN_NORMS}, got {self.bin_norm!r}")
        if not 0 <= self.variance_focus <= 1:
            raise ValueError(f"variance_focus must be in [0, 1], got {self.variance_focus}")
        if self.weight_decay < 0 or self.gradient_loss_weight < 0 or self.sigloss_warmup_iters < 0:
            raise ValueError("weight_decay, gradient_loss_weight and sigloss_warmup_iters must be >= 0")
        self.gradient_scales = tuple(int(s) for s in self.gradient_scales)
        if any(s < 1 for s in self.gradient_scales):
            raise ValueError(f"gradient_scales must be positive ints, got {self.gradient_scales}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> DepthProbeConfig:
        return config_from_dict(cls, data)


class LinearDepthProbe(nn.Module):
    """[patch, CLS] -> BatchNorm -> 1x1 conv to depth-bin logits -> bin weights . bin centres."""

    def __init__(self, embed_dim: int, n_bins: int = 256, min_depth: float = MIN_DEPTH, max_depth: float = MAX_DEPTH,
                 upsample: int = 4, bin_norm: str = "softmax", use_cls: bool = True, init_std: float = HEAD_INIT_STD):
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
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, n_bins, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=init_std)
        nn.init.zeros_(self.conv.bias)
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
        if self.bin_norm == "softmax":
            weights = logits.softmax(dim=1)
        else:
            weights = logits.relu() + LINEAR_NORM_EPS
            weights = weights / weights.sum(dim=1, keepdim=True)
        depth = torch.einsum("bkhw,k->bhw", weights, self.bin_centers.to(weights.dtype))
        if size is not None and tuple(size) != tuple(depth.shape[-2:]):
            depth = F.interpolate(depth[:, None], size=tuple(size), mode=UPSAMPLE_MODE, align_corners=False)[:, 0]
        return depth


# --- losses ---------------------------------------------------------------------------------------------------
def valid_depth_mask(target: Tensor, min_depth: float = MIN_DEPTH, max_depth: float = MAX_DEPTH) -> Tensor:
    """``min_depth < target <= max_depth``."""
    return (target > min_depth) & (target <= max_depth)


def sig_loss(pred: Tensor, target: Tensor, valid: Tensor, variance_focus: float = 0.85, warmup: bool = False) -> Tensor:
    """Scale-invariant log loss ``sqrt(mean(g^2) - lambda mean(g)^2)``, ``g = log pred - log gt`` on valid pixels;
    ``warmup``: ``sqrt((1 - lambda) mean(g)^2)``."""
    if not bool(valid.any()):
        return pred.sum() * 0.0
    g = pred[valid].log() - target[valid].log()
    mean_sq = g.mean() ** 2
    d = (1 - variance_focus) * mean_sq if warmup else (g ** 2).mean() - variance_focus * mean_sq
    return d.clamp_min(SIGLOSS_MIN).sqrt()


def gradient_loss(pred: Tensor, target: Tensor, valid: Tensor, scales: tuple[int, ...] = (1, 2, 4, 8),
                  step: int = GRADIENT_STEP) -> Tensor:
    """Multi-scale gradient matching on the log-depth residual (B, H, W) (see module doc)."""
    safe_target = torch.where(valid, target, torch.ones_like(target))  # no log(0) at invalid pixels
    residual = torch.where(valid, pred.log() - safe_target.log(), torch.zeros_like(pred))
    total = pred.sum() * 0.0
    for s in scales:
        r, m = residual[:, ::s, ::s], valid[:, ::s, ::s].to(residual.dtype)
        count = m.sum()
        if count == 0:
            continue
        vertical = (r[:, :-step] - r[:, step:]).abs() * m[:, :-step] * m[:, step:]
        horizontal = (r[:, :, :-step] - r[:, :, step:]).abs() * m[:, :, :-step] * m[:, :, step:]
        total = total + (vertical.sum() + horizontal.sum()) / count
    return total


def warmup_cosine_lambda(iterations: int, warmup_iters: int, start_factor: float, min_ratio: float):
    """LambdaLR factor: linear ``start_factor -> 1`` over ``warmup_iters``, then cosine ``1 -> min_ratio``."""
    def factor(it: int) -> float:
        if it < warmup_iters:
            return start_factor + (1.0 - start_factor) * it / warmup_iters
        progress = min(1.0, (it - warmup_iters) / max(1, iterations - warmup_iters))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


# --- training and evaluation ----------------------------------------------------------------------------------
def train_depth_probe(train_store: ShardReader, config: DepthProbeConfig | Mapping[str, Any] | None = None,
                      seed: int = 0, history: list[float] | None = None) -> LinearDepthProbe:
    """Train a linear depth probe on a train feature cache; returns it in eval mode on the config's device.
    ``history``, when given, receives the training loss of every iteration."""
    config = DepthProbeConfig.from_dict(config)
    check_store(train_store, "train", ("patch", "cls", "depth"))
    device = resolve_device(config.device)
    embed_dim = train_store[0]["patch"].shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "depth_probe_init"))
        probe = LinearDepthProbe(embed_dim, config.n_bins, config.min_depth, config.max_depth, config.upsample,
                                 config.bin_norm, config.use_cls).to(device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup_iters = round(config.warmup_fraction * config.iterations)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_lambda(
        config.iterations, warmup_iters, config.warmup_start_factor, config.min_lr_ratio))
    batches = iter_train_batches(train_store, config.batch_size, generator(seed, "depth_probe_batches"),
                                 ("patch", "cls", "depth"))
    probe.train()
    losses = []
    for it in range(config.iterations):
        batch = next(batches)
        target = batch["depth"].to(device)
        pred = probe(batch["patch"].to(device), batch["cls"].to(device), size=target.shape[-2:])
        valid = valid_depth_mask(target, config.min_depth, config.max_depth)
        loss = sig_loss(pred, target, valid, config.variance_focus, warmup=it < config.sigloss_warmup_iters)
        if config.gradient_loss_weight:
            loss = loss + config.gradient_loss_weight * gradient_loss(pred, target, valid, config.gradient_scales)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.detach())
    if history is not None and losses:
        history.extend(torch.stack(losses).float().cpu().tolist())  # one device sync, after training
    return probe.eval()


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
    """Sliding-window depth (H0, W0) at the ground truth's resolution (the resized image's if there is none)."""
    device = next(probe.parameters()).device
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

    ``flip_tta``: None = use it when the cache has flipped-window features; True requires them.
    ``per_image`` True averages the metrics per image (toolbox/DINOv2 protocol), False per pixel.
    ``mask_fn(height, width)`` gives an extra bool mask of evaluated pixels (e.g. :func:`eigen_crop_mask`).
    """
    check_store(val_store, "val", ("depth",))
    has_flip = "patch_flip" in val_store.keys
    if flip_tta is None:
        flip_tta = has_flip
    elif flip_tta and not has_flip:
        raise ValueError(f"flip_tta=True needs a val cache built with flip=True; {val_store.folder} has no "
                         "'patch_flip' features")
    device = next(probe.parameters()).device
    metrics = DepthMetrics(per_image=per_image, min_depth=min_depth, max_depth=max_depth).to(device)
    was_training = probe.training
    probe.eval()
    try:
        for image in iter_val_images(val_store):
            pred = predict_depth(probe, image, flip_tta)
            target = image.depth.to(device)
            mask = None if mask_fn is None else mask_fn(*target.shape).to(device)
            metrics.update(pred, target, mask)
    finally:
        probe.train(was_training)
    result = {name: float(value) for name, value in metrics.compute().items()}
    for k in (1, 2, 3):
        result[f"delta{k}"] *= PERCENT
    return result
