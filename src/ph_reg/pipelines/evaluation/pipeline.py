from kedro.pipeline import Node, Pipeline

from ph_reg.pipelines.evaluation.nodes import (cache_probe_features, evaluate_artifacts, evaluate_planted_artifacts,
                                               evaluate_probes, evaluate_zero_shot, select_student)
from ph_reg.reporting.summary import summarize_evaluation


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=select_student,   # the final student, or the snapshot named by evaluation.student_snapshot
                inputs=["student_weights", "student_config", "student_snapshots", "params:evaluation"],
                outputs=["evaluated_student_weights", "evaluated_student_config"],
                name="select_student",
            ),
            Node(
                func=evaluate_artifacts,
                inputs=["prepared_images", "teacher_targets", "evaluated_student_weights", "evaluated_student_config",
                        "params:evaluation", "params:teacher_denoising", "params:seed"],
                outputs=["evaluation_metrics", "feature_maps", "evaluation_report"],
                name="evaluate_artifacts",
            ),
            Node(
                func=evaluate_zero_shot,
                inputs=["evaluated_student_weights", "evaluated_student_config", "register_neurons",
                        "params:evaluation", "params:teacher_denoising", "params:seed"],   # tta: maskclip_tta
                outputs=["zero_shot_metrics", "zero_shot_report", "zero_shot_figures"],
                name="evaluate_zero_shot",
            ),
            Node(
                func=cache_probe_features,
                inputs=["evaluated_student_weights", "evaluated_student_config", "register_neurons",
                        "params:evaluation", "params:seed"],
                outputs="probe_features",
                name="cache_probe_features",
            ),
            Node(
                func=evaluate_probes,
                inputs=["probe_features", "evaluated_student_weights", "evaluated_student_config",
                        "register_neurons", "params:evaluation", "params:seed"],
                outputs=["probe_metrics", "probe_report", "probe_curves"],
                name="evaluate_probes",
            ),
            Node(
                func=evaluate_planted_artifacts,
                inputs=["prepared_images", "evaluated_student_weights", "evaluated_student_config", "probe_metrics",
                        "register_neurons", "params:evaluation", "params:teacher_denoising",
                        "params:student_distillation", "params:seed"],   # the rows ttr and both
                outputs=["planted_artifact_metrics", "planted_artifact_report", "planted_artifact_figure"],
                name="evaluate_planted_artifacts",
            ),
            Node(
                func=summarize_evaluation,   # the headline numbers of the four reports, one small DVC metric
                inputs=["evaluation_metrics", "zero_shot_metrics", "probe_metrics", "planted_artifact_metrics"],
                outputs="evaluation_summary",
                name="summarize_evaluation",
            ),
        ]
    )
