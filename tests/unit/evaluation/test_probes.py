import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ph_reg.evaluation.benchmarks.base import IGNORE_INDEX, DenseDataset, DenseSample
from ph_reg.io.shards import ShardReader, write_shards
from ph_reg.models import DenseOutput, build_backbone
from ph_reg.evaluation.probes import (
    DepthProbeConfig,
    cached_image,
    evaluate_depth_probe,
    evaluate_segmentation_probe,
    feature_records,
    feature_stream,
    predict_depth,
    stitch_windows,
    train_depth_probe,
    train_segmentation_probe,
    window_boxes,
)
from ph_reg.evaluation.probes.cache import resize_dense, resize_image
from ph_reg.runtime import normalize

NUM_CLASSES = 4
PALETTE = torch.tensor([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=torch.float32)


class ListDataset(DenseDataset):
    name = "fake"

    def __init__(self, samples, num_classes=NUM_CLASSES):
        self.samples = samples
        self.class_names = [f"c{i}" for i in range(num_classes)]

    def __len__(self):
        return len(self.samples)

    def _load(self, index):
        return self.samples[index]


class PaletteModel(nn.Module):
    """Stand-in backbone: per patch, one-hot of the nearest palette colour (= the label) plus noise."""

    patch_size = 4
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)
    embed_dim = NUM_CLASSES + 2

    def __init__(self, noise=0.1):
        super().__init__()
        self.noise = noise
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, images):
        colour = F.avg_pool2d(images, self.patch_size) * 255  # (B, 3, h, w)
        dist = ((colour[:, None] - PALETTE[None, :, :, None, None]) ** 2).sum(2)  # (B, K, h, w)
        onehot = F.one_hot(dist.argmin(1), NUM_CLASSES).float()
        patch = torch.cat([onehot, torch.zeros(*onehot.shape[:3], 2)], -1)
        patch = patch + self.noise * torch.randn(patch.shape, generator=self.gen)
        return DenseOutput(patch=patch, cls=patch.mean((1, 2)))


class ColourModel(nn.Module):
    """Stand-in backbone: per-patch mean colour in [0, 1] (flip-equivariant); ``ramp`` adds a column ramp."""

    patch_size = 4
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)
    embed_dim = 4

    def __init__(self, ramp=False):
        super().__init__()
        self.ramp = ramp

    def forward(self, images):
        colour = F.avg_pool2d(images, self.patch_size).permute(0, 2, 3, 1)
        extra = torch.zeros(*colour.shape[:3], 1)
        if self.ramp:
            extra = extra + torch.linspace(0, 1, colour.shape[2]).view(1, 1, -1, 1)
        patch = torch.cat([colour, extra], -1)
        return DenseOutput(patch=patch, cls=patch.mean((1, 2)))


def _striped_label(height, width, stripe, gen):
    """Stripes ``stripe`` px wide with random classes, vertical or horizontal (no corners where 3 classes meet,
    so bilinear upsampling of patch logits can be exact)."""
    length = width if torch.rand((), generator=gen) < 0.5 else height
    classes = torch.randint(0, NUM_CLASSES, (math.ceil(length / stripe),), generator=gen)
    line = classes.repeat_interleave(stripe)[:length]
    return line.expand(height, width).clone() if length == width else line[:, None].expand(height, width).clone()


def _segmentation_dataset(count, height, width, stripe, seed):
    """Images coloured by the label's palette colour; a corner of every other label is set to ignore."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(count):
        label = _striped_label(height, width, stripe, gen)
        image = PALETTE[label].permute(2, 0, 1).to(torch.uint8)
        if i % 2 == 0:
            label[: height // 2, : width // 2] = IGNORE_INDEX
        samples.append(DenseSample(image, label, None, f"s{i}"))
    return ListDataset(samples)


def test_sliding_windows_cover_every_pixel():
    for height, width, crop, stride in [(64, 64, 64, 32), (64, 107, 64, 32), (70, 150, 48, 20), (33, 200, 32, 32)]:
        covered = torch.zeros(height, width, dtype=torch.int64)
        for top, left, bottom, right in window_boxes(height, width, crop, stride):
            assert 0 <= top and 0 <= left and bottom <= height and right <= width
            assert bottom - top == crop and right - left == crop
            covered[top:bottom, left:right] += 1
        assert bool((covered > 0).all())
    with pytest.raises(ValueError, match="stride"):
        window_boxes(64, 64, 32, 40)
    with pytest.raises(ValueError, match="smaller than the crop"):
        window_boxes(20, 64, 32, 16)


def test_stitch_windows_averages_overlaps():
    maps = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)])
    out = stitch_windows(maps, torch.tensor([[0, 0, 2, 2], [0, 1, 2, 3]]), (2, 3))
    assert torch.equal(out[0], torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]))
    with pytest.raises(ValueError, match="do not cover"):
        stitch_windows(maps, torch.tensor([[0, 0, 2, 2], [0, 0, 2, 2]]), (2, 3))


def test_cache_matches_direct_forward(tmp_path):
    model = build_backbone({"arch": "timm:test_vit", "img_size": 64})
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i, (height, width) in enumerate([(48, 80), (96, 64)]):
        image = torch.randint(0, 256, (3, height, width), generator=gen, dtype=torch.uint8)
        label = torch.randint(0, NUM_CLASSES, (height, width), generator=gen)
        depth = torch.rand(height, width, generator=gen) * 5
        samples.append(DenseSample(image, label, depth, f"img{i}"))
    dataset = ListDataset(samples)

    def direct(crop):
        with torch.no_grad():
            out = model(normalize(crop[None] / 255.0, model.mean, model.std))
        return out.patch[0], out.cls[0]

    # val: windows of the resized image, flipped windows, full-resolution targets
    stream = feature_stream(model, dataset, 64, 32, "val", batch_size=2, feature_dtype="float32", flip=True)
    assert stream.attrs["embed_dim"] == model.embed_dim and stream.attrs["split_kind"] == "val"
    write_shards(tmp_path / "val", stream.records, stream.records_per_shard, stream.attrs)
    store = ShardReader(tmp_path / "val")
    assert len(store) == 2 and store.attrs["num_classes"] == NUM_CLASSES
    for index, sample in enumerate(samples):
        image = cached_image(store, index)
        assert image.resized == {(48, 80): (64, 107), (96, 64): (96, 64)}[tuple(sample.image.shape[-2:])]
        assert torch.equal(image.label, sample.label) and torch.equal(image.depth, sample.depth)
        covered = torch.zeros(image.resized, dtype=torch.bool)
        resized = resize_image(sample.image, image.resized)
        for w, (top, left, bottom, right) in enumerate(image.boxes.tolist()):
            covered[top:bottom, left:right] = True
            crop = resized[:, top:bottom, left:right]
            patch, cls = direct(crop)
            assert torch.allclose(image.patch[w], patch, atol=1e-5) and torch.allclose(image.cls[w], cls, atol=1e-5)
            patch_flip, _ = direct(crop.flip(-1))
            assert torch.allclose(image.patch_flip[w], patch_flip, atol=1e-5)
        assert bool(covered.all())

    # train: a seeded random crop of the resized image with its targets at crop resolution, float16 features
    records = list(feature_records(model, dataset, 64, None, "train", batch_size=2, seed=3))
    assert [meta["name"] for _, meta in records] == ["img0", "img1"]
    for (tensors, _), sample in zip(records, samples):
        assert tensors["patch"].dtype == torch.float16 and tensors["patch"].shape == (4, 4, model.embed_dim)
        top, left, bottom, right = tensors["box"].tolist()
        assert bottom - top == 64 and right - left == 64
        size = {(48, 80): (64, 107), (96, 64): (96, 64)}[tuple(sample.image.shape[-2:])]
        patch, cls = direct(resize_image(sample.image, size)[:, top:bottom, left:right])
        assert torch.allclose(tensors["patch"].float(), patch, atol=2e-2, rtol=1e-2)
        assert torch.allclose(tensors["cls"].float(), cls, atol=2e-2, rtol=1e-2)
        assert torch.equal(tensors["label"].long(), resize_dense(sample.label, size)[top:bottom, left:right])
        assert torch.equal(tensors["depth"], resize_dense(sample.depth, size)[top:bottom, left:right])
    again = list(feature_records(model, dataset, 64, None, "train", batch_size=1, seed=3))
    assert all(torch.equal(a["box"], b["box"]) for (a, _), (b, _) in zip(records, again))
    boxes = {tuple(t["box"].tolist()) for s in range(6)
             for t, _ in feature_records(model, ListDataset(samples[:1]), 64, None, "train", seed=s)}
    assert len(boxes) > 1  # the crop position depends on the seed


def test_feature_records_rejects_bad_input():
    model = PaletteModel()
    good = DenseSample(torch.zeros(3, 16, 16, dtype=torch.uint8), torch.zeros(16, 16, dtype=torch.int64), None, "a")
    with pytest.raises(ValueError, match="crop_size"):
        feature_records(model, ListDataset([good]), 18, 8, "val")
    with pytest.raises(ValueError, match="stride"):  # stride None is the whole-image val mode (test_repro_depth.py)
        feature_records(model, ListDataset([good]), 16, 17, "val")
    with pytest.raises(ValueError, match="split_kind"):
        feature_records(model, ListDataset([good]), 16, 8, "test")
    with pytest.raises(ValueError, match="flip"):
        feature_records(model, ListDataset([good]), 16, 8, "train", flip=True)
    with pytest.raises(ValueError, match="short_side"):
        feature_records(model, ListDataset([good]), 16, 8, "val", short_side=8)
    bad_label = good._replace(label=torch.full((16, 16), 300))
    with pytest.raises(ValueError, match="label values"):
        next(feature_records(model, ListDataset([bad_label]), 16, 8, "val"))
    no_label = good._replace(label=None, name="b")
    with pytest.raises(ValueError, match="same targets"):
        list(feature_records(model, ListDataset([good, no_label]), 16, 8, "val"))


def test_segmentation_probe_learns_separable_task(tmp_path):
    model = PaletteModel()
    train = _segmentation_dataset(24, 16, 16, 8, seed=0)
    val = _segmentation_dataset(4, 24, 36, 12, seed=1)  # resized to 16x24: stripes 2 patches wide
    write_shards(tmp_path / "train", feature_records(model, train, 16, None, "train", batch_size=8),
                 records_per_shard=5, attrs={"num_classes": NUM_CLASSES})
    write_shards(tmp_path / "val", feature_records(model, val, 16, 8, "val"), records_per_shard=2)
    train_store, val_store = ShardReader(tmp_path / "train"), ShardReader(tmp_path / "val")
    config = {"iterations": 60, "lr": 0.1, "device": "cpu"}
    probe = train_segmentation_probe(train_store, config, seed=0)
    assert not probe.training and probe.num_classes == NUM_CLASSES
    result = evaluate_segmentation_probe(probe, val_store, NUM_CLASSES)
    assert set(result) == {"mIoU", "mAcc"}
    assert result["mIoU"] > 99.0 and result["mAcc"] > 99.0
    # seeded: the same seed gives the same probe; the loss curve has one entry per iteration and falls
    history = []
    again = train_segmentation_probe(train_store, config, seed=0, history=history)
    assert torch.equal(probe.conv.weight, again.conv.weight)
    assert len(history) == 60 and sum(history[-10:]) < 0.5 * sum(history[:10])
    # an untrained-looking probe (1 step) is far from perfect, so the metric is not trivially 100
    weak = train_segmentation_probe(train_store, {**config, "iterations": 1, "lr": 1e-6}, seed=0)
    assert evaluate_segmentation_probe(weak, val_store)["mIoU"] < 90.0
    with pytest.raises(ValueError, match="'val' feature cache, expected a 'train'"):
        train_segmentation_probe(val_store, config)
    with pytest.raises(ValueError, match=r"probe\.iters"):
        train_segmentation_probe(train_store, {"iters": 3})


def _smooth_image(height, width, gen):
    """uint8 image whose colour varies smoothly (a random low-frequency field per channel)."""
    field = torch.rand(1, 3, 3, 3, generator=gen)
    field = F.interpolate(field, size=(height, width), mode="bicubic", align_corners=True).clamp(0, 1)[0]
    return (field * 255).round().to(torch.uint8)


def _depth_dataset(count, height, width, seed):
    """Depth = bilinear upsampling of a per-patch depth that is linear in the ColourModel patch features:
    ``1 + 8 * mean red - 3 * mean green`` (so a probe predicting at patch resolution can fit it)."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(count):
        image = _smooth_image(height, width, gen)
        colour = F.avg_pool2d(image[None].float() / 255, ColourModel.patch_size)
        depth = (1 + 8 * colour[:, :1] - 3 * colour[:, 1:2]).clamp(0.5, 9.5)
        depth = F.interpolate(depth, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        depth[0, :] = 0.0  # an invalid row
        samples.append(DenseSample(image, None, depth, f"d{i}"))
    return ListDataset(samples, num_classes=0)


def _seg_val_store(tmp_path):
    write_shards(tmp_path / "seg_val", feature_records(ColourModel(), _segmentation_dataset(1, 16, 16, 8, 0), 16, 8))
    return ShardReader(tmp_path / "seg_val")


def test_depth_probe_fits_linear_depth(tmp_path):
    model = ColourModel()
    train, val = _depth_dataset(32, 16, 16, seed=0), _depth_dataset(4, 16, 24, seed=1)
    write_shards(tmp_path / "train", feature_records(model, train, 16, None, "train"), records_per_shard=8)
    write_shards(tmp_path / "val", feature_records(model, val, 16, 8, "val", flip=True), records_per_shard=2)
    train_store, val_store = ShardReader(tmp_path / "train"), ShardReader(tmp_path / "val")
    # the fitting machinery, with our BatchNorm option (the paper head has none) and a short warm-up for 300 iterations
    config = DepthProbeConfig(iterations=300, lr=0.2, upsample=1, sigloss_warmup_iters=10, warmup_iters=10,
                              batch_norm=True, device="cpu")
    history = []
    probe = train_depth_probe(train_store, config, seed=0, history=history)
    assert not probe.training
    assert len(history) == 300 and sum(history[-30:]) < 0.5 * sum(history[:30])
    result = evaluate_depth_probe(probe, val_store, per_image=False)
    assert set(result) == {"RMSE", "AbsRel", "delta1", "delta2", "delta3"}
    target_std = torch.cat([s.depth[s.depth > 0] for s in val.samples]).std().item()
    assert result["RMSE"] < 0.1 * target_std
    assert result["AbsRel"] < 0.05 and result["delta1"] > 95.0
    untrained = train_depth_probe(train_store, dataclasses.replace(config, iterations=1, lr=1e-6), seed=0)
    assert evaluate_depth_probe(untrained, val_store, per_image=False)["RMSE"] > 0.5 * target_std
    with pytest.raises(ValueError, match="lacks the keys \\['depth'\\]"):
        evaluate_depth_probe(probe, _seg_val_store(tmp_path))


def test_depth_flip_tta(tmp_path):
    val = _depth_dataset(2, 16, 24, seed=1)
    train = _depth_dataset(8, 16, 16, seed=0)
    config = DepthProbeConfig(iterations=5, device="cpu")
    for name, model in (("sym", ColourModel()), ("ramp", ColourModel(ramp=True))):
        write_shards(tmp_path / f"val_{name}", feature_records(model, val, 16, 8, "val", flip=True),
                     records_per_shard=2)
    write_shards(tmp_path / "train", feature_records(ColourModel(ramp=True), train, 16, None, "train"))
    probe = train_depth_probe(ShardReader(tmp_path / "train"), config, seed=0)
    # a flip-equivariant backbone: the flipped window's features are the flipped features -> TTA changes nothing
    sym = ShardReader(tmp_path / "val_sym")
    for index in range(len(sym)):
        image = cached_image(sym, index)
        assert torch.allclose(image.patch_flip, image.patch.flip(2))
        assert torch.allclose(predict_depth(probe, image, flip_tta=True), predict_depth(probe, image), atol=1e-5)
    # a backbone that is not: TTA = mean of the plain and the flipped-back flipped-window predictions
    ramp = ShardReader(tmp_path / "val_ramp")
    image = cached_image(ramp, 0)
    with torch.no_grad():
        plain = probe(image.patch, image.cls, size=(16, 16))
        flipped = probe(image.patch_flip, image.cls_flip, size=(16, 16)).flip(-1)
    expected = stitch_windows((0.5 * (plain + flipped))[:, None], image.boxes, image.resized)[0]
    tta = predict_depth(probe, image, flip_tta=True)
    assert torch.allclose(tta, expected, atol=1e-6)
    assert not torch.allclose(tta, predict_depth(probe, image), atol=1e-3)
    assert evaluate_depth_probe(probe, ramp)["RMSE"] != evaluate_depth_probe(probe, ramp, flip_tta=False)["RMSE"]
    no_flip = tmp_path / "val_noflip"
    write_shards(no_flip, feature_records(ColourModel(), val, 16, 8, "val"), records_per_shard=2)
    with pytest.raises(ValueError, match="flip=True"):
        evaluate_depth_probe(probe, ShardReader(no_flip), flip_tta=True)
