"""Unlabeled training images, their sources: the builtin photos, folder listing, loading and checking one image.

A source is either ``"builtin:sample_photos"`` (real photos that ship inside scikit-image, scikit-learn and
matplotlib, the embedded default) or a folder of image files such as Flickr30k's ``flickr30k-images``.
Images are streamed one at a time, so a source of any size never sits in memory. :mod:`ph_reg.data.prepare` turns
them into the prepared square crops.

Real folders are messy. :func:`load_image` turns every file into an RGB image or an :class:`UnusableImage` with a
reason: zero-byte, truncated or corrupt files, files that are not images, decompression bombs (more than
``max_image_pixels`` pixels) are rejected; grayscale, palette, CMYK, 16-bit and alpha images are converted
(16-bit scaled to 8-bit, transparency composited on white); EXIF orientation is applied. Images whose short side
is below ``min_side`` are rejected, larger ones are resized (up or down) so the short side is the crop size. Under
``on_error: skip`` (the default) rejected files are left out and listed with their reasons in a
:class:`SkipReport`; under ``on_error: raise`` the first one stops the run with an error naming it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

BUILTIN_SOURCE = "builtin:sample_photos"
#: Extensions (compared lower-cased) of the files a folder source reads; other files are listed as ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".webp", ".tif", ".tiff", ".gif",
                    ".ppm", ".pgm", ".pbm", ".pnm", ".tga")
ON_ERROR_POLICIES = ("skip", "raise")
#: Pillow's own decompression-bomb warning threshold (about 9459 x 9459 pixels).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
#: Transparent pixels are composited onto this colour (as a browser shows them on a white page).
ALPHA_BACKGROUND = (255, 255, 255)
EIGHT_BIT_MAX = 255
SIXTEEN_BIT_MAX = 65535
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
SKIP_REPORT_NAME = "skipped_images.json"
log = logging.getLogger(__name__)


class ImageSourceError(ValueError):
    """The image source cannot be prepared as configured (no image files, no usable image, or a bad file under
    ``on_error: raise``); the message names the folder or file and what to change."""


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


def list_folder_files(folder: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """``(images, others)`` under ``folder`` (recursive, sorted): files with an image extension (any case) and the
    rest. A dangling symbolic link counts as a file (:func:`load_image` rejects it with the reason). Clear errors for
    a missing folder or one without images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image source folder not found: {folder} (set data_preparation.source to a folder of images, "
            f"or to {BUILTIN_SOURCE!r} for the photos shipped with the installed packages)"
        )
    files = sorted(p for p in folder.rglob("*") if p.is_file() or (p.is_symlink() and not p.exists()))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise ImageSourceError(f"image source folder {folder} holds no images: none of its {len(files)} files has "
                               f"one of the extensions {IMAGE_EXTENSIONS} (in any case)")
    return images, [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]


class UnusableImage(ValueError):
    """A file that cannot be used as a training image; ``reason`` says why in words a user can act on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@contextmanager
def _pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Let ``load_image`` apply its own limit instead of Pillow's global one (restored afterwards), and keep
    Pillow's warnings about damaged metadata out of the log (the pixels are what counts)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module="PIL")  # e.g. "Corrupt EXIF data"
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _high_bit_depth_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit integer (``I;16*``), 32-bit integer (``I``) or float (``F``) grayscale -> ``L``, scaled, not clipped."""
    array = np.asarray(image)
    if image.mode in SIXTEEN_BIT_MODES:
        scaled = array.astype(np.float64) / SIXTEEN_BIT_MAX * EIGHT_BIT_MAX
    elif image.mode == "I":
        top = float(array.max()) if array.size else 0.0
        full = EIGHT_BIT_MAX if top <= EIGHT_BIT_MAX else SIXTEEN_BIT_MAX if top <= SIXTEEN_BIT_MAX else top
        scaled = np.clip(array.astype(np.float64), 0, None) / full * EIGHT_BIT_MAX
    else:  # "F": [0, 1] floats, or values already on the 8-bit scale
        array = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scaled = array * EIGHT_BIT_MAX if array.size and array.max() <= 1.0 else array
    return Image.fromarray(np.clip(np.rint(scaled), 0, EIGHT_BIT_MAX).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image -> RGB: EXIF orientation applied, high bit depths scaled, alpha composited on white."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as error:  # a damaged EXIF block must not cost the pixels
        log.debug("ignoring unreadable EXIF orientation: %s", error)
    if image.mode in (*SIXTEEN_BIT_MODES, "I", "F"):
        image = _high_bit_depth_to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif image.mode in ("La", "RGBa", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, EIGHT_BIT_MAX))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Read an image file as RGB (see :func:`to_rgb`), or raise :class:`UnusableImage` with the reason.

    The pixel count is checked from the header, before anything is decoded: a decompression bomb never reaches
    memory. ``max_pixels=None`` disables the check.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise UnusableImage(f"dangling symbolic link: its target {os.readlink(path)} does not exist")
    try:
        if path.stat().st_size == 0:
            raise UnusableImage("empty file (0 bytes)")
        with _pixel_limit(max_pixels), Image.open(path) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise UnusableImage(
                    f"{width}x{height} = {width * height} pixels is above data_preparation.max_image_pixels="
                    f"{max_pixels} (decompression-bomb guard); raise that limit if the image is genuine")
            image.load()
            return to_rgb(image)
    except UnusableImage:
        raise
    except UnidentifiedImageError:
        raise UnusableImage(f"not a readable image: Pillow does not recognise the content of this "
                            f"{path.suffix or 'extension-less'} file") from None
    except (OSError, EOFError) as error:
        if isinstance(error, EOFError) or "truncated" in str(error).lower():
            raise UnusableImage(f"truncated image file ({error or 'unexpected end of file'})") from None
        raise UnusableImage(f"cannot read the file: {error}") from None
    except Exception as error:  # decoders of untrusted files raise anything (SyntaxError, struct.error, ...)
        raise UnusableImage(f"corrupt image data ({type(error).__name__}: {error})") from None


class SampleLoader:
    """Picklable loader of one builtin sample photo (for DataLoader workers and DDP processes)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self) -> Image.Image:
        return _to_rgb_image(SAMPLE_PHOTOS[self.name]())


class FileLoader:
    """Picklable loader of one image file as RGB (:func:`load_image`)."""

    def __init__(self, path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        self.path = Path(path)
        self.max_pixels = max_pixels

    def __call__(self) -> Image.Image:
        return load_image(self.path, self.max_pixels)


def source_items(source: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                 ignored: list[str] | None = None) -> list[tuple[str, Callable[[], Image.Image]]]:
    """``(name, loader)`` for every image of a source, sorted, without loading any image.

    ``ignored``, if given, receives the names of the folder's files that have no image extension.
    """
    if source == BUILTIN_SOURCE:
        return [(name, SampleLoader(name)) for name in SAMPLE_PHOTOS]
    if source.startswith("builtin:"):
        raise ValueError(f"unknown builtin image source {source!r}; the builtin source is {BUILTIN_SOURCE!r}")
    root = Path(source)
    images, others = list_folder_files(root)
    if ignored is not None:
        ignored.extend(str(path.relative_to(root)) for path in others)
    return [(str(path.relative_to(root)), FileLoader(path, max_pixels)) for path in images]


@dataclass
class SkipReport:
    """The files a source run left out, and why: written next to the prepared images (``skipped_images.json``)."""

    source: str
    on_error: str = "skip"
    used: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append({"name": name, "reason": reason})

    def summary(self) -> str:
        return (f"{self.used} images used, {len(self.skipped)} skipped, {len(self.ignored)} non-image files "
                f"ignored from {self.source}")

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "on_error": self.on_error, "used": self.used,
                "skipped_count": len(self.skipped), "skipped": self.skipped, "ignored_non_image_files": self.ignored}


def image_problem(image: Image.Image, min_side: int = 1, resize_to: int | None = None,
                  max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> str | None:
    """Why a loaded image cannot be used, or None: a short side below ``min_side``, or an aspect ratio so extreme
    that resizing its short side to ``resize_to`` would exceed ``max_pixels``."""
    width, height = image.size
    if min(width, height) < min_side:
        return (f"image is {width}x{height}, its short side is below data_preparation.min_side={min_side} "
                f"(lower min_side to upscale it instead)")
    if resize_to is not None and max_pixels is not None:
        scale = resize_to / min(width, height)
        resized = round(width * scale) * round(height * scale)
        if resized > max_pixels:
            return (f"image is {width}x{height}: resizing its short side to {resize_to} would give {resized} "
                    f"pixels, above data_preparation.max_image_pixels={max_pixels}")
    return None


def iter_source_images(source: str, min_side: int = 1, on_error: str = "skip", report: SkipReport | None = None,
                       max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                       resize_to: int | None = None) -> Iterator[tuple[str, Image.Image]]:
    """Yield ``(name, RGB image)`` pairs from a source, one at a time.

    A file that is unreadable, too small (``min_side``) or too large (``max_pixels``, also after resizing the short
    side to ``resize_to``) is, under ``on_error="skip"``, left out, logged and added to ``report``; under
    ``"raise"`` it stops the iteration with a ValueError naming it and the reason.
    """
    if on_error not in ON_ERROR_POLICIES:
        raise ValueError(f"data_preparation.on_error must be one of {ON_ERROR_POLICIES}, got {on_error!r}")
    ignored: list[str] = []
    items = source_items(source, max_pixels, ignored)
    if report is not None:
        report.ignored.extend(ignored)
    for name, load in items:
        try:
            image = load()
        except UnusableImage as error:
            reason = error.reason
        except Exception as error:  # a builtin photo failing to load is as unusable as a broken file
            reason = f"cannot load ({type(error).__name__}: {error})"
        else:
            reason = image_problem(image, min_side, resize_to, max_pixels)
        if reason is None:
            yield name, image
            continue
        if on_error == "raise":
            raise ImageSourceError(f"cannot use image {name!r} from {source}: {reason} "
                                   f"(set data_preparation.on_error: skip to leave such files out and list them)")
        log.warning("skipping image %s: %s", name, reason)
        if report is not None:
            report.skip(name, reason)
