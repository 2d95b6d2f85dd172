"""Sliding windows: the one rule (mmsegmentation's ``slide``) for the zero-shot harness and the probe cache."""

from __future__ import annotations

__all__ = ["sliding_windows", "window_boxes"]


def sliding_windows(length: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """(start, end) of every window along one axis: ``n = max(L - crop + stride - 1, 0) // stride + 1`` windows
    starting at ``i * stride``; the end is clamped to ``L`` and the start pulled back to ``end - crop`` (>= 0)."""
    for key, value in (("length", length), ("crop", crop), ("stride", stride)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")
    if stride > crop:
        raise ValueError(f"stride ({stride}) must not exceed crop ({crop}): the windows would leave gaps")
    count = max(length - crop + stride - 1, 0) // stride + 1
    windows = []
    for i in range(count):
        end = min(i * stride + crop, length)
        windows.append((max(end - crop, 0), end))
    return windows


def window_boxes(height: int, width: int, crop_size: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Square windows (top, left, bottom, right) covering an image at least ``crop_size`` on each side: the
    product of the :func:`sliding_windows` of the rows and of the columns (row-major). Windows start every
    ``stride`` pixels; the last one of a row/column is shifted back so it ends at the image border
    (mmsegmentation's ``slide`` rule), so every pixel is covered.
    """
    if crop_size <= 0 or stride <= 0 or stride > crop_size:
        raise ValueError(f"need 0 < stride <= crop_size, got stride={stride}, crop_size={crop_size}")
    if height < crop_size or width < crop_size:
        raise ValueError(f"image {height}x{width} is smaller than the crop {crop_size}")
    return [(top, left, bottom, right) for top, bottom in sliding_windows(height, crop_size, stride)
            for left, right in sliding_windows(width, crop_size, stride)]
