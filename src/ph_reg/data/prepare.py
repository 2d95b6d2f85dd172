"""The prepare stage: a source's images resized, cut into fixed random square crops and labelled with their split
(:func:`prepared_records`), configured by the ``data_preparation`` section (:class:`DataPreparationConfig`)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ph_reg.config import ConfigError, at_least, one_of, optional_at_least
from ph_reg.data.sources import (BUILTIN_SOURCE, DEFAULT_MAX_IMAGE_PIXELS, ON_ERROR_POLICIES, SKIP_REPORT_NAME,
                                 ImageSourceError, SkipReport, iter_source_images)
from ph_reg.data.transforms import resize_pil_short_side
from ph_reg.runtime import generator

#: The splits a prepared image is labelled with (:func:`split_of`).
SPLITS = ("train", "val")
log = logging.getLogger(__name__)


def random_square_crops(image: Image.Image, size: int, count: int, gen: torch.Generator) -> list[tuple[int, int]]:
    """``count`` top-left corners of ``size`` x ``size`` crops drawn uniformly from a resized image."""
    width, height = image.size
    tops = torch.randint(0, height - size + 1, (count,), generator=gen).tolist()
    lefts = torch.randint(0, width - size + 1, (count,), generator=gen).tolist()
    return list(zip(tops, lefts))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _source(key: str, value: Any) -> str:
    """``data_preparation.source``: the builtin photos or an existing folder."""
    if not isinstance(value, str) or not value:
        raise ConfigError(key, value, f"{BUILTIN_SOURCE!r} or the path of a folder of images")
    if value.startswith("builtin:"):
        return one_of([BUILTIN_SOURCE])["check"](key, value)
    if not Path(value).is_dir():
        raise FileNotFoundError(f"invalid parameter {key}: got {value!r}, which is not an existing folder; allowed: "
                                f"a folder of images, or {BUILTIN_SOURCE!r}")
    return value


def _fraction(key: str, value: Any) -> float:
    """A number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(key, value, "a number in [0, 1)")
    return float(value)


@dataclass(frozen=True)
class DataPreparationConfig:
    """The ``data_preparation`` section: how a source becomes prepared crops, and the shard size of their store.
    Images with a short side in ``[min_side, image_size)`` are upscaled (bicubic); set ``min_side = image_size`` to
    skip them instead. (That ``image_size`` is a multiple of the backbone's patch size is checked by
    :mod:`ph_reg.params`, which knows the backbone.)"""

    source: str = field(default=BUILTIN_SOURCE, metadata={"check": _source})
    image_size: int = field(default=224, metadata=at_least(1))
    crops_per_image: int = field(default=1, metadata=at_least(1))
    val_fraction: float = field(default=0.2, metadata={"check": _fraction})
    min_side: int = field(default=32, metadata=at_least(1))
    on_error: str = field(default="skip", metadata=one_of(ON_ERROR_POLICIES))
    max_images: int | None = field(default=None, metadata=optional_at_least(1))
    max_image_pixels: int | None = field(default=DEFAULT_MAX_IMAGE_PIXELS, metadata=optional_at_least(1))
    records_per_shard: int = field(default=64, metadata=at_least(1))


#: How many skip reasons an "no usable image" error quotes.
QUOTED_REASONS = 5


def prepared_records(config: DataPreparationConfig, seed: int, report: SkipReport | None = None,
                     ) -> Iterator[tuple[dict[str, torch.Tensor], dict]]:
    """Stream ``({"image": uint8 (3, S, S)}, meta)`` records: resized, square-cropped, split-labelled.

    The crops of an image depend only on the seed and the image's name, never on its position in the folder.
    Skipped files go to ``report``; the log ends with the counts; a source with no usable image is an error.
    """
    if config.image_size < 1 or config.crops_per_image < 1:
        raise ValueError(
            f"image_size and crops_per_image must be >= 1, got {config.image_size} and {config.crops_per_image}"
        )
    report = report if report is not None else SkipReport(config.source, config.on_error)
    count = 0
    for name, image in iter_source_images(config.source, config.min_side, config.on_error, report,
                                          config.max_image_pixels, resize_to=config.image_size):
        if config.max_images is not None and count >= config.max_images:
            break
        count += 1
        report.used = count
        resized = resize_pil_short_side(image, config.image_size)
        split = split_of(name, config.val_fraction)
        corners = random_square_crops(resized, config.image_size, config.crops_per_image, generator(seed, "crop", name))
        pixels = to_tensor(resized)
        for crop, (top, left) in enumerate(corners):
            patch = pixels[:, top : top + config.image_size, left : left + config.image_size].clone()
            yield {"image": patch}, {"name": name, "crop": crop, "top": top, "left": left, "split": split}
    if count == 0:
        reasons = "; ".join(f"{s['name']}: {s['reason']}" for s in report.skipped[:QUOTED_REASONS])
        raise ImageSourceError(f"image source {config.source!r} yielded no usable image ({report.summary()})"
                               + (f": {reasons}" if reasons else ""))
    log.info("data preparation: %s; reasons in %s of the prepared-image store", report.summary(), SKIP_REPORT_NAME)


def split_of(name: str, val_fraction: float) -> str:
    """``"val"`` for a stable, hash-chosen ``val_fraction`` of image names, else ``"train"``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") / 2**32
    return "val" if bucket < val_fraction else "train"
