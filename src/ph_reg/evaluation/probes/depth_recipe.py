"""The loss and the optimiser schedules of the linear depth probe's official NYU recipe (the DINOv2 depth toolbox:
SigLoss + GradientLoss, mmcv's cosine LR with linear warm-up and one-cycle momentum). See :mod:`.depth`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ph_reg.evaluation.probes.metrics import MAX_DEPTH

__all__ = ["loss_valid_mask", "sig_loss", "toolbox_gradient_loss", "gradient_loss", "depth_loss", "annealing_cos",
           "warmup_cosine_lambda", "one_cycle_beta1"]

LOSS_EPS = 1e-3  # SigLoss / GradientLoss: log(x + 0.001) "avoid grad explode"
SIGLOSS_MIN = 1e-12  # floor under the square root of SigLoss (gradient-safe at a perfect fit)
GRADIENT_STEP = 2  # GradientLoss: finite differences x[0:-2] - x[2:]
TOOLBOX_GRADIENT_STRIDES = (1, 2, 4, 6)  # GradientLoss: [x] + [x[::2 * i, ::2 * i] for i in range(1, 4)]
ONE_CYCLE_BETA1 = (0.85, 0.95)  # mmcv OneCycleMomentumUpdaterHook defaults: base_momentum, max_momentum
ONE_CYCLE_PCT_START = 0.3  # mmcv OneCycleMomentumUpdaterHook default


# --- losses ---------------------------------------------------------------------------------------------------
def loss_valid_mask(target: Tensor, max_depth: float = MAX_DEPTH) -> Tensor:
    """The toolbox losses' mask (``valid_mask=True`` with ``max_depth``): ``0 < target <= max_depth``."""
    return (target > 0) & (target <= max_depth)


def sig_loss(pred: Tensor, target: Tensor, valid: Tensor, variance_focus: float = 0.85, warmup: bool = False,
             eps: float = LOSS_EPS) -> Tensor:
    """The toolbox's SigLoss on the ``valid`` pixels: ``g = log(pred + eps) - log(target + eps)``,
    ``sqrt(var(g) + (1 - lambda) mean(g)^2)`` with the unbiased variance; ``warmup``: ``sqrt((1 - lambda) mean(g)^2)``.
    (A single valid pixel has no unbiased variance; it counts as 0 there, where the toolbox would return NaN.)"""
    if not bool(valid.any()):
        return pred.sum() * 0.0
    g = (pred[valid] + eps).log() - (target[valid] + eps).log()
    d = (1 - variance_focus) * g.mean() ** 2
    if not warmup and g.numel() > 1:
        d = d + g.var()
    return d.clamp_min(SIGLOSS_MIN).sqrt()


def toolbox_gradient_loss(pred: Tensor, target: Tensor, max_depth: float = MAX_DEPTH, eps: float = LOSS_EPS) -> Tensor:
    """The toolbox's GradientLoss applied, as ``decode_head.losses`` applies it, to (B, 1, H, W) tensors.

    Its sub-sampling ``x[::2i, ::2i]`` and finite differences ``x[0:-2] - x[2:]``, ``x[:, 0:-2] - x[:, 2:]`` then act
    on the batch and channel axes: the channel term is always empty and, with at most 2 images, the batch term too,
    so the loss is exactly 0 (the official 2 images per GPU). With more images it compares whole images two apart.
    A scale without valid pixels is skipped (the toolbox would divide 0 by 0).
    """
    if pred.ndim != 4 or pred.shape != target.shape or pred.shape[1] != 1:
        raise ValueError(f"expected pred and target of shape (B, 1, H, W), got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    total = pred.sum() * 0.0
    for stride in TOOLBOX_GRADIENT_STRIDES:
        x, t = pred[::stride, ::stride], target[::stride, ::stride]
        mask = loss_valid_mask(t, max_depth).to(x.dtype)
        count = mask.sum()
        if count == 0:
            continue
        diff = ((x + eps).log() - (t + eps).log()) * mask
        first = (diff[:-GRADIENT_STEP] - diff[GRADIENT_STEP:]).abs() * mask[:-GRADIENT_STEP] * mask[GRADIENT_STEP:]
        second = ((diff[:, :-GRADIENT_STEP] - diff[:, GRADIENT_STEP:]).abs()
                  * mask[:, :-GRADIENT_STEP] * mask[:, GRADIENT_STEP:])
        total = total + (first.sum() + second.sum()) / count
    return total


def gradient_loss(pred: Tensor, target: Tensor, valid: Tensor, scales: tuple[int, ...] = (1, 2, 4, 6),
                  step: int = GRADIENT_STEP, eps: float = LOSS_EPS) -> Tensor:
    """Multi-scale gradient matching (MegaDepth) as intended, on each (H, W) map of a (B, H, W) batch: with
    ``R = log(pred + eps) - log(gt + eps)`` on valid pixels (0 elsewhere), per scale ``s`` on the ``s``-subsampled
    maps ``sum(|R[y, x] - R[y + 2, x]| m m' + |R[y, x] - R[y, x + 2]| m m') / n_valid(s)``, summed over the scales
    (``m m'``: both pixels valid). The default scales (1, 2, 4, 6) are the toolbox's ``[x] + x[::2i] (i = 1..3)``."""
    residual = torch.where(valid, (pred + eps).log() - (target + eps).log(), torch.zeros_like(pred))
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


def depth_loss(pred: Tensor, target: Tensor, config: Any, iteration: int) -> Tensor:
    """SigLoss + ``gradient_loss_weight`` x gradient loss of a (B, H, W) batch (``config``: a
    :class:`~.depth.DepthProbeConfig`), computed per group of
    ``loss_group_size`` images and averaged over the groups (the official per-GPU losses, averaged by DDP)."""
    group = config.loss_group_size or pred.shape[0]
    warmup = iteration < config.sigloss_warmup_iters
    losses = []
    for p, t in zip(pred.split(group), target.split(group), strict=True):
        valid = loss_valid_mask(t, config.max_depth)
        loss = sig_loss(p, t, valid, config.variance_focus, warmup=warmup)
        if config.gradient_loss_weight:
            if config.gradient_loss == "toolbox":
                grad = toolbox_gradient_loss(p[:, None], t[:, None], config.max_depth)
            else:
                grad = gradient_loss(p, t, valid, config.gradient_scales)
            loss = loss + config.gradient_loss_weight * grad
        losses.append(loss)
    return torch.stack(losses).mean()


# --- schedules ------------------------------------------------------------------------------------------------
def annealing_cos(start: float, end: float, factor: float) -> float:
    """Cosine from ``start`` (factor 0) to ``end`` (factor 1), as mmcv's ``annealing_cos``."""
    return end + 0.5 * (start - end) * (math.cos(math.pi * factor) + 1)


def warmup_cosine_lambda(iterations: int, warmup_iters: int, warmup_ratio: float, min_lr_ratio: float
                         ) -> Callable[[int], float]:
    """LR factor at iteration ``t`` (0-based) of mmcv's ``CosineAnnealingLrUpdaterHook`` by iteration with linear
    warm-up: ``c(t) = annealing_cos(1, min_lr_ratio, t / iterations)`` times, while ``t < warmup_iters``,
    ``1 - (1 - t / warmup_iters) (1 - warmup_ratio)``. The cosine spans all iterations, warm-up included."""
    def factor(t: int) -> float:
        regular = annealing_cos(1.0, min_lr_ratio, t / iterations)
        if t < warmup_iters:
            regular *= 1 - (1 - t / warmup_iters) * (1 - warmup_ratio)
        return regular
    return factor


def one_cycle_beta1(t: int, iterations: int, low: float = ONE_CYCLE_BETA1[0], high: float = ONE_CYCLE_BETA1[1],
                    pct_start: float = ONE_CYCLE_PCT_START) -> float:
    """Adam's beta1 at iteration ``t`` under mmcv's ``OneCycleMomentumUpdaterHook`` (two phases, cosine): from
    ``high`` at 0 to ``low`` at ``e = pct_start * iterations - 1``, then back to ``high`` at ``iterations - 1``."""
    end_first = pct_start * iterations - 1
    if t <= end_first:
        return annealing_cos(high, low, t / end_first) if end_first > 0 else low
    return annealing_cos(low, high, (t - end_first) / (iterations - 1 - end_first))
