"""Nodes: build the student with registers, distill it (cached or online targets), export it."""

from __future__ import annotations

from typing import Any

import pandas as pd

# torch and the ph_reg library modules (which import torch) are imported inside the nodes, so loading the
# pipelines is fast (the signatures name their classes through node_types, which Kedro resolves without torch)
from ph_reg.pipelines.node_types import (BackboneConfig, DataPreparationConfig, Dataset, DenseViT, OnlineTargets,
                                        ShardReader, StudentDistillationConfig, TeacherDenoisingConfig, Tensor)


def build_student(backbone: dict[str, Any], params: dict[str, Any]) -> DenseViT:
    """A fresh student whose trainable set is ``params['trainable']``; everything else is frozen."""
    from ph_reg.params import check_trainable, student_distillation_params
    from ph_reg.models import build_backbone

    config, checked = student_distillation_params(backbone, params)
    student = build_backbone(config)
    check_trainable(config, checked.trainable, model=student)
    student.set_trainable(list(checked.trainable))
    return student


def training_dataset(student: DenseViT, images: ShardReader, targets: ShardReader,
                     checked: StudentDistillationConfig, teacher: tuple[BackboneConfig, TeacherDenoisingConfig],
                     data: DataPreparationConfig, seed: int) -> tuple[Dataset, OnlineTargets | None]:
    """Cached mode: stored crops and targets, every epoch one of each training image's
    ``data_preparation.crops_per_image`` crops, in turn (``TargetPairs``). Online mode: fresh crops of the training
    images (those that data_preparation accepted for the train split) and a teacher that denoises every batch.

    An online image that can no longer be read is replaced by its prepared crop (logged, and counted in the loss
    history's ``substituted_images``), so a bad file never stops an epoch. Takes the sections parsed by
    :func:`train_student` (the teacher: its backbone config and the ``teacher_denoising`` section).
    """
    from ph_reg.data.sources import source_items
    from ph_reg.method.data import RandomCrops, StoredImageLoader, TargetPairs, image_crops
    from ph_reg.method.targets import OnlineTargets
    from ph_reg.models import build_backbone
    from ph_reg.params import check_resolution, patch_size

    teacher_config, denoising = teacher
    check_resolution("data_preparation.image_size", data.image_size, patch_size(teacher_config), teacher_config.arch)
    indices = images.indices(split=checked.train_split)
    if not indices:
        raise ValueError(f"no prepared image has split={checked.train_split!r}: check data_preparation.val_fraction")
    crops = image_crops(images, indices)
    if checked.targets == "cached":
        if targets.attrs.get("mode") != "cached":
            raise ValueError("teacher_targets holds no cached targets (it was written in online mode): "
                             "rerun teacher_denoising with the same target mode")
        return TargetPairs(images, targets, list(crops.values()), student.mean, student.std, raw=True), None
    first_record = {name: records[0] for name, records in crops.items()}
    # the source is listed again (in its sorted order); an image gone since preparation trains on its prepared crop
    listed = {name: load for name, load in source_items(data.source, data.max_image_pixels)}
    names = [name for name in listed if name in first_record]
    names += sorted(set(first_record) - set(listed))
    loaders = [listed.get(name, StoredImageLoader(images, first_record[name])) for name in names]
    fallbacks = [StoredImageLoader(images, first_record[name]) for name in names]
    dataset = RandomCrops(loaders, data.image_size, student.mean, student.std, seed, fallbacks=fallbacks,
                          min_side=data.min_side, max_pixels=data.max_image_pixels, raw=True)
    online = OnlineTargets(build_backbone(teacher_config), seed, denoising.tta, denoising.max_images_per_forward)
    return dataset, online


def train_student(student: DenseViT, images: ShardReader, targets: ShardReader, backbone: dict[str, Any],
                  params: dict[str, Any], teacher_params: dict[str, Any], data_params: dict[str, Any],
                  seed: int) -> tuple[DenseViT, pd.DataFrame, dict[str, Any]]:
    """Distill the student on the training split; return it, its per-epoch loss history and the index of its
    epoch snapshots (``training.snapshot_every`` / ``snapshot_epochs``, written to ``snapshot_dir`` during training).

    SIGINT/SIGTERM stop it at the next optimizer step with a checkpoint (``training.resume: true`` continues; a
    checkpoint trained under other settings is refused, see ``ph_reg.method.checkpoint.check_resume``).
    """
    from ph_reg.params import data_preparation_params, student_distillation_params, teacher_denoising_params
    from ph_reg.method.train import distill
    from ph_reg.models import trainable_state_dict
    from ph_reg.method.student import StudentSnapshots

    _, checked = student_distillation_params(backbone, params)
    teacher = teacher_denoising_params(backbone, teacher_params)
    data = data_preparation_params(data_params)
    dataset, online = training_dataset(student, images, targets, checked, teacher, data, seed)
    snapshots = None
    if checked.snapshot_dir is not None:
        snapshots = StudentSnapshots(checked.snapshot_dir, artifact_config(
            student, list(trainable_state_dict(student)), backbone, teacher[1].head, params))
    # what else the result depends on: recorded in every checkpoint, and a resume under other values is refused
    settings = {"backbone": backbone, "student_distillation": {k: v for k, v in params.items() if k != "training"},
                "teacher_denoising": teacher_params, "data_preparation": data_params}
    history = distill(student, dataset, checked.training, seed, checkpoint_dir=checked.checkpoint_dir,
                      online_targets=online, snapshots=snapshots, settings=settings)
    index = snapshots.index() if snapshots is not None else {"folder": None, "snapshots": {}}
    return student, pd.DataFrame(history), index


def artifact_config(student: DenseViT, weight_names: list[str], backbone: dict[str, Any], teacher_head: str,
                    params: dict[str, Any]) -> dict[str, Any]:
    """The JSON config of the exported student and of its snapshots (``ph_reg.load_student`` reads both): the
    section's own values as written (``training`` too), so the file does not depend on the config classes."""
    from ph_reg.method.student import student_config, teacher_backbone

    return student_config(student.config, params["trainable"], weight_names,
                          teacher=teacher_backbone(backbone, teacher_head),
                          extra={"training": params["training"], "targets": params["targets"]})


def export_student(student: DenseViT, backbone: dict[str, Any], teacher_head: str,
                   params: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The trainable-weights delta and the JSON config that ``ph_reg.load_student`` rebuilds it from."""
    from ph_reg.models import trainable_state_dict

    weights = trainable_state_dict(student)
    return weights, artifact_config(student, list(weights), backbone, teacher_head, params)


def export_student_hub(student: DenseViT, weights: dict[str, Tensor], config: dict[str, Any]) -> Any:
    """The student as a Hugging Face Hub folder (the stock timm form, the ph-reg student, a model card): what
    ``python -m ph_reg export <student> --format hub`` writes (``ph_reg.method.export``)."""
    from ph_reg.method.export import HubExport

    return HubExport(student, weights, config)
