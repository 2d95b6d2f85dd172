"""Export and reuse: load_student and the merged state dict reproduce the training-time student exactly."""

import json

import pytest
import torch
from safetensors import safe_open

from ph_reg import load_student
from ph_reg.io.files import load_tensors, save_tensors, write_json
from ph_reg.models import BackboneConfig, build_backbone, trainable_state_dict
from ph_reg.method.student import export_merged, student_config, teacher_backbone


def _student_config(backbone, head):
    """A student with 4 registers on the backbone section ``backbone``."""
    return BackboneConfig.from_dict({**backbone, "head": head, "num_registers": 4, "student": True})


@pytest.mark.parametrize("backbone,head", [({"arch": "open_clip:ph-reg-tiny-ViT-16", "img_size": 64}, "maskclip"),
                                           ({"arch": "timm:test_vit", "img_size": 64}, "final_norm")])
def test_load_student_reproduces_trained_student(tmp_path, backbone, head):
    student = build_backbone(_student_config(backbone, head))
    student.set_trainable(["registers", "pos_embed", "patch_embed", "last_block"])
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(2, 3, 64, 64)
    student(x).patch.square().mean().backward()  # one training step moves the trainable weights
    optimizer.step()
    weights = trainable_state_dict(student)
    save_tensors(tmp_path / "weights.safetensors", weights)
    write_json(tmp_path / "config.json", student_config(student.config, ["registers", "pos_embed", "patch_embed",
                                                                          "last_block"], list(weights),
                                                        teacher=teacher_backbone(backbone, head)))
    loaded = load_student(tmp_path)
    student.eval()
    with torch.no_grad():
        expected, got = student(x), loaded(x)
    assert torch.equal(expected.patch, got.patch) and torch.equal(expected.cls, got.cls)
    assert got.patch.shape == (2, 4, 4, student.embed_dim)  # registers are not in the output
    fresh = build_backbone(_student_config(backbone, head)).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(x).patch, got.patch)  # the delta was really applied

    export_merged(tmp_path, tmp_path / "merged.safetensors")
    merged = load_tensors(tmp_path / "merged.safetensors")
    assert set(merged) == set(loaded.state_dict())
    rebuilt = build_backbone(_student_config(backbone, head)).eval()
    rebuilt.load_state_dict(merged)
    with torch.no_grad():
        assert torch.equal(rebuilt(x).patch, got.patch)
    with safe_open(str(tmp_path / "merged.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["ph_reg_student_config"])["backbone"]["num_registers"] == 4


def test_load_student_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_student(tmp_path)
