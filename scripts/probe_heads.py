"""Synthetic segmentation probes of the embedded default's base model with the NACLIP head (the head of the
distillation target) beside the MaskCLIP head (the student's, and the probe table's teacher row), with and without
the planted artifacts, over 2 probe seeds. Run from the repository root: ``python scripts/probe_heads.py``.

It explains the planted-artifact benchmark's probe miss (README): the student is distilled towards NACLIP-head
features, which probe lower than MaskCLIP-head features on these random weights.
"""
import os
import statistics
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml  # noqa: E402

from ph_reg.evaluation.probes.run import probe_feature_streams, run_probes, write_probe_stores  # noqa: E402
from ph_reg.models import BackboneConfig, build_backbone, clean_copy  # noqa: E402

params = yaml.safe_load(open("conf/base/parameters.yml"))["backbone"]
params = {**params, "img_size": yaml.safe_load(open("conf/base/globals.yml"))["image_size"]}
tasks_all = yaml.safe_load(open("conf/base/parameters_evaluation.yml"))["evaluation"]["probes"]["tasks"]
tasks = {"segmentation": {"synthetic": tasks_all["segmentation"]["synthetic"]}}
models = {}
for head in ("naclip", "maskclip"):
    teacher = build_backbone(BackboneConfig.from_dict({**params, "head": head})).eval()
    models[f"teacher_{head}"] = teacher
    models[f"clean_{head}"] = clean_copy(teacher)
streams = probe_feature_streams(models, tasks, 0, feature_dtype="float16")
with tempfile.TemporaryDirectory() as tmp:
    stores = write_probe_stores(streams, tmp)
    rows = {}
    for seed in range(2):
        for model, r in run_probes(stores, tasks, seed).items():
            rows.setdefault(model, []).append(r["synthetic/mIoU"])
for model, vals in rows.items():
    print(f"{model}: mIoU {statistics.mean(vals):.2f} ({vals})")
