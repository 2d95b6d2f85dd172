"""The evaluation pipeline."""

from ph_reg.pipelines.evaluation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
