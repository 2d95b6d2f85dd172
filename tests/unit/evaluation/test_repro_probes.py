"""Issue 12, points 12-14: the linear probes as the official release ran them.

Online probe mode (features recomputed under augmentation for every batch), mmseg's RandomCrop ``cat_max_ratio``
rule, the cross-entropy averaged over all pixels (``avg_non_ignore=False``), mmseg's mAcc, and the paper
configurations (VOC21 on the plain ``train.txt``, online mode, the official augmentation and sliding stride).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from kedro.config import OmegaConfigLoader

from ph_reg.evaluation.probes.run import probe_feature_streams, run_probes, write_probe_stores
from ph_reg.evaluation.benchmarks import build_dataset
from ph_reg.evaluation.benchmarks.base import IGNORE_INDEX, DenseSample
from ph_reg.models import BackboneConfig, build_backbone
from ph_reg.evaluation.probes import (
    SegmentationProbeConfig,
    as_batch_source,
    evaluate_segmentation_probe,
    segmentation_metrics,
    train_segmentation_probe,
)
from ph_reg.evaluation.probes.online import (
    CAT_MAX_RETRIES,
    DepthAugmentation,
    OnlineBatchSource,
    SegmentationAugmentation,
    augment_segmentation,
    choose_crop,
    hsv_to_rgb,
    photometric_distortion,
    rescale_size,
    rgb_to_hsv,
    rotate,
)
from ph_reg.evaluation.probes.segmentation import segmentation_loss

PROJECT_ROOT = Path(__file__).resolve().parents[3]
TINY = {"arch": "timm:test_vit", "img_size": 64, "head": "final_norm"}   # the conftest tiny timm ViT (patch 16)
IMAGE = 64
TRAIN = {"type": "synthetic", "num_images": 6, "image_size": IMAGE, "seed": 0, "split": "train"}
VAL = {"type": "synthetic", "num_images": 2, "image_size": IMAGE, "seed": 0, "split": "val"}
SEG_SPEC = {"train": TRAIN, "val": VAL, "crop_size": IMAGE, "stride": IMAGE // 2,
            "probe": {"iterations": 3, "batch_size": 4, "device": "cpu"}}


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone(BackboneConfig.from_dict(TINY)).eval()


def load_evaluation(env: str) -> dict:
    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), base_env="base", default_run_env=env,
                               merge_strategy={"parameters": "soft", "globals": "soft"})
    return copy.deepcopy(loader["parameters"]["evaluation"])


# --- online mode, end to end --------------------------------------------------------------------------------------
def test_online_segmentation_probe_trains_with_augmentation_and_is_reproducible(tmp_path):
    model = tiny_model()
    dataset = build_dataset(TRAIN)
    source = OnlineBatchSource(model, dataset, SegmentationAugmentation.from_spec(SEG_SPEC), precision="fp32")
    assert as_batch_source(source) is source and source.embed_dim == model.embed_dim
    assert source.attrs["num_classes"] == dataset.num_classes and source.attrs["mode"] == "online"

    # batches: recomputed features on the augmented crops, padded labels; a fresh augmentation every pass
    batches = source.batches(6, torch.Generator().manual_seed(0), ("patch", "cls", "label"))
    first, second = next(batches), next(batches)
    assert first["patch"].shape == (6, IMAGE // 16, IMAGE // 16, model.embed_dim)
    assert first["cls"].shape == (6, model.embed_dim) and first["label"].shape == (6, IMAGE, IMAGE)
    assert first["label"].dtype == torch.int64
    assert not torch.equal(first["patch"], second["patch"])   # the same 6 images, augmented differently
    assert not torch.equal(first["label"], second["label"])
    # ratio 0.5..2 of a 64 px image: crops below 64 px are padded with ignored labels in some batch
    labels = torch.cat([first["label"], second["label"]])
    assert bool((labels == IGNORE_INDEX).any()) and bool((labels != IGNORE_INDEX).any())

    config = SEG_SPEC["probe"]
    history, again = [], []
    probe = train_segmentation_probe(source, config, seed=3, history=history)
    repeat = train_segmentation_probe(source, config, seed=3, history=again)
    other = train_segmentation_probe(source, config, seed=4)
    assert len(history) == config["iterations"] and all(math.isfinite(v) for v in history)
    assert history == again and torch.equal(probe.conv.weight, repeat.conv.weight)   # same seed: same run
    assert not torch.equal(probe.conv.weight, other.conv.weight)

    # the whole online path of run_probes: val stores only (no train feature cache), probes trained online
    models = {"teacher": model, "student": tiny_model(1)}
    tasks = {"segmentation": {"synthetic": SEG_SPEC}}
    streams = probe_feature_streams(models, tasks, 0, precision="fp32", mode="online")
    assert sorted(streams) == ["student/segmentation/synthetic/val", "teacher/segmentation/synthetic/val"]
    stores = write_probe_stores(streams, tmp_path)
    curves: dict[str, list[float]] = {}
    results = run_probes(stores, tasks, 0, curves, mode="online", models=models, precision="fp32")
    assert sorted(results) == ["student", "teacher"]
    for row in results.values():
        assert set(row) == {"synthetic/mIoU", "synthetic/mAcc"}
        assert all(0.0 <= value <= 100.0 for value in row.values())
    assert all(len(losses) == config["iterations"] for losses in curves.values())
    assert evaluate_segmentation_probe(probe, stores["teacher/segmentation/synthetic/val"])["mIoU"] >= 0.0
    with pytest.raises(ValueError, match="needs the models"):
        run_probes(stores, tasks, 0, mode="online")
    with pytest.raises(ValueError, match="evaluation.probes.mode"):
        probe_feature_streams(models, tasks, 0, mode="lazy")


def test_online_depth_batches_are_augmented_padded_and_seeded():
    model = tiny_model()
    dataset = build_dataset({**TRAIN, "num_images": 3})
    aug = DepthAugmentation(crop_size=(40, 52), nyu_crop=False, rotate_prob=1.0, color_prob=1.0)
    source = OnlineBatchSource(model, dataset, aug, precision="fp32")

    def batch(seed):
        return next(source.batches(3, torch.Generator().manual_seed(seed), ("patch", "cls", "depth")))

    one, same, other = batch(0), batch(0), batch(1)
    # 40x52 is centre-padded to 48x64 (multiples of the patch 16) before the backbone; the depth keeps the crop size
    assert one["patch"].shape == (3, 3, 4, model.embed_dim) and one["depth"].shape == (3, 40, 52)
    assert all(torch.equal(one[k], same[k]) for k in one) and not torch.equal(one["depth"], other["depth"])
    # reading the images in DataLoader workers changes nothing (all randomness is drawn in the main process)
    workers = OnlineBatchSource(model, dataset, aug, precision="fp32", num_workers=1)
    loaded = next(workers.batches(3, torch.Generator().manual_seed(0), ("patch", "cls", "depth")))
    assert all(torch.equal(one[k], loaded[k]) for k in one)
    with pytest.raises(ValueError, match="yields 'depth', not"):
        source.batches(3, torch.Generator(), ("patch", "label"))
    with pytest.raises(ValueError, match="nyu_crop needs NYUv2"):
        next(OnlineBatchSource(model, dataset, DepthAugmentation()).batches(1, torch.Generator(), ("depth",)))
    with pytest.raises(ValueError, match="unknown DepthAugmentation keys"):
        DepthAugmentation.from_spec({"augment": {"rotation": 2.5}})


def test_rotate_follows_mmcv_clockwise_convention_with_zero_border():
    image = torch.arange(25.0).view(1, 5, 5)
    # mmcv.imrotate: positive angles turn clockwise about ((W-1)/2, (H-1)/2); 90 degrees is exact
    assert torch.equal(rotate(image, 90.0, "nearest"), torch.rot90(image, -1, (-2, -1)))
    assert torch.equal(rotate(image, 0.0, "bilinear"), image)
    tilted = rotate(torch.ones(1, 9, 9), 30.0, "nearest")
    assert tilted[0, 0, 0] == 0 and tilted[0, 4, 4] == 1   # corners fall outside: border value 0 (invalid depth)


# --- mmseg RandomCrop with cat_max_ratio ------------------------------------------------------------------------
def test_cat_max_ratio_keeps_the_first_balanced_crop_else_the_last_draw():
    label = torch.zeros(4, 12, dtype=torch.long)
    label[:, 4:8] = 1                # columns 0-3: class 0, 4-7: class 1 (but pixel [3, 4]), 8-11: ignored
    label[3, 4] = 0
    label[:, 8:] = IGNORE_INDEX
    crop = (4, 4)
    single = (0, 0)                  # one class only: rejected
    dominated = (0, 3)               # column 3 class 0 + columns 4-6 class 1 but one pixel: 5 px class 0, 11 class 1
    ignored = (0, 8)                 # only ignored pixels: no class -> rejected
    balanced = (0, 2)                # columns 2-3 class 0, 4-5 class 1 but one pixel: 9/16 = 0.5625
    # the dominated crop: 11/16 = 0.6875 < 0.75 passes; at 0.6 it does not, the balanced one does
    assert choose_crop(label, [single, dominated, balanced], crop, 0.75) == 1
    assert choose_crop(label, [single, dominated, balanced], crop, 0.6) == 2
    # ignored pixels are left out of the counts: a crop of one class plus ignored pixels is rejected
    assert choose_crop(label, [(0, 6), balanced, single], crop, 0.75) == 1
    # none of the checked candidates passes: the last draw is kept unchecked (mmseg: 10 retries, then keep)
    candidates = [single] * CAT_MAX_RETRIES + [ignored]
    assert len(candidates) == CAT_MAX_RETRIES + 1
    assert choose_crop(label, candidates, crop, 0.75) == CAT_MAX_RETRIES
    assert choose_crop(label, [single, balanced], crop, 1.0) == 0   # cat_max_ratio 1 disables the check


def test_augment_segmentation_crop_respects_cat_max_ratio():
    # a 160x160 background label with a 40x40 square of class 1 in the middle: a random 64 px crop mostly holds
    # > 75 % background (rejected); a kept crop with the check holds > 25 % class 1 unless all 10 checks failed
    label = torch.zeros(160, 160, dtype=torch.long)
    label[60:100, 60:100] = 1
    sample = DenseSample(torch.zeros(3, 160, 160, dtype=torch.uint8), label, None, "square")
    settings = dict(crop_size=64, short_side=160, ratio_range=(1.0, 1.0), flip_prob=0.0, photometric=False)
    cpu = torch.device("cpu")

    def balanced_share(cat_max_ratio):
        aug = SegmentationAugmentation(**settings, cat_max_ratio=cat_max_ratio)
        _, labels = augment_segmentation([sample] * 32, aug, torch.Generator().manual_seed(0), cpu)
        assert labels.shape == (32, 64, 64)
        return ((labels == 1).flatten(1).float().mean(1) > 0.25).float().mean().item()

    assert balanced_share(0.75) >= 0.8   # at most 0.75 ** 10 = 6 % of the crops fall back to an unchecked draw
    assert balanced_share(1.0) <= 0.5    # unchecked: about a quarter of the crops


def test_rescale_size_is_mmcv_keep_ratio():
    assert rescale_size(375, 500, (2048, 518)) == (518, 691)      # 500 * 518/375 = 690.67 -> int(x + 0.5)
    assert rescale_size(100, 2000, (2048, 518)) == (102, 2048)    # the long side caps at 2048


def test_photometric_distortion_is_seeded_integer_valued_and_hsv_round_trips():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 6, 7), generator=gen).float()
    hue, sat, val = rgb_to_hsv(images)
    torch.testing.assert_close(hsv_to_rgb(hue, sat, val), images, atol=1e-3, rtol=0)
    out = photometric_distortion(images, torch.Generator().manual_seed(1))
    assert torch.equal(out, photometric_distortion(images, torch.Generator().manual_seed(1)))
    assert torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255
    assert (out != images).flatten(1).any(1).sum() >= 4     # each step applies with probability 1/2


# --- loss and metrics ---------------------------------------------------------------------------------------------
def test_cross_entropy_averages_over_all_pixels_ignored_included():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])      # (B=1, K=2, H=1, W=2)
    logits = torch.cat([logits, torch.zeros(1, 2, 1, 2)], 2)   # a second row of uniform logits: (1, 2, 2, 2)
    label = torch.tensor([[[0, 1], [IGNORE_INDEX, IGNORE_INDEX]]])
    # per-pixel cross-entropy of the two labelled pixels, by hand
    first = -math.log(math.exp(2) / (math.exp(2) + 1))
    second = -math.log(math.e / (math.e + 1))
    assert segmentation_loss(logits, label).item() == pytest.approx((first + second) / 4)     # mmseg default
    assert segmentation_loss(logits, label, avg_non_ignore=True).item() == pytest.approx((first + second) / 2)
    assert SegmentationProbeConfig().avg_non_ignore is False
    with pytest.raises(ValueError, match="avg_non_ignore"):
        SegmentationProbeConfig(avg_non_ignore="yes")


def test_macc_and_miou_against_a_hand_computed_confusion_matrix():
    # classes 0..4: class 3 is predicted but absent from the target; class 4 is absent from both
    target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, IGNORE_INDEX, IGNORE_INDEX])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 3, 2, 0, 4, 3])
    # confusion (rows target, columns prediction), ignored pixels dropped:
    #   0: [3, 1, 0, 0, 0]   1: [0, 2, 0, 1, 0]   2: [1, 0, 1, 0, 0]   3: [0] * 5   4: [0] * 5
    metrics = segmentation_metrics(5)
    metrics.update(pred[:5], target[:5])
    metrics.update(pred[5:], target[5:])
    expected = torch.tensor([[3, 1, 0, 0, 0], [0, 2, 0, 1, 0], [1, 0, 1, 0, 0], [0] * 5, [0] * 5])
    assert torch.equal(metrics.confusion, expected)
    out = metrics.compute()
    # mAcc = nanmean(intersection / label area): 3/4, 2/3, 1/2; classes 3 (predicted only) and 4 left out
    assert out["mAcc"].item() == pytest.approx((3 / 4 + 2 / 3 + 1 / 2) / 3)
    # mIoU: 3/5, 2/4, 1/2, class 3: 0/1 counts, class 4: 0/0 left out
    assert out["mIoU"].item() == pytest.approx((3 / 5 + 2 / 4 + 1 / 2 + 0) / 4)


# --- the paper configurations -------------------------------------------------------------------------------------
@pytest.mark.parametrize("env,stride", [("paper", 298), ("paper_dinov2", 341)])
def test_paper_probes_use_train_txt_online_mode_and_the_official_augmentation(env, stride):
    probes = load_evaluation(env)["probes"]
    assert probes["mode"] == "online"
    segmentation = probes["tasks"]["segmentation"]
    voc = segmentation["voc21"]["train"]
    assert voc["type"] == "voc" and voc["split"] == "train" and voc.get("aug", False) is False   # train.txt
    for name in ("voc21", "ade20k"):
        spec = segmentation[name]
        aug = SegmentationAugmentation.from_spec(spec)
        assert (aug.max_long_side, aug.ratio_range, aug.cat_max_ratio, aug.flip_prob, aug.photometric) == (
            2048, (0.5, 2.0), 0.75, 0.5, True)
        assert aug.crop_size == aug.short_side == spec["crop_size"] and spec["stride"] == stride
        assert not spec["probe"].get("avg_non_ignore", False)            # CE over all pixels
    if env == "paper_dinov2":
        assert segmentation["voc21"]["crop_size"] == 518
    depth = DepthAugmentation.from_spec(probes["tasks"]["depth"]["nyuv2"])
    assert depth == DepthAugmentation(crop_size=(416, 544), nyu_crop=True, rotate_prob=0.5, rotate_degree=2.5,
                                      flip_prob=0.5, color_prob=0.5, gamma_range=(0.9, 1.1),
                                      brightness_range=(0.75, 1.25), color_range=(0.9, 1.1))


def test_base_keeps_the_cached_fast_path():
    probes = load_evaluation("base")["probes"]
    assert probes["mode"] == "cached"
    # the synthetic depth benchmark can switch to online mode: its augmentation does not need NYUv2 images
    assert DepthAugmentation.from_spec(probes["tasks"]["depth"]["synthetic"]).nyu_crop is False
