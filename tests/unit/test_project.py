"""The project's files agree with each other: dvc.yaml, the catalog, the pipelines, the configuration envs."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import yaml
from kedro.config import OmegaConfigLoader

from conftest import PROJECT_ROOT
from ph_reg.pipeline_registry import register_pipelines

COMPONENTS = ["data_preparation", "teacher_denoising", "student_distillation", "test_time_registers", "evaluation"]
# dvc.yaml: one stage per component, the evaluation split into its independent parts
STAGES = ["data_preparation", "teacher_denoising", "student_distillation", "test_time_registers",
          "evaluation_artifacts", "evaluation_zero_shot", "evaluation_probe_features", "evaluation_probes", "evaluation_planted",
          "evaluation_summary"]


def _catalog():
    return yaml.safe_load((PROJECT_ROOT / "conf/base/catalog.yml").read_text())


def _dvc_stages():
    return yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]


def _file_path(entry):
    return entry.get("path") or entry.get("filepath")


def _dvc_outs(stage):
    outs = []
    for key in ("outs", "metrics", "plots"):
        for item in stage.get(key, []):
            outs.append(item if isinstance(item, str) else next(iter(item)))
    return outs


def test_registry_has_components_and_composites():
    pipelines = register_pipelines()
    assert set(COMPONENTS) | {"distill", "__default__"} == set(pipelines)
    assert set(pipelines["distill"].nodes) == set(
        pipelines["data_preparation"].nodes + pipelines["teacher_denoising"].nodes
        + pipelines["student_distillation"].nodes)
    assert set(pipelines["__default__"].nodes) == set(pipelines["distill"].nodes + pipelines["test_time_registers"].nodes
                                                      + pipelines["evaluation"].nodes)


def _stage_pipeline(stage, pipelines):
    """The registered pipeline a dvc.yaml stage runs, and the part of it the stage runs (all, or its ``--nodes``)."""
    words = stage["cmd"].split()
    assert words[:2] == ["kedro", "run"] and "--env" in words, stage["cmd"]
    name = words[words.index("--pipelines") + 1]
    pipeline = pipelines[name]
    if "--nodes" in words:
        pipeline = pipeline.only_nodes(*words[words.index("--nodes") + 1].split(","))
    return name, pipeline


def test_dvc_stages_match_pipelines_and_catalog():
    dvc = _dvc_stages()
    catalog = _catalog()
    pipelines = register_pipelines()
    assert list(dvc) == STAGES
    ran = {}   # pipeline name -> the nodes its stages run (a node may run in several stages)
    for stage_name, stage in dvc.items():
        name, pipeline = _stage_pipeline(stage, pipelines)
        ran.setdefault(name, []).extend(pipeline.nodes)
        produced = {out for node in pipeline.nodes for out in node.outputs}  # intermediate outputs included
        written = {_file_path(catalog[d]) for d in produced if d in catalog and _file_path(catalog[d])}
        outs = set(_dvc_outs(stage))
        # every file the stage writes is a DVC out (a file inside a declared folder counts)
        for path in written:
            assert any(path == out or path.startswith(out.rstrip("/") + "/") for out in outs), (stage_name, path)
        # every DVC out is written by that stage
        for out in outs:
            assert any(p == out or p.startswith(out + "/") for p in written), (stage_name, out)
        # every input is a file the stage declares as a dep, or a parameter: a MemoryDataset (select_student's
        # evaluated_student_*) must come from a node of the same `kedro run`
        for dataset in pipeline.inputs():
            if dataset.startswith("params:") or dataset == "parameters":
                continue
            path = _file_path(catalog.get(dataset, {}))
            assert path, (stage_name, f"{dataset} is a MemoryDataset produced outside this stage")
            assert any(path == dep or path.startswith(dep + "/") for dep in stage["deps"]), (stage_name, path)
        params = [next(iter(p)) for p in stage.get("params", [])]
        if any(dataset.startswith("params:") for dataset in pipeline.inputs()):   # (evaluation_summary reads none)
            assert f"conf/base/parameters_{name}.yml" in params
        assert f"src/ph_reg/pipelines/{name}" in stage["deps"]
    # every node of every component runs in a stage, and each node that writes files in exactly one
    assert set(ran) == set(COMPONENTS)
    for name, nodes in ran.items():
        assert set(nodes) == set(pipelines[name].nodes), name
        for node in set(nodes):
            if any(_file_path(catalog.get(out, {})) for out in node.outputs):
                assert nodes.count(node) == 1, (name, node.name)


def _lookup(tree, dotted):
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return KeyError
        tree = tree[key]
    return tree


def _leaves(tree, prefix):
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}.{key}")
    else:
        yield prefix


def test_evaluation_stages_track_every_evaluation_key():
    """The evaluation stages list single keys: each exists in conf/base, and every key of the evaluation section is
    tracked by some stage (a key no stage tracks would never re-run anything), except speed settings."""
    untracked = {"evaluation.probes.loader_workers"}   # DataLoader workers: no effect on the numbers
    tracked = set()
    for name, stage in _dvc_stages().items():
        for entry in stage.get("params", []):
            (path, keys), = entry.items()
            data = yaml.safe_load((PROJECT_ROOT / path).read_text())
            for key in keys or []:
                assert _lookup(data, key) is not KeyError, (name, path, key)
                if path == "conf/base/parameters_evaluation.yml":
                    tracked.add(key)
        if name.startswith("evaluation"):
            assert all(keys for entry in stage.get("params", []) for keys in entry.values()), name  # single keys
    evaluation = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_evaluation.yml").read_text())["evaluation"]
    for leaf in _leaves(evaluation, "evaluation"):
        covered = any(leaf == key or leaf.startswith(key + ".") for key in tracked)
        assert covered != (leaf in untracked), leaf


def test_git_holds_exactly_the_uncached_outs():
    """`cache: false` outs (the metrics) are committed to git, so that `dvc exp show` / `dvc metrics diff` have them
    for every commit and experiment; every cached out is git-ignored (DVC holds it)."""
    uncached, cached = [], []
    for stage in _dvc_stages().values():
        for key in ("outs", "metrics", "plots"):
            for item in stage.get(key, []):
                path, flags = (item, {}) if isinstance(item, str) else next(iter(item.items()))
                (cached if (flags or {}).get("cache", True) else uncached).append(path)
    assert uncached and cached
    for path in uncached:
        assert not _git_ignored(path), f".gitignore hides {path}, a `cache: false` out: git must hold it"
    for path in cached:
        inside = path if Path(path).suffix else f"{path}/some_file"   # a folder out: a file in it
        assert _git_ignored(inside), f"{path} is cached by DVC but not git-ignored"


def _git_ignored(path):
    result = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=PROJECT_ROOT,
                            capture_output=True, text=True)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def test_catalog_never_versions_dvc_tracked_data_and_torch_objects_are_assigned():
    for name, entry in _catalog().items():
        assert not entry.get("versioned"), name
        if entry["type"] == "MemoryDataset":
            assert entry.get("copy_mode") == "assign", name


def test_pins_and_no_telemetry():
    deps = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps
    assert all("==" in d for d in deps)
    assert yaml.safe_load((PROJECT_ROOT / ".telemetry").read_text()) == {"consent": False}
    assert "analytics = false" in (PROJECT_ROOT / ".dvc/config").read_text()


def _params(env):
    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), base_env="base", default_run_env=env,
                               merge_strategy={"parameters": "soft", "globals": "soft"})
    return loader["parameters"]


def test_paper_environments_override_single_keys():
    base = _params("local")
    assert base["backbone"]["pretrained"] is None and base["backbone"]["img_size"] == 224
    clip = _params("paper")
    assert base["backbone"]["implant"]["fraction"] > 0  # the embedded default plants artifacts ...
    assert clip["backbone"] == {**base["backbone"], "arch": "open_clip:ViT-B-16", "pretrained": "openai",
                                "img_size": 448, "implant": None}  # ... the paper's real weights have their own
    assert clip["student_distillation"]["training"]["epochs"] == 100
    assert clip["student_distillation"]["training"]["betas"] == [0.9, 0.999]  # kept from base by the soft merge
    assert clip["teacher_denoising"]["tta"]["n_views"] == 10
    dino = _params("paper_dinov2")
    assert dino["backbone"]["arch"] == "timm:vit_base_patch14_dinov2" and dino["backbone"]["img_size"] == 518
    assert dino["backbone"]["implant"] is None
    assert dino["student_distillation"]["training"]["lr"] == 1e-4
    assert dino["teacher_denoising"]["head"] == dino["student_distillation"]["head"] == "final_norm"
