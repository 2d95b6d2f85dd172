"""Nodes: validate, resize and square-crop a folder of images into a shard store."""

from __future__ import annotations

from typing import Any

from ph_reg.data import PreparationConfig, prepared_records
from ph_reg.io import RecordStream


def prepare_images(params: dict[str, Any], seed: int) -> RecordStream:
    """Stream the source's images, resized and square-cropped, into the ``prepared_images`` store."""
    params = dict(params)
    records_per_shard = params.pop("records_per_shard", None)
    try:
        config = PreparationConfig(**params)
    except TypeError as error:
        raise ValueError(f"bad data_preparation parameters {sorted(params)}: {error}") from error
    return RecordStream(prepared_records(config, seed), attrs={"image_size": config.image_size, "source": config.source},
                        records_per_shard=records_per_shard)
