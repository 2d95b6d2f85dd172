"""The student_distillation pipeline."""

from ph_reg.pipelines.student_distillation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
