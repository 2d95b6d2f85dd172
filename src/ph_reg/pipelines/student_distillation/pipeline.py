"""The student_distillation pipeline: build the student, distill it, export it (ph-reg folder, Hub folder)."""

from kedro.pipeline import Node, Pipeline

from ph_reg.pipelines.student_distillation.nodes import (build_student, export_student, export_student_hub,
                                                         train_student)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(func=build_student, inputs=["params:backbone", "params:student_distillation"],
             outputs="initial_student", name="build_student"),
        Node(func=train_student,   # teacher_denoising and data_preparation: the online teacher and crops
             inputs=["initial_student", "prepared_images", "teacher_targets", "params:backbone",
                     "params:student_distillation", "params:teacher_denoising", "params:data_preparation",
                     "params:seed"],
             outputs=["trained_student", "loss_history", "student_snapshots"], name="train_student"),
        Node(func=export_student,
             inputs=["trained_student", "params:backbone", "params:teacher_denoising.head",
                     "params:student_distillation"],
             outputs=["student_weights", "student_config"], name="export_student"),
        Node(func=export_student_hub, inputs=["trained_student", "student_weights", "student_config"],
             outputs="student_hub", name="export_student_hub"),
    ])
