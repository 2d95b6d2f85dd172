"""The distilled student as an artifact: a JSON config plus the trainable-weights delta in safetensors.

``load_student(folder)`` rebuilds the base model named in the config (pretrained tag, local checkpoint or seeded
random weights), adds the registers and loads the distilled weights: the result is a ready ``DenseViT``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .io import load_tensors
from .models import BackboneConfig, DenseViT, build_backbone, load_trainable_state_dict

STUDENT_FORMAT = "ph-reg-student/1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.safetensors"


def teacher_backbone(backbone: Mapping[str, Any], head: str) -> BackboneConfig:
    """The teacher: the shared backbone parameters with the teacher head and no registers."""
    return BackboneConfig.from_dict({**backbone, "head": head, "num_registers": 0})


def student_backbone(backbone: Mapping[str, Any], head: str, num_registers: int) -> BackboneConfig:
    """The student: the shared backbone parameters with the student head and ``num_registers`` registers."""
    return BackboneConfig.from_dict({**backbone, "head": head, "num_registers": num_registers})


def student_config(backbone: BackboneConfig, trainable_groups: Sequence[str], trainable_names: Sequence[str],
                   teacher: BackboneConfig | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON config from which ``load_student`` rebuilds a student."""
    config = {
        "format": STUDENT_FORMAT,
        "backbone": backbone.to_dict(),
        "trainable_groups": list(trainable_groups),
        "trainable_parameters": sorted(trainable_names),
    }
    if teacher is not None:
        config["teacher"] = teacher.to_dict()
    if extra:
        config.update(extra)
    return config


def build_student_from_config(config: Mapping[str, Any]) -> DenseViT:
    """Rebuild the student (before loading weights) from its config dict."""
    if config.get("format") != STUDENT_FORMAT:
        raise ValueError(f"not a PH-Reg student config: format is {config.get('format')!r}, expected {STUDENT_FORMAT!r}")
    model = build_backbone(BackboneConfig.from_dict(config["backbone"]))
    model.set_trainable(config["trainable_groups"])
    return model


def load_student(path: str | os.PathLike, device: str | None = None) -> DenseViT:
    """Load a distilled student from its folder (``config.json`` + ``weights.safetensors``), in eval mode."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for required in (config_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(
                f"{required} not found: a student folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                f"(written by the student_distillation pipeline)"
            )
    model = build_student_from_config(json.loads(config_path.read_text()))
    load_trainable_state_dict(model, load_tensors(weights_path))
    model.eval()
    return model.to(device) if device else model
