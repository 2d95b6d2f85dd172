from kedro.pipeline import Pipeline, node

from ph_reg.pipelines.evaluation.nodes import (cache_probe_features, evaluate_artifacts, evaluate_planted_artifacts, evaluate_probes,
                    evaluate_zero_shot_table, select_student, summarize_evaluation)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                select_student,   # the final student, or the snapshot named by evaluation.student_snapshot
                ["student_weights", "student_config", "student_snapshots", "params:evaluation"],
                ["evaluated_student_weights", "evaluated_student_config"],
                name="select_student",
            ),
            node(
                evaluate_artifacts,
                ["prepared_images", "teacher_targets", "evaluated_student_weights", "evaluated_student_config",
                 "params:evaluation", "params:teacher_denoising", "params:seed"],
                ["evaluation_metrics", "feature_maps", "evaluation_report"],
                name="evaluate_artifacts",
            ),
            node(
                evaluate_zero_shot_table,
                ["evaluated_student_weights", "evaluated_student_config", "params:evaluation", "params:seed"],
                ["zero_shot_metrics", "zero_shot_report", "zero_shot_figures"],
                name="evaluate_zero_shot",
            ),
            node(
                cache_probe_features,
                ["evaluated_student_weights", "evaluated_student_config", "params:evaluation", "params:seed"],
                "probe_features",
                name="cache_probe_features",
            ),
            node(
                evaluate_probes,
                ["probe_features", "evaluated_student_weights", "evaluated_student_config", "params:evaluation",
                 "params:seed"],
                ["probe_metrics", "probe_report", "probe_curves"],
                name="evaluate_probes",
            ),
            node(
                evaluate_planted_artifacts,
                ["prepared_images", "evaluated_student_weights", "evaluated_student_config", "probe_metrics",
                 "params:evaluation", "params:teacher_denoising", "params:seed"],
                ["planted_artifact_metrics", "planted_artifact_report", "planted_artifact_figure"],
                name="evaluate_planted_artifacts",
            ),
            node(
                summarize_evaluation,   # the headline numbers of the four reports, one small DVC metric
                ["evaluation_metrics", "zero_shot_metrics", "probe_metrics", "planted_artifact_metrics"],
                "evaluation_summary",
                name="summarize_evaluation",
            ),
        ]
    )
