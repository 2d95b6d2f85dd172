"""Nodes: build the student with registers, distill it from the cached targets, export it."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from ph_reg.distill import DistillConfig, TargetPairs, distill
from ph_reg.io import ShardReader
from ph_reg.models import BackboneConfig, DenseViT, build_backbone, load_trainable_state_dict, trainable_state_dict
from ph_reg.student import student_config


def student_backbone(backbone: dict[str, Any], params: dict[str, Any]) -> BackboneConfig:
    """The student: the shared backbone with the student head and ``num_registers`` registers."""
    return BackboneConfig.from_dict({**backbone, "head": params["head"], "num_registers": params["num_registers"]})


def build_student(backbone: dict[str, Any], params: dict[str, Any]) -> DenseViT:
    """A fresh student whose trainable set is ``params['trainable']``; everything else is frozen."""
    student = build_backbone(student_backbone(backbone, params))
    student.set_trainable(params["trainable"])
    return student


def train_student(student: DenseViT, images: ShardReader, targets: ShardReader, params: dict[str, Any],
                  seed: int) -> tuple[DenseViT, pd.DataFrame]:
    """Distill the student on the training split; return it and its per-epoch loss history."""
    indices = images.indices(split=params["train_split"])
    if not indices:
        raise ValueError(f"no prepared image has split={params['train_split']!r}: check data_preparation.val_fraction")
    dataset = TargetPairs(images, targets, indices, student.mean, student.std)
    config = DistillConfig.from_dict(params["training"])
    history = distill(student, dataset, config, seed, checkpoint_dir=params["checkpoint_dir"],
                      state_fn=trainable_state_dict, load_state_fn=load_trainable_state_dict)
    return student, pd.DataFrame(history)


def export_student(student: DenseViT, backbone: dict[str, Any], teacher_params: dict[str, Any],
                   params: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable-weights delta and the JSON config that ``ph_reg.load_student`` rebuilds it from."""
    weights = trainable_state_dict(student)
    teacher = BackboneConfig.from_dict({**backbone, "head": teacher_params["head"], "num_registers": 0})
    config = student_config(student.config, params["trainable"], list(weights), teacher=teacher,
                            extra={"training": params["training"]})
    return weights, config
