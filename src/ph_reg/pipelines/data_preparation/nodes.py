"""Nodes: validate, resize and square-crop a folder of images into a shard store."""

from __future__ import annotations

from typing import Any

# the ph_reg library modules import torch: they are imported inside the nodes, so loading the pipelines is fast
# (the signatures name their classes through node_types, which Kedro resolves without torch)
from ph_reg.pipelines.node_types import RecordStream


def prepare_images(params: dict[str, Any], seed: int) -> RecordStream:
    """Stream the source's images, resized and square-cropped, into the ``prepared_images`` store.

    The parameters are validated first. Files the loader skips (``on_error: skip``) are listed with their reasons
    in the store's ``skipped_images.json`` (catalog entry ``skipped_images``), written once every image is read.
    """
    from ph_reg.params import data_preparation_params
    from ph_reg.data.prepare import prepared_records
    from ph_reg.data.sources import SKIP_REPORT_NAME, SkipReport
    from ph_reg.io.shards import RecordStream

    config = data_preparation_params(params)
    report = SkipReport(config.source, config.on_error)
    return RecordStream(prepared_records(config, seed, report),
                        attrs={"image_size": config.image_size, "source": config.source},
                        records_per_shard=config.records_per_shard,
                        reports={SKIP_REPORT_NAME: report.to_dict})
