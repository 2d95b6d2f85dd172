"""Dense-task metrics: mIoU / mAcc (torchmetrics) and monocular-depth metrics.

Segmentation (``segmentation_metrics``): ``MulticlassJaccardIndex`` and ``MulticlassAccuracy`` with
``average="macro"`` and ``ignore_index=255``, accumulated as one confusion matrix over the whole val set.
torchmetrics 1.9 macro averaging, checked in ``tests/test_probe_metrics.py``:

- pixels whose target is ``ignore_index`` are dropped before counting, whatever their prediction;
- a class absent from both prediction and target (empty row and column of the confusion matrix) gets weight 0:
  it is left out of both means (as mmsegmentation's ``nanmean``);
- mIoU: a class predicted but absent from the target has IoU 0 and counts (as in mmsegmentation);
- mAcc (per-class recall ``tp / (tp + fn)``): a class predicted but absent from the target has recall 0/0,
  which torchmetrics turns into 0 and *counts* in the mean, whereas mmsegmentation's ``nanmean`` leaves it out.
  torchmetrics mAcc can therefore be lower than mmsegmentation's; mIoU is identical.

Depth (``DepthMetrics``): RMSE (m), AbsRel, delta_k = share of pixels with ``max(pred/gt, gt/pred) < 1.25**k``,
over valid pixels ``min_depth < gt <= max_depth`` (and an optional extra mask, e.g. the Eigen crop).
Predictions are clamped to ``[min_depth, max_depth]`` first (as the monocular-depth toolbox does).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from ph_reg.datasets.base import IGNORE_INDEX

MIN_DEPTH = 1e-3
MAX_DEPTH = 10.0
DELTA_BASE = 1.25
DEPTH_METRIC_NAMES = ("RMSE", "AbsRel", "delta1", "delta2", "delta3")


def segmentation_metrics(num_classes: int, ignore_index: int = IGNORE_INDEX) -> MetricCollection:
    """``{"mIoU", "mAcc"}``: macro-averaged Jaccard index and per-class accuracy, as fractions in [0, 1]."""
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return MetricCollection({
        "mIoU": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index),
        "mAcc": MulticlassAccuracy(num_classes, average="macro", ignore_index=ignore_index),
    })


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
