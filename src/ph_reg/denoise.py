"""Teacher-side test-time-augmentation (TTA) denoising for PH-Reg.

The teacher is run on ``n`` copies of each image, shifted by whole patches and optionally mirrored. Artifact tokens
do not move with the image content, so mapping every output token back to the original patch it came from and
averaging over the views cancels them out (method.md, section 2).

Conventions:
    * A view is an integer offset ``(oy, ox)`` in patches plus a horizontal-flip flag. View 0 is the identity.
    * Shift semantics: ``out[y - oy * p, x - ox * p] = in[y, x]``; pixels without a source get ``fill``.
      The horizontal flip is applied after the shift.
    * Batched tensors holding several views are *view-major*: view ``v`` occupies rows ``v * B:(v + 1) * B``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "TTAViews",
    "max_shift",
    "farthest_point_sample",
    "sample_views",
    "augment_images",
    "patch_index_grids",
    "unshift_average",
    "TTADenoiser",
]

GRID_FILL = -1  # patch index of grid cells that have no source patch


@dataclass(frozen=True)
class TTAViews:
    """A set of TTA views.

    Attributes:
        offsets: (n, 2) int64 ``(oy, ox)`` shifts in whole patches; ``offsets[0] == (0, 0)``.
        flips: (n,) bool horizontal-flip flags; ``flips[0] == False``.
    """

    offsets: Tensor
    flips: Tensor

    def __post_init__(self) -> None:
        if self.offsets.ndim != 2 or self.offsets.shape[1] != 2 or self.offsets.shape[0] < 1:
            raise ValueError(f"offsets must have shape (n, 2) with n >= 1, got {tuple(self.offsets.shape)}")
        if self.offsets.dtype != torch.int64:
            raise ValueError(f"offsets must be int64, got {self.offsets.dtype}")
        if self.flips.shape != (self.offsets.shape[0],) or self.flips.dtype != torch.bool:
            raise ValueError(
                f"flips must be a bool tensor of shape ({self.offsets.shape[0]},), "
                f"got {self.flips.dtype} {tuple(self.flips.shape)}"
            )

    def __len__(self) -> int:
        return self.offsets.shape[0]

    @property
    def n_views(self) -> int:
        return self.offsets.shape[0]


def max_shift(patches_per_side: int, shift_frac: float = 0.15) -> int:
    """Maximum shift in patches, ``round(shift_frac * patches_per_side)`` (28 -> 4, 37 -> 6)."""
    if patches_per_side < 1:
        raise ValueError(f"patches_per_side must be >= 1, got {patches_per_side}")
    if not 0.0 <= shift_frac <= 1.0:
        raise ValueError(f"shift_frac must be in [0, 1], got {shift_frac}")
    return int(round(shift_frac * patches_per_side))


def farthest_point_sample(points: Tensor, n: int) -> Tensor:
    """Greedy farthest-point sampling: indices (n,) into ``points`` (P, D), starting from ``points[0]``.

    Each step picks the point with the largest Euclidean distance to the already chosen set (first one on ties).
    """
    if points.ndim != 2 or points.shape[0] < 1:
        raise ValueError(f"points must have shape (P, D) with P >= 1, got {tuple(points.shape)}")
    if not 1 <= n <= points.shape[0]:
        raise ValueError(f"n must be in [1, {points.shape[0]}] (number of points), got {n}")
    points = points.to(torch.float64)
    chosen = torch.zeros(n, dtype=torch.int64, device=points.device)
    min_dist = torch.linalg.vector_norm(points - points[0], dim=1)
    for i in range(1, n):
        chosen[i] = torch.argmax(min_dist)
        min_dist = torch.minimum(min_dist, torch.linalg.vector_norm(points - points[chosen[i]], dim=1))
    return chosen


def sample_views(
    n_views: int,
    max_shift: int,
    generator: torch.Generator,
    flip_prob: float = 0.5,
    pool_factor: int = 10,
) -> TTAViews:
    """Sample ``n_views`` TTA views, deterministically given ``generator``.

    A pool of ``pool_factor * n_views`` integer offsets is drawn uniformly in ``[-max_shift, max_shift]^2`` (ends
    included), ``n_views`` of them are kept by farthest-point sampling, and view 0 is forced to the unflipped
    identity. Views ``1..`` are flipped horizontally with probability ``flip_prob``. Returned tensors are on CPU.
    """
    if not isinstance(n_views, int) or n_views < 1:
        raise ValueError(f"n_views must be an int >= 1, got {n_views!r}")
    if not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift must be an int >= 0, got {max_shift!r}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    if not isinstance(pool_factor, int) or pool_factor < 1:
        raise ValueError(f"pool_factor must be an int >= 1, got {pool_factor!r}")

    device = generator.device
    pool = torch.randint(
        -max_shift, max_shift + 1, (pool_factor * n_views, 2), generator=generator, device=device
    )
    offsets = pool[farthest_point_sample(pool, n_views)].to("cpu", torch.int64)
    offsets[0] = 0
    flips = torch.rand(n_views, generator=generator, device=device).cpu() < flip_prob
    flips[0] = False
    return TTAViews(offsets=offsets, flips=flips)


def _shift_flip(x: Tensor, views: TTAViews, step: int, fill: Tensor) -> Tensor:
    """Apply every view to ``x`` (N, C, H, W): (n * N, C, H, W), view-major.

    Shifts are ``offsets * step`` pixels; ``fill`` (C,) fills pixels with no source. ``x`` is padded once and each
    view is a slice of the padded tensor (flipped after the shift when requested).
    """
    n_img, channels, height, width = x.shape
    offsets = views.offsets.tolist()
    flips = views.flips.tolist()
    pad = max(abs(o) for off in offsets for o in off) * step
    padded = fill.to(x).view(1, channels, 1, 1).expand(n_img, channels, height + 2 * pad, width + 2 * pad).clone()
    padded[:, :, pad:pad + height, pad:pad + width] = x
    out = x.new_empty((len(offsets), n_img, channels, height, width))
    for v, ((oy, ox), flip) in enumerate(zip(offsets, flips)):
        # out[y', x'] = in[y' + oy * step, x' + ox * step]
        top, left = pad + oy * step, pad + ox * step
        window = padded[:, :, top:top + height, left:left + width]
        out[v] = window.flip(-1) if flip else window
    return out.view(len(offsets) * n_img, channels, height, width)


def augment_images(images: Tensor, views: TTAViews, patch_size: int, fill: Tensor) -> Tensor:
    """Shifted/flipped copies of ``images`` (B, C, H, W): (n * B, C, H, W), view-major.

    ``fill`` (C,) is the value of pixels that have no source (white in the model's normalisation).
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if fill.shape != (images.shape[1],):
        raise ValueError(f"fill must have shape ({images.shape[1]},) (one value per channel), got {tuple(fill.shape)}")
    return _shift_flip(images, views, patch_size, fill)


def patch_index_grids(views: TTAViews, h: int, w: int) -> Tensor:
    """Original patch index (row-major ``y * w + x``) at each augmented position: (n, h, w) int64, -1 = no source."""
    if h < 1 or w < 1:
        raise ValueError(f"grid size (h, w) must be positive, got ({h}, {w})")
    grid = torch.arange(h * w, dtype=torch.int64).view(1, 1, h, w)
    fill = torch.tensor([GRID_FILL], dtype=torch.int64)
    return _shift_flip(grid, views, 1, fill).view(len(views), h, w)


def unshift_average(features: Tensor, grids: Tensor) -> Tensor:
    """Map view-major tokens back to their original patches and average: (n * B, h, w, C) -> (B, h, w, C).

    The token at augmented position ``p`` of view ``v`` belongs to original patch ``grids[v, p]`` when that is
    ``>= 0``. Accumulation is in (at least) float32; the result has the dtype of ``features``.
    """
    if grids.ndim != 3:
        raise ValueError(f"grids must have shape (n, h, w), got {tuple(grids.shape)}")
    n_views, h, w = grids.shape
    if features.ndim != 4 or features.shape[1:3] != (h, w) or features.shape[0] % n_views != 0:
        raise ValueError(
            f"features must have shape (n * B, {h}, {w}, C) with n = {n_views}, got {tuple(features.shape)}"
        )
    batch, channels, n_patches = features.shape[0] // n_views, features.shape[3], h * w

    # Invalid positions go to an extra "dump" slot (index n_patches) that is dropped at the end.
    index = grids.reshape(n_views, n_patches).to(torch.int64)
    valid = index >= 0
    counts = torch.bincount(index[valid], minlength=n_patches)
    if counts.numel() != n_patches or bool((counts == 0).any()):
        raise ValueError("grids must cover every original patch at least once with indices in [0, h * w)")
    index = torch.where(valid, index, n_patches).to(features.device)

    # Flat target row of token (v, b, p) is b * (n_patches + 1) + index[v, p].
    slot_base = torch.arange(batch, device=features.device) * (n_patches + 1)
    rows = (slot_base.view(1, batch, 1) + index.view(n_views, 1, n_patches)).reshape(-1)
    acc_dtype = torch.promote_types(features.dtype, torch.float32)
    acc = torch.zeros(batch * (n_patches + 1), channels, dtype=acc_dtype, device=features.device)
    acc.index_add_(0, rows, features.reshape(-1, channels).to(acc_dtype))

    acc = acc.view(batch, n_patches + 1, channels)[:, :n_patches]
    mean = acc / counts.to(features.device, acc_dtype).view(1, n_patches, 1)
    return mean.view(batch, h, w, channels).to(features.dtype)


class TTADenoiser:
    """Denoise dense features by averaging over shifted/flipped views (PH-Reg teacher target).

    Args:
        features_fn: maps images (N, C, H, W) to dense features (N, H / patch_size, W / patch_size, D).
        patch_size: patch size of the backbone in pixels.
        fill: (C,) value of pixels shifted in from outside the image (white in the model normalisation).
        n_views: number of views, including the identity view 0.
        shift_frac: maximum shift as a fraction of the (shorter) side in patches.
        flip_prob: probability of a horizontal flip for views 1...
        pool_factor: the offset pool holds ``pool_factor * n_views`` candidates for farthest-point sampling.
        max_images_per_forward: at most this many images per ``features_fn`` call (memory budget).
    """

    def __init__(
        self,
        features_fn: Callable[[Tensor], Tensor],
        patch_size: int,
        fill: Tensor,
        n_views: int = 10,
        shift_frac: float = 0.15,
        flip_prob: float = 0.5,
        pool_factor: int = 10,
        max_images_per_forward: int = 64,
    ) -> None:
        if not callable(features_fn):
            raise ValueError("features_fn must be callable")
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        if fill.ndim != 1:
            raise ValueError(f"fill must be a 1-D per-channel tensor, got shape {tuple(fill.shape)}")
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        if not 0.0 <= shift_frac <= 1.0:
            raise ValueError(f"shift_frac must be in [0, 1], got {shift_frac}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if pool_factor < 1:
            raise ValueError(f"pool_factor must be >= 1, got {pool_factor}")
        if max_images_per_forward < 1:
            raise ValueError(f"max_images_per_forward must be >= 1, got {max_images_per_forward}")
        self.features_fn = features_fn
        self.patch_size = patch_size
        self.fill = fill
        self.n_views = n_views
        self.shift_frac = shift_frac
        self.flip_prob = flip_prob
        self.pool_factor = pool_factor
        self.max_images_per_forward = max_images_per_forward

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Denoised dense features (B, h, w, D) of ``images`` (B, C, H, W)."""
        if images.ndim != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size (H, W) = ({height}, {width}) must be divisible by patch_size = {self.patch_size}"
            )
        h, w = height // self.patch_size, width // self.patch_size
        views = sample_views(
            self.n_views,
            max_shift(min(h, w), self.shift_frac),
            generator,
            flip_prob=self.flip_prob,
            pool_factor=self.pool_factor,
        )
        with torch.no_grad():
            augmented = augment_images(images, views, self.patch_size, self.fill)
            features = torch.cat(
                [self.features_fn(chunk) for chunk in augmented.split(self.max_images_per_forward)], dim=0
            )
            if features.ndim != 4 or features.shape[:3] != (augmented.shape[0], h, w):
                raise ValueError(
                    f"features_fn must return (N, {h}, {w}, D) for N = {augmented.shape[0]} images in total, "
                    f"got {tuple(features.shape)}"
                )
            return unshift_average(features, patch_index_grids(views, h, w))
