"""Online probe training: frozen-backbone features recomputed for every batch under the official augmentation.

The official linear probes (PH-Reg release, ``DINOv2_full/evaluation``) never see the same input twice: every
iteration loads images, augments them and runs the frozen backbone again. :class:`OnlineBatchSource` does the same
as a :class:`~.cache.BatchSource`: it reads a batch of samples from the dataset (optionally in ``DataLoader``
workers), augments them with tensor operations on the backbone's device and runs the backbone under
``torch.no_grad`` in the evaluation precision (:func:`ph_reg.evaluation.features.backbone_features`). The val side
stays on the val feature cache (its features do not depend on augmentation).

Segmentation (:class:`SegmentationAugmentation`, the mmsegmentation 1.x pipeline of
``DINOv2_full/evaluation/segmentation/fine-tune/configs/{voc21,ade20k}_cfg.py``):

1. ``RandomResize(scale=(max_long_side, short_side), ratio_range, keep_ratio=True)``: a ratio ``r`` uniform in
   ``ratio_range``; the image is rescaled by ``min(int(L*r) / long, int(S*r) / short)`` (mmcv ``rescale_size``,
   sizes ``int(x * f + 0.5)``), bilinearly without antialiasing and rounded to integers (OpenCV ``INTER_LINEAR``
   on uint8), the label with nearest-neighbour (``INTER_NEAREST`` = torch ``"nearest"``);
2. ``RandomCrop(crop_size, cat_max_ratio)``: a uniform crop of ``min(crop, H) x min(crop, W)``; while the most
   frequent non-ignored class covers ``>= cat_max_ratio`` of the crop's non-ignored pixels, or fewer than two
   classes are present, a new crop is drawn, at most 10 times, and the 11th is kept unchecked (mmseg's rule);
3. ``RandomFlip(prob=flip_prob)`` (horizontal);
4. ``PhotoMetricDistortion`` (mmseg defaults): brightness ``+U(-32, 32)``; contrast ``x U(0.5, 1.5)`` first or
   last (a coin); saturation ``x U(0.5, 1.5)``; hue ``+ randint(-18, 18)`` in OpenCV half-degrees; each with
   probability 0.5, each clipped to [0, 255] and truncated to integers as mmseg's ``convert``. The HSV round trip
   is done in float (OpenCV's uint8 HSV also rounds H and V to integers: a difference of at most one grey level);
5. ``Pad(crop_size)``: bottom/right padding with image value 0 (before normalisation) and label 255 (ignored,
   but counted in the denominator of the all-pixel cross-entropy).

Depth (:class:`DepthAugmentation`, the DINOv2 depth toolbox config
``DINOv2_full/evaluation/depth/evaluation/configs/vitb_nyu_linear_config.py`` and the transforms of
``evaluation/depth/datasets/pipelines/transforms.py``):

1. ``NYUCrop``: rows 45:472, columns 43:608 of the 480x640 image and depth;
2. ``RandomRotate(prob=0.5, degree=2.5)``: a uniform angle, about the image centre ``((W-1)/2, (H-1)/2)``,
   bilinear for the image and nearest for the depth, border 0 (depth 0 = invalid);
3. ``RandomFlip(prob=0.5)``; 4. ``RandomCrop(416, 544)`` (uniform);
5. ``ColorAug(prob=0.5, gamma_range=[0.9, 1.1], brightness_range=[0.75, 1.25], color_range=[0.9, 1.1])``: on raw
   [0, 255] values ``clip(x ** gamma * brightness * colour_c, 0, 255)``, not re-quantised (as the toolbox);
6. normalisation, then ``CenterPadding`` of the normalised image to a multiple of the patch size (zeros), as the
   toolbox's backbone pre-hook. The depth target stays at the crop size.

Randomness: every draw comes from one CPU generator seeded from the ``gen`` that the probe passes to
:meth:`OnlineBatchSource.batches` (itself seeded from the probe seed), so a run is reproducible and the same on any
device; only the pixel operations run on the backbone's device. The draws follow each transform's distribution,
not mmseg's exact numpy call sequence (a candidate crop list of 11 is drawn up front, for example).
"""
# long: the two official augmentation recipes (mmseg and the depth toolbox) and the batch source that runs them

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ph_reg.evaluation.benchmarks.base import IGNORE_INDEX
from ph_reg.runtime import DEFAULT_PRECISION

from ph_reg.evaluation.features import backbone_features, forward_device
from ph_reg.evaluation.probes.cache import _in_eval_mode

PROBE_MODES = ("cached", "online")
BATCH_KEYS = ("patch", "cls", "label", "depth")

# mmseg RandomCrop: the crop is re-drawn at most this many times while cat_max_ratio fails (the next one is kept)
CAT_MAX_RETRIES = 10
LABEL_BINS = 256                     # class ids 0..254 and 255 = ignore (uint8 labels)
MAX_PIXEL = 255.0
IMAGE_PAD_VALUE = 0.0                # mmseg Pad(pad_val=0), before normalisation
# mmseg PhotoMetricDistortion defaults (the official configs use them unchanged)
BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18                       # OpenCV uint8 hue units (half degrees); randint(-18, 18) excludes 18
DEGREES_PER_HUE_UNIT = 2.0
APPLY_PROB = 0.5                     # every PhotoMetricDistortion step, and the contrast-first coin
# DINOv2 depth toolbox NYUCrop: image[45:472, 43:608]
NYU_CROP = (45, 472, 43, 608)        # top, bottom, left, right


def _pair(value: Any, name: str, cls: str, kind: type = float) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or any(isinstance(v, bool) for v in value):
        raise ValueError(f"{cls}.{name} must be a pair [low, high], got {value!r}")
    try:
        low, high = (kind(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{cls}.{name} must be a pair of numbers, got {value!r}") from None
    if low > high:
        raise ValueError(f"{cls}.{name} must have low <= high, got {value!r}")
    return low, high


def _probability(config: Any, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{type(config).__name__}.{name} must be a probability in [0, 1], got {value!r}")


def _from_dict(cls: type, data: Mapping[str, Any] | None, **fixed: Any):
    data = dict(data or {})
    known = {f.name for f in dataclasses.fields(cls)} - set(fixed)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown} in a probe benchmark's 'augment'; valid keys are "
                         f"{sorted(known)}")
    return cls(**data, **fixed)


@dataclass(frozen=True)
class SegmentationAugmentation:
    """mmseg training pipeline of the official segmentation probe (see the module doc). ``crop_size`` and
    ``short_side`` come from the benchmark (``crop_size``, ``short_side``), the rest from its ``augment`` mapping;
    the defaults are the official values."""

    crop_size: int
    short_side: int
    max_long_side: int = 2048
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        for key in ("crop_size", "short_side", "max_long_side"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}.{key} must be a positive integer, got {value!r}")
        object.__setattr__(self, "ratio_range", _pair(self.ratio_range, "ratio_range", name))
        if self.ratio_range[0] <= 0:
            raise ValueError(f"{name}.ratio_range must be positive, got {self.ratio_range}")
        ratio = self.cat_max_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"{name}.cat_max_ratio must be in (0, 1] (1 disables the check), got {ratio!r}")
        _probability(self, "flip_prob")
        if not isinstance(self.photometric, bool):
            raise ValueError(f"{name}.photometric must be true or false, got {self.photometric!r}")

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> SegmentationAugmentation:
        """From a probe benchmark spec: ``crop_size``, optional ``short_side`` and the ``augment`` mapping."""
        crop = spec["crop_size"]
        return _from_dict(cls, spec.get("augment"), crop_size=crop, short_side=spec.get("short_side") or crop)


@dataclass(frozen=True)
class DepthAugmentation:
    """DINOv2 depth toolbox training pipeline (see the module doc); the defaults are the official NYUv2 values."""

    crop_size: tuple[int, int] = (416, 544)
    nyu_crop: bool = True
    rotate_prob: float = 0.5
    rotate_degree: float = 2.5
    flip_prob: float = 0.5
    color_prob: float = 0.5
    gamma_range: tuple[float, float] = (0.9, 1.1)
    brightness_range: tuple[float, float] = (0.75, 1.25)
    color_range: tuple[float, float] = (0.9, 1.1)

    def __post_init__(self) -> None:
        name = type(self).__name__
        crop = _pair(self.crop_size, "crop_size", name, int)
        if min(crop) <= 0:
            raise ValueError(f"{name}.crop_size must be positive, got {self.crop_size!r}")
        object.__setattr__(self, "crop_size", crop)
        if not isinstance(self.nyu_crop, bool):
            raise ValueError(f"{name}.nyu_crop must be true or false, got {self.nyu_crop!r}")
        for key in ("rotate_prob", "flip_prob", "color_prob"):
            _probability(self, key)
        degree = self.rotate_degree
        if isinstance(degree, bool) or not isinstance(degree, (int, float)) or degree < 0:
            raise ValueError(f"{name}.rotate_degree must be a number >= 0, got {degree!r}")
        for key in ("gamma_range", "brightness_range", "color_range"):
            pair = _pair(getattr(self, key), key, name)
            if pair[0] <= 0:
                raise ValueError(f"{name}.{key} must be positive, got {pair}")
            object.__setattr__(self, key, pair)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> DepthAugmentation:
        """From a probe benchmark spec's ``augment`` mapping."""
        return _from_dict(cls, spec.get("augment"))


AUGMENTATIONS: dict[str, type] = {"segmentation": SegmentationAugmentation, "depth": DepthAugmentation}


def augmentation_for(task: str, spec: Mapping[str, Any]) -> SegmentationAugmentation | DepthAugmentation:
    """The online augmentation of a probe benchmark spec of ``task`` (its ``augment`` mapping)."""
    if task not in AUGMENTATIONS:
        raise ValueError(f"unknown probe task {task!r}; expected one of {sorted(AUGMENTATIONS)}")
    return AUGMENTATIONS[task].from_spec(spec)


def check_mode(mode: Any, key: str = "evaluation.probes.mode") -> str:
    """``mode`` if it is one of :data:`PROBE_MODES`, else a ValueError naming the config ``key``."""
    if mode not in PROBE_MODES:
        raise ValueError(f"{key} must be one of {list(PROBE_MODES)}, got {mode!r}")
    return mode


# --- random draws (CPU generator) -----------------------------------------------------------------------------
def _uniform(gen: torch.Generator, low: float, high: float, n: int = 1) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


def _coin(gen: torch.Generator, prob: float) -> bool:
    return bool(torch.rand(1, generator=gen, dtype=torch.float64) < prob)


def _randint(gen: torch.Generator, high: int, n: int = 1) -> list[int]:
    """``n`` integers uniform in [0, high)."""
    return torch.randint(0, high, (n,), generator=gen).tolist()


# --- geometry ---------------------------------------------------------------------------------------------------
def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``rescale_size`` (keep ratio): fit (H, W) into ``scale`` = (long, short) edges, sizes ``int(x*f + 0.5)``."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def random_resize_size(height: int, width: int, aug: SegmentationAugmentation, gen: torch.Generator
                       ) -> tuple[int, int]:
    """mmcv ``RandomResize(scale=(max_long_side, short_side), ratio_range, keep_ratio=True)``: the target size."""
    ratio = float(_uniform(gen, *aug.ratio_range))
    scale = (int(aug.max_long_side * ratio), int(aug.short_side * ratio))
    return rescale_size(height, width, scale)


def resize_pixels(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Float (3, H, W) in [0, 255] -> (3, *size) bilinear without antialiasing, rounded (OpenCV on uint8)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    return out.round().clamp(0, MAX_PIXEL)


def resize_nearest(target: Tensor, size: tuple[int, int]) -> Tensor:
    """(H, W) -> ``size`` with OpenCV's ``INTER_NEAREST`` (source index ``floor(i * in / out)``), dtype kept."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    return F.interpolate(target[None, None].float(), size=size, mode="nearest")[0, 0].to(target.dtype)


def choose_crop(label: Tensor, candidates: Sequence[tuple[int, int]], crop_hw: tuple[int, int],
                cat_max_ratio: float, ignore_index: int = IGNORE_INDEX) -> int:
    """Index of the crop mmseg's ``RandomCrop`` keeps among ``candidates`` (top, left) of size ``crop_hw``.

    Candidate ``i`` (``i < len - 1``) is kept if its non-ignored pixels hold at least two classes and the most
    frequent one covers less than ``cat_max_ratio`` of them; the first such candidate wins, and if none does,
    the last candidate is kept unchecked. ``cat_max_ratio >= 1`` keeps candidate 0. One device sync in all.
    """
    if cat_max_ratio >= 1 or len(candidates) == 1:
        return 0
    h, w = crop_hw
    checked = candidates[:-1]
    crops = torch.stack([label[t:t + h, l:l + w] for t, l in checked]).long().flatten(1)
    offsets = torch.arange(len(checked), device=label.device)[:, None] * LABEL_BINS
    counts = torch.bincount((crops + offsets).flatten(), minlength=len(checked) * LABEL_BINS)
    counts = counts.view(len(checked), LABEL_BINS)
    if 0 <= ignore_index < LABEL_BINS:
        counts[:, ignore_index] = 0
    total = counts.sum(1)
    present = (counts > 0).sum(1)
    ok = (present > 1) & (counts.max(1).values < cat_max_ratio * total)
    passing = ok.nonzero().flatten().tolist()
    return passing[0] if passing else len(candidates) - 1


def rotate(image: Tensor, degree: float, mode: str) -> Tensor:
    """mmcv ``imrotate`` (C, H, W) by ``degree`` about ((W-1)/2, (H-1)/2), border 0, same size; ``mode`` is the
    ``grid_sample`` interpolation (``bilinear`` for images, ``nearest`` for depth)."""
    _, height, width = image.shape
    angle = math.radians(-degree)  # mmcv passes -angle to cv2.getRotationMatrix2D
    cos, sin = math.cos(angle), math.sin(angle)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    ys, xs = torch.meshgrid(torch.arange(height, device=image.device, dtype=torch.float32),
                            torch.arange(width, device=image.device, dtype=torch.float32), indexing="ij")
    # cv2's forward map is dst - c = A (src - c), A = [[cos, sin], [-sin, cos]]; sample src = c + A^-1 (dst - c)
    src_x = cos * (xs - cx) - sin * (ys - cy) + cx
    src_y = sin * (xs - cx) + cos * (ys - cy) + cy
    grid = torch.stack([2 * src_x / max(width - 1, 1) - 1, 2 * src_y / max(height - 1, 1) - 1], dim=-1)
    out = F.grid_sample(image[None].float(), grid[None], mode=mode, padding_mode="zeros", align_corners=True)[0]
    return out.to(image.dtype)


# --- photometric distortion (batched) -------------------------------------------------------------------------
def rgb_to_hsv(rgb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, 3, H, W) in [0, 255] -> hue in degrees [0, 360), saturation in [0, 1], value in [0, 255]."""
    r, g, b = rgb.unbind(1)
    value, argmax = rgb.max(1)
    chroma = value - rgb.min(1).values
    safe = chroma.clamp_min(1e-12)
    hue = torch.where(argmax == 0, ((g - b) / safe) % 6,
                      torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-12), torch.zeros_like(value))
    return hue, saturation, value


def hsv_to_rgb(hue: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv`: (B, 3, H, W) in [0, 255]."""
    channels = []
    for n in (5, 3, 1):
        k = (n + hue / 60.0) % 6
        channels.append(value - value * saturation * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(channels, 1)


def _convert(images: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """mmseg ``convert``: ``uint8(clip(x * alpha + beta, 0, 255))`` (truncation), per image (B,) parameters."""
    return (images * alpha.view(-1, 1, 1, 1) + beta.view(-1, 1, 1, 1)).clamp(0, MAX_PIXEL).floor()


def photometric_distortion(images: Tensor, gen: torch.Generator) -> Tensor:
    """mmseg ``PhotoMetricDistortion`` (default ranges) on integer-valued float (B, 3, H, W) in [0, 255]."""
    n, device = images.shape[0], images.device

    def draw(low: float, high: float) -> Tensor:
        return _uniform(gen, low, high, n).float().to(device)

    def coins() -> Tensor:
        return (torch.rand(n, generator=gen, dtype=torch.float64) < APPLY_PROB).to(device).view(-1, 1, 1, 1)

    one, zero = torch.ones(n, device=device), torch.zeros(n, device=device)
    apply_b, beta = coins(), draw(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)
    contrast_first = coins()
    apply_c, alpha_c = coins(), draw(*CONTRAST_RANGE)
    apply_s, alpha_s = coins(), draw(*SATURATION_RANGE)
    apply_h = coins()
    shift = torch.randint(-HUE_DELTA, HUE_DELTA, (n,), generator=gen).float().to(device) * DEGREES_PER_HUE_UNIT

    x = torch.where(apply_b, _convert(images, one, beta), images)
    x = torch.where(apply_c & contrast_first, _convert(x, alpha_c, zero), x)
    hue, sat, val = rgb_to_hsv(x)
    sat_scaled = _convert((sat * MAX_PIXEL)[:, None], alpha_s, zero)[:, 0] / MAX_PIXEL
    x = torch.where(apply_s, hsv_to_rgb(hue, sat_scaled, val).round().clamp(0, MAX_PIXEL), x)
    hue, sat, val = rgb_to_hsv(x)
    x = torch.where(apply_h, hsv_to_rgb((hue + shift.view(-1, 1, 1)) % 360.0, sat, val).round().clamp(0, MAX_PIXEL),
                    x)
    return torch.where(apply_c & ~contrast_first, _convert(x, alpha_c, zero), x)


# --- the two pipelines ------------------------------------------------------------------------------------------
def augment_segmentation(samples: Sequence[Any], aug: SegmentationAugmentation, gen: torch.Generator,
                         device: torch.device, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Augmented float images (B, 3, S, S) in [0, 255] and int64 labels (B, S, S) on ``device`` (see module doc)."""
    size = aug.crop_size
    images = torch.full((len(samples), 3, size, size), IMAGE_PAD_VALUE, device=device)
    labels = torch.full((len(samples), size, size), ignore_index, dtype=torch.long, device=device)
    valid = torch.zeros((len(samples), 1, size, size), dtype=torch.bool, device=device)
    for i, sample in enumerate(samples):
        new_size = random_resize_size(*sample.image.shape[-2:], aug, gen)
        image = resize_pixels(sample.image.to(device).float(), new_size)
        label = resize_nearest(sample.label.to(device), new_size)
        crop_h, crop_w = min(size, new_size[0]), min(size, new_size[1])
        tops = _randint(gen, new_size[0] - crop_h + 1, CAT_MAX_RETRIES + 1)
        lefts = _randint(gen, new_size[1] - crop_w + 1, CAT_MAX_RETRIES + 1)
        candidates = list(zip(tops, lefts))
        top, left = candidates[choose_crop(label, candidates, (crop_h, crop_w), aug.cat_max_ratio, ignore_index)]
        image = image[:, top:top + crop_h, left:left + crop_w]
        label = label[top:top + crop_h, left:left + crop_w]
        if _coin(gen, aug.flip_prob):
            image, label = image.flip(-1), label.flip(-1)
        images[i, :, :crop_h, :crop_w] = image
        labels[i, :crop_h, :crop_w] = label.long()
        valid[i, :, :crop_h, :crop_w] = True
    if aug.photometric:
        images = torch.where(valid, photometric_distortion(images, gen), images)  # the padding stays 0
    return images, labels


def augment_depth(samples: Sequence[Any], aug: DepthAugmentation, gen: torch.Generator, device: torch.device
                  ) -> tuple[Tensor, Tensor]:
    """Augmented float images (B, 3, h, w) in [0, 255] and depth (B, h, w) on ``device`` (see module doc)."""
    crop_h, crop_w = aug.crop_size
    images, depths = [], []
    for sample in samples:
        image, depth = sample.image.to(device).float(), sample.depth.to(device).float()
        if aug.nyu_crop:
            top, bottom, left, right = NYU_CROP
            if image.shape[-2] < bottom or image.shape[-1] < right:
                raise ValueError(f"sample {sample.name!r}: augment.nyu_crop needs NYUv2's 480x640 images, got "
                                 f"{tuple(image.shape[-2:])}; set nyu_crop: false for other datasets")
            image, depth = image[:, top:bottom, left:right], depth[top:bottom, left:right]
        rotate_now, degree = _coin(gen, aug.rotate_prob), float(_uniform(gen, -aug.rotate_degree, aug.rotate_degree))
        if rotate_now:
            image = rotate(image, degree, "bilinear").round().clamp(0, MAX_PIXEL)
            depth = rotate(depth[None], degree, "nearest")[0]
        if _coin(gen, aug.flip_prob):
            image, depth = image.flip(-1), depth.flip(-1)
        height, width = image.shape[-2:]
        if height < crop_h or width < crop_w:
            raise ValueError(f"sample {sample.name!r}: image {height}x{width} (after nyu_crop) is smaller than "
                             f"augment.crop_size {crop_h}x{crop_w}")
        top, left = _randint(gen, height - crop_h + 1)[0], _randint(gen, width - crop_w + 1)[0]
        image, depth = image[:, top:top + crop_h, left:left + crop_w], depth[top:top + crop_h, left:left + crop_w]
        colour_now = _coin(gen, aug.color_prob)
        gamma, brightness = float(_uniform(gen, *aug.gamma_range)), float(_uniform(gen, *aug.brightness_range))
        colours = _uniform(gen, *aug.color_range, 3).float().to(device).view(3, 1, 1)
        if colour_now:
            image = (image.pow(gamma) * brightness * colours).clamp(0, MAX_PIXEL)
        images.append(image)
        depths.append(depth)
    return torch.stack(images), torch.stack(depths)


def _as_list(batch: list) -> list:
    return batch


class OnlineBatchSource:
    """:class:`~.cache.BatchSource` recomputing frozen-backbone features per batch under augmentation.

    ``model`` is the frozen backbone (a :class:`ph_reg.models.DenseViT`); it runs in eval mode on its own device, in
    ``precision`` (``evaluation.precision``). ``dataset`` yields :class:`ph_reg.evaluation.benchmarks.DenseSample`.
    ``augmentation`` is a :class:`SegmentationAugmentation` (batches carry ``label``) or a
    :class:`DepthAugmentation` (``depth``; the image is centre-padded to the patch size before the backbone).
    ``num_workers`` > 0 reads the samples in ``DataLoader`` workers (reading only: no randomness there).
    """

    def __init__(self, model: nn.Module, dataset: Sequence, augmentation: SegmentationAugmentation | DepthAugmentation,
                 *, precision: str = DEFAULT_PRECISION, num_workers: int = 0):
        if not isinstance(augmentation, (SegmentationAugmentation, DepthAugmentation)):
            raise ValueError(f"augmentation must be a SegmentationAugmentation or DepthAugmentation, got "
                             f"{type(augmentation).__name__}")
        if len(dataset) == 0:
            raise ValueError("the online probe's train dataset is empty")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if isinstance(augmentation, SegmentationAugmentation) and augmentation.crop_size % model.patch_size:
            raise ValueError(f"crop_size {augmentation.crop_size} must be a multiple of the model's patch size "
                             f"{model.patch_size}")
        self.model, self.dataset, self.augmentation = model, dataset, augmentation
        self.precision, self.num_workers = precision, num_workers
        self.embed_dim: int = int(model.embed_dim)
        self.attrs: dict[str, Any] = {
            "mode": "online", "augmentation": dataclasses.asdict(augmentation),
            "dataset": getattr(dataset, "name", None), "split": getattr(dataset, "split", None),
            "num_classes": getattr(dataset, "num_classes", None) or None,
        }

    @property
    def task(self) -> str:
        return "segmentation" if isinstance(self.augmentation, SegmentationAugmentation) else "depth"

    def _check_keys(self, keys: Sequence[str]) -> None:
        unknown = sorted(set(keys) - set(BATCH_KEYS))
        if unknown:
            raise ValueError(f"unknown batch keys {unknown}; an online source yields {list(BATCH_KEYS)}")
        target = "label" if self.task == "segmentation" else "depth"
        wrong = sorted(set(keys) & ({"label", "depth"} - {target}))
        if wrong:
            raise ValueError(f"a {self.task} online source yields {target!r}, not {wrong}")
        sample = self.dataset[0]
        if target in keys and getattr(sample, target) is None:
            raise ValueError(f"the online probe's train dataset {self.attrs['dataset']!r} has no {target} targets")

    def _sample_batches(self, batch_size: int, gen: torch.Generator) -> Iterator[list]:
        size = min(batch_size, len(self.dataset))
        while True:
            perm = torch.randperm(len(self.dataset), generator=gen).tolist()
            order = perm[:len(perm) - len(perm) % size]  # drop the incomplete last batch
            if self.num_workers == 0:
                for first in range(0, len(order), size):
                    yield [self.dataset[i] for i in order[first:first + size]]
            else:
                loader = DataLoader(self.dataset, batch_size=size, sampler=order, num_workers=self.num_workers,
                                    collate_fn=_as_list)
                yield from loader

    def batches(self, batch_size: int, gen: torch.Generator, keys: Sequence[str]) -> Iterator[dict[str, Tensor]]:
        """Endless augmented batches (see :class:`~.cache.BatchSource`); arguments are checked when called."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self._check_keys(keys)
        # one CPU generator for every augmentation draw, seeded from the probe's generator: reproducible anywhere
        aug_gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
        return _in_eval_mode(self.model, self._batches(batch_size, gen, aug_gen, tuple(keys)))

    def _batches(self, batch_size: int, gen: torch.Generator, aug_gen: torch.Generator, keys: tuple[str, ...]
                 ) -> Iterator[dict[str, Tensor]]:
        device = forward_device(self.model)
        for samples in self._sample_batches(batch_size, gen):
            if self.task == "segmentation":
                images, target = augment_segmentation(samples, self.augmentation, aug_gen, device)
                pad = False
            else:
                images, target = augment_depth(samples, self.augmentation, aug_gen, device)
                pad = True
            patch, cls = backbone_features(self.model, images, pad_to_patch=pad, precision=self.precision)
            batch = {"patch": patch, "cls": cls, "label" if self.task == "segmentation" else "depth": target}
            yield {key: batch[key] for key in keys}
