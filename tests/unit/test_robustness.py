"""Robustness (issue 8): messy image folders, mistyped configuration, offline weights, interruption, failed
writes and non-finite batches. Every case asserts what the user sees."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ph_reg.config import ConfigError, from_mapping
from ph_reg.params import backbone_params, data_preparation_params, student_distillation_params, teacher_denoising_params, validate_parameters
from ph_reg.data.prepare import DataPreparationConfig, prepared_records
from ph_reg.method.tta import TTAConfig
from ph_reg.data.sources import SKIP_REPORT_NAME, SkipReport, UnusableImage, iter_source_images, load_image, source_items
from ph_reg.method.data import RandomCrops, StoredImageLoader
from ph_reg.method.config import DistillConfig
from ph_reg.method.train import NonFiniteBatchesError, TrainingInterrupted, distill
from ph_reg.runtime import Interrupted
from ph_reg.io.shards import RecordStream, ShardReader, write_stream
from ph_reg.io.files import WriteError, save_tensors, write_json
from ph_reg.models import WeightsUnavailableError, build_backbone
from kedro.io import DatasetError
from ph_reg.kedro_datasets import ShardStoreDataset
from ph_reg.pipelines.data_preparation.nodes import prepare_images
from ph_reg.pipelines.teacher_denoising.nodes import denoise_teacher
from training_support import SignalAt, TinyDense, _copies, _dataset, _load, _state

TINY_CLIP = {"arch": "open_clip:ph-reg-tiny-ViT-16", "img_size": 64}
TINY_TIMM = {"arch": "timm:test_vit", "img_size": 32}


# --- images ------------------------------------------------------------------------------------------------------

def _rgb(width=48, height=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _png16_rgb(array: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    height, width, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _skip_reason(path: Path, **kwargs) -> str:
    with pytest.raises(UnusableImage) as caught:
        load_image(path, **kwargs)
    return caught.value.reason


def test_zero_byte_file_is_skipped_with_reason(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert _skip_reason(tmp_path / "empty.jpg") == "empty file (0 bytes)"


def test_truncated_file_is_skipped_with_reason(tmp_path):
    data = _png_bytes(_rgb(64, 64))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert "truncated" in _skip_reason(tmp_path / "cut.png")
    buffer = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buffer, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[:300])
    assert "truncated" in _skip_reason(tmp_path / "cut.jpg")


def test_corrupt_file_is_skipped_with_reason(tmp_path):
    data = bytearray(_png_bytes(_rgb(32, 32)))
    data[40:80] = bytes(40)  # damaged compressed data behind a valid header
    (tmp_path / "bad.png").write_bytes(bytes(data))
    reason = _skip_reason(tmp_path / "bad.png")
    assert reason and "bad.png" not in reason  # the reason explains; the caller names the file


def test_non_image_files_are_ignored_or_skipped(tmp_path):
    Image.fromarray(_rgb()).save(tmp_path / "ok.png")
    (tmp_path / "notes.txt").write_text("a caption file")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01binary")
    (tmp_path / "fake.jpg").write_text("this is text, not a JPEG")
    report = SkipReport(str(tmp_path))
    names = [name for name, _ in iter_source_images(str(tmp_path), report=report)]
    assert names == ["ok.png"]
    assert report.ignored == [".DS_Store", "notes.txt"]
    assert report.skipped == [{"name": "fake.jpg", "reason": "not a readable image: Pillow does not recognise the "
                                                            "content of this .jpg file"}]


def test_grayscale_is_replicated_to_rgb(tmp_path):
    gray = np.arange(48 * 40, dtype=np.uint8).reshape(40, 48)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    Image.fromarray(gray > 100).save(tmp_path / "bw.png")  # 1-bit
    image = np.asarray(load_image(tmp_path / "g.png"))
    assert image.shape == (40, 48, 3) and (image == gray[..., None]).all()
    assert set(np.unique(np.asarray(load_image(tmp_path / "bw.png")))) == {0, 255}


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[:, :24] = (200, 10, 10, 255)  # opaque red half, fully transparent (black) half
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    image = np.asarray(load_image(tmp_path / "a.png"))
    assert (image[:, :24] == (200, 10, 10)).all() and (image[:, 24:] == 255).all()


def test_palette_images_keep_their_colours(tmp_path):
    palette = Image.fromarray(_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.save(tmp_path / "p.png")
    expected = np.asarray(palette.convert("RGB"))
    assert (np.asarray(load_image(tmp_path / "p.png")) == expected).all()
    transparent = Image.new("P", (40, 40), 0)
    transparent.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    transparent.paste(1, (0, 0, 20, 40))
    transparent.save(tmp_path / "t.gif", transparency=0)
    image = np.asarray(load_image(tmp_path / "t.gif"))
    assert (image[:, :20] == (0, 255, 0)).all() and (image[:, 20:] == 255).all()  # transparent index -> white


def test_cmyk_is_converted(tmp_path):
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp_path / "c.tiff")
    for name in ("c.jpg", "c.tiff"):
        assert np.abs(np.asarray(load_image(tmp_path / name)).astype(int) - (255, 0, 0)).max() <= 2


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    gray = np.full((40, 40), 32896, np.uint16)  # mid-gray on the 16-bit scale
    gray[:, :10] = 65535
    Image.fromarray(gray).save(tmp_path / "g16.png")
    Image.fromarray(gray).save(tmp_path / "g16.tif")
    for name in ("g16.png", "g16.tif"):
        image = np.asarray(load_image(tmp_path / name))
        assert (image[:, :10] == 255).all() and (image[:, 10:] == 128).all(), name
    rgb = np.zeros((40, 40, 3), np.uint16)
    rgb[..., 0], rgb[..., 1] = 65535, 32896
    (tmp_path / "rgb16.png").write_bytes(_png16_rgb(rgb))
    assert (np.asarray(load_image(tmp_path / "rgb16.png")) == (255, 128, 0)).all()


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :5] = 255  # a white band on the left of the stored (landscape) pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    image = np.asarray(load_image(tmp_path / "rotated.jpg"))
    assert image.shape[:2] == (40, 20)  # displayed portrait
    assert image[:5].mean() > 200 and image[10:].mean() < 50  # the band is now on top


def test_small_images_are_upscaled_and_tiny_ones_skipped(tmp_path):
    Image.fromarray(_rgb(40, 40)).save(tmp_path / "small.png")  # below the 64 crop, above min_side
    Image.fromarray(_rgb(20, 30)).save(tmp_path / "tiny.png")   # below min_side
    report = SkipReport(str(tmp_path))
    config = DataPreparationConfig(source=str(tmp_path), image_size=64, min_side=32, val_fraction=0.0)
    records = list(prepared_records(config, seed=0, report=report))
    assert [meta["name"] for _, meta in records] == ["small.png"]
    assert records[0][0]["image"].shape == (3, 64, 64)
    assert report.skipped == [{"name": "tiny.png", "reason": "image is 20x30, its short side is below "
                               "data_preparation.min_side=32 (lower min_side to upscale it instead)"}]


def test_decompression_bombs_are_skipped_before_decoding(tmp_path):
    Image.fromarray(_rgb(50, 50)).save(tmp_path / "big.png")
    reason = _skip_reason(tmp_path / "big.png", max_pixels=1000)
    assert reason.startswith("50x50 = 2500 pixels is above data_preparation.max_image_pixels=1000")
    limit = Image.MAX_IMAGE_PIXELS
    assert load_image(tmp_path / "big.png", max_pixels=None).size == (50, 50)
    assert Image.MAX_IMAGE_PIXELS == limit  # Pillow's global limit is restored
    Image.fromarray(_rgb(2000, 32)).save(tmp_path / "strip.png")  # fine alone, too large once resized to 64
    report = SkipReport(str(tmp_path))
    names = [n for n, _ in iter_source_images(str(tmp_path), report=report, max_pixels=100_000, resize_to=64)]
    assert names == ["big.png"] and [s["name"] for s in report.skipped] == ["strip.png"]
    assert "resizing its short side to 64 would give 256000 pixels" in report.skipped[0]["reason"]


def test_upper_case_and_unusual_extensions_are_read(tmp_path):
    for name, fmt in [("A.JPG", "JPEG"), ("b.Jpeg", "JPEG"), ("c.jfif", "JPEG"), ("d.TIFF", "TIFF"),
                      ("e.PNG", "PNG"), ("f.webp", "WEBP"), ("g.pgm", "PPM"), ("h.GIF", "GIF")]:
        image = Image.fromarray(_rgb())
        (image.convert("L") if name.endswith("pgm") else image).save(tmp_path / name, fmt)
    names = [name for name, image in iter_source_images(str(tmp_path)) if image.size == (48, 40)]
    assert names == ["A.JPG", "b.Jpeg", "c.jfif", "d.TIFF", "e.PNG", "f.webp", "g.pgm", "h.GIF"]


def test_empty_folder_and_nothing_usable_fail_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        list(iter_source_images(str(tmp_path / "empty")))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"")
    (bad / "b.png").write_text("nope")
    with pytest.raises(ValueError, match=r"yielded no usable image \(0 images used, 2 skipped.*a.jpg: empty file"):
        list(prepared_records(DataPreparationConfig(source=str(bad), image_size=32), seed=0))


def test_raise_policy_names_the_file(tmp_path):
    Image.fromarray(_rgb()).save(tmp_path / "ok.png")
    (tmp_path / "zz.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot use image 'zz.png' .*empty file \(0 bytes\).*on_error: skip"):
        list(iter_source_images(str(tmp_path), on_error="raise"))


def test_skip_report_artifact_and_final_log_line(tmp_path, caplog):
    source = tmp_path / "images"
    source.mkdir()
    for i in range(3):
        Image.fromarray(_rgb(seed=i)).save(source / f"img{i}.png")
    (source / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (source / "readme.md").write_text("#")
    stream = prepare_images({"source": str(source), "image_size": 32, "min_side": 8, "records_per_shard": 2}, seed=0)
    store = tmp_path / "prepared"
    with caplog.at_level("INFO"):
        ShardStoreDataset(str(store)).save(stream)
    assert len(ShardReader(store)) == 3
    report = json.loads((store / SKIP_REPORT_NAME).read_text())
    assert report["used"] == 3 and report["skipped_count"] == 1
    assert report["skipped"][0]["name"] == "broken.jpg" and report["skipped"][0]["reason"]
    assert report["ignored_non_image_files"] == ["readme.md"]
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("ph_reg")]
    assert any("3 images used, 1 skipped, 1 non-image files ignored" in m for m in messages)


def test_online_crops_survive_a_file_gone_bad_during_training(tmp_path):
    source = tmp_path / "images"
    source.mkdir()
    for i in range(3):
        Image.fromarray(_rgb(40, 40, seed=i)).save(source / f"img{i}.png")
    store = tmp_path / "prepared"
    config = DataPreparationConfig(source=str(source), image_size=32, min_side=8, val_fraction=0.0)
    write_stream(store, RecordStream(prepared_records(config, seed=0)))
    images = ShardReader(store)
    loaders = [load for _, load in source_items(str(source))]
    (source / "img1.png").write_bytes(b"")  # the file breaks after preparation
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    crops = RandomCrops(loaders, 32, mean, std, seed=0, fallbacks=[StoredImageLoader(images, i) for i in range(3)])
    crop, target, index, substituted = crops[(0, 1)]
    assert target is None and index == 1 and substituted and crop.shape == (3, 32, 32)
    assert not crops[(0, 0)].substituted
    without = RandomCrops(loaders, 32, mean, std, seed=0)
    with pytest.raises(ValueError, match="img1.png: empty file"):
        without[(0, 1)]

    class Student(TinyDense):  # 32x32 crops -> a 2x2 "patch" grid, like the datasets of test_distill
        def forward(self, x):
            return super().forward(torch.nn.functional.avg_pool2d(x, 16))

    class Zero:
        def to(self, device):
            return self

        def __call__(self, images, epoch, indices):
            return torch.zeros(images.shape[0], 2, 2, 4)

    history = distill(Student(), crops, DistillConfig(epochs=2, batch_size=2), seed=0, progress=False,
                      online_targets=Zero())
    assert [row["substituted_images"] for row in history] == [1, 1]


# database=None: no .hypothesis folder in the work tree; every run draws fresh examples from hypothesis' seed
PROPERTY = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(max_examples=150, **PROPERTY)
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".jpg", ".png", ".gif", ".tif", ".bmp", ".webp"]),
       prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"II*\x00", b"BM",
                               b"RIFF\x00\x00\x00\x00WEBPVP8 "]))
def test_property_random_bytes_load_or_skip_with_reason(tmp_path, data, suffix, prefix):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(prefix + data)
    try:
        image = load_image(path)
    except UnusableImage as error:
        assert error.reason
    else:
        assert image.mode == "RGB" and min(image.size) >= 1


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "I;16B", "F"]
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp", "GIF": ".gif", "WEBP": ".webp"}


@settings(max_examples=120, **PROPERTY)
@given(mode=st.sampled_from(MODES), fmt=st.sampled_from(sorted(FORMATS)), width=st.integers(1, 300),
       height=st.integers(1, 300), seed=st.integers(0, 2**16), cut=st.none() | st.floats(0.0, 1.0))
def test_property_random_modes_and_sizes_load_or_skip(tmp_path, mode, fmt, width, height, seed, cut):
    rgb = Image.fromarray(_rgb(width, height, seed))
    try:
        image = rgb.convert(mode)
    except ValueError:
        image = Image.new(mode, (width, height))
    buffer = io.BytesIO()
    try:
        image.save(buffer, fmt)
    except (OSError, ValueError, KeyError):
        return  # Pillow cannot write this mode in this format: nothing to read
    data = buffer.getvalue()
    if cut is not None:  # also a truncated copy
        data = data[: int(len(data) * cut)]
    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # one folder per example
    path = folder / f"x{FORMATS[fmt]}"
    path.write_bytes(data)
    report = SkipReport(str(folder))
    loaded = list(iter_source_images(str(folder), min_side=1, report=report, resize_to=64))
    if loaded:
        name, result = loaded[0]
        assert name == path.name and result.mode == "RGB" and sorted(result.size) == sorted((width, height))
        assert report.skipped == []
    else:
        assert [s["name"] for s in report.skipped] == [path.name] and report.skipped[0]["reason"]
        assert cut is not None or len(data) == 0 or report.skipped[0]["reason"]


# --- configuration -----------------------------------------------------------------------------------------------

def _tta_config(values):
    return from_mapping(TTAConfig, values, "teacher_denoising.tta")


def _config_error(call, *args) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        call(*args)
    return caught.value


def test_resolution_must_be_a_multiple_of_the_patch_size():
    error = _config_error(backbone_params, {**TINY_CLIP, "img_size": 100})
    assert str(error) == ("invalid parameter backbone.img_size: got 100; allowed: a multiple of the patch size 16 "
                          "of open_clip:ph-reg-tiny-ViT-16, e.g. 96 or 112")
    error = _config_error(validate_parameters, {"backbone": TINY_CLIP, "data_preparation": {"image_size": 70}})
    assert error.key == "data_preparation.image_size" and error.value == 70
    assert backbone_params(TINY_CLIP).img_size == 64


@pytest.mark.parametrize("shift_frac", [0.0, 0.5, 0.7, -0.1, "0.2"])
def test_shift_frac_outside_the_open_interval(shift_frac):
    error = _config_error(_tta_config, {"shift_frac": shift_frac})
    assert str(error) == (f"invalid parameter teacher_denoising.tta.shift_frac: got {shift_frac!r}; allowed: a "
                          f"number in the open interval (0.0, 0.5)")
    assert _tta_config({"shift_frac": 0.49}).shift_frac == 0.49


def test_fewer_than_one_view():
    error = _config_error(teacher_denoising_params, TINY_TIMM, {"head": "final_norm", "tta": {"n_views": 0}})
    assert str(error) == "invalid parameter teacher_denoising.tta.n_views: got 0; allowed: an integer >= 1"


def test_negative_registers():
    error = _config_error(student_distillation_params, TINY_TIMM, {"head": "final_norm", "num_registers": -2})
    assert str(error) == "invalid parameter student_distillation.num_registers: got -2; allowed: an integer >= 0"


def test_unknown_backbone_pretrained_tag_and_head():
    error = _config_error(backbone_params, {"arch": "open_clip:ViT-B-61"})
    assert error.key == "backbone.arch" and "open_clip:ViT-B-16" in str(error)  # a close match is suggested
    error = _config_error(backbone_params, {"arch": "timm:vit_base_patch14_dinov3_typo"})
    assert "timm:vit_base_patch14_dinov2" in str(error) or "did you mean" in str(error)
    error = _config_error(backbone_params, {"arch": "resnet50"})
    assert "'<family>:<name>'" in str(error)
    error = _config_error(backbone_params, {"arch": "open_clip:ViT-B-16", "pretrained": "opanai"})
    assert error.key == "backbone.pretrained" and "'openai'" in str(error)
    error = _config_error(backbone_params, {"arch": "timm:vit_base_patch14_dinov2", "pretrained": "lvd"})
    assert "['lvd142m']" in str(error)
    error = _config_error(teacher_denoising_params, TINY_CLIP, {"head": "nacilp"})
    assert str(error).startswith("invalid parameter teacher_denoising.head: got 'nacilp'; allowed: a open_clip head")
    assert "'naclip'" in str(error)


def test_unknown_trainable_group_names_the_key():
    error = _config_error(student_distillation_params, TINY_CLIP,
                          {"head": "maskclip", "trainable": ["registers", "last_blok"]})
    assert error.key == "student_distillation.trainable" and error.value == "last_blok"
    assert "matches no parameter of open_clip:ph-reg-tiny-ViT-16" in str(error)
    _config_error(student_distillation_params, TINY_CLIP, {"head": "maskclip", "trainable": ["block:9"]})
    _, params = student_distillation_params(TINY_CLIP, {"head": "maskclip", "trainable": ["block:-2", "*ln_post*"]})
    assert params.trainable == ("block:-2", "*ln_post*")


def test_missing_dataset_path_and_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data_preparation.source: got '.*nowhere'.*a folder of images"):
        data_preparation_params({"source": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match=r"backbone.checkpoint: got '.*w.pt', which is not an existing file"):
        backbone_params({**TINY_TIMM, "checkpoint": str(tmp_path / "w.pt")})


def test_batch_sizes_below_one():
    error = _config_error(student_distillation_params, TINY_TIMM,
                          {"head": "final_norm", "training": {"batch_size": 0}})
    assert str(error) == ("invalid parameter student_distillation.training.batch_size: got 0; allowed: an integer "
                          ">= 1")
    error = _config_error(teacher_denoising_params, TINY_TIMM, {"head": "final_norm", "batch_size": -1})
    assert error.key == "teacher_denoising.batch_size"


def test_typos_in_keys_are_caught_with_a_suggestion():
    error = _config_error(_tta_config, {"n_veiws": 4})
    assert "teacher_denoising.tta.n_veiws: did you mean 'n_views'?" in str(error)
    with pytest.raises(ConfigError, match=r"student_distillation.training.epoch: did you mean 'epochs'\?"):
        student_distillation_params(TINY_TIMM, {"head": "final_norm", "training": {"epoch": 3}})


def test_nodes_validate_before_doing_any_work(tmp_path):
    with pytest.raises(ConfigError, match="data_preparation.on_error: got 'ignore'"):
        prepare_images({"on_error": "ignore"}, seed=0)
    with pytest.raises(ConfigError, match="teacher_denoising.tta.shift_frac"):
        denoise_teacher(None, TINY_TIMM, {"head": "final_norm", "tta": {"shift_frac": 0.5}}, seed=0)


def test_shipped_configurations_validate():
    from kedro.config import OmegaConfigLoader

    from conftest import PROJECT_ROOT

    def params(env):
        loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), base_env="base", default_run_env=env,
                                   merge_strategy={"parameters": "soft", "globals": "soft"})
        return loader["parameters"]

    checked = validate_parameters(params("local"))
    assert checked["student_distillation"].training.max_nonfinite_batches == 100
    assert checked["data_preparation"].on_error == "skip"
    for env in ("paper", "paper_dinov2"):  # real pretrained tags; the Flickr30k folder is not on this machine
        with pytest.raises(FileNotFoundError, match="data_preparation.source: got 'data/01_raw/flickr30k-images'"):
            validate_parameters(params(env))
        checked = validate_parameters(params(env), ("student_distillation", "teacher_denoising"))
        assert checked["student_distillation"].num_registers == 16 and "data_preparation" not in checked
    with pytest.raises(ConfigError, match="student_distillation.targets: got 'cached'; allowed: 'online' while "
                                          "teacher_denoising.mode is 'online'"):
        validate_parameters({**params("local"), "teacher_denoising": {**params("local")["teacher_denoising"],
                                                                      "mode": "online"}})


def test_unavailable_pretrained_weights_say_what_to_do():
    with pytest.raises(WeightsUnavailableError) as caught:
        build_backbone({**TINY_TIMM, "arch": "timm:vit_tiny_patch16_224", "pretrained": "augreg_in21k_ft_in1k",
                        "img_size": 224})
    message = str(caught.value)
    assert "timm:vit_tiny_patch16_224" in message and "augreg_in21k_ft_in1k" in message
    assert "Hugging Face cache" in message and "`checkpoint:`" in message


# --- interruption ------------------------------------------------------------------------------------------------

def test_sigterm_mid_epoch_checkpoints_and_resume_matches(tmp_path):
    config = DistillConfig(epochs=3, batch_size=2, accumulate_grad_batches=2, lr=1e-2, lr_end=1e-3,
                           checkpoint_every=3)
    fresh = _copies()

    full = fresh()
    expected = distill(full, _dataset(8, poison=5), config, seed=1, state_fn=_state, progress=False)
    interrupted = fresh()
    with pytest.raises(TrainingInterrupted, match=r"stopped by SIGTERM at epoch 2 after batch 3: checkpoint written"):
        distill(interrupted, SignalAt(_dataset(8, poison=5), (1, 3)), config, seed=1, checkpoint_dir=tmp_path,
                state_fn=_state, progress=False)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    # the signal came while batch 2 was read; batch 2 was the non-finite one here, so the next optimizer step
    # (two finite micro-batches per step) came after batch 3
    assert saved["epoch"] == 0 and saved["position"]["batch"] == 3 and saved["position"]["skipped"] == 1
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    resumed = fresh()
    history = distill(resumed, _dataset(8, poison=5), DistillConfig(**{**config.__dict__, "resume": True}), seed=1,
                      checkpoint_dir=tmp_path, state_fn=_state, load_state_fn=_load, progress=False)
    assert history == expected
    for name, value in _state(full).items():
        assert torch.equal(value, _state(resumed)[name]), name


def test_changed_batch_size_cannot_resume_mid_epoch(tmp_path):
    config = DistillConfig(epochs=2, batch_size=2, lr=1e-2, lr_end=1e-3)
    with pytest.raises(TrainingInterrupted):
        distill(TinyDense(), SignalAt(_dataset(8), (0, 3), signal.SIGINT), config, seed=0, checkpoint_dir=tmp_path,
                state_fn=_state, progress=False)
    with pytest.raises(ValueError, match=r"student_distillation.training.batch_size: 2 in the checkpoint, 4 now"):
        distill(TinyDense(), _dataset(8), DistillConfig(epochs=2, batch_size=4, resume=True), seed=0,
                checkpoint_dir=tmp_path, state_fn=_state, load_state_fn=_load, progress=False)


SCRIPT = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    import torch
    sys.path.insert(0, {tests!r})
    from training_support import TinyDense, _dataset, _state
    from ph_reg.method.config import DistillConfig
    from ph_reg.method.train import TrainingInterrupted, distill

    folder, marker = Path(sys.argv[1]), Path(sys.argv[2])

    class Slow(torch.utils.data.Dataset):  # the same items as _dataset(8), slowly from epoch 2 on
        def __init__(self):
            self.base = _dataset(8)
        def __len__(self):
            return 8
        def __getitem__(self, item):
            if item[0] >= 1:
                marker.touch()
                time.sleep(0.05)
            return self.base[item]

    torch.manual_seed(0)
    try:
        distill(TinyDense(), Slow(), DistillConfig(**{config}), seed=2, checkpoint_dir=folder, state_fn=_state,
                progress=False)
    except TrainingInterrupted as stop:
        print(stop)
        sys.exit(3)
''')

SUBPROCESS_CONFIG = DistillConfig(epochs=4, batch_size=2, lr=1e-2, lr_end=1e-3, checkpoint_every=1)


def test_sigterm_and_kill_9_subprocess_then_resume_equals_uninterrupted(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parents[1]),
                                    config={k: v for k, v in SUBPROCESS_CONFIG.__dict__.items() if k != "betas"}))
    torch.manual_seed(0)
    full = TinyDense()
    expected = distill(full, _dataset(8), SUBPROCESS_CONFIG, seed=2, state_fn=_state, progress=False)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        folder, marker = tmp_path / signal.Signals(signum).name, tmp_path / f"{signum}.started"
        folder.mkdir()
        process = subprocess.Popen([sys.executable, str(script), str(folder), str(marker)], text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        while not marker.exists() and process.poll() is None:  # the second epoch is running
            time.sleep(0.01)
        process.send_signal(signum)
        out, err = process.communicate(timeout=120)
        if signum == signal.SIGTERM:
            assert process.returncode == 3, err[-3000:]
            assert "distillation stopped by SIGTERM at epoch 2" in out and "resume: true" in out
        else:
            assert process.returncode == -signal.SIGKILL
        checkpoint = torch.load(folder / "last.ckpt", weights_only=False)  # intact and loadable
        assert checkpoint["epoch"] < SUBPROCESS_CONFIG.epochs - 1
        torch.manual_seed(0)
        resumed = TinyDense()
        history = distill(resumed, _dataset(8), DistillConfig(**{**SUBPROCESS_CONFIG.__dict__, "resume": True}),
                          seed=2, checkpoint_dir=folder, state_fn=_state, load_state_fn=_load, progress=False)
        assert history == expected
        for name, value in _state(full).items():
            assert torch.equal(value, _state(resumed)[name]), (signum, name)
        assert not list(folder.glob(".*.tmp"))


def _prepared_store(folder: Path, count: int = 7) -> ShardReader:
    pixels = torch.randint(0, 256, (count, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    write_stream(folder, RecordStream((({"image": p}, {"name": f"i{n}", "split": "train"})
                                       for n, p in enumerate(pixels)), attrs={"image_size": 32}))
    return ShardReader(folder)


DENOISE = {"head": "final_norm", "tta": {"n_views": 2}, "batch_size": 2, "records_per_shard": 3, "device": "cpu"}


def _count_denoiser_calls(monkeypatch, signal_at=None, fail_at=None):
    """Record the batch sizes the denoiser sees; at the given call (once), send SIGTERM or fail like a GPU would."""
    import ph_reg.method.targets as targets
    calls = []
    original = targets.TTADenoiser.__call__
    triggers = {"signal": signal_at, "fail": fail_at}

    def counted(self, images, gen):
        calls.append(images.shape[0])
        if len(calls) == triggers["signal"]:
            triggers["signal"] = None
            signal.raise_signal(signal.SIGTERM)
        if len(calls) == triggers["fail"]:
            triggers["fail"] = None
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return original(self, images, gen)

    monkeypatch.setattr(targets.TTADenoiser, "__call__", counted)
    return calls


def _store_contents(folder: Path):
    reader = ShardReader(folder)
    return [(reader.meta(i), reader[i]["target"]) for i in range(len(reader))]


def test_interrupted_denoising_resumes_at_the_first_missing_shard(tmp_path, monkeypatch):
    images = _prepared_store(tmp_path / "images")
    ShardStoreDataset(str(tmp_path / "full")).save(denoise_teacher(images, TINY_TIMM, DENOISE, seed=3))
    expected = _store_contents(tmp_path / "full")
    target = ShardStoreDataset(str(tmp_path / "targets"))
    calls = _count_denoiser_calls(monkeypatch, signal_at=3)  # SIGTERM while the third batch (images 4, 5) runs
    with pytest.raises(DatasetError, match="teacher denoising stopped by SIGTERM before image 6 of 7") as caught:
        target.save(denoise_teacher(images, TINY_TIMM, DENOISE, seed=3))
    assert isinstance(caught.value.__cause__, Interrupted)
    folder, staging = tmp_path / "targets", tmp_path / ".targets.partial"
    assert not folder.exists() and not target.exists()  # nothing DVC could take as complete
    # the finished shards wait in the hidden sibling, which becomes the store when the write completes
    assert sorted(p.name for p in staging.iterdir()) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    finished = {p.name: p.stat().st_mtime_ns for p in staging.glob("shard-*")}
    calls.clear()
    target.save(denoise_teacher(images, TINY_TIMM, DENOISE, seed=3))
    assert calls == [1]  # only image 6: the 6 records of the two finished shards were not recomputed
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-0000[01]*")} == finished
    result = _store_contents(folder)
    assert [m for m, _ in result] == [m for m, _ in expected]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(result, expected))


def test_crashed_denoising_resumes_mid_shard_and_a_changed_seed_starts_over(tmp_path, monkeypatch):
    images = _prepared_store(tmp_path / "images")
    ShardStoreDataset(str(tmp_path / "full")).save(denoise_teacher(images, TINY_TIMM, DENOISE, seed=3))
    target = ShardStoreDataset(str(tmp_path / "targets"))
    calls = _count_denoiser_calls(monkeypatch, fail_at=3)
    with pytest.raises(DatasetError, match="illegal memory access"):
        target.save(denoise_teacher(images, TINY_TIMM, DENOISE, seed=3))
    calls.clear()
    target.save(denoise_teacher(images, TINY_TIMM, DENOISE, seed=3))
    # shard 0 (records 0-2) was finished; record 3 sits in the batch of images 2-3, which is recomputed (its views
    # depend on the whole batch) but only record 3 of it is stored
    assert calls == [2, 2, 1]
    expected = _store_contents(tmp_path / "full")
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(_store_contents(tmp_path / "targets"), expected))
    calls.clear()
    target.save(denoise_teacher(images, TINY_TIMM, DENOISE, seed=4))  # other targets: nothing is reused
    assert sum(calls) == 7


# --- write failures ----------------------------------------------------------------------------------------------

def test_failed_shard_write_leaves_no_partial_file_and_names_it(tmp_path, monkeypatch):
    import ph_reg.io.files

    real = ph_reg.io.files.save_file
    writes = []

    def disk_full(tensors, filename, metadata=None):
        writes.append(filename)
        if len(writes) == 2:
            Path(filename).write_bytes(b"partial")  # some bytes made it before the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ph_reg.io.files, "save_file", disk_full)
    records = (({"x": torch.full((2,), float(i))}, {"i": i}) for i in range(5))
    with pytest.raises(WriteError, match=r"cannot write .*\.store\.partial/shard-00001.safetensors: \[Errno 28\] No "
                                         r"space") as err:
        write_stream(tmp_path / "store", RecordStream(records, records_per_shard=2))
    assert err.value.errno == errno.ENOSPC and err.value.filename.endswith("shard-00001.safetensors")
    assert len(writes) == 2  # the first shard was written whole; the store was never completed
    assert list(tmp_path.iterdir()) == []  # a write that cannot resume leaves nothing behind


def test_failed_writes_keep_the_previous_file(tmp_path, monkeypatch):
    write_json(tmp_path / "m.json", {"v": 1})
    monkeypatch.setattr(Path, "write_text", lambda self, text: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.raises(WriteError, match=r"cannot write .*m.json: \[Errno 13\] denied"):
        write_json(tmp_path / "m.json", {"v": 2})
    monkeypatch.undo()
    assert json.loads((tmp_path / "m.json").read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
    save_tensors(tmp_path / "w.safetensors", {"a": torch.ones(2)})
    import ph_reg.io.files

    monkeypatch.setattr(ph_reg.io.files, "save_file", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("I/O error")))
    with pytest.raises(WriteError, match="cannot write .*w.safetensors: I/O error"):
        save_tensors(tmp_path / "w.safetensors", {"a": torch.zeros(2)})
    monkeypatch.undo()
    assert torch.equal(ph_reg.io.files.load_tensors(tmp_path / "w.safetensors")["a"], torch.ones(2))


def test_failed_checkpoint_write_names_the_file(tmp_path, monkeypatch):
    config = DistillConfig(epochs=2, batch_size=2, lr=1e-2, lr_end=1e-3, checkpoint_every=1)
    distill(TinyDense(), _dataset(4), DistillConfig(**{**config.__dict__, "epochs": 1}), seed=0,
            checkpoint_dir=tmp_path, state_fn=_state, progress=False)
    before = (tmp_path / "last.ckpt").read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(WriteError, match=r"cannot write .*last.ckpt: .*PytorchStreamWriter failed"):
        distill(TinyDense(), _dataset(4), config, seed=0, checkpoint_dir=tmp_path, state_fn=_state, progress=False)
    assert (tmp_path / "last.ckpt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


KILLED_WRITER = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from ph_reg.io.files import atomic_path
    target, marker = Path(sys.argv[1]), Path(sys.argv[2])
    with atomic_path(target) as tmp:
        tmp.write_text("half of the new ver")
        marker.touch()
        time.sleep(60)
''')


def test_kill_9_during_a_write_leaves_the_old_file(tmp_path):
    target, marker = tmp_path / "weights.json", tmp_path / "marker"
    write_json(target, {"version": 1})
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    process = subprocess.Popen([sys.executable, str(script), str(target), str(marker)])
    while not marker.exists() and process.poll() is None:
        time.sleep(0.01)
    process.kill()
    process.wait()
    assert json.loads(target.read_text()) == {"version": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # artifacts keep the usual permissions
    assert len(list(tmp_path.glob(".weights.json.*.tmp"))) == 1  # hidden, never under the artifact's name
    write_json(target, {"version": 2})
    assert not list(tmp_path.glob(".weights.json.*.tmp"))  # the next write clears the leftover


# --- numerical trouble -------------------------------------------------------------------------------------------

def test_nonfinite_batches_are_counted_then_abort(tmp_path):
    class ManyNaN(torch.utils.data.Dataset):
        def __init__(self):
            self.base = _dataset(6)

        def __len__(self):
            return 6

        def __getitem__(self, item):
            pair = self.base[item]
            return pair._replace(target=pair.target * float("nan") if item[1] in (1, 3, 4) else pair.target)

    config = DistillConfig(epochs=2, batch_size=1, lr=1e-2, lr_end=1e-3, max_nonfinite_batches=6)
    history = distill(TinyDense(), ManyNaN(), config, seed=0, progress=False)
    assert [row["skipped_batches"] for row in history] == [3, 3]
    strict = DistillConfig(**{**config.__dict__, "max_nonfinite_batches": 4})
    with pytest.raises(NonFiniteBatchesError, match=r"5 batches had a non-finite .* more than "
                                                    r"student_distillation.training.max_nonfinite_batches=4 "
                                                    r"\(the last at epoch 2, batch"):
        distill(TinyDense(), ManyNaN(), strict, seed=0, progress=False)
    with pytest.raises(ValueError, match="max_nonfinite_batches: got -1"):
        from_mapping(DistillConfig, {"max_nonfinite_batches": -1}, "student_distillation.training")
