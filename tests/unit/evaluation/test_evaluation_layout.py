"""The evaluation's "one of each" helpers: one dense forward, one sliding window, one Markdown table renderer, one
dtype map, one probe training loop, one probe registry, and the published numbers in one module."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ph_reg import runtime
from ph_reg.evaluation.features import backbone_features, dense_features, forward_device
from ph_reg.evaluation.probes.fit import fit_probe
from ph_reg.evaluation.probes.run import PROBE_TASKS, PROBES
from ph_reg.evaluation.windows import sliding_windows, window_boxes
from ph_reg.reporting.tables import markdown_table

SRC = Path(__file__).resolve().parents[3] / "src" / "ph_reg"


def _sources(folder: Path) -> dict[Path, str]:
    return {path: path.read_text() for path in sorted(folder.rglob("*.py"))}


def test_no_inline_autocast_in_the_evaluation():
    """Autocast comes from ph_reg.runtime.autocast only (through evaluation.features)."""
    for path, text in _sources(SRC / "evaluation").items():
        assert "torch.autocast(" not in text and "nullcontext" not in text and "autocast_dtype" not in text, path


def test_one_markdown_table_renderer():
    """Only reporting/tables.py writes a Markdown table rule."""
    writers = [path for path, text in _sources(SRC).items() if re.search(r'"\|---', text)]
    assert writers == [SRC / "reporting" / "tables.py"]


def test_the_published_numbers_and_the_eigen_crop_are_defined_once():
    texts = _sources(SRC)
    for name in ("PUBLISHED_TABLE1", "PUBLISHED_TABLE2", "EIGEN_CROP"):
        defined = [path for path, text in texts.items() if re.search(rf"^{name}\b.*=", text, re.M)]
        assert len(defined) == 1, (name, defined)


def test_markdown_table_lines():
    assert markdown_table(["a", "b"], [["1", "2"], ["3", ""]]) == ["| a | b |", "|---|---|", "| 1 | 2 |",
                                                                   "| 3 |  |"]
    # a header without further columns keeps the reports' historical empty cell
    assert markdown_table(["model"], [["teacher"]]) == ["| model |  |", "|---|", "| teacher |  |"]


@pytest.mark.parametrize("height,width,crop,stride", [(64, 64, 64, 32), (70, 150, 48, 20), (33, 200, 32, 32)])
def test_window_boxes_are_the_product_of_the_one_axis_windows(height, width, crop, stride):
    boxes = window_boxes(height, width, crop, stride)
    rows, cols = sliding_windows(height, crop, stride), sliding_windows(width, crop, stride)
    assert boxes == [(top, left, bottom, right) for top, bottom in rows for left, right in cols]
    assert len(set(boxes)) == len(boxes)


def test_one_dtype_map():
    from ph_reg.evaluation.probes import cache
    from ph_reg.method import targets

    assert targets.DTYPES is runtime.DTYPES
    assert all(name in runtime.DTYPES for name in cache.FEATURE_DTYPES)


def test_the_probe_registry_names_the_tasks():
    assert PROBE_TASKS == ("segmentation", "depth") == tuple(PROBES)


class _Stand(nn.Module):
    """A stand-in backbone: 2x2 patch means of the input as (B, h, w, 3) features; records its mode and inputs."""

    patch_size = 2
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.modes: list[bool] = []

    def forward(self, images):
        self.modes.append(self.training)
        patch = nn.functional.avg_pool2d(images, 2).permute(0, 2, 3, 1) * self.scale
        return SimpleNamespace(patch=patch, cls=patch.mean((1, 2)))

    def forward_tokens(self, images, pre_norm=True):
        out = self(images)
        return SimpleNamespace(patch=out.patch * 2, cls=out.cls)


def test_dense_features_batches_normalises_and_runs_in_eval_mode():
    model = _Stand().train()
    pixels = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = dense_features(model, pixels, batch_size=5, normalise=True)
    assert model.modes == [False]
    assert torch.equal(dense_features(model, pixels, batch_size=2, normalise=True), whole)
    normalised = runtime.normalize(pixels, model.mean, model.std)
    assert torch.equal(dense_features(model, normalised, batch_size=3), whole)
    assert torch.equal(dense_features(model, normalised, pre_norm=True), whole * 2)
    assert whole.dtype == torch.float32 and whole.shape == (5, 2, 2, 3)


def test_backbone_features_cpu_dtype_and_parameterless_models():
    model = _Stand().eval()
    crops = torch.rand(2, 3, 4, 4) * 255
    patch, cls = backbone_features(model, crops)
    half, half_cls = backbone_features(model, crops, dtype=torch.float16)
    assert torch.equal(half, patch.to("cpu", torch.float16)) and torch.equal(half_cls, cls.to("cpu", torch.float16))
    assert forward_device(nn.Identity()) == torch.device("cpu")


def test_fit_probe_order_of_a_step():
    probe = nn.Linear(2, 1)
    calls: list[str] = []
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)

    def loss_at(t: int) -> torch.Tensor:
        calls.append(f"loss{t}")
        return probe(torch.ones(1, 2)).sum() * (t + 1)

    def before_step() -> None:
        assert all(p.grad is not None for p in probe.parameters())
        calls.append("clip")

    history: list[float] = []
    out = fit_probe(probe, optimizer, schedule, 2, loss_at, history, before_step=before_step,
                    after_iteration=lambda t: calls.append(f"after{t}"))
    assert out is probe and not probe.training
    assert calls == ["loss0", "clip", "after0", "loss1", "clip", "after1"]
    assert len(history) == 2
