"""Artifact metrics of dense ViT features, and the artifact evaluation of teacher, denoised target and student.

All functions take dense features laid out as ``(B, h, w, C)`` (batch, patch-grid rows, patch-grid columns,
channels), the layout of the teacher, the TTA-denoised target and the distilled student.

Two readings of "artifact" are provided:

* **norm outliers** (:func:`patch_norms`, :func:`robust_outlier_mask`): tokens whose L2 norm is far above the
  bulk, judged by a robust z-score. This is only meaningful where norms are not equalised, e.g. *before* a final
  LayerNorm; at the normed output it can see nothing.
* **direction** (:func:`cosine_map`): the per-token cosine to a reference (usually the denoised target), which a
  final LayerNorm does not hide.

Computations run in float32 on the input's device. The figures are in :mod:`ph_reg.reporting.figures`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ph_reg.evaluation.features import dense_features
from ph_reg.models import DenseViT

__all__ = [
    "patch_norms",
    "robust_outlier_mask",
    "norm_statistics",
    "cosine_map",
    "artifact_report",
    "artifact_evaluation",
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


def artifact_evaluation(teacher: DenseViT, student: DenseViT, images: Sequence[dict[str, torch.Tensor]],
                        targets: Sequence[dict[str, torch.Tensor]], indices: Sequence[int], outlier_k: float = 3.5,
                        batch_size: int = 8) -> tuple[dict[str, Any], Tensor, dict[str, Tensor]]:
    """Norm statistics, outlier rates and cosine-to-target for teacher, target and student: ``(report, pixels,
    features)``, the last two for :func:`ph_reg.reporting.figures.artifact_figure`."""
    if not indices:
        raise ValueError("artifact evaluation got no images: check evaluation.split and data_preparation.val_fraction")
    pixels = torch.stack([images[i]["image"] for i in indices])
    features = {
        "teacher": dense_features(teacher, pixels, batch_size=batch_size, normalise=True),
        "target": torch.stack([targets[i]["target"].float() for i in indices]),
        "student": dense_features(student, pixels, batch_size=batch_size, normalise=True),
    }
    report = artifact_report(features, target_key="target", k=outlier_k)
    report["images"] = len(indices)
    return report, pixels, features
