"""The implant's attention bias on open_clip (issue 15): one (B, 1, N, N) bias broadcast over the heads
(ph_reg.models.open_clip.BiasBroadcastBlock) gives exactly what nn.MultiheadAttention gives with the bias repeated
per head, (B * heads, N, N), in both implant modes, with post-hoc and test-time registers, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from ph_reg.models import BackboneConfig, build_backbone
from ph_reg.models.open_clip import BiasBroadcastBlock, _broadcast_bias_blocks
from ph_reg.models.test_time_registers import attach_test_time_registers

TINY_CLIP = "open_clip:ph-reg-tiny-ViT-16"  # 3 blocks, width 64, 2 heads
IMG = 128  # an 8 x 8 grid


def implanted(mode: str, head: str):
    """The tiny CLIP planting after block 0 (blocks 1 and 2 read the bias), 2 post-hoc registers and 1 test-time
    register whose intervention hooks the MLP of block 1 (and, in neuron mode, the planted units of block 0)."""
    implant = {"block": 0, **({"mode": "neurons"} if mode == "neurons" else {})}
    model = build_backbone(BackboneConfig(arch=TINY_CLIP, img_size=IMG, head=head, num_registers=2, implant=implant))
    neurons = [(1, 5)] + (model.implant.planted_neurons() if mode == "neurons" else [])
    attach_test_time_registers(model, neurons, {"num_registers": 1})
    return model


def images() -> torch.Tensor:
    pixels = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    pixels[..., : IMG // 2] = 0.3  # flat patches win the implant's competition
    return pixels


def outputs_and_gradients(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eval outputs (dense, CLS, pre-norm), then a training step's output and every gradient, with gradient
    checkpointing of the blocks. (Parameters require gradients throughout: on CPU, whether they do changes the
    no-grad outputs by ~1e-6 with either attention, torch picks other kernels.)"""
    out = {}
    model.eval().requires_grad_(True)
    with torch.no_grad():
        dense = model.forward_tokens(x)
        out.update(patch=dense.patch, cls=dense.cls, pre_norm=model.forward_tokens(x, pre_norm=True).patch)
    model.train()
    model.vit.transformer.grad_checkpointing = True
    model.zero_grad(set_to_none=True)
    dense = model.forward_tokens(x)
    (dense.patch.square().mean() + dense.cls.sum()).backward()
    out["train_patch"] = dense.patch.detach()
    out.update({f"grad:{name}": p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    return out


def repeated_mask_attention(self, q_x, k_x=None, v_x=None, attn_mask=None):
    """The attention before issue 15: the bias repeated per head into nn.MultiheadAttention's 3-D mask."""
    if attn_mask is not None and attn_mask.dim() == 4:
        attn_mask = attn_mask.expand(-1, self.attn.num_heads, -1, -1).reshape(-1, *attn_mask.shape[2:])
    return ResidualAttentionBlock.attention(self, q_x, k_x, v_x, attn_mask)


@pytest.mark.parametrize("mode", ["add", "neurons"])
@pytest.mark.parametrize("head", ["vanilla", "naclip"])
def test_compact_bias_equals_the_per_head_mask(mode, head, monkeypatch):
    model = implanted(mode, head)
    assert all(type(block) is BiasBroadcastBlock for block in model.vit.transformer.resblocks)
    calls = []
    model.vit.transformer.resblocks[1].register_forward_hook(lambda *args: calls.append(1))  # hooks still run
    x = images()
    compact = outputs_and_gradients(model, x)
    assert calls
    monkeypatch.setattr(BiasBroadcastBlock, "attention", repeated_mask_attention)
    repeated = outputs_and_gradients(model, x)
    assert compact.keys() == repeated.keys()
    assert "grad:vit.transformer.resblocks.1.attn.in_proj_weight" in compact  # the biased blocks train
    for key in compact:
        assert torch.equal(compact[key], repeated[key]), key  # bit-identical on CPU


def test_the_blocks_get_one_bias_for_all_heads():
    model = implanted("add", "vanilla").eval()
    seen = []
    model.vit.transformer.resblocks[2].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attn_mask"]), with_kwargs=True)
    with torch.no_grad():
        model.forward_tokens(images())
    tokens = 1 + (IMG // 16) ** 2 + 2 + 1  # CLS, patches, registers, test-time register
    (bias,) = seen
    assert bias.shape == (2, 1, tokens, tokens)  # before: (2 * heads, tokens, tokens)
    assert bias.untyped_storage().nbytes() == 2 * tokens * tokens * bias.element_size()


def test_plain_masks_and_clean_models_are_untouched():
    clean = build_backbone(BackboneConfig(arch=TINY_CLIP, img_size=IMG))
    assert all(type(block) is ResidualAttentionBlock for block in clean.vit.transformer.resblocks)
    block = implanted("add", "vanilla").vit.transformer.resblocks[2].eval()  # no test-time-register hook
    stock = ResidualAttentionBlock(64, block.attn.num_heads).eval().requires_grad_(False)  # frozen, as the model
    stock.load_state_dict(block.state_dict())  # the same parameters under the same names
    x, mask = torch.randn(2, 5, 64), torch.randn(2 * block.attn.num_heads, 5, 5)
    assert torch.equal(block(x, attn_mask=mask), stock(x, attn_mask=mask))
    assert torch.equal(block(x), stock(x))
    with pytest.raises(ValueError, match="ResidualAttentionBlock"):
        _broadcast_bias_blocks(clean.config, [nn.Linear(2, 2)])
