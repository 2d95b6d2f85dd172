"""Zero-shot open-vocabulary segmentation harness (SCLIP/NACLIP protocol, as used by PH-Reg).

Per image: resize (bilinear) keeping the aspect ratio so that the short side is ``short_side`` unless the long side
would exceed ``max_long_side`` (mmseg's ``Resize(scale=(max_long_side, short_side), keep_ratio=True)``), slide a
``crop`` window with ``stride``; each crop is an independent forward pass whose L2-normalised patch features give
cosine logits against the query embeddings; these are upsampled bilinearly (align_corners False) to the crop,
summed into a canvas and divided by the per-pixel window count; the canvas is resized bilinearly to the original
image size. Then ``P = softmax(logit_scale * cos)`` over all queries, each class takes the max over its synonyms,
``pred = argmax`` and pixels whose max probability is below ``prob_thd`` become class 0 (background). No PAMR.
Features are never upsampled, only logits.

A *dense function* maps normalised images (B, 3, H, W) to dense features (B, h, w, C). :func:`make_dense_fn` gives
one for every head in :data:`ZERO_SHOT_HEADS`: the backbone heads, plus ``maskclip_tta`` ("denoising only": the
value-only MaskCLIP head run through the n-view TTA of :mod:`ph_reg.method.tta` at inference), and the
test-time-register heads ``ttr`` / ``ttr_maskclip`` (:data:`TTR_HEADS`: the vanilla / MaskCLIP head of a model that
carries test-time registers, whose dense function is the model's own).

Precision: the harness runs a dense function as it is (fp32 unless the function itself autocasts);
:func:`precision_dense_fn` wraps one in the autocast context of an evaluation precision (``evaluation.precision``,
:func:`ph_reg.runtime.autocast`).
"""
# long: the SCLIP/NACLIP zero-shot protocol (config, dense functions, sliding-window inference, scoring) in one place

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassJaccardIndex

from ph_reg.data.transforms import DEFAULT_MAX_LONG_SIDE, resize_tensor_short_side
from ph_reg.evaluation.benchmarks.base import IGNORE_INDEX, DenseDataset
from ph_reg.method.tta import MAX_IMAGES_PER_FORWARD, TTAConfig, TTADenoiser
from ph_reg.models.backbone import DenseViT
from ph_reg.models.clip_heads import CLIP_HEADS
from ph_reg.evaluation.windows import sliding_windows
from ph_reg.runtime import autocast, check_precision, module_device, normalize

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "TTA_HEADS",
    "TTR_HEADS",
    "ZERO_SHOT_HEADS",
    "WindowBatcher",
    "ZeroShotPrediction",
    "ZeroShotConfig",
    "ZeroShotHead",
    "backbone_head",
    "classify",
    "evaluate_zero_shot",
    "evaluate_zero_shot_heads",
    "image_dense_features",
    "make_dense_fn",
    "model_dense_fn",
    "precision_dense_fn",
    "segment_image",
    "sliding_window_logits",
    "tta_dense_fn",
    "zero_shot_maps",
]

DenseFn = Callable[[Tensor], Tensor]

CLIP_MEAN: tuple[float, ...] = tuple(open_clip.OPENAI_DATASET_MEAN)  # (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, ...] = tuple(open_clip.OPENAI_DATASET_STD)  # (0.26862954, 0.26130258, 0.27577711)
DEFAULT_STRIDE = 112
DEFAULT_LOGIT_SCALE = 40.0
DEFAULT_BATCH_SIZE = 16  # crops per forward pass
DEFAULT_PATCH_SIZE = 16  # the ViT-B/16 patch size
# windows smaller than the crop (images smaller than the crop): "as_is" = forwarded at their own size, the pixels
# past a whole number of patches dropped by the stride-patch embedding (SCLIP/NACLIP/PH-Reg ``forward_slide``);
# "pad" = zero-padded (normalised space) up to a multiple of the patch size, centred, padding cut off the logits
SMALL_WINDOW_MODES: tuple[str, ...] = ("as_is", "pad")
DEFAULT_SMALL_WINDOW = "as_is"
BACKGROUND_CLASS = 0

# harness head -> backbone head run through the TTA denoiser at inference
TTA_HEADS: dict[str, str] = {"maskclip_tta": "maskclip"}
# harness head -> backbone head of the base model carrying test-time registers (ph_reg.models.test_time_registers,
# attached from the register_neurons artifact by ph_reg.evaluation.zeroshot.run.head_model)
TTR_HEADS: dict[str, str] = {"ttr": "vanilla", "ttr_maskclip": "maskclip"}
ZERO_SHOT_HEADS: tuple[str, ...] = ("vanilla", *CLIP_HEADS, *TTA_HEADS, *TTR_HEADS)


@dataclass(frozen=True)
class ZeroShotConfig:
    """Every setting of the harness.

    ``short_side`` None keeps the image size (and ignores ``max_long_side``). Otherwise the image is resized by
    ``min(short_side / short, max_long_side / long)`` (mmseg's keep-ratio rule; ``max_long_side`` None: no cap).
    ``batch_size`` is the number of crops per forward pass. ``patch_size`` is the model's patch size.
    ``small_window`` says what happens to a window whose side is not a multiple of ``patch_size`` (only when the
    image is smaller than ``crop``): ``"as_is"`` (the official SCLIP/NACLIP/PH-Reg behaviour) forwards it at its own
    size; the patch embedding (a stride-``patch_size`` convolution) drops the pixels past the last whole patch, and
    the logits of the remaining grid are upsampled to the whole window. ``"pad"`` (ClearCLIP-style) zero-pads it in
    normalised space up to a multiple of ``patch_size``, centred as in SCLIP, and cuts the padding off the upsampled
    logits.
    """

    short_side: int | None
    crop: int
    stride: int = DEFAULT_STRIDE
    logit_scale: float = DEFAULT_LOGIT_SCALE
    prob_thd: float = 0.0
    batch_size: int = DEFAULT_BATCH_SIZE
    patch_size: int = DEFAULT_PATCH_SIZE
    max_long_side: int | None = DEFAULT_MAX_LONG_SIDE
    small_window: str = DEFAULT_SMALL_WINDOW

    def __post_init__(self) -> None:
        for key in ("crop", "stride", "batch_size", "patch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ZeroShotConfig.{key} must be a positive int, got {value!r}")
        if self.short_side is not None and (not isinstance(self.short_side, int) or self.short_side < 1):
            raise ValueError(f"ZeroShotConfig.short_side must be a positive int or None, got {self.short_side!r}")
        if self.max_long_side is not None and (not isinstance(self.max_long_side, int)
                                               or isinstance(self.max_long_side, bool) or self.max_long_side < 1):
            raise ValueError(f"ZeroShotConfig.max_long_side must be a positive int or None, got "
                             f"{self.max_long_side!r}")
        if self.short_side is not None and self.max_long_side is not None and self.max_long_side < self.short_side:
            raise ValueError(f"ZeroShotConfig.max_long_side ({self.max_long_side}) must be at least short_side "
                             f"({self.short_side})")
        if self.small_window not in SMALL_WINDOW_MODES:
            raise ValueError(f"ZeroShotConfig.small_window must be one of {list(SMALL_WINDOW_MODES)}, got "
                             f"{self.small_window!r}")
        if self.stride > self.crop:
            raise ValueError(f"ZeroShotConfig.stride ({self.stride}) must not exceed crop ({self.crop})")
        if not self.logit_scale > 0:
            raise ValueError(f"ZeroShotConfig.logit_scale must be positive, got {self.logit_scale!r}")
        if not 0.0 <= self.prob_thd <= 1.0:
            raise ValueError(f"ZeroShotConfig.prob_thd must be in [0, 1], got {self.prob_thd!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ZeroShotPrediction(NamedTuple):
    pred: Tensor  # (H, W) int64 class ids at the original image size
    class_probs: Tensor  # (num_classes, H, W) float32: max over each class's query probabilities
    logits: Tensor  # (Q, H, W) float32 cosine logits (window-averaged, resized to the original size)


# ---------------------------------------------------------------- dense functions per head


def backbone_head(head: str) -> str:
    """The ``BackboneConfig.head`` that a zero-shot head needs (``maskclip_tta`` -> ``maskclip``, ``ttr`` ->
    ``vanilla``, ``ttr_maskclip`` -> ``maskclip``)."""
    if head not in ZERO_SHOT_HEADS:
        raise ValueError(f"head must be one of {ZERO_SHOT_HEADS}, got {head!r}")
    return {**TTA_HEADS, **TTR_HEADS}.get(head, head)


def model_dense_fn(model: DenseViT) -> DenseFn:
    """Images -> ``model(images).patch``; inputs are moved to the model's device, outputs back to the input's."""
    def dense_fn(images: Tensor) -> Tensor:
        return model(images.to(module_device(model))).patch.to(images.device)
    return dense_fn


def tta_dense_fn(model: DenseViT, tta: TTAConfig, seed: int = 0,
                 max_images_per_forward: int = MAX_IMAGES_PER_FORWARD) -> DenseFn:
    """Images -> the model's dense features averaged over the ``tta.n_views`` shifted/flipped views of ``tta``
    (TTADenoiser; the evaluation passes ``teacher_denoising.tta`` with ``evaluation.zero_shot.tta_views`` views).

    Every crop draws its views from a generator seeded with ``seed`` afresh, so every crop of every batch uses the
    same views and the result does not depend on batching or call order. ``n_views=1`` is the identity view only
    (= the model).
    """
    denoiser = TTADenoiser(model_dense_fn(model), model.patch_size, model.fill_value(), tta, max_images_per_forward)

    def dense_fn(images: Tensor) -> Tensor:
        return denoiser(images, [torch.Generator().manual_seed(seed) for _ in range(images.shape[0])])
    return dense_fn


def make_dense_fn(model: DenseViT, head: str, tta: TTAConfig | None = None, seed: int = 0) -> DenseFn:
    """The dense function of a zero-shot head; ``model`` must have been built with ``backbone_head(head)``.
    ``tta`` (required by the TTA heads: ``teacher_denoising.tta``) and ``seed`` only matter for the TTA heads. Put
    the model in eval mode yourself."""
    expected = backbone_head(head)
    if model.head != expected:
        raise ValueError(f"zero-shot head {head!r} needs a backbone built with head={expected!r}, "
                         f"got a backbone with head={model.head!r}")
    if head in TTA_HEADS:
        if tta is None:
            raise ValueError(f"zero-shot head {head!r} needs the TTA settings (a TTAConfig: teacher_denoising.tta)")
        return tta_dense_fn(model, tta, seed=seed)
    return model_dense_fn(model)


# ---------------------------------------------------------------- sliding window


def _centred_padding(height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding up to a multiple, split as in SCLIP (the extra pixel at the end)."""
    pad_h, pad_w = -height % multiple, -width % multiple
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


def _whole_patches(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """(H', W') covered by whole patches: what a stride-``patch_size`` patch embedding reads of an H x W input."""
    kept = (height // patch_size * patch_size, width // patch_size * patch_size)
    if not all(kept):
        raise ValueError(f"a {height}x{width} window holds no whole {patch_size}x{patch_size} patch")
    return kept


def _check_small_window(small_window: str) -> None:
    if small_window not in SMALL_WINDOW_MODES:
        raise ValueError(f"small_window must be one of {list(SMALL_WINDOW_MODES)}, got {small_window!r}")


def precision_dense_fn(dense_fn: DenseFn, precision: str) -> DenseFn:
    """``dense_fn`` run inside :func:`ph_reg.runtime.autocast` of ``precision`` (``fp32``, ``bf16``, ``fp16``
    or ``auto``; see :data:`ph_reg.runtime.PRECISIONS`) on the device of its input images."""
    check_precision(precision, "precision")

    def wrapped(images: Tensor) -> Tensor:
        with autocast(images.device, precision):
            return dense_fn(images)
    return wrapped


def _dense_forward(dense_fn: DenseFn, images: Tensor) -> Tensor:
    features = dense_fn(images)
    if not isinstance(features, Tensor) or features.ndim != 4 or features.shape[0] != images.shape[0]:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"dense_fn must return (B, h, w, C) features for B = {images.shape[0]} images, got {shape}")
    return features


@torch.no_grad()
def sliding_window_logits(
        dense_fn: DenseFn,
        image: Tensor,
        text_emb: Tensor,
        crop: int,
        stride: int = DEFAULT_STRIDE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        patch_size: int = DEFAULT_PATCH_SIZE,
        small_window: str = DEFAULT_SMALL_WINDOW,
) -> Tensor:
    """Window-averaged cosine logits (Q, H, W), float32, of one normalised image (1, 3, H, W) or (3, H, W).

    Each crop's L2-normalised features are dotted with the L2-normalised ``text_emb`` (Q, D); the (Q, h, w) logits
    are upsampled bilinearly (align_corners False) to the crop size, summed into a canvas and divided by the
    per-pixel window count. Crops are batched ``batch_size`` at a time. A window whose side is not a multiple of
    ``patch_size`` is handled by ``small_window`` (see :class:`ZeroShotConfig`): ``"as_is"`` forwards the part
    covered by whole patches (what a stride-``patch_size`` patch embedding reads) and upsamples its logits to the
    whole window; ``"pad"`` zero-pads it to a multiple and cuts the padding off the upsampled logits. Several
    images: :class:`WindowBatcher` (this is its one-image case).
    """
    batcher = WindowBatcher(dense_fn, text_emb, crop, stride, batch_size, patch_size, small_window)
    finished = batcher.add(None, image) + batcher.finish()
    return finished[0][1]


class _WindowPlan(NamedTuple):
    """The windows of one image: boxes (y0, y1, x0, x1), the part of a window the model reads (read_h, read_w),
    its zero padding (left, right, top, bottom) and the window size (crop_h, crop_w), the same for every window."""

    boxes: list[tuple[int, int, int, int]]
    read: tuple[int, int]
    pad: tuple[int, int, int, int]
    window: tuple[int, int]


def _window_plan(height: int, width: int, crop: int, stride: int, patch_size: int, small_window: str) -> _WindowPlan:
    rows, cols = sliding_windows(height, crop, stride), sliding_windows(width, crop, stride)
    crop_h, crop_w = rows[0][1] - rows[0][0], cols[0][1] - cols[0][0]  # every window of an axis has this length
    if small_window == "pad":
        return _WindowPlan([(y0, y1, x0, x1) for y0, y1 in rows for x0, x1 in cols], (crop_h, crop_w),
                           _centred_padding(crop_h, crop_w, patch_size), (crop_h, crop_w))
    # "as_is": the patch embedding reads whole patches only; the logits cover the whole window
    return _WindowPlan([(y0, y1, x0, x1) for y0, y1 in rows for x0, x1 in cols],
                       _whole_patches(crop_h, crop_w, patch_size), (0, 0, 0, 0), (crop_h, crop_w))


class _Canvas:
    """One image in a :class:`WindowBatcher`: its logit canvas, window count and windows still to run."""

    def __init__(self, key: Any, image: Tensor, plan: _WindowPlan, queries: int):
        self.key, self.image, self.plan, self.remaining = key, image, plan, len(plan.boxes)
        self.canvas = image.new_zeros((queries, *image.shape[-2:]), dtype=torch.float32)
        self.count = image.new_zeros((1, *image.shape[-2:]), dtype=torch.float32)


class WindowBatcher:
    """:func:`sliding_window_logits` of a stream of images, the windows of consecutive images run together: a
    forward takes the next ``batch_size`` windows, across images, as long as they have the same size (all windows
    of an image have one size; images of another size start a new batch). ``add(key, image)`` and ``finish()``
    return ``(key, logits)`` of the images whose windows are all done, in the order they were added;
    ``forwards`` counts the calls of ``dense_fn``. Each image's logits are summed window by window in the same
    order as alone; only the batch a window shares differs."""

    def __init__(self, dense_fn: DenseFn, text_emb: Tensor, crop: int, stride: int = DEFAULT_STRIDE,
                 batch_size: int = DEFAULT_BATCH_SIZE, patch_size: int = DEFAULT_PATCH_SIZE,
                 small_window: str = DEFAULT_SMALL_WINDOW):
        _check_small_window(small_window)
        if text_emb.ndim != 2:
            raise ValueError(f"text_emb must be (Q, D), got shape {tuple(text_emb.shape)}")
        self.dense_fn, self.text_emb = dense_fn, text_emb
        self.crop, self.stride, self.batch_size, self.patch_size = crop, stride, batch_size, patch_size
        self.small_window = small_window
        self.forwards = 0
        self._texts: dict[torch.device, Tensor] = {}  # the normalised queries on each image device
        self._images: list[_Canvas] = []  # added, not yet returned
        self._pending: list[tuple[_Canvas, tuple[int, int, int, int]]] = []  # windows not yet run

    @classmethod
    def of(cls, dense_fn: DenseFn, text_emb: Tensor, settings: ZeroShotConfig) -> WindowBatcher:
        """The batcher of the harness settings."""
        return cls(dense_fn, text_emb, settings.crop, settings.stride, settings.batch_size, settings.patch_size,
                   settings.small_window)

    def add(self, key: Any, image: Tensor) -> list[tuple[Any, Tensor]]:
        """Queue the windows of a normalised image (1, 3, H, W) or (3, H, W); run every full batch."""
        if image.ndim == 3:
            image = image.unsqueeze(0)
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"image must be (3, H, W) or (1, 3, H, W), got shape {tuple(image.shape)}")
        plan = _window_plan(image.shape[-2], image.shape[-1], self.crop, self.stride, self.patch_size,
                            self.small_window)
        entry = _Canvas(key, image, plan, self.text_emb.shape[0])
        self._images.append(entry)
        if self._pending and self._pending[0][0].plan[1:] != plan[1:]:
            self._run()
        for box in plan.boxes:
            self._pending.append((entry, box))
            if len(self._pending) == self.batch_size:
                self._run()
        return self._finished()

    def finish(self) -> list[tuple[Any, Tensor]]:
        """Run the windows left; return the remaining images."""
        if self._pending:
            self._run()
        return self._finished()

    def _finished(self) -> list[tuple[Any, Tensor]]:
        done = []
        while self._images and self._images[0].remaining == 0:
            entry = self._images.pop(0)
            done.append((entry.key, entry.canvas / entry.count))
        return done

    def _text(self, device: torch.device) -> Tensor:
        if device not in self._texts:
            self._texts[device] = F.normalize(self.text_emb.to(device, torch.float32), dim=-1)
        return self._texts[device]

    def _run(self) -> None:
        """One forward of the pending windows (one size); their logits go into their images' canvases."""
        chunk, self._pending = self._pending, []
        first = chunk[0][0]
        (read_h, read_w), (left, right, top, bottom), (crop_h, crop_w) = first.plan[1:]
        device = first.image.device
        crops = torch.stack([entry.image[0, :, y0:y0 + read_h, x0:x0 + read_w].to(device)
                             for entry, (y0, _, x0, _) in chunk])
        if left or right or top or bottom:
            crops = F.pad(crops, (left, right, top, bottom))
        features = _dense_forward(self.dense_fn, crops).to(device, torch.float32)
        self.forwards += 1
        text = self._text(device)
        if features.shape[-1] != text.shape[1]:
            raise ValueError(f"feature dim {features.shape[-1]} does not match text_emb dim {text.shape[1]}")
        logits = (F.normalize(features, dim=-1) @ text.T).permute(0, 3, 1, 2)  # (b, Q, h, w)
        # upsampled to the (padded) window: with "as_is" the whole window, dropped remainder included
        logits = F.interpolate(logits, size=(top + crop_h + bottom, left + crop_w + right), mode="bilinear",
                               align_corners=False)
        logits = logits[:, :, top:top + crop_h, left:left + crop_w]
        for (entry, (y0, y1, x0, x1)), crop_logits in zip(chunk, logits):
            entry.canvas[:, y0:y1, x0:x1] += crop_logits.to(entry.canvas.device)
            entry.count[:, y0:y1, x0:x1] += 1
            entry.remaining -= 1


# ---------------------------------------------------------------- decision


def _query_index(query_to_class: Sequence[int] | Tensor, num_queries: int, num_classes: int,
                 device: torch.device) -> Tensor:
    index = torch.as_tensor(query_to_class, dtype=torch.int64, device=device).reshape(-1)
    if index.numel() != num_queries:
        raise ValueError(f"query_to_class must have one entry per query ({num_queries}), got {index.numel()}")
    if index.numel() and (index.min() < 0 or index.max() >= num_classes):
        raise ValueError(f"query_to_class values must be in [0, {num_classes}), got {index.min()}..{index.max()}")
    missing = sorted(set(range(num_classes)) - set(index.tolist()))
    if missing:
        raise ValueError(f"every class needs at least one query; classes {missing} have none in query_to_class")
    return index


def classify(
        logits: Tensor,
        query_to_class: Sequence[int] | Tensor,
        num_classes: int,
        logit_scale: float = DEFAULT_LOGIT_SCALE,
        prob_thd: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Cosine logits (Q, ...) -> (pred (...) int64, class_probs (num_classes, ...)).

    ``P = softmax(logit_scale * logits)`` over all queries; a class's probability is the max over its queries;
    ``pred = argmax``; where the max class probability is below ``prob_thd``, ``pred = 0`` (background).
    """
    index = _query_index(query_to_class, logits.shape[0], num_classes, logits.device)
    probs = torch.softmax(logit_scale * logits.float(), dim=0)
    owners = index.tolist()
    first = [owners.index(c) for c in range(num_classes)]  # each class's first query
    class_probs = probs[first].clone()
    for query, owner in enumerate(owners):
        if query != first[owner]:  # further synonyms: keep the max
            torch.maximum(class_probs[owner], probs[query], out=class_probs[owner])
    best, pred = class_probs.max(dim=0)
    pred = torch.where(best < prob_thd, torch.full_like(pred, BACKGROUND_CLASS), pred)
    return pred, class_probs


# ---------------------------------------------------------------- whole images and datasets


def _check_uint8_image(image: Tensor) -> None:
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a (3, H, W) RGB tensor, got {shape}")


def _prepare(image: Tensor, settings: ZeroShotConfig, mean: Sequence[float], std: Sequence[float],
             device: torch.device) -> Tensor:
    """uint8 (or [0, 1] float) (3, H, W) -> resized, normalised (1, 3, H', W') float32 on ``device``."""
    _check_uint8_image(image)
    x = image.to(device)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    x = resize_tensor_short_side(x.unsqueeze(0), settings.short_side, settings.max_long_side)
    return normalize(x, tuple(mean), tuple(std))


@torch.no_grad()
def segment_image(
        dense_fn: DenseFn,
        image: Tensor,
        text_emb: Tensor,
        query_to_class: Sequence[int] | Tensor,
        num_classes: int,
        settings: ZeroShotConfig,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
) -> ZeroShotPrediction:
    """Zero-shot segmentation of one uint8 RGB image (3, H, W) at its original size; runs on ``text_emb``'s
    device, ``dense_fn`` as it is (wrap it with :func:`precision_dense_fn` for autocast)."""
    batcher = WindowBatcher.of(dense_fn, text_emb, settings)
    finished = batcher.add(None, _prepare(image, settings, mean, std, text_emb.device)) + batcher.finish()
    return _prediction(finished[0][1], image, query_to_class, num_classes, settings)


def _prediction(logits: Tensor, image: Tensor, query_to_class: Sequence[int] | Tensor, num_classes: int,
                settings: ZeroShotConfig) -> ZeroShotPrediction:
    """The prediction of an image from its window-averaged logits (resized back to the image's size first)."""
    height, width = image.shape[-2:]
    if logits.shape[-2:] != (height, width):
        logits = F.interpolate(logits.unsqueeze(0), size=(height, width), mode="bilinear",
                               align_corners=False).squeeze(0)
    pred, class_probs = classify(logits, query_to_class, num_classes, settings.logit_scale, settings.prob_thd)
    return ZeroShotPrediction(pred=pred, class_probs=class_probs, logits=logits)


@torch.no_grad()
def image_dense_features(
        dense_fn: DenseFn,
        image: Tensor,
        settings: ZeroShotConfig,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        device: torch.device | str = "cpu",
) -> Tensor:
    """Dense features (h, w, C) of the whole resized image in one forward, for feature figures; a side that is not a
    multiple of ``settings.patch_size`` is cut to whole patches (``small_window="as_is"``) or zero-padded, centred
    (``"pad"``)."""
    x = _prepare(image, settings, mean, std, torch.device(device))
    if settings.small_window == "pad":
        left, right, top, bottom = _centred_padding(*x.shape[-2:], settings.patch_size)
        x = F.pad(x, (left, right, top, bottom))
    else:
        read_h, read_w = _whole_patches(*x.shape[-2:], settings.patch_size)
        x = x[..., :read_h, :read_w]
    return _dense_forward(dense_fn, x)[0].float()


class ZeroShotHead(NamedTuple):
    """What the harness needs of one head: its dense function and its model's input normalisation."""

    dense_fn: DenseFn
    mean: Sequence[float] = CLIP_MEAN
    std: Sequence[float] = CLIP_STD


def evaluate_zero_shot(
        dense_fn: DenseFn,
        text_emb: Tensor,
        query_to_class: Sequence[int] | Tensor,
        num_classes: int,
        dataset: DenseDataset | Sequence,
        settings: ZeroShotConfig,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        max_samples: int | None = None,
) -> dict[str, float]:
    """mIoU (%) of zero-shot segmentation over a dataset of ``DenseSample`` (labels at the original image size,
    ``ignore_index`` ignored), with torchmetrics ``MulticlassJaccardIndex`` (macro; classes absent from both the
    predictions and the labels are left out). ``max_samples`` evaluates only the first samples.
    Returns ``{"mIoU": float, "num_images": int}``."""
    scores, _ = evaluate_zero_shot_heads({"": ZeroShotHead(dense_fn, mean, std)}, text_emb, query_to_class,
                                         num_classes, dataset, settings, max_samples)
    return scores[""]


def evaluate_zero_shot_heads(
        heads: Mapping[str, ZeroShotHead],
        text_emb: Tensor,
        query_to_class: Sequence[int] | Tensor,
        num_classes: int,
        dataset: DenseDataset | Sequence,
        settings: ZeroShotConfig,
        max_samples: int | None = None,
        keep: int = 0,
) -> tuple[dict[str, dict[str, float]], list[tuple[Any, dict[str, ZeroShotPrediction]]]]:
    """:func:`evaluate_zero_shot` of several heads on one dataset, each sample read (decoded, rendered) once for all
    of them: ``({head: {"mIoU", "num_images"}}, kept)``; ``kept`` holds the first ``keep`` samples with every head's
    :class:`ZeroShotPrediction` (for the figures, :func:`zero_shot_maps`). Each head's numbers equal its own
    :func:`evaluate_zero_shot`. Each head's windows of consecutive images share forwards (:class:`WindowBatcher`:
    up to ``settings.batch_size`` windows each), so a few images are held until their last window has run."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    dataset_classes = len(getattr(dataset, "class_names", []) or [])
    if dataset_classes and dataset_classes != num_classes:
        raise ValueError(f"num_classes ({num_classes}) does not match the dataset's {dataset_classes} class_names")
    total = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    if total < 1:
        raise ValueError("the dataset is empty (or max_samples < 1): nothing to evaluate")
    ignore_index = getattr(dataset, "ignore_index", IGNORE_INDEX)
    device = text_emb.device
    metrics = {name: MulticlassJaccardIndex(num_classes, ignore_index=ignore_index, average="macro").to(device)
               for name in heads}
    batchers = {name: WindowBatcher.of(head.dense_fn, text_emb, settings) for name, head in heads.items()}
    samples: dict[int, Any] = {}  # read, not yet scored by every head
    done: dict[int, dict[str, ZeroShotPrediction]] = {}
    kept = []

    def score(name: str, finished: list[tuple[Any, Tensor]]) -> None:
        for index, logits in finished:
            sample = samples[index]
            prediction = _prediction(logits, sample.image, query_to_class, num_classes, settings)
            if prediction.pred.shape != sample.label.shape:
                raise ValueError(f"sample {sample.name}: label shape {tuple(sample.label.shape)} does not match the "
                                 f"image size {tuple(prediction.pred.shape)}")
            metrics[name].update(prediction.pred.unsqueeze(0), sample.label.to(device).unsqueeze(0))
            done.setdefault(index, {})[name] = prediction
            if len(done[index]) == len(heads):  # samples complete in order: each batcher returns them in order
                if index < keep:
                    kept.append((sample, {head: done[index][head] for head in heads}))
                del samples[index], done[index]

    for index in range(total):
        sample = dataset[index]
        if sample.label is None:
            raise ValueError(f"sample {index} ({sample.name}) has no segmentation label")
        samples[index] = sample
        for name, head in heads.items():  # windows of consecutive images share forwards (WindowBatcher)
            score(name, batchers[name].add(index, _prepare(sample.image, settings, head.mean, head.std, device)))
    for name, batcher in batchers.items():
        score(name, batcher.finish())
    return {name: {"mIoU": 100.0 * float(metric.compute()), "num_images": total}
            for name, metric in metrics.items()}, kept


def zero_shot_maps(
        dense_fn: DenseFn,
        image: Tensor,
        text_emb: Tensor,
        query_to_class: Sequence[int] | Tensor,
        num_classes: int,
        settings: ZeroShotConfig,
        query: int,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        prediction: ZeroShotPrediction | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(pred (H, W), heatmap (H, W), features (h, w, C)) of one image for :func:`.report.zero_shot_figure`; the
    heatmap is query ``query``'s probability ``softmax(logit_scale * cos)``. Results are on the CPU.
    ``prediction``: this image's :func:`segment_image` result with the same arguments, if already computed (by
    :func:`evaluate_zero_shot_heads`), used instead of segmenting again."""
    if not 0 <= query < text_emb.shape[0]:
        raise ValueError(f"query must index one of the {text_emb.shape[0]} queries, got {query}")
    out = prediction if prediction is not None else segment_image(dense_fn, image, text_emb, query_to_class,
                                                                  num_classes, settings, mean, std)
    heatmap = torch.softmax(settings.logit_scale * out.logits, dim=0)[query]
    features = image_dense_features(dense_fn, image, settings, mean, std, device=text_emb.device)
    return out.pred.cpu(), heatmap.cpu(), features.cpu()
