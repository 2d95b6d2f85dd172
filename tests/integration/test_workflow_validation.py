"""Issue 13, points 5 and 7: a configuration mistake anywhere in the parameters (deep in ``evaluation``, or a
misspelt top-level section) stops a run before any node runs, naming the dotted key and the close match; and a
resume is refused when the checkpoint was trained under settings that change the result."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from kedro.config import OmegaConfigLoader

from conftest import PROJECT_ROOT, TINY_OPEN_CLIP, make_project
from ph_reg.config import ConfigError
from ph_reg.params import validate_parameters
from ph_reg.method.checkpoint import RESUME_FREE_SETTINGS, ResumeMismatchError
from ph_reg.method.train import distill
from ph_reg.method.config import DistillConfig
from training_support import _copies, _dataset, _load, _state


def session_run(project, pipeline, env="tiny", runtime_params=None):
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    with KedroSession.create(project_path=project, env=env, runtime_params=runtime_params) as session:
        session.run(pipeline_names=[pipeline])


@pytest.fixture(scope="module")
def base_params():
    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), base_env="base", default_run_env="local",
                               merge_strategy={"parameters": "soft", "globals": "soft"})
    return loader["parameters"]


def _set(params, dotted, value):
    """A deep copy of ``params`` with ``dotted`` (a path of keys) set to ``value``."""
    changed = copy.deepcopy(params)
    *path, last = dotted.split(".")
    node = changed
    for key in path:
        node = node[key]
    node[last] = value
    return changed


# --- point 5: the evaluation section and the top level, checked before anything runs ------------------------------

DEEP_MISTAKES = [
    # (dotted path, value, key named by the error, text of the error)
    ("evaluation.probes.tasks.depth.synthetic.probe.warmup_iter", 85,
     "evaluation.probes.tasks.depth.synthetic.probe.warmup_iter", "did you mean 'warmup_iters'?"),
    ("evaluation.probes.tasks.depth.synthetic.probe.warmup_ratio", 2.0,
     "evaluation.probes.tasks.depth.synthetic.probe.warmup_ratio", "warmup_ratio must be in (0, 1], got 2.0"),
    ("evaluation.probes.tasks.segmentation.synthetic.probe.iterations", 0,
     "evaluation.probes.tasks.segmentation.synthetic.probe.iterations", "iterations must be a positive number"),
    ("evaluation.probes.tasks.depth.synthetic.augment.crop_sise", [192, 192],
     "evaluation.probes.tasks.depth.synthetic.augment.crop_sise", "did you mean 'crop_size'?"),
    ("evaluation.probes.tasks.depth.synthetic.augment.flip_prob", 1.5,
     "evaluation.probes.tasks.depth.synthetic.augment.flip_prob", "must be a probability in [0, 1], got 1.5"),
    ("evaluation.probes.tasks.segmentation.synthetic.crop_size", 200,
     "evaluation.probes.tasks.segmentation.synthetic.crop_size", "multiple of the model's patch size 16"),
    ("evaluation.probes.tasks.segmentation.synthetic.stride", 300,
     "evaluation.probes.tasks.segmentation.synthetic.stride", "stride must be in (0, crop_size=224]"),
    ("evaluation.probes.tasks.segmentation.synthetic.train.num_image", 4,
     "evaluation.probes.tasks.segmentation.synthetic.train.num_image", "did you mean 'num_images'?"),
    ("evaluation.probes.tasks.depth.synthetic.val.type", "synthetc",
     "evaluation.probes.tasks.depth.synthetic.val.type", "did you mean 'synthetic'?"),
    ("evaluation.probes.run", ["segmentation/synthetic", "depth/synthetc"],
     "evaluation.probes.run", "did you mean 'depth/synthetic'?"),
    ("evaluation.probes.mode", "onlin", "evaluation.probes.mode", "one of ['cached', 'online']"),
    ("evaluation.probes.teacher_head", "final_norm", "evaluation.probes.teacher_head", "'maskclip'"),
    ("evaluation.probes.feature_dtype", "float8", "evaluation.probes.feature_dtype", "['float16', 'float32']"),
    ("evaluation.zero_shot.benchmarks.synthetic.settings.stride", 448,
     "evaluation.zero_shot.benchmarks.synthetic.settings.stride", "must not exceed crop (224)"),
    ("evaluation.zero_shot.benchmarks.synthetic.settings.smal_window", "pad",
     "evaluation.zero_shot.benchmarks.synthetic.settings.smal_window", "did you mean 'small_window'?"),
    ("evaluation.zero_shot.benchmarks.synthetic.dataset", {"type": "voc", "split": "val"},
     "evaluation.zero_shot.benchmarks.synthetic.dataset.root", "missing a required argument: 'root'"),
    ("evaluation.zero_shot.benchmarks.synthetic.classes", "voc22",
     "evaluation.zero_shot.benchmarks.synthetic.classes", "did you mean 'voc21'?"),
    ("evaluation.zero_shot.heads", ["naclip", "maskclp"], "evaluation.zero_shot.heads", "did you mean 'maskclip'?"),
    ("evaluation.zero_shot.figure.benchmark", "voc21", "evaluation.zero_shot.figure.benchmark", "['synthetic']"),
    ("evaluation.precision", "bf32", "evaluation.precision", "'fp32'"),
    ("evaluation.outlier_k", -1.0, "evaluation.outlier_k", "a number in the open interval (0.0, inf)"),
    ("evaluation.planted.reference_views", 0, "evaluation.planted.reference_views", "an integer >= 1"),
    ("evaluation.figure_imags", 2, "evaluation.figure_imags", "did you mean 'figure_images'?"),
]


@pytest.mark.parametrize("path,value,key,text", DEEP_MISTAKES, ids=[m[0] + "=" + repr(m[1]) for m in DEEP_MISTAKES])
def test_evaluation_mistakes_name_the_dotted_key(base_params, path, value, key, text):
    with pytest.raises(ConfigError) as caught:
        validate_parameters(_set(base_params, path, value))
    assert caught.value.key == key, str(caught.value)
    assert str(caught.value).startswith(f"invalid parameter {key}: ") and text in str(caught.value)


def test_shipped_evaluation_sections_validate(base_params):
    checked = validate_parameters(base_params, ["evaluation"])
    assert checked["evaluation"]["probes"]["run"] == ["segmentation/synthetic", "depth/synthetic"]
    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), base_env="base", default_run_env="paper_dinov2",
                               merge_strategy={"parameters": "soft", "globals": "soft"})
    paper = loader["parameters"]   # DINOv2: patch 14, crop 518, the official augmentation and depth recipe
    assert validate_parameters(paper, ["evaluation"])["evaluation"]["probes"]["mode"] == "online"
    with pytest.raises(ConfigError, match="evaluation.probes.tasks.segmentation.voc21.crop_size: crop_size must be "
                                          "a positive multiple of the model's patch size 14, got 512"):
        validate_parameters(_set(paper, "evaluation.probes.tasks.segmentation.voc21.crop_size", 512), ["evaluation"])


@pytest.mark.parametrize("misspelt,meant", [("evalution", "evaluation"),
                                            ("student_distilation", "student_distillation"), ("sed", "seed")])
def test_misspelt_top_level_section_is_refused(base_params, misspelt, meant):
    params = {**base_params, misspelt: base_params.get(meant, 1)}
    with pytest.raises(ConfigError) as caught:
        validate_parameters(params, ["data_preparation"])   # whatever the run reads
    assert caught.value.key == misspelt
    assert f"{misspelt}: did you mean {meant!r}?" in str(caught.value)


def test_bad_evaluation_key_stops_kedro_before_any_node_runs(tmp_path, monkeypatch):
    # a typo in the last block of the evaluation section: the depth probe's recipe
    head, probe, tail = TINY_OPEN_CLIP["parameters_evaluation.yml"].rpartition("probe: {iterations: 5, batch_size: 2}")
    files = {**TINY_OPEN_CLIP, "parameters_evaluation.yml": head + probe[:-1] + ", warmup_iter: 2}" + tail}
    assert "depth:" in head and "warmup_iter: 2}" in files["parameters_evaluation.yml"]
    project = make_project(tmp_path / "project", files)
    monkeypatch.chdir(project)
    cache = project / "data/05_model_input/probe_features"
    cache.mkdir(parents=True)
    (cache / "earlier.txt").write_text("the probe feature cache of an earlier run")
    with pytest.raises(ConfigError) as caught:
        session_run(project, "evaluation")
    # without the check the first node would fail on the missing student (a DatasetError), not on the parameter
    assert caught.value.key == "evaluation.probes.tasks.depth.synthetic.probe.warmup_iter"
    assert "did you mean 'warmup_iters'?" in str(caught.value)
    assert sorted(p.name for p in cache.iterdir()) == ["earlier.txt"]   # nothing rewritten
    assert not (project / "data/run_info").exists()   # stopped at the validation, before the run record


def test_misspelt_section_stops_kedro_before_any_node_runs(tmp_path, monkeypatch):
    files = {**TINY_OPEN_CLIP, "parameters_student_distillation.yml":
             TINY_OPEN_CLIP["parameters_student_distillation.yml"].replace("student_distillation:",
                                                                          "student_distilation:")}
    project = make_project(tmp_path / "project", files)
    monkeypatch.chdir(project)
    with pytest.raises(ConfigError, match="student_distilation: did you mean 'student_distillation'"):
        session_run(project, "data_preparation")   # a pipeline that does not even read the section
    assert not (project / "data/02_intermediate/prepared_images").exists()


# --- point 7: a resume is checked against the checkpoint's settings -----------------------------------------------

CONFIG = DistillConfig(epochs=3, batch_size=2, lr=1e-2, lr_end=1e-3, checkpoint_every=1)
SETTINGS = {"backbone": {"arch": "open_clip:ph-reg-tiny-ViT-16", "img_size": 64},
            "student_distillation": {"num_registers": 4, "trainable": ["registers", "last_block"],
                                     "checkpoint_dir": "data/06_models/checkpoints"}}


class Crash(Exception):
    pass


def _crash_after_first_epoch(epoch, row):
    if epoch == 0:
        raise Crash


def _checkpoint_after_one_epoch(fresh, folder):
    with pytest.raises(Crash):
        distill(fresh(), _dataset(), CONFIG, seed=3, checkpoint_dir=folder, state_fn=_state, progress=False,
                on_epoch_end=_crash_after_first_epoch, settings=SETTINGS)


def _resume(model, folder, config=CONFIG, seed=3, settings=SETTINGS, dataset=None):
    dataset = _dataset() if dataset is None else dataset
    return distill(model, dataset, DistillConfig(**{**config.__dict__, "resume": True}), seed=seed,
                   checkpoint_dir=folder, state_fn=_state, load_state_fn=_load, progress=False, settings=settings)


def test_resume_with_changed_settings_is_refused_naming_them(tmp_path):
    fresh = _copies()
    _checkpoint_after_one_epoch(fresh, tmp_path)
    checkpoint = tmp_path / "last.ckpt"
    model, untouched = fresh(), _state(fresh())
    with pytest.raises(ResumeMismatchError) as caught:
        _resume(model, tmp_path, config=DistillConfig(**{**CONFIG.__dict__, "lr": 2e-2}))
    message = str(caught.value)
    assert "student_distillation.training.lr: 0.01 in the checkpoint, 0.02 now" in message
    assert f"delete {checkpoint}" in message and "resume: false" in message and "num_workers" in message
    assert all(torch.equal(value, untouched[name]) for name, value in _state(model).items())   # nothing loaded
    cases = [
        (dict(seed=4), "seed: 3 in the checkpoint, 4 now"),
        (dict(settings={**SETTINGS, "student_distillation": {**SETTINGS["student_distillation"], "num_registers": 8}}),
         "student_distillation.num_registers: 4 in the checkpoint, 8 now"),
        (dict(settings={**SETTINGS, "student_distillation": {**SETTINGS["student_distillation"],
                                                              "trainable": ["registers"]}}),
         "student_distillation.trainable: ['registers', 'last_block'] in the checkpoint, ['registers'] now"),
        (dict(dataset=_dataset(8)), "number of training images: 6 in the checkpoint, 8 now"),
        (dict(config=DistillConfig(**{**CONFIG.__dict__, "epochs": 4})),
         "student_distillation.training.epochs: 3 in the checkpoint, 4 now"),
    ]
    for change, text in cases:
        with pytest.raises(ResumeMismatchError) as caught:
            _resume(fresh(), tmp_path, **change)
        assert text in str(caught.value), change


def test_resume_with_only_free_settings_changed_proceeds_and_matches(tmp_path):
    fresh = _copies()
    full = fresh()
    expected = distill(full, _dataset(), CONFIG, seed=3, state_fn=_state, progress=False)
    _checkpoint_after_one_epoch(fresh, tmp_path)
    free = DistillConfig(**{**CONFIG.__dict__, "num_workers": 1, "checkpoint_every": 2, "max_nonfinite_batches": 7})
    moved = {**SETTINGS, "student_distillation": {**SETTINGS["student_distillation"], "checkpoint_dir": "elsewhere"}}
    resumed = fresh()
    assert _resume(resumed, tmp_path, config=free, settings=moved) == expected
    assert all(torch.equal(value, _state(resumed)[name]) for name, value in _state(full).items())
    assert {f"student_distillation.training.{k}" for k in ("num_workers", "resume", "checkpoint_every",
                                                            "max_nonfinite_batches")} <= set(RESUME_FREE_SETTINGS)


def test_checkpoint_without_recorded_settings_compares_the_training_config(tmp_path, caplog):
    fresh = _copies()
    _checkpoint_after_one_epoch(fresh, tmp_path)
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    del state["settings"]   # as written before checkpoints recorded them
    torch.save(state, tmp_path / "last.ckpt")
    with pytest.raises(ResumeMismatchError, match="student_distillation.training.lr: 0.01 in the checkpoint"):
        _resume(fresh(), tmp_path, config=DistillConfig(**{**CONFIG.__dict__, "lr": 2e-2}))
    with caplog.at_level(logging.WARNING, logger="ph_reg.method.checkpoint"):
        _resume(fresh(), tmp_path)
    assert "only student_distillation.training is compared" in caplog.text


def test_kedro_resume_with_changed_lr_is_refused_and_config_json_stays_true(tmp_path, monkeypatch):
    """The issue's case: ``resume=true`` with another ``lr`` exported the old weights under the new ``lr``."""
    project = make_project(tmp_path / "project", TINY_OPEN_CLIP)
    monkeypatch.chdir(project)
    session_run(project, "distill")
    student = project / "data/06_models/student"
    exported = {name: (student / name).read_bytes() for name in ("config.json", "weights.safetensors")}
    assert json.loads(exported["config.json"])["training"]["lr"] == 3.0e-4
    resume = {"student_distillation": {"training": {"resume": True, "lr": 1.0e-3}}}
    with pytest.raises(ResumeMismatchError, match=r"student_distillation.training.lr: 0.0003 in the checkpoint, "
                                                  r"0.001 now"):
        session_run(project, "student_distillation", runtime_params=resume)
    assert {name: (student / name).read_bytes() for name in exported} == exported
    # a setting that does not change the result may differ: the resume proceeds (the run was complete, so the
    # exported student is the checkpoint's, bit for bit)
    session_run(project, "student_distillation",
                runtime_params={"student_distillation": {"training": {"resume": True, "num_workers": 1}}})
    assert (student / "weights.safetensors").read_bytes() == exported["weights.safetensors"]
