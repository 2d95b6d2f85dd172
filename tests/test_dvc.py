"""`dvc repro` runs every stage once, and a second `dvc repro` finds everything up to date."""

from __future__ import annotations

import os
import subprocess

from conftest import TINY_OPEN_CLIP, make_project

STAGES = ["data_preparation", "teacher_denoising", "student_distillation", "evaluation"]


def _run(args, cwd):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_DAEMON": "0", "KEDRO_DISABLE_TELEMETRY": "1",
           "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_dvc_repro_twice(tmp_path):
    project = make_project(tmp_path / "project", TINY_OPEN_CLIP, copy_src=True)
    dvc_yaml = project / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace("kedro_env: local", "kedro_env: tiny"))
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        assert _run(args, project).returncode == 0
    first = _run(["dvc", "repro"], project)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout, stage
    assert (project / "dvc.lock").is_file()
    assert (project / "data/08_reporting/evaluation.json").is_file()
    second = _run(["dvc", "repro"], project)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Running stage" not in second.stdout
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout, second.stdout
    metrics = _run(["dvc", "metrics", "show", "--json"], project)
    assert metrics.returncode == 0 and "per_source" in metrics.stdout
