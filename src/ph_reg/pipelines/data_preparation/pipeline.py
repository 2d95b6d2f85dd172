"""The data_preparation pipeline: a source's images into the prepared-image store."""

from kedro.pipeline import Node, Pipeline

from ph_reg.pipelines.data_preparation.nodes import prepare_images


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(func=prepare_images, inputs=["params:data_preparation", "params:seed"], outputs="prepared_images",
             name="prepare_images"),
    ])
