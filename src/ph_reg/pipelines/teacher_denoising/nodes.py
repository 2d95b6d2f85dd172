"""Nodes: the frozen teacher's TTA-denoised dense targets for every prepared image (cached target mode)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

# the ph_reg library modules import torch: they are imported inside the nodes, so loading the pipelines is fast
# (the signatures name their classes through node_types, which Kedro resolves without torch)
from ph_reg.pipelines.node_types import RecordStream, ShardReader


def _store_digest(images: ShardReader) -> str:
    """Identifies the prepared images (names, crops, splits, shards): a resumed run must read the same ones."""
    text = json.dumps({"attrs": images.attrs, "records": images.records, "shards": images.shards}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def denoise_teacher(images: ShardReader, backbone: dict[str, Any], params: dict[str, Any], seed: int) -> RecordStream:
    """Stream the denoised targets into the ``teacher_targets`` store (one record per prepared image).

    The parameters are validated first. In ``online`` mode the student computes its targets during training, so
    the store is written empty. With ``resume`` (the default) a run interrupted by SIGTERM, ``kill -9`` or a full
    disk keeps its finished shards: the next run computes only the records after them.
    """
    from ph_reg.params import check_resolution, patch_size, teacher_denoising_params
    from ph_reg.io.shards import RecordStream
    from ph_reg.models import build_backbone
    from ph_reg.method.targets import denoised_target_records, target_dtype
    from ph_reg.runtime import resolve_device

    config, checked = teacher_denoising_params(backbone, params)
    if "image_size" in images.attrs:
        check_resolution("data_preparation.image_size", images.attrs["image_size"], patch_size(config), config.arch)
    attrs = {"teacher": config.to_dict(), "tta": dataclasses.asdict(checked.tta), "mode": checked.mode}
    if checked.mode == "online":
        return RecordStream(iter(()), attrs=attrs)
    teacher = build_backbone(config).to(resolve_device(checked.device))
    # what the targets depend on besides attrs: a resumed run keeps only shards written with all of it equal
    attrs.update(seed=seed, target_dtype=checked.target_dtype, batch_size=checked.batch_size,
                 prepared_images=_store_digest(images))

    def records_from(start: int):
        return denoised_target_records(teacher, images, seed, checked.tta, batch_size=checked.batch_size,
                                       max_images_per_forward=checked.max_images_per_forward,
                                       dtype=target_dtype(checked.target_dtype), start=start)

    return RecordStream(records_from(0), attrs=attrs, records_per_shard=checked.records_per_shard,
                        records_from=records_from if checked.resume else None)
