"""The everyday workflow as the README describes it (issue 13, points 4 and 11): the test command on a machine
without chromium, the permissions of safetensors artifacts, dangling symbolic links among the images, and the log
line the README quotes for the counts of a data preparation."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import test_viz
from conftest import PROJECT_ROOT
from ph_reg.data.sources import SKIP_REPORT_NAME, iter_source_images
from ph_reg.io.shards import RecordStream, ShardReader
from ph_reg.io.files import save_tensors
from ph_reg.pipelines.data_preparation.nodes import prepare_images
from ph_reg.kedro_datasets import AtomicFileDataset, SafetensorsDataset, ShardStoreDataset

BROWSER_SKIP = "chromium and chromedriver not found on PATH"


# --- point 4: the test command without chromium ----------------------------------------------------------------

def test_browser_binaries_absent_skip_with_the_reason_or_fail_under_ci(tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(test_viz, "CHROMIUM", "chromium")
    monkeypatch.setattr(test_viz, "CHROMEDRIVER", "chromedriver")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=BROWSER_SKIP) as skipped:
        test_viz.browser_binaries()
    assert "apt-get install -y chromium chromium-driver" in str(skipped.value)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=BROWSER_SKIP + r".*CI=true requires them"):
        test_viz.browser_binaries()

    (empty / "chromium").write_text("#!/bin/sh\n")  # one present: only the other is named
    (empty / "chromium").chmod(0o755)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=r"^chromedriver not found on PATH"):
        test_viz.browser_binaries()
    (empty / "chromedriver").write_text("#!/bin/sh\n")
    (empty / "chromedriver").chmod(0o755)
    assert test_viz.browser_binaries() == (str(empty / "chromium"), str(empty / "chromedriver"))


FAKE_APT_GET = """#!/bin/sh
if read -r line; then input="$line"; else input="(none)"; fi
echo "apt-get $* | DEBIAN_FRONTEND=${DEBIAN_FRONTEND:-unset} | stdin=$input" >> "$APT_LOG"
exit "${APT_EXIT:-0}"
"""


def run_test_command(tmp_path: Path, *, uid: int, apt_exit: int = 0, ci: bool = False,
                     ) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``bash scripts/dev.sh test`` on the browser tests, on a PATH without chromium and chromedriver.

    ``id -u`` and ``apt-get`` are stand-ins (``apt-get`` records its calls and installs nothing); the virtual
    environment is this one, behind a fresh install stamp, so nothing is installed. Returns the result and the
    recorded ``apt-get`` calls.
    """
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    stamp = venv / ".ph-reg-installed"
    stamp.touch()
    newer = (PROJECT_ROOT / "pyproject.toml").stat().st_mtime + 60
    os.utime(stamp, (newer, newer))
    (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (bin_dir / "apt-get").write_text(FAKE_APT_GET)
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    for tool in ("python", "id", "apt-get"):
        folder = venv / "bin" if tool == "python" else bin_dir
        (folder / tool).chmod(0o755)
    apt_log = tmp_path / "apt.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("CI", "PH_REG_CHROMIUM", "PH_REG_CHROMEDRIVER", "DEBIAN_FRONTEND")}
    env.update(PATH=str(bin_dir), PH_REG_VENV=str(venv), APT_LOG=str(apt_log), APT_EXIT=str(apt_exit))
    if ci:
        env["CI"] = "true"
    result = subprocess.run(
        [shutil.which("bash"), "scripts/dev.sh", "test", "tests/integration/test_viz.py", "-m", "browser", "-p",
         "no:cacheprovider", f"--basetemp={tmp_path / 'inner'}"],
        cwd=PROJECT_ROOT, env=env, input="yes\n", capture_output=True, text=True, timeout=600)
    calls = apt_log.read_text().splitlines() if apt_log.exists() else []
    return result, calls


def test_test_command_as_root_installs_chromium_through_apt_then_skips_with_the_reason(tmp_path):
    result, calls = run_test_command(tmp_path, uid=0)
    output = result.stdout + result.stderr
    assert calls == [  # quiet, non-interactive, never reading the caller's stdin
        "apt-get update -qq | DEBIAN_FRONTEND=noninteractive | stdin=(none)",
        "apt-get install -y -qq chromium chromium-driver | DEBIAN_FRONTEND=noninteractive | stdin=(none)",
    ]
    assert "installing chromium and chromium-driver" in result.stderr
    assert result.returncode == 0, output[-3000:]  # the stand-in installed nothing: the two tests skip
    skips = re.findall(r"^SKIPPED \[1\] tests/integration/test_viz\.py:\d+: " + BROWSER_SKIP, result.stdout, re.MULTILINE)
    assert len(skips) == 2, output[-3000:]  # both browser tests, with the reason, in the -ra summary
    assert "apt-get install -y chromium chromium-driver" in result.stdout
    assert re.search(r"\b2 skipped\b", result.stdout), output[-3000:]


def test_test_command_without_root_does_not_call_apt_and_skips(tmp_path):
    result, calls = run_test_command(tmp_path, uid=1000)
    assert calls == []
    assert "chromium chromedriver not found and not root" in result.stderr
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert re.search(r"\b2 skipped\b", result.stdout)


def test_test_command_under_ci_fails_when_the_install_fails(tmp_path):
    result, calls = run_test_command(tmp_path, uid=0, apt_exit=100, ci=True)
    output = result.stdout + result.stderr
    assert len(calls) == 1 and calls[0].startswith("apt-get update")  # update failed: no install attempted
    assert "apt-get could not install chromium and chromium-driver" in result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "skipped" not in result.stdout
    assert re.search(r"\b2 errors?\b", result.stdout), output[-3000:]
    assert result.stdout.count("CI=true requires them") >= 2


# --- point 11a: safetensors artifacts keep the usual permissions -------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_safetensors_artifacts_get_the_mode_open_would_give(tmp_path, umask):
    previous = os.umask(umask)
    try:
        tensors = {"x": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
        save_tensors(tmp_path / "direct.safetensors", tensors)
        SafetensorsDataset(str(tmp_path / "dataset.safetensors")).save(tensors)
        ShardStoreDataset(str(tmp_path / "store"), records_per_shard=1).save(
            RecordStream([({"x": torch.zeros(2)}, {"name": "a"}), ({"x": torch.ones(2)}, {"name": "b"})]))
        AtomicFileDataset(str(tmp_path / "wrapped.json"), {"type": "json.JSONDataset"}).save({"a": 1})
    finally:
        os.umask(previous)
    written = [tmp_path / "direct.safetensors", tmp_path / "dataset.safetensors", tmp_path / "wrapped.json",
               *sorted((tmp_path / "store").iterdir())]
    assert len(written) == 6  # the store: two shards and the index
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, f"{path.name}: {oct(path.stat().st_mode)}"
    assert len(ShardReader(tmp_path / "store")) == 2


# --- point 11b: a dangling symbolic link among the images --------------------------------------------------------

def _images(folder: Path, count: int) -> None:
    folder.mkdir()
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")


def test_dangling_symlink_is_listed_in_skipped_images_with_the_reason(tmp_path):
    source = tmp_path / "images"
    _images(source, 2)
    (source / "gone.jpg").symlink_to(tmp_path / "moved-away.jpg")
    (source / "gone-notes").symlink_to(tmp_path / "moved-away.txt")  # no image extension: ignored, and listed
    store = tmp_path / "prepared"
    ShardStoreDataset(str(store)).save(
        prepare_images({"source": str(source), "image_size": 32, "min_side": 8, "records_per_shard": 2}, seed=0))
    report = json.loads((store / SKIP_REPORT_NAME).read_text())
    assert report["used"] == 2 and report["skipped_count"] == 1
    assert report["skipped"] == [{"name": "gone.jpg", "reason": f"dangling symbolic link: its target "
                                                                f"{tmp_path / 'moved-away.jpg'} does not exist"}]
    assert report["ignored_non_image_files"] == ["gone-notes"]
    assert len(ShardReader(store)) == 2

    with pytest.raises(ValueError, match=r"cannot use image 'gone.jpg' .*dangling symbolic link"):
        list(iter_source_images(str(source), on_error="raise"))


def test_a_folder_of_only_dangling_links_is_an_error_naming_them(tmp_path):
    source = tmp_path / "images"
    source.mkdir()
    (source / "a.png").symlink_to(tmp_path / "missing.png")
    stream = prepare_images({"source": str(source), "image_size": 32, "min_side": 8}, seed=0)
    with pytest.raises(ValueError, match=r"yielded no usable image .*a\.png: dangling symbolic link"):
        list(stream.records)


# --- point 11c: the README's log line with the counts ------------------------------------------------------------

def test_the_log_line_the_readme_quotes_gives_the_counts(tmp_path, caplog):
    readme = " ".join((PROJECT_ROOT / "README.md").read_text().split())
    quoted = re.search(r"The log line `(data preparation: [^`]+)` gives the counts", readme)
    assert quoted, "README: the sentence naming the data-preparation log line is gone"
    assert "last log line" not in readme
    pattern = re.escape(quoted.group(1)).replace("<n>", r"(\d+)").replace("<source>", "(.+)")
    source = tmp_path / "images"
    _images(source, 3)
    (source / "broken.png").write_bytes(b"\x89PNG garbage")
    (source / "notes.txt").write_text("x")
    with caplog.at_level("INFO", logger="ph_reg"):
        ShardStoreDataset(str(tmp_path / "prepared")).save(
            prepare_images({"source": str(source), "image_size": 32, "min_side": 8}, seed=0))
    lines = [m for m in (r.getMessage() for r in caplog.records) if re.match(pattern, m)]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    used, skipped, ignored, named = re.match(pattern, lines[0]).groups()
    assert (int(used), int(skipped), int(ignored)) == (3, 1, 1)
    assert named.startswith(str(source))
