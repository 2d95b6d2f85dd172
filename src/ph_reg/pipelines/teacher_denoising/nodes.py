"""Nodes: the frozen teacher's TTA-denoised dense targets for every prepared image (cached target mode)."""

from __future__ import annotations

from typing import Any

from ph_reg.io import RecordStream, ShardReader
from ph_reg.models import build_backbone
from ph_reg.student import teacher_backbone
from ph_reg.targets import denoised_target_records, target_dtype
from ph_reg.utils import resolve_device

TARGET_MODES = ("cached", "online")


def denoise_teacher(images: ShardReader, backbone: dict[str, Any], params: dict[str, Any], seed: int) -> RecordStream:
    """Stream the denoised targets into the ``teacher_targets`` store (one record per prepared image).

    In ``online`` mode the student computes its targets during training, so the store is written empty.
    """
    if params["mode"] not in TARGET_MODES:
        raise ValueError(f"teacher_denoising.mode must be one of {TARGET_MODES}, got {params['mode']!r}")
    config = teacher_backbone(backbone, params["head"])
    attrs = {"teacher": config.to_dict(), "tta": params["tta"], "mode": params["mode"]}
    if params["mode"] == "online":
        return RecordStream(iter(()), attrs=attrs)
    teacher = build_backbone(config).to(resolve_device(params["device"]))
    tta = params["tta"]
    records = denoised_target_records(
        teacher, images, seed, n_views=tta["n_views"], shift_frac=tta["shift_frac"], flip_prob=tta["flip_prob"],
        pool_factor=tta["pool_factor"], batch_size=params["batch_size"],
        max_images_per_forward=params["max_images_per_forward"], dtype=target_dtype(params["target_dtype"]),
    )
    return RecordStream(records, attrs=attrs, records_per_shard=params["records_per_shard"])
