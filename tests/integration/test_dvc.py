"""DVC on a project copy that has what a fresh clone has (.gitignore, .dvcignore, .dvc/, the committed dvc.lock and
metrics, an empty conf/local), with tiny settings in conf/local as a user would put them:

- `dvc repro` runs every stage once, a second `dvc repro` finds everything up to date, `--force` reproduces every
  out bit for bit, and `dvc push` / `dvc pull` round-trip through the default remote of the committed .dvc/config;
- a plain `kedro run` leaves `dvc status` clean (the lock pins exactly what the run writes);
- one evaluation parameter re-runs only the stages that read it;
- a register sweep with `dvc exp run -S` keeps the metrics of every experiment (git holds the `cache: false` metrics).

One `dvc repro` (the module fixture) serves every test; each test works on its own copy of that project.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_ROOT, TINY_OPEN_CLIP, make_project

STAGES = ["data_preparation", "teacher_denoising", "student_distillation", "test_time_registers",
          "evaluation_artifacts", "evaluation_zero_shot", "evaluation_probe_features", "evaluation_probes", "evaluation_planted",
          "evaluation_summary"]
METRICS = ["data/08_reporting/evaluation.json", "data/08_reporting/zero_shot.json", "data/08_reporting/probes.json",
           "data/08_reporting/planted_artifacts.json", "data/08_reporting/summary.json"]
# what a fresh clone holds besides the code and the configuration (taken from git, so a committed dvc.lock and
# committed metrics come along as soon as they exist)
CLONE_PATHS = [".gitignore", ".dvcignore", ".dvc", "dvc.lock", "data", "conf/local"]
REGISTERS = "conf/base/parameters_student_distillation.yml:student_distillation.num_registers"
OUTLIER_K = "conf/base/parameters_evaluation.yml:evaluation.outlier_k"


def _run(args, cwd, timeout=900):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_DAEMON": "0", "KEDRO_DISABLE_TELEMETRY": "1",
           "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(result):
    assert result.returncode == 0, (result.args, result.stdout[-3000:], result.stderr[-3000:])
    return result


def make_clone(root: Path) -> Path:
    """The project as `git clone` gives it, a git repository with one commit, plus tiny settings in conf/local."""
    project = make_project(root, TINY_OPEN_CLIP, env="tiny", copy_src=True)
    listed = _ok(_run(["git", "ls-files", "-z", "--", *CLONE_PATHS], PROJECT_ROOT)).stdout.split("\0")
    for name in filter(None, listed):
        if (PROJECT_ROOT / name).is_file():   # the working tree's version, as for the code and dvc.yaml
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, project / name)
    assert (project / ".dvc/config").is_file() and (project / ".gitignore").is_file()
    for settings in (project / "conf/tiny").iterdir():   # conf/local is git-ignored: the user's own settings
        settings.rename(project / "conf/local" / settings.name)
    (project / "conf/tiny").rmdir()
    _ok(_run(["git", "init", "-q"], project))
    _ok(_run(["git", "add", "-A"], project))
    _ok(_run(["git", "commit", "-qm", "clone"], project))
    assert not _ok(_run(["git", "ls-files", "conf/local/parameters.yml"], project)).stdout  # not committed
    return project


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """A clone after one `dvc repro`, committed as the baseline (dvc.lock and the metrics included): its folder
    and the output of that `dvc repro`."""
    project = make_clone(tmp_path_factory.mktemp("dvc") / "project")
    first = _ok(_run(["dvc", "repro"], project))
    _ok(_run(["git", "add", "-A"], project))
    _ok(_run(["git", "commit", "-qm", "baseline"], project))
    return project, first.stdout


def _copy(project: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "project"
    shutil.copytree(project, copy, symlinks=True, ignore=lambda folder, names: ["tmp"] if folder.endswith(".dvc")
                    else [])
    return copy


def test_dvc_repro_twice(reproduced, tmp_path):
    project, first = reproduced
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first, stage
    project = _copy(project, tmp_path)
    assert (project / "dvc.lock").is_file()
    committed = _ok(_run(["git", "ls-files", "data"], project)).stdout.split()
    # the baseline commit holds the metrics (and the folders' .gitkeep), never the outs DVC caches
    assert [name for name in committed if not name.endswith("/.gitkeep")] == sorted(METRICS), committed
    second = _ok(_run(["dvc", "repro"], project))
    assert "Running stage" not in second.stdout
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout, second.stdout
    metrics = _ok(_run(["dvc", "metrics", "show", "--json"], project))
    assert "per_source" in metrics.stdout

    # exact reruns: forcing every stage again gives the same hash for every out
    before = _out_hashes(project)
    _ok(_run(["dvc", "repro", "--force"], project))
    assert _out_hashes(project) == before

    # push to the default remote, drop the cache and the cached outs, pull: every out comes back byte-identical
    remote = _default_remote(project)
    assert remote == tmp_path.resolve() / "ph-reg-dvc-remote", remote  # a sibling of the clone, inside tmp_path
    assert not remote.exists()
    cached = _cached_outs(project)
    assert "data/08_reporting/figures/feature_maps.png" in cached and "data/06_models/student" in cached
    files = _file_hashes(project, cached)
    assert any(name.endswith(".png") for name in files)
    _ok(_run(["dvc", "push"], project))
    assert any(p.is_file() for p in remote.rglob("*"))
    shutil.rmtree(project / ".dvc/cache")
    for out in cached:
        shutil.rmtree(project / out) if (project / out).is_dir() else (project / out).unlink()
    assert not any((project / out).exists() for out in cached)
    _ok(_run(["dvc", "pull"], project))
    assert _file_hashes(project, cached) == files
    assert _out_hashes(project) == before
    for args in (["dvc", "status", "-c", "--json"], ["dvc", "status", "--json"]):  # remote, then workspace
        status = _ok(_run(args, project))
        assert json.loads(status.stdout) == {}, (args, status.stdout, status.stderr)


def test_kedro_run_leaves_dvc_status_clean(reproduced, tmp_path):
    """A fresh clone has the committed dvc.lock but no outs; a plain `kedro run` (the README's run command) writes
    exactly what the lock records: `dvc status` then reports nothing, and git sees the metrics unchanged."""
    project = _copy(reproduced[0], tmp_path)
    for out in _cached_outs(project) + METRICS + ["data/06_models/checkpoints"]:   # as on a fresh clone
        shutil.rmtree(project / out) if (project / out).is_dir() else (project / out).unlink()
    _ok(_run(["git", "checkout", "--", *METRICS], project))
    status = json.loads(_ok(_run(["dvc", "status", "--json"], project)).stdout)
    # every stage with a cached out reports it missing (a stage whose outs are all metrics in git has none)
    assert set(status) == _stages_with_cached_outs(project), status
    # bytecode caches that the run (or any import) writes into the src/ deps are not part of them (.dvcignore)
    stale = project / "src/ph_reg/pipelines/evaluation/__pycache__/stale.cpython-311.pyc"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"not a dependency")
    _ok(_run(["kedro", "run"], project, timeout=1800))
    status = _ok(_run(["dvc", "status", "--json"], project))
    assert json.loads(status.stdout) == {}, status.stdout
    assert not _ok(_run(["git", "status", "--porcelain", "--", "data", "dvc.lock"], project)).stdout.strip()


def test_one_evaluation_parameter_reruns_only_the_stages_that_read_it(reproduced, tmp_path):
    project = _copy(reproduced[0], tmp_path)
    params = project / "conf/base/parameters_evaluation.yml"
    text = params.read_text()
    assert "  outlier_k: 3.5 " in text
    params.write_text(text.replace("  outlier_k: 3.5 ", "  outlier_k: 3.0 ", 1))
    status = json.loads(_ok(_run(["dvc", "status", "--json"], project)).stdout)
    assert set(status) == {"evaluation_artifacts", "evaluation_planted"}, status
    params.write_text(text)
    assert json.loads(_ok(_run(["dvc", "status", "--json"], project)).stdout) == {}
    # the README's command: only those two stages run
    experiment = _ok(_run(["dvc", "exp", "run", "-n", "k3", "-S", f"{OUTLIER_K}=3.0"], project))
    ran = [stage for stage in STAGES if f"Running stage '{stage}'" in experiment.stdout]
    # (and evaluation_summary, whose inputs are their metrics: it copies their headline numbers, in seconds)
    assert ran == ["evaluation_artifacts", "evaluation_planted", "evaluation_summary"], experiment.stdout
    diff = json.loads(_ok(_run(["dvc", "metrics", "diff", "HEAD", "k3", "--json"], project)).stdout)
    assert set(diff) <= {"data/08_reporting/evaluation.json", "data/08_reporting/planted_artifacts.json",
                         "data/08_reporting/summary.json"}, diff


def test_register_sweep_shows_the_metrics_of_every_experiment(reproduced, tmp_path):
    """The README's sweep: `dvc exp run -S` with two numbers of registers, then `dvc exp show` and `dvc metrics
    diff` have the metrics of the baseline commit and of both experiments (not `!`)."""
    project = _copy(reproduced[0], tmp_path)
    for registers in (0, 4):
        experiment = _ok(_run(["dvc", "exp", "run", "-n", f"regs{registers}", "-S", f"{REGISTERS}={registers}"],
                              project))
        assert "Running stage 'student_distillation'" in experiment.stdout
        assert "Running stage 'data_preparation'" not in experiment.stdout  # upstream stages are reused
    head = _ok(_run(["git", "rev-parse", "HEAD"], project)).stdout.strip()
    revisions = _revisions(json.loads(_ok(_run(["dvc", "exp", "show", "--json"], project)).stdout))
    assert {head, "regs0", "regs4"} <= set(revisions), sorted(revisions)
    values = {}
    for name in (head, "regs0", "regs4"):
        revision = revisions[name]
        assert not revision.get("error"), (name, revision.get("error"))
        metrics = revision["data"]["metrics"]
        for path in METRICS:
            assert path in metrics and metrics[path].get("data") and not metrics[path].get("error"), (name, path)
        registers = revision["data"]["params"]["conf/base/parameters_student_distillation.yml"]["data"]
        values[name] = (registers["student_distillation"]["num_registers"],
                        json.dumps(metrics["data/08_reporting/evaluation.json"]["data"], sort_keys=True))
    assert [values[name][0] for name in (head, "regs0", "regs4")] == [16, 0, 4]
    assert len({metrics for _, metrics in values.values()}) == 3   # three students, three sets of numbers
    diff = json.loads(_ok(_run(["dvc", "metrics", "diff", "HEAD", "regs0", "--all", "--json"], project)).stdout)
    for path in METRICS:
        entries = diff.get(path) or {}
        assert entries, (path, sorted(diff))
        assert all(entry.get("old") is not None and entry.get("new") is not None for entry in entries.values()), path


def _revisions(exp_show):
    """`dvc exp show --json`: the baseline commits (by sha) and the experiments (by name), each with its data."""
    revisions = {}
    for baseline in exp_show:
        if baseline.get("rev") != "workspace":
            revisions[baseline["rev"]] = baseline
        for experiment in baseline.get("experiments") or []:
            for revision in experiment.get("revs") or []:
                revisions[revision.get("name") or revision["rev"]] = revision
    return revisions


def _out_hashes(project):
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {out["path"]: out.get("md5") for stage in lock.values() for out in stage.get("outs", [])}


def _default_remote(project):
    """The folder of the remote `dvc push` uses by default, resolved as DVC resolves it."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return Path(repo.cloud.get_remote().path).resolve()


def _stages_with_cached_outs(project):
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]

    def cached(item):
        return not isinstance(item, dict) or (next(iter(item.values())) or {}).get("cache", True) is not False

    return {name for name, stage in stages.items()
            if any(cached(item) for key in ("outs", "metrics", "plots") for item in stage.get(key, []))}


def _cached_outs(project):
    """The outs, metrics and plots of dvc.yaml's stages that DVC caches (so push and pull move them)."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    entries = [item for stage in stages.values() for key in ("outs", "metrics", "plots") for item in stage.get(key, [])]
    items = [(item, {}) if isinstance(item, str) else next(iter(item.items())) for item in entries]
    return sorted(path for path, flags in items if (flags or {}).get("cache", True))


def _file_hashes(project, outs):
    files = [f for out in outs for f in ([project / out] if (project / out).is_file() else (project / out).rglob("*"))]
    return {f.relative_to(project).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}
