"""Unlabeled training images: sources, validation, resizing and square crops.

A source is either ``"builtin:sample_photos"`` (real photos that ship inside scikit-image, scikit-learn and
matplotlib, the embedded default) or a folder of image files such as Flickr30k's ``flickr30k-images``.
Images are streamed one at a time, so a source of any size never sits in memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from torch.utils.data import Dataset

from .utils import generator, normalize

BUILTIN_SOURCE = "builtin:sample_photos"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _stereo(index: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return skimage.data.stereo_motorcycle()[index]

    return load


def _sklearn(index: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_images

        return load_sample_images().images[index]

    return load


def _matplotlib(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import matplotlib

        return np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / filename).convert("RGB"))

    return load


#: The photos the embedded default trains on; all ship inside installed packages (no download).
SAMPLE_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "skimage/astronaut": _skimage("astronaut"),
    "skimage/chelsea": _skimage("chelsea"),
    "skimage/coffee": _skimage("coffee"),
    "skimage/rocket": _skimage("rocket"),
    "skimage/hubble_deep_field": _skimage("hubble_deep_field"),
    "skimage/immunohistochemistry": _skimage("immunohistochemistry"),
    "skimage/retina": _skimage("retina"),
    "skimage/motorcycle_left": _stereo(0),
    "skimage/motorcycle_right": _stereo(1),
    "skimage/camera": _skimage("camera"),
    "skimage/brick": _skimage("brick"),
    "skimage/grass": _skimage("grass"),
    "skimage/gravel": _skimage("gravel"),
    "skimage/moon": _skimage("moon"),
    "skimage/coins": _skimage("coins"),
    "skimage/clock": _skimage("clock"),
    "sklearn/china": _sklearn(0),
    "sklearn/flower": _sklearn(1),
    "matplotlib/grace_hopper": _matplotlib("grace_hopper.jpg"),
}


def _to_rgb_image(array: np.ndarray) -> Image.Image:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array[..., :3]).astype(np.uint8), mode="RGB")


def list_folder_images(folder: str | os.PathLike) -> list[Path]:
    """Sorted image files under ``folder`` (recursive), with clear errors for a missing or empty folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image source folder not found: {folder} (set data_preparation.source to a folder of images, "
            f"or to {BUILTIN_SOURCE!r} for the photos shipped with the installed packages)"
        )
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"image source folder {folder} holds no images with extensions {IMAGE_EXTENSIONS}")
    return files


class SampleLoader:
    """Picklable loader of one builtin sample photo (for DataLoader workers and DDP processes)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self) -> Image.Image:
        return _to_rgb_image(SAMPLE_PHOTOS[self.name]())


class FileLoader:
    """Picklable loader of one image file as RGB."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __call__(self) -> Image.Image:
        return _open_image(self.path)


def source_items(source: str) -> list[tuple[str, Callable[[], Image.Image]]]:
    """``(name, loader)`` for every image of a source, sorted, without loading any image."""
    if source == BUILTIN_SOURCE:
        return [(name, SampleLoader(name)) for name in SAMPLE_PHOTOS]
    if source.startswith("builtin:"):
        raise ValueError(f"unknown builtin image source {source!r}; the builtin source is {BUILTIN_SOURCE!r}")
    root = Path(source)
    return [(str(path.relative_to(root)), FileLoader(path)) for path in list_folder_images(root)]


def iter_source_images(source: str, min_side: int = 1, on_error: str = "raise") -> Iterator[tuple[str, Image.Image]]:
    """Yield ``(name, RGB image)`` pairs from a source, one at a time.

    ``min_side``: images whose short side is smaller are rejected. ``on_error``: ``"raise"`` stops at the first
    unreadable or too-small file with an error naming it; ``"skip"`` leaves it out (the caller counts skips).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    for name, load in source_items(source):
        try:
            image = load()
            if min(image.size) < min_side:
                raise ValueError(f"image {name} is {image.size[0]}x{image.size[1]}, smaller than min_side={min_side}")
        except (OSError, ValueError, UnidentifiedImageError) as error:
            if on_error == "skip":
                continue
            raise ValueError(f"cannot use image {name!r} from {source}: {error}") from error
        yield name, image


def _open_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so the short side is ``size`` (bicubic), keeping the aspect ratio."""
    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image.resize(new, Image.Resampling.BICUBIC)


def random_square_crops(image: Image.Image, size: int, count: int, gen: torch.Generator) -> list[tuple[int, int]]:
    """``count`` top-left corners of ``size`` x ``size`` crops drawn uniformly from a resized image."""
    width, height = image.size
    tops = torch.randint(0, height - size + 1, (count,), generator=gen).tolist()
    lefts = torch.randint(0, width - size + 1, (count,), generator=gen).tolist()
    return list(zip(tops, lefts))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def split_of(name: str, val_fraction: float) -> str:
    """``"val"`` for a stable, hash-chosen ``val_fraction`` of image names, else ``"train"``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") / 2**32
    return "val" if bucket < val_fraction else "train"


@dataclass(frozen=True)
class PreparationConfig:
    source: str = BUILTIN_SOURCE
    image_size: int = 224
    crops_per_image: int = 1
    val_fraction: float = 0.2
    min_side: int = 32
    on_error: str = "raise"
    max_images: int | None = None


def prepared_records(config: PreparationConfig, seed: int) -> Iterator[tuple[dict[str, torch.Tensor], dict]]:
    """Stream ``({"image": uint8 (3, S, S)}, meta)`` records: resized, square-cropped, split-labelled.

    The crops of an image depend only on the seed and the image's name, never on its position in the folder.
    """
    if config.image_size < 1 or config.crops_per_image < 1:
        raise ValueError(
            f"image_size and crops_per_image must be >= 1, got {config.image_size} and {config.crops_per_image}"
        )
    count = 0
    for name, image in iter_source_images(config.source, config.min_side, config.on_error):
        if config.max_images is not None and count >= config.max_images:
            break
        count += 1
        resized = resize_short_side(image, config.image_size)
        split = split_of(name, config.val_fraction)
        corners = random_square_crops(resized, config.image_size, config.crops_per_image, generator(seed, "crop", name))
        pixels = to_tensor(resized)
        for crop, (top, left) in enumerate(corners):
            patch = pixels[:, top : top + config.image_size, left : left + config.image_size].clone()
            yield {"image": patch}, {"name": name, "crop": crop, "top": top, "left": left, "split": split}
    if count == 0:
        raise ValueError(f"image source {config.source!r} yielded no usable image")


class RandomCrops(Dataset):
    """Online mode: item ``(epoch, i)`` is a fresh square crop of image ``i`` (short side resized to ``image_size``,
    bicubic), drawn from ``(seed, epoch, i)``, normalised; returned with ``i``. An image that is already
    ``image_size`` square has exactly one crop, so its crop is fixed."""

    def __init__(self, loaders: Sequence[Callable[[], Image.Image]], image_size: int, mean: Sequence[float],
                 std: Sequence[float], seed: int):
        if not loaders:
            raise ValueError("RandomCrops got no images: check the source and data_preparation.val_fraction")
        self.loaders, self.image_size, self.seed = list(loaders), image_size, seed
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.loaders)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, i = item
        image = resize_short_side(self.loaders[i](), self.image_size)
        (top, left), = random_square_crops(image, self.image_size, 1, generator(self.seed, "online-crop", epoch, i))
        pixels = to_tensor(image)[:, top : top + self.image_size, left : left + self.image_size]
        return normalize(pixels[None], self.mean, self.std)[0], i


class StoredImageLoader:
    """Picklable loader of record ``index`` of a prepared-image store, as a PIL image."""

    def __init__(self, store: Sequence[dict[str, torch.Tensor]], index: int):
        self.store, self.index = store, index

    def __call__(self) -> Image.Image:
        return Image.fromarray(self.store[self.index]["image"].permute(1, 2, 0).numpy())
