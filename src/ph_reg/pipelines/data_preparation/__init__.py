"""The data_preparation pipeline."""

from ph_reg.pipelines.data_preparation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
