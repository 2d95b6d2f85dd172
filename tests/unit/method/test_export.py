"""The student outside ph-reg: its timm form gives the student's dense features in a stock timm model, and a Hub
folder round-trips (ph_reg.method.export)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner

from ph_reg import load_student
from ph_reg.cli import cli
from ph_reg.method.export import (FINAL_NORM_SNIPPET, MASKCLIP_SNIPPET, from_pretrained, save_pretrained, to_timm,
                                  write_timm)
from ph_reg.models import clean_copy

from export_support import CLIP, TIMM, make_student

PROJECT_ROOT = Path(__file__).resolve().parents[3]
def dense_in_timm(model: torch.nn.Module, snippet: str, images: torch.Tensor) -> torch.Tensor:
    """The dense features of a stock timm model, read by the lines the README and model card show."""
    scope = {"model": model, "images": images, "torch": torch}
    with torch.no_grad():
        exec(snippet, scope)
    return scope["dense"]


def dense_in_ph_reg(student: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return student(images).patch.flatten(1, 2)


@pytest.mark.parametrize("registers", [0, 3])
@pytest.mark.parametrize("interp", ["official", "explicit_size"])
def test_timm_student_loads_in_stock_timm(tmp_path, registers, interp):
    student = load_student(make_student(tmp_path / "student", TIMM, "final_norm", registers, interp))
    export = to_timm(student)
    assert export.model_args["reg_tokens"] == registers and export.snippet == FINAL_NORM_SNIPPET
    write_timm(export, tmp_path / "timm")
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert model.num_prefix_tokens == 1 + registers
    train = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(dense_in_timm(model, FINAL_NORM_SNIPPET, train), dense_in_ph_reg(student, train),
                               rtol=1e-5, atol=1e-5)
    other = torch.randn(2, 3, 96, 80)
    if interp == "explicit_size":  # timm's own resize is ph-reg's rule here: one export serves every resolution
        torch.testing.assert_close(dense_in_timm(model, FINAL_NORM_SNIPPET, other),
                                   dense_in_ph_reg(student, other), rtol=1e-5, atol=1e-5)
    else:  # official resizes otherwise: not exact at other sizes, exact when exported at that resolution
        assert not torch.allclose(dense_in_timm(model, FINAL_NORM_SNIPPET, other), dense_in_ph_reg(student, other),
                                  atol=1e-3)
        square = torch.randn(2, 3, 96, 96)
        at_96 = to_timm(student, img_size=96).build()
        torch.testing.assert_close(dense_in_timm(at_96, FINAL_NORM_SNIPPET, square),
                                   dense_in_ph_reg(student, square), rtol=1e-5, atol=1e-5)


def test_timm_student_with_native_reg_tokens_keeps_their_order(tmp_path):
    """A base that already has reg tokens (as DINOv2-reg): ours go first, the native ones after them."""
    backbone = {**TIMM, "model_kwargs": {"reg_tokens": 2, "no_embed_class": True}}
    student = load_student(make_student(tmp_path / "student", backbone, "final_norm", 3))
    export = to_timm(student)
    assert export.model_args["reg_tokens"] == 5 and export.model_args["no_embed_class"] is True
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(dense_in_timm(export.build(), FINAL_NORM_SNIPPET, images),
                               dense_in_ph_reg(student, images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("registers", [0, 3])
def test_clip_student_maskclip_features_from_timm_clip_vit(tmp_path, registers):
    student = load_student(make_student(tmp_path / "student", CLIP, "maskclip", registers))
    export = to_timm(student)
    assert export.architecture == "vit_base_patch16_clip_224" and export.snippet == MASKCLIP_SNIPPET
    write_timm(export, tmp_path / "timm")
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    images = torch.randn(2, 3, 64, 64)
    expected = dense_in_ph_reg(student, images)
    torch.testing.assert_close(dense_in_timm(model, MASKCLIP_SNIPPET, images), expected, rtol=1e-5, atol=1e-5)
    # the stock forward is the vanilla head, not the student's: the snippet is needed
    assert not torch.allclose(model.head(model.forward_features(images)[:, model.num_prefix_tokens:]), expected,
                              atol=1e-3)
    other = torch.randn(2, 3, 96, 96)
    torch.testing.assert_close(dense_in_timm(to_timm(student, img_size=96).build(), MASKCLIP_SNIPPET, other),
                               dense_in_ph_reg(student, other), rtol=1e-5, atol=1e-5)


def test_implanted_student_exports_without_its_implant(tmp_path):
    implant = {"fraction": 0.1, "block": 0}
    student = load_student(make_student(tmp_path / "student", TIMM, "final_norm", 2, implant=implant))
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(dense_in_timm(to_timm(student).build(), FINAL_NORM_SNIPPET, images),
                               dense_in_ph_reg(clean_copy(student), images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone,head", [(TIMM, "final_norm"), (CLIP, "maskclip")])
def test_hub_folder_round_trips_and_names_its_settings(tmp_path, backbone, head):
    folder = make_student(tmp_path / "student", backbone, head, 3)
    metrics = {"planted": {"student_cos_planted": 0.84}}
    hub = save_pretrained(folder, tmp_path / "hub", metrics=metrics)
    assert sorted(p.name for p in hub.iterdir()) == ["README.md", "config.json", "model.safetensors", "ph_reg"]
    images = torch.randn(2, 3, 64, 64)
    student, loaded = load_student(folder), from_pretrained(hub)
    with torch.no_grad():
        assert torch.equal(student(images).patch, loaded(images).patch)
    timm_model = timm.create_model(f"local-dir:{hub}", pretrained=True).eval()
    snippet = MASKCLIP_SNIPPET if head == "maskclip" else FINAL_NORM_SNIPPET
    torch.testing.assert_close(dense_in_timm(timm_model, snippet, images), dense_in_ph_reg(student, images),
                               rtol=1e-5, atol=1e-5)
    card = (hub / "README.md").read_text()
    assert snippet.strip() in card and f'"arch": "{backbone["arch"]}"' in card and '"num_registers": 3' in card
    assert '"epochs": 3' in card and '"trainable_groups"' in card and '"student_cos_planted": 0.84' in card
    assert json.loads((hub / "config.json").read_text())["ph_reg"]["dense_head"] == head


def test_from_pretrained_reports_an_unreachable_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no-such-user/no-such-student"):
        from_pretrained("no-such-user/no-such-student")
    with pytest.raises(FileNotFoundError, match="not a ph-reg Hub folder"):
        from_pretrained(tmp_path)


def test_export_command(tmp_path):
    folder = make_student(tmp_path / "student", TIMM, "final_norm", 2)
    metrics = tmp_path / "summary.json"
    metrics.write_text(json.dumps({"probe_miou": 30.0}))
    runner = CliRunner()
    result = runner.invoke(cli, ["export", str(folder), "--format", "timm", "--out", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["config.json", "model.safetensors"]
    result = runner.invoke(cli, ["export", str(folder), "--out", str(tmp_path / "h"), "--metrics", str(metrics)])
    assert result.exit_code == 0, result.output
    assert '"probe_miou": 30.0' in (tmp_path / "h" / "README.md").read_text()
    result = runner.invoke(cli, ["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "missing" in result.output


def test_readme_shows_the_lines_the_tests_run():
    readme = (PROJECT_ROOT / "README.md").read_text()
    for snippet in (MASKCLIP_SNIPPET, FINAL_NORM_SNIPPET):
        for line in snippet.strip().splitlines():
            assert line in readme, line


def test_hub_node_leaves_the_student_and_the_rng_as_they_were(tmp_path):
    """The export node runs inside the default run: it must not move the RNG or the student it reads."""
    from ph_reg.method.student import read_student
    from ph_reg.pipelines.student_distillation.nodes import export_student_hub

    folder = make_student(tmp_path / "student", CLIP, "maskclip", 2)
    student, (weights, config) = load_student(folder), read_student(folder)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    export_student_hub(student, weights, config).write(tmp_path / "hub")
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    with torch.no_grad():
        images = torch.randn(1, 3, 64, 64)
        assert torch.equal(from_pretrained(tmp_path / "hub")(images).patch, student(images).patch)
