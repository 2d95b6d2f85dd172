"""Training-free replacements for the last block of an open_clip CLIP vision tower (dense heads).

Each head maps the input ``x`` (B, N, D) of the last ``ResidualAttentionBlock`` to its output ``y`` (B, N, D);
the caller then applies ``ln_post`` and ``proj`` to every token. Token layout is ``[CLS, patches, registers]``.
The heads use the block's own weights: ``ln_1``, the packed ``attn.in_proj_weight``/``in_proj_bias`` (q, k, v
order) and ``attn.out_proj``; the heads that keep the residual and FFN also use ``ln_2`` and ``mlp``. Heads stay
separate (``s = d_head^-0.5``) and are concatenated before ``out_proj``. No head changes any parameter.

- ``maskclip`` (value-only MaskCLIP, PH-Reg's student and ClearCLIP's variant): ``y = out_proj(v)``; no
  attention, residual or MLP.
- ``maskclip_official`` (MaskCLIP as in its official repo): identity attention with residual and FFN,
  ``y = x + out_proj(v)``, then ``y + mlp(ln_2(y))``.
- ``sclip`` (SCLIP correlative attention): ``A = softmax(s q q^T) + softmax(s k k^T)`` (rows sum to 2),
  ``y = x + out_proj(A v)``, then ``y + mlp(ln_2(y))``.
- ``clearclip`` (ClearCLIP): ``A = softmax(s q q^T)``, ``y = out_proj(A v)``; no residual, no MLP.
- ``naclip`` (NACLIP "reduced" block, PH-Reg's teacher): per head ``A = softmax(s k k^T + Omega)``,
  ``y = out_proj(A v)``; no residual, no MLP.

A layer scale (``ls_1``/``ls_2``, identity in CLIP) is kept on the attention/FFN branch it belongs to.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NACLIP_SIGMA = 5.0  # width (in patches) of NACLIP's Gaussian neighbourhood prior
NUM_PREFIX_TOKENS = 1  # the CLS token of CLIP vision towers


def naclip_omega(
        grid_h: int,
        grid_w: int,
        num_registers: int = 0,
        sigma: float = NACLIP_SIGMA,
        num_prefix_tokens: int = NUM_PREFIX_TOKENS,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
) -> Tensor:
    """NACLIP's additive attention prior Omega, shape (N, N) with N = prefix + grid_h * grid_w + registers.

    For patches at grid positions (a, b) and (c, d): ``exp(-((a - c)^2 + (b - d)^2) / (2 sigma^2))``, i.e.
    unnormalised (1 on the diagonal), the same for every head and not multiplied by the attention scale.
    The rows and columns of the CLS token and of the registers are 0 (registers are our addition: they get no
    spatial prior, exactly like CLS). Built per grid size, so non-square grids work.
    """
    if grid_h <= 0 or grid_w <= 0:
        raise ValueError(f"grid size must be positive, got {grid_h}x{grid_w}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    rows = torch.arange(grid_h, device=device, dtype=torch.float32)
    cols = torch.arange(grid_w, device=device, dtype=torch.float32)
    pos = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)  # (P, 2)
    sq_dist = (pos[:, None, :] - pos[None, :, :]).square().sum(-1)
    prior = torch.exp(-sq_dist / (2 * sigma ** 2))
    num_patches = grid_h * grid_w
    n = num_prefix_tokens + num_patches + num_registers
    omega = torch.zeros(n, n, device=device, dtype=torch.float32)
    omega[num_prefix_tokens:num_prefix_tokens + num_patches, num_prefix_tokens:num_prefix_tokens + num_patches] = prior
    return omega.to(dtype)


def _attention_module(block: nn.Module) -> nn.MultiheadAttention:
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
        raise TypeError(
            "dense CLIP heads need an open_clip ResidualAttentionBlock with a packed nn.MultiheadAttention "
            f"(in_proj_weight in q, k, v order); got attn of type {type(attn).__name__}"
        )
    return attn


def _split_heads(t: Tensor, num_heads: int) -> Tensor:
    """(B, N, D) -> (B, heads, N, D / heads)."""
    b, n, d = t.shape
    return t.reshape(b, n, num_heads, d // num_heads).transpose(1, 2)


def _merge_heads(t: Tensor) -> Tensor:
    """(B, heads, N, d_h) -> (B, N, heads * d_h)."""
    b, h, n, dh = t.shape
    return t.transpose(1, 2).reshape(b, n, h * dh)


def maskclip_block(block: nn.Module, x: Tensor, grid: tuple[int, int], num_registers: int = 0) -> Tensor:
    """Value-only MaskCLIP last block: ``out_proj(W_v ln_1(x) + b_v)`` (the block's layer scale ``ls_1``, if any,
    is kept as part of the attention branch). ``grid`` and ``num_registers`` are unused (uniform head signature)."""
    return block.ls_1(_value_path(block, x))


def _value_path(block: nn.Module, x: Tensor) -> Tensor:
    """``out_proj(W_v ln_1(x) + b_v)``: the attention branch with identity attention, without layer scale."""
    attn = _attention_module(block)
    d = x.shape[-1]
    w_v = attn.in_proj_weight[2 * d:]
    b_v = attn.in_proj_bias[2 * d:] if attn.in_proj_bias is not None else None
    return attn.out_proj(F.linear(block.ln_1(x), w_v, b_v))


def naclip_block(
        block: nn.Module,
        x: Tensor,
        grid: tuple[int, int],
        num_registers: int = 0,
        sigma: float = NACLIP_SIGMA,
) -> Tensor:
    """NACLIP "reduced" last block: per head ``out_proj(softmax(s k k^T + Omega) v)``, no residual, no MLP.

    ``x`` holds ``[CLS, patches (grid, row-major), registers]``; Omega is :func:`naclip_omega` (0 on the CLS and
    register rows/columns). ``s = d_head^-0.5``.
    """
    attn = _attention_module(block)
    d = x.shape[-1]
    _, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).split(d, dim=-1)
    k, v = _split_heads(k, attn.num_heads), _split_heads(v, attn.num_heads)
    omega = naclip_omega(*grid, num_registers=num_registers, sigma=sigma, device=x.device, dtype=k.dtype)
    if omega.shape[0] != x.shape[1]:
        raise ValueError(f"token count {x.shape[1]} does not match grid {grid} + CLS + {num_registers} registers")
    out = F.scaled_dot_product_attention(k, k, v, attn_mask=omega, scale=k.shape[-1] ** -0.5)
    return block.ls_1(attn.out_proj(_merge_heads(out)))


def _qkv_heads(block: nn.Module, x: Tensor) -> tuple[nn.MultiheadAttention, Tensor, Tensor, Tensor]:
    """The block's attention module and its q, k, v of ``ln_1(x)``, each (B, heads, N, d_head)."""
    attn = _attention_module(block)
    d = x.shape[-1]
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).split(d, dim=-1)
    return attn, *(_split_heads(t, attn.num_heads) for t in (q, k, v))


def _residual_and_ffn(block: nn.Module, x: Tensor, attn_out: Tensor) -> Tensor:
    """The rest of a standard block around a replaced attention: ``y = x + ls_1(attn_out)``,
    then ``y + ls_2(mlp(ln_2(y)))``."""
    y = x + block.ls_1(attn_out)
    return y + block.ls_2(block.mlp(block.ln_2(y)))


def maskclip_official_block(block: nn.Module, x: Tensor, grid: tuple[int, int], num_registers: int = 0) -> Tensor:
    """MaskCLIP as in its official repo: identity attention (each token sees only itself) with the residual and
    FFN kept, ``y = x + out_proj(v)``, then ``y + mlp(ln_2(y))``. PH-Reg (and this project's ``maskclip``) use the
    value-only variant instead. ``grid`` and ``num_registers`` are unused (uniform head signature)."""
    return _residual_and_ffn(block, x, _value_path(block, x))


def sclip_block(block: nn.Module, x: Tensor, grid: tuple[int, int], num_registers: int = 0) -> Tensor:
    """SCLIP last block: per head ``A = softmax(s q q^T) + softmax(s k k^T)`` (summed, rows sum to 2), residual
    and FFN kept: ``y = x + out_proj(A v)``, then ``y + mlp(ln_2(y))``. ``grid``/``num_registers`` are unused."""
    attn, q, k, v = _qkv_heads(block, x)
    scale = q.shape[-1] ** -0.5
    mixed = (F.scaled_dot_product_attention(q, q, v, scale=scale)
             + F.scaled_dot_product_attention(k, k, v, scale=scale))
    return _residual_and_ffn(block, x, attn.out_proj(_merge_heads(mixed)))


def clearclip_block(block: nn.Module, x: Tensor, grid: tuple[int, int], num_registers: int = 0) -> Tensor:
    """ClearCLIP last block: per head ``A = softmax(s q q^T)``, ``y = out_proj(A v)``; no residual, no FFN.
    ``grid`` and ``num_registers`` are unused (uniform head signature)."""
    attn, q, _, v = _qkv_heads(block, x)
    mixed = F.scaled_dot_product_attention(q, q, v, scale=q.shape[-1] ** -0.5)
    return block.ls_1(attn.out_proj(_merge_heads(mixed)))


# name -> last-block function (block, x, grid, num_registers) -> y; "vanilla" runs the block itself
CLIP_HEADS: dict[str, Callable[..., Tensor]] = {
    "maskclip": maskclip_block,
    "maskclip_official": maskclip_official_block,
    "sclip": sclip_block,
    "clearclip": clearclip_block,
    "naclip": naclip_block,
}
