"""Kedro hooks: the parameters checked before a run, per-node seeding and a provenance record for every run."""

from __future__ import annotations

import logging
import re
import subprocess
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

RUN_INFO_DIR = Path("data/run_info")
PARAMS_PREFIX = "params:"
ALL_PARAMETERS = "parameters"   # the Kedro input that hands a node every parameter
RECORDED_PACKAGES = ("ph-reg", "torch", "torchvision", "timm", "open_clip_torch", "lightning-fabric", "torchmetrics",
                     "safetensors", "kedro", "kedro-datasets", "dvc", "numpy", "pillow")
log = logging.getLogger(__name__)


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str | None]:
    versions = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _device() -> dict[str, Any]:
    import torch  # imported only when a run starts, so `kedro viz` stays fast

    info: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info.update(cuda_devices=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                    cuda_version=torch.version.cuda)
    return info


def parameter_sections(pipeline) -> list[str] | None:
    """The top-level parameter sections that the nodes of ``pipeline`` read (``params:<section>`` or
    ``params:<section>.<key>`` inputs); None when a node reads every parameter."""
    inputs = {name for node in pipeline.nodes for name in node.inputs}
    if ALL_PARAMETERS in inputs:
        return None
    return sorted({name[len(PARAMS_PREFIX):].split(".")[0] for name in inputs if name.startswith(PARAMS_PREFIX)})


def record_path(run_params: dict[str, Any]) -> Path:
    """``data/run_info/<pipelines>.json``, or ``<pipelines>@<nodes>.json`` for ``kedro run --nodes``, so that each DVC
    evaluation stage (one ``--nodes`` run each) keeps its own record."""
    pipelines = run_params.get("pipeline_names") or [run_params.get("pipeline_name") or "__default__"]
    name = "+".join(pipelines)
    if run_params.get("node_names"):
        name += "@" + "+".join(sorted(run_params["node_names"]))
    return RUN_INFO_DIR / f"{re.sub(r'[^A-Za-z0-9_.+@-]', '_', name)}.json"


def run_record(params: dict[str, Any], run_params: dict[str, Any]) -> dict[str, Any]:
    """What a run needs to be reproduced: commit, parameters, package versions, device."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "kedro_env": run_params.get("env"),
        "pipelines": run_params.get("pipeline_names") or [run_params.get("pipeline_name") or "__default__"],
        "runtime_params": run_params.get("runtime_params"),
        "parameters": params,
        "packages": _versions(),
        "device": _device(),
        "node_seconds": {},   # filled node by node (ProjectHooks.after_node_run)
    }


class ProjectHooks:
    """Validate the parameters before any node runs, seed Python, NumPy and torch before each node from
    ``(seed, node.name)``, and record every run.

    The validation covers every top-level key (a misspelt section is refused) and, whole, every section that the
    run's nodes read (``parameter_sections``; ``kedro run --nodes`` narrows it), so a mistake deep in ``evaluation``
    stops the run before anything is computed or overwritten. A node sees the same random state whether its pipeline
    runs alone or inside ``__default__``. The record goes to ``record_path`` (``data/run_info/<pipelines>.json``; not a
    DVC out: it holds a timestamp) and is rewritten as each node finishes with the wall time of every node so far
    (``node_seconds``, from a node's first input load to its last output save), which is also logged, one line per
    node.
    """

    def __init__(self) -> None:
        self.seed = 0
        self.params: dict[str, Any] = {}
        self.record: dict[str, Any] | None = None
        self.record_path: Path | None = None
        self.node_times: dict[str, list[float]] = {}   # node name: [start, end] (time.perf_counter)

    @hook_impl
    def after_context_created(self, context) -> None:
        self.params = dict(context.params)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline) -> None:
        from ph_reg.params import validate_parameters
        from ph_reg.io.files import write_json

        validate_parameters(self.params, parameter_sections(pipeline))   # before any node runs
        self.seed = self.params.get("seed", 0)
        self.node_times = {}
        self.record, self.record_path = run_record(self.params, run_params), record_path(run_params)
        write_json(self.record_path, self.record)
        log.info("run record written to %s (commit %s)", self.record_path, self.record["git_commit"])

    @hook_impl
    def before_dataset_loaded(self, dataset_name: str, node) -> None:
        self._begin(node.name)

    @hook_impl
    def before_node_run(self, node) -> None:
        from ph_reg.runtime import derive_seed, seed_everything  # torch is imported when a run starts, not at startup

        seed_everything(derive_seed(self.seed, node.name))
        self._begin(node.name)   # a node without inputs begins here

    @hook_impl
    def after_node_run(self, node) -> None:
        self.node_times[node.name][1] = time.perf_counter()

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, node) -> None:
        self.node_times[node.name][1] = time.perf_counter()   # streamed outputs do their work while being saved

    @hook_impl
    def on_node_error(self, node) -> None:
        self.node_times[node.name][1] = time.perf_counter()   # the time until it failed

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._finish_nodes()

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._finish_nodes()

    def _begin(self, name: str) -> None:
        """A node's time runs from its first input load (or its start) to its last output save, so it includes the
        datasets that load lazily or save streamed outputs; the nodes begun before it are finished then."""
        if name not in self.node_times:
            self._finish_nodes()
            now = time.perf_counter()
            self.node_times[name] = [now, now]

    def _finish_nodes(self) -> None:
        """Log the wall time of every node not yet logged and write it into the run record."""
        from ph_reg.io.files import write_json

        done = self.record["node_seconds"] if self.record is not None else {}
        new = [name for name in self.node_times if name not in done]
        for name in new:
            start, end = self.node_times[name]
            done[name] = round(end - start, 3)
            log.info("node %s took %.1f s", name, end - start)
        if new and self.record is not None:
            write_json(self.record_path, self.record)
