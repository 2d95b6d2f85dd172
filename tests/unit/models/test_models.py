"""Tests of ph_reg.models on tiny architectures (random weights, CPU)."""

from __future__ import annotations

import json
import math

import huggingface_hub.constants
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ph_reg.models import (
    DEFAULT_TRAINABLE,
    BackboneConfig,
    DenseOutput,
    WeightsUnavailableError,
    build_backbone,
    load_trainable_state_dict,
    naclip_omega,
    trainable_state_dict,
)

TINY_CLIP = "open_clip:ph-reg-tiny-ViT-16"  # width 64, 2 heads, 3 blocks, proj to 32
TINY_TIMM = "timm:test_vit"  # embed 64, depth 6
IMG = 64
M = 4


def clip_cfg(**kw) -> BackboneConfig:
    return BackboneConfig(**{"arch": TINY_CLIP, "img_size": IMG, "num_registers": M, **kw})


def timm_cfg(**kw) -> BackboneConfig:
    return BackboneConfig(**{"arch": TINY_TIMM, "img_size": IMG, "num_registers": M, **kw})


def images(h: int = IMG, w: int = IMG, b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """Never touch the network; an empty Hugging Face cache."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


# ---------------------------------------------------------------- config


def test_config_round_trip_and_validation():
    cfg = clip_cfg(head="naclip", init_seed=3, model_kwargs={"a": 1})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert BackboneConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="bogus"):
        BackboneConfig.from_dict({"arch": TINY_CLIP, "bogus": 1})
    with pytest.raises(ValueError, match="open_clip"):
        BackboneConfig(arch="keras:vit")
    with pytest.raises(ValueError, match="maskclip"):
        BackboneConfig(arch=TINY_CLIP, head="sclipp")
    with pytest.raises(ValueError, match="final_norm"):
        BackboneConfig(arch=TINY_TIMM, head="naclip")
    with pytest.raises(ValueError, match="mutually exclusive"):
        BackboneConfig(arch=TINY_CLIP, pretrained="openai", checkpoint="x.pt")
    with pytest.raises(ValueError, match="num_registers"):
        BackboneConfig(arch=TINY_CLIP, num_registers=-1)


def test_unknown_model_name_raises_value_error():
    with pytest.raises(ValueError, match="not-a-model"):
        build_backbone({"arch": "open_clip:not-a-model"})
    with pytest.raises(ValueError, match="not_a_model"):
        build_backbone({"arch": "timm:not_a_model"})


# ---------------------------------------------------------------- shapes, registers


@pytest.mark.parametrize("cfg, dim", [(clip_cfg(), 32), (clip_cfg(head="maskclip"), 32),
                                      (clip_cfg(head="naclip"), 32), (timm_cfg(), 64)])
def test_output_shapes(cfg, dim):
    model = build_backbone(cfg)
    out = model(images(64, 96))
    assert isinstance(out, DenseOutput)
    assert out.patch.shape == (2, 4, 6, dim) and out.cls.shape == (2, dim)
    assert model.embed_dim == dim and model.patch_size == 16
    assert model.registers.shape == (M, 64)
    assert torch.isfinite(out.patch).all()
    with pytest.raises(ValueError, match="divisible"):
        model(images(64, 70))


def test_fill_value_is_white_in_model_normalisation():
    clip, vit = build_backbone(clip_cfg()), build_backbone(timm_cfg())
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    torch.testing.assert_close(clip.fill_value(), (1 - mean) / std)
    torch.testing.assert_close(vit.fill_value(), torch.ones(3))  # test_vit normalises with mean = std = 0.5


def test_registers_init_scale_and_seed():
    a, b, c = build_backbone(clip_cfg()), build_backbone(clip_cfg()), build_backbone(clip_cfg(init_seed=1))
    torch.testing.assert_close(a.registers, b.registers, rtol=0, atol=0)
    assert not torch.equal(a.registers, c.registers)
    expected = torch.randn(M, 64, generator=torch.Generator().manual_seed(0)) / 8.0
    torch.testing.assert_close(a.registers.detach(), expected)


@pytest.mark.parametrize("cfg", [clip_cfg(head="maskclip"), clip_cfg(head="naclip"), clip_cfg(), timm_cfg()])
def test_registers_change_patch_outputs(cfg):
    model = build_backbone(cfg).eval()
    x = images()
    before = model(x).patch
    with torch.no_grad():
        model.registers.add_(torch.randn_like(model.registers))
    after = model(x).patch
    assert after.shape == before.shape
    assert (after - before).abs().max() > 1e-4


def test_m0_open_clip_vanilla_matches_library_tokens():
    """m = 0, vanilla head: the patch features are open_clip's own final tokens @ proj, CLS its pooled output."""
    model = build_backbone(clip_cfg(num_registers=0)).eval()
    vit = model.vit
    x = images()
    vit.output_tokens = True
    pooled, tokens = vit(x)
    out = model(x)
    torch.testing.assert_close(out.cls, pooled)
    torch.testing.assert_close(out.patch, (tokens @ vit.proj).reshape(2, 4, 4, -1))


def test_m0_timm_matches_forward_features():
    model = build_backbone(timm_cfg(num_registers=0)).eval()
    x = images(64, 96)
    ref = model.vit.forward_features(x)
    out = model(x)
    torch.testing.assert_close(out.cls, ref[:, 0])
    torch.testing.assert_close(out.patch, ref[:, model.vit.num_prefix_tokens:].reshape(2, 4, 6, -1))


def test_timm_registers_are_prepended_and_dropped():
    """Independent recomputation of the timm path: [registers, CLS, patches] -> blocks -> norm."""
    model = build_backbone(timm_cfg()).eval()
    vit = model.vit
    x = images(64, 96)
    with torch.no_grad():
        tokens = vit._pos_embed(vit.patch_embed(x))
        tokens = torch.cat([model.registers.expand(2, -1, -1), tokens], dim=1)
        for blk in vit.blocks:
            tokens = blk(tokens)
        tokens = vit.norm(tokens)
        out = model(x)
    assert tokens.shape[1] == M + 1 + 24
    torch.testing.assert_close(out.cls, tokens[:, M])
    torch.testing.assert_close(out.patch, tokens[:, M + 1:].reshape(2, 4, 6, -1))


# ---------------------------------------------------------------- trainable groups


def _names(model, prefix):
    return {n for n, _ in model.named_parameters() if n.startswith(prefix)}


def test_set_trainable_default_groups_open_clip():
    model = build_backbone(clip_cfg())
    assert not any(p.requires_grad for p in model.parameters())  # built frozen
    unlocked = model.set_trainable(DEFAULT_TRAINABLE)
    expected = {"registers", "vit.conv1.weight", "vit.positional_embedding"}
    expected |= _names(model, "vit.transformer.resblocks.2.")
    assert len(expected) > 3 + 10 and unlocked == sorted(expected)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    # block by index + fnmatch pattern; set_trainable resets previous choices
    unlocked = model.set_trainable(["block:-2", "vit.ln_post.*"])
    assert set(unlocked) == _names(model, "vit.transformer.resblocks.1.") | {"vit.ln_post.weight", "vit.ln_post.bias"}
    assert not model.registers.requires_grad
    with pytest.raises(ValueError, match="no_such"):
        model.set_trainable(["no_such_group"])
    with pytest.raises(ValueError, match="block:7"):
        model.set_trainable(["block:7"])


def test_set_trainable_default_groups_timm_and_no_registers():
    model = build_backbone(timm_cfg(num_registers=0))
    assert model.registers is None
    unlocked = model.set_trainable(DEFAULT_TRAINABLE)  # "registers" matches nothing: allowed
    expected = {"vit.pos_embed", "vit.patch_embed.proj.weight", "vit.patch_embed.proj.bias"}
    expected |= _names(model, "vit.blocks.5.")
    assert unlocked == sorted(expected)
    model_m = build_backbone(timm_cfg())
    assert model_m.set_trainable(DEFAULT_TRAINABLE) == sorted(expected | {"registers"})


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("make", [clip_cfg, timm_cfg])
def test_same_config_gives_bit_identical_weights(make):
    a, b = build_backbone(make()), build_backbone(make().to_dict())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = build_backbone(make(init_seed=7))
    assert not all(torch.equal(sa[k], c.state_dict()[k]) for k in sa)


@pytest.mark.parametrize("cfg", [clip_cfg(num_registers=0, head="naclip"), timm_cfg(num_registers=0)])
def test_untrained_student_equals_teacher(cfg):
    teacher, student = build_backbone(cfg).eval(), build_backbone(cfg)
    student.set_trainable(DEFAULT_TRAINABLE)
    x = images()
    s_train = student(x).patch  # train mode, with grad
    with torch.no_grad():
        t, s = teacher(x), student.eval()(x)
    assert torch.equal(t.patch, s.patch) and torch.equal(t.cls, s.cls)
    # eval + no_grad may take torch's fused MultiheadAttention path (open_clip): equal up to float rounding
    torch.testing.assert_close(s_train, t.patch, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- CLIP heads, independent recomputation


def _reference_omega(gh, gw, m, sigma=5.0):
    n = 1 + gh * gw + m
    omega = torch.zeros(n, n)
    for i in range(gh * gw):
        for j in range(gh * gw):
            a, b, c, d = i // gw, i % gw, j // gw, j % gw
            omega[1 + i, 1 + j] = math.exp(-((a - c) ** 2 + (b - d) ** 2) / (2 * sigma ** 2))
    return omega


def _reference_dense(model, x, head):
    """Whole forward recomputed from raw weights; pos-embed resized here with F.interpolate."""
    vit, (B, _, H, W) = model.vit, x.shape
    gh, gw, g0 = H // 16, W // 16, vit.grid_size[0]
    pos = vit.positional_embedding
    grid = pos[1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)
    pos = torch.cat([pos[:1], grid])
    patches = F.conv2d(x, vit.conv1.weight, stride=16).flatten(2).transpose(1, 2)
    t = torch.cat([vit.class_embedding.expand(B, 1, -1), patches], 1) + pos
    t = torch.cat([t, model.registers.expand(B, -1, -1)], 1)
    t = vit.ln_pre(t)
    for blk in vit.transformer.resblocks[:-1]:
        t = blk(t)
    blk = vit.transformer.resblocks[-1]
    D, nh = t.shape[-1], blk.attn.num_heads
    dh = D // nh
    h = F.layer_norm(t, (D,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
    qkv = h @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias
    k, v = qkv[..., D:2 * D], qkv[..., 2 * D:]
    if head == "maskclip":
        mixed = v
    else:
        omega = _reference_omega(gh, gw, M)
        heads = []
        for i in range(nh):
            ki, vi = k[..., i * dh:(i + 1) * dh], v[..., i * dh:(i + 1) * dh]
            logits = ki @ ki.transpose(1, 2) / math.sqrt(dh) + omega
            heads.append(torch.softmax(logits, dim=-1) @ vi)
        mixed = torch.cat(heads, dim=-1)
    y = mixed @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
    f = F.layer_norm(y, (D,), vit.ln_post.weight, vit.ln_post.bias, vit.ln_post.eps) @ vit.proj
    return f[:, 1:1 + gh * gw].reshape(B, gh, gw, -1), f[:, 0]


@pytest.mark.parametrize("head", ["maskclip", "naclip"])
@pytest.mark.parametrize("hw", [(64, 64), (80, 48)])
def test_clip_heads_match_independent_computation(head, hw):
    model = build_backbone(clip_cfg(head=head)).eval()
    x = images(*hw)
    with torch.no_grad():
        out = model(x)
        ref_patch, ref_cls = _reference_dense(model, x, head)
    torch.testing.assert_close(out.patch, ref_patch, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.cls, ref_cls, rtol=1e-4, atol=1e-5)


def test_heads_differ_from_each_other():
    x = images()
    outs = [build_backbone(clip_cfg(head=h))(x).patch for h in ("vanilla", "maskclip", "naclip")]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_naclip_omega():
    omega = naclip_omega(3, 5, num_registers=2)
    n_patch = 15
    assert omega.shape == (1 + n_patch + 2, 1 + n_patch + 2)
    torch.testing.assert_close(omega, _reference_omega(3, 5, 2))
    assert torch.equal(omega.diagonal()[1:1 + n_patch], torch.ones(n_patch))
    assert omega[0].abs().sum() == 0 and omega[:, 0].abs().sum() == 0
    assert omega[-2:].abs().sum() == 0 and omega[:, -2:].abs().sum() == 0
    torch.testing.assert_close(omega[1, 2], torch.tensor(math.exp(-1 / 50)))  # neighbours in a row
    torch.testing.assert_close(omega[1, 1 + 5], torch.tensor(math.exp(-1 / 50)))  # neighbours in a column


# ---------------------------------------------------------------- positional embedding


def test_pos_embed_on_the_fly_interpolation():
    model64 = build_backbone(clip_cfg(head="maskclip")).eval()
    model96 = build_backbone(clip_cfg(head="maskclip", img_size=96)).eval()
    stored = model64.vit.positional_embedding
    assert stored.shape == (1 + 16, 64) and model96.vit.positional_embedding.shape == (1 + 36, 64)
    assert model64.pos_embed((4, 4)) is stored  # build size: stored grid used unchanged
    x = images(96, 96)
    with torch.no_grad():
        out64, out96 = model64(x), model96(x)
    assert out64.patch.shape == (2, 6, 6, 32)
    # both resize the same seeded 4x4 grid to 6x6 with the same rule
    torch.testing.assert_close(out64.patch, out96.patch)
    expected = F.interpolate(stored[1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2), size=(6, 6), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1).reshape(36, 64)
    torch.testing.assert_close(model96.vit.positional_embedding[1:], expected)
    torch.testing.assert_close(model96.vit.positional_embedding[0], stored[0])


def test_timm_dynamic_size():
    model = build_backbone(timm_cfg())
    assert model(images(96, 96)).patch.shape == (2, 6, 6, 64)


# ---------------------------------------------------------------- checkpoints and weights


@pytest.mark.parametrize("make", [clip_cfg, timm_cfg])
def test_trainable_checkpoint_round_trip(make, tmp_path):
    cfg = make(head="maskclip") if make is clip_cfg else make()
    student = build_backbone(cfg)
    names = student.set_trainable(DEFAULT_TRAINABLE)
    with torch.no_grad():
        for _, p in student.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    state = trainable_state_dict(student)
    assert sorted(state) == names and all(t.device.type == "cpu" and not t.requires_grad for t in state.values())
    save_file(state, tmp_path / "w.safetensors")

    fresh = build_backbone(cfg)
    fresh.set_trainable(DEFAULT_TRAINABLE)
    x = images()
    assert not torch.allclose(fresh(x).patch, student(x).patch)
    load_trainable_state_dict(fresh, load_file(tmp_path / "w.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).patch, student(x).patch, rtol=0, atol=0)


def test_load_trainable_state_dict_is_strict():
    model = build_backbone(clip_cfg())
    model.set_trainable(DEFAULT_TRAINABLE)
    state = trainable_state_dict(model)
    with pytest.raises(ValueError, match="unknown keys \\['bogus'\\]"):
        load_trainable_state_dict(model, {**state, "bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match="vit.conv1.weight"):
        load_trainable_state_dict(model, {k: v for k, v in state.items() if k != "vit.conv1.weight"})
    with pytest.raises(ValueError, match="registers"):
        load_trainable_state_dict(model, {**state, "registers": torch.zeros(M + 1, 64)})


def test_missing_checkpoint_file(tmp_path):
    path = tmp_path / "nowhere.safetensors"
    for arch in (TINY_CLIP, TINY_TIMM):
        with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
            build_backbone({"arch": arch, "checkpoint": str(path)})


@pytest.mark.parametrize("arch, tag", [(TINY_CLIP, "openai"), ("open_clip:ViT-B-16", "openai"),
                                       (TINY_TIMM, "r160_in1k"), ("open_clip:hf-hub:apple/DFN2B-CLIP-ViT-B-16", "hf")])
def test_pretrained_offline_raises_weights_unavailable(arch, tag):
    with pytest.raises(WeightsUnavailableError, match="network") as info:
        build_backbone({"arch": arch, "pretrained": tag})
    assert arch in str(info.value) and tag in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no hub stack trace
    assert info.value.original is not None  # the hub's error is kept for debugging
    assert "data/01_raw/weights/" in str(info.value) and "pretrained: null" in str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_open_clip_local_checkpoint(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        clip = open_clip.create_model("ph-reg-tiny-ViT-16")
    path = tmp_path / "tiny.pt"
    torch.save(clip.state_dict(), path)
    model = build_backbone({"arch": TINY_CLIP, "checkpoint": str(path), "img_size": IMG})
    saved = clip.visual.state_dict()
    loaded = model.vit.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_timm_local_checkpoint(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        ref = timm.create_model("test_vit", img_size=IMG)
    path = tmp_path / "test_vit.safetensors"
    save_file(ref.state_dict(), path)
    model = build_backbone({"arch": TINY_TIMM, "checkpoint": str(path), "img_size": IMG})
    loaded = model.vit.state_dict()
    saved = {k: v for k, v in ref.state_dict().items() if not k.startswith("head.")}
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    ref.reset_classifier(0)
    x = images()
    torch.testing.assert_close(model.eval()(x).patch,
                               ref.eval().forward_features(x)[:, 1:].reshape(2, 4, 4, -1))
