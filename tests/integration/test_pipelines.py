"""Every Kedro pipeline end to end on a tiny configuration, through the session and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY_OPEN_CLIP, TINY_TIMM, make_project
from ph_reg.io.shards import ShardReader
from ph_reg.io.files import load_tensors
from ph_reg.method.student import load_student

COMPONENTS = ["data_preparation", "teacher_denoising", "student_distillation", "test_time_registers", "evaluation"]


def run_session(project, pipeline, env="tiny"):
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    with KedroSession.create(project_path=project, env=env) as session:
        session.run(pipeline_names=[pipeline])


@pytest.mark.parametrize("env_files", [TINY_OPEN_CLIP, TINY_TIMM], ids=["open_clip", "timm"])
def test_every_component_pipeline_end_to_end(tmp_path, monkeypatch, env_files):
    project = make_project(tmp_path / "project", env_files)
    monkeypatch.chdir(project)
    for name in COMPONENTS:
        run_session(project, name)

    images = ShardReader(project / "data/02_intermediate/prepared_images")
    assert len(images) == 5 and images[0]["image"].shape == (3, 64, 64)
    assert images.indices(split="val") and images.indices(split="train")
    targets = ShardReader(project / "data/04_feature/teacher_targets")
    assert len(targets) == 5 and targets[0]["target"].shape[:2] == (4, 4)
    assert targets.attrs["tta"]["n_views"] == 3
    neurons = json.loads((project / "data/04_feature/register_neurons.json").read_text())
    assert neurons["neurons"][0][:2] == neurons["detection"]["planted_neurons"][0]  # the implant's neuron, first

    student_dir = project / "data/06_models/student"
    config = json.loads((student_dir / "config.json").read_text())
    weights = load_tensors(student_dir / "weights.safetensors")
    assert set(weights) == set(config["trainable_parameters"])
    student = load_student(student_dir)
    assert student.config.num_registers == config["backbone"]["num_registers"]
    assert (project / "data/06_models/checkpoints/last.ckpt").is_file()
    history = (project / "data/07_model_output/loss_history.csv").read_text().splitlines()
    assert history[0].startswith("epoch") and len(history) == 3

    report = json.loads((project / "data/08_reporting/evaluation.json").read_text())
    assert report["random_weights"] is True
    assert set(report["per_source"]) == {"teacher", "target", "student"}
    assert report["images"] == len(images.indices(split="val"))
    assert "random weights" in (project / "data/08_reporting/report.md").read_text()
    assert (project / "data/08_reporting/figures/feature_maps.png").stat().st_size > 1000

    zero_shot = json.loads((project / "data/08_reporting/zero_shot.json").read_text())
    if env_files is TINY_OPEN_CLIP:
        assert set(zero_shot["results"]) == {"naclip", "maskclip_tta", "ttr", "ttr_maskclip", "ph_reg"}
        assert all(0.0 <= r["synthetic"] <= 100.0 for r in zero_shot["results"].values())
        assert "random weights" in (project / "data/08_reporting/zero_shot.md").read_text()
        assert (project / "data/08_reporting/zero_shot_figures/zero_shot_00.png").is_file()
    else:
        assert "open_clip" in zero_shot["skipped"]

    probes = json.loads((project / "data/08_reporting/probes.json").read_text())
    assert set(probes["results"]) == {"clean", "teacher", "student", "ttr"}  # clean: without the implant
    for row in probes["results"].values():
        assert {"synthetic/mIoU", "synthetic/mAcc", "synthetic/RMSE", "synthetic/AbsRel", "synthetic/delta1"} <= set(row)
        assert 0 <= row["synthetic/mIoU"] <= 100 and row["synthetic/RMSE"] > 0
    stores = sorted(p.parent.relative_to(project / "data/05_model_input/probe_features").as_posix()
                    for p in (project / "data/05_model_input/probe_features").rglob("index.json"))
    assert stores == sorted(f"{m}/{t}/synthetic/{s}" for m in ("clean", "student", "teacher", "ttr")
                            for t in ("depth", "segmentation") for s in ("train", "val"))
    assert "| teacher |" in (project / "data/08_reporting/probes.md").read_text()
    curves = sorted(p.name for p in (project / "data/08_reporting/probe_curves").iterdir())
    assert curves == sorted(f"{t}-synthetic-{m}.csv" for m in ("clean", "student", "teacher", "ttr")
                            for t in ("depth", "segmentation"))
    curve = (project / "data/08_reporting/probe_curves/depth-synthetic-student.csv").read_text().splitlines()
    assert curve[0] == "iteration,loss" and len(curve) == 1 + 5  # the tiny configuration: 5 probe iterations

    # the planted-artifact benchmark: the tiny configuration inherits the base implant
    planted = json.loads((project / "data/08_reporting/planted_artifacts.json").read_text())
    assert set(planted["sources"]) == {"clean", "teacher", "target", "student", "ttr", "both"}
    assert planted["images"] == len(images.indices(split="val")) and planted["planted_rate"] > 0
    assert planted["sources"]["teacher"]["norm"]["recall"] > planted["sources"]["clean"]["norm"]["recall"]
    assert planted["sources"]["clean"]["cosine"]["planted"] > planted["sources"]["teacher"]["cosine"]["planted"]
    assert planted["sources"]["student"]["probes"] == probes["results"]["student"]
    assert "teacher planted rate" in planted["targets"]
    assert "| teacher |" in (project / "data/08_reporting/planted_artifacts.md").read_text()
    assert (project / "data/08_reporting/figures/planted_artifacts.png").stat().st_size > 1000

    # the loaded student reproduces the features the evaluation measured
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.isfinite(student(x).patch).all()


def _kedro(project, *args):
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "kedro", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cli_distill_with_both_flag_spellings_is_reproducible(tiny_project):
    weights = []
    for flag in ("--pipeline=distill", "--pipelines=distill"):
        result = _kedro(tiny_project, "run", flag, "--env", "tiny")
        assert result.returncode == 0, result.stderr[-3000:]
        weights.append((tiny_project / "data/06_models/student/weights.safetensors").read_bytes())
    assert not (tiny_project / "data/08_reporting/evaluation.json").exists()  # distill excludes evaluation
    assert weights[0] == weights[1]  # same parameters and seed: bit-identical artifact


def test_registry_lists_the_pipelines(tiny_project):
    result = _kedro(tiny_project, "registry", "list")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in (*COMPONENTS, "distill", "__default__"):
        assert name in result.stdout


def test_online_target_mode_end_to_end(tmp_path, monkeypatch):
    files = {**TINY_OPEN_CLIP,
             "parameters_teacher_denoising.yml": TINY_OPEN_CLIP["parameters_teacher_denoising.yml"] + "  mode: online\n",
             "parameters_student_distillation.yml": TINY_OPEN_CLIP["parameters_student_distillation.yml"]
             + "  targets: online\n"}
    project = make_project(tmp_path / "project", files)
    monkeypatch.chdir(project)
    run_session(project, "distill")
    assert len(ShardReader(project / "data/04_feature/teacher_targets")) == 0  # no cached targets in online mode
    config = json.loads((project / "data/06_models/student/config.json").read_text())
    assert config["targets"] == "online"
    history = (project / "data/07_model_output/loss_history.csv").read_text().splitlines()
    assert len(history) == 3 and "nan" not in history[-1]


def test_run_record_and_alone_equals_inside_default(tmp_path, monkeypatch):
    """A pipeline run alone writes the same artifacts as inside __default__, and every run is recorded."""
    project = make_project(tmp_path / "project", TINY_OPEN_CLIP)
    monkeypatch.chdir(project)
    run_session(project, "__default__")
    outputs = ["data/02_intermediate/prepared_images", "data/04_feature/teacher_targets", "data/06_models/student",
               "data/08_reporting/evaluation.json", "data/08_reporting/probes.json", "data/08_reporting/zero_shot.json",
               "data/05_model_input/probe_features", "data/04_feature/register_neurons.json"]

    def digest():
        import hashlib

        result = {}
        for out in outputs:
            path = project / out
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            result[out] = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()
        return result

    together = digest()
    record = json.loads((project / "data/run_info/__default__.json").read_text())
    assert record["parameters"]["seed"] == 0 and record["packages"]["torch"] and "cuda_available" in record["device"]
    assert record["kedro_env"] == "tiny"
    assert {"prepare_images", "denoise_teacher", "train_student", "evaluate_zero_shot"} <= set(record["node_seconds"])
    for name in COMPONENTS:  # each alone, in order
        run_session(project, name)
    assert digest() == together
    assert (project / "data/run_info/evaluation.json").is_file()


def test_bad_parameter_fails_before_any_node_runs(tmp_path, monkeypatch):
    files = {**TINY_OPEN_CLIP, "parameters_student_distillation.yml":
             TINY_OPEN_CLIP["parameters_student_distillation.yml"].replace("batch_size: 2", "batch_size: 0")}
    project = make_project(tmp_path / "project", files)
    monkeypatch.chdir(project)
    with pytest.raises(ValueError, match="student_distillation.training.batch_size: got 0"):
        run_session(project, "distill")
    assert not (project / "data/02_intermediate/prepared_images").exists()  # data_preparation never started
