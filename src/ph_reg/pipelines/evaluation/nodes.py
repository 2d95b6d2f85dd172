"""Nodes: artifact diagnostics and figures of teacher, denoised target and student."""

from __future__ import annotations

from typing import Any

import torch
from matplotlib.figure import Figure

from ph_reg.evaluate import artifact_evaluation
from ph_reg.io import ShardReader
from ph_reg.models import BackboneConfig, build_backbone, load_trainable_state_dict
from ph_reg.student import build_student_from_config
from ph_reg.utils import resolve_device

RANDOM_WEIGHTS_WARNING = (
    "The backbone has random weights (no pretrained tag and no checkpoint): it has no learned artifacts, so these "
    "numbers show that the machinery runs, not that the method works."
)


def evaluate_artifacts(images: ShardReader, targets: ShardReader, student_weights: dict[str, torch.Tensor],
                       student_config: dict[str, Any], params: dict[str, Any]) -> tuple[dict[str, Any], Figure, str]:
    """Diagnostics JSON (DVC metrics), the feature-map figure and a Markdown report."""
    device = resolve_device(params["device"])
    teacher = build_backbone(BackboneConfig.from_dict(student_config["teacher"])).to(device)
    student = build_student_from_config(student_config)
    load_trainable_state_dict(student, student_weights)
    student.to(device)
    # first crops first, so the figure shows distinct photos
    indices = sorted(images.indices(split=params["split"]), key=lambda i: (images.meta(i)["crop"], i))
    report, figure = artifact_evaluation(teacher, student, images, targets, indices, outlier_k=params["outlier_k"],
                                         batch_size=params["batch_size"], figure_images=params["figure_images"])
    backbone = student_config["backbone"]
    random_weights = not backbone.get("pretrained") and not backbone.get("checkpoint")
    report["random_weights"] = random_weights
    report["backbone"] = {"arch": backbone["arch"], "pretrained": backbone.get("pretrained"),
                          "checkpoint": backbone.get("checkpoint"), "img_size": backbone["img_size"]}
    return report, figure, markdown_report(report)


def markdown_report(report: dict[str, Any]) -> str:
    """A short human-readable summary of the diagnostics."""
    lines = ["# PH-Reg artifact diagnostics", ""]
    if report["random_weights"]:
        lines += [f"**{RANDOM_WEIGHTS_WARNING}**", ""]
    b = report["backbone"]
    lines += [f"Backbone `{b['arch']}` at {b['img_size']} px, pretrained `{b['pretrained']}`, checkpoint "
              f"`{b['checkpoint']}`; {report['images']} held-out images; outliers: robust z of the token norm > "
              f"{report['outlier_threshold_k']}.", "",
              "| features | mean norm | outlier rate | cosine to target (mean) | share with cosine < 0.5 |",
              "|---|---|---|---|---|"]
    for name, stats in report["per_source"].items():
        cos = report["cosine_to_target"].get(name)
        cos_mean = f"{cos['mean']:.4f}" if cos else "-"
        low = f"{cos['low_share']:.4f}" if cos else "-"
        lines.append(f"| {name} | {stats['norm']['mean']:.4f} | {stats['outlier_rate']:.4f} | {cos_mean} | {low} |")
    return "\n".join(lines) + "\n"
