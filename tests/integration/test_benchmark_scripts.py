"""The analysis scripts run end to end (smoke tests on their quick settings), so they cannot rot unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_artifact_ablation_quick_writes_the_report(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks/artifact_ablation.py"), "--quick", "--probes",
                    "--out", str(tmp_path)], check=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "report.json").read_text())
    arms = {f"student_r{r}_v{v}" for r in (0, 16) for v in (1, 10)}
    assert {"clean", "teacher", "target"} | arms == set(report["sources"])
    for name in arms | {"teacher"}:  # the probes ran through write_probe_stores for every probed model
        assert {"synthetic/mIoU", "synthetic/RMSE"} <= set(report["sources"][name]["probes"])
    assert report["targets"]["teacher planted rate"]["met"] is True
    assert "| student_r16_v10 |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "figure.png").stat().st_size > 1000
