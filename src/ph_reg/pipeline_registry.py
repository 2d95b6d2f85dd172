"""Project pipelines: the five component pipelines, ``distill`` and ``__default__``."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from ph_reg.pipelines import (data_preparation, evaluation, student_distillation, teacher_denoising,
                              test_time_registers)


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = {
        "data_preparation": data_preparation.create_pipeline(),
        "teacher_denoising": teacher_denoising.create_pipeline(),
        "student_distillation": student_distillation.create_pipeline(),
        "test_time_registers": test_time_registers.create_pipeline(),
        "evaluation": evaluation.create_pipeline(),
    }
    pipelines["distill"] = (
        pipelines["data_preparation"] + pipelines["teacher_denoising"] + pipelines["student_distillation"]
    )
    pipelines["__default__"] = pipelines["distill"] + pipelines["test_time_registers"] + pipelines["evaluation"]
    return pipelines
