from kedro.pipeline import Pipeline, node

from .nodes import (cache_probe_features, evaluate_artifacts, evaluate_planted_artifacts, evaluate_probes,
                    evaluate_zero_shot_table)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                evaluate_artifacts,
                ["prepared_images", "teacher_targets", "student_weights", "student_config", "params:evaluation"],
                ["evaluation_metrics", "feature_maps", "evaluation_report"],
                name="evaluate_artifacts",
            ),
            node(
                evaluate_zero_shot_table,
                ["student_weights", "student_config", "params:evaluation", "params:seed"],
                ["zero_shot_metrics", "zero_shot_report", "zero_shot_figures"],
                name="evaluate_zero_shot",
            ),
            node(
                cache_probe_features,
                ["student_weights", "student_config", "params:evaluation", "params:seed"],
                "probe_features",
                name="cache_probe_features",
            ),
            node(
                evaluate_probes,
                ["probe_features", "student_config", "params:evaluation", "params:seed"],
                ["probe_metrics", "probe_report", "probe_curves"],
                name="evaluate_probes",
            ),
            node(
                evaluate_planted_artifacts,
                ["prepared_images", "student_weights", "student_config", "probe_metrics", "params:evaluation",
                 "params:teacher_denoising", "params:seed"],
                ["planted_artifact_metrics", "planted_artifact_report", "planted_artifact_figure"],
                name="evaluate_planted_artifacts",
            ),
        ]
    )
