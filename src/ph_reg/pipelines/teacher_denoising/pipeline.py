from kedro.pipeline import Pipeline, node

from ph_reg.pipelines.teacher_denoising.nodes import denoise_teacher


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                denoise_teacher,
                ["prepared_images", "params:backbone", "params:teacher_denoising", "params:seed"],
                "teacher_targets",
                name="denoise_teacher",
            )
        ]
    )
