"""Dense-task metrics: mIoU / mAcc (as mmsegmentation) and monocular-depth metrics.

Segmentation (``segmentation_metrics``): mmsegmentation's ``IoUMetric``, accumulated as one confusion matrix over
the whole val set (``dist_reduce_fx="sum"``), checked against hand-computed matrices in ``tests/unit/evaluation/test_probe_metrics.py``
and ``tests/unit/evaluation/test_repro_probes.py``:

- pixels whose target is ``ignore_index`` are dropped before counting, whatever their prediction;
- mIoU = ``nanmean(intersection / union)``: a class absent from both prediction and target (union 0) is left out;
  a class predicted but absent from the target has IoU 0 and counts;
- mAcc = ``nanmean(intersection / label area)`` (per-class recall): a class absent from the target (label area 0)
  is left out, *whether or not it is predicted* (mmsegmentation; torchmetrics' ``MulticlassAccuracy`` would count
  a predicted-but-absent class as 0).

Depth (``DepthMetrics``): RMSE (m), AbsRel, delta_k = share of pixels with ``max(pred/gt, gt/pred) < 1.25**k``,
over valid pixels ``min_depth < gt <= max_depth`` (and an optional extra mask, e.g. the Eigen crop).
Predictions are clamped to ``[min_depth, max_depth]`` first (as the monocular-depth toolbox does).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from ph_reg.evaluation.benchmarks.base import IGNORE_INDEX

MIN_DEPTH = 1e-3
MAX_DEPTH = 10.0
DELTA_BASE = 1.25


class SegmentationMetrics(Metric):
    """mIoU and mAcc as mmsegmentation's ``IoUMetric`` computes them (see the module doc), from a confusion matrix
    (rows: target class, columns: predicted class) accumulated over every ``update``."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, **kwargs):
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("confusion", default=torch.zeros(num_classes, num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add integer class maps of the same shape (any shape); target pixels equal to ``ignore_index`` are dropped."""
        if preds.shape != target.shape:
            raise ValueError(f"preds and target must have the same shape, got {tuple(preds.shape)} and "
                             f"{tuple(target.shape)}")
        keep = target != self.ignore_index
        preds, target = preds[keep].long(), target[keep].long()
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= self.num_classes):
            raise ValueError(f"target class ids must be in [0, {self.num_classes}) or {self.ignore_index}, got range "
                             f"[{int(target.min())}, {int(target.max())}]")
        if preds.numel() and (int(preds.min()) < 0 or int(preds.max()) >= self.num_classes):
            raise ValueError(f"predicted class ids must be in [0, {self.num_classes}), got range "
                             f"[{int(preds.min())}, {int(preds.max())}]")
        counts = torch.bincount(target * self.num_classes + preds, minlength=self.num_classes ** 2)
        self.confusion += counts.view(self.num_classes, self.num_classes)

    def compute(self) -> dict[str, Tensor]:
        """``{"mIoU", "mAcc"}`` as fractions in [0, 1] (NaN when no class qualifies)."""
        confusion = self.confusion.double()
        intersection = confusion.diagonal()
        label_area = confusion.sum(1)
        union = label_area + confusion.sum(0) - intersection
        iou = intersection / union          # 0/0 = NaN: class absent from prediction and target
        acc = intersection / label_area     # 0/0 = NaN: class absent from the target, predicted or not
        return {"mIoU": iou.nanmean(), "mAcc": acc.nanmean()}


def segmentation_metrics(num_classes: int, ignore_index: int = IGNORE_INDEX) -> SegmentationMetrics:
    """``{"mIoU", "mAcc"}`` of mmsegmentation's ``IoUMetric`` (nanmean over classes), as fractions in [0, 1]."""
    return SegmentationMetrics(num_classes, ignore_index)


class DepthMetrics(Metric):
    """RMSE, AbsRel, delta1/2/3 accumulated as sums (``dist_reduce_fx="sum"``).

    ``per_image=False``: every valid pixel of the val set weighs the same (RMSE = sqrt of the mean squared error
    over all pixels). ``per_image=True``: each metric is computed per image, then averaged over the images with
    at least one valid pixel (the monocular-depth toolbox / DINOv2 protocol). Deltas are fractions in [0, 1].
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, per_image: bool = False, min_depth: float = MIN_DEPTH, max_depth: float = MAX_DEPTH,
                 delta_base: float = DELTA_BASE, **kwargs):
        super().__init__(**kwargs)
        if not 0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        self.per_image = per_image
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.delta_base = delta_base
        for name in ("squared_error", "abs_rel", "delta1", "delta2", "delta3", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Add predictions and ground truth of shape (B, H, W) or (H, W); ``mask`` (same shape) restricts further."""
        if preds.shape != target.shape or preds.ndim not in (2, 3):
            raise ValueError(f"preds and target must both be (B, H, W) or (H, W), got {tuple(preds.shape)} and "
                             f"{tuple(target.shape)}")
        if mask is not None and mask.shape != target.shape:
            raise ValueError(f"mask must have the target's shape {tuple(target.shape)}, got {tuple(mask.shape)}")
        if preds.ndim == 2:
            preds, target = preds[None], target[None]
            mask = None if mask is None else mask[None]
        target = target.double()
        preds = preds.double().clamp(self.min_depth, self.max_depth)
        valid = (target > self.min_depth) & (target <= self.max_depth)
        if mask is not None:
            valid &= mask.bool()
        ratio = torch.maximum(preds / target, target / preds)
        terms = {
            "squared_error": (preds - target) ** 2,
            "abs_rel": (preds - target).abs() / target,
            **{f"delta{k}": (ratio < self.delta_base ** k).double() for k in (1, 2, 3)},
        }
        if not self.per_image:
            for name, values in terms.items():
                setattr(self, name, getattr(self, name) + values[valid].sum())
            self.count += valid.sum()
            return
        for b in range(preds.shape[0]):
            n = valid[b].sum()
            if n == 0:
                continue  # no valid pixel: the image does not count (toolbox nanmean)
            for name, values in terms.items():
                mean = values[b][valid[b]].mean()
                setattr(self, name, getattr(self, name) + (mean.sqrt() if name == "squared_error" else mean))
            self.count += 1

    def compute(self) -> dict[str, Tensor]:
        """``{"RMSE", "AbsRel", "delta1", "delta2", "delta3"}`` (NaN when nothing valid was seen)."""
        count = self.count
        rmse = self.squared_error / count
        if not self.per_image:
            rmse = rmse.sqrt()
        return {"RMSE": rmse, "AbsRel": self.abs_rel / count, "delta1": self.delta1 / count,
                "delta2": self.delta2 / count, "delta3": self.delta3 / count}
