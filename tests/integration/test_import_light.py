"""Loading the project's pipelines and catalog does not import torch (``kedro viz`` starts fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from conftest import PROJECT_ROOT

HEAVY_MODULES = ("torch", "lightning_fabric", "timm", "open_clip")

# runs in a fresh interpreter: this test process has already imported torch
SCRIPT = """
import json, sys
import yaml
import ph_reg.settings, ph_reg.pipeline_registry, ph_reg.kedro_datasets
from kedro.io import DataCatalog
from ph_reg.pipeline_registry import register_pipelines

pipelines = register_pipelines()
config = yaml.safe_load(open("conf/base/catalog.yml"))
catalog = DataCatalog.from_config(config)
# from_config builds datasets lazily: reading each entry instantiates its class
types = {name: type(catalog[name]).__module__ + "." + type(catalog[name]).__qualname__ for name in config}
print(json.dumps({"pipelines": sorted(pipelines), "types": types,
                  "heavy": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)}))
"""


def test_pipelines_and_catalog_do_not_import_torch():
    script = f"HEAVY = {HEAVY_MODULES!r}\n" + SCRIPT
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
                                              "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert "__default__" in out["pipelines"]
    catalog = yaml.safe_load((PROJECT_ROOT / "conf/base/catalog.yml").read_text())
    assert set(out["types"]) == set(catalog)
    for name, entry in catalog.items():
        if entry["type"].startswith("ph_reg."):
            assert out["types"][name] == entry["type"], name
    assert out["heavy"] == [], f"importing the pipelines or the catalog imported {out['heavy']}"

