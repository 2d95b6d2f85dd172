"""`dvc repro` runs every stage once, and a second `dvc repro` finds everything up to date."""

from __future__ import annotations

import os
import subprocess

import yaml

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

    # exact reruns: forcing every stage again gives the same hash for every out
    before = _out_hashes(project)
    forced = _run(["dvc", "repro", "--force"], project)
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert _out_hashes(project) == before

    # a sweep: an experiment with another number of registers, compared against the baseline
    git_env = ["-c", "user.name=test", "-c", "user.email=test@example.com"]
    assert _run(["git", "add", "-A"], project).returncode == 0
    assert _run(["git", *git_env, "commit", "-qm", "baseline"], project).returncode == 0
    experiment = _run(["dvc", "exp", "run", "-n", "regs0", "-S",
                       "conf/base/parameters_student_distillation.yml:student_distillation.num_registers=0"], project)
    assert experiment.returncode == 0, experiment.stdout[-3000:] + experiment.stderr[-3000:]
    assert "Running stage 'student_distillation'" in experiment.stdout
    assert "Running stage 'data_preparation'" not in experiment.stdout  # upstream stages are reused
    shown = _run(["dvc", "exp", "show", "--json"], project)
    assert shown.returncode == 0 and "regs0" in shown.stdout
    diff = _run(["dvc", "metrics", "diff", "HEAD", "regs0", "--json"], project)
    assert diff.returncode == 0 and "evaluation.json" in diff.stdout


def _out_hashes(project):
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {out["path"]: out.get("md5") for stage in lock.values() for out in stage.get("outs", [])
            if not out["path"].endswith("checkpoints")}
