"""Dataset readers on tiny fake folders built in the real on-disk layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ph_reg.evaluation.benchmarks import (
    ADE20K,
    CLASS_NAMES,
    COCOObject,
    COCOStuff,
    Cityscapes,
    NYUv2Depth,
    PascalContext,
    VOCSegmentation,
    build_dataset,
)

H, W = 6, 8


def _rgb(path: Path, seed: int, size: tuple[int, int] = (H, W), fmt: str | None = None) -> np.ndarray:
    array = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)
    return array


def _index_png(path: Path, values: list[int], palette: bool = False) -> np.ndarray:
    """An (H, W) label image cycling through ``values``; mode P with the VOC palette, else mode L."""
    array = np.resize(np.asarray(values, dtype=np.uint8), H * W).reshape(H, W)
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        image = Image.frombytes("P", (W, H), array.tobytes())
        image.putpalette(_voc_palette())
    else:
        image = Image.fromarray(array)
    image.save(path)
    return array


def _voc_palette() -> list[int]:
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def _write_list(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# VOC
# ----------------------------------------------------------------------------------------------------------------
VOC_LABELS = [0, 15, 255, 20, 1]


def _voc(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    for i, name in enumerate(["2007_000033", "2007_000042", "2008_000001"]):
        _rgb(voc / "JPEGImages" / f"{name}.jpg", i)
        _index_png(voc / "SegmentationClass" / f"{name}.png", VOC_LABELS, palette=True)
        _index_png(voc / "SegmentationClassAug" / f"{name}.png", [0, 7, 255])
    _write_list(voc / "ImageSets" / "Segmentation" / "val.txt", ["2008_000001", "2007_000033"])  # unsorted
    _write_list(voc / "ImageSets" / "Segmentation" / "train.txt", ["2007_000042"])
    _write_list(voc / "ImageSets" / "Segmentation" / "train_aug.txt", ["2007_000042", "2008_000001"])
    return voc


def test_voc_palette_labels_and_boundary(tmp_path: Path) -> None:
    voc = _voc(tmp_path)
    assert Image.open(voc / "SegmentationClass" / "2007_000033.png").mode == "P"
    ds = VOCSegmentation(voc, split="val")
    assert len(ds) == 2 and ds.num_classes == 21 and ds.class_names[0] == "background"
    assert [ds[i].name for i in range(2)] == ["2007_000033", "2008_000001"]
    sample = ds[0]
    assert sample.image.dtype == torch.uint8 and sample.image.shape == (3, H, W)
    assert sample.label.dtype == torch.int64 and sample.label.shape == (H, W)
    assert sample.depth is None
    expected = np.resize(np.asarray(VOC_LABELS), H * W).reshape(H, W)
    assert torch.equal(sample.label, torch.from_numpy(expected))          # palette index, 255 boundary kept
    assert torch.equal(sample.image, torch.from_numpy(np.array(Image.open(voc / "JPEGImages" / "2007_000033.jpg")
                                                                .convert("RGB"))).permute(2, 0, 1))


def test_voc_aug_and_voc20(tmp_path: Path) -> None:
    voc = _voc(tmp_path)
    aug = VOCSegmentation(voc, split="train", aug=True)
    assert [aug[i].name for i in range(len(aug))] == ["2007_000042", "2008_000001"]   # train_aug.txt
    assert set(aug[0].label.unique().tolist()) == {0, 7, 255}
    voc20 = VOCSegmentation(voc, split="val", num_classes=20)
    label = voc20[0].label
    expected = np.resize(np.asarray([255, 14, 255, 19, 0]), H * W).reshape(H, W)
    assert voc20.num_classes == 20 and voc20.class_names[0] == "aeroplane"
    assert torch.equal(label, torch.from_numpy(expected))


def test_voc_broken_layouts(tmp_path: Path) -> None:
    voc = _voc(tmp_path)
    with pytest.raises(ValueError, match="split"):
        VOCSegmentation(voc, split="validation")
    with pytest.raises(FileNotFoundError, match="Segmentation/trainval.txt"):
        VOCSegmentation(voc, split="trainval")
    (voc / "SegmentationClass" / "2008_000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="SegmentationClass/2008_000001.png"):
        VOCSegmentation(voc, split="val")
    (voc / "JPEGImages").rename(voc / "images")
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        VOCSegmentation(voc, split="val")


def test_label_size_mismatch_and_laziness(tmp_path: Path) -> None:
    voc = _voc(tmp_path)
    ds = VOCSegmentation(voc, split="train")
    # Reading is lazy: a file changed after construction is what __getitem__ returns.
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(voc / "SegmentationClass" / "2007_000042.png")
    with pytest.raises(ValueError, match="2007_000042"):
        ds[0]
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(voc / "SegmentationClass" / "2007_000042.png")
    with pytest.raises(ValueError, match="mode"):
        ds[0]


# ----------------------------------------------------------------------------------------------------------------
# ADE20K, Pascal-Context
# ----------------------------------------------------------------------------------------------------------------
def _ade(root: Path, labels: list[int]) -> Path:
    ade = root / "ADEChallengeData2016"
    for split in ("training", "validation"):
        for i in range(2):
            name = f"ADE_{split[:3]}_{i:08d}"
            _rgb(ade / "images" / split / f"{name}.jpg", i)
            _index_png(ade / "annotations" / split / f"{name}.png", labels)
    return ade


def test_ade20k_reduce_zero_label(tmp_path: Path) -> None:
    ade = _ade(tmp_path, [0, 1, 150, 13])
    ds = ADE20K(ade, split="validation")
    assert len(ds) == 2 and ds.num_classes == 150 and ds.class_names[:3] == ["wall", "building", "sky"]
    assert ds.class_names[-1] == "flag" and ds.class_names[7] == "bed"
    expected = np.resize(np.asarray([255, 0, 149, 12]), H * W).reshape(H, W)
    assert torch.equal(ds[1].label, torch.from_numpy(expected))
    assert ds[0].name == "ADE_val_00000000"
    assert ADE20K(ade, split="train").split == "training"


def test_ade20k_errors(tmp_path: Path) -> None:
    ade = _ade(tmp_path, [0, 151])
    with pytest.raises(ValueError, match="outside"):
        ADE20K(ade)[0]                                   # id 151 -> 150 is not an ADE class
    with pytest.raises(ValueError, match="split"):
        ADE20K(ade, split="test")
    (ade / "annotations" / "validation" / "ADE_val_00000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_val_00000001.png"):
        ADE20K(ade)
    with pytest.raises(FileNotFoundError, match="annotations"):
        ADE20K(tmp_path / "elsewhere")


def _context(root: Path) -> Path:
    ctx = root / "VOCdevkit" / "VOC2010"
    for i, name in enumerate(["2008_000002", "2008_000003"]):
        _rgb(ctx / "JPEGImages" / f"{name}.jpg", i)
        _index_png(ctx / "SegmentationClassContext" / f"{name}.png", [0, 1, 59, 30])
    _write_list(ctx / "ImageSets" / "SegmentationContext" / "val.txt", ["2008_000002", "2008_000003"])
    return ctx


def test_pascal_context_59_vs_60(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    c60, c59 = PascalContext(ctx, num_classes=60), PascalContext(ctx, num_classes=59)
    assert c60.num_classes == 60 and c60.class_names[0] == "background" and c60.class_names[1:] == c59.class_names
    assert c59.num_classes == 59 and c59.class_names[0] == "aeroplane" and c59.class_names[-1] == "wood"
    assert torch.equal(c60[0].label, torch.from_numpy(np.resize(np.asarray([0, 1, 59, 30]), H * W).reshape(H, W)))
    assert torch.equal(c59[0].label, torch.from_numpy(np.resize(np.asarray([255, 0, 58, 29]), H * W).reshape(H, W)))
    with pytest.raises(ValueError, match="num_classes"):
        PascalContext(ctx, num_classes=21)
    with pytest.raises(FileNotFoundError, match="SegmentationContext/train.txt"):
        PascalContext(ctx, split="train")


# ----------------------------------------------------------------------------------------------------------------
# COCO-Stuff / COCO-Object
# ----------------------------------------------------------------------------------------------------------------
COCO_TRAIN_IDS = [0, 79, 80, 170, 255, 12]


def _coco(root: Path) -> Path:
    coco = root / "coco_stuff164k"
    for i, name in enumerate(["000000000139", "000000000285"]):
        _rgb(coco / "images" / "val2017" / f"{name}.jpg", i)
        _index_png(coco / "annotations" / "val2017" / f"{name}_labelTrainIds.png", COCO_TRAIN_IDS)
    return coco


def test_coco_stuff_and_object(tmp_path: Path) -> None:
    coco = _coco(tmp_path)
    stuff, obj = COCOStuff(coco), COCOObject(coco, split="val")
    assert stuff.num_classes == 171 and obj.num_classes == 81 and obj.split == "val2017"
    assert obj.class_names[0] == "background" and obj.class_names[1:] == stuff.class_names[:80]
    assert obj.class_names[-1] == "toothbrush" and stuff.class_names[80] == "banner"
    grid = lambda v: torch.from_numpy(np.resize(np.asarray(v), H * W).reshape(H, W))  # noqa: E731
    assert torch.equal(stuff[0].label, grid(COCO_TRAIN_IDS))
    # things 0..79 -> 1..80, stuff 80..170 and the unlabelled 255 -> 0 (background; NACLIP's cvt_coco_object.py)
    assert torch.equal(obj[0].label, grid([1, 80, 0, 0, 0, 13]))
    assert [s.name for s in obj] == ["000000000139", "000000000285"]


def test_coco_missing_annotation(tmp_path: Path) -> None:
    coco = _coco(tmp_path)
    _rgb(coco / "images" / "val2017" / "000000000632.jpg", 9)
    with pytest.raises(FileNotFoundError, match="000000000632_labelTrainIds.png"):
        COCOObject(coco)
    with pytest.raises(FileNotFoundError, match="train2017"):
        COCOStuff(coco, split="train2017")


# ----------------------------------------------------------------------------------------------------------------
# Cityscapes
# ----------------------------------------------------------------------------------------------------------------
def test_cityscapes_train_ids_and_label_ids(tmp_path: Path) -> None:
    city = tmp_path / "cityscapes"
    a, b = "frankfurt_000000_000294", "lindau_000001_000019"
    _rgb(city / "leftImg8bit" / "val" / "frankfurt" / f"{a}_leftImg8bit.png", 0)
    _rgb(city / "leftImg8bit" / "val" / "lindau" / f"{b}_leftImg8bit.png", 1)
    _index_png(city / "gtFine" / "val" / "frankfurt" / f"{a}_gtFine_labelTrainIds.png", [0, 13, 18, 255])
    _index_png(city / "gtFine" / "val" / "lindau" / f"{b}_gtFine_labelIds.png", [7, 26, 33, 0, 4, 23])
    ds = Cityscapes(city, split="val")
    assert len(ds) == 2 and ds.num_classes == 19 and ds.class_names[13] == "car"
    grid = lambda v: torch.from_numpy(np.resize(np.asarray(v), H * W).reshape(H, W))  # noqa: E731
    assert ds[0].name == a and torch.equal(ds[0].label, grid([0, 13, 18, 255]))
    assert ds[1].name == b and torch.equal(ds[1].label, grid([0, 13, 18, 255, 255, 10]))
    _rgb(city / "leftImg8bit" / "val" / "lindau" / "lindau_000002_000019_leftImg8bit.png", 2)
    with pytest.raises(FileNotFoundError, match="lindau_000002_000019_gtFine_labelTrainIds.png"):
        Cityscapes(city, split="val")
    with pytest.raises(FileNotFoundError, match="leftImg8bit/train"):
        Cityscapes(city, split="train")


# ----------------------------------------------------------------------------------------------------------------
# NYUv2 depth
# ----------------------------------------------------------------------------------------------------------------
def _nyu(root: Path) -> Path:
    nyu = root / "nyu"
    depth_mm = np.resize(np.asarray([0, 1000, 2500, 65535], dtype=np.uint16), H * W).reshape(H, W)
    lines = []
    for scene, index in (("kitchen_0028b", 45), ("bathroom_0001", 3)):
        _rgb(nyu / scene / f"rgb_{index:05d}.jpg", index)
        path = nyu / scene / f"sync_depth_{index:05d}.png"
        Image.fromarray(depth_mm).save(path)
        lines.append(f"/{scene}/rgb_{index:05d}.jpg /{scene}/sync_depth_{index:05d}.png 518.8579")
    _write_list(nyu / "nyu_test.txt", lines)
    return nyu


def test_nyu_depth_millimetres_to_metres(tmp_path: Path) -> None:
    nyu = _nyu(tmp_path)
    assert Image.open(nyu / "bathroom_0001" / "sync_depth_00003.png").mode.startswith("I")   # 16-bit PNG
    ds = NYUv2Depth(nyu, split="test")
    assert len(ds) == 2 and [s.name for s in ds] == ["bathroom_0001/rgb_00003", "kitchen_0028b/rgb_00045"]
    sample = ds[1]
    assert sample.label is None and sample.image.shape == (3, H, W) and sample.image.dtype == torch.uint8
    assert sample.depth.dtype == torch.float32 and sample.depth.shape == (H, W)
    expected = np.resize(np.asarray([0.0, 1.0, 2.5, 65.535], dtype=np.float32), H * W).reshape(H, W)
    torch.testing.assert_close(sample.depth, torch.from_numpy(expected))
    assert NYUv2Depth(nyu, split="train", split_file="nyu_test.txt").split == "train"


def test_nyu_errors(tmp_path: Path) -> None:
    nyu = _nyu(tmp_path)
    with pytest.raises(FileNotFoundError, match="nyu_train.txt"):
        NYUv2Depth(nyu, split="train")
    with pytest.raises(ValueError, match="split"):
        NYUv2Depth(nyu, split="val")
    _write_list(nyu / "bad.txt", ["kitchen_0028b/rgb_00045.jpg"])
    with pytest.raises(ValueError, match="bad.txt:1"):
        NYUv2Depth(nyu, split_file="bad.txt")
    (nyu / "kitchen_0028b" / "sync_depth_00045.png").unlink()
    with pytest.raises(FileNotFoundError, match="sync_depth_00045.png"):
        NYUv2Depth(nyu)


# ----------------------------------------------------------------------------------------------------------------
# Class lists and the factory
# ----------------------------------------------------------------------------------------------------------------
def test_class_lists() -> None:
    sizes = {"voc21": 21, "voc20": 20, "ade20k": 150, "context60": 60, "context59": 59, "coco_stuff": 171,
             "coco_object": 81, "cityscapes": 19}
    assert {k: len(v) for k, v in CLASS_NAMES.items()} == sizes
    assert all(len(set(v)) == len(v) for v in CLASS_NAMES.values())
    assert CLASS_NAMES["voc21"][15] == "person" and CLASS_NAMES["coco_stuff"][170] == "wood"


def test_build_dataset(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    ds = build_dataset({"type": "pascal_context", "root": str(ctx), "num_classes": 60})
    assert isinstance(ds, PascalContext) and ds.num_classes == 60 and len(ds) == 2
    syn = build_dataset({"type": "synthetic", "num_images": 2, "image_size": 16})
    assert len(syn) == 2 and syn[0].label.shape == (16, 16)
    with pytest.raises(ValueError, match="unknown type"):
        build_dataset({"type": "imagenet"})
    with pytest.raises(ValueError, match="num_class"):
        build_dataset({"type": "voc", "root": str(tmp_path), "num_class": 20})
    with pytest.raises(ValueError, match="'type'"):
        build_dataset({"root": str(tmp_path)})
