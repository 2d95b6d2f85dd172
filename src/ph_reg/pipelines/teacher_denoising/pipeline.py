"""The teacher_denoising pipeline: the frozen teacher's TTA-denoised targets."""

from kedro.pipeline import Node, Pipeline

from ph_reg.pipelines.teacher_denoising.nodes import denoise_teacher


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(func=denoise_teacher,
             inputs=["prepared_images", "params:backbone", "params:teacher_denoising", "params:seed"],
             outputs="teacher_targets", name="denoise_teacher"),
    ])
