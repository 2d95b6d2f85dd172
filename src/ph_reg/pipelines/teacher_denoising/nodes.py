"""Nodes: the frozen teacher's TTA-denoised dense targets for every prepared image."""

from __future__ import annotations

from typing import Any

from ph_reg.io import RecordStream, ShardReader
from ph_reg.models import BackboneConfig, build_backbone
from ph_reg.targets import denoised_target_records, target_dtype
from ph_reg.utils import resolve_device


def teacher_config(backbone: dict[str, Any], params: dict[str, Any]) -> BackboneConfig:
    """The teacher: the shared backbone with the teacher head and no registers."""
    return BackboneConfig.from_dict({**backbone, "head": params["head"], "num_registers": 0})


def denoise_teacher(images: ShardReader, backbone: dict[str, Any], params: dict[str, Any], seed: int) -> RecordStream:
    """Stream the denoised targets into the ``teacher_targets`` store (one record per prepared image)."""
    config = teacher_config(backbone, params)
    teacher = build_backbone(config).to(resolve_device(params["device"]))
    tta = params["tta"]
    records = denoised_target_records(
        teacher, images, seed, n_views=tta["n_views"], shift_frac=tta["shift_frac"], flip_prob=tta["flip_prob"],
        pool_factor=tta["pool_factor"], batch_size=params["batch_size"],
        max_images_per_forward=params["max_images_per_forward"], dtype=target_dtype(params["target_dtype"]),
    )
    return RecordStream(records, attrs={"teacher": config.to_dict(), "tta": tta}, records_per_shard=params["records_per_shard"])
