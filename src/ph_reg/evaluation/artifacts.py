"""Artifact diagnostics of teacher, denoised target and student on held-out images."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from matplotlib.figure import Figure

from ph_reg.evaluation.diagnostics import artifact_report, feature_figure
from ph_reg.models import DenseViT
from ph_reg.runtime import autocast_dtype, normalize


@torch.no_grad()
def dense_features(model: DenseViT, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Dense (N, h, w, C) float32 CPU features of uint8 images (N, 3, H, W), in batches."""
    device = next(model.parameters()).device
    amp = autocast_dtype(device)
    model.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = normalize(images[start : start + batch_size], model.mean, model.std).to(device)
        with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
            out.append(model(batch).patch.float().cpu())
    return torch.cat(out)


def artifact_evaluation(teacher: DenseViT, student: DenseViT, images: Sequence[dict[str, torch.Tensor]],
                        targets: Sequence[dict[str, torch.Tensor]], indices: Sequence[int], outlier_k: float = 3.5,
                        batch_size: int = 8, figure_images: int = 4) -> tuple[dict[str, Any], Figure]:
    """Norm statistics, outlier rates and cosine-to-target for teacher, target and student, plus a figure."""
    if not indices:
        raise ValueError("artifact evaluation got no images: check evaluation.split and data_preparation.val_fraction")
    pixels = torch.stack([images[i]["image"] for i in indices])
    features = {
        "teacher": dense_features(teacher, pixels, batch_size),
        "target": torch.stack([targets[i]["target"].float() for i in indices]),
        "student": dense_features(student, pixels, batch_size),
    }
    report = artifact_report(features, target_key="target", k=outlier_k)
    report["images"] = len(indices)
    figure = feature_figure(pixels, features, titles={"teacher": "teacher", "target": "denoised target",
                                                      "student": "student"}, max_images=figure_images)
    return report, figure
