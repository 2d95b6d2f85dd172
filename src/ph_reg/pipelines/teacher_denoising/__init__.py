"""The teacher_denoising pipeline."""

from ph_reg.pipelines.teacher_denoising.pipeline import create_pipeline

__all__ = ["create_pipeline"]
