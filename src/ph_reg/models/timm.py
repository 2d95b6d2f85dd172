"""The timm family: ``VisionTransformer`` models as :class:`TimmDenseViT`, and the family's adapter functions
(:func:`build`, :func:`meta_model`, :func:`patch_size`, :func:`is_known`, :func:`list_models`,
:func:`pretrained_tags`) that :mod:`ph_reg.models.factory` dispatches to."""

from __future__ import annotations

import inspect
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import GluMlp
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ph_reg.models.backbone import BackboneConfig, DenseOutput, DenseViT, MlpSite, weights_unavailable
from ph_reg.models.pos_embed import resize_pos_embed

RESERVED_TIMM_KWARGS = ("pretrained", "pretrained_cfg_overlay", "img_size", "dynamic_img_size")


class TimmDenseViT(DenseViT):
    """timm VisionTransformer; tokens ``[test-time registers, registers, CLS, (native reg tokens), patches]``; final
    norm output."""

    def __init__(self, config: BackboneConfig, vit: TimmVisionTransformer):
        if not isinstance(vit, TimmVisionTransformer):
            raise ValueError(f"{config.arch} is a {type(vit).__name__}, expected a timm VisionTransformer")
        if not isinstance(vit.patch_drop, nn.Identity):
            raise ValueError(f"{config.arch}: patch dropout is not supported (dense output needs every patch)")
        patch_h, patch_w = vit.patch_embed.patch_size
        if patch_h != patch_w:
            raise ValueError(f"{config.arch}: non-square patches {patch_h}x{patch_w} are not supported")
        cfg = vit.pretrained_cfg or {}
        super().__init__(config, vit, patch_h, vit.embed_dim, vit.embed_dim,
                         cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD))
        if self.implant is not None and any("attn_mask" not in inspect.signature(b.forward).parameters
                                            for b in vit.blocks):
            raise ValueError(f"{config.arch}: the implant needs blocks whose forward accepts attn_mask")
        if self.implant is not None and self.implant.neuron_mode and not isinstance(
                vit.blocks[self.implant.block].mlp.norm, nn.Identity):
            raise ValueError(f"{config.arch}: the implant's neuron mode needs an MLP without a hidden norm")

    def _run_implanted(self, x: Tensor, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """All blocks with the implant: plant after block ``implant.block``, attention sinks afterwards."""
        implant, blocks = self.implant, self.vit.blocks
        use_checkpoint = self.vit.grad_checkpointing and torch.is_grad_enabled()
        patch_start = x.shape[1] - grid[0] * grid[1]
        bias = None
        mask = implant.select(images, self.patch_size)
        with implant.writing(mask, patch_start) as write:
            for index, block in enumerate(blocks):
                # neuron mode: the implant block is not checkpointed (its hooks need the forward's mask)
                if use_checkpoint and not (implant.neuron_mode and index == implant.block):
                    x = checkpoint(block, x, bias, use_reentrant=False)
                else:
                    x = block(x, attn_mask=bias)
                if index == implant.block:
                    x = implant.plant(x, mask, patch_start=patch_start)
                    bias = implant.attention_bias(mask, x.shape[1], patch_start=patch_start, sinks=write.sinks)
                    bias = bias.to(self._attention_dtype(x)).unsqueeze(1)  # (B, 1, N, N): the same for every head
        return x

    def pos_embed(self, grid: tuple[int, int]) -> Tensor | None:
        """Positional embedding ``(1, [prefix +] gh * gw, D)`` for a grid (``None`` for models without one): the
        stored table (``vit.pos_embed`` at ``vit.patch_embed.grid_size``) at its own grid, else that table resized
        once by ``config.pos_embed_interp`` (official: plain bicubic to the size, as Hugging Face's DINOv2;
        explicit_size: timm's antialiased bicubic)."""
        vit = self.vit
        if vit.pos_embed is None:
            return None
        prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        return resize_pos_embed(vit.pos_embed, tuple(vit.patch_embed.grid_size), tuple(grid), prefix,
                                antialias=self.config.pos_embed_interp == "explicit_size")

    def _add_pos_embed(self, x: Tensor) -> Tensor:
        """timm's ``VisionTransformer._pos_embed`` with :meth:`pos_embed` as the table: (B, h, w, D) patch tokens
        -> (B, prefix + h * w, D) with CLS / native register tokens."""
        vit = self.vit
        batch, height, width, dim = x.shape
        x = x.reshape(batch, height * width, dim)
        prefix = [token.expand(batch, -1, -1) for token in (vit.cls_token, vit.reg_token) if token is not None]
        pos = self.pos_embed((height, width))
        if pos is None:
            return torch.cat(prefix + [x], dim=1)
        if vit.no_embed_class:  # the table has no prefix rows: add, then prepend the prefix tokens
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
        return vit.pos_drop(x)

    def _forward_dense(self, images: Tensor, grid: tuple[int, int], pre_norm: bool = False,
                       with_pre_norm: bool = False) -> DenseOutput | tuple[DenseOutput, DenseOutput]:
        vit = self.vit
        x = vit.patch_embed(images)  # (B, h, w, D) with dynamic_img_size
        x = self._add_pos_embed(x)  # (B, prefix + h*w, D)
        if self.registers is not None:
            x = torch.cat([self._expand_registers(x), x], dim=1)
        x = self._add_test_time_registers(x, front=True)
        x = vit.norm_pre(vit.patch_drop(x))
        if self.implant is not None:
            x = self._run_implanted(x, images, grid)
        elif vit.grad_checkpointing and torch.is_grad_enabled():
            for block in vit.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = vit.blocks(x)
        output = x if pre_norm else vit.norm(x)
        return (self._dense(output, grid), self._dense(x, grid)) if with_pre_norm else self._dense(output, grid)

    def _dense(self, x: Tensor, grid: tuple[int, int]) -> DenseOutput:
        """The patch and CLS tokens of a sequence ``x`` (B, N, D)."""
        num_patches = grid[0] * grid[1]
        patch = x[:, -num_patches:].reshape(x.shape[0], *grid, x.shape[-1])
        cls_index = self.num_test_time_registers + self.num_registers
        cls = x[:, cls_index] if self.vit.cls_token is not None else patch.mean(dim=(1, 2))
        return DenseOutput(patch=patch, cls=cls)

    def _blocks_prefix(self) -> tuple[str, int]:
        return "vit.blocks", len(self.vit.blocks)

    def _mlp_site(self, index: int) -> MlpSite:
        block = self.vit.blocks[index]
        mlp = getattr(block, "mlp", None)
        if isinstance(mlp, GluMlp) or not all(hasattr(mlp, name) for name in ("fc1", "act", "fc2")):
            raise ValueError(f"{self.config.arch}: block {index} has no fc1 -> act -> fc2 MLP to hook (gated MLPs "
                             f"such as SwiGLU are not supported)")
        return MlpSite(block, mlp.act, mlp.fc2, mlp.fc1.out_features)

    def token_layout(self, num_tokens: int) -> tuple[slice, slice]:
        extra = self.num_test_time_registers
        return slice(0, extra), slice(extra + self.num_registers + self.vit.num_prefix_tokens, num_tokens)

    def _named_groups(self) -> dict[str, list[str]]:
        return {"registers": ["registers"], "pos_embed": ["vit.pos_embed"], "patch_embed": ["vit.patch_embed.*"]}


def timm_kwargs(config: BackboneConfig) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments of ``config`` (besides the weights): ``dynamic_img_size`` always;
    ``img_size`` (timm resizes the table at load time) only under ``explicit_size``: under ``official`` the table keeps
    the architecture's pretrained grid, as Hugging Face's DINOv2 does."""
    kwargs = dict(config.model_kwargs, dynamic_img_size=True)
    if config.pos_embed_interp == "explicit_size":
        kwargs["img_size"] = config.img_size
    return kwargs


def create_model(config: BackboneConfig) -> TimmVisionTransformer:
    """The timm VisionTransformer of ``config``, classifier removed (the caller seeds the global RNG)."""
    name, tag = config.model_name, config.pretrained
    reserved = sorted(set(config.model_kwargs) & set(RESERVED_TIMM_KWARGS))
    if reserved:
        raise ValueError(f"model_kwargs may not set {reserved}: they come from the other BackboneConfig fields")
    if not timm.is_model(name):
        raise ValueError(f"unknown timm architecture {name!r}; see timm.list_models()")
    kwargs = timm_kwargs(config)
    if config.checkpoint is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=config.checkpoint)
    full_name = f"{name}.{tag}" if tag else name
    try:
        vit = timm.create_model(full_name, pretrained=bool(tag or config.checkpoint), **kwargs)
    except Exception as exc:
        if tag is None:
            raise
        raise weights_unavailable(config, exc) from None
    vit.reset_classifier(0)  # the classification head is never used
    return vit


def build(config: BackboneConfig) -> TimmDenseViT:
    """The DenseViT of ``config`` (the caller seeds the global RNG)."""
    return TimmDenseViT(config, create_model(config))


# --- the family adapter's look-ups without weights (ph_reg.models.factory, ph_reg.params) ------------------------

def is_known(name: str) -> bool:
    """Whether timm knows the architecture (a ``.<tag>`` suffix allowed)."""
    return timm.is_model(name.partition(".")[0])


def list_models() -> list[str]:
    return timm.list_models()


def pretrained_tags(name: str) -> list[str] | None:
    """The pretrained tags timm has for ``name``; None when the name already carries its tag after the dot."""
    if "." in name:
        return None
    return [full.partition(".")[2] for full in timm.list_pretrained(f"{name}.*")]


def patch_size(config: BackboneConfig) -> int:
    """The patch size of ``config.arch``, from the model built under the caller's ``torch.device("meta")``."""
    vit = timm.create_model(config.model_name, pretrained=False, **dict(config.model_kwargs))
    return vit.patch_embed.patch_size[0]


def meta_model(config: BackboneConfig) -> TimmDenseViT:
    """The DenseViT of ``config`` built under the caller's ``torch.device("meta")``: names and shapes, no data."""
    return TimmDenseViT(config, timm.create_model(config.model_name, pretrained=False, **timm_kwargs(config)))
