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


def merged_state_dict(model: DenseViT) -> dict[str, Any]:
    """The full state dict of a student (base weights, distilled weights and registers), for use without ph_reg's
    delta format; keys are the DenseViT's parameter and buffer names."""
    return {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}


def export_merged(student_folder: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write the merged full state dict of the student in ``student_folder`` to ``output`` (safetensors), with the
    student config as metadata. Returns the output path."""
    from .io import save_tensors

    folder = Path(student_folder)
    model = load_student(folder)
    config = (folder / CONFIG_NAME if folder.is_dir() else folder.parent / CONFIG_NAME).read_text()
    save_tensors(output, merged_state_dict(model), metadata={"ph_reg_student_config": config})
    return Path(output)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ph_reg.student STUDENT_FOLDER OUTPUT.safetensors``: export the merged full state dict."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("student_folder")
    parser.add_argument("output")
    args = parser.parse_args(argv)
    print(export_merged(args.student_folder, args.output))


if __name__ == "__main__":
    main()
