"""Image transforms shared by the training data and the evaluation: the two short-side resizes.

They are different operations on purpose: :func:`resize_pil_short_side` prepares training images (PIL, bicubic, as
the release's data loader), :func:`resize_tensor_short_side` resizes evaluation batches (torch, bilinear, with
mmseg's keep-ratio rule :func:`resized_size` and its long-side cap, as the zero-shot and probe protocols do).
"""

from __future__ import annotations

import torch.nn.functional as F
from PIL import Image
from torch import Tensor

#: mmseg's keep-ratio ``Resize(scale=(2048, short_side))`` of the SCLIP/NACLIP/PH-Reg test pipelines caps the long side.
DEFAULT_MAX_LONG_SIDE = 2048


def resize_pil_short_side(image: Image.Image, size: int) -> Image.Image:
    """A PIL image resized (bicubic) so its short side is ``size``, keeping the aspect ratio (each side rounded,
    never below ``size``): the training images."""
    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image.resize(new, Image.Resampling.BICUBIC)


def resized_size(height: int, width: int, short_side: int | None,
                 max_long_side: int | None = DEFAULT_MAX_LONG_SIDE) -> tuple[int, int]:
    """(H, W) after mmseg's keep-ratio ``Resize(scale=(max_long_side, short_side))`` (mmcv ``rescale_size``): the
    factor is ``min(short_side / min(H, W), max_long_side / max(H, W))`` (no cap when ``max_long_side`` is None),
    each side rounded as ``int(side * factor + 0.5)``. ``short_side`` None keeps the size."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if short_side is None:
        return height, width
    if max_long_side is not None and max_long_side < short_side:
        raise ValueError(f"max_long_side ({max_long_side}) must be at least short_side ({short_side})")
    factor = short_side / min(height, width)
    if max_long_side is not None:
        factor = min(factor, max_long_side / max(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_tensor_short_side(images: Tensor, short_side: int | None,
                             max_long_side: int | None = DEFAULT_MAX_LONG_SIDE) -> Tensor:
    """Bilinear (align_corners False) resize of float images (B, C, H, W) to :func:`resized_size` (short side
    ``short_side`` unless the long side would exceed ``max_long_side``); None returns ``images`` unchanged."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    size = resized_size(height, width, short_side, max_long_side)
    if size == (height, width):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)
