"""Frozen-feature cache for the linear probes.

The backbone runs once per image (``torch.no_grad``, at the evaluation precision ``precision``: fp32, bf16, fp16
or auto = bf16 on CUDA / fp32 on the CPU); its patch tokens and CLS token
are stored in a shard store (:mod:`ph_reg.io.shards`) and the probes train and evaluate from the store alone.

Two kinds of store, chosen by ``split_kind``:

``"train"`` -- one record per image. The image is resized (bilinear, antialiased) so its short side is
    ``short_side`` (default ``crop_size``), the label (nearest) and depth (nearest) with it; one square
    ``crop_size`` crop is taken, at a seeded uniformly random position (``train_crop="random"``, the position
    depends only on ``seed`` and the image index) or in the centre (``"center"``). Keys:
    ``patch`` (h, w, C), ``cls`` (C), ``box`` int64 (4,) = (top, left, bottom, right) in the resized image,
    ``label`` uint8 (crop, crop) if the dataset has labels, ``depth`` float32 (crop, crop) if it has depth.

``"val"`` -- one record per image. The image is resized to short side ``short_side`` and cut into sliding
    windows (``crop_size``, ``stride``; the last window of a row/column is shifted back inside the image, as in
    mmsegmentation, so the windows cover every pixel). Keys: ``patch`` (N, h, w, C), ``cls`` (N, C),
    ``boxes`` int64 (N, 4), ``label`` uint8 / ``depth`` float32 at the dataset's original resolution (H0, W0),
    and with ``flip=True`` also ``patch_flip`` / ``cls_flip``: the features of each horizontally flipped window
    (its prediction must be flipped back before use). Meta: ``name``, ``index``, ``resized`` = [H, W].
    With ``stride=None`` the val store holds **whole images** (the depth toolbox's ``test_cfg=dict(mode="whole")``):
    the image at its original size (or resized to ``short_side`` when given), normalised, centre-padded with zeros to
    a multiple of the patch size (:func:`ph_reg.evaluation.features.center_pad`, the toolbox's ``CenterPadding``:
    480x640 -> 490x644 at patch 14) and run once (and once flipped with ``flip=True``); ``patch`` (1, h, w, C) covers the padded image and
    ``boxes`` = [[0, 0, H, W]], so a prediction resized to the box maps the padded grid onto the image as a whole,
    as the toolbox does. ``crop_size`` then only has to be a valid crop size of the model.

Augmentation: the cache allows none beyond the fixed crop (the fast path, ``evaluation.probes.mode: cached``); the
official recipe's augmentation needs the backbone run again for every batch, which :mod:`.online` does
(``mode: online``). The features of a flipped, rescaled or recoloured
image are not a transform of the cached features (the backbone is not equivariant), so a cached run applies no
augmentation during probe training. Flipping cached feature maps would be possible, but a linear per-location head
commutes with the flip, so "flip TTA" by flipping features would be a no-op; the depth flip-TTA therefore uses
the real features of the flipped windows, computed by the backbone when the val cache is built with
``flip=True``.

Labels are stored as uint8 (class ids 0..254, 255 = ignore) and returned as int64 by the readers.
"""
# long: one store format end to end (crop geometry, the three record writers, the readers) kept in one place

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ph_reg.io.shards import RecordStream, ShardReader
from ph_reg.evaluation.features import backbone_features
from ph_reg.evaluation.windows import window_boxes
from ph_reg.runtime import DEFAULT_PRECISION, DTYPES, check_precision, generator

SPLIT_KINDS = ("train", "val")
#: The ``feature_dtype`` names a probe store accepts (dtypes: :data:`ph_reg.runtime.DTYPES`).
FEATURE_DTYPES = ("float16", "float32")
TRAIN_CROPS = ("random", "center")
RECORDS_PER_SHARD = 64
LABEL_STORAGE_DTYPE = torch.uint8
MAX_STORED_LABEL = 255
IMAGE_INTERPOLATION = "bilinear"
DENSE_INTERPOLATION = "nearest-exact"


# --- geometry -------------------------------------------------------------------------------------------------
def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(H, W) after resizing so the short side is ``short_side``, keeping the aspect ratio (rounded)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = short_side / min(height, width)
    return max(short_side, round(height * scale)), max(short_side, round(width * scale))


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 or float (3, H, W) -> float32 (3, *size) in the same value range (bilinear, antialiased)."""
    x = image.float()
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode=IMAGE_INTERPOLATION, antialias=True, align_corners=False)[0]


def resize_dense(target: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a label or depth map (H, W) with nearest-neighbour sampling, keeping its dtype."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    out = F.interpolate(target[None, None].float(), size=size, mode=DENSE_INTERPOLATION)[0, 0]
    return out.to(target.dtype)


def crop_box(height: int, width: int, crop_size: int, mode: str, gen: torch.Generator | None = None
             ) -> tuple[int, int, int, int]:
    """One square crop (top, left, bottom, right): uniformly random (``"random"``, needs ``gen``) or centred."""
    if mode == "random":
        top = int(torch.randint(0, height - crop_size + 1, (1,), generator=gen))
        left = int(torch.randint(0, width - crop_size + 1, (1,), generator=gen))
    elif mode == "center":
        top, left = (height - crop_size) // 2, (width - crop_size) // 2
    else:
        raise ValueError(f"train_crop must be one of {TRAIN_CROPS}, got {mode!r}")
    return top, left, top + crop_size, left + crop_size


# --- writing --------------------------------------------------------------------------------------------------
def _stored_label(label: Tensor, name: str) -> Tensor:
    if label.ndim != 2:
        raise ValueError(f"sample {name!r}: label must be (H, W), got shape {tuple(label.shape)}")
    if label.numel() and (int(label.min()) < 0 or int(label.max()) > MAX_STORED_LABEL):
        raise ValueError(f"sample {name!r}: label values must be class ids in [0, {MAX_STORED_LABEL}] "
                         f"({MAX_STORED_LABEL} = ignore), got range [{int(label.min())}, {int(label.max())}]")
    return label.to(LABEL_STORAGE_DTYPE)


def _check_sample(sample: Any, index: int, has_label: bool | None, has_depth: bool | None) -> tuple[bool, bool]:
    image = sample.image
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"sample {sample.name!r}: image must be (3, H, W), got shape {tuple(image.shape)}")
    label, depth = sample.label is not None, sample.depth is not None
    if has_label is not None and (label, depth) != (has_label, has_depth):
        raise ValueError(f"sample {index} ({sample.name!r}) has label={label}, depth={depth}, unlike the first "
                         f"sample (label={has_label}, depth={has_depth}); every sample must have the same targets")
    for key, target in (("label", sample.label), ("depth", sample.depth)):
        if target is not None and tuple(target.shape) != tuple(image.shape[-2:]):
            raise ValueError(f"sample {sample.name!r}: {key} shape {tuple(target.shape)} does not match the image "
                             f"size {tuple(image.shape[-2:])}")
    return label, depth


def _check_args(model: nn.Module, crop_size: int, stride: int | None, split_kind: str, batch_size: int,
                short_side: int, feature_dtype: str, train_crop: str) -> None:
    if split_kind not in SPLIT_KINDS:
        raise ValueError(f"split_kind must be one of {SPLIT_KINDS}, got {split_kind!r}")
    patch = getattr(model, "patch_size", None)
    if not isinstance(crop_size, int) or crop_size <= 0 or patch is None or crop_size % patch:
        raise ValueError(f"crop_size must be a positive multiple of the model's patch size {patch}, got {crop_size}")
    if split_kind == "val" and stride is not None and not 0 < stride <= crop_size:
        raise ValueError(f"stride must be in (0, crop_size={crop_size}] for split_kind='val' (or None: the whole "
                         f"image), got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if short_side is not None and not whole_image_mode(split_kind, stride) and short_side < crop_size:
        raise ValueError(f"short_side ({short_side}) must be >= crop_size ({crop_size})")
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be one of {sorted(FEATURE_DTYPES)}, got {feature_dtype!r}")
    if train_crop not in TRAIN_CROPS:
        raise ValueError(f"train_crop must be one of {TRAIN_CROPS}, got {train_crop!r}")


def feature_records(model: nn.Module, dataset: Sequence, crop_size: int, stride: int | None = None,
                    split_kind: str = "val", batch_size: int = 8, seed: int = 0, *, short_side: int | None = None,
                    feature_dtype: str = "float16", train_crop: str = "random", flip: bool = False,
                    precision: str = DEFAULT_PRECISION) -> Iterator[tuple[dict[str, Tensor], dict[str, Any]]]:
    """Stream ``(tensors, meta)`` records of frozen features for ``ph_reg.io.shards.write_shards`` (see module doc).

    ``model`` is a :class:`ph_reg.models.DenseViT` (or anything with ``patch_size``, ``mean``, ``std`` and a
    forward returning ``.patch`` (B, h, w, C) / ``.cls`` (B, C)); it runs on its own device, in eval mode.
    ``dataset`` yields :class:`ph_reg.evaluation.benchmarks.DenseSample`. ``batch_size`` is the number of crops per forward.
    ``flip`` (val only) also stores the features of every horizontally flipped window, for flip TTA.
    ``precision`` is the backbone's evaluation precision (:data:`ph_reg.runtime.PRECISIONS`).
    Arguments are checked when called; the records are computed lazily while the iterator is consumed.
    """
    whole = whole_image_mode(split_kind, stride)
    short_side = crop_size if short_side is None and not whole else short_side
    _check_args(model, crop_size, stride, split_kind, batch_size, short_side, feature_dtype, train_crop)
    check_precision(precision, "precision")
    if flip and split_kind != "val":
        raise ValueError("flip=True is only meaningful for split_kind='val' (flip TTA at evaluation)")
    if len(dataset) == 0:
        raise ValueError("dataset is empty: nothing to cache")
    dtype = DTYPES[feature_dtype]
    if split_kind == "train":
        records = _train_records(model, dataset, crop_size, batch_size, seed, short_side, dtype, train_crop,
                                 precision)
    elif whole:
        records = _whole_image_records(model, dataset, short_side, dtype, flip, precision)
    else:
        records = _val_records(model, dataset, crop_size, stride, batch_size, short_side, dtype, flip, precision)
    return _in_eval_mode(model, records)


def _in_eval_mode(model: nn.Module, records: Iterator) -> Iterator:
    """Run ``records`` with the model in eval mode, restoring its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield from records
    finally:
        model.train(was_training)


def _train_records(model: nn.Module, dataset: Sequence, crop_size: int, batch_size: int, seed: int,
                   short_side: int, dtype: torch.dtype, train_crop: str, precision: str
                   ) -> Iterator[tuple[dict[str, Tensor], dict[str, Any]]]:
    pending: list[tuple[Tensor, dict[str, Tensor], dict[str, Any]]] = []
    has_label = has_depth = None

    def flush() -> Iterator[tuple[dict[str, Tensor], dict[str, Any]]]:
        patch, cls = backbone_features(model, torch.stack([crop for crop, _, _ in pending]), precision=precision,
                                       dtype=dtype)
        for i, (_, tensors, meta) in enumerate(pending):
            yield {"patch": patch[i].clone(), "cls": cls[i].clone(), **tensors}, meta
        pending.clear()

    for index in range(len(dataset)):
        sample = dataset[index]
        has_label, has_depth = _check_sample(sample, index, has_label, has_depth)
        size = resized_size(*sample.image.shape[-2:], short_side)
        top, left, bottom, right = crop_box(*size, crop_size, train_crop, generator(seed, "probe_train_crop", index))
        crop = resize_image(sample.image, size)[:, top:bottom, left:right]
        tensors = {"box": torch.tensor([top, left, bottom, right], dtype=torch.int64)}
        if sample.label is not None:
            label = _stored_label(sample.label, sample.name)
            tensors["label"] = resize_dense(label, size)[top:bottom, left:right].clone()
        if sample.depth is not None:
            tensors["depth"] = resize_dense(sample.depth.float(), size)[top:bottom, left:right].clone()
        pending.append((crop, tensors, {"name": sample.name, "index": index}))
        if len(pending) == batch_size:
            yield from flush()
    if pending:
        yield from flush()


def _val_records(model: nn.Module, dataset: Sequence, crop_size: int, stride: int, batch_size: int,
                 short_side: int, dtype: torch.dtype, flip: bool, precision: str
                 ) -> Iterator[tuple[dict[str, Tensor], dict[str, Any]]]:
    has_label = has_depth = None
    for index in range(len(dataset)):
        sample = dataset[index]
        has_label, has_depth = _check_sample(sample, index, has_label, has_depth)
        size = resized_size(*sample.image.shape[-2:], short_side)
        image = resize_image(sample.image, size)
        boxes = window_boxes(*size, crop_size, stride)
        crops = torch.stack([image[:, t:b, l:r] for t, l, b, r in boxes])
        outputs: dict[str, list[Tensor]] = {"patch": [], "cls": [], "patch_flip": [], "cls_flip": []}
        for start in range(0, len(crops), batch_size):
            chunk = crops[start:start + batch_size]
            patch, cls = backbone_features(model, chunk, precision=precision, dtype=dtype)
            outputs["patch"].append(patch)
            outputs["cls"].append(cls)
            if flip:
                patch, cls = backbone_features(model, chunk.flip(-1), precision=precision, dtype=dtype)
                outputs["patch_flip"].append(patch)
                outputs["cls_flip"].append(cls)
        tensors = {key: torch.cat(parts) for key, parts in outputs.items() if parts}
        tensors["boxes"] = torch.tensor(boxes, dtype=torch.int64)
        if sample.label is not None:
            tensors["label"] = _stored_label(sample.label, sample.name).clone()
        if sample.depth is not None:
            tensors["depth"] = sample.depth.float().clone()
        yield tensors, {"name": sample.name, "index": index, "resized": list(size)}


def whole_image_mode(split_kind: str, stride: int | None) -> bool:
    """A val cache with ``stride=None`` holds whole-image features (the depth toolbox's ``test_cfg mode="whole"``)."""
    return split_kind == "val" and stride is None


def _whole_image_records(model: nn.Module, dataset: Sequence, short_side: int | None, dtype: torch.dtype,
                         flip: bool, precision: str) -> Iterator[tuple[dict[str, Tensor], dict[str, Any]]]:
    """Val records of whole images (see the module doc): one forward per image (with its flipped copy)."""
    has_label = has_depth = None
    for index in range(len(dataset)):
        sample = dataset[index]
        has_label, has_depth = _check_sample(sample, index, has_label, has_depth)
        height, width = sample.image.shape[-2:]
        size = (height, width) if short_side is None else resized_size(height, width, short_side)
        image = resize_image(sample.image, size)
        views = torch.stack([image, image.flip(-1)]) if flip else image[None]
        patch, cls = backbone_features(model, views, pad_to_patch=True, precision=precision, dtype=dtype)
        tensors = {"patch": patch[:1].clone(), "cls": cls[:1].clone(),
                   "boxes": torch.tensor([[0, 0, size[0], size[1]]], dtype=torch.int64)}
        if flip:
            tensors["patch_flip"], tensors["cls_flip"] = patch[1:].clone(), cls[1:].clone()
        if sample.label is not None:
            tensors["label"] = _stored_label(sample.label, sample.name).clone()
        if sample.depth is not None:
            tensors["depth"] = sample.depth.float().clone()
        yield tensors, {"name": sample.name, "index": index, "resized": list(size)}


def cache_attrs(model: nn.Module, dataset: Sequence, crop_size: int, stride: int | None, split_kind: str,
                seed: int, short_side: int | None = None, feature_dtype: str = "float16",
                train_crop: str = "random", flip: bool = False, precision: str = DEFAULT_PRECISION
                ) -> dict[str, Any]:
    """Store attributes describing how a feature cache was made (for ``index.json``)."""
    config = getattr(model, "config", None)
    return {
        "split_kind": split_kind, "crop_size": crop_size, "stride": stride,
        "short_side": crop_size if short_side is None and not whole_image_mode(split_kind, stride) else short_side,
        "seed": seed,
        "feature_dtype": feature_dtype, "train_crop": train_crop, "flip": flip, "precision": precision,
        "patch_size": getattr(model, "patch_size", None), "embed_dim": getattr(model, "embed_dim", None),
        "backbone": config.to_dict() if hasattr(config, "to_dict") else None,
        "dataset": getattr(dataset, "name", None), "split": getattr(dataset, "split", None),
        "num_classes": getattr(dataset, "num_classes", None) or None,
    }


def feature_stream(model: nn.Module, dataset: Sequence, crop_size: int, stride: int | None = None,
                   split_kind: str = "val", batch_size: int = 8, seed: int = 0, *, short_side: int | None = None,
                   feature_dtype: str = "float16", train_crop: str = "random", flip: bool = False,
                   records_per_shard: int = RECORDS_PER_SHARD, precision: str = DEFAULT_PRECISION) -> RecordStream:
    """:func:`feature_records` with its attributes (:func:`cache_attrs`) as a :class:`ph_reg.io.shards.RecordStream`."""
    records = feature_records(model, dataset, crop_size, stride, split_kind, batch_size, seed,
                              short_side=short_side, feature_dtype=feature_dtype, train_crop=train_crop, flip=flip,
                              precision=precision)
    attrs = cache_attrs(model, dataset, crop_size, stride, split_kind, seed, short_side, feature_dtype,
                        train_crop, flip, precision)
    return RecordStream(records, attrs=attrs, records_per_shard=records_per_shard)


# --- reading --------------------------------------------------------------------------------------------------
class CachedImage(NamedTuple):
    """One val image of a feature cache; features as float32, label as int64."""

    patch: Tensor               # (N, h, w, C) one feature map per window
    cls: Tensor                 # (N, C)
    boxes: Tensor               # int64 (N, 4): top, left, bottom, right in the resized image
    resized: tuple[int, int]    # (H, W) of the resized image the windows tile
    label: Tensor | None        # int64 (H0, W0) at the original resolution
    depth: Tensor | None        # float32 (H0, W0) at the original resolution
    patch_flip: Tensor | None   # (N, h, w, C) features of the flipped windows, if cached
    cls_flip: Tensor | None     # (N, C)
    name: str


def store_kind(store: ShardReader) -> str:
    """``"train"`` or ``"val"``, from the store's keys (a store written by :func:`feature_records`)."""
    keys = set(store.keys)
    if {"patch", "cls", "box"} <= keys:
        return "train"
    if {"patch", "cls", "boxes"} <= keys:
        return "val"
    raise ValueError(f"{store.folder} is not a probe feature cache: keys {sorted(keys)} lack patch/cls/box(es)")


def check_store(store: ShardReader, kind: str, required: Sequence[str] = ()) -> None:
    """Raise ValueError unless ``store`` is a ``kind`` feature cache with the ``required`` keys."""
    if not isinstance(store, ShardReader):
        raise ValueError(f"expected a ph_reg.io.shards.ShardReader feature cache, got {type(store).__name__}")
    actual = store_kind(store)
    if actual != kind:
        raise ValueError(f"{store.folder} is a {actual!r} feature cache, expected a {kind!r} one")
    missing = sorted(set(required) - set(store.keys))
    if missing:
        raise ValueError(f"{store.folder} lacks the keys {missing} (the cached dataset has no such targets)")
    if len(store) == 0:
        raise ValueError(f"{store.folder} holds no records")


def _as_float(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float()


def cached_image(store: ShardReader, index: int) -> CachedImage:
    """Record ``index`` of a val feature cache."""
    record, meta = store[index], store.meta(index)
    label = record.get("label")
    return CachedImage(
        patch=record["patch"].float(), cls=record["cls"].float(), boxes=record["boxes"],
        resized=tuple(meta["resized"]), label=None if label is None else label.long(),
        depth=_as_float(record.get("depth")), patch_flip=_as_float(record.get("patch_flip")),
        cls_flip=_as_float(record.get("cls_flip")), name=meta.get("name", str(index)),
    )


def iter_val_images(store: ShardReader) -> Iterator[CachedImage]:
    """Every image of a val feature cache, in order."""
    check_store(store, "val")
    for index in range(len(store)):
        yield cached_image(store, index)


def iter_train_batches(store: ShardReader, batch_size: int, gen: torch.Generator, keys: Sequence[str]
                       ) -> Iterator[dict[str, Tensor]]:
    """Endless shuffled batches of a train feature cache (only ``keys``; label as int64, floats as float32).

    Each pass draws a fresh permutation of the records from ``gen`` and cuts it into batches of ``batch_size``,
    dropping the incomplete last batch (a store smaller than one batch is one batch). Records are read one by
    one from the store, so memory holds one batch.
    """
    check_store(store, "train", keys)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = min(batch_size, len(store))
    while True:
        perm = torch.randperm(len(store), generator=gen).tolist()
        for first in range(0, len(perm) - size + 1, size):
            records = [store[i] for i in perm[first:first + size]]
            batch = {k: torch.stack([r[k] for r in records]) for k in keys}
            yield {k: v.long() if k == "label" else v.float() if v.is_floating_point() else v
                   for k, v in batch.items()}


# --- training batch sources -----------------------------------------------------------------------------------
@runtime_checkable
class BatchSource(Protocol):
    """Where a probe's training batches come from: a train feature cache (cached mode, :class:`CachedBatchSource`)
    or the frozen backbone run on augmented images for every batch (online mode, :mod:`.online`).

    ``batches`` is an endless iterator of dicts with the requested ``keys`` among ``"patch"`` (B, h, w, C) float,
    ``"cls"`` (B, C) float, ``"label"`` (B, H, W) int64 and ``"depth"`` (B, H, W) float; the tensors may be on the
    backbone's device (online mode) or on the CPU (cached mode). ``attrs`` describes the data (e.g.
    ``num_classes``, like :attr:`ph_reg.io.shards.ShardReader.attrs`).
    """

    embed_dim: int
    attrs: Mapping[str, Any]

    def batches(self, batch_size: int, gen: torch.Generator, keys: Sequence[str]) -> Iterator[dict[str, Tensor]]:
        ...


class CachedBatchSource:
    """:class:`BatchSource` over a train feature cache: :func:`iter_train_batches` (no augmentation)."""

    def __init__(self, store: ShardReader):
        check_store(store, "train")
        self.store = store
        self.attrs: Mapping[str, Any] = store.attrs
        self.embed_dim: int = int(store[0]["patch"].shape[-1])

    def batches(self, batch_size: int, gen: torch.Generator, keys: Sequence[str]) -> Iterator[dict[str, Tensor]]:
        check_store(self.store, "train", keys)  # eagerly, so a missing key fails before training starts
        return iter_train_batches(self.store, batch_size, gen, keys)


def as_batch_source(train: ShardReader | BatchSource) -> BatchSource:
    """A train feature cache wrapped as a :class:`CachedBatchSource`; a :class:`BatchSource` as it is."""
    if isinstance(train, ShardReader):
        return CachedBatchSource(train)
    if isinstance(train, BatchSource):
        return train
    raise ValueError(f"expected a train feature cache (ph_reg.io.shards.ShardReader) or a BatchSource (embed_dim, attrs, "
                     f"batches), got {type(train).__name__}")
