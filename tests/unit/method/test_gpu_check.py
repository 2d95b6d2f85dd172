"""benchmarks/gpu_check.py: without CUDA it says so and exits 0 (the path CI runs); ``--smoke`` runs every part of
the check on the CPU with the tiny architecture, so the script cannot rot between GPU runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "gpu_check.py"


def _run(*args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "KEDRO_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_without_cuda_it_says_so_and_exits_0():
    done = _run()
    assert done.returncode == 0, done.stderr
    assert "no CUDA device here" in done.stdout and "nothing to measure" in done.stdout


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is the CPU stand-in of a GPU run")
def test_smoke_run_reaches_every_part():
    done = _run("--smoke", "--envs", "paper")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for part in ("TTA call (160 views)", "student step (16 images)", "real loop, cached, sync_every 1",
                 "real loop, cached, sync_every 8", "real loop, online, sync_every 8", "GPU hours"):
        assert part in out, (part, out)
    assert "FAILED" not in out, out
    assert out.count("host syncs in one step between reads: 0") == 2, out
