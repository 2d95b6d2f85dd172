import numpy as np
import pytest
import torch
from PIL import Image

from ph_reg.data.prepare import DataPreparationConfig, prepared_records, split_of
from ph_reg.data.sources import BUILTIN_SOURCE, SAMPLE_PHOTOS, iter_source_images
from ph_reg.data.transforms import resize_pil_short_side


def test_builtin_photos_all_load():
    names = [name for name, image in iter_source_images(BUILTIN_SOURCE)]
    assert names == list(SAMPLE_PHOTOS)
    assert len(names) >= 15


def test_folder_source_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image source folder not found"):
        list(iter_source_images(str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        list(iter_source_images(str(tmp_path / "empty")))
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(folder / "sub" / "a.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        list(iter_source_images(str(folder), on_error="raise"))
    assert [n for n, _ in iter_source_images(str(folder))] == ["sub/a.png"]  # skipping is the default
    (folder / "broken.jpg").unlink()
    with pytest.raises(ValueError, match="below data_preparation.min_side=50"):
        list(iter_source_images(str(folder), min_side=50, on_error="raise"))


def test_resize_pil_short_side():
    image = Image.new("RGB", (300, 200))
    assert resize_pil_short_side(image, 100).size == (150, 100)


def test_prepared_records_deterministic_and_name_seeded():
    config = DataPreparationConfig(image_size=32, crops_per_image=2, max_images=3, val_fraction=0.4)
    first = list(prepared_records(config, seed=1))
    second = list(prepared_records(config, seed=1))
    assert len(first) == 6
    for (a, meta_a), (b, meta_b) in zip(first, second):
        assert torch.equal(a["image"], b["image"]) and meta_a == meta_b
        assert a["image"].shape == (3, 32, 32) and a["image"].dtype == torch.uint8
        assert meta_a["split"] == split_of(meta_a["name"], 0.4)
    other = list(prepared_records(config, seed=2))
    assert any(m1["top"] != m2["top"] or m1["left"] != m2["left"] for (_, m1), (_, m2) in zip(first, other))


def test_split_is_stable_and_validated():
    assert split_of("x.jpg", 0.0) == "train"
    assert split_of("a", 0.5) == split_of("a", 0.5)
    with pytest.raises(ValueError, match="val_fraction"):
        split_of("a", 1.0)
