"""The configuration path: each section built into its typed config with from_mapping, one TTAConfig passed whole
from teacher_denoising.tta to every TTA user (the maskclip_tta baseline included), each default written once, and
every section a pipeline's nodes read checked before the run (the evaluation section included)."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from ph_reg.config import ConfigError, from_mapping
from ph_reg.data.prepare import DataPreparationConfig
from ph_reg.hooks import parameter_sections
from ph_reg.method.config import StudentDistillationConfig
from ph_reg.method.targets import TeacherDenoisingConfig
from ph_reg.method.tta import MAX_IMAGES_PER_FORWARD, TTAConfig
from ph_reg.params import validate_parameters
from ph_reg.pipeline_registry import register_pipelines


def test_the_teacher_denoising_section_gives_one_tta_config(base_params):
    section = base_params["teacher_denoising"]
    config = from_mapping(TeacherDenoisingConfig, section, "teacher_denoising")
    assert isinstance(config.tta, TTAConfig)
    assert dataclasses.asdict(config.tta) == section["tta"]   # the store attrs keep their keys and values
    assert config.max_images_per_forward == section["max_images_per_forward"]
    # each default written once: the YAML of conf/base restates the config classes' defaults
    assert TeacherDenoisingConfig().tta == TTAConfig() == from_mapping(TTAConfig, section["tta"], "t")
    assert TeacherDenoisingConfig().max_images_per_forward == MAX_IMAGES_PER_FORWARD


@pytest.mark.parametrize(("cls", "section", "values", "key"), [
    (TTAConfig, "teacher_denoising.tta", {"n_views": 0}, "teacher_denoising.tta.n_views"),
    (TTAConfig, "teacher_denoising.tta", {"shift_frac": 0.5}, "teacher_denoising.tta.shift_frac"),
    (TeacherDenoisingConfig, "teacher_denoising", {"tta": {"pool_factr": 3}}, "teacher_denoising.tta.pool_factr"),
    (TeacherDenoisingConfig, "teacher_denoising", {"max_images_per_forward": 0},
     "teacher_denoising.max_images_per_forward"),
    (DataPreparationConfig, "data_preparation", {"val_fraction": 1.0}, "data_preparation.val_fraction"),
    (DataPreparationConfig, "data_preparation", {"source": "builtin:photos"}, "data_preparation.source"),
    (StudentDistillationConfig, "student_distillation", {"trainable": []}, "student_distillation.trainable"),
    (StudentDistillationConfig, "student_distillation", {"training": {"epoch": 3}},
     "student_distillation.training.epoch"),
])
def test_section_mistakes_name_the_dotted_key(cls, section, values, key):
    with pytest.raises(ConfigError) as caught:
        from_mapping(cls, values, section)
    assert caught.value.key == key


def test_a_missing_source_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_preparation.source"):
        from_mapping(DataPreparationConfig, {"source": str(tmp_path / "nowhere")}, "data_preparation")


def test_every_pipeline_validates_every_section_its_nodes_read():
    pipelines = register_pipelines()
    for name, pipeline in pipelines.items():
        sections = parameter_sections(pipeline)
        read = {d.split(":", 1)[1].split(".")[0] for d in pipeline.inputs() if d.startswith("params:")}
        assert read <= set(sections or ()), name
    # the evaluation checks its own section, and the teacher's TTA that its TTA users follow
    assert {"evaluation", "teacher_denoising"} <= set(parameter_sections(pipelines["evaluation"]))


def test_a_probe_typo_fails_when_the_evaluation_pipeline_starts(base_params):
    params = copy.deepcopy(base_params)
    tasks = params["evaluation"]["probes"]["tasks"]
    task = next(iter(tasks))
    benchmark = next(iter(tasks[task]))
    tasks[task][benchmark]["probe"] = {"iteration": 200}
    with pytest.raises(ConfigError) as caught:   # what the hook runs before any node
        validate_parameters(params, parameter_sections(register_pipelines()["evaluation"]))
    assert caught.value.key == f"evaluation.probes.tasks.{task}.{benchmark}.probe.iteration"
    assert "did you mean 'iterations'?" in str(caught.value)


def test_the_maskclip_tta_baseline_needs_and_follows_the_tta_config():
    import torch

    from ph_reg.evaluation.zeroshot.harness import make_dense_fn, tta_dense_fn
    from ph_reg.models import BackboneConfig, build_backbone

    model = build_backbone(BackboneConfig(arch="open_clip:ph-reg-tiny-ViT-16", img_size=32, head="maskclip")).eval()
    with pytest.raises(ValueError, match="teacher_denoising.tta"):
        make_dense_fn(model, "maskclip_tta")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tta = TTAConfig(n_views=4, shift_frac=0.4, flip_prob=1.0)
    with torch.no_grad():
        torch.testing.assert_close(make_dense_fn(model, "maskclip_tta", tta, seed=1)(x), tta_dense_fn(model, tta, 1)(x))
        other = make_dense_fn(model, "maskclip_tta", dataclasses.replace(tta, flip_prob=0.0), seed=1)(x)
    assert not torch.allclose(other, tta_dense_fn(model, tta, 1)(x))   # the flips of the config are used
