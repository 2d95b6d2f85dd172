"""Issue 12, points 8-11: the zero-shot harness and the evaluation precision as the official code runs them.

- COCO-Object labels as NACLIP's ``datasets/cvt_coco_object.py`` converts them (stuff and unlabelled -> background 0).
- mmseg's keep-ratio ``Resize(scale=(2048, S))`` caps the long side at 2048 (mmcv ``rescale_size``).
- Windows smaller than the crop are forwarded as they are (SCLIP/NACLIP/PH-Reg ``forward_slide``): the stride-patch
  embedding reads whole patches only and the logits are upsampled to the whole window.
- ``evaluation.precision`` reaches the zero-shot and probe forwards; a bad value is refused naming the key.
- ``conf/paper`` has every row of Table 1, the vanilla CLIP row included.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kedro.config import OmegaConfigLoader
from PIL import Image
from torch import nn

import ph_reg.evaluation.probes.run as probe_run
import ph_reg.evaluation.zeroshot.run as zero_shot_run
from ph_reg.evaluation.benchmarks import COCOObject
from ph_reg.evaluation.benchmarks.base import IGNORE_INDEX
from ph_reg.evaluation.benchmarks.readers import coco_object_lut, coco_object_raw_lut
from ph_reg.models import BackboneConfig
from ph_reg.pipelines.evaluation.nodes import cache_probe_features, evaluate_zero_shot
from ph_reg.evaluation.features import backbone_features
from ph_reg.runtime import PRECISIONS, autocast, check_precision
from ph_reg.config import from_mapping
from ph_reg.evaluation.zeroshot import BENCHMARKS, ZeroShotConfig
from ph_reg.reporting.tables import table1
from ph_reg.data.transforms import resize_tensor_short_side, resized_size
from ph_reg.evaluation.zeroshot.harness import (precision_dense_fn, segment_image,
                                     sliding_window_logits)

from conftest import PROJECT_ROOT

PATCH = 16
# The COCO category ids (0-based raw annotation ids) that COCO never uses; every other id 0..181 is listed in the
# raw id -> train id tables of mmseg's coco_stuff164k.py and NACLIP's cvt_coco_object.py, as is 255 (unlabelled).
COCO_UNUSED_IDS = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}


# ---------------------------------------------------------------------------------------------------------------
# Point 8: COCO-Object
# ---------------------------------------------------------------------------------------------------------------
def naclip_coco_object_table() -> tuple[dict[int, int], dict[int, int]]:
    """(raw id -> mmseg train id, raw id -> NACLIP COCO-Object id), rebuilt from the two conversions' rules: the
    listed raw ids in order get train ids 0..170 and 255 stays 255; NACLIP adds 1 to every train id and then sets
    every raw id above 90 to 0."""
    listed = [k for k in range(182) if k not in COCO_UNUSED_IDS]
    train = {raw: index for index, raw in enumerate(listed)}
    train[255] = 255
    naclip = {raw: 0 if raw > 90 else trid + 1 for raw, trid in train.items()}
    return train, naclip


def test_coco_object_raw_ids_above_90_and_255_map_to_background() -> None:
    train, naclip = naclip_coco_object_table()
    assert len(train) == 172 and max(train.values()) == 255 and sorted(train.values())[-2] == 170
    lut = coco_object_raw_lut()
    for raw in [*range(91, 182), 255]:
        assert lut[raw] == 0, raw
    for raw, expected in naclip.items():
        assert lut[raw] == expected, raw
    assert sorted(lut[raw] for raw in train if raw <= 90) == list(range(1, 81))   # the 80 things, once each
    for raw in sorted(COCO_UNUSED_IDS | set(range(182, 255))):   # never in the annotations: ignored
        assert lut[raw] == IGNORE_INDEX, raw


def test_coco_object_from_train_ids_equals_naclips_conversion() -> None:
    """Our reader reads mmseg's ``*_labelTrainIds.png``; through the train ids it gives NACLIP's labels."""
    train, naclip = naclip_coco_object_table()
    lut = coco_object_lut()
    for raw, trid in train.items():
        assert lut[trid] == naclip[raw], (raw, trid)


def test_coco_object_reader_counts_unlabelled_pixels_as_background(tmp_path: Path) -> None:
    root = tmp_path / "coco_stuff164k"
    (root / "images" / "val2017").mkdir(parents=True)
    (root / "annotations" / "val2017").mkdir(parents=True)
    train_ids = np.array([[0, 79, 80], [170, 255, 255]], dtype=np.uint8)
    Image.fromarray(np.zeros((2, 3, 3), dtype=np.uint8)).save(root / "images" / "val2017" / "000000000139.jpg")
    Image.fromarray(train_ids, mode="L").save(root / "annotations" / "val2017" / "000000000139_labelTrainIds.png")
    label = COCOObject(root)[0].label
    assert torch.equal(label, torch.tensor([[1, 80, 0], [0, 0, 0]]))
    assert not bool((label == IGNORE_INDEX).any())   # unlabelled pixels count (as background) in mIoU


# ---------------------------------------------------------------------------------------------------------------
# Point 10: resize with the long-side cap, small windows as they are
# ---------------------------------------------------------------------------------------------------------------
def mmcv_rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``rescale_size`` for a tuple scale (what ``Resize(scale=..., keep_ratio=True)`` does), returned as
    (H, W): factor = min(max(scale) / long side, min(scale) / short side), sides rounded as int(x + 0.5)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


@pytest.mark.parametrize("height,width,short", [
    (375, 500, 448), (500, 333, 336), (1024, 2048, 560), (100, 2000, 448), (2000, 90, 336), (300, 3000, 336),
    (21, 640, 448), (448, 448, 448),
])
def test_resize_caps_the_long_side_like_mmseg(height: int, width: int, short: int) -> None:
    expected = mmcv_rescale_size(height, width, (2048, short))
    assert resized_size(height, width, short, 2048) == expected
    assert resize_tensor_short_side(torch.zeros(1, 3, height, width), short, 2048).shape[-2:] == expected
    uncapped = resized_size(height, width, short, None)
    assert min(uncapped) == short
    if max(height, width) * short / min(height, width) > 2048 + 1:   # the cap binds: the long side is 2048
        assert max(expected) == 2048 and uncapped != expected


def test_settings_check_the_resize_and_small_windows() -> None:
    with pytest.raises(ValueError, match="small_window"):
        ZeroShotConfig(short_side=448, crop=336, small_window="crop")
    with pytest.raises(ValueError, match="max_long_side"):
        ZeroShotConfig(short_side=448, crop=336, max_long_side=300)


def patch_mean_features(images: torch.Tensor) -> torch.Tensor:
    """A stride-16 patch embedding stand-in: avg_pool2d(16), which like the conv drops the pixels past the last
    whole patch."""
    return F.avg_pool2d(images, PATCH).permute(0, 2, 3, 1)


def test_a_small_window_is_used_as_is() -> None:
    """A 40x50 image, crop 64: one 40x50 window. As SCLIP/NACLIP/PH-Reg's forward_feature: the patch embedding of
    the unpadded window gives a 2x3 grid (the last 8 rows and 2 columns are dropped) whose logits are upsampled
    bilinearly to the whole 40x50 window."""
    image = torch.randn(1, 3, 40, 50, generator=torch.Generator().manual_seed(0))
    text = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    seen: list[tuple[int, ...]] = []

    def dense_fn(images: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(images.shape[-2:]))
        return patch_mean_features(images)

    logits = sliding_window_logits(dense_fn, image, text, crop=64, stride=64, patch_size=PATCH, small_window="as_is")
    coarse = torch.einsum("qc,bhwc->bqhw", F.normalize(text, dim=-1),
                          F.normalize(patch_mean_features(image), dim=-1))   # the official conv on the raw window
    assert coarse.shape[-2:] == (2, 3)
    expected = F.interpolate(coarse, size=(40, 50), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    assert seen == [(32, 48)]   # only whole patches are forwarded; nothing is padded

    padded = sliding_window_logits(dense_fn, image, text, crop=64, stride=64, patch_size=PATCH, small_window="pad")
    assert seen[-1] == (48, 64) and (padded - logits).abs().max() > 1e-3   # the named option differs


def test_long_side_cap_and_small_windows_in_segment_image() -> None:
    """A 40x400 image at short side 64 with the long side capped at 256: factor min(64/40, 256/400) = 0.64 ->
    26x256, so the 32-pixel windows are 26 rows high: forwarded as 16 rows (as_is) or padded to 32 (pad)."""
    image = torch.randint(0, 256, (3, 40, 400), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(3, 3, generator=torch.Generator().manual_seed(1))
    for small_window, rows in (("as_is", 16), ("pad", 32)):
        seen: list[tuple[int, ...]] = []

        def dense_fn(images: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(images.shape))
            return patch_mean_features(images)

        settings = ZeroShotConfig(short_side=64, crop=32, stride=32, max_long_side=256, batch_size=100,
                                    small_window=small_window)
        out = segment_image(dense_fn, image, text, [0, 1, 2], 3, settings)
        assert out.pred.shape == (40, 400)
        # one batch of 1 x 8 windows (256 / 32; uncapped, 64x640 would give 2 x 20 windows of 32x32)
        assert seen == [(8, 3, rows, 32)]


# ---------------------------------------------------------------------------------------------------------------
# Point 11: evaluation precision
# ---------------------------------------------------------------------------------------------------------------
def autocast_state() -> torch.dtype:
    """The dtype matmuls run in here on the CPU: the autocast dtype when autocast is on, else float32."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                             ("fp16", torch.float16), ("auto", torch.float32)])
def test_precision_reaches_the_zero_shot_forward(precision: str, dtype: torch.dtype) -> None:
    seen: list[torch.dtype] = []

    def dense_fn(images: torch.Tensor) -> torch.Tensor:
        seen.append(autocast_state())
        return patch_mean_features(images)

    image = torch.randint(0, 256, (3, 32, 48), dtype=torch.uint8)
    settings = ZeroShotConfig(short_side=32, crop=32, stride=16)
    wrapped = precision_dense_fn(dense_fn, precision)
    with torch.autocast("cpu", dtype=torch.float16):   # an outer autocast does not leak into an fp32 forward
        segment_image(wrapped, image, torch.randn(2, 3), [0, 1], 2, settings)
    assert seen and set(seen) == {dtype}   # auto is fp32 on the CPU (bf16 on CUDA)


class RecordingBackbone(nn.Module):
    """A DenseViT stand-in for the probe cache: records the autocast dtype its forward runs under."""

    patch_size = PATCH
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)
    embed_dim = 3

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.seen: list[torch.dtype] = []

    def forward(self, images: torch.Tensor) -> SimpleNamespace:
        self.seen.append(autocast_state())
        patch = patch_mean_features(images) * self.scale
        return SimpleNamespace(patch=patch, cls=patch.mean(dim=(1, 2)))


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_reaches_the_probe_feature_forward(precision: str, dtype: torch.dtype) -> None:
    model = RecordingBackbone()
    backbone_features(model, torch.rand(2, 3, 32, 32) * 255, precision=precision)
    assert model.seen == [dtype]

    model = RecordingBackbone()
    tasks = {"segmentation": {"synthetic": {
        "train": {"type": "synthetic", "num_images": 2, "image_size": 32, "seed": 0, "split": "train"},
        "val": {"type": "synthetic", "num_images": 1, "image_size": 32, "seed": 0, "split": "val"},
        "crop_size": 32, "stride": 16}}}
    streams = probe_run.probe_feature_streams({"teacher": model}, tasks, seed=0, batch_size=2, precision=precision)
    for stream in streams.values():
        assert stream.attrs["precision"] == precision
        assert len(list(stream.records)) >= 1
    assert model.seen and set(model.seen) == {dtype}


def test_precision_reaches_every_zero_shot_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """zero_shot_run wraps each head's dense function (here recording stand-ins) in the configured precision."""
    seen: dict[str, list[torch.dtype]] = {}

    def recording(model, head="ph_reg", *args):
        def dense_fn(images: torch.Tensor) -> torch.Tensor:
            seen.setdefault(head, []).append(autocast_state())
            return torch.randn(images.shape[0], images.shape[-2] // PATCH, images.shape[-1] // PATCH, 8)
        return dense_fn

    monkeypatch.setattr(zero_shot_run, "make_dense_fn", recording)
    monkeypatch.setattr(zero_shot_run, "model_dense_fn", recording)
    monkeypatch.setattr(zero_shot_run, "text_embeddings",
                        lambda encoder, tokenizer, queries, **kw: torch.randn(len(queries), 8))
    base = BackboneConfig(arch="open_clip:ph-reg-tiny-ViT-16", img_size=32)
    benchmark = {"dataset": {"type": "synthetic", "num_images": 1, "image_size": 32, "seed": 0, "split": "val"},
                 "classes": "dataset", "settings": {"short_side": 32, "crop": 32, "stride": 16}}
    student = RecordingBackbone()   # the "ph_reg" row's model (its dense function is the recording stand-in)
    zero_shot_run.zero_shot_evaluation(student, base, ["vanilla", "naclip", "ph_reg"], {"synthetic": benchmark},
                                       precision="bf16")
    assert set(seen) == {"vanilla", "naclip", "ph_reg"}
    assert all(set(dtypes) == {torch.bfloat16} for dtypes in seen.values())


@pytest.mark.parametrize("bad", ["float32", "BF16", None, 16])
def test_a_bad_precision_is_refused_naming_the_key(bad: object) -> None:
    with pytest.raises(ValueError, match=r"evaluation\.precision must be one of"):
        check_precision(bad, "evaluation.precision")
    params = {"precision": bad, "device": "cpu", "zero_shot": {}, "probes": {}}
    with pytest.raises(ValueError, match=r"evaluation\.precision"):   # refused before any model is built
        evaluate_zero_shot({}, {}, {}, params, {}, seed=0)
    with pytest.raises(ValueError, match=r"evaluation\.precision"):
        cache_probe_features({}, {}, {}, params, seed=0)
    with pytest.raises(ValueError, match="precision"):
        autocast(torch.device("cpu"), bad)


# ---------------------------------------------------------------------------------------------------------------
# Configuration: conf/paper and conf/paper_dinov2
# ---------------------------------------------------------------------------------------------------------------
def evaluation_params(env: str) -> dict:
    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), base_env="base", default_run_env=env,
                               merge_strategy={"parameters": "soft", "globals": "soft"})
    return copy.deepcopy(loader["parameters"]["evaluation"])


def test_conf_paper_has_the_vanilla_row_and_the_official_settings() -> None:
    params = evaluation_params("paper")
    heads = params["zero_shot"]["heads"]
    assert heads == ["vanilla", "maskclip", "sclip", "clearclip", "naclip", "maskclip_tta", "ttr", "ttr_maskclip",
                     "ph_reg"]   # Table 1's rows, and test-time registers on the vanilla and MaskCLIP heads
    assert params["probes"]["ttr"] is True and evaluation_params("paper_dinov2")["probes"]["ttr"] is True
    assert params["precision"] == "fp32"
    settings = {name: from_mapping(ZeroShotConfig, params["zero_shot"]["benchmarks"][name]["settings"], name)
                for name in params["zero_shot"]["run"]}
    assert set(settings) == set(BENCHMARKS)
    for name, config in settings.items():   # PH-Reg's per-benchmark settings (docs/method.md section 6)
        assert config.max_long_side == 2048 and config.small_window == "as_is", name
        assert config.stride == 112 and config.logit_scale == 40.0, name
    assert settings["cityscapes"] == ZeroShotConfig(short_side=560, crop=224)
    assert settings["coco_object"] == ZeroShotConfig(short_side=336, crop=336, prob_thd=0.1)
    assert [k for k, s in settings.items() if s.prob_thd > 0] == ["voc21", "context60", "coco_object"]
    assert evaluation_params("paper_dinov2")["precision"] == "fp32"
    assert evaluation_params("base")["precision"] in PRECISIONS


def test_table1_reports_the_vanilla_row_without_published_numbers() -> None:
    report, markdown = table1({"vanilla": {"voc21": 18.0, "ade20k": 3.0}, "naclip": {"voc21": 58.0, "ade20k": 17.0}})
    row = report["rows"]["vanilla"]
    assert row["published_row"] is None and row["ours"] == {"voc21": 18.0, "ade20k": 3.0, "avg": 10.5}
    assert set(row["published"].values()) == {None} and set(row["diff"].values()) == {None}
    assert "| vanilla | 18.00 | 3.00 | 10.50 |" in markdown
    assert report["rows"]["naclip"]["published"]["voc21"] == 58.88

