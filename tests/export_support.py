"""Shared by the export tests (tests/unit/method/test_export.py, tests/integration/test_export_plain_timm.py): a
student folder as the student_distillation pipeline writes it."""

from __future__ import annotations

from pathlib import Path

import torch

from ph_reg.method.student import student_config, teacher_backbone, write_student
from ph_reg.models import BackboneConfig, build_backbone, trainable_state_dict

TIMM = {"arch": "timm:test_vit", "img_size": 64}
CLIP = {"arch": "open_clip:ph-reg-tiny-ViT-16", "img_size": 64}
TRAINABLE = ["registers", "pos_embed", "patch_embed", "last_block"]
TRAINING = {"epochs": 3, "batch_size": 2, "lr": 3e-4}


def make_student(folder: Path, backbone: dict, head: str, registers: int, interp: str = "official",
                 implant: dict | None = None) -> Path:
    """A student folder as the pipeline writes it, its trainable weights moved away from the base."""
    config = BackboneConfig.from_dict({**backbone, "head": head, "num_registers": registers, "student": True,
                                       "pos_embed_interp": interp, "implant": implant})
    student = build_backbone(config)
    student.set_trainable(TRAINABLE)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in student.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    weights = trainable_state_dict(student)
    write_student(folder, weights, student_config(config, TRAINABLE, list(weights),
                                                  teacher=teacher_backbone(backbone, head),
                                                  extra={"training": TRAINING, "targets": "cached"}))
    return folder
