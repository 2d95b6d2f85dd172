from kedro.pipeline import Pipeline, node

from ph_reg.pipelines.data_preparation.nodes import prepare_images


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [node(prepare_images, ["params:data_preparation", "params:seed"], "prepared_images", name="prepare_images")]
    )
