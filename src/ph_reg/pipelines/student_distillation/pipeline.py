from kedro.pipeline import Pipeline, node

from ph_reg.pipelines.student_distillation.nodes import build_student, export_student, train_student


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(build_student, ["params:backbone", "params:student_distillation"], "initial_student",
                 name="build_student"),
            node(train_student,
                 ["initial_student", "prepared_images", "teacher_targets", "params:backbone",
                  "params:student_distillation", "params:teacher_denoising", "params:data_preparation", "params:seed"],
                 ["trained_student", "loss_history", "student_snapshots"], name="train_student"),
            node(export_student,
                 ["trained_student", "params:backbone", "params:teacher_denoising", "params:student_distillation"],
                 ["student_weights", "student_config"], name="export_student"),
        ]
    )
