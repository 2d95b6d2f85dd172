"""Shared fixtures: offline environment and a tiny copy of the Kedro project."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

for _name in ("HF_HUB_OFFLINE", "KEDRO_DISABLE_TELEMETRY", "DO_NOT_TRACK", "DVC_NO_ANALYTICS"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("DVC_DAEMON", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

PROJECT_ROOT = Path(__file__).resolve().parents[1]

TINY_OPEN_CLIP = {
    "globals.yml": "seed: 0\nimage_size: 64\n",
    "parameters.yml": "backbone:\n  arch: open_clip:ph-reg-tiny-ViT-16\n",
    "parameters_data_preparation.yml": (
        "data_preparation:\n  max_images: 5\n  crops_per_image: 1\n  val_fraction: 0.4\n  records_per_shard: 2\n"
    ),
    "parameters_teacher_denoising.yml": (
        "teacher_denoising:\n  batch_size: 2\n  max_images_per_forward: 4\n  records_per_shard: 2\n"
        "  tta:\n    n_views: 3\n"
    ),
    "parameters_student_distillation.yml": (
        "student_distillation:\n  training:\n    epochs: 2\n    batch_size: 2\n    checkpoint_every: 1\n"
    ),
    # the tiny CLIP (3 blocks, the implant's neuron at block 1): planted tokens' pre-norm norms >= 51 from block 1
    # on, every other token <= 12; neurons below the last block, which the CLIP dense heads replace
    "parameters_test_time_registers.yml": (
        "test_time_registers:\n  norm_threshold: 25.0\n  highest_layer: 1\n  top_k: 3\n  batch_size: 2\n"
    ),
    "parameters_evaluation.yml": """evaluation:
  figure_images: 2
  batch_size: 2
  zero_shot:
    heads: [naclip, maskclip_tta, ttr, ttr_maskclip, ph_reg]
    tta_views: 2
    benchmarks:
      synthetic:
        dataset: {type: synthetic, num_images: 2, image_size: 64, seed: 1, split: val}
        classes: dataset
        settings: {short_side: 64, crop: 48, stride: 16, batch_size: 4}
    figure: {benchmark: synthetic, images: 1, query: ball}
  probes:
    tasks:
      segmentation:
        synthetic:
          train: {type: synthetic, num_images: 4, image_size: 64, seed: 0, split: train}
          val: {type: synthetic, num_images: 2, image_size: 80, seed: 0, split: val}
          crop_size: 64
          stride: 32
          probe: {iterations: 5, batch_size: 2}
      depth:
        synthetic:
          train: {type: synthetic, num_images: 4, image_size: 64, seed: 0, split: train}
          val: {type: synthetic, num_images: 2, image_size: 80, seed: 0, split: val}
          crop_size: 64
          stride: 32
          probe: {iterations: 5, batch_size: 2}
""",
}

TINY_TIMM = {
    **TINY_OPEN_CLIP,
    "parameters.yml": "backbone:\n  arch: timm:test_vit\n",
    "parameters_teacher_denoising.yml": TINY_OPEN_CLIP["parameters_teacher_denoising.yml"] + "  head: final_norm\n",
    "parameters_evaluation.yml": TINY_OPEN_CLIP["parameters_evaluation.yml"].replace(
        "  probes:\n", "  probes:\n    teacher_head: final_norm\n"),
    "parameters_student_distillation.yml": TINY_OPEN_CLIP["parameters_student_distillation.yml"]
    + "  head: final_norm\n  num_registers: 4\n",
    # timm test_vit (6 blocks, the implant's neuron at block 3): planted tokens' norms >= 8.8, the others <= 3.7
    "parameters_test_time_registers.yml": (
        "test_time_registers:\n  norm_threshold: 6.0\n  highest_layer: 4\n  top_k: 3\n  batch_size: 2\n"
    ),
}


def make_project(root: Path, env_files: dict[str, str], env: str = "tiny", copy_src: bool = False) -> Path:
    """Copy the project's configuration into ``root`` and add a tiny configuration environment ``env``.

    ``copy_src`` copies ``src/`` too (DVC hashes it as a dependency); otherwise ``src/`` is empty and ``ph_reg`` is
    imported from the installed package.
    """
    root.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", ".telemetry", "dvc.yaml"):
        shutil.copy(PROJECT_ROOT / name, root / name)
    if copy_src:
        shutil.copytree(PROJECT_ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    else:
        (root / "src").mkdir()  # ph_reg itself is imported from the installed package
    shutil.copytree(PROJECT_ROOT / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    (root / "conf" / env).mkdir()
    for name, text in env_files.items():
        (root / "conf" / env / name).write_text(text)
    return root


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project", TINY_OPEN_CLIP)


# --- tests/pipelines/: each pipeline on a programmatic catalog ---------------------------------------------------
# Each pipeline on a programmatic catalog, as Kedro's starters test theirs: the project's own config loader and
# `catalog.yml` (file datasets under a temporary copy of the project), the parameters fed as `params:` datasets,
# and `SequentialRunner` with the project's hooks, without a KedroSession or a subprocess. The four pipelines run
# once per test session, each after the ones whose outputs it reads.



ORDER = ["data_preparation", "teacher_denoising", "student_distillation", "test_time_registers", "evaluation"]


def _feed(params: dict[str, Any], prefix: str = "params:") -> Iterator[tuple[str, Any]]:
    """``params:a``, ``params:a.b``, ... for every nested key, as a session feeds them."""
    for key, value in params.items():
        yield f"{prefix}{key}", value
        if isinstance(value, dict):
            yield from _feed(value, f"{prefix}{key}.")


class ProgrammaticProject:
    def __init__(self, root: Path):
        from kedro.framework.hooks import _create_hook_manager
        from kedro.io import DataCatalog, MemoryDataset

        from ph_reg import settings

        self.root = root
        loader = settings.CONFIG_LOADER_CLASS(conf_source=str(root / "conf"), env="tiny",
                                              **settings.CONFIG_LOADER_ARGS)
        self.params = loader["parameters"]
        self.catalog = DataCatalog.from_config(loader["catalog"])
        for name, value in _feed(self.params):
            self.catalog[name] = MemoryDataset(value, copy_mode="assign")
        self.hooks = _create_hook_manager()
        for hook in settings.HOOKS:
            self.hooks.register(hook)
        self.done: list[str] = []

    def run(self, name: str) -> None:
        """Run pipeline ``name`` (and, first, every pipeline before it that has not run)."""
        from kedro.runner import SequentialRunner

        from ph_reg.pipeline_registry import register_pipelines

        for earlier in ORDER[: ORDER.index(name) + 1]:
            if earlier not in self.done:
                SequentialRunner().run(register_pipelines()[earlier], self.catalog, hook_manager=self.hooks)
                self.done.append(earlier)


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Iterator[ProgrammaticProject]:
    root = make_project(tmp_path_factory.mktemp("programmatic") / "project", TINY_OPEN_CLIP)
    previous = os.getcwd()
    os.chdir(root)   # catalog.yml's file paths are relative to the project
    try:
        yield ProgrammaticProject(root)
    finally:
        os.chdir(previous)


@pytest.fixture(scope="module")
def base_params() -> dict[str, Any]:
    """The parameters of conf/base as Kedro resolves them (globals included); copy before changing them."""
    from kedro.config import OmegaConfigLoader

    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), base_env="base", default_run_env="local",
                               merge_strategy={"parameters": "soft", "globals": "soft"})
    return loader["parameters"]


INTEGRATION = PROJECT_ROOT / "tests" / "integration"


def pytest_collection_modifyitems(config, items):
    """Every test under tests/integration/ is `slow`: `pytest -m "not slow"` is the fast part (unit and pipeline
    tests)."""
    for item in items:
        if INTEGRATION in item.path.parents:
            item.add_marker(pytest.mark.slow)
