"""Tiny fake copies of the paper's benchmark folders, in the standard on-disk layouts of ``ph_reg.evaluation.benchmarks``.

``make_fake_datasets(root)`` writes, under ``root``, the folders the paper configurations name under
``data/01_raw/`` (``conf/paper*/parameters_evaluation.yml``): random RGB images, label PNGs holding random valid
class ids plus some 255 (ignore), and 16-bit NYUv2 depth PNGs in millimetres.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

#: The folders the paper configurations read, relative to ``data/01_raw/``.
DATASET_FOLDERS = ("VOCdevkit/VOC2012", "VOCdevkit/VOC2010", "coco_stuff164k", "cityscapes",
                   "ADEChallengeData2016", "nyu")
#: The Eigen crop of the depth evaluation (``eigen_crop: true``) is only defined for 480x640 NYUv2 images.
NYU_SIZE = (480, 640)
IGNORE = 255
BLOCK = 8                  # labels are constant on BLOCK x BLOCK pixel blocks (a little spatial structure)
IGNORE_SHARE = 0.1         # share of label blocks set to IGNORE
DEPTH_RANGE_MM = (500, 9000)
INVALID_DEPTH_SHARE = 0.05  # share of depth pixels set to 0 (invalid)

# Raw label ids as stored on disk (the readers map them: reduce-zero-label, COCO-Object, ...)
VOC_IDS = range(0, 21)            # palette index = class, 0 = background
CONTEXT_IDS = range(0, 60)        # 0 = background (context60) / ignore (context59)
COCO_STUFF_IDS = range(0, 171)    # *_labelTrainIds.png
CITYSCAPES_IDS = range(0, 19)     # *_gtFine_labelTrainIds.png
ADE_IDS = range(0, 151)           # 0 = "other" -> ignore


def _rgb(path: Path, rng: np.random.Generator, size: Sequence[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _labels(rng: np.random.Generator, size: Sequence[int], ids: range) -> np.ndarray:
    """(H, W) uint8: random ids of ``ids`` on BLOCK-sized blocks, some blocks IGNORE, at least one of each."""
    height, width = size
    blocks = (-(-height // BLOCK), -(-width // BLOCK))
    grid = rng.integers(ids.start, ids.stop, blocks).astype(np.uint8)
    grid[rng.random(blocks) < IGNORE_SHARE] = IGNORE
    grid.flat[0], grid.flat[-1] = ids.start + 1, IGNORE  # a valid id (not 0: reduce-zero-label) and an ignore
    return np.kron(grid, np.ones((BLOCK, BLOCK), np.uint8))[:height, :width]


def _voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved index bits), 256 RGB triplets."""
    palette = []
    for index in range(256):
        colour, value = [0, 0, 0], index
        for shift in range(7, -1, -1):
            for channel in range(3):
                colour[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        palette += colour
    return palette


def _label_png(path: Path, labels: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:  # mode P: the pixel value is the palette index (= the class)
        image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), np.ascontiguousarray(labels).tobytes())
        image.putpalette(_voc_palette())
    else:
        image = Image.fromarray(labels)
    image.save(path)


def _write_list(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _voc2012(root: Path, rng: np.random.Generator, size: Sequence[int], n: int) -> None:
    """JPEGImages, SegmentationClass (palette PNGs), SegmentationClassAug (plain index PNGs), train/val/train_aug."""
    splits = {"train": [f"2007_{i:06d}" for i in range(n)], "val": [f"2008_{i:06d}" for i in range(n)]}
    aug_only = [f"2011_{i:06d}" for i in range(n)]  # SBD images: in train_aug.txt only
    for name in splits["train"] + splits["val"] + aug_only:
        _rgb(root / "JPEGImages" / f"{name}.jpg", rng, size)
        labels = _labels(rng, size, VOC_IDS)
        if name not in aug_only:
            _label_png(root / "SegmentationClass" / f"{name}.png", labels, palette=True)
        if name not in splits["val"]:
            _label_png(root / "SegmentationClassAug" / f"{name}.png", labels)
    sets = root / "ImageSets" / "Segmentation"
    for split, names in splits.items():
        _write_list(sets / f"{split}.txt", names)
    _write_list(sets / "train_aug.txt", splits["train"] + aug_only)


def _voc2010_context(root: Path, rng: np.random.Generator, size: Sequence[int], n: int) -> None:
    """Pascal-Context in the mmsegmentation layout: JPEGImages, SegmentationClassContext, SegmentationContext."""
    for split, year in (("train", 2008), ("val", 2010)):
        names = [f"{year}_{i:06d}" for i in range(n)]
        for name in names:
            _rgb(root / "JPEGImages" / f"{name}.jpg", rng, size)
            _label_png(root / "SegmentationClassContext" / f"{name}.png", _labels(rng, size, CONTEXT_IDS))
        _write_list(root / "ImageSets" / "SegmentationContext" / f"{split}.txt", names)


def _coco_stuff(root: Path, rng: np.random.Generator, size: Sequence[int], n: int) -> None:
    """images/val2017/<id>.jpg and annotations/val2017/<id>_labelTrainIds.png (train ids 0..170)."""
    for i in range(n):
        name = f"{i + 1:012d}"
        _rgb(root / "images" / "val2017" / f"{name}.jpg", rng, size)
        _label_png(root / "annotations" / "val2017" / f"{name}_labelTrainIds.png",
                   _labels(rng, size, COCO_STUFF_IDS))


def _cityscapes(root: Path, rng: np.random.Generator, size: Sequence[int], n: int) -> None:
    """leftImg8bit/val/<city>/<stem>_leftImg8bit.png and gtFine/val/<city>/<stem>_gtFine_labelTrainIds.png."""
    cities = ("frankfurt", "lindau", "munster")
    for i in range(n):
        city = cities[i % len(cities)]
        stem = f"{city}_{i:06d}_000019"
        _rgb(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", rng, size)
        _label_png(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png",
                   _labels(rng, size, CITYSCAPES_IDS))


def _ade20k(root: Path, rng: np.random.Generator, size: Sequence[int], n: int) -> None:
    """images/{training,validation}/<name>.jpg and annotations/{training,validation}/<name>.png (0..150)."""
    for split, tag in (("training", "train"), ("validation", "val")):
        for i in range(n):
            name = f"ADE_{tag}_{i + 1:08d}"
            _rgb(root / "images" / split / f"{name}.jpg", rng, size)
            _label_png(root / "annotations" / split / f"{name}.png", _labels(rng, size, ADE_IDS))


def _nyu(root: Path, rng: np.random.Generator, n: int) -> None:
    """<scene>/rgb_<k>.jpg, <scene>/sync_depth_<k>.png (uint16 mm, 0 = invalid), nyu_train.txt, nyu_test.txt."""
    scenes = {"train": ("kitchen_0028b", "bedroom_0004"), "test": ("bathroom_0001", "office_0003")}
    for split, names in scenes.items():
        lines = []
        for i in range(n):
            scene, index = names[i % len(names)], i + 1
            rgb, depth = f"{scene}/rgb_{index:05d}.jpg", f"{scene}/sync_depth_{index:05d}.png"
            _rgb(root / rgb, rng, NYU_SIZE)
            millimetres = rng.integers(*DEPTH_RANGE_MM, NYU_SIZE).astype(np.uint16)
            millimetres[rng.random(NYU_SIZE) < INVALID_DEPTH_SHARE] = 0
            Image.fromarray(millimetres).save(root / depth)  # 16-bit PNG (mode I;16)
            lines.append(f"/{rgb} /{depth} 518.8579")
        _write_list(root / f"nyu_{split}.txt", lines)


def make_fake_datasets(root: Path, size: tuple[int, int] = (48, 64), images_per_split: int = 2,
                       seed: int = 0) -> Path:
    """Write every benchmark folder the paper configurations read under ``root`` (which stands for
    ``data/01_raw``); returns ``root``. Images are ``size`` (H, W), except NYUv2: 480x640 (the Eigen crop)."""
    if images_per_split < 1:
        raise ValueError(f"images_per_split must be >= 1, got {images_per_split}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    _voc2012(root / "VOCdevkit" / "VOC2012", rng, size, images_per_split)
    _voc2010_context(root / "VOCdevkit" / "VOC2010", rng, size, images_per_split)
    _coco_stuff(root / "coco_stuff164k", rng, size, images_per_split)
    _cityscapes(root / "cityscapes", rng, size, images_per_split)
    _ade20k(root / "ADEChallengeData2016", rng, size, images_per_split)
    _nyu(root / "nyu", rng, images_per_split)
    return root
