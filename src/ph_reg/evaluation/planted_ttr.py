"""The test-time-registers rows of the planted-artifact benchmark (:mod:`ph_reg.evaluation.planted`).

* ``ttr``: the implanted teacher with test-time registers (:mod:`ph_reg.models.test_time_registers`) attached from a
  detection artifact (:func:`ph_reg.models.test_time_registers.neuron_artifact`, the ``register_neurons`` dataset):
  :func:`ttr_teacher`, a copy of the teacher (same weights, same implant) carrying them.
* ``both``: a PH-Reg student whose teacher carries test-time registers (:func:`distill_from_ttr_teacher`): the
  TTA-denoised targets of the ``ttr`` teacher over the given training records (computed in memory with
  :func:`ph_reg.method.targets.denoised_target_records`, the cached mode's view keys), then
  :func:`ph_reg.method.train.distill` with the recipe it is given: the pipeline's student, with the only change
  being the teacher. No checkpoint is written (``checkpoint_dir=None``), so an interrupted benchmark starts the
  row over; when the evaluated student is an epoch snapshot, the row's snapshots go to a temporary folder, removed
  once that epoch's weights are read.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ph_reg.config import ConfigError
from ph_reg.method.config import DistillConfig, StudentDistillationConfig
from ph_reg.method.data import TargetPairs
from ph_reg.method.student import StudentSnapshots, build_student_from_config, read_student
from ph_reg.method.targets import TeacherDenoisingConfig, denoised_target_records, target_dtype
from ph_reg.method.train import distill
from ph_reg.models import DenseViT, build_backbone, load_trainable_state_dict
from ph_reg.models.test_time_registers import attach_from_artifact
from ph_reg.runtime import module_device

__all__ = ["ttr_teacher", "ttr_targets", "distill_from_ttr_teacher", "both_skip_reason", "both_student",
           "neuron_summary"]


def ttr_teacher(teacher: DenseViT, register_neurons: Mapping[str, Any], where: str = "register_neurons") -> DenseViT:
    """A copy of ``teacher`` (same config, weights and implant; eval mode, on its device) carrying the test-time
    registers of the detection artifact ``register_neurons`` (``where`` names it in errors). ``teacher`` itself is
    left plain."""
    copy = build_backbone(teacher.config)
    copy.load_state_dict(teacher.state_dict())
    copy = copy.to(module_device(teacher)).eval()
    attach_from_artifact(copy, register_neurons, where=where)
    return copy


def ttr_targets(teacher: DenseViT, images: Sequence[dict[str, torch.Tensor]], records: Sequence[int], seed: int,
                denoising: TeacherDenoisingConfig, progress: bool = False) -> list[dict[str, torch.Tensor] | None]:
    """The TTA-denoised targets of ``teacher`` for the prepared-image ``records``, as teacher_denoising stores them
    (``teacher_denoising.tta``, batching and ``target_dtype``; image ``i`` draws its views from ``generator(seed,
    "tta", 0, i)``): a list as long as ``images``, ``{"target": (h, w, C)}`` at each record, None elsewhere."""
    if not records:
        raise ValueError("ttr_targets: no training records to denoise")
    targets: list[dict[str, torch.Tensor] | None] = [None] * len(images)
    stream = denoised_target_records(teacher, images, seed, denoising.tta, batch_size=denoising.batch_size,
                                     max_images_per_forward=denoising.max_images_per_forward,
                                     dtype=target_dtype(denoising.target_dtype), progress=progress,
                                     indices=sorted(set(records)))
    for record, meta in stream:
        targets[meta["image_index"]] = record
    return targets


def distill_from_ttr_teacher(student: DenseViT, teacher: DenseViT, images: Sequence[dict[str, torch.Tensor]],
                             crops: Sequence[Sequence[int]], seed: int, denoising: TeacherDenoisingConfig,
                             training: DistillConfig, progress: bool = False,
                             settings: Mapping[str, Any] | None = None, snapshots: Any = None,
                             ) -> list[dict[str, float]]:
    """Distil ``student`` (fresh, its trainable groups set; updated in place) from the TTA-denoised targets of
    ``teacher`` (which carries test-time registers: :func:`ttr_teacher`) on the prepared-image records ``crops``
    (``crops[i]``: the records of training image ``i``, as the pipeline's cached mode trains on them,
    :class:`~ph_reg.method.data.TargetPairs`), with ``training`` and ``seed``; returns the per-epoch history.

    ``training.resume`` is turned off and nothing is checkpointed: the row is a benchmark internal.
    ``snapshots``: a :class:`~ph_reg.method.student.StudentSnapshots` keeping the student after the recipe's
    snapshot epochs.
    """
    if teacher.test_time_registers is None:
        raise ValueError("distill_from_ttr_teacher: the teacher carries no test-time registers (use ttr_teacher)")
    targets = ttr_targets(teacher, images, [i for image in crops for i in image], seed, denoising, progress)
    dataset = TargetPairs(images, targets, crops, student.mean, student.std, raw=True)
    return distill(student, dataset, dataclasses.replace(training, resume=False), seed, checkpoint_dir=None,
                   progress=progress, settings=settings, snapshots=snapshots)


def both_skip_reason(wanted: bool, distillation: StudentDistillationConfig) -> str | None:
    """Why the ``both`` row is not computed (shown in the report), or None when it is: ``evaluation.planted.both``
    false, or online targets (the row distils on cached targets of the prepared crops, which online training does
    not use; switching the pipeline to online targets stays two keys, the report says what it left out)."""
    if not wanted:
        return "evaluation.planted.both is false (it costs one more denoising and training)"
    if distillation.targets != "cached":
        return ("student_distillation.targets is 'online': the both row distils on cached targets of the prepared "
                "crops only")
    return None


def both_student(student_config: Mapping[str, Any], teacher: DenseViT, images: Sequence[dict[str, torch.Tensor]],
                 crops: Sequence[Sequence[int]], distillation: StudentDistillationConfig,
                 denoising: TeacherDenoisingConfig, seed: int, device: torch.device | str,
                 key: str = "evaluation.planted.both") -> DenseViT:
    """The ``both`` row: a fresh student built as the evaluated one (``student_config``, the student artifact's
    config: backbone, registers, trainable groups) distilled by :func:`distill_from_ttr_teacher` from ``teacher``
    (the ``ttr`` teacher) with the pipeline's recipe (``distillation.training``, cached targets over ``crops``, the
    records of ``distillation.train_split``) and ``seed``; returned in eval mode on ``device``. When
    ``student_config`` is an epoch snapshot's (its ``epoch``, ``evaluation.student_snapshot``), the row is the same
    epoch's snapshot of its own run (the whole recipe runs, its snapshots in a temporary folder).

    Online targets (``distillation.targets: online``) train on fresh crops of the source images, which this row does
    not reproduce: refused, naming ``key``."""
    if distillation.targets != "cached":
        raise ConfigError(key, True, "false", reason=f"the 'both' row distils on cached targets of the prepared crops, "
                                                     f"but student_distillation.targets is {distillation.targets!r}: "
                                                     f"set {key}: false")
    if not crops:
        raise ValueError(f"{key}: no prepared image has split {distillation.train_split!r} "
                         f"(student_distillation.train_split)")
    student = build_student_from_config(student_config)
    epoch = student_config.get("epoch")
    if epoch is None:
        distill_from_ttr_teacher(student, teacher, images, crops, seed, denoising, distillation.training)
        return student.to(device).eval()
    with tempfile.TemporaryDirectory(prefix="ph_reg_both_snapshots_") as folder:
        snapshots = StudentSnapshots(folder, student_config)
        distill_from_ttr_teacher(student, teacher, images, crops, seed, denoising, distillation.training,
                                 snapshots=snapshots)
        if epoch not in snapshots.epochs():
            raise ValueError(f"{key}: the evaluated student is the snapshot after epoch {epoch}, which "
                             f"student_distillation.training does not keep (snapshots: {snapshots.epochs()})")
        load_trainable_state_dict(student, read_student(snapshots.path(epoch))[0])
    return student.to(device).eval()


def neuron_summary(teacher: DenseViT, register_neurons: Mapping[str, Any]) -> dict[str, Any]:
    """What the ``ttr`` row ran with: the detected neurons ``[layer, neuron, score]``, the intervention, and, for an
    implant in neuron mode, its planted units and how many of them the detection found."""
    detected = [list(row) for row in register_neurons["neurons"]]
    summary: dict[str, Any] = {"neurons": detected, "intervention": dict(register_neurons["intervention"]),
                               "detection": dict(register_neurons.get("detection", {}))}
    implant = teacher.implant
    if implant is not None and implant.neuron_mode:
        planted = [list(pair) for pair in implant.planted_neurons()]
        found = {(row[0], row[1]) for row in detected}
        summary["planted_neurons"] = planted
        summary["planted_found"] = sum((layer, neuron) in found for layer, neuron in planted)
    return summary
