from kedro.pipeline import Pipeline, node

from .nodes import evaluate_artifacts


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                evaluate_artifacts,
                ["prepared_images", "teacher_targets", "student_weights", "student_config", "params:evaluation"],
                ["evaluation_metrics", "feature_maps", "evaluation_report"],
                name="evaluate_artifacts",
            )
        ]
    )
