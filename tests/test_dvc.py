"""`dvc repro` runs every stage once, and a second `dvc repro` finds everything up to date; `dvc push` / `dvc pull`
round-trip through the default remote of the committed .dvc/config."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import yaml

from conftest import PROJECT_ROOT, TINY_OPEN_CLIP, make_project

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
    shutil.copy(PROJECT_ROOT / ".dvc/config", project / ".dvc/config")  # the committed config, with its default remote
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

    # push to the default remote, drop the cache and the cached outs, pull: every out comes back byte-identical
    remote = _default_remote(project)
    assert remote == tmp_path.resolve() / "ph-reg-dvc-remote", remote  # a sibling of the clone, inside tmp_path
    assert not remote.exists()
    cached = _cached_outs(project)
    assert "data/08_reporting/figures" in cached and "data/06_models/student" in cached
    files = _file_hashes(project, cached)
    assert any(name.endswith(".png") for name in files)
    pushed = _run(["dvc", "push"], project)
    assert pushed.returncode == 0, pushed.stdout[-3000:] + pushed.stderr[-3000:]
    assert any(p.is_file() for p in remote.rglob("*"))
    shutil.rmtree(project / ".dvc/cache")
    for out in cached:
        shutil.rmtree(project / out) if (project / out).is_dir() else (project / out).unlink()
    assert not any((project / out).exists() for out in cached)
    pulled = _run(["dvc", "pull"], project)
    assert pulled.returncode == 0, pulled.stdout[-3000:] + pulled.stderr[-3000:]
    assert _file_hashes(project, cached) == files
    assert _out_hashes(project) == before
    for args in (["dvc", "status", "-c", "--json"], ["dvc", "status", "--json"]):  # remote, then workspace
        status = _run(args, project)
        assert status.returncode == 0 and json.loads(status.stdout) == {}, (args, status.stdout, status.stderr)

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


def _default_remote(project):
    """The folder of the remote `dvc push` uses by default, resolved as DVC resolves it."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return Path(repo.cloud.get_remote().path).resolve()


def _cached_outs(project):
    """The outs, metrics and plots of dvc.yaml's stages that DVC caches (so push and pull move them)."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    entries = [item for stage in stages.values() for key in ("outs", "metrics", "plots") for item in stage.get(key, [])]
    items = [(item, {}) if isinstance(item, str) else next(iter(item.items())) for item in entries]
    return sorted(path for path, flags in items if (flags or {}).get("cache", True))


def _file_hashes(project, outs):
    files = [f for out in outs for f in ([project / out] if (project / out).is_file() else (project / out).rglob("*"))]
    return {f.relative_to(project).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}
