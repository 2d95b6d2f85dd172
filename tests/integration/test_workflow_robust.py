"""The everyday workflow (issue 13): a failed run keeps the last good stores, and the command line speaks plainly.

* A store (prepared images with their ``skipped_images.json``, teacher targets, the probe feature cache) is written
  into a hidden sibling folder and swapped in only when complete: a failed write leaves the previous store
  byte-identical, and an interrupted resumable write still resumes from its finished shards.
* Kedro resolves every node's annotations without importing torch (no "Could not extract type hints" warnings),
  and a user error ends ``kedro run`` with its one-line message, no traceback and a non-zero exit status, while a
  bug keeps its traceback.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from kedro.io import DatasetError
from PIL import Image

from conftest import PROJECT_ROOT, TINY_OPEN_CLIP, make_project
from ph_reg.cli import USER_ERRORS, one_line_user_errors, user_error
from ph_reg.config import ConfigError
from ph_reg.data.sources import SKIP_REPORT_NAME
from ph_reg.io.shards import RecordStream, ShardReader, write_stream
from ph_reg.pipelines.data_preparation.nodes import prepare_images
from ph_reg.kedro_datasets import ShardStoreCollectionDataset, ShardStoreDataset

TYPE_HINT_WARNING = "Could not extract type hints"


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _image_folder(folder: Path, good: int, broken: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"good{i}.png")
    for i in range(broken):
        # sorted after the good ones, so on_error: raise fails with finished shards in the new version
        (folder / f"z_broken{i}.jpg").write_bytes(b"not a jpeg at all")
    return folder


def _preparation(source: Path, on_error: str = "skip") -> dict:
    return {"source": str(source), "image_size": 32, "crops_per_image": 1, "val_fraction": 0.0, "min_side": 8,
            "on_error": on_error, "records_per_shard": 2}


# --- point 6: a failed write keeps the previous store ----------------------------------------------------------------

@pytest.mark.parametrize("case", ["empty folder, on_error raise", "only broken files, on_error skip",
                                  "only broken files, on_error raise", "a broken file, on_error raise"])
def test_failed_preparation_keeps_the_previous_store_and_its_skip_report(tmp_path, case):
    store = tmp_path / "data" / "prepared_images"
    dataset = ShardStoreDataset(str(store))
    dataset.save(prepare_images(_preparation(_image_folder(tmp_path / "good", good=3, broken=1)), seed=0))
    before = _snapshot(store)
    assert json.loads(before[SKIP_REPORT_NAME])["skipped_count"] == 1 and len(ShardReader(store)) == 3
    good, broken, on_error = {"empty folder, on_error raise": (0, 0, "raise"),
                              "only broken files, on_error skip": (0, 2, "skip"),
                              "only broken files, on_error raise": (0, 2, "raise"),
                              "a broken file, on_error raise": (4, 1, "raise")}[case]
    source = _image_folder(tmp_path / "next", good, broken)
    with pytest.raises(DatasetError, match="holds no images|yielded no usable image|cannot use image") as caught:
        dataset.save(prepare_images(_preparation(source, on_error), seed=0))
    assert user_error(caught.value) is not None  # reported in one line by `kedro run`
    assert _snapshot(store) == before  # the store and its skipped_images.json, byte for byte
    assert sorted(p.name for p in store.parent.iterdir()) == ["prepared_images"]  # no unfinished version left


def test_a_successful_preparation_replaces_store_and_report_together(tmp_path):
    store = tmp_path / "prepared_images"
    dataset = ShardStoreDataset(str(store))
    dataset.save(prepare_images(_preparation(_image_folder(tmp_path / "a", good=3, broken=1)), seed=0))
    dataset.save(prepare_images(_preparation(_image_folder(tmp_path / "b", good=5, broken=0)), seed=0))
    report = json.loads((store / SKIP_REPORT_NAME).read_text())
    assert report["skipped_count"] == 0 and report["used"] == 5 and len(ShardReader(store)) == 5
    assert sorted(p.name for p in store.iterdir()) == ["index.json", "shard-00000.safetensors",
                                                       "shard-00001.safetensors", "shard-00002.safetensors",
                                                       SKIP_REPORT_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "prepared_images"]


def _records(count: int, value: float = 0.0, fail_at: int | None = None):
    for i in range(count):
        if i == fail_at:
            raise RuntimeError(f"CUDA error at record {i}")
        yield {"x": torch.full((2,), value + i)}, {"i": i}


def test_failed_probe_feature_save_keeps_the_previous_collection(tmp_path):
    path = tmp_path / "probe_features"
    dataset = ShardStoreCollectionDataset(str(path), records_per_shard=2)
    dataset.save({"teacher/seg/val": RecordStream(_records(3)), "student/seg/val": RecordStream(_records(3, 10.0))})
    before = _snapshot(path)
    with pytest.raises(DatasetError, match="CUDA error at record 1"):
        dataset.save({"teacher/seg/val": RecordStream(_records(3, 5.0)),
                      "student/seg/val": RecordStream(_records(3, 7.0, fail_at=1))})
    assert _snapshot(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe_features"]
    dataset.save({"teacher/seg/val": RecordStream(_records(1, 5.0))})  # a success replaces the whole collection
    assert sorted(dataset.load()) == ["teacher/seg/val"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "probe_features"]


def test_interrupted_resumable_write_keeps_the_complete_store_and_resumes_from_its_shards(tmp_path):
    """The teacher-target case: a complete store from an earlier run, then a run with other targets that fails
    midway; the complete store stays readable and intact, and the next run computes only the missing records."""
    folder = tmp_path / "teacher_targets"
    write_stream(folder, RecordStream(_records(5), attrs={"seed": 1}, records_per_shard=2))
    before = _snapshot(folder)
    starts = []

    def records_from(start):
        starts.append(start)
        return ((t, m) for t, m in _records(5, 100.0) if m["i"] >= start)

    with pytest.raises(RuntimeError, match="record 3"):
        write_stream(folder, RecordStream(_records(5, 100.0, fail_at=3), attrs={"seed": 2}, records_per_shard=2,
                                          records_from=records_from))
    assert _snapshot(folder) == before and len(ShardReader(folder)) == 5
    staging = tmp_path / ".teacher_targets.partial"
    assert sorted(p.name for p in staging.iterdir()) == ["shard-00000.safetensors"]  # the finished shard, kept
    assert write_stream(folder, RecordStream(_records(5, 100.0), attrs={"seed": 2}, records_per_shard=2,
                                             records_from=records_from)) == 5
    assert starts == [2]  # records 0 and 1 were not computed again
    reader = ShardReader(folder)
    assert reader.attrs == {"seed": 2} and [float(reader[i]["x"][0]) for i in range(5)] == [100, 101, 102, 103, 104]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher_targets"]


def test_a_swap_killed_between_its_two_renames_is_undone_by_the_next_write(tmp_path):
    folder = tmp_path / "store"
    write_stream(folder, RecordStream(_records(3), records_per_shard=2))
    before = _snapshot(folder)
    os.replace(folder, tmp_path / ".store.replaced")  # killed after moving the old version aside
    with pytest.raises(RuntimeError, match="record 0"):
        write_stream(folder, RecordStream(_records(3, fail_at=0)))
    assert _snapshot(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_a_store_behind_a_symbolic_link_is_replaced_where_the_link_points(tmp_path):
    target = tmp_path / "big_disk" / "prepared_images"
    write_stream(target, RecordStream(_records(2)))
    link = tmp_path / "data" / "prepared_images"
    link.parent.mkdir()
    link.symlink_to(target, target_is_directory=True)
    write_stream(link, RecordStream(_records(4)))
    assert link.is_symlink() and len(ShardReader(link)) == 4 and len(ShardReader(target)) == 4
    assert sorted(p.name for p in target.parent.iterdir()) == ["prepared_images"]


# --- point 8: no type-hint warnings, user errors in one line ---------------------------------------------------------

NODE_HINTS = """
import json, logging, sys, typing
from ph_reg.pipeline_registry import register_pipelines
from kedro.validation.type_extractor import TypeExtractor

warnings = []
class Collect(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger("kedro.validation").addHandler(Collect(logging.WARNING))
pipelines = register_pipelines()
TypeExtractor(pipelines).extract_types_from_pipelines()
nodes = {n.func.__name__: n.func for p in pipelines.values() for n in p.nodes}
hints = {name: sorted(map(str, typing.get_type_hints(func).values())) for name, func in nodes.items()}
print(json.dumps({"warnings": warnings, "nodes": sorted(nodes), "hints": hints,
                  "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "open_clip"))}))
"""


def test_every_node_signature_resolves_without_importing_torch():
    result = subprocess.run([sys.executable, "-c", NODE_HINTS], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["warnings"] == [] and out["heavy"] == []
    assert {"prepare_images", "denoise_teacher", "train_student", "evaluate_probes"} <= set(out["nodes"])
    assert all(out["hints"][name] for name in out["nodes"]), out["hints"]  # every node is annotated and resolved


def _kedro(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "kedro", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error: ")]


def test_kedro_run_is_quiet_and_a_bad_parameter_reads_as_one_line(tmp_path):
    project = make_project(tmp_path / "project", TINY_OPEN_CLIP)
    # the default pipeline: Kedro reads the annotations of every node before the parameter check stops the run
    bad = _kedro(project, "run", "--env", "tiny", "--params", "student_distillation.training.batch_size=0")
    output = bad.stdout + bad.stderr
    assert bad.returncode == 1, output[-3000:]
    assert _error_lines(bad) == ["Error: invalid parameter student_distillation.training.batch_size: got 0; "
                                 "allowed: an integer >= 1"], output[-3000:]
    assert "Traceback" not in output and TYPE_HINT_WARNING not in output
    assert not (project / "data/02_intermediate/prepared_images").exists()  # no node ran


def test_kedro_run_keeps_the_prepared_store_when_the_next_preparation_fails(tmp_path):
    project = make_project(tmp_path / "project", TINY_OPEN_CLIP)
    store = project / "data/02_intermediate/prepared_images"
    good = _kedro(project, "run", "--env", "tiny", "--pipelines", "data_preparation")
    assert good.returncode == 0, good.stderr[-3000:]
    assert TYPE_HINT_WARNING not in good.stdout + good.stderr
    before = _snapshot(store)
    assert SKIP_REPORT_NAME in before
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = _kedro(project, "run", "--env", "tiny", "--pipelines", "data_preparation",
                    "--params", f"data_preparation.source={empty},data_preparation.on_error=raise")
    output = failed.stdout + failed.stderr
    assert failed.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert [line.split(" holds no images")[0] for line in _error_lines(failed)] == [
        f"Error: image source folder {empty}"], output[-3000:]
    assert _snapshot(store) == before
    assert sorted(p.name for p in store.parent.iterdir() if not p.name.startswith(".git")) == ["prepared_images"]


def test_only_user_errors_lose_their_traceback():
    def failing(error):
        @one_line_user_errors
        def command():
            raise error
        return command

    config_error = ConfigError("evaluation.outlier_k", -1, "a number > 0")
    try:
        raise DatasetError("Failed while saving data to dataset X.\nsee below") from config_error
    except DatasetError as wrapped:
        in_dataset = wrapped
    with pytest.raises(click.ClickException) as caught:
        failing(in_dataset)()
    assert caught.value.message == "invalid parameter evaluation.outlier_k: got -1; allowed: a number > 0"
    with pytest.raises(click.ClickException, match=r"^no such file: a\.png and b$"):
        failing(FileNotFoundError("no such file: a.png\n  and b"))()
    for bug in (KeyError("x"), ValueError("shapes do not match"), ZeroDivisionError()):
        with pytest.raises(type(bug)):
            failing(bug)()
    try:  # a dataset failing because of a bug stays a bug
        raise DatasetError("Failed while loading data") from TypeError("unsupported operand")
    except DatasetError as wrapped:
        assert user_error(wrapped) is None
    assert user_error(RuntimeError("wrapped")) is None


def test_every_listed_user_error_exists():
    for name in USER_ERRORS:
        module, _, qualname = name.rpartition(".")
        cls = getattr(importlib.import_module(module), qualname)
        assert isinstance(cls, type) and issubclass(cls, BaseException), name
