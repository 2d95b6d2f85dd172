"""The test_time_registers pipeline: the register neurons of the frozen base model, for every `ttr` row."""

from kedro.pipeline import Node, Pipeline

from ph_reg.pipelines.test_time_registers.nodes import detect_register_neurons


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(func=detect_register_neurons,
             inputs=["prepared_images", "params:backbone", "params:test_time_registers", "params:seed"],
             outputs="register_neurons", name="detect_register_neurons"),
    ])
