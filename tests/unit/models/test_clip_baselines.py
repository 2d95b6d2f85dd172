"""Training-free CLIP baseline heads (SCLIP, ClearCLIP, official MaskCLIP, NACLIP prior) against independent
computations from raw weights on the tiny open_clip model."""

from __future__ import annotations

import math

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ph_reg.method.tta import TTAConfig
from ph_reg.models import BackboneConfig, build_backbone, naclip_omega
from ph_reg.models.backbone import HEADS
from ph_reg.models.clip_heads import CLIP_HEADS
from ph_reg.evaluation.zeroshot import ZERO_SHOT_HEADS, backbone_head, make_dense_fn

TINY_CLIP = "open_clip:ph-reg-tiny-ViT-16"  # width 64, 2 heads of 32, 3 blocks, proj to 32
IMG = 64
M = 4


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def clip_cfg(**kw) -> BackboneConfig:
    return BackboneConfig(**{"arch": TINY_CLIP, "img_size": IMG, "num_registers": M, **kw})


def images(h: int = IMG, w: int = IMG, b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _last_block_input(model, x):
    """Tokens [CLS, patches, registers] entering the last block, from raw weights (pos-embed via F.interpolate)."""
    vit, (B, _, H, W) = model.vit, x.shape
    gh, gw, g0 = H // 16, W // 16, vit.grid_size[0]
    pos = vit.positional_embedding
    grid = pos[1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])
    patches = F.conv2d(x, vit.conv1.weight, stride=16).flatten(2).transpose(1, 2)
    t = torch.cat([vit.class_embedding.expand(B, 1, -1), patches], 1) + pos
    t = torch.cat([t, model.registers.expand(B, -1, -1)], 1)
    t = vit.ln_pre(t)
    for blk in vit.transformer.resblocks[:-1]:
        t = blk(t)
    return t, (gh, gw)


def _mlp(blk, y):
    assert isinstance(blk.mlp.gelu, nn.GELU) and blk.mlp.gelu.approximate == "none"
    h = F.layer_norm(y, y.shape[-1:], blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
    h = F.gelu(h @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias)
    return h @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias


def _per_head(a_fn, q, k, v, nh):
    """Concatenate, over heads, A_i v_i with A_i = a_fn(q_i, k_i)."""
    dh = q.shape[-1] // nh
    outs = []
    for i in range(nh):
        sl = slice(i * dh, (i + 1) * dh)
        outs.append(a_fn(q[..., sl], k[..., sl], dh) @ v[..., sl])
    return torch.cat(outs, dim=-1)


def _softmax_logits(a, b, dh):
    return torch.softmax(a @ b.transpose(1, 2) / math.sqrt(dh), dim=-1)


def _reference_dense(model, x, head):
    t, (gh, gw) = _last_block_input(model, x)
    vit, B = model.vit, x.shape[0]
    blk = vit.transformer.resblocks[-1]
    D, nh = t.shape[-1], blk.attn.num_heads
    h = F.layer_norm(t, (D,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
    qkv = h @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias
    q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
    out_proj = lambda z: z @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias  # noqa: E731
    if head == "sclip":
        mixed = _per_head(lambda qi, ki, dh: _softmax_logits(qi, qi, dh) + _softmax_logits(ki, ki, dh), q, k, v, nh)
        y = t + out_proj(mixed)
        y = y + _mlp(blk, y)
    elif head == "clearclip":
        y = out_proj(_per_head(lambda qi, ki, dh: _softmax_logits(qi, qi, dh), q, k, v, nh))
    elif head == "kk_no_residual":  # what ClearCLIP must NOT be: k-k attention
        y = out_proj(_per_head(lambda qi, ki, dh: _softmax_logits(ki, ki, dh), q, k, v, nh))
    elif head == "maskclip_official":
        y = t + out_proj(v)
        y = y + _mlp(blk, y)
    else:
        raise AssertionError(head)
    f = F.layer_norm(y, (D,), vit.ln_post.weight, vit.ln_post.bias, vit.ln_post.eps) @ vit.proj
    return f[:, 1:1 + gh * gw].reshape(B, gh, gw, -1), f[:, 0]


@pytest.mark.parametrize("head", ["sclip", "clearclip", "maskclip_official"])
@pytest.mark.parametrize("hw", [(64, 64), (80, 48)])
def test_heads_match_independent_computation(head, hw):
    model = build_backbone(clip_cfg(head=head)).eval()
    x = images(*hw)
    with torch.no_grad():
        out = model(x)
        ref_patch, ref_cls = _reference_dense(model, x, head)
    torch.testing.assert_close(out.patch, ref_patch, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.cls, ref_cls, rtol=1e-4, atol=1e-5)


def test_clearclip_uses_query_query_attention():
    model = build_backbone(clip_cfg(head="clearclip")).eval()
    x = images()
    with torch.no_grad():
        out = model(x).patch
        kk, _ = _reference_dense(model, x, "kk_no_residual")
        qq, _ = _reference_dense(model, x, "clearclip")
    torch.testing.assert_close(out, qq, rtol=1e-4, atol=1e-5)
    assert (out - kk).abs().max() > 1e-3


def test_sclip_attention_rows_sum_to_two():
    """With v == 1, identity out_proj and a zero FFN, SCLIP's output minus the residual is A @ 1 = the row sums of
    A, which are 2 (two softmaxes) for every token and head."""
    model = build_backbone(clip_cfg(head="sclip")).eval()  # a private copy: its weights are edited below
    x, _ = _last_block_input(model, images())
    blk = model.vit.transformer.resblocks[-1]
    d = x.shape[-1]
    with torch.no_grad():
        blk.attn.in_proj_weight[2 * d:] = 0
        blk.attn.in_proj_bias[2 * d:] = 1
        nn.init.eye_(blk.attn.out_proj.weight)
        blk.attn.out_proj.bias.zero_()
        blk.mlp.c_proj.weight.zero_()
        blk.mlp.c_proj.bias.zero_()
        y = CLIP_HEADS["sclip"](blk, x, grid=(4, 4), num_registers=M)
    torch.testing.assert_close(y - x, torch.full_like(x, 2.0))


def test_all_heads_registered_and_distinct():
    assert {"sclip", "clearclip", "maskclip_official", "maskclip", "naclip"} <= set(HEADS["open_clip"])
    assert "maskclip_tta" in ZERO_SHOT_HEADS and backbone_head("maskclip_tta") == "maskclip"
    x = images()
    outs = {h: build_backbone(clip_cfg(head=h)).eval()(x).patch for h in ("vanilla", *CLIP_HEADS)}
    names = sorted(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.allclose(outs[a], outs[b], atol=1e-4), (a, b)


@pytest.mark.parametrize("grid,offset", [((8, 8), (3, 4)), ((8, 8), (0, 5)), ((8, 8), (1, 1)), ((5, 9), (4, 8))])
def test_naclip_prior_values_at_offsets(grid, offset):
    gh, gw = grid
    omega = naclip_omega(gh, gw, num_registers=M)
    a, b = 0, 0
    c, d = a + offset[0], b + offset[1]
    value = omega[1 + a * gw + b, 1 + c * gw + d]
    expected = math.exp(-(offset[0] ** 2 + offset[1] ** 2) / 50)  # sigma 5: 2 sigma^2 = 50
    torch.testing.assert_close(value, torch.tensor(expected))
    torch.testing.assert_close(omega[1 + c * gw + d, 1 + a * gw + b], torch.tensor(expected))
    if offset == (3, 4):
        torch.testing.assert_close(value, torch.tensor(math.exp(-25 / 50)))
    assert omega[-M:].abs().sum() == 0 and omega[:, -M:].abs().sum() == 0  # registers: 0 rows and columns


@pytest.mark.parametrize("head", ZERO_SHOT_HEADS)
def test_no_head_changes_any_parameter(head):
    model = build_backbone(clip_cfg(head=backbone_head(head)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fn = make_dense_fn(model, head, TTAConfig(n_views=3))
    fn(images())  # train mode, grad enabled
    model.eval()
    with torch.no_grad():
        fn(images(80, 48))
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert not any(p.requires_grad for p in model.parameters())
