"""Kedro hooks: the parameters checked before a run, per-node seeding and a provenance record for every run."""

from __future__ import annotations

import logging
import subprocess
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
    }


class ProjectHooks:
    """Validate the parameters before any node runs, seed Python, NumPy and torch before each node from
    ``(seed, node.name)``, and record every run.

    The validation covers every top-level key (a misspelt section is refused) and, whole, every section that the
    run's nodes read (``parameter_sections``; ``kedro run --nodes`` narrows it), so a mistake deep in ``evaluation``
    stops the run before anything is computed or overwritten. A node sees the same random state whether its pipeline
    runs alone or inside ``__default__``. The record goes to ``data/run_info/<pipelines>.json`` (not a DVC out: it
    holds a timestamp).
    """

    def __init__(self) -> None:
        self.seed = 0
        self.params: dict[str, Any] = {}

    @hook_impl
    def after_context_created(self, context) -> None:
        self.params = dict(context.params)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline) -> None:
        from ph_reg.params import validate_parameters
        from ph_reg.io.files import write_json

        validate_parameters(self.params, parameter_sections(pipeline))   # before any node runs
        self.seed = self.params.get("seed", 0)
        record = run_record(self.params, run_params)
        path = RUN_INFO_DIR / f"{'+'.join(record['pipelines'])}.json"
        write_json(path, record)
        log.info("run record written to %s (commit %s)", path, record["git_commit"])

    @hook_impl
    def before_node_run(self, node) -> None:
        from ph_reg.runtime import derive_seed, seed_everything  # torch is imported when a run starts, not at startup

        seed_everything(derive_seed(self.seed, node.name))
