import json

import pytest
import torch

from ph_reg.config import ConfigError
from ph_reg.io.shards import ShardReader
from ph_reg.kedro_datasets import JSONDataset
from ph_reg.models import build_backbone
from ph_reg.models.test_time_registers import attach_from_artifact
from ph_reg.params import register_detection_params, validate_parameters
from ph_reg.pipelines.test_time_registers.nodes import detect_register_neurons
from ph_reg.runtime import normalize

ARTIFACT = "data/04_feature/register_neurons.json"


def _node(project, **changes):
    params = project.params
    return detect_register_neurons(ShardReader(project.root / "data/02_intermediate/prepared_images"),
                                   params["backbone"], {**params["test_time_registers"], **changes}, params["seed"])


def test_ranks_the_planted_neuron_first_bit_identical_run_to_run(project, tmp_path):
    project.run("test_time_registers")
    artifact = json.loads((project.root / ARTIFACT).read_text())
    detection, section = artifact["detection"], project.params["test_time_registers"]
    images = ShardReader(project.root / "data/02_intermediate/prepared_images")
    train = len(images.indices(split="train"))
    assert project.params["backbone"]["implant"]["mode"] == "neurons"   # conf/base's implant, in neuron mode
    assert detection["planted_neurons"] == [[1, 256]]   # ph-reg-tiny-ViT-16: 3 blocks of 256 hidden units
    assert [row[:2] for row in artifact["neurons"][:1]] == detection["planted_neurons"]
    assert len(artifact["neurons"]) == section["top_k"] == 3
    assert artifact["neurons"][0][2] > 5 * artifact["neurons"][1][2]   # far ahead of any ordinary neuron
    assert detection["images_seen"] == detection["images_with_outliers"] == train > 0
    assert (detection["head"], detection["outlier_block"], detection["split"]) == ("vanilla", 2, "train")
    assert artifact["intervention"]["norm_threshold"] == section["norm_threshold"]
    # a second run writes the same bytes
    again = tmp_path / "register_neurons.json"
    JSONDataset(str(again)).save(_node(project))
    assert again.read_bytes() == (project.root / ARTIFACT).read_bytes()


def test_the_artifact_attached_moves_the_outliers_off_the_patches(project):
    project.run("test_time_registers")
    artifact = json.loads((project.root / ARTIFACT).read_text())
    config, _ = register_detection_params(project.params["backbone"], project.params["test_time_registers"])
    model = build_backbone(config).eval()
    images = ShardReader(project.root / "data/02_intermediate/prepared_images")
    pixels = normalize(images.stack("image", images.indices(split="val")), model.mean, model.std)
    threshold = artifact["intervention"]["norm_threshold"]
    with torch.no_grad():
        before = model.forward_tokens(pixels, pre_norm=True).patch.norm(dim=-1)
        attach_from_artifact(model, artifact)
        after = model.forward_tokens(pixels, pre_norm=True).patch.norm(dim=-1)
    assert (before > threshold).any() and not (after > threshold).any()


@pytest.mark.parametrize("changes, key", [
    ({"top_kk": 3}, "test_time_registers.top_kk"),
    ({"split": "test"}, "test_time_registers.split"),
    ({"highest_layer": 2}, "test_time_registers.highest_layer"),   # the last block: the CLIP heads replace it
    ({"highest_layer": None}, "test_time_registers.highest_layer"),
    ({"outlier_layer": 3}, "test_time_registers.outlier_layer"),
    ({"norm_threshold": -1.0}, "test_time_registers.norm_threshold"),
])
def test_a_bad_parameter_is_refused_before_the_run_naming_the_key(project, changes, key):
    params = {**project.params, "test_time_registers": {**project.params["test_time_registers"], **changes}}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_parameters(params, ["test_time_registers"])


def test_no_outlier_in_any_image_names_the_threshold(project):
    project.run("data_preparation")
    with pytest.raises(ValueError, match=r"test_time_registers\.norm_threshold"):
        _node(project, norm_threshold=1e6)
