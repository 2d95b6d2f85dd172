"""Readers for the standard on-disk layouts of the dense-task benchmarks.

Every reader is a lazy ``DenseDataset``: ``__init__`` validates the folder and builds the sorted list of files
(raising ``FileNotFoundError``/``ValueError`` that name the missing path and the expected layout), and
``__getitem__`` reads one image and its annotation. Label conventions follow mmsegmentation:

- VOC: palette PNGs, index 255 is the object boundary (ignored). ``num_classes=20`` drops the background.
- ADE20K and Pascal-Context-59 reduce the zero label: 0 becomes ignore (255), the other ids shift down by one.
- Pascal-Context-60 keeps label 0 as the class "background"; COCO-Object does not reduce the zero label either, and
  (NACLIP's ``datasets/cvt_coco_object.py``) counts every stuff pixel and every unlabelled pixel as background 0.
- COCO-Stuff-164k ``*_labelTrainIds.png`` holds train ids 0..170; Cityscapes ``*_labelTrainIds.png`` 0..18.
- NYUv2 depth PNGs are 16-bit millimetres; 0 is invalid.
"""
# long: one small reader per benchmark family (VOC, Context, COCO, ADE20K, Cityscapes, NYUv2) sharing the PNG helpers

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ph_reg.evaluation.benchmarks.base import IGNORE_INDEX, DenseDataset, DenseSample
from ph_reg.evaluation.benchmarks.classes import CITYSCAPES_ID_TO_TRAIN_ID, CLASS_NAMES, COCO_NUM_THINGS

#: NYUv2 depth PNGs store millimetres.
NYU_DEPTH_SCALE = 1000.0

_LUT_SIZE = 256  # label PNGs are 8-bit index images

#: COCO-Stuff-164k raw annotation ids (0-based COCO category ids) of the 80 thing classes, in train-id order: the
#: thing part of the raw id -> train id table of mmsegmentation's ``coco_stuff164k.py`` and NACLIP's
#: ``cvt_coco_object.py`` conversions. The COCO ids 11, 25, 28, 29, 44, 65, 67, 68, 70, 82 and 90 are unused.
COCO_RAW_THING_IDS: tuple[int, ...] = (*range(0, 11), *range(12, 25), 26, 27, *range(30, 44), *range(45, 65), 66,
                                       69, *range(71, 82), *range(83, 90))
#: Raw ids of the 91 stuff classes (train ids 80..170).
COCO_RAW_STUFF_IDS = range(91, 182)
#: NACLIP's COCO-Object rule: every raw id above this one (the stuff ids and the unlabelled 255) is background 0.
COCO_OBJECT_LAST_THING_RAW_ID = 90
#: The unlabelled value of COCO-Stuff annotations; the train-id conversion keeps it as 255.
COCO_UNLABELLED = 255
COCO_OBJECT_BACKGROUND = 0


# ----------------------------------------------------------------------------------------------------------------
# Small helpers: layout checks, file reading, label lookup tables
# ----------------------------------------------------------------------------------------------------------------
def _check_split(dataset: str, split: str, allowed: Sequence[str], aliases: Mapping[str, str] | None = None) -> str:
    split = (aliases or {}).get(split, split)
    if split not in allowed:
        raise ValueError(f"{dataset}: split must be one of {list(allowed)}, got {split!r}")
    return split


def _require(path: Path, dataset: str, layout: str, *, is_dir: bool = True) -> Path:
    ok = path.is_dir() if is_dir else path.is_file()
    if not ok:
        kind = "folder" if is_dir else "file"
        raise FileNotFoundError(f"{dataset}: missing {kind} {path}\nexpected layout:\n{layout}")
    return path


def _read_ids(path: Path, dataset: str) -> list[str]:
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{dataset}: split file {path} lists no images")
    return ids


def _pair_ids(
    dataset: str, ids: Sequence[str], image_dir: Path, image_suffix: str, label_dir: Path, label_suffix: str,
    layout: str,
) -> list[tuple[str, Path, Path]]:
    """(name, image, label) for every id; both files must exist."""
    items = []
    for name in sorted(set(ids)):
        image, label = image_dir / f"{name}{image_suffix}", label_dir / f"{name}{label_suffix}"
        _require(image, dataset, layout, is_dir=False)
        _require(label, dataset, layout, is_dir=False)
        items.append((name, image, label))
    return items


def _pair_folder(
    dataset: str, image_dir: Path, image_suffix: str, label_dir: Path, label_suffix: str, layout: str,
) -> list[tuple[str, Path, Path]]:
    """Every image of ``image_dir`` with its annotation in ``label_dir`` (matched by file stem)."""
    images = sorted(image_dir.glob(f"*{image_suffix}"))
    if not images:
        raise FileNotFoundError(f"{dataset}: no *{image_suffix} images in {image_dir}\nexpected layout:\n{layout}")
    labels = {p.name for p in label_dir.glob(f"*{label_suffix}")}
    items = []
    for image in images:
        name = image.name[: -len(image_suffix)]
        if f"{name}{label_suffix}" not in labels:
            raise FileNotFoundError(
                f"{dataset}: image {image} has no annotation {label_dir / (name + label_suffix)}\n"
                f"expected layout:\n{layout}"
            )
        items.append((name, image, label_dir / f"{name}{label_suffix}"))
    return items


def read_rgb(path: Path) -> Tensor:
    """An image file as a uint8 (3, H, W) RGB tensor."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def read_index_png(path: Path) -> np.ndarray:
    """The class-index array of a label PNG (palette "P" or grey "L"/16-bit modes; never colour-coded RGB)."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
            raise ValueError(f"label image {path} has mode {image.mode!r}; expected an index PNG (mode P or L)")
        return np.array(image)


def reduce_zero_label_lut() -> np.ndarray:
    """0 -> ignore, k -> k-1, 255 stays ignore (mmsegmentation's ``reduce_zero_label``)."""
    lut = np.arange(_LUT_SIZE, dtype=np.int64) - 1
    lut[0] = IGNORE_INDEX
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


def coco_object_raw_lut() -> np.ndarray:
    """NACLIP's COCO-Object conversion (``datasets/cvt_coco_object.py``) of raw COCO-Stuff ids: the k-th thing id of
    :data:`COCO_RAW_THING_IDS` -> k + 1; every id above :data:`COCO_OBJECT_LAST_THING_RAW_ID` that the conversion
    lists (stuff 91..181 and the unlabelled 255) -> 0, background, which mIoU counts. Ids it does not list (the
    unused COCO ids, 182..254) never occur in the annotations; NACLIP copies them through, mmseg's IoU then skips
    them (outside 0..80), so they map to ignore here."""
    lut = np.full(_LUT_SIZE, IGNORE_INDEX, dtype=np.int64)
    lut[list(COCO_RAW_THING_IDS)] = np.arange(1, len(COCO_RAW_THING_IDS) + 1)
    lut[list(COCO_RAW_STUFF_IDS)] = COCO_OBJECT_BACKGROUND
    lut[COCO_UNLABELLED] = COCO_OBJECT_BACKGROUND
    return lut


def coco_object_lut(num_things: int = COCO_NUM_THINGS, num_stuff_classes: int = 171) -> np.ndarray:
    """COCO-Stuff train id -> COCO-Object id, :func:`coco_object_raw_lut` on mmseg's ``*_labelTrainIds.png``: things
    0..79 -> 1..80, stuff 80..170 -> 0 and 255 (the unlabelled raw 255, kept by the train-id conversion) -> 0, so
    unlabelled pixels count as background as in NACLIP's conversion; anything else ignore."""
    lut = np.full(_LUT_SIZE, IGNORE_INDEX, dtype=np.int64)
    lut[:num_things] = np.arange(1, num_things + 1)
    lut[num_things:num_stuff_classes] = COCO_OBJECT_BACKGROUND
    lut[COCO_UNLABELLED] = COCO_OBJECT_BACKGROUND
    return lut


def cityscapes_id_lut(table: Mapping[int, int] = CITYSCAPES_ID_TO_TRAIN_ID) -> np.ndarray:
    """Cityscapes label id -> train id; unlisted ids become ignore."""
    lut = np.full(_LUT_SIZE, IGNORE_INDEX, dtype=np.int64)
    for label_id, train_id in table.items():
        lut[label_id] = train_id
    return lut


# ----------------------------------------------------------------------------------------------------------------
# Segmentation datasets
# ----------------------------------------------------------------------------------------------------------------
class _SegmentationFiles(DenseDataset):
    """A sorted list of (name, image, label) files; labels optionally remapped with a lookup table."""

    def __init__(self, name: str, split: str, class_names: Sequence[str], items: list[tuple[str, Path, Path]]):
        self.name, self.split, self.class_names = name, split, list(class_names)
        self.items = sorted(items, key=lambda item: item[0])

    def __len__(self) -> int:
        return len(self.items)

    def _label_lut(self, label_path: Path) -> np.ndarray | None:
        """The lookup table applied to the raw label PNG (None = identity)."""
        return None

    def _load(self, index: int) -> DenseSample:
        name, image_path, label_path = self.items[index]
        image = read_rgb(image_path)
        raw = read_index_png(label_path)
        lut = self._label_lut(label_path)
        if lut is not None:
            if raw.size and int(raw.max()) >= len(lut):
                raise ValueError(f"{self.name}: label {label_path} has id {int(raw.max())} >= {len(lut)}")
            label = lut[raw]
        else:
            label = raw.astype(np.int64)
        if label.shape != tuple(image.shape[1:]):
            raise ValueError(
                f"{self.name}: label {label_path} is {label.shape[1]}x{label.shape[0]} but image {image_path} is "
                f"{image.shape[2]}x{image.shape[1]}"
            )
        bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            raise ValueError(
                f"{self.name}: label {label_path} has ids {sorted(set(label[bad].tolist()))[:5]} outside "
                f"0..{self.num_classes - 1} (and {IGNORE_INDEX} = ignore)"
            )
        return DenseSample(image, torch.from_numpy(np.ascontiguousarray(label)), None, name)


class VOCSegmentation(_SegmentationFiles):
    """Pascal VOC 2012 segmentation, 21 classes (``num_classes=20``: background -> ignore, others shift down).

    ``root`` is ``VOCdevkit/VOC2012``. Labels are palette PNGs from ``SegmentationClass`` (the palette index is the
    class; 255 marks object boundaries and is ignored); ``aug=True`` reads the SBD-augmented plain index PNGs of
    ``SegmentationClassAug`` and, for ``split="train"``, the list ``ImageSets/Segmentation/train_aug.txt`` if present.
    """

    LAYOUT = (
        "  VOCdevkit/VOC2012/  (root)\n    JPEGImages/<id>.jpg\n    SegmentationClass/<id>.png  (palette PNG)\n"
        "    SegmentationClassAug/<id>.png  (only with aug=True)\n    ImageSets/Segmentation/{train,val}.txt"
    )
    SPLITS = ("train", "val", "trainval")

    def __init__(self, root: str | Path, split: str = "val", aug: bool = False, num_classes: int = 21):
        dataset = "VOCSegmentation"
        split = _check_split(dataset, split, self.SPLITS)
        if num_classes not in (20, 21):
            raise ValueError(f"{dataset}: num_classes must be 21 (with background) or 20, got {num_classes}")
        root = _require(Path(root), dataset, self.LAYOUT)
        image_dir = _require(root / "JPEGImages", dataset, self.LAYOUT)
        label_dir = _require(root / ("SegmentationClassAug" if aug else "SegmentationClass"), dataset, self.LAYOUT)
        sets = _require(root / "ImageSets" / "Segmentation", dataset, self.LAYOUT)
        list_file = sets / f"{split}.txt"
        if aug and split == "train" and (sets / "train_aug.txt").is_file():
            list_file = sets / "train_aug.txt"
        ids = _read_ids(_require(list_file, dataset, self.LAYOUT, is_dir=False), dataset)
        items = _pair_ids(dataset, ids, image_dir, ".jpg", label_dir, ".png", self.LAYOUT)
        self.aug = aug
        super().__init__(f"voc{num_classes}", split, CLASS_NAMES[f"voc{num_classes}"], items)

    def _label_lut(self, label_path: Path) -> np.ndarray | None:
        return reduce_zero_label_lut() if self.num_classes == 20 else None


class ADE20K(_SegmentationFiles):
    """ADE20K (SceneParsing ``ADEChallengeData2016``), 150 classes; label 0 ("other") -> ignore, others shift down."""

    LAYOUT = (
        "  ADEChallengeData2016/  (root)\n    images/{training,validation}/<name>.jpg\n"
        "    annotations/{training,validation}/<name>.png"
    )
    SPLITS = ("training", "validation")
    ALIASES = {"train": "training", "val": "validation"}

    def __init__(self, root: str | Path, split: str = "validation"):
        dataset = "ADE20K"
        split = _check_split(dataset, split, self.SPLITS, self.ALIASES)
        root = _require(Path(root), dataset, self.LAYOUT)
        image_dir = _require(root / "images" / split, dataset, self.LAYOUT)
        label_dir = _require(root / "annotations" / split, dataset, self.LAYOUT)
        items = _pair_folder(dataset, image_dir, ".jpg", label_dir, ".png", self.LAYOUT)
        super().__init__("ade20k", split, CLASS_NAMES["ade20k"], items)

    def _label_lut(self, label_path: Path) -> np.ndarray | None:
        return reduce_zero_label_lut()


class PascalContext(_SegmentationFiles):
    """Pascal-Context (mmsegmentation layout under ``VOCdevkit/VOC2010``).

    ``num_classes=60`` keeps label 0 as class "background"; ``num_classes=59`` reduces the zero label (0 -> ignore,
    the other ids shift down by one).
    """

    LAYOUT = (
        "  VOCdevkit/VOC2010/  (root)\n    JPEGImages/<id>.jpg\n    SegmentationClassContext/<id>.png\n"
        "    ImageSets/SegmentationContext/{train,val}.txt"
    )
    SPLITS = ("train", "val")

    def __init__(self, root: str | Path, split: str = "val", num_classes: int = 59):
        dataset = "PascalContext"
        split = _check_split(dataset, split, self.SPLITS)
        if num_classes not in (59, 60):
            raise ValueError(f"{dataset}: num_classes must be 59 or 60, got {num_classes}")
        root = _require(Path(root), dataset, self.LAYOUT)
        image_dir = _require(root / "JPEGImages", dataset, self.LAYOUT)
        label_dir = _require(root / "SegmentationClassContext", dataset, self.LAYOUT)
        list_file = _require(root / "ImageSets" / "SegmentationContext" / f"{split}.txt", dataset, self.LAYOUT,
                             is_dir=False)
        items = _pair_ids(dataset, _read_ids(list_file, dataset), image_dir, ".jpg", label_dir, ".png", self.LAYOUT)
        super().__init__(f"context{num_classes}", split, CLASS_NAMES[f"context{num_classes}"], items)

    def _label_lut(self, label_path: Path) -> np.ndarray | None:
        return reduce_zero_label_lut() if self.num_classes == 59 else None


class COCOStuff(_SegmentationFiles):
    """COCO-Stuff-164k (mmsegmentation layout), 171 classes: ``*_labelTrainIds.png`` holds 0..170, 255 = ignore."""

    LAYOUT = (
        "  coco_stuff164k/  (root)\n    images/{train2017,val2017}/<id>.jpg\n"
        "    annotations/{train2017,val2017}/<id>_labelTrainIds.png"
    )
    SPLITS = ("train2017", "val2017")
    ALIASES = {"train": "train2017", "val": "val2017"}
    LABEL_SUFFIX = "_labelTrainIds.png"
    VARIANT = "coco_stuff"

    def __init__(self, root: str | Path, split: str = "val2017"):
        dataset = type(self).__name__
        split = _check_split(dataset, split, self.SPLITS, self.ALIASES)
        root = _require(Path(root), dataset, self.LAYOUT)
        image_dir = _require(root / "images" / split, dataset, self.LAYOUT)
        label_dir = _require(root / "annotations" / split, dataset, self.LAYOUT)
        items = _pair_folder(dataset, image_dir, ".jpg", label_dir, self.LABEL_SUFFIX, self.LAYOUT)
        super().__init__(self.VARIANT, split, CLASS_NAMES[self.VARIANT], items)


class COCOObject(COCOStuff):
    """COCO-Object, 81 classes (background + the 80 COCO things), derived from the COCO-Stuff-164k annotations.

    Conversion of each ``*_labelTrainIds.png`` pixel (:func:`coco_object_lut`, NACLIP's ``cvt_coco_object.py``):
    train ids 0..79 (the 80 thing classes) -> 1..80; every stuff id 80..170 and the unlabelled 255 -> 0
    (background, counted in mIoU: nothing is ignored). The zero label is not reduced: background is a class.
    """

    VARIANT = "coco_object"

    def _label_lut(self, label_path: Path) -> np.ndarray | None:
        return coco_object_lut()


class Cityscapes(_SegmentationFiles):
    """Cityscapes fine annotations, 19 train ids (255 = ignore).

    Reads ``*_gtFine_labelTrainIds.png``; where only ``*_gtFine_labelIds.png`` exists, label ids are mapped to train
    ids with the standard cityscapesScripts table.
    """

    LAYOUT = (
        "  cityscapes/  (root)\n    leftImg8bit/{train,val,test}/<city>/<stem>_leftImg8bit.png\n"
        "    gtFine/{train,val,test}/<city>/<stem>_gtFine_labelTrainIds.png  (or _gtFine_labelIds.png)"
    )
    SPLITS = ("train", "val", "test")
    IMAGE_SUFFIX = "_leftImg8bit.png"
    TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"
    LABEL_ID_SUFFIX = "_gtFine_labelIds.png"

    def __init__(self, root: str | Path, split: str = "val"):
        dataset = "Cityscapes"
        split = _check_split(dataset, split, self.SPLITS)
        root = _require(Path(root), dataset, self.LAYOUT)
        image_dir = _require(root / "leftImg8bit" / split, dataset, self.LAYOUT)
        label_dir = _require(root / "gtFine" / split, dataset, self.LAYOUT)
        images = sorted(image_dir.glob(f"*/*{self.IMAGE_SUFFIX}"))
        if not images:
            raise FileNotFoundError(
                f"{dataset}: no <city>/*{self.IMAGE_SUFFIX} images in {image_dir}\nexpected layout:\n{self.LAYOUT}"
            )
        items = []
        for image in images:
            stem = image.name[: -len(self.IMAGE_SUFFIX)]
            city_dir = label_dir / image.parent.name
            label = city_dir / f"{stem}{self.TRAIN_ID_SUFFIX}"
            if not label.is_file():
                label = city_dir / f"{stem}{self.LABEL_ID_SUFFIX}"
            if not label.is_file():
                raise FileNotFoundError(
                    f"{dataset}: image {image} has no annotation {city_dir / (stem + self.TRAIN_ID_SUFFIX)} "
                    f"(nor {label.name})\nexpected layout:\n{self.LAYOUT}"
                )
            items.append((stem, image, label))
        super().__init__("cityscapes", split, CLASS_NAMES["cityscapes"], items)

    def _label_lut(self, label_path: Path) -> np.ndarray | None:
        return cityscapes_id_lut() if label_path.name.endswith(self.LABEL_ID_SUFFIX) else None


# ----------------------------------------------------------------------------------------------------------------
# Depth
# ----------------------------------------------------------------------------------------------------------------
class NYUv2Depth(DenseDataset):
    """NYU Depth v2 with the Eigen split files of BTS/AdaBins/DINOv2 (no segmentation labels).

    Each line of the split file is ``<rgb path> <depth path> [focal]``; paths are relative to ``data_dir``
    (default ``root``; a leading "/" is ignored). Depth PNGs are 16-bit millimetres, returned in metres
    (0 = invalid). ``split_file`` defaults to ``nyu_train.txt``/``nyu_test.txt`` inside ``root``.
    """

    LAYOUT = (
        "  nyu/  (root)\n    nyu_train.txt, nyu_test.txt  (lines: <rgb path> <depth path> [focal])\n"
        "    <scene>/rgb_00000.jpg, <scene>/sync_depth_00000.png  (16-bit millimetres)"
    )
    SPLITS = ("train", "test")

    def __init__(self, root: str | Path, split: str = "test", split_file: str | Path | None = None,
                 data_dir: str | Path | None = None, depth_scale: float = NYU_DEPTH_SCALE):
        dataset = "NYUv2Depth"
        self.name, self.split, self.class_names = "nyuv2", _check_split(dataset, split, self.SPLITS), []
        if depth_scale <= 0:
            raise ValueError(f"{dataset}: depth_scale must be > 0 (depth units per metre), got {depth_scale}")
        self.depth_scale = float(depth_scale)
        root = _require(Path(root), dataset, self.LAYOUT)
        split_path = Path(split_file) if split_file is not None else Path(f"nyu_{self.split}.txt")
        split_path = _require(split_path if split_path.is_absolute() else root / split_path, dataset, self.LAYOUT,
                              is_dir=False)
        base = _require(root / data_dir if data_dir is not None else root, dataset, self.LAYOUT)
        items: dict[str, tuple[Path, Path]] = {}
        for number, line in enumerate(split_path.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise ValueError(f"{dataset}: {split_path}:{number}: expected '<rgb path> <depth path> [focal]', "
                                 f"got {line!r}")
            rgb, depth = (base / field.lstrip("/") for field in fields[:2])
            _require(rgb, dataset, self.LAYOUT, is_dir=False)
            _require(depth, dataset, self.LAYOUT, is_dir=False)
            items[str(Path(fields[0].lstrip("/")).with_suffix(""))] = (rgb, depth)
        if not items:
            raise ValueError(f"{dataset}: split file {split_path} lists no images")
        self.items = sorted((name, rgb, depth) for name, (rgb, depth) in items.items())

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, index: int) -> DenseSample:
        name, rgb_path, depth_path = self.items[index]
        image = read_rgb(rgb_path)
        with Image.open(depth_path) as depth_image:
            raw = np.array(depth_image)
        if raw.ndim != 2:
            raise ValueError(f"{self.name}: depth {depth_path} must be a single-channel 16-bit PNG, got {raw.shape}")
        depth = torch.from_numpy(raw.astype(np.float32) / self.depth_scale)
        if depth.shape != image.shape[1:]:
            raise ValueError(f"{self.name}: depth {depth_path} is {tuple(depth.shape)} but image {rgb_path} is "
                             f"{tuple(image.shape[1:])}")
        return DenseSample(image, None, depth, name)
