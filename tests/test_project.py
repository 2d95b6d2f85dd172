"""The project's files agree with each other: dvc.yaml, the catalog, the pipelines, the configuration envs."""

from __future__ import annotations

import tomllib

import yaml
from kedro.config import OmegaConfigLoader

from conftest import PROJECT_ROOT
from ph_reg.pipeline_registry import register_pipelines

COMPONENTS = ["data_preparation", "teacher_denoising", "student_distillation", "evaluation"]


def _catalog():
    return yaml.safe_load((PROJECT_ROOT / "conf/base/catalog.yml").read_text())


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
    assert set(pipelines["__default__"].nodes) == set(pipelines["distill"].nodes + pipelines["evaluation"].nodes)


def test_dvc_stages_match_pipelines_and_catalog():
    dvc = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    catalog = _catalog()
    pipelines = register_pipelines()
    assert list(dvc) == COMPONENTS
    for name in COMPONENTS:
        stage = dvc[name]
        assert stage["cmd"].endswith(f"--pipelines {name}") and "--env" in stage["cmd"]
        pipeline = pipelines[name]
        produced = {out for node in pipeline.nodes for out in node.outputs}  # intermediate outputs included
        written = {_file_path(catalog[d]) for d in produced if d in catalog and _file_path(catalog[d])}
        outs = set(_dvc_outs(stage))
        # every file the pipeline writes is a DVC out (a file inside a declared folder counts)
        for path in written:
            assert any(path == out or path.startswith(out.rstrip("/") + "/") for out in outs), (name, path)
        # every DVC out is written by that pipeline (or is its declared checkpoint folder)
        for out in outs:
            assert any(p == out or p.startswith(out + "/") for p in written) or out.endswith("checkpoints"), (name, out)
        # file inputs produced upstream are deps
        read = {_file_path(catalog[d]) for d in pipeline.inputs() if d in catalog and _file_path(catalog[d])}
        for path in read:
            assert any(path == dep or path.startswith(dep + "/") for dep in stage["deps"]), (name, path)
        params = [next(iter(p)) for p in stage["params"]]
        assert f"conf/base/parameters_{name}.yml" in params
        assert f"src/ph_reg/pipelines/{name}" in stage["deps"]


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
