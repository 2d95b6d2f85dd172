"""Issue 12, training points 1, 5 and 6: online targets in the paper configurations and the cached path as its own
environment (``conf/paper_cached`` = base + paper + its overrides), every Flickr30k image trained on with the last
partial batch dropped (resume-exact, DDP-correct), and the release's epoch snapshots, one of which the evaluation
can measure (``evaluation.student_snapshot``)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import PROJECT_ROOT, TINY_OPEN_CLIP, make_project
from ph_reg.method.tta import TTAConfig
from ph_reg.config import ConfigError, from_mapping
from ph_reg.params import validate_parameters
from ph_reg.data.prepare import DataPreparationConfig, prepared_records
from ph_reg.method.data import TargetPairs
from ph_reg.method.train import TrainingInterrupted, distill
from ph_reg.method.config import TRAINING_PREFIX, DistillConfig
from ph_reg.io.shards import ShardReader, write_shards
from ph_reg.io.files import load_tensors
from ph_reg.models import BackboneConfig, build_backbone, trainable_state_dict
from ph_reg.pipelines.evaluation.nodes import select_student
from ph_reg.settings import CONFIG_LOADER_ARGS, CONFIG_LOADER_CLASS, LayeredConfigLoader
from ph_reg.method.student import (StudentSnapshots, load_student, read_student, student_config,
                            teacher_backbone)
from ph_reg.method.targets import denoised_target_records
from training_support import Pairs, TinyDense, _copies, _dataset, _load, _state
from training_support import SignalAt

PAPER_SNAPSHOTS = [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]   # DINOv2_full/distill_main.py: epoch 1 and every 10
#: What conf/paper_cached and conf/paper_dinov2_cached change, as (section, key) -> value; nothing else may differ.
CACHED_OVERRIDES = {("student_distillation", "targets"): "cached", ("teacher_denoising", "mode"): "cached",
                    ("data_preparation", "crops_per_image"): 4}


def load_config(env: str, key: str = "parameters", conf: Path = PROJECT_ROOT / "conf") -> dict:
    """``key`` of environment ``env`` exactly as the project loads it (``ph_reg.settings``)."""
    return CONFIG_LOADER_CLASS(str(conf), env=env, **CONFIG_LOADER_ARGS)[key]


# --- configuration -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env,snapshot", [("paper", None), ("paper_dinov2", 30)])
def test_paper_configs_train_online_on_all_images_and_drop_the_last_batch(env, snapshot):
    params = load_config(env)
    assert params["student_distillation"]["targets"] == "online" and params["teacher_denoising"]["mode"] == "online"
    assert params["data_preparation"]["val_fraction"] == 0.0
    training = params["student_distillation"]["training"]
    assert training["drop_last"] is True and training["epochs"] == 100
    assert params["student_distillation"]["snapshot_dir"] == "data/06_models/snapshots"
    assert from_mapping(DistillConfig, training, TRAINING_PREFIX).snapshot_epoch_numbers() == PAPER_SNAPSHOTS
    evaluation = params["evaluation"]
    assert evaluation["student_snapshot"] == snapshot
    assert evaluation["split"] == "train" and evaluation["max_images"] > 0   # nothing is held out
    checked = validate_parameters({**params, "data_preparation": {**params["data_preparation"],
                                                                   "source": "builtin:sample_photos"}})
    assert checked["student_distillation"].targets == "online"
    base = load_config("local")
    assert base["student_distillation"]["training"]["drop_last"] is False   # see conf/base: ~30 training crops
    assert base["evaluation"]["student_snapshot"] is None


def _differences(a, b, path=()):
    if isinstance(a, dict) and isinstance(b, dict):
        return {d for key in a.keys() | b.keys() for d in _differences(a.get(key), b.get(key), (*path, key))}
    return set() if a == b else {path}


@pytest.mark.parametrize("parent", ["paper", "paper_dinov2"])
def test_cached_environment_is_its_parent_plus_only_its_overrides(parent):
    env = f"{parent}_cached"
    assert yaml.safe_load((PROJECT_ROOT / "conf" / env / "parent.yml").read_text()) == {"parent": parent}
    assert CONFIG_LOADER_CLASS("conf", env=env, **CONFIG_LOADER_ARGS).env_chain() == [parent, env]
    cached, paper = load_config(env), load_config(parent)
    assert _differences(cached, paper) == set(CACHED_OVERRIDES)
    for (section, key), value in CACHED_OVERRIDES.items():
        assert cached[section][key] == value
    for key in ("globals", "catalog"):
        assert load_config(env, key) == load_config(parent, key)
    assert cached["backbone"]["img_size"] == load_config(parent, "globals")["image_size"]   # parent's globals
    checked = validate_parameters({**cached, "data_preparation": {**cached["data_preparation"],
                                                                   "source": "builtin:sample_photos"}})
    assert checked["student_distillation"].targets == checked["teacher_denoising"].mode == "cached"
    assert checked["data_preparation"].crops_per_image == 4


def test_environment_chains_and_their_errors(tmp_path):
    conf = tmp_path / "conf"
    layers = {"base": {"a": 1, "b": {"x": 1, "y": 1}, "image": "${globals:size}"}, "mid": {"b": {"x": 2}},
              "top": {"b": {"y": 3}, "c": 4}}
    for env, values in layers.items():
        (conf / env).mkdir(parents=True)
        (conf / env / "parameters.yml").write_text(yaml.safe_dump(values))
    (conf / "base" / "globals.yml").write_text("size: 1\n")
    (conf / "mid" / "globals.yml").write_text("size: 2\n")
    (conf / "mid" / "parent.yml").write_text("parent: base\n")
    (conf / "top" / "parent.yml").write_text("parent: mid\n")
    assert load_config("top", conf=conf) == {"a": 1, "b": {"x": 2, "y": 3}, "c": 4, "image": 2}
    assert load_config("mid", conf=conf) == {"a": 1, "b": {"x": 2, "y": 1}, "image": 2}
    runtime = LayeredConfigLoader(str(conf), env="top", runtime_params={"a": 9}, **CONFIG_LOADER_ARGS)
    assert runtime["parameters"]["a"] == 9   # --params still win over every layer

    (conf / "mid" / "parent.yml").write_text("parent: top\n")
    with pytest.raises(ValueError, match="cycle: top -> mid -> top"):
        load_config("top", conf=conf)
    (conf / "mid" / "parent.yml").write_text("parent: nowhere\n")
    with pytest.raises(Exception, match="parent environment 'nowhere'"):
        load_config("top", conf=conf)
    (conf / "mid" / "parent.yml").write_text("parent: base\nextra: 1\n")
    with pytest.raises(ValueError, match="must hold exactly one key, 'parent'"):
        load_config("top", conf=conf)


def test_kedro_session_and_viz_load_the_cached_environment(tmp_path, monkeypatch):
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project
    from kedro_viz.integrations.kedro.data_loader import load_data

    project = make_project(tmp_path / "project", TINY_OPEN_CLIP)
    monkeypatch.chdir(project)
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env="paper_cached") as session:
        params = session.load_context().params   # what the validation hook (ProjectHooks) reads
    assert params["student_distillation"]["targets"] == "cached" and params["backbone"]["img_size"] == 448
    assert params["student_distillation"]["training"]["drop_last"] is True   # from conf/paper
    catalog, pipelines, _ = load_data(project, env="paper_cached")   # what `kedro viz --env paper_cached` loads
    assert "select_student" in {node.name for node in pipelines["evaluation"].nodes}
    assert "student_snapshots" in catalog


# --- cached crops: K crops and K view draws per image, one per epoch -----------------------------------------------

def test_k_cached_crops_have_their_own_crops_and_view_draws(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    pixels = torch.randint(0, 256, (40, 160, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(folder / "wide.png")   # 32 x 128 after resizing: 97 possible crops
    config = DataPreparationConfig(source=str(folder), image_size=32, crops_per_image=4, val_fraction=0.0)
    records = list(prepared_records(config, seed=0))
    assert [meta["crop"] for _, meta in records] == [0, 1, 2, 3]
    assert len({(meta["top"], meta["left"]) for _, meta in records}) == 4   # four different crops of one photo
    # the same pixels four times: the targets can then differ only through the views each record draws
    same = records[0][0]["image"]
    write_shards(tmp_path / "images", [({"image": same.clone()}, {"name": "a", "crop": k, "split": "train"})
                                       for k in range(4)])
    images = ShardReader(tmp_path / "images")
    teacher = build_backbone({"arch": "timm:test_vit", "img_size": 32, "head": "final_norm"})
    tta = TTAConfig(n_views=3, shift_frac=0.45, flip_prob=0.5, pool_factor=10)
    targets = [record["target"] for record, _ in denoised_target_records(teacher, images, seed=0, batch_size=4,
                                                                         progress=False, tta=tta)]
    assert all(not torch.equal(targets[a], targets[b]) for a in range(4) for b in range(a + 1, 4))
    # a subset (as the evaluation computes online targets) gives the very same targets
    subset = {meta["image_index"]: record["target"] for record, meta in denoised_target_records(
        teacher, images, seed=0, batch_size=2, progress=False, indices=[2, 0], tta=tta)}
    assert torch.equal(subset[2], targets[2]) and torch.equal(subset[0], targets[0])

    write_shards(tmp_path / "targets", [({"target": t}, {"image_index": i}) for i, t in enumerate(targets)])
    pairs = TargetPairs(images, ShardReader(tmp_path / "targets"), [[0, 1, 2, 3]], teacher.mean, teacher.std)
    assert len(pairs) == 1   # an epoch shows every image once ...
    seen = [pairs[(epoch, 0)][1] for epoch in range(8)]   # ... one of its K crops, in turn
    for epoch, target in enumerate(seen):
        assert torch.equal(target, targets[epoch % 4])


# --- drop_last ---------------------------------------------------------------------------------------------------

class Recording(torch.utils.data.Dataset):
    """Records every ``(epoch, index)`` read."""

    def __init__(self, base):
        self.base, self.reads = base, []

    def __len__(self):
        return len(self.base)

    def __getitem__(self, item):
        self.reads.append(item)
        return self.base[item]

    def epoch(self, epoch):
        return [i for e, i in self.reads if e == epoch]


def test_drop_last_drops_the_partial_batch():
    config = DistillConfig(epochs=3, batch_size=2, lr=1e-2, lr_end=1e-3, drop_last=True)
    data = Recording(_dataset(7))
    history = distill(TinyDense(), data, config, seed=0, progress=False)
    assert [(row["steps"], row["images"]) for row in history] == [(3, 6)] * 3
    for epoch in range(3):
        assert len(set(data.epoch(epoch))) == 6   # six different images, the seventh left out
    left_out = [set(range(7)) - set(data.epoch(e)) for e in range(3)]
    assert len({min(s) for s in left_out}) > 1   # reshuffled: not always the same image
    kept = distill(TinyDense(), _dataset(7), DistillConfig(**{**config.__dict__, "drop_last": False}), seed=0,
                   progress=False)
    assert [(row["steps"], row["images"]) for row in kept] == [(4, 7)] * 3
    with pytest.raises(ValueError, match="drop_last is true, but the 3 training images fill no batch of 4"):
        distill(TinyDense(), _dataset(3), DistillConfig(epochs=1, batch_size=4, drop_last=True), seed=0,
                progress=False)
    with pytest.raises(ConfigError, match="student_distillation.training.drop_last: got 'yes'"):
        from_mapping(DistillConfig, {"drop_last": "yes"}, TRAINING_PREFIX)


def test_drop_last_resume_mid_epoch_replays_the_same_batches(tmp_path):
    config = DistillConfig(epochs=3, batch_size=2, lr=1e-2, lr_end=1e-3, checkpoint_every=1, drop_last=True)
    fresh = _copies()
    full_data = Recording(_dataset(7))
    full = fresh()
    expected = distill(full, full_data, config, seed=3, state_fn=_state, progress=False)

    first = Recording(SignalAt(_dataset(7), (1, 3), signal.SIGINT))
    with pytest.raises(TrainingInterrupted, match="epoch 2 after batch 2"):
        distill(fresh(), first, config, seed=3, checkpoint_dir=tmp_path, state_fn=_state, progress=False)
    second = Recording(_dataset(7))
    resumed = fresh()
    history = distill(resumed, second, DistillConfig(**{**config.__dict__, "resume": True}), seed=3,
                      checkpoint_dir=tmp_path, state_fn=_state, load_state_fn=_load, progress=False)
    assert history == expected
    for name, value in _state(full).items():
        assert torch.equal(value, _state(resumed)[name]), name
    # epoch 2: two batches before the stop, the third after the resume, the same partial batch left out
    assert first.epoch(1)[:4] + second.epoch(1) == full_data.epoch(1)
    assert second.epoch(2) == full_data.epoch(2) and len(full_data.epoch(1)) == 6


def _weights_after(config, n):
    torch.manual_seed(0)
    model = TinyDense()
    distill(model, _dataset(n), config, seed=5, progress=False)
    return _state(model)


def test_drop_last_two_process_ddp_matches_one_process():
    """9 images: one process with batch 4 trains on two full batches; two processes with 2 each (no padding with a
    repeated image) train on the very same global batches."""
    common = dict(epochs=2, lr=1e-2, lr_end=1e-3, accelerator="cpu", drop_last=True)
    single = _weights_after(DistillConfig(batch_size=4, **common), 9)
    ddp = _weights_after(DistillConfig(batch_size=2, devices=2, **common), 9)
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, atol=1e-6, rtol=1e-5)
    kept = _weights_after(DistillConfig(batch_size=4, **{**common, "drop_last": False}), 9)
    assert not torch.allclose(kept["proj.weight"], single["proj.weight"], atol=1e-6)   # the check is not vacuous


# --- snapshots ---------------------------------------------------------------------------------------------------

BACKBONE = {"arch": "timm:test_vit", "img_size": 32}
TRAINABLE = ["registers", "last_block"]


def _student():
    torch.manual_seed(0)
    student = build_backbone(BackboneConfig.from_dict({**BACKBONE, "head": "final_norm", "num_registers": 2, "student": True}))
    student.set_trainable(TRAINABLE)
    return student


def _pairs(student):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    with torch.no_grad():
        y = torch.randn(student(x).patch.shape, generator=gen)
    return Pairs(x, y)


def _config(student):
    weights = trainable_state_dict(student)
    return student_config(student.config, TRAINABLE, list(weights), teacher=teacher_backbone(BACKBONE, "final_norm"))


def test_snapshots_are_the_student_after_those_epochs_and_the_evaluation_loads_them(tmp_path):
    config = DistillConfig(epochs=11, batch_size=2, lr=1e-2, lr_end=1e-3, checkpoint_every=5, snapshot_every=10,
                           snapshot_epochs=(1,))
    assert config.snapshot_epoch_numbers() == [1, 10]
    student = _student()
    after: dict[int, dict] = {}
    snapshots = StudentSnapshots(tmp_path / "snapshots", _config(student))
    (tmp_path / "snapshots" / "epoch_007").mkdir(parents=True)   # a stale snapshot of an earlier run ...
    (tmp_path / "snapshots" / "epoch_007" / "config.json").write_text("{}")
    (tmp_path / "snapshots" / "epoch_007" / "weights.safetensors").write_bytes(b"")
    (tmp_path / "snapshots" / "notes.txt").write_text("kept")
    distill(student, _pairs(student), config, seed=0, checkpoint_dir=tmp_path / "ckpt", progress=False,
            snapshots=snapshots,
            on_epoch_end=lambda epoch, row: after.update({epoch + 1: trainable_state_dict(student)}))
    assert snapshots.epochs() == [1, 10]   # ... is removed by a run that starts from its first epoch
    assert (tmp_path / "snapshots" / "notes.txt").is_file()   # anything else is left alone
    for epoch in (1, 10):
        weights, saved = read_student(snapshots.path(epoch))
        assert saved["epoch"] == epoch and set(weights) == set(after[epoch])
        for name, value in after[epoch].items():
            assert torch.equal(weights[name], value), (epoch, name)
    assert not torch.equal(after[1]["registers"], after[10]["registers"])
    assert not torch.equal(after[10]["registers"], after[11]["registers"])

    # load_student reads a snapshot folder like the exported student
    x = torch.randn(1, 3, 32, 32)
    reference = _student()
    _load(reference, after[10])
    with torch.no_grad():
        assert torch.equal(load_student(snapshots.path(10))(x).patch, reference.eval()(x).patch)

    # the evaluation measures the snapshot that evaluation.student_snapshot names
    final_weights, final_config = trainable_state_dict(student), _config(student)
    index = snapshots.index()
    assert index["snapshots"] == {"1": snapshots.path(1).as_posix(), "10": snapshots.path(10).as_posix()}
    weights, chosen = select_student(final_weights, final_config, index, {"student_snapshot": 10})
    assert chosen["epoch"] == 10 and all(torch.equal(weights[k], v) for k, v in after[10].items())
    assert select_student(final_weights, final_config, index, {"student_snapshot": None}) == (final_weights,
                                                                                               final_config)
    with pytest.raises(ConfigError, match=r"evaluation.student_snapshot: got 30; allowed: null \(the final student\) "
                                          r"or the epoch of a saved snapshot: \[1, 10\]"):
        select_student(final_weights, final_config, index, {"student_snapshot": 30})


def test_resumed_run_keeps_and_rewrites_the_same_snapshots(tmp_path):
    config = DistillConfig(epochs=4, batch_size=2, lr=1e-2, lr_end=1e-3, checkpoint_every=1, snapshot_every=2,
                           snapshot_epochs=(1,))

    def run(folder, **kwargs):
        student = _student()
        snapshots = StudentSnapshots(folder / "snapshots", _config(student))
        distill(student, _pairs(student), kwargs.pop("config", config), seed=0, checkpoint_dir=folder / "ckpt",
                progress=False, snapshots=snapshots, **kwargs)
        return snapshots

    full = run(tmp_path / "full")

    class Crash(Exception):
        pass

    def crash(epoch, row):
        if epoch == 2:
            raise Crash

    with pytest.raises(Crash):
        run(tmp_path / "split", on_epoch_end=crash)
    resumed = run(tmp_path / "split", config=DistillConfig(**{**config.__dict__, "resume": True}))
    assert full.epochs() == resumed.epochs() == [1, 2, 4]
    for epoch in full.epochs():
        a, b = load_tensors(full.path(epoch) / "weights.safetensors"), load_tensors(
            resumed.path(epoch) / "weights.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), epoch


def test_snapshot_parameter_is_checked_before_training():
    params = load_config("paper_dinov2")
    params["data_preparation"]["source"] = "builtin:sample_photos"
    training = params["student_distillation"]["training"]
    for epochs, fine in ((30, True), (29, False)):
        changed = {**params, "student_distillation": {**params["student_distillation"],
                                                      "training": {**training, "epochs": epochs}}}
        if fine:
            validate_parameters(changed)
        else:   # a 29-epoch schedule never writes the epoch-30 snapshot that the evaluation names
            with pytest.raises(ConfigError, match=r"evaluation.student_snapshot: got 30; allowed: null \(the final "
                                                  r"student\) or an epoch the training keeps a snapshot of: \[1, 10, "
                                                  r"20\]"):
                validate_parameters(changed)
    with pytest.raises(ConfigError, match="snapshot_epochs: got \\[0\\]"):
        from_mapping(DistillConfig, {"snapshot_epochs": [0]}, TRAINING_PREFIX)
    with pytest.raises(ConfigError, match="snapshot_every: got 0"):
        from_mapping(DistillConfig, {"snapshot_every": 0}, TRAINING_PREFIX)


# --- the pipelines, paper-style: online targets, nothing held out, drop_last, a named snapshot ---------------------

def _paper_style_project(root: Path, snapshot: int) -> Path:
    files = {**TINY_OPEN_CLIP,
             "parameters_data_preparation.yml": TINY_OPEN_CLIP["parameters_data_preparation.yml"].replace(
                 "val_fraction: 0.4", "val_fraction: 0.0"),
             "parameters_teacher_denoising.yml": TINY_OPEN_CLIP["parameters_teacher_denoising.yml"] + "  mode: online\n",
             "parameters_student_distillation.yml": TINY_OPEN_CLIP["parameters_student_distillation.yml"]
             + "    drop_last: true\n    snapshot_every: 1\n  targets: online\n",
             "parameters_evaluation.yml": TINY_OPEN_CLIP["parameters_evaluation.yml"].replace(
                 "evaluation:\n", f"evaluation:\n  split: train\n  max_images: 3\n  student_snapshot: {snapshot}\n")}
    return make_project(root, files)


def test_paper_style_run_end_to_end(tmp_path, monkeypatch):
    from test_pipelines import run_session

    bad = _paper_style_project(tmp_path / "bad", snapshot=3)   # a 2-epoch run keeps no epoch-3 snapshot
    monkeypatch.chdir(bad)
    with pytest.raises(ConfigError, match="evaluation.student_snapshot: got 3"):
        run_session(bad, "__default__")
    assert not (bad / "data/02_intermediate/prepared_images").exists()   # nothing ran

    project = _paper_style_project(tmp_path / "project", snapshot=1)
    monkeypatch.chdir(project)
    run_session(project, "__default__")
    images = ShardReader(project / "data/02_intermediate/prepared_images")
    assert len(images) == 5 and images.indices(split="val") == []
    history = (project / "data/07_model_output/loss_history.csv").read_text().splitlines()
    header = history[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in history[1:]]
    assert [int(row["images"]) for row in rows] == [4, 4]   # 5 images, batches of 2: the fifth left out
    index = json.loads((project / "data/06_models/snapshots/index.json").read_text())
    assert sorted(index["snapshots"]) == ["1", "2"]
    snapshot_weights, _ = read_student(project / index["snapshots"]["1"])
    final = load_tensors(project / "data/06_models/student/weights.safetensors")
    assert any(not torch.equal(snapshot_weights[k], final[k]) for k in final)
    report = json.loads((project / "data/08_reporting/evaluation.json").read_text())
    assert report["split"] == "train" and report["images"] == 3 and report["student_snapshot"] == 1
    assert set(report["per_source"]) == {"teacher", "target", "student"}   # targets computed online here
    markdown = (project / "data/08_reporting/report.md").read_text()
    assert "images the student trained on" in markdown and "snapshot after epoch 1" in markdown
