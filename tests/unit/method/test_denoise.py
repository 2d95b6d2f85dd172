"""Tests for the teacher TTA denoiser (ph_reg.method.tta)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from ph_reg.method.tta import (
    TTAConfig,
    TTADenoiser,
    TTAViews,
    augment_images,
    farthest_point_sample,
    max_shift,
    patch_index_grids,
    sample_views,
    unshift_average,
)

PATCH = 4
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])
WHITE = (1.0 - CLIP_MEAN) / CLIP_STD


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dyadic_images(batch: int, h: int, w: int, seed: int) -> Tensor:
    """Images whose values are small dyadic rationals, so sums/means of a few of them are exact in float32."""
    values = torch.randint(-64, 64, (batch, 3, h * PATCH, w * PATCH), generator=_gen(seed))
    return values.float() / 16


def _patch_pixels(images: Tensor) -> Tensor:
    """Stand-in backbone: each token is the flattened pixels of its patch, (N, h, w, 3 * p * p)."""
    n = images.shape[0]
    patches = images.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # (N, 3, h, w, p, p)
    h, w = patches.shape[2:4]
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(n, h, w, -1)


def _patch_mean(images: Tensor) -> Tensor:
    """Stand-in backbone invariant to mirroring inside a patch: per-patch mean colour, (N, h, w, 3)."""
    return images.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH).mean(dim=(-1, -2)).permute(0, 2, 3, 1)


def _views(offsets: list[tuple[int, int]], flips: list[bool]) -> TTAViews:
    return TTAViews(torch.tensor(offsets, dtype=torch.int64), torch.tensor(flips, dtype=torch.bool))


def _min_pairwise_distance(points: Tensor) -> float:
    dist = torch.cdist(points.double(), points.double())
    dist.fill_diagonal_(float("inf"))
    return dist.min().item()


# ---------------------------------------------------------------------------------------------------------- views
def test_max_shift_matches_release_values() -> None:
    assert max_shift(28) == 4
    assert max_shift(37) == 6
    assert max_shift(5, shift_frac=0.4) == 2
    with pytest.raises(AssertionError):
        max_shift(0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_views_identity_first_and_in_bounds(seed: int) -> None:
    s = 4
    views = sample_views(10, s, _gen(seed))
    assert views.offsets.shape == (10, 2) and views.offsets.dtype == torch.int64
    assert views.flips.shape == (10,) and views.flips.dtype == torch.bool
    assert views.offsets[0].tolist() == [0, 0] and not views.flips[0]
    assert int(views.offsets.abs().max()) <= s
    # FPS over a 100-point pool in a 9x9 grid keeps distinct, spread-out offsets (views 1..).
    assert _min_pairwise_distance(views.offsets[1:]) >= 2.0


def test_sample_views_deterministic_per_seed() -> None:
    a, b = sample_views(10, 4, _gen(7)), sample_views(10, 4, _gen(7))
    assert torch.equal(a.offsets, b.offsets) and torch.equal(a.flips, b.flips)
    c = sample_views(10, 4, _gen(8))
    assert not (torch.equal(a.offsets, c.offsets) and torch.equal(a.flips, c.flips))


def test_sample_views_flip_probability_extremes() -> None:
    assert not sample_views(10, 3, _gen(0), flip_prob=0.0).flips.any()
    flips = sample_views(10, 3, _gen(0), flip_prob=1.0).flips
    assert not flips[0] and flips[1:].all()


def test_farthest_point_sampling_spreads_points() -> None:
    n, s = 10, 4
    pool = torch.randint(-s, s + 1, (10 * n, 2), generator=_gen(3))
    chosen = pool[farthest_point_sample(pool, n)]
    assert _min_pairwise_distance(chosen) >= _min_pairwise_distance(pool[:n])
    assert _min_pairwise_distance(chosen) > 0  # never the same offset twice when distinct ones exist


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_views": 0}, "n_views"),
        ({"max_shift": -1}, "max_shift"),
        ({"flip_prob": 1.5}, "flip_prob"),
        ({"pool_factor": 0}, "pool_factor"),
    ],
)
def test_sample_views_asserts_its_arguments(kwargs: dict, name: str) -> None:
    args = {"n_views": 10, "max_shift": 4, "generator": _gen(0)} | kwargs
    with pytest.raises(AssertionError):
        sample_views(**args)


def test_single_view_is_identity() -> None:
    views = sample_views(1, 4, _gen(0))
    assert views.offsets.tolist() == [[0, 0]] and views.flips.tolist() == [False]


# ----------------------------------------------------------------------------------------------- augmentation
def _manual_view(images: Tensor, oy: int, ox: int, flip: bool, fill: Tensor) -> Tensor:
    """Reference for one view: roll by whole patches, overwrite the wrapped-around band with fill, then flip."""
    dy, dx = oy * PATCH, ox * PATCH
    out = torch.roll(images, shifts=(-dy, -dx), dims=(2, 3)).clone()
    height, width = images.shape[-2:]
    band = fill.view(1, 3, 1, 1)
    if dy > 0:
        out[:, :, height - dy:, :] = band
    elif dy < 0:
        out[:, :, :-dy, :] = band
    if dx > 0:
        out[:, :, :, width - dx:] = band
    elif dx < 0:
        out[:, :, :, :-dx] = band
    return out.flip(-1) if flip else out


def test_augment_images_matches_manual_roll_and_fill() -> None:
    images = torch.randn(2, 3, 5 * PATCH, 7 * PATCH, generator=_gen(0))
    views = _views([(0, 0), (2, -1), (-1, 3), (1, 1)], [False, False, True, True])
    out = augment_images(images, views, PATCH, WHITE)
    assert out.shape == (4 * 2, 3, 5 * PATCH, 7 * PATCH)
    for v, ((oy, ox), flip) in enumerate(zip(views.offsets.tolist(), views.flips.tolist())):
        assert torch.equal(out[v * 2:(v + 1) * 2], _manual_view(images, oy, ox, flip, WHITE)), f"view {v}"
    assert torch.equal(out[:2], images)  # view 0 is the identity


def test_shift_semantics_single_pixel() -> None:
    """out[y - oy * p, x - ox * p] = in[y, x]: a single marked pixel moves by whole patches."""
    images = torch.zeros(1, 3, 6 * PATCH, 6 * PATCH)
    y, x = 3 * PATCH + 1, 2 * PATCH + 2
    images[0, :, y, x] = 5.0
    out = augment_images(images, _views([(0, 0), (1, -2)], [False, False]), PATCH, torch.zeros(3))
    marked = (out[1, 0] == 5.0).nonzero().tolist()
    assert marked == [[y - 1 * PATCH, x + 2 * PATCH]]


@pytest.mark.parametrize("seed", [0, 1])
def test_out_of_bounds_pixels_are_white_fill(seed: int) -> None:
    h, w = 5, 7
    images = torch.randn(2, 3, h * PATCH, w * PATCH, generator=_gen(seed))
    views = sample_views(6, 2, _gen(seed))
    out = augment_images(images, views, PATCH, WHITE).view(6, 2, 3, h * PATCH, w * PATCH)
    grids = patch_index_grids(views, h, w)
    empty = (grids < 0).repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)  # (n, H, W) pixel mask
    assert empty.any()
    filled = out.permute(0, 1, 3, 4, 2)[empty.unsqueeze(1).expand(6, 2, -1, -1)]  # (k, 3)
    assert torch.equal(filled, WHITE.expand_as(filled))
    # Every valid pixel comes from the image (random normal values never equal the fill exactly).
    kept = out.permute(0, 1, 3, 4, 2)[~empty.unsqueeze(1).expand(6, 2, -1, -1)]
    assert not (kept == WHITE).all(dim=-1).any()


def test_augment_images_validates_inputs() -> None:
    views = sample_views(3, 1, _gen(0))
    with pytest.raises(ValueError, match="fill"):
        augment_images(torch.zeros(1, 3, 8, 8), views, PATCH, torch.zeros(4))
    with pytest.raises(ValueError, match="images"):
        augment_images(torch.zeros(3, 8, 8), views, PATCH, torch.zeros(3))


# ---------------------------------------------------------------------------------------------- index grids
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grids_agree_with_augmented_patch_ids(seed: int) -> None:
    """An image whose pixels encode their own patch id: every token of every view maps back to its source."""
    h, w = 5, 7
    ids = torch.arange(h * w, dtype=torch.float32).view(h, w)
    image = ids.repeat_interleave(PATCH, 0).repeat_interleave(PATCH, 1).expand(1, 3, -1, -1)
    views = sample_views(10, 2, _gen(seed), flip_prob=0.5)
    assert views.flips.any() and views.offsets.abs().sum() > 0
    tokens = _patch_mean(augment_images(image, views, PATCH, torch.full((3,), -1.0)))
    seen = tokens[..., 0].round().long()  # (n, h, w) patch id present at each augmented position, -1 = fill
    grids = patch_index_grids(views, h, w)
    assert grids.shape == (10, h, w) and grids.dtype == torch.int64
    assert torch.equal(seen, grids)
    assert torch.equal(grids[0], torch.arange(h * w).view(h, w))


# ------------------------------------------------------------------------------------------- un-shift average
def _slow_unshift_average(features: Tensor, grids: Tensor) -> Tensor:
    n, h, w = grids.shape
    batch, channels = features.shape[0] // n, features.shape[-1]
    total = torch.zeros(batch, h * w, channels, dtype=torch.float64)
    count = torch.zeros(h * w, dtype=torch.float64)
    for v in range(n):
        for y in range(h):
            for x in range(w):
                src = int(grids[v, y, x])
                if src < 0:
                    continue
                count[src] += 1
                for b in range(batch):
                    total[b, src] += features[v * batch + b, y, x].double()
    return (total / count.view(1, -1, 1)).view(batch, h, w, channels)


@pytest.mark.parametrize("seed", [0, 1])
def test_unshift_average_matches_slow_reference(seed: int) -> None:
    n, batch, h, w, channels = 6, 3, 5, 7, 8
    views = sample_views(n, 2, _gen(seed), flip_prob=0.5)
    assert views.flips.any()
    grids = patch_index_grids(views, h, w)
    features = torch.randn(n * batch, h, w, channels, generator=_gen(100 + seed))
    fast = unshift_average(features, grids)
    assert fast.shape == (batch, h, w, channels) and fast.dtype == torch.float32
    torch.testing.assert_close(fast.double(), _slow_unshift_average(features, grids), rtol=0, atol=1e-6)


def test_unshift_average_accumulates_bf16_in_float32() -> None:
    n, batch, h, w, channels = 10, 2, 6, 6, 16
    grids = patch_index_grids(sample_views(n, 2, _gen(0)), h, w)
    features = (torch.randn(n * batch, h, w, channels, generator=_gen(1)) * 100).bfloat16()
    out = unshift_average(features, grids)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, unshift_average(features.float(), grids).bfloat16())


def test_unshift_average_validates_shapes() -> None:
    grids = patch_index_grids(sample_views(4, 1, _gen(0)), 3, 3)
    with pytest.raises(ValueError, match="features"):
        unshift_average(torch.zeros(6, 3, 3, 2), grids)  # 6 rows is not a multiple of 4 views
    with pytest.raises(ValueError, match="grids"):
        unshift_average(torch.zeros(4, 3, 3, 2), torch.full((4, 3, 3), -1))  # nothing covered


# ------------------------------------------------------------------------------------------------- denoiser
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("h", "w"), [(6, 6), (5, 7)])
def test_denoiser_is_exact_for_shift_equivariant_backbone_without_flips(seed: int, h: int, w: int) -> None:
    images = _dyadic_images(2, h, w, seed)
    denoiser = TTADenoiser(_patch_pixels, PATCH, WHITE, TTAConfig(n_views=10, shift_frac=0.4, flip_prob=0.0))
    denoised = denoiser(images, _gen(seed))
    assert max_shift(min(h, w), 0.4) == 2  # the views really shift
    assert torch.equal(denoised, _patch_pixels(images))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("flip_prob", [0.5, 1.0])
def test_denoiser_is_exact_for_mirror_invariant_backbone_with_flips(seed: int, flip_prob: float) -> None:
    images = _dyadic_images(3, 5, 7, seed)
    denoiser = TTADenoiser(_patch_mean, PATCH, WHITE, TTAConfig(n_views=10, shift_frac=0.4, flip_prob=flip_prob))
    assert sample_views(10, 2, _gen(seed), flip_prob=flip_prob).flips.any()  # the same views the call draws
    assert torch.equal(denoiser(images, _gen(seed)), _patch_mean(images))


def test_denoiser_flip_breaks_exactness_for_mirror_sensitive_backbone() -> None:
    """Sanity check of the test design: patch pixels cannot be un-mirrored, so flips change the average."""
    images = _dyadic_images(1, 5, 7, 0)
    denoiser = TTADenoiser(_patch_pixels, PATCH, WHITE, TTAConfig(n_views=10, shift_frac=0.4, flip_prob=1.0))
    assert not torch.equal(denoiser(images, _gen(0)), _patch_pixels(images))


def test_denoiser_attenuates_position_locked_artifacts() -> None:
    """An artifact pinned to one token position (not to content) is averaged away by the shifts."""
    artifact = 100.0

    def with_artifact(images: Tensor) -> Tensor:
        tokens = _patch_mean(images).clone()
        tokens[:, 2, 3] += artifact
        return tokens

    images = _dyadic_images(2, 7, 7, 0)
    clean = _patch_mean(images)
    plain_error = (with_artifact(images) - clean).abs().max()
    denoiser = TTADenoiser(with_artifact, PATCH, WHITE, TTAConfig(shift_frac=0.3))
    denoised_error = (denoiser(images, _gen(0)) - clean).abs().max()
    assert plain_error == artifact
    assert denoised_error < 0.5 * artifact


@pytest.mark.parametrize(("batch", "n_views", "budget"), [(5, 10, 16), (3, 4, 64), (2, 3, 1)])
def test_denoiser_runs_exactly_n_forwards_per_image_within_budget(batch: int, n_views: int, budget: int) -> None:
    calls: list[int] = []

    def counting(images: Tensor) -> Tensor:
        assert not torch.is_grad_enabled()
        calls.append(images.shape[0])
        return _patch_mean(images)

    images = _dyadic_images(batch, 4, 6, 0).requires_grad_(True)
    denoiser = TTADenoiser(counting, PATCH, WHITE, TTAConfig(n_views=n_views), max_images_per_forward=budget)
    out = denoiser(images, _gen(0))
    assert out.shape == (batch, 4, 6, 3) and not out.requires_grad
    assert sum(calls) == n_views * batch
    assert max(calls) <= budget
    assert len(calls) == math.ceil(n_views * batch / budget)


def test_denoiser_validates_inputs() -> None:
    denoiser = TTADenoiser(_patch_mean, PATCH, WHITE, TTAConfig())
    with pytest.raises(ValueError, match="patch_size"):
        denoiser(torch.zeros(1, 3, 4 * PATCH, 4 * PATCH + 1), _gen(0))
    with pytest.raises(ValueError, match="images"):
        denoiser(torch.zeros(3, 4 * PATCH, 4 * PATCH), _gen(0))
    with pytest.raises(ValueError, match="features_fn"):
        TTADenoiser(lambda x: x, PATCH, WHITE, TTAConfig())(torch.zeros(1, 3, 4 * PATCH, 4 * PATCH), _gen(0))
    # values a TTAConfig validated at the boundary (from_mapping) are only asserted inside
    with pytest.raises(AssertionError, match="max_images_per_forward"):
        TTADenoiser(_patch_mean, PATCH, WHITE, TTAConfig(), max_images_per_forward=0)
    with pytest.raises(AssertionError):
        TTADenoiser(_patch_mean, PATCH, WHITE, TTAConfig(n_views=0))


def test_sample_views_offset_range_includes_both_ends() -> None:
    s = 2
    seen = torch.cat([sample_views(10, s, _gen(seed)).offsets for seed in range(5)])
    assert set(seen.flatten().tolist()) == set(range(-s, s + 1))


def test_denoiser_shift_bound_uses_shorter_side() -> None:
    """Non-square image, 3 x 20 patches, shift_frac 0.4: s = round(0.4 * 3) = 1 patch in both directions."""
    h, w, s = 3, 20, 1
    seen: list[Tensor] = []

    def recording(images: Tensor) -> Tensor:
        seen.append(images)
        return _patch_mean(images)

    images = _dyadic_images(2, h, w, 0)  # dyadic values never equal the (non-dyadic) white fill
    TTADenoiser(recording, PATCH, WHITE, TTAConfig(n_views=10, shift_frac=0.4))(images, _gen(0))
    is_fill = (torch.cat(seen) == WHITE.view(1, 3, 1, 1)).all(dim=1)  # (n * B, H, W)
    filled_rows = is_fill.all(dim=2).sum(dim=1) // PATCH  # whole patch rows shifted in from outside, per view
    filled_cols = is_fill.all(dim=1).sum(dim=1) // PATCH
    assert int(filled_rows.max()) == s and int(filled_cols.max()) == s
