"""Issue 12, point 7: the positional embedding is resized as the official code resizes it (``pos_embed_interp``).

Every expected table is computed here with ``F.interpolate`` from the original (pretrained) table, independently of
``ph_reg.models.pos_embed.resize_pos_embed``:

- CLIP (sinahmr/NACLIP ``clip/model.py``, 0raiser0/PH-Reg ``CLIP/models/augNaCLIP/model.py``): frozen models keep the
  14x14 table and resize it once per input with bicubic ``scale_factor = (side + 0.1) / 14``; 224 uses it unchanged.
- The released CLIP student (0raiser0/PH-Reg ``CLIP/zero_shot/models/student_CLIP.py``): 14 -> 28 at construction,
  then crops from its own (trained) 28x28 table with ``(side + 0.1) / 28``.
- DINOv2 (Hugging Face ``Dinov2Embeddings.interpolate_pos_encoding``, transformers >= 4.45): plain bicubic to the
  explicit size (no antialiasing) from the pretrained table, never resized at load time.
"""

from __future__ import annotations

import json

import huggingface_hub.constants
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from ph_reg.config import ConfigError
from ph_reg.params import backbone_params
from ph_reg.evaluation.zeroshot.run import head_model
from ph_reg.io.files import save_tensors
from ph_reg.models import BackboneConfig, build_backbone, resize_pos_embed, trainable_state_dict
from ph_reg.method.student import load_student, student_config, teacher_backbone

from conftest import PROJECT_ROOT

VIT_B16 = "open_clip:ViT-B-16"   # the paper's architecture (random weights): 224 px = 14x14 patches of 16
TINY_CLIP = "open_clip:ph-reg-tiny-ViT-16"   # 64 px = 4x4 patches of 16, width 64
TINY_TIMM = "timm:test_vit"   # pretrained grid 160 px = 10x10 patches of 16, width 64
SEED = 5
TRAINABLE = ["registers", "pos_embed", "patch_embed", "last_block"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def images(side: int, b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, side, side, generator=torch.Generator().manual_seed(seed))


def original_clip_table(arch: str, seed: int = SEED) -> torch.Tensor:
    """The open_clip vision tower's positional embedding as created (the "pretrained" table of seeded weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(arch.partition(":")[2])
    return model.visual.positional_embedding.detach().clone()


def plus_point_one(table: torch.Tensor, side: int) -> torch.Tensor:
    """NACLIP / StudentCLIP ``interpolate_pos_encoding`` on a square (1 + n * n, D) table, written out here."""
    n = round((table.shape[0] - 1) ** 0.5)
    grid = table[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), scale_factor=((side + 0.1) / n, (side + 0.1) / n), mode="bicubic",
                         align_corners=False, recompute_scale_factor=False)
    assert grid.shape[-2:] == (side, side)
    return torch.cat([table[:1], grid.permute(0, 2, 3, 1).reshape(side * side, -1)])


def to_size(table: torch.Tensor, side: int, antialias: bool = False) -> torch.Tensor:
    """Bicubic to an explicit size on a square (1, 1 + n * n, D) or (1 + n * n, D) table (Hugging Face's DINOv2 rule
    with antialias False; this project's earlier rule otherwise)."""
    flat = table.reshape(-1, table.shape[-1])
    n = round((flat.shape[0] - 1) ** 0.5)
    grid = flat[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(side, side), mode="bicubic", align_corners=False, antialias=antialias)
    out = torch.cat([flat[:1], grid.permute(0, 2, 3, 1).reshape(side * side, -1)])
    return out.reshape(*table.shape[:-2], -1, table.shape[-1])


# ---------------------------------------------------------------- CLIP: frozen heads and the teacher


def test_baseline_head_at_448_resizes_once_from_the_pretrained_14x14_table():
    base = BackboneConfig(arch=VIT_B16, img_size=448, head="naclip", init_seed=SEED, pos_embed_interp="official")
    model = head_model("naclip", base, student=None)   # the zero-shot harness's baseline model
    original = original_clip_table(VIT_B16)
    assert torch.equal(model.vit.positional_embedding, original)   # kept, not stored at 448
    for side in (28, 21):   # 448 px (the teacher's training input) and 336 px crops
        expected = plus_point_one(original, side)
        assert torch.equal(model.pos_embed((side, side)), expected), side
    # the rules this replaces give other tables: 14 -> 28 -> 21 and the explicit size
    double = to_size(to_size(original, 28), 21)
    assert not torch.allclose(plus_point_one(original, 21), double, atol=1e-4)
    assert not torch.allclose(plus_point_one(original, 21), to_size(original, 21), atol=1e-4)
    # 224 px crops (Cityscapes): the original table itself
    assert torch.equal(model.pos_embed((14, 14)), original)


def test_teacher_at_448_is_the_plus_point_one_resize_and_explicit_size_is_kept_as_an_option():
    teacher = build_backbone(teacher_backbone({"arch": VIT_B16, "img_size": 448, "init_seed": SEED,
                                               "pos_embed_interp": "official"}, "naclip"))
    original = original_clip_table(VIT_B16)
    assert not teacher.config.student
    assert torch.equal(teacher.pos_embed((28, 28)), plus_point_one(original, 28))
    legacy = build_backbone({"arch": VIT_B16, "img_size": 448, "init_seed": SEED, "head": "naclip",
                             "pos_embed_interp": "explicit_size"})
    assert torch.equal(legacy.vit.positional_embedding, to_size(original, 28))   # stored at 448
    torch.testing.assert_close(legacy.pos_embed((21, 21)), to_size(to_size(original, 28), 21))


@pytest.mark.parametrize("head", ["naclip", "maskclip", "sclip"])
@pytest.mark.parametrize("crop", [96, 64])   # 6x6 (the "336" of the 4x4 tiny model) and 4x4 (its "224")
def test_frozen_head_forward_adds_the_single_resize(head, crop):
    """The whole forward of a head built at 128 px (8x8) and run on ``crop`` equals the forward of the same weights
    whose table at the crop's grid is the expected one, set by hand."""
    base = BackboneConfig(arch=TINY_CLIP, img_size=128, head=head, init_seed=SEED, pos_embed_interp="official")
    model = head_model(head, base, student=None)
    side = crop // 16
    original = original_clip_table(TINY_CLIP)
    expected = original if side == 4 else plus_point_one(original, side)
    reference = build_backbone(BackboneConfig(arch=TINY_CLIP, img_size=crop, head=head, init_seed=SEED,
                                              pos_embed_interp="explicit_size")).eval()
    with torch.no_grad():
        reference.vit.positional_embedding.copy_(expected)   # used unchanged at its own grid
        x = images(crop)
        out, ref = model(x), reference(x)
    assert torch.equal(out.patch, ref.patch) and torch.equal(out.cls, ref.cls)


# ---------------------------------------------------------------- CLIP: the released student


def test_student_stores_28x28_and_resizes_crops_from_its_own_table():
    student = build_backbone(BackboneConfig.from_dict({"arch": VIT_B16, "img_size": 448, "init_seed": SEED,
                                                       "pos_embed_interp": "official", "head": "maskclip",
                                                       "num_registers": 16, "student": True}))
    original = original_clip_table(VIT_B16)
    stored = student.vit.positional_embedding
    assert student.config.student and stored.shape == (1 + 28 * 28, 768)
    assert torch.equal(stored, plus_point_one(original, 28))   # StudentCLIP.__init__: 14 -> 28
    assert student.pos_embed((28, 28)) is stored
    with torch.no_grad():   # a trained table: the crops must follow it, not the pretrained one
        stored.add_(0.05 * torch.randn(stored.shape, generator=torch.Generator().manual_seed(1)))
    trained = stored.detach().clone()
    for side in (21, 14):   # StudentCLIP.forward: every size but 448 from the 28x28 table, 224 included
        assert torch.equal(student.pos_embed((side, side)), plus_point_one(trained, side)), side
    assert not torch.allclose(student.pos_embed((21, 21)), plus_point_one(original, 21), atol=1e-3)


def _export(tmp_path, student) -> None:
    weights = trainable_state_dict(student)
    config = student_config(student.config, TRAINABLE, list(weights),
                            teacher=teacher_backbone({**student.config.to_dict()}, "naclip"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_tensors(tmp_path / "weights.safetensors", weights)


def test_exported_student_rebuilds_the_same_rule(tmp_path):
    student = build_backbone(BackboneConfig.from_dict({"arch": TINY_CLIP, "img_size": 128, "init_seed": SEED,
                                                       "pos_embed_interp": "official", "head": "maskclip",
                                                       "num_registers": 4, "student": True}))
    student.set_trainable(TRAINABLE)
    with torch.no_grad():
        student.vit.positional_embedding.add_(0.1)
    _export(tmp_path, student)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["backbone"]["pos_embed_interp"] == "official" and config["backbone"]["student"] is True
    assert config["teacher"]["pos_embed_interp"] == "official" and config["teacher"]["student"] is False
    loaded = load_student(tmp_path)
    trained = student.vit.positional_embedding.detach()
    assert torch.equal(loaded.vit.positional_embedding, trained)
    assert torch.equal(loaded.pos_embed((6, 6)), plus_point_one(trained, 6))
    x = images(96)
    with torch.no_grad():
        assert torch.equal(loaded(x).patch, student.eval()(x).patch)


def test_student_config_without_the_keys_loads_with_the_earlier_rule(tmp_path):
    """A config.json written before ``pos_embed_interp`` existed: the explicit-size rule, as it was trained."""
    student = build_backbone({"arch": TINY_CLIP, "img_size": 128, "init_seed": SEED, "head": "maskclip",
                              "num_registers": 4})
    student.set_trainable(TRAINABLE)
    _export(tmp_path, student)
    config = json.loads((tmp_path / "config.json").read_text())
    for section in ("backbone", "teacher"):
        del config[section]["pos_embed_interp"], config[section]["student"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_student(tmp_path)
    assert loaded.config.pos_embed_interp == "explicit_size"
    table = loaded.vit.positional_embedding.detach()
    assert torch.equal(table, to_size(original_clip_table(TINY_CLIP), 8))
    torch.testing.assert_close(loaded.pos_embed((6, 6)), to_size(table, 6))


# ---------------------------------------------------------------- timm (DINOv2) path


def _timm_checkpoint(tmp_path) -> tuple[str, torch.Tensor]:
    """A test_vit checkpoint at its pretrained 160 px (10x10) grid; (path, its positional embedding)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        ref = timm.create_model("test_vit")
    path = tmp_path / "test_vit.safetensors"
    save_file(ref.state_dict(), path)
    return str(path), ref.pos_embed.detach().clone()


def _timm_reference(model, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The timm forward from raw weights: patches, CLS, ``pos`` added, registers prepended, blocks, final norm."""
    vit = model.vit
    conv = vit.patch_embed.proj
    tokens = F.conv2d(x, conv.weight, conv.bias, stride=16).flatten(2).transpose(1, 2)
    tokens = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + pos
    tokens = torch.cat([model.registers.expand(x.shape[0], -1, -1), tokens], dim=1)
    tokens = vit.norm(vit.blocks(vit.norm_pre(tokens)))
    side = x.shape[-1] // 16
    return tokens[:, -side * side:].reshape(x.shape[0], side, side, -1)


@pytest.mark.parametrize("side", [64, 192])   # 4x4 (downsampling) and 12x12 (upsampling)
def test_timm_official_is_hugging_face_plain_bicubic_from_the_pretrained_table(tmp_path, side):
    path, original = _timm_checkpoint(tmp_path)
    model = build_backbone({"arch": TINY_TIMM, "checkpoint": path, "img_size": 64, "num_registers": 2,
                            "pos_embed_interp": "official"}).eval()
    assert torch.equal(model.vit.pos_embed, original)   # no load-time resize, although img_size is 64
    grid = side // 16
    expected = to_size(original, grid)
    assert torch.equal(model.pos_embed((grid, grid)), expected)
    x = images(side)
    with torch.no_grad():
        torch.testing.assert_close(model(x).patch, _timm_reference(model, x, expected), rtol=1e-5, atol=1e-5)
        # the student (own trainable table) resizes the same way: Hugging Face keeps one table for both
        student = build_backbone(BackboneConfig.from_dict({"arch": TINY_TIMM, "checkpoint": path, "img_size": 64,
                                                           "pos_embed_interp": "official", "head": "final_norm",
                                                           "num_registers": 2, "student": True}))
        assert torch.equal(student.vit.pos_embed, original)
    if grid < 10:   # downsampling: timm's antialiased rule (explicit_size, kept as an option) differs
        assert not torch.allclose(expected, to_size(original, grid, antialias=True), atol=1e-4)


def test_timm_explicit_size_keeps_timms_antialiased_rule(tmp_path):
    path, original = _timm_checkpoint(tmp_path)
    model = build_backbone({"arch": TINY_TIMM, "checkpoint": path, "img_size": 64, "num_registers": 2,
                            "pos_embed_interp": "explicit_size"}).eval()
    stored = model.vit.pos_embed
    torch.testing.assert_close(stored, to_size(original, 4, antialias=True))   # timm's load-time resample
    torch.testing.assert_close(model.pos_embed((6, 6)), to_size(stored, 6, antialias=True))


# ---------------------------------------------------------------- function, validation and configuration


def test_resize_pos_embed_rules():
    table = torch.randn(1 + 16, 8, generator=torch.Generator().manual_seed(0))
    assert resize_pos_embed(table, (4, 4), (4, 4), scale_offset=0.1) is table
    torch.testing.assert_close(resize_pos_embed(table, (4, 4), (7, 7), scale_offset=0.1), plus_point_one(table, 7),
                               rtol=0, atol=0)
    torch.testing.assert_close(resize_pos_embed(table.unsqueeze(0), (4, 4), (7, 7)), to_size(table, 7).unsqueeze(0),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="antialias"):
        resize_pos_embed(table, (4, 4), (7, 7), scale_offset=0.1, antialias=True)


def test_validation_names_the_parameter():
    with pytest.raises(ConfigError, match="backbone.pos_embed_interp"):
        backbone_params({"arch": TINY_CLIP, "pos_embed_interp": "nearest"})
    with pytest.raises(ConfigError, match="backbone.student"):   # a role the pipelines set, not a user key
        backbone_params({"arch": TINY_CLIP, "student": True})
    with pytest.raises(ValueError, match="pos_embed_interp"):
        BackboneConfig(arch=TINY_CLIP, pos_embed_interp="bilinear")
    assert backbone_params({"arch": TINY_CLIP, "pos_embed_interp": "official"}).student is False


@pytest.mark.parametrize("env", ["base", "paper", "paper_dinov2"])
def test_configurations_use_the_official_rule(env):
    backbone = yaml.safe_load((PROJECT_ROOT / "conf" / env / "parameters.yml").read_text())["backbone"]
    assert backbone["pos_embed_interp"] == "official"
