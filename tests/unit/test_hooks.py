"""The run record of ProjectHooks: one file per pipelines (+ nodes), and the wall time of every node, driven through
Kedro's own SequentialRunner so that the hooks fire in the real order (inputs loaded before the node starts, outputs
saved after it ends)."""

from __future__ import annotations

import json

from kedro.framework.hooks.manager import _create_hook_manager
from kedro.io import AbstractDataset, DataCatalog, MemoryDataset
from kedro.pipeline import Node, Pipeline
from kedro.runner import SequentialRunner

from ph_reg import hooks


class FakeClock:
    """``time.perf_counter`` that moves only when told, so the recorded node times are exact."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


class SlowDataset(AbstractDataset):
    """Loading costs ``load_s`` and saving ``save_s`` seconds of the fake clock (a lazy input, a streamed output)."""

    def __init__(self, clock: FakeClock, load_s: float = 0.0, save_s: float = 0.0) -> None:
        self.clock, self.load_s, self.save_s, self.data = clock, load_s, save_s, None

    def load(self):
        self.clock.now += self.load_s
        return self.data

    def save(self, data) -> None:
        self.clock.now += self.save_s
        self.data = data

    def _describe(self) -> dict:
        return {}


def _run(clock: FakeClock, run_params: dict) -> None:
    def first(seed):
        clock.now += 2.0
        return seed + 1

    def second(value):
        clock.now += 0.5
        return value * 2

    pipeline = Pipeline([Node(first, "params:seed", "middle", name="first"),
                         Node(second, "middle", "last", name="second")])
    catalog = DataCatalog({"params:seed": MemoryDataset(0), "middle": SlowDataset(clock, load_s=1.0, save_s=3.0),
                           "last": SlowDataset(clock, save_s=0.25)})
    project_hooks = hooks.ProjectHooks()
    project_hooks.params = {"seed": 0, "backbone": {"arch": "open_clip:ph-reg-tiny-ViT-16"}}
    manager = _create_hook_manager()
    manager.register(project_hooks)
    manager.hook.before_pipeline_run(run_params=run_params, pipeline=pipeline, catalog=catalog)
    SequentialRunner().run(pipeline, catalog, manager)
    manager.hook.after_pipeline_run(run_params=run_params, run_result={}, pipeline=pipeline, catalog=catalog)


def test_the_run_record_holds_every_node_time_from_first_load_to_last_save(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    clock = FakeClock()
    monkeypatch.setattr(hooks, "time", clock)
    caplog.set_level("INFO", logger=hooks.__name__)
    _run(clock, {"pipeline_names": ["distill"], "node_names": None})
    record = json.loads((tmp_path / "data/run_info/distill.json").read_text())
    # first: 2 s of work + 3 s saving its streamed output; second: 1 s loading its input + 0.5 s + 0.25 s saving
    assert record["node_seconds"] == {"first": 5.0, "second": 1.75}
    assert "node first took 5.0 s" in caplog.text and "node second took 1.8 s" in caplog.text


def test_each_nodes_run_keeps_its_own_record(tmp_path, monkeypatch):
    """DVC runs the evaluation as one `kedro run --nodes ...` per stage: each stage's record is its own file."""
    monkeypatch.chdir(tmp_path)
    clock = FakeClock()
    monkeypatch.setattr(hooks, "time", clock)
    _run(clock, {"pipeline_names": ["evaluation"], "node_names": ["second", "first"]})
    _run(clock, {"pipeline_names": ["evaluation"], "node_names": ["first"]})
    _run(clock, {"pipeline_names": None, "pipeline_name": None, "node_names": None})
    names = sorted(path.name for path in (tmp_path / "data/run_info").iterdir())
    assert names == ["__default__.json", "evaluation@first+second.json", "evaluation@first.json"]
    assert hooks.record_path({"pipeline_names": ["a", "b"], "node_names": ["x y"]}).name == "a+b@x_y.json"
