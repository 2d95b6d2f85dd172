"""Artifact diagnostics and figures for dense ViT features.

All functions take dense features laid out as ``(B, h, w, C)`` (batch, patch-grid rows, patch-grid columns,
channels), the layout of the teacher, the TTA-denoised target and the distilled student.

Two readings of "artifact" are provided:

* **norm outliers** (:func:`patch_norms`, :func:`robust_outlier_mask`): tokens whose L2 norm is far above the
  bulk, judged by a robust z-score. This is only meaningful where norms are not equalised, e.g. *before* a final
  LayerNorm; at the normed output it can see nothing.
* **direction** (:func:`cosine_map`): the per-token cosine to a reference (usually the denoised target), which a
  final LayerNorm does not hide.

Computations run in float32 on the input's device; figures are drawn with the object-oriented matplotlib API
(no pyplot global state), so they are safe under the "Agg" backend and in worker threads.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

__all__ = [
    "patch_norms",
    "robust_outlier_mask",
    "norm_statistics",
    "cosine_map",
    "artifact_report",
    "pca_rgb",
    "feature_figure",
]

MAD_TO_STD = 1.4826  # consistency constant: 1.4826 * MAD estimates the std of a normal distribution


def _check_dense(features: Tensor, name: str) -> None:
    if not isinstance(features, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape (B, h, w, C), got {type(features).__name__}")
    if features.ndim != 4:
        raise ValueError(f"`{name}` must have shape (B, h, w, C), got shape {tuple(features.shape)}")
    if features.numel() == 0:
        raise ValueError(f"`{name}` must not be empty, got shape {tuple(features.shape)}")


def _quantile(x: Tensor, q: float) -> Tensor:
    """Quantile of all elements of ``x`` with linear interpolation (numpy's default); no size limit."""
    values = x.detach().reshape(-1).float().sort().values
    pos = q * (values.numel() - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, values.numel() - 1)
    frac = pos - lo
    return values[lo] + frac * (values[hi] - values[lo])


def patch_norms(features: Tensor) -> Tensor:
    """L2 norm of every token: ``(B, h, w, C) -> (B, h, w)``, computed and returned in float32."""
    _check_dense(features, "features")
    return torch.linalg.vector_norm(features, dim=-1, dtype=torch.float32)


def robust_outlier_mask(
    norms: Tensor,
    k: float = 3.5,
    reference: Tensor | None = None,
    rel_eps: float = 1e-6,
) -> Tensor:
    """Boolean mask of high-norm outliers, same shape as ``norms``.

    Rule: a token is an outlier when its robust z-score ``(norm - median) / (1.4826 * MAD)`` exceeds ``k``, where
    ``median`` and ``MAD = median(|reference - median|)`` are pooled over all elements of ``reference`` (default:
    ``norms`` itself, i.e. over all images together). Only the high side counts (artifacts have large norms).

    When the MAD is 0 (e.g. constant norms), the scale falls back to ``rel_eps * |median|`` (and to the float32
    machine epsilon if the median is 0 too), so the division is always defined.
    """
    if not isinstance(norms, Tensor):
        raise TypeError(f"`norms` must be a torch.Tensor, got {type(norms).__name__}")
    if k <= 0:
        raise ValueError(f"`k` must be a positive number of robust standard deviations, got {k}")
    reference = norms if reference is None else reference
    if reference.numel() == 0:
        raise ValueError("`reference` (or `norms` when no reference is given) must not be empty")
    reference = reference.detach().float()
    median = _quantile(reference, 0.5)
    mad = _quantile((reference - median).abs(), 0.5)
    eps = torch.finfo(torch.float32).eps
    scale = torch.clamp(MAD_TO_STD * mad, min=max(rel_eps * abs(median.item()), eps))
    norms = norms.detach().float()
    z = (norms - median.to(norms.device)) / scale.to(norms.device)
    return z > k


def norm_statistics(norms: Tensor) -> dict[str, float]:
    """Summary of a set of norms (all elements pooled): mean, std (population, ddof=0), median, p99, max."""
    if not isinstance(norms, Tensor):
        raise TypeError(f"`norms` must be a torch.Tensor, got {type(norms).__name__}")
    if norms.numel() == 0:
        raise ValueError("`norms` must not be empty")
    values = norms.detach().float().reshape(-1).cpu().numpy().astype(np.float64)
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "median": float(np.median(values)),
        "p99": float(np.percentile(values, 99.0)),
        "max": float(values.max()),
    }


def cosine_map(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-token cosine similarity: ``(B, h, w, C) x (B, h, w, C) -> (B, h, w)`` in float32.

    Zero-norm tokens get a cosine of 0 (the norms are clamped at ``eps``).
    """
    _check_dense(a, "a")
    _check_dense(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"`a` and `b` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=eps)


def artifact_report(
    features: Mapping[str, Tensor],
    target_key: str = "target",
    k: float = 3.5,
    low_cosine: float = 0.5,
    cosine_percentile: float = 5.0,
) -> dict:
    """JSON-serialisable artifact summary of several dense outputs of the same images.

    ``features`` maps a source name (e.g. ``"teacher"``, ``"target"``, ``"student"``) to ``(B, h, w, C)`` features,
    all of the same shape. Returns::

        {"outlier_threshold_k": k,
         "per_source": {name: {"norm": norm_statistics(...), "outlier_rate": float}},
         "cosine_to_target": {name: {"mean": float, "p05": float, "low_share": float}}}  # non-target sources

    "outlier" here means a *norm* outlier of the dense output as given (i.e. after the final norm/projection),
    judged against that source's own median/MAD with :func:`robust_outlier_mask`. A final LayerNorm equalises token
    norms and can mask artifacts entirely; the cosine to the target is the direction-based reading that it does not
    hide. ``low_share`` is the share of tokens with cosine < ``low_cosine``; ``p05`` is the
    ``cosine_percentile``-th percentile of the cosine.
    """
    if not isinstance(features, Mapping) or len(features) == 0:
        raise ValueError("`features` must be a non-empty mapping of source name -> (B, h, w, C) tensor")
    if target_key not in features:
        raise ValueError(f"`target_key` {target_key!r} is not a key of `features` (keys: {sorted(features)})")
    for name, feats in features.items():
        _check_dense(feats, f"features[{name!r}]")
    target = features[target_key]
    for name, feats in features.items():
        if feats.shape != target.shape:
            raise ValueError(
                f"all sources must have the same shape: features[{name!r}] has {tuple(feats.shape)}, "
                f"features[{target_key!r}] has {tuple(target.shape)}"
            )

    per_source: dict[str, dict] = {}
    cosine_to_target: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for name, feats in features.items():
            norms = patch_norms(feats)
            per_source[name] = {
                "norm": norm_statistics(norms),
                "outlier_rate": float(robust_outlier_mask(norms, k=k).float().mean().item()),
            }
            if name == target_key:
                continue
            cos = cosine_map(feats, target.to(feats.device))
            cosine_to_target[name] = {
                "mean": float(cos.mean().item()),
                "p05": float(_quantile(cos, cosine_percentile / 100.0).item()),
                "low_share": float((cos < low_cosine).float().mean().item()),
            }
    return {"outlier_threshold_k": float(k), "per_source": per_source, "cosine_to_target": cosine_to_target}


def _pca_rgb_single(
    features: Tensor, n_components: int, low_percentile: float, high_percentile: float, name: str
) -> Tensor:
    _check_dense(features, name)
    B, h, w, C = features.shape
    if not 1 <= n_components <= C:
        raise ValueError(f"`n_components` must be in [1, {C}] (the channel count of {name}), got {n_components}")
    tokens = features.detach().reshape(-1, C).double()
    centred = tokens - tokens.mean(dim=0, keepdim=True)
    # Covariance eigendecomposition: deterministic (unlike randomised pca_lowrank) and cheap for C << tokens.
    _, eigvecs = torch.linalg.eigh(centred.T @ centred)
    components = eigvecs[:, -n_components:].flip(-1)  # (C, n) by decreasing variance
    # Fix each component's sign: its largest-magnitude loading is positive.
    idx = components.abs().argmax(dim=0)
    signs = torch.sign(components[idx, torch.arange(n_components, device=components.device)])
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    proj = (centred @ components).float()  # (N, n)
    out = torch.empty_like(proj)
    for c in range(n_components):
        lo = _quantile(proj[:, c], low_percentile / 100.0)
        hi = _quantile(proj[:, c], high_percentile / 100.0)
        span = torch.clamp(hi - lo, min=torch.finfo(torch.float32).eps)
        out[:, c] = ((proj[:, c] - lo) / span).clamp(0.0, 1.0)
    return out.reshape(B, h, w, n_components)


def pca_rgb(
    features: Mapping[str, Tensor] | Tensor,
    n_components: int = 3,
    low_percentile: float = 1.0,
    high_percentile: float = 99.0,
) -> dict[str, Tensor] | Tensor:
    """Deterministic PCA-to-RGB maps: ``(B, h, w, C) -> (B, h, w, n_components)`` in [0, 1], float32.

    One PCA is fitted per source over the centred tokens of all its images (so colours are comparable across the
    images of a source). Each component's sign is fixed so that its largest-magnitude loading is positive; each
    projection is min-max scaled between its ``low_percentile`` and ``high_percentile`` and clamped to [0, 1].
    A mapping of sources gives a dict of maps with the same keys; a single tensor gives a single map.
    """
    if not 0.0 <= low_percentile < high_percentile <= 100.0:
        raise ValueError(
            "`low_percentile` and `high_percentile` must satisfy 0 <= low < high <= 100, "
            f"got {low_percentile} and {high_percentile}"
        )
    if isinstance(features, Tensor):
        return _pca_rgb_single(features, n_components, low_percentile, high_percentile, "features")
    if not isinstance(features, Mapping):
        raise TypeError(f"`features` must be a Tensor or a mapping of tensors, got {type(features).__name__}")
    return {
        name: _pca_rgb_single(feats, n_components, low_percentile, high_percentile, f"features[{name!r}]")
        for name, feats in features.items()
    }


def _images_to_numpy(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] or uint8 -> (B, H, W, 3) float in [0, 1]."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"`images` must be a (B, 3, H, W) tensor, got {shape}")
    images = images.detach().cpu()
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0.0, 1.0)
    return images.permute(0, 2, 3, 1).numpy()


def feature_figure(
    images: Tensor,
    features: Mapping[str, Tensor],
    titles: Mapping[str, str] | None = None,
    max_images: int = 4,
    panel_size: float = 2.2,
    norm_cmap: str = "viridis",
) -> Figure:
    """Grid figure of dense features: one row per image (at most ``max_images``).

    Columns: the image, then for each source its PCA-RGB map (:func:`pca_rgb`, fitted over all given images) and
    its token-norm heatmap (one colour scale shared by all rows of a source, with a colorbar). ``images`` are
    un-normalised, (B, 3, H, W) floats in [0, 1] or uint8. ``titles`` maps source names to column titles (default:
    the names). The figure uses the object-oriented API only; the caller saves it.
    """
    if not isinstance(features, Mapping) or len(features) == 0:
        raise ValueError("`features` must be a non-empty mapping of source name -> (B, h, w, C) tensor")
    if max_images < 1:
        raise ValueError(f"`max_images` must be >= 1, got {max_images}")
    pixels = _images_to_numpy(images)
    for name, feats in features.items():
        _check_dense(feats, f"features[{name!r}]")
        if feats.shape[0] != pixels.shape[0]:
            raise ValueError(
                f"features[{name!r}] has batch size {feats.shape[0]} but `images` has {pixels.shape[0]}"
            )
    titles = dict(titles or {})
    n_rows = min(pixels.shape[0], max_images)
    n_cols = 1 + 2 * len(features)

    fig = Figure(figsize=(panel_size * n_cols, panel_size * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for row in range(n_rows):
        axes[row, 0].imshow(pixels[row])
    axes[0, 0].set_title("image")

    rgb_maps = pca_rgb(dict(features))
    for s, (name, feats) in enumerate(features.items()):
        label = titles.get(name, name)
        rgb = rgb_maps[name][:n_rows].cpu().numpy()
        norms = patch_norms(feats.detach()[:n_rows]).cpu().numpy()
        vmin, vmax = float(norms.min()), float(norms.max())
        col_pca, col_norm = 1 + 2 * s, 2 + 2 * s
        for row in range(n_rows):
            axes[row, col_pca].imshow(rgb[row], interpolation="nearest")
            im = axes[row, col_norm].imshow(
                norms[row], cmap=norm_cmap, vmin=vmin, vmax=vmax, interpolation="nearest"
            )
        fig.colorbar(im, ax=axes[:, col_norm].tolist(), shrink=0.8)
        axes[0, col_pca].set_title(f"{label} PCA")
        axes[0, col_norm].set_title(f"{label} norm")

    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig
