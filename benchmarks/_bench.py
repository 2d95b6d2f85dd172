"""Shared helpers of the benchmark scripts: offline environment, arguments, interleaved timing, reports.

Every benchmark times two (or more) variants *in the same run*: after warm-up, the variants are interleaved
(A B, then B A, ...) so that slow drifts of a busy machine hit both alike, and the medians are compared. Ratios
printed: the ratio of the medians and the median of the per-round ratios (more robust when the load changes).
"""

from __future__ import annotations

import os

for _key in ("HF_HUB_OFFLINE", "KEDRO_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
    os.environ.setdefault(_key, "1")

import argparse
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "src") not in sys.path:  # runnable without an editable install too
    sys.path.insert(0, str(REPO_ROOT / "src"))

# open_clip warns "No pretrained weights loaded" for every random-weight model; Lightning chats about devices
logging.disable(logging.WARNING)


def parser(description: str, repeats: int, warmup: int = 1) -> argparse.ArgumentParser:
    """An argument parser with ``--quick``, ``--repeats`` and ``--warmup`` (defaults given per script)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration (seconds)")
    p.add_argument("--repeats", type=int, default=repeats, help="timed rounds per variant (interleaved)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed rounds per variant before timing")
    return p


def header(title: str, settings: Mapping[str, object]) -> None:
    """Print what runs where: the title, the settings, torch threads and the machine load."""
    print(f"== {title}")
    print(f"   torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
          f"python {platform.python_version()}, load average {_load()}")
    for key, value in settings.items():
        print(f"   {key}: {value}")
    sys.stdout.flush()


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


class Timings:
    """Seconds per call of each variant, by wall clock and by this process's CPU time (all threads)."""

    def __init__(self, names: Sequence[str]):
        self.wall: dict[str, list[float]] = {name: [] for name in names}
        self.cpu: dict[str, list[float]] = {name: [] for name in names}

    def median(self, name: str, cpu: bool = False) -> float:
        return statistics.median((self.cpu if cpu else self.wall)[name])


def time_interleaved(variants: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                     verbose: bool = True) -> Timings:
    """Time each variant: ``warmup`` untimed rounds, then ``repeats`` timed rounds, the order reversed every
    other round (A B, B A, ...). Records wall-clock and process CPU seconds."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    timings = Timings(names)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            wall, cpu = time.perf_counter(), time.process_time()
            variants[name]()
            timings.cpu[name].append(time.process_time() - cpu)
            timings.wall[name].append(time.perf_counter() - wall)
        if verbose:
            print(f"   round {r + 1}/{repeats}: " + ", ".join(f"{n} {timings.wall[n][-1]:.3f} s" for n in names),
                  flush=True)
    return timings


def ratios(times: Mapping[str, Sequence[float]], numerator: str, denominator: str) -> tuple[float, float]:
    """(ratio of the medians, median of the per-round ratios) of two variants' times."""
    num, den = times[numerator], times[denominator]
    of_medians = statistics.median(num) / statistics.median(den)
    per_round = statistics.median(a / b for a, b in zip(num, den))
    return of_medians, per_round


def print_times(timings: Timings, per: Mapping[str, float] | None = None, unit: str = "call") -> None:
    """Median / min / max wall seconds and median CPU seconds per variant; ``per[name]`` divides (e.g. steps
    per call) to give a per-step time."""
    for name, values in timings.wall.items():
        div = (per or {}).get(name, 1.0)
        med, lo, hi = statistics.median(values) / div, min(values) / div, max(values) / div
        cpu = timings.median(name, cpu=True) / div
        print(f"   {name:>30}: median {med:9.4f} s/{unit} wall (min {lo:.4f}, max {hi:.4f}, n={len(values)}); "
              f"median {cpu:.4f} s/{unit} CPU", flush=True)


def print_ratio(label: str, timings: Timings, numerator: str, denominator: str, target: float | None = None,
                at_most: bool = True) -> float:
    """Print ``numerator / denominator`` (wall: ratio of medians and median per-round ratio; CPU: ratio of
    medians) against a target; return the wall ratio of medians."""
    of_medians, per_round = ratios(timings.wall, numerator, denominator)
    cpu_ratio, _ = ratios(timings.cpu, numerator, denominator)
    line = f"RATIO {label} = {of_medians:.4f}"
    if target is not None:
        ok = of_medians <= target if at_most else of_medians >= target
        line += f"  (target {'<=' if at_most else '>='} {target:.4f}: {'MET' if ok else 'NOT MET'})"
    print(line)
    print(f"      median of per-round wall ratios {per_round:.4f}; CPU-time ratio of medians {cpu_ratio:.4f}",
          flush=True)
    return of_medians


def footer(started: float) -> None:
    print(f"   done in {time.perf_counter() - started:.1f} s, load average now {_load()}", flush=True)
