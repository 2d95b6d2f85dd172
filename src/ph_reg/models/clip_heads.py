"""Training-free replacements for the last block of an open_clip CLIP vision tower (dense heads).

Each head maps the input ``x`` (B, N, D) of the last ``ResidualAttentionBlock`` to its output ``y`` (B, N, D);
the caller then applies ``ln_post`` and ``proj`` to every token. Token layout is ``[CLS, patches, registers]``.
The heads use the block's own weights: ``ln_1``, the packed ``attn.in_proj_weight``/``in_proj_bias`` (q, k, v
order) and ``attn.out_proj``; ``ln_2`` and the MLP are not used.

- ``maskclip`` (value-only MaskCLIP, PH-Reg's student): ``y = out_proj(v)``; no attention, residual or MLP.
- ``naclip`` (NACLIP "reduced" block, PH-Reg's teacher): per head ``A = softmax(s k k^T + Omega)``,
  ``y = out_proj(A v)``; no residual, no MLP.
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
    attn = _attention_module(block)
    d = x.shape[-1]
    w_v = attn.in_proj_weight[2 * d:]
    b_v = attn.in_proj_bias[2 * d:] if attn.in_proj_bias is not None else None
    v = F.linear(block.ln_1(x), w_v, b_v)
    return block.ls_1(attn.out_proj(v))


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


# name -> last-block function (block, x, grid, num_registers) -> y; "vanilla" runs the block itself
CLIP_HEADS: dict[str, Callable[..., Tensor]] = {
    "maskclip": maskclip_block,
    "naclip": naclip_block,
}
