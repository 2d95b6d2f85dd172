"""Synthetic segmentation probe mIoU of every probed model (clean, teacher, student) over several probe seeds,
from the feature cache of the last ``kedro run`` (``data/05_model_input/probe_features``): how much of a
difference between rows is probe noise. Run from the project root after ``kedro run``:

    python scripts/probe_seeds.py [--seeds 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml  # noqa: E402

from ph_reg.evaluation.probes.run import run_probes  # noqa: E402
from ph_reg.io.shards import ShardReader  # noqa: E402

CACHE = Path("data/05_model_input/probe_features")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=4, help="probe seeds 0..N-1")
    args = parser.parse_args()
    if not CACHE.is_dir():
        raise SystemExit(f"{CACHE} does not exist: run `kedro run` (or the evaluation pipeline) first")
    stores = {str(p.parent.relative_to(CACHE)): ShardReader(p.parent) for p in CACHE.rglob("index.json")}
    tasks = yaml.safe_load(open("conf/base/parameters_evaluation.yml"))["evaluation"]["probes"]["tasks"]
    tasks = {"segmentation": {"synthetic": tasks["segmentation"]["synthetic"]}}
    rows: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        for model, result in run_probes(stores, tasks, seed).items():
            rows.setdefault(model, []).append(result["synthetic/mIoU"])
        print(f"seed {seed}: " + ", ".join(f"{m} {v[-1]:.2f}" for m, v in rows.items()), flush=True)
    for model, values in rows.items():
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        print(f"{model}: mIoU {statistics.mean(values):.2f} +- {spread:.2f} over {len(values)} probe seeds")


if __name__ == "__main__":
    main()
