"""Nodes: build the student with registers, distill it (cached or online targets), export it."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from ph_reg.data import RandomCrops, source_items
from ph_reg.distill import DistillConfig, OnlineTargets, TargetPairs, distill
from ph_reg.io import ShardReader
from ph_reg.models import DenseViT, build_backbone, trainable_state_dict
from ph_reg.student import student_backbone, student_config, teacher_backbone


def build_student(backbone: dict[str, Any], params: dict[str, Any]) -> DenseViT:
    """A fresh student whose trainable set is ``params['trainable']``; everything else is frozen."""
    student = build_backbone(student_backbone(backbone, params["head"], params["num_registers"]))
    student.set_trainable(params["trainable"])
    return student


def training_dataset(student: DenseViT, images: ShardReader, targets: ShardReader, backbone: dict[str, Any],
                     params: dict[str, Any], teacher_params: dict[str, Any], data_params: dict[str, Any],
                     seed: int) -> tuple[torch.utils.data.Dataset, OnlineTargets | None]:
    """Cached mode: stored crops and targets. Online mode: fresh crops of the training images (those that
    data_preparation accepted for the train split) and a teacher that denoises every batch."""
    indices = images.indices(split=params["train_split"])
    if not indices:
        raise ValueError(f"no prepared image has split={params['train_split']!r}: check data_preparation.val_fraction")
    if params["targets"] == "cached":
        if targets.attrs.get("mode") != "cached":
            raise ValueError("teacher_targets holds no cached targets (it was written in online mode): "
                             "rerun teacher_denoising with the same target mode")
        return TargetPairs(images, targets, indices, student.mean, student.std), None
    if params["targets"] != "online":
        raise ValueError(f"student_distillation.targets must be 'cached' or 'online', got {params['targets']!r}")
    names = {images.meta(i)["name"] for i in indices}
    loaders = [load for name, load in source_items(data_params["source"]) if name in names]
    dataset = RandomCrops(loaders, data_params["image_size"], student.mean, student.std, seed)
    teacher = build_backbone(teacher_backbone(backbone, teacher_params["head"]))
    tta = teacher_params["tta"]
    online = OnlineTargets(teacher, seed, n_views=tta["n_views"], shift_frac=tta["shift_frac"],
                           flip_prob=tta["flip_prob"], pool_factor=tta["pool_factor"],
                           max_images_per_forward=teacher_params["max_images_per_forward"])
    return dataset, online


def train_student(student: DenseViT, images: ShardReader, targets: ShardReader, backbone: dict[str, Any],
                  params: dict[str, Any], teacher_params: dict[str, Any], data_params: dict[str, Any],
                  seed: int) -> tuple[DenseViT, pd.DataFrame]:
    """Distill the student on the training split; return it and its per-epoch loss history."""
    dataset, online = training_dataset(student, images, targets, backbone, params, teacher_params, data_params, seed)
    config = DistillConfig.from_dict(params["training"])
    history = distill(student, dataset, config, seed, checkpoint_dir=params["checkpoint_dir"], online_targets=online)
    return student, pd.DataFrame(history)


def export_student(student: DenseViT, backbone: dict[str, Any], teacher_params: dict[str, Any],
                   params: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable-weights delta and the JSON config that ``ph_reg.load_student`` rebuilds it from."""
    weights = trainable_state_dict(student)
    config = student_config(student.config, params["trainable"], list(weights),
                            teacher=teacher_backbone(backbone, teacher_params["head"]),
                            extra={"training": params["training"], "targets": params["targets"]})
    return weights, config
