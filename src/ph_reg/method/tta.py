"""Teacher-side test-time-augmentation (TTA) denoising for PH-Reg.

The teacher is run on ``n`` copies of each image, shifted by whole patches and optionally mirrored. Artifact tokens
do not move with the image content, so mapping every output token back to the original patch it came from and
averaging over the views cancels them out (docs/method.md, section 2).

Conventions:
    * A view is an integer offset ``(oy, ox)`` in patches plus a horizontal-flip flag. View 0 is the identity.
    * The denoiser draws the views of every image apart (the public release draws them in its dataset's
      ``__getitem__``), from a generator per image (:func:`image_generators`), and still runs the teacher once over
      all views of all images of a batch.
    * Shift semantics: ``out[y - oy * p, x - ox * p] = in[y, x]``; pixels without a source get ``fill``.
      The horizontal flip is applied after the shift.
    * Batched tensors holding several views are *view-major*: view ``v`` occupies rows ``v * B:(v + 1) * B``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ph_reg.config import at_least, number_in
from ph_reg.runtime import generator as seeded_generator
from ph_reg.runtime import to_device

__all__ = [
    "MAX_IMAGES_PER_FORWARD",
    "TTAConfig",
    "TTAViews",
    "max_shift",
    "farthest_point_sample",
    "sample_views",
    "augment_images",
    "patch_index_grids",
    "unshift_average",
    "image_generators",
    "TTADenoiser",
]

GRID_FILL = -1  # patch index of grid cells that have no source patch
#: The default memory budget of a denoiser: augmented images per ``features_fn`` call
#: (``teacher_denoising.max_images_per_forward``); the one place it is written.
MAX_IMAGES_PER_FORWARD = 20
#: shift_frac must lie strictly inside this interval: shifts of up to half the grid alias.
SHIFT_FRAC_BOUNDS = (0.0, 0.5)


@dataclass(frozen=True)
class TTAConfig:
    """The test-time augmentation of the teacher (``teacher_denoising.tta``): ``n_views`` views (view 0 the
    identity), shifts of up to ``round(shift_frac * patches per side)`` whole patches, a horizontal flip with
    probability ``flip_prob``, offsets chosen by farthest-point sampling from ``pool_factor * n_views`` candidates.
    The one place these defaults are written."""

    n_views: int = field(default=10, metadata=at_least(1))
    shift_frac: float = field(default=0.15, metadata=number_in(*SHIFT_FRAC_BOUNDS, closed=False))
    flip_prob: float = field(default=0.5, metadata=number_in(0.0, 1.0))
    pool_factor: int = field(default=10, metadata=at_least(1))


@dataclass(frozen=True)
class TTAViews:
    """A set of TTA views, shared by every image of a batch or drawn per image.

    Attributes:
        offsets: (n, 2) int64 ``(oy, ox)`` shifts in whole patches, shared by every image, or (B, n, 2): image
            ``b`` gets the views ``offsets[b]``. View 0 is the identity in every set drawn by :func:`sample_views`.
        flips: (n,) bool horizontal-flip flags (or (B, n), matching ``offsets``).
    """

    offsets: Tensor
    flips: Tensor

    def __post_init__(self) -> None:
        if self.offsets.ndim not in (2, 3) or self.offsets.shape[-1] != 2 or self.offsets.shape[-2] < 1:
            raise ValueError(
                f"offsets must have shape (n, 2) or (B, n, 2) with n >= 1, got {tuple(self.offsets.shape)}"
            )
        if self.offsets.dtype != torch.int64:
            raise ValueError(f"offsets must be int64, got {self.offsets.dtype}")
        if self.flips.shape != self.offsets.shape[:-1] or self.flips.dtype != torch.bool:
            raise ValueError(
                f"flips must be a bool tensor of shape {tuple(self.offsets.shape[:-1])}, "
                f"got {self.flips.dtype} {tuple(self.flips.shape)}"
            )

    def __len__(self) -> int:
        return self.n_views

    @property
    def n_views(self) -> int:
        return self.offsets.shape[-2]

    @property
    def per_image(self) -> bool:
        """True when every image has its own views (``offsets`` is (B, n, 2))."""
        return self.offsets.ndim == 3

    @classmethod
    def stack(cls, views: Sequence["TTAViews"]) -> "TTAViews":
        """Per-image views (B, n, ...) from ``B`` (n, 2) view sets with the same n (image ``b`` gets ``views[b]``)."""
        if not views or any(v.per_image for v in views) or len({v.n_views for v in views}) != 1:
            raise ValueError("stack needs a non-empty sequence of (n, 2) view sets with the same n")
        return cls(torch.stack([v.offsets for v in views]), torch.stack([v.flips for v in views]))

    def view_major(self, batch: int) -> tuple[Tensor, Tensor]:
        """``(offsets (n, B, 2), flips (n, B))`` for a batch of ``batch`` images: view ``v`` of image ``b`` at
        ``[v, b]``, the order of the augmented tensors."""
        if self.per_image:
            if self.offsets.shape[0] != batch:
                raise ValueError(f"views were drawn for {self.offsets.shape[0]} images, but the batch has {batch}")
            return self.offsets.transpose(0, 1), self.flips.transpose(0, 1)
        return (self.offsets[:, None].expand(-1, batch, -1), self.flips[:, None].expand(-1, batch))


def max_shift(patches_per_side: int, shift_frac: float = TTAConfig.shift_frac) -> int:
    """Maximum shift in patches, ``round(shift_frac * patches_per_side)`` (28 -> 4, 37 -> 6)."""
    assert patches_per_side >= 1 and 0.0 <= shift_frac <= 1.0, (patches_per_side, shift_frac)
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
    flip_prob: float = TTAConfig.flip_prob,
    pool_factor: int = TTAConfig.pool_factor,
) -> TTAViews:
    """Sample ``n_views`` TTA views, deterministically given ``generator``.

    A pool of ``pool_factor * n_views`` integer offsets is drawn uniformly in ``[-max_shift, max_shift]^2`` (ends
    included), ``n_views`` of them are kept by farthest-point sampling, and view 0 is forced to the unflipped
    identity. Views ``1..`` are flipped horizontally with probability ``flip_prob``. Returned tensors are on CPU.
    """
    assert n_views >= 1 and max_shift >= 0 and pool_factor >= 1 and 0.0 <= flip_prob <= 1.0, "see TTAConfig"

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
    """Apply the views to ``x`` (B, C, H, W): (n * B, C, H, W), view-major (view ``v`` of image ``b`` at row
    ``v * B + b``), without a Python loop over views or images.

    Shifts are ``offsets * step`` pixels; ``fill`` (C,) fills pixels with no source. ``x`` is padded once; every
    output row is a window of the padded image (flipped after the shift when requested), read by one row gather
    (``index_select``) and one column gather, since a shift and a horizontal flip act on rows and columns apart.
    """
    n_img, channels, height, width = x.shape
    offsets, flips = views.view_major(n_img)
    n_views = offsets.shape[0]
    pad = int(offsets.abs().max()) * step
    offsets, flips = to_device(offsets, x.device), to_device(flips, x.device)  # the host does not wait
    # (B, H + 2 pad, C, W + 2 pad): rows first, so one index_select over (image, row) picks the rows of every view
    padded = fill.to(x).view(1, 1, channels, 1).expand(n_img, height + 2 * pad, channels, width + 2 * pad).clone()
    padded[:, pad:pad + height, :, pad:pad + width] = x.transpose(1, 2)
    padded = padded.view(n_img * (height + 2 * pad), channels, width + 2 * pad)
    # out[v, b, :, y', x'] = padded[b, pad + oy * step + y', :, pad + ox * step + (W - 1 - x' if flip else x')]
    image_base = torch.arange(n_img, device=x.device) * (height + 2 * pad)
    rows = (image_base.view(1, n_img, 1) + pad + offsets[..., 0:1] * step
            + torch.arange(height, device=x.device).view(1, 1, height))
    picked = padded.index_select(0, rows.reshape(-1)).view(n_views * n_img, height, channels, width + 2 * pad)
    xs = torch.arange(width, device=x.device).view(1, 1, width)
    cols = pad + offsets[..., 1:2] * step + torch.where(flips[..., None], width - 1 - xs, xs)
    cols = cols.reshape(n_views * n_img, 1, 1, width).expand(-1, height, channels, -1)
    return picked.gather(3, cols).transpose(1, 2).contiguous()


def augment_images(images: Tensor, views: TTAViews, patch_size: int, fill: Tensor) -> Tensor:
    """Shifted/flipped copies of ``images`` (B, C, H, W): (n * B, C, H, W), view-major.

    ``views`` are shared by the batch ((n, 2) offsets) or drawn per image ((B, n, 2)). ``fill`` (C,) is the value
    of pixels that have no source (white in the model's normalisation).
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if fill.shape != (images.shape[1],):
        raise ValueError(f"fill must have shape ({images.shape[1]},) (one value per channel), got {tuple(fill.shape)}")
    return _shift_flip(images, views, patch_size, fill)


def patch_index_grids(views: TTAViews, h: int, w: int) -> Tensor:
    """Original patch index (row-major ``y * w + x``) at each augmented position, -1 = no source: (n, h, w) int64
    for shared views, (n, B, h, w) for per-image views (view-major, like the augmented images)."""
    if h < 1 or w < 1:
        raise ValueError(f"grid size (h, w) must be positive, got ({h}, {w})")
    batch = views.offsets.shape[0] if views.per_image else 1
    grid = torch.arange(h * w, dtype=torch.int64).view(1, 1, h, w).expand(batch, 1, h, w)
    fill = torch.tensor([GRID_FILL], dtype=torch.int64)
    grids = _shift_flip(grid, views, 1, fill)
    return grids.view(len(views), batch, h, w) if views.per_image else grids.view(len(views), h, w)


def unshift_average(features: Tensor, grids: Tensor) -> Tensor:
    """Map view-major tokens back to their original patches and average: (n * B, h, w, C) -> (B, h, w, C).

    ``grids`` is (n, h, w) (views shared by the batch) or (n, B, h, w) (per image, view-major). The token at
    augmented position ``p`` of view ``v`` of image ``b`` belongs to original patch ``grids[v, (b,) p]`` when that
    is ``>= 0``. All tokens are summed by one ``index_add_`` on the features' device, then divided by each image's
    per-patch count. Accumulation is in (at least) float32; the result has the dtype of ``features``.
    """
    if grids.ndim not in (3, 4):
        raise ValueError(f"grids must have shape (n, h, w) or (n, B, h, w), got {tuple(grids.shape)}")
    n_views, h, w = grids.shape[0], grids.shape[-2], grids.shape[-1]
    if features.ndim != 4 or features.shape[1:3] != (h, w) or features.shape[0] % n_views != 0:
        raise ValueError(
            f"features must have shape (n * B, {h}, {w}, C) with n = {n_views}, got {tuple(features.shape)}"
        )
    batch, channels, n_patches = features.shape[0] // n_views, features.shape[3], h * w
    if grids.ndim == 4 and grids.shape[1] != batch:
        raise ValueError(f"grids hold views of {grids.shape[1]} images, features of {batch} (n = {n_views})")

    # Flat slot of token (v, b, p): b * (n_patches + 1) + grids[v, b, p]; invalid positions go to each image's extra
    # "dump" slot n_patches, dropped at the end.
    index = grids.reshape(n_views, -1, n_patches).expand(n_views, batch, n_patches).to(torch.int64)
    if bool((index >= n_patches).any()) or bool((index < GRID_FILL).any()):
        raise ValueError(f"grids must hold patch indices in [0, h * w) or {GRID_FILL} (no source)")
    index = torch.where(index >= 0, index, n_patches)
    slots = torch.arange(batch, device=index.device).view(1, batch, 1) * (n_patches + 1) + index
    counts = torch.bincount(slots.reshape(-1), minlength=batch * (n_patches + 1)).view(batch, n_patches + 1)
    counts = counts[:, :n_patches]
    if bool((counts == 0).any()):
        raise ValueError("grids must cover every original patch of every image at least once")

    acc_dtype = torch.promote_types(features.dtype, torch.float32)
    acc = torch.zeros(batch * (n_patches + 1), channels, dtype=acc_dtype, device=features.device)
    # the index is built on the host and copied without a wait: the next work is queued behind the teacher forward
    acc.index_add_(0, to_device(slots.reshape(-1), features.device), features.reshape(-1, channels).to(acc_dtype))

    acc = acc.view(batch, n_patches + 1, channels)[:, :n_patches]
    mean = acc / to_device(counts, features.device).to(acc_dtype).view(batch, n_patches, 1)
    return mean.view(batch, h, w, channels).to(features.dtype)


def image_generators(seed: int, epoch: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One generator per image, seeded from ``(seed, "tta", epoch, image index)``: an image's views depend on the
    run's seed, the epoch and the image alone, never on the batch it lands in or its place there. The teacher
    denoising stage (cached targets) uses epoch 0, the key of online targets in the first epoch."""
    return [seeded_generator(seed, "tta", epoch, int(index)) for index in indices]


class TTADenoiser:
    """Denoise dense features by averaging over shifted/flipped views (PH-Reg teacher target).

    Args:
        features_fn: maps images (N, C, H, W) to dense features (N, H / patch_size, W / patch_size, D).
        patch_size: patch size of the backbone in pixels.
        fill: (C,) value of pixels shifted in from outside the image (white in the model normalisation).
        tta: the views (:class:`TTAConfig`, validated where it was built).
        max_images_per_forward: at most this many images per ``features_fn`` call (memory budget).
    """

    def __init__(self, features_fn: Callable[[Tensor], Tensor], patch_size: int, fill: Tensor, tta: TTAConfig,
                 max_images_per_forward: int = MAX_IMAGES_PER_FORWARD) -> None:
        assert callable(features_fn) and patch_size >= 1 and isinstance(tta, TTAConfig)
        assert tta.n_views >= 1 and tta.pool_factor >= 1 and 0.0 <= tta.flip_prob <= 1.0, tta
        assert max_images_per_forward >= 1, "max_images_per_forward must be >= 1"
        if fill.ndim != 1:
            raise ValueError(f"fill must be a 1-D per-channel tensor, got shape {tuple(fill.shape)}")
        self.features_fn = features_fn
        self.patch_size = patch_size
        self.fill = fill
        self.tta = tta
        self.max_images_per_forward = max_images_per_forward

    def sample(self, h: int, w: int, generators: Sequence[torch.Generator]) -> TTAViews:
        """Per-image views (B, n, ...) for a grid of ``h x w`` patches: image ``b`` draws its own ``n_views``
        (:func:`sample_views`) from ``generators[b]`` (the same generator object listed twice serves both images in
        turn)."""
        tta = self.tta
        shift = max_shift(min(h, w), tta.shift_frac)
        return TTAViews.stack([
            sample_views(tta.n_views, shift, gen, flip_prob=tta.flip_prob, pool_factor=tta.pool_factor)
            for gen in generators
        ])

    def __call__(self, images: Tensor, generators: torch.Generator | Sequence[torch.Generator]) -> Tensor:
        """Denoised dense features (B, h, w, D) of ``images`` (B, C, H, W).

        ``generators``: one ``torch.Generator`` per image (see :func:`image_generators`), from which that image
        draws its views; or a single generator that every image draws from in turn (views still differ per image,
        but then depend on the image's place in the batch). All ``n * B`` views go through
        ``features_fn`` in one batch (split only by ``max_images_per_forward``).
        """
        if images.ndim != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size (H, W) = ({height}, {width}) must be divisible by patch_size = {self.patch_size}"
            )
        batch = images.shape[0]
        if isinstance(generators, torch.Generator):
            generators = [generators] * batch
        elif not isinstance(generators, Sequence) or len(generators) != batch or not all(
                isinstance(g, torch.Generator) for g in generators):
            raise ValueError(f"generators must be a torch.Generator or a sequence of {batch} (one per image), "
                             f"got {type(generators).__name__}"
                             + (f" of length {len(generators)}" if isinstance(generators, Sequence) else ""))
        h, w = height // self.patch_size, width // self.patch_size
        views = self.sample(h, w, generators)
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
