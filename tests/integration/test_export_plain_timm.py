"""A distilled student used without ph-reg: ``python -m ph_reg export`` writes it, and a fresh interpreter that
never imports ph_reg loads it with plain ``timm.create_model`` and gets the student's dense features."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from ph_reg import load_student
from ph_reg.method.export import FINAL_NORM_SNIPPET, MASKCLIP_SNIPPET
from export_support import CLIP, TIMM, make_student

# runs in a fresh interpreter, outside the project: only timm, torch and safetensors
PLAIN_TIMM = """
import sys, timm, torch
from safetensors.torch import load_file, save_file
folder, images_file, out_file, snippet = sys.argv[1:5]
model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
out = {}
for name, images in load_file(images_file).items():
    scope = {"model": model, "images": images, "torch": torch}
    with torch.no_grad():
        exec(snippet, scope)
    out[name] = scope["dense"].contiguous()
save_file(out, out_file)
assert "ph_reg" not in sys.modules, "ph_reg was imported"
"""

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}


def run(args, cwd):
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.parametrize("backbone,head,registers,interp", [
    (TIMM, "final_norm", 0, "explicit_size"), (TIMM, "final_norm", 4, "explicit_size"),
    (TIMM, "final_norm", 4, "official"), (CLIP, "maskclip", 4, "official")])
def test_exported_student_in_plain_timm_without_ph_reg(tmp_path, backbone, head, registers, interp):
    folder = make_student(tmp_path / "student", backbone, head, registers, interp)
    student = load_student(folder)
    other = {"explicit_size": 96, "official": None}[interp]  # official: exported at 96 below
    sizes = {"train": (64, 64), "other": (96, 96)}
    images = {name: torch.randn(2, 3, *size) for name, size in sizes.items()}
    save_file(images, tmp_path / "images.safetensors")
    snippet = MASKCLIP_SNIPPET if head == "maskclip" else FINAL_NORM_SNIPPET
    exports = {"train": tmp_path / "timm"}
    run(["-m", "ph_reg", "export", str(folder), "--format", "timm", "--out", str(exports["train"])], tmp_path)
    if other is None:  # official resizing differs from timm's: export the table at the other resolution
        exports["other"] = tmp_path / "timm_96"
        run(["-m", "ph_reg", "export", str(folder), "--format", "timm", "--out", str(exports["other"]),
             "--img-size", "96"], tmp_path)
    for name, export in exports.items():
        out = tmp_path / f"dense_{name}.safetensors"
        run(["-c", PLAIN_TIMM, str(export), str(tmp_path / "images.safetensors"), str(out), snippet], tmp_path)
        dense = load_file(out)
        checked = ["train", "other"] if len(exports) == 1 else [name]
        for key in checked:
            with torch.no_grad():
                expected = student(images[key]).patch.flatten(1, 2)
            torch.testing.assert_close(dense[key], expected, rtol=1e-5, atol=1e-5)
