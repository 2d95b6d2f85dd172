"""The models package by concern: the timm helper that replaced our explicit-size resize is the same computation,
the family adapters, configs built with ``ph_reg.config.from_mapping``, and the derived ``num_registers``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ph_reg.config import ConfigError
from ph_reg.models import BackboneConfig, build_backbone, resize_pos_embed, trainable_state_dict
from ph_reg.models.factory import FAMILY_ADAPTERS, meta_backbone, patch_size
from ph_reg.models.implant import ImplantConfig

TINY_CLIP = "open_clip:ph-reg-tiny-ViT-16"
TINY_TIMM = "timm:test_vit"


def written_out_resize(pos_embed, old_grid, new_grid, num_prefix_tokens=1, antialias=False):
    """The explicit-size rule as this project wrote it before timm's ``resample_abs_pos_embed`` replaced it."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    table = pos_embed if pos_embed.ndim == 3 else pos_embed.unsqueeze(0)
    prefix, grid = table[:, :num_prefix_tokens], table[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=antialias)
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    out = torch.cat([prefix, grid], dim=1)
    return out if pos_embed.ndim == 3 else out[0]


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grids", [((14, 14), (21, 21)), ((14, 14), (28, 28)), ((37, 37), (16, 12)), ((8, 6), (3, 5))])
def test_timm_resample_equals_the_written_out_explicit_size_rule(antialias, prefix, dtype, grids):
    old, new = grids
    generator = torch.Generator().manual_seed(old[0] * 100 + new[1] + prefix)
    table = torch.randn(1, prefix + old[0] * old[1], 24, generator=generator).to(dtype)
    for pos in (table, table[0]):  # (1, N, D) as timm stores it, (N, D) as open_clip does
        ours = resize_pos_embed(pos, old, new, prefix, antialias=antialias)
        assert ours.dtype == pos.dtype and ours.shape == written_out_resize(pos, old, new, prefix).shape
        assert torch.equal(ours, written_out_resize(pos, old, new, prefix, antialias=antialias))


def test_timm_resample_has_the_same_gradient():
    table = torch.randn(1, 1 + 14 * 14, 16)
    a, b = table.clone().requires_grad_(True), table.clone().requires_grad_(True)
    weights = torch.randn(1, 1 + 21 * 21, 16)
    (resize_pos_embed(a, (14, 14), (21, 21)) * weights).sum().backward()
    (written_out_resize(b, (14, 14), (21, 21)) * weights).sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_unchanged_grid_returns_the_table_itself():
    table = torch.randn(1 + 16, 8)
    assert resize_pos_embed(table, (4, 4), (4, 4)) is table
    assert resize_pos_embed(table, (4, 4), (4, 4), scale_offset=0.1) is table


def test_family_adapters_answer_without_weights():
    assert set(FAMILY_ADAPTERS) == {"open_clip", "timm"}
    assert FAMILY_ADAPTERS["open_clip"].is_known("ph-reg-tiny-ViT-16")
    assert FAMILY_ADAPTERS["open_clip"].is_known("hf-hub:apple/DFN2B-CLIP-ViT-B-16")
    assert not FAMILY_ADAPTERS["open_clip"].is_known("not-a-model")
    assert FAMILY_ADAPTERS["timm"].is_known("test_vit") and FAMILY_ADAPTERS["timm"].is_known("test_vit.r160_in1k")
    assert FAMILY_ADAPTERS["timm"].pretrained_tags("test_vit.r160_in1k") is None  # the tag is in the name
    assert patch_size(BackboneConfig(arch=TINY_CLIP, img_size=64)) == 16
    assert patch_size(BackboneConfig(arch=TINY_TIMM, img_size=64)) == build_backbone(
        BackboneConfig(arch=TINY_TIMM, img_size=64)).patch_size
    assert patch_size(BackboneConfig(arch="open_clip:hf-hub:apple/DFN2B-CLIP-ViT-B-16")) is None
    for arch in (TINY_CLIP, TINY_TIMM):
        config = BackboneConfig(arch=arch, img_size=64, num_registers=2)
        meta, real = meta_backbone(config), build_backbone(config)
        shapes = {n: p.shape for n, p in meta.named_parameters() if not n.startswith("vit.head.")}  # timm: classifier
        assert shapes == {n: p.shape for n, p in real.named_parameters()}
        assert all(p.is_meta for p in meta.parameters())


def test_num_registers_is_derived_and_the_saved_keys_are_unchanged():
    config = BackboneConfig(arch=TINY_CLIP, img_size=64, num_registers=3)
    model = build_backbone(config)
    assert model.num_registers == 3 == model.config.num_registers
    model.set_trainable(["registers", "last_block"])
    keys = sorted(trainable_state_dict(model))
    assert keys[0] == "registers" and all(k.startswith("vit.") for k in keys[1:])
    assert "num_registers" not in dict(model.named_buffers())
    assert list(config.to_dict()) == ["arch", "pretrained", "checkpoint", "img_size", "head", "num_registers",
                                      "init_seed", "model_kwargs", "implant", "pos_embed_interp", "student"]


def test_configs_from_mapping_name_the_key():
    with pytest.raises(ConfigError, match=r"backbone\.bogus.*did you mean|backbone\.bogus"):
        BackboneConfig.from_dict({"arch": TINY_CLIP, "bogus": 1})
    with pytest.raises(ConfigError, match=r"student\.teacher\.img_sise.*did you mean 'img_size'"):
        BackboneConfig.from_dict({"arch": TINY_CLIP, "img_sise": 1}, "student.teacher")
    with pytest.raises(ConfigError, match=r"backbone\.num_registers.*>= 0"):
        BackboneConfig.from_dict({"arch": TINY_CLIP, "num_registers": -1})
    with pytest.raises(ConfigError, match=r"implant\.strenght"):
        ImplantConfig.from_dict({"strenght": 3})
    with pytest.raises(ConfigError, match="implant"):
        ImplantConfig.from_dict(5)
    base = BackboneConfig(arch=TINY_CLIP, img_size=64, implant={"seed": 1})
    assert dataclasses.replace(base, head="naclip", implant=None) == BackboneConfig.from_dict(
        {**base.to_dict(), "head": "naclip", "implant": None})
