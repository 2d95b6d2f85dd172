"""Linear-probe semantic segmentation on frozen patch tokens (docs/method.md section 6).

Head: ``BatchNorm2d(C) -> Conv2d(C, K, 1)`` on the (C, h, w) patch grid; logits are upsampled bilinearly
(``align_corners=False``) to the label size. Loss: cross-entropy, ``ignore_index=255``, summed over the non-ignored
pixels and divided by the number of *all* pixels of the batch, ignored and padded ones included (mmsegmentation's
``CrossEntropyLoss`` with ``avg_non_ignore=False``, the official value); ``avg_non_ignore=True`` divides by the
non-ignored pixels instead. Training batches come from a :class:`~.cache.BatchSource`: cached train crops (no
augmentation, see :mod:`.cache`) or the online source of :mod:`.online` (features recomputed under augmentation);
AdamW with poly decay ``lr * (1 - it / iterations) ** power``, stepped every iteration.

Inference (sliding window, from a val cache): each window's logits are upsampled to the window size, summed
into a canvas of the resized image and divided by the number of windows covering each pixel; the averaged
logits are resized bilinearly to the original label size, and the argmax is the prediction. mIoU and mAcc are
accumulated over the whole val set (one confusion matrix, see :mod:`.metrics`) and reported in percent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ph_reg.evaluation.benchmarks.base import IGNORE_INDEX
from ph_reg.io.shards import ShardReader
from ph_reg.config import from_mapping
from ph_reg.runtime import derive_seed, generator, module_device, resolve_device

from ph_reg.evaluation.probes.cache import BatchSource, CachedImage, as_batch_source, check_store, iter_val_images
from ph_reg.evaluation.probes.fit import fit_probe
from ph_reg.evaluation.probes.metrics import segmentation_metrics

HEAD_INIT_STD = 0.01  # mmsegmentation's conv_seg initialisation
UPSAMPLE_MODE = "bilinear"
PERCENT = 100.0


#: The config section a probe recipe given as a mapping is checked under (``evaluation.probes.tasks.<task>.
#: <benchmark>.probe`` in a run, where :mod:`ph_reg.params` checks it with the full dotted key first).
PROBE_SECTION = "probe"


def _check_positive(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive number, got {value!r}")


@dataclass
class SegmentationProbeConfig:
    """Training recipe of the linear segmentation probe (defaults: the paper's VOC21 recipe, 20k iterations;
    use 40k for ADE20K). ``num_classes`` None: read from the train cache's attributes."""

    num_classes: int | None = None
    iterations: int = 20_000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    ignore_index: int = IGNORE_INDEX
    avg_non_ignore: bool = False   # mmseg CrossEntropyLoss: False = mean over all pixels (official); True = non-ignored
    device: str = "auto"

    def __post_init__(self) -> None:
        _check_positive(self, ("iterations", "batch_size", "lr", "poly_power"))
        if not isinstance(self.avg_non_ignore, bool):
            raise ValueError(f"avg_non_ignore must be true or false, got {self.avg_non_ignore!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 2):
            raise ValueError(f"num_classes must be an int >= 2 or None, got {self.num_classes!r}")


class LinearSegmentationProbe(nn.Module):
    """BatchNorm + 1x1 convolution on the patch grid."""

    def __init__(self, embed_dim: int, num_classes: int, init_std: float = HEAD_INIT_STD):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.bn = nn.BatchNorm2d(embed_dim)
        self.conv = nn.Conv2d(embed_dim, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=init_std)
        nn.init.zeros_(self.conv.bias)

    def forward(self, patch: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Patch features (B, h, w, C) -> logits (B, K, h, w), or (B, K, *size) upsampled bilinearly."""
        if patch.ndim != 4 or patch.shape[-1] != self.embed_dim:
            raise ValueError(f"patch features must be (B, h, w, {self.embed_dim}), got {tuple(patch.shape)}")
        logits = self.conv(self.bn(patch.permute(0, 3, 1, 2)))
        if size is not None and tuple(size) != tuple(logits.shape[-2:]):
            logits = F.interpolate(logits, size=tuple(size), mode=UPSAMPLE_MODE, align_corners=False)
        return logits


def poly_lr_lambda(iterations: int, power: float):
    """LambdaLR factor ``(1 - it / iterations) ** power``."""
    return lambda it: max(0.0, 1.0 - it / iterations) ** power


def segmentation_loss(logits: Tensor, label: Tensor, ignore_index: int = IGNORE_INDEX,
                      avg_non_ignore: bool = False) -> Tensor:
    """Cross-entropy of logits (B, K, H, W) against labels (B, H, W): the sum over the non-ignored pixels divided by
    all B*H*W pixels (``avg_non_ignore=False``, mmsegmentation's default) or by the non-ignored ones (``True``)."""
    total = F.cross_entropy(logits, label, ignore_index=ignore_index, reduction="sum")
    count = (label != ignore_index).sum().clamp_min(1) if avg_non_ignore else label.numel()
    return total / count


def train_segmentation_probe(train: ShardReader | BatchSource,
                             config: SegmentationProbeConfig | Mapping[str, Any] | None = None,
                             seed: int = 0, history: list[float] | None = None) -> LinearSegmentationProbe:
    """Train a linear segmentation probe; returns it in eval mode on the config's device.

    ``train`` is a train feature cache (cached mode) or a :class:`~.cache.BatchSource` (e.g. the online source of
    :mod:`.online`). Initialisation and batch order are seeded from ``seed``. ``history``, when given, receives the
    training loss of every iteration.
    """
    config = from_mapping(SegmentationProbeConfig, config, PROBE_SECTION)
    source = as_batch_source(train)
    num_classes = config.num_classes or source.attrs.get("num_classes")
    if not num_classes:
        raise ValueError("num_classes is unknown: set it in the config (the train data has no 'num_classes' attr)")
    device = resolve_device(config.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "segmentation_probe_init"))
        probe = LinearSegmentationProbe(source.embed_dim, num_classes).to(device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lr_lambda(config.iterations, config.poly_power))
    batches = source.batches(config.batch_size, generator(seed, "segmentation_probe_batches"), ("patch", "label"))

    def loss_at(_: int) -> Tensor:
        batch = next(batches)
        patch, label = batch["patch"].to(device), batch["label"].to(device)
        logits = probe(patch, size=label.shape[-2:])
        return segmentation_loss(logits, label, config.ignore_index, config.avg_non_ignore)

    return fit_probe(probe, optimizer, schedule, config.iterations, loss_at, history)


def stitch_windows(window_maps: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Average per-window maps (N, K, S, S) placed at ``boxes`` (N, 4) into one (K, *size) map.

    Raises ValueError if some pixel is covered by no window.
    """
    canvas = window_maps.new_zeros(window_maps.shape[1], *size)
    count = window_maps.new_zeros(1, *size)
    for window, (top, left, bottom, right) in zip(window_maps, boxes.tolist()):
        canvas[:, top:bottom, left:right] += window
        count[:, top:bottom, left:right] += 1
    if bool((count == 0).any()):
        raise ValueError(f"the cached windows do not cover the resized image {tuple(size)}")
    return canvas / count


def _window_size(image: CachedImage) -> tuple[int, int]:
    top, left, bottom, right = image.boxes[0].tolist()
    return bottom - top, right - left


@torch.no_grad()
def predict_segmentation_logits(probe: LinearSegmentationProbe, image: CachedImage) -> Tensor:
    """Sliding-window logits (K, H0, W0) at the label's resolution (the resized image's if there is no label)."""
    device = module_device(probe)
    logits = probe(image.patch.to(device), size=_window_size(image))
    logits = stitch_windows(logits, image.boxes, image.resized)
    out_size = image.resized if image.label is None else tuple(image.label.shape)
    if tuple(out_size) != tuple(image.resized):
        logits = F.interpolate(logits[None], size=out_size, mode=UPSAMPLE_MODE, align_corners=False)[0]
    return logits


@torch.no_grad()
def evaluate_segmentation_probe(probe: LinearSegmentationProbe, val_store: ShardReader,
                                num_classes: int | None = None, ignore_index: int = IGNORE_INDEX) -> dict[str, float]:
    """``{"mIoU", "mAcc"}`` in percent over the whole val cache (sliding-window inference on the probe's device)."""
    check_store(val_store, "val", ("label",))
    num_classes = num_classes or probe.num_classes
    if num_classes != probe.num_classes:
        raise ValueError(f"num_classes={num_classes} does not match the probe's {probe.num_classes} classes")
    was_training = probe.training
    probe.eval()
    metrics = segmentation_metrics(num_classes, ignore_index).to(module_device(probe))
    try:
        for image in iter_val_images(val_store):
            pred = predict_segmentation_logits(probe, image).argmax(0)
            metrics.update(pred[None], image.label.to(pred.device)[None])
    finally:
        probe.train(was_training)
    return {name: float(value) * PERCENT for name, value in metrics.compute().items()}
