"""The open_clip family: CLIP vision towers as :class:`OpenClipDenseViT`, and the family's adapter functions
(:func:`build`, :func:`meta_model`, :func:`patch_size`, :func:`is_known`, :func:`list_models`,
:func:`pretrained_tags`) that :mod:`ph_reg.models.factory` dispatches to. :func:`build_open_clip_model` gives the
whole CLIP model (its text tower serves zero-shot segmentation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transformer import ResidualAttentionBlock
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ph_reg.models.backbone import (HF_HUB_PREFIX, BackboneConfig, DenseOutput, DenseViT, MlpSite, checked_config,
                                    weights_unavailable)
from ph_reg.models.clip_heads import CLIP_HEADS
from ph_reg.models.pos_embed import OFFICIAL_SCALE_OFFSET, resize_pos_embed

ARCHITECTURES_DIR = Path(__file__).parent / "architectures"
#: the heads that run the last block's MLP (the others replace the last block by a readout without it)
HEADS_WITH_LAST_MLP = ("vanilla", "maskclip_official", "sclip")
open_clip.add_model_config(ARCHITECTURES_DIR)  # makes "open_clip:ph-reg-tiny-ViT-16" available


class OpenClipDenseViT(DenseViT):
    """open_clip CLIP vision tower; tokens ``[CLS, patches, registers, test-time registers]``; last block replaced by
    the head."""

    def __init__(self, config: BackboneConfig, vit: OpenClipVisionTransformer):
        _check_open_clip_tower(config, vit)
        patch = vit.patch_size[0]
        if config.img_size % patch:
            raise ValueError(f"img_size {config.img_size} must be divisible by the patch size {patch}")
        width = vit.transformer.width
        embed_dim = vit.proj.shape[1] if vit.proj is not None else width
        pp = getattr(vit, "preprocess_cfg", {}) or {}
        super().__init__(config, vit, patch, embed_dim, width,
                         pp.get("mean", open_clip.OPENAI_DATASET_MEAN), pp.get("std", open_clip.OPENAI_DATASET_STD))
        if self.implant is not None:
            _broadcast_bias_blocks(config, vit.transformer.resblocks)
        # the stored table: resized once to the img_size grid (explicit_size: every model; official: the student,
        # as StudentCLIP's constructor does), or the pretrained one (official: frozen models, as NACLIP)
        if config.pos_embed_interp == "explicit_size" or config.student:
            new_grid = (config.img_size // patch,) * 2
            with torch.no_grad():
                pos = self._resize_pos_embed(vit.positional_embedding.data, tuple(vit.grid_size), new_grid)
            vit.positional_embedding = nn.Parameter(pos.contiguous(), requires_grad=False)
            vit.grid_size = new_grid
            vit.image_size = (config.img_size, config.img_size)

    def _resize_pos_embed(self, table: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
        offset = OFFICIAL_SCALE_OFFSET if self.config.pos_embed_interp == "official" else None
        return resize_pos_embed(table, old_grid, new_grid, scale_offset=offset)

    def pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """Positional embedding ``(1 + gh * gw, D)`` for a grid: the stored table (``vit.positional_embedding`` at
        ``vit.grid_size``) at its own grid, else that table resized once by ``config.pos_embed_interp``."""
        return self._resize_pos_embed(self.vit.positional_embedding, tuple(self.vit.grid_size), tuple(grid))

    def _run_blocks(self, blocks: Sequence[nn.Module], x: Tensor, attn_mask: Tensor | None = None,
                    allow_checkpoint: bool = True) -> Tensor:
        transformer = self.vit.transformer
        use_checkpoint = allow_checkpoint and transformer.grad_checkpointing and torch.is_grad_enabled()
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        for block in blocks:
            if attn_mask is not None:
                if use_checkpoint:
                    x = checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
                else:
                    x = block(x, attn_mask=attn_mask)
            elif use_checkpoint:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x if transformer.batch_first else x.transpose(0, 1)

    def _run_implanted(self, blocks: Sequence[nn.Module], x: Tensor, images: Tensor) -> Tensor:
        """Run ``blocks`` with the implant: plant after block ``implant.block``, attention sinks afterwards (one
        bias (B, 1, N, N) that broadcasts over the heads: :class:`BiasBroadcastBlock`, no per-head copy)."""
        implant = self.implant
        mask = implant.select(images, self.patch_size)
        with implant.writing(mask, patch_start=1) as write:  # neuron mode: the implant block is not checkpointed
            x = self._run_blocks(blocks[:implant.block + 1], x, allow_checkpoint=not implant.neuron_mode)
        x = implant.plant(x, mask, patch_start=1)
        bias = implant.attention_bias(mask, x.shape[1], patch_start=1, sinks=write.sinks).to(self._attention_dtype(x))
        return self._run_blocks(blocks[implant.block + 1:], x, attn_mask=bias.unsqueeze(1))

    def _forward_dense(self, images: Tensor, grid: tuple[int, int], pre_norm: bool = False,
                       with_pre_norm: bool = False) -> DenseOutput | tuple[DenseOutput, DenseOutput]:
        vit = self.vit
        x = vit.conv1(images).flatten(2).transpose(1, 2)  # (B, h*w, D)
        cls_token = vit.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_token, x], dim=1) + self.pos_embed(grid).to(x.dtype)
        if self.registers is not None:
            x = torch.cat([x, self._expand_registers(x)], dim=1)
        x = self._add_test_time_registers(x, front=False)
        x = vit.ln_pre(x)
        blocks = vit.transformer.resblocks
        full_blocks = blocks if self.head == "vanilla" else blocks[:-1]
        if self.implant is None:
            x = self._run_blocks(full_blocks, x)
        else:
            x = self._run_implanted(full_blocks, x, images)
        if pre_norm:
            y = x
        else:
            extra = self.num_registers + self.num_test_time_registers  # tokens after the patches
            y = x if self.head == "vanilla" else CLIP_HEADS[self.head](blocks[-1], x, grid=grid, num_registers=extra)
            y = vit.ln_post(y)
            if vit.proj is not None:
                y = y @ vit.proj
        return (self._dense(y, grid), self._dense(x, grid)) if with_pre_norm else self._dense(y, grid)

    @staticmethod
    def _dense(y: Tensor, grid: tuple[int, int]) -> DenseOutput:
        """The patch and CLS tokens of a sequence ``y`` (B, N, D)."""
        num_patches = grid[0] * grid[1]
        patch = y[:, 1:1 + num_patches].reshape(y.shape[0], *grid, y.shape[-1])
        return DenseOutput(patch=patch, cls=y[:, 0])

    def _blocks_prefix(self) -> tuple[str, int]:
        return "vit.transformer.resblocks", len(self.vit.transformer.resblocks)

    def _mlp_site(self, index: int) -> MlpSite:
        block = self.vit.transformer.resblocks[index]
        mlp = getattr(block, "mlp", None)
        if not all(hasattr(mlp, name) for name in ("c_fc", "gelu", "c_proj")):
            raise ValueError(f"{self.config.arch}: block {index} has no c_fc -> gelu -> c_proj MLP to hook")
        if not self.vit.transformer.batch_first:
            raise ValueError(f"{self.config.arch}: MLP hooks need a batch-first transformer")
        return MlpSite(block, mlp.gelu, mlp.c_proj, mlp.c_fc.out_features)

    def runs_block(self, index: int, mlp: bool = False) -> bool:
        depth = len(self.vit.transformer.resblocks)
        if index % depth < depth - 1 or self.head == "vanilla":
            return True
        return mlp and self.head in HEADS_WITH_LAST_MLP

    def token_layout(self, num_tokens: int) -> tuple[slice, slice]:
        extra = self.num_test_time_registers
        return (slice(num_tokens - extra, num_tokens),
                slice(1, num_tokens - extra - self.num_registers))

    def _named_groups(self) -> dict[str, list[str]]:
        return {"registers": ["registers"], "pos_embed": ["vit.positional_embedding"], "patch_embed": ["vit.conv1.*"]}


class BiasBroadcastBlock(ResidualAttentionBlock):
    """open_clip's ``ResidualAttentionBlock`` whose attention also takes an additive bias (B, 1, N, N) that broadcasts
    over the heads (the implant's attention sinks). ``nn.MultiheadAttention`` takes 2-D or (B * heads, N, N) masks
    only: a per-head copy of a per-image bias (12x for ViT-B/16, 246 MB in bf16 for 16 windows at 448 px).

    An implanted model's blocks get this class by a swap of the instance's class (as ``torch.nn.utils.parametrize``
    does): parameters, state dict, ``forward`` (ln_1, ls_1, ln_2, mlp, ls_2), gradient checkpointing and every hook
    on the block or its MLP (register-neuron detection, test-time registers, the neuron-mode implant) stay those of
    open_clip; only :meth:`attention` with a 4-D mask runs :func:`biased_attention`."""

    def attention(self, q_x: Tensor, k_x: Tensor | None = None, v_x: Tensor | None = None,
                  attn_mask: Tensor | None = None) -> Tensor:
        if attn_mask is None or attn_mask.dim() != 4:
            return super().attention(q_x, k_x, v_x, attn_mask)
        if k_x is not None or v_x is not None:
            raise ValueError("a 4-D attention bias is supported for self-attention only")
        return biased_attention(self.attn, q_x, attn_mask)


def biased_attention(attn: nn.MultiheadAttention, q_x: Tensor, attn_mask: Tensor) -> Tensor:
    """Self-attention of ``attn`` on the normed tokens ``q_x`` with the additive ``attn_mask`` (B, 1 or heads, N, N):
    what ``nn.MultiheadAttention(q_x, q_x, q_x, attn_mask=..., need_weights=False)`` computes with that mask repeated
    per head, without the copy. The steps are those of ``F.multi_head_attention_forward`` (the path a float mask
    takes), in its sequence-first layout: the same GEMMs on the same layouts and the same
    ``F.scaled_dot_product_attention`` call, so outputs and gradients are bit-identical on CPU (an in-projection of
    the batch-first tokens sums in another order, ~1e-6 apart; tests/unit/models/test_implant_bias.py)."""
    x = q_x.transpose(0, 1) if attn.batch_first else q_x  # (N, B, E)
    n, b, e = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).unflatten(-1, (3, e)).permute(2, 0, 1, 3).contiguous()
    q, k, v = (t.view(n, b, attn.num_heads, e // attn.num_heads).permute(1, 2, 0, 3) for t in qkv)  # (B, h, N, d)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype),
                                         dropout_p=attn.dropout if attn.training else 0.0)
    out = F.linear(out.permute(2, 0, 1, 3).reshape(n * b, e), attn.out_proj.weight, attn.out_proj.bias).view(n, b, e)
    return out.transpose(0, 1) if attn.batch_first else out


def _broadcast_bias_blocks(config: BackboneConfig, blocks: Sequence[nn.Module]) -> None:
    """Give ``blocks`` the class :class:`BiasBroadcastBlock` (the implant's attention bias without per-head copies)."""
    for index, block in enumerate(blocks):
        if type(block) not in (ResidualAttentionBlock, BiasBroadcastBlock) or not block.attn._qkv_same_embed_dim:
            raise ValueError(f"{config.arch}: the implant needs open_clip ResidualAttentionBlock blocks with a packed "
                             f"nn.MultiheadAttention; block {index} is a {type(block).__name__}")
        block.__class__ = BiasBroadcastBlock


def _check_open_clip_tower(config: BackboneConfig, vit: nn.Module) -> None:
    if not isinstance(vit, OpenClipVisionTransformer):
        raise ValueError(f"{config.arch} has a {type(vit).__name__} vision tower; only open_clip's "
                         "VisionTransformer is supported")
    if vit.attn_pool is not None:
        raise ValueError(f"{config.arch}: attentional pooling towers are not supported")
    if not isinstance(vit.patch_dropout, nn.Identity):
        raise ValueError(f"{config.arch}: patch dropout is not supported (dense output needs every patch)")
    if vit.patch_size[0] != vit.patch_size[1]:
        raise ValueError(f"{config.arch}: non-square patches {vit.patch_size} are not supported")


def create_model(config: BackboneConfig) -> nn.Module:
    """The full open_clip model (vision and text towers) of ``config``; the caller seeds the global RNG."""
    name = config.model_name
    kwargs = dict(config.model_kwargs)
    if name.startswith(HF_HUB_PREFIX):
        # config (and weights) come from the hub repo; open_clip ignores `pretrained` for hf-hub names
        try:
            model = open_clip.create_model(name, load_weights=config.pretrained is not None,
                                           require_pretrained=config.pretrained is not None, **kwargs)
        except Exception as exc:
            raise weights_unavailable(config, exc) from None
        if config.checkpoint is not None:
            open_clip.load_checkpoint(model, config.checkpoint, strict=True)
        return model
    if open_clip.get_model_config(name) is None:
        raise ValueError(f"unknown open_clip architecture {name!r}; see open_clip.list_models()")
    if config.pretrained is not None:
        tag_cfg = open_clip.get_pretrained_cfg(name, config.pretrained)
        hint = "" if tag_cfg else (f"Known tags for {name}: {open_clip.list_pretrained_tags_by_model(name)}. ")
        try:
            model = open_clip.create_model(name, pretrained=config.pretrained, require_pretrained=True,
                                           force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)), **kwargs)
        except Exception as exc:
            raise weights_unavailable(config, exc, hint) from None
    else:
        model = open_clip.create_model(name, pretrained=config.checkpoint, **kwargs)
    return model


def build(config: BackboneConfig) -> OpenClipDenseViT:
    """The DenseViT of ``config`` (the caller seeds the global RNG)."""
    return OpenClipDenseViT(config, create_model(config).visual)


def build_open_clip_model(config: BackboneConfig | Mapping[str, Any]) -> nn.Module:
    """The full open_clip CLIP model (vision and text towers) behind ``build_backbone(config)``, frozen, in eval
    mode: created by the same seeded call, so its ``visual`` has the same weights as the DenseViT's tower (before
    the positional embedding is resized to ``img_size``). Used for the text tower of zero-shot segmentation."""
    config = checked_config(config)
    if config.family != "open_clip":
        raise ValueError(f"arch must be an open_clip architecture ('open_clip:<name>'), got {config.arch!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        model = create_model(config)
    return model.requires_grad_(False).eval()


# --- the family adapter's look-ups without weights (ph_reg.models.factory, ph_reg.params) ------------------------

def is_known(name: str) -> bool:
    """Whether open_clip knows the architecture (``hf-hub:`` names are looked up only when built)."""
    return name.startswith(HF_HUB_PREFIX) or open_clip.get_model_config(name) is not None


def list_models() -> list[str]:
    return open_clip.list_models()


def pretrained_tags(name: str) -> list[str] | None:
    """The pretrained tags open_clip has for ``name`` (None: the name carries its own tag; never for open_clip)."""
    return open_clip.list_pretrained_tags_by_model(name)


def patch_size(config: BackboneConfig) -> int:
    """The patch size of ``config.arch``, read from open_clip's model config (no model built)."""
    vision = open_clip.get_model_config(config.model_name)["vision_cfg"]
    patch = vision.get("patch_size", 0)
    return patch[0] if isinstance(patch, (tuple, list)) else patch


def meta_model(config: BackboneConfig) -> OpenClipDenseViT:
    """The DenseViT of ``config`` built under the caller's ``torch.device("meta")``: names and shapes, no data."""
    model = open_clip.create_model(config.model_name, device="meta", **dict(config.model_kwargs))
    return OpenClipDenseViT(config, model.visual)
