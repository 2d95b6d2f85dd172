"""Tests for the artifact metrics (ph_reg.evaluation.artifacts) and the feature figures (ph_reg.reporting.figures)."""
import io
import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from ph_reg.evaluation.artifacts import (
    artifact_report,
    cosine_map,
    norm_statistics,
    patch_norms,
    robust_outlier_mask,
)
from ph_reg.reporting.figures import feature_figure, pca_rgb

PLANTED = [(0, 1, 2), (0, 7, 7), (1, 0, 0), (2, 5, 3), (3, 15, 15)]


def _gaussian(shape=(4, 16, 16, 64), seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _planted(features: torch.Tensor, scale: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    out = features.clone()
    mask = torch.zeros(features.shape[:3], dtype=torch.bool)
    for b, y, x in PLANTED:
        out[b, y, x] *= scale
        mask[b, y, x] = True
    return out, mask


def test_patch_norms_shape_dtype_and_values():
    feats = _gaussian((2, 3, 5, 8)).to(torch.bfloat16)
    norms = patch_norms(feats)
    assert norms.shape == (2, 3, 5) and norms.dtype == torch.float32
    expected = feats.float().numpy()
    np.testing.assert_allclose(norms.numpy(), np.linalg.norm(expected, axis=-1), rtol=1e-5)
    with pytest.raises(ValueError, match="features"):
        patch_norms(torch.randn(3, 4, 8))


def test_outlier_mask_finds_exactly_planted_tokens():
    # Planted tokens sit ~100 robust sigmas out; k=6 keeps Gaussian chance outliers (a max z of ~3-4.5 over 1024
    # chi-distributed norms, depending on the seed) out of the exact comparison.
    feats, planted = _planted(_gaussian())
    mask = robust_outlier_mask(patch_norms(feats), k=6.0)
    assert mask.dtype == torch.bool and mask.shape == planted.shape
    assert torch.equal(mask, planted)
    assert robust_outlier_mask(patch_norms(feats))[planted].all()  # also found at the default k


def test_outlier_mask_robust_z_rule():
    reference = torch.arange(0, 101, dtype=torch.float32)  # median 50, MAD 25 -> scale 1.4826 * 25 = 37.065
    norms = torch.tensor([87.0, 87.1, 10.0, -100.0])
    mask = robust_outlier_mask(norms, k=1.0, reference=reference)
    assert mask.tolist() == [False, True, False, False]  # one-sided: low norms are not artifacts


def test_outlier_rate_small_without_outliers():
    mask = robust_outlier_mask(patch_norms(_gaussian(seed=1)))
    assert mask.float().mean().item() < 0.01


def test_outlier_mask_uses_reference_statistics():
    clean = patch_norms(_gaussian(seed=2))
    # Against a reference with the same distribution, shifted norms are all outliers; against themselves, none.
    shifted = clean + 100.0
    assert robust_outlier_mask(shifted, reference=clean).all()
    assert robust_outlier_mask(shifted).float().mean().item() < 0.01


def test_outlier_mask_degenerate_mad():
    norms = torch.full((2, 4, 4), 5.0)
    mask = robust_outlier_mask(norms)
    assert not mask.any()
    norms[1, 2, 3] = 6.0  # MAD is still 0: the epsilon scale must flag this and only this token
    mask = robust_outlier_mask(norms)
    assert mask.sum().item() == 1 and mask[1, 2, 3]
    assert not robust_outlier_mask(torch.zeros(3, 2, 2)).any()  # median 0 and MAD 0: no NaN/inf surprises


def test_norm_statistics_matches_numpy():
    norms = torch.arange(1, 201, dtype=torch.float32).reshape(2, 10, 10) ** 1.5
    stats = norm_statistics(norms)
    ref = norms.numpy().astype(np.float64).ravel()
    assert set(stats) == {"mean", "std", "median", "p99", "max"}
    assert all(isinstance(v, float) for v in stats.values())
    np.testing.assert_allclose(stats["mean"], ref.mean(), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], ref.std(), rtol=1e-6)
    np.testing.assert_allclose(stats["median"], np.median(ref), rtol=1e-6)
    np.testing.assert_allclose(stats["p99"], np.percentile(ref, 99), rtol=1e-6)
    np.testing.assert_allclose(stats["max"], ref.max(), rtol=1e-6)


def test_cosine_map_identity_negation_and_manual():
    a = _gaussian((2, 4, 5, 16), seed=3)
    b = _gaussian((2, 4, 5, 16), seed=4)
    torch.testing.assert_close(cosine_map(a, a), torch.ones(2, 4, 5))
    torch.testing.assert_close(cosine_map(a, -a), -torch.ones(2, 4, 5))
    manual = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    cos = cosine_map(a, b)
    assert cos.shape == (2, 4, 5)
    torch.testing.assert_close(cos, manual)


def test_cosine_map_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 4, 5, 16\).*\(2, 4, 4, 16\)"):
        cosine_map(torch.randn(2, 4, 5, 16), torch.randn(2, 4, 4, 16))


def _report_sources() -> dict[str, torch.Tensor]:
    target = _gaussian(seed=5)
    noise = 0.05 * _gaussian(seed=6)
    direction = torch.nn.functional.normalize(_gaussian((64,), seed=7), dim=0)
    teacher = target.clone()
    for b, y, x in PLANTED:  # artifacts: large norm along a fixed direction unrelated to the content
        teacher[b, y, x] = 10.0 * target[b, y, x].norm() * direction
    return {"teacher": teacher, "target": target, "student": target + noise}


def test_artifact_report_ranks_sources_and_is_json():
    report = artifact_report(_report_sources(), k=3.5)
    json.dumps(report)
    assert report["outlier_threshold_k"] == 3.5
    assert set(report["per_source"]) == {"teacher", "target", "student"}
    assert set(report["cosine_to_target"]) == {"teacher", "student"}
    teacher_rate = report["per_source"]["teacher"]["outlier_rate"]
    assert teacher_rate >= len(PLANTED) / (4 * 16 * 16)
    assert teacher_rate > report["per_source"]["student"]["outlier_rate"]
    cos = report["cosine_to_target"]
    assert cos["student"]["mean"] > cos["teacher"]["mean"]
    assert cos["student"]["low_share"] == 0.0
    assert cos["teacher"]["low_share"] == pytest.approx(len(PLANTED) / (4 * 16 * 16))
    assert cos["student"]["p05"] > 0.99
    assert report["per_source"]["teacher"]["norm"]["max"] > 5 * report["per_source"]["target"]["norm"]["max"]


def test_artifact_report_bad_input():
    sources = _report_sources()
    with pytest.raises(ValueError, match="target_key"):
        artifact_report(sources, target_key="denoised")
    sources["student"] = sources["student"][:, :8]
    with pytest.raises(ValueError, match="student"):
        artifact_report(sources)


def test_pca_rgb_range_shape_determinism():
    feats = {"a": _gaussian((2, 6, 7, 32), seed=8), "b": _gaussian((2, 6, 7, 32), seed=9)}
    out = pca_rgb(feats)
    assert set(out) == {"a", "b"}
    for rgb in out.values():
        assert rgb.shape == (2, 6, 7, 3) and rgb.dtype == torch.float32
        assert rgb.min() >= 0.0 and rgb.max() <= 1.0
        assert rgb.max() == 1.0 and rgb.min() == 0.0  # percentile scaling spans the full range
    again = pca_rgb(feats)
    for name in feats:
        assert torch.equal(out[name], again[name])
    single = pca_rgb(feats["a"])
    assert isinstance(single, torch.Tensor) and torch.equal(single, out["a"])


def test_pca_rgb_first_channel_follows_dominant_direction():
    g = torch.Generator().manual_seed(10)
    C = 24
    direction = torch.nn.functional.normalize(torch.randn(C, generator=g), dim=0)
    direction = direction * torch.sign(direction[direction.abs().argmax()])  # largest loading positive
    coeff = 5.0 * torch.randn(3, 8, 8, generator=g)
    feats = coeff[..., None] * direction + 0.3 * torch.randn(3, 8, 8, C, generator=g)
    red = pca_rgb(feats)[..., 0].flatten()
    proj = (feats @ direction).flatten()
    corr = np.corrcoef(red.numpy(), proj.numpy())[0, 1]
    assert corr > 0.95
    # The sign is fixed by the loadings, not the data: negated tokens project to mirrored colours.
    torch.testing.assert_close(pca_rgb(-feats), 1.0 - pca_rgb(feats), atol=1e-4, rtol=0)


def test_pca_rgb_bad_components():
    with pytest.raises(ValueError, match="n_components"):
        pca_rgb(torch.randn(1, 2, 2, 2), n_components=3)


@pytest.mark.parametrize("uint8", [False, True])
def test_feature_figure_counts_images_and_saves(uint8):
    n_images, sources = 3, _report_sources()
    sources = {k: v[:n_images, :8, :8, :16] for k, v in sources.items()}
    images = torch.rand(n_images, 3, 32, 32)
    if uint8:
        images = (images * 255).to(torch.uint8)
    fig = feature_figure(images, sources, titles={"teacher": "NACLIP teacher"}, max_images=4)
    assert isinstance(fig, Figure)
    n_axes_images = sum(isinstance(a, AxesImage) for ax in fig.axes for a in ax.get_children())
    assert n_axes_images == (1 + 2 * len(sources)) * n_images
    titles = {ax.get_title() for ax in fig.axes}
    assert {"image", "NACLIP teacher PCA", "NACLIP teacher norm", "student PCA", "target norm"} <= titles
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue().startswith(b"\x89PNG")


def test_feature_figure_limits_rows_and_checks_batch():
    sources = {"teacher": _gaussian((5, 4, 4, 8), seed=11)}
    images = torch.rand(5, 3, 16, 16)
    fig = feature_figure(images, sources, max_images=2)
    n_axes_images = sum(isinstance(a, AxesImage) for ax in fig.axes for a in ax.get_children())
    assert n_axes_images == 3 * 2
    with pytest.raises(ValueError, match="batch size"):
        feature_figure(images[:4], sources)
    with pytest.raises(ValueError, match="images"):
        feature_figure(torch.rand(5, 1, 16, 16), sources)
