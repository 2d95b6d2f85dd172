"""Dense ViT backbones with post-hoc registers (PH-Reg).

``build_backbone(config)`` wraps an open_clip CLIP vision tower or a timm ``VisionTransformer`` in a
:class:`DenseViT` whose forward returns dense patch features ``(B, h, w, C)`` and the CLS feature ``(B, C)``.

- ``m`` post-hoc registers (``randn(m, D) / sqrt(D)``, no positional embedding) take part in every block and
  never appear in the output. open_clip order: ``[CLS, patches, registers]`` (appended after the positional
  embedding, before ``ln_pre``); timm order: ``[registers, CLS, (native reg tokens), patches]`` (after
  ``_pos_embed``, before ``patch_drop``/``norm_pre``).
- open_clip heads (last block only, see :mod:`.clip_heads`): ``vanilla`` | ``maskclip`` | ``maskclip_official``
  | ``sclip`` | ``clearclip`` | ``naclip``; every token then goes through ``ln_post`` and ``@ proj``. timm head:
  ``final_norm`` (the final LayerNormed tokens).
- The model is built frozen (every ``requires_grad`` False); ``set_trainable`` unlocks parameter groups.
- Positional embedding at grids other than the stored one: ``BackboneConfig.pos_embed_interp`` (see
  :data:`POS_EMBED_INTERP`), ``"official"`` resizing once from the pretrained table as the official code does,
  ``"explicit_size"`` this project's earlier rule.
- ``implant`` (optional, see :mod:`ph_reg.models.implant`): planted artifact tokens with a known mask, carried by every
  model built from the config (teacher and student); ``forward_tokens(images, pre_norm=True)`` returns the
  residual-stream tokens before any final normalisation, where their norm is visible.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, NamedTuple

import open_clip
import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ph_reg.models.implant import ArtifactImplant, ImplantConfig
from ph_reg.models.clip_heads import CLIP_HEADS

ARCHITECTURES_DIR = Path(__file__).parent / "architectures"
open_clip.add_model_config(ARCHITECTURES_DIR)  # makes "open_clip:ph-reg-tiny-ViT-16" available

FAMILIES = ("open_clip", "timm")
HEADS = {
    "open_clip": ("default", "vanilla", *CLIP_HEADS),
    "timm": ("default", "final_norm"),
}
DEFAULT_HEAD = {"open_clip": "vanilla", "timm": "final_norm"}
DEFAULT_TRAINABLE = ("registers", "pos_embed", "patch_embed", "last_block")
HF_HUB_PREFIX = "hf-hub:"
RESERVED_TIMM_KWARGS = ("pretrained", "pretrained_cfg_overlay", "img_size", "dynamic_img_size")
POS_EMBED_INTERPOLATION = "bicubic"
#: ``BackboneConfig.pos_embed_interp`` values. Every rule is bicubic with align_corners False, computed in float32,
#: CLS (prefix) rows kept, and leaves the table unchanged at its own grid.
#: ``official``: what the official code did. open_clip: ``scale_factor = (new_side + 0.1) / old_side``
#: (recompute_scale_factor False; sinahmr/NACLIP ``clip/model.py`` and 0raiser0/PH-Reg
#: ``CLIP/models/augNaCLIP/model.py`` (teacher) and ``CLIP/zero_shot/models/student_CLIP.py`` (student)
#: ``interpolate_pos_encoding``). Frozen models (teacher, baseline heads) keep the pretrained table and resize it
#: once to each input's grid; the student (``BackboneConfig.student``) stores its table at the ``img_size`` grid,
#: resized once from the pretrained one at build (StudentCLIP's constructor, where it is trained), and resizes
#: that stored table for other inputs (StudentCLIP's forward). timm: Hugging Face
#: ``Dinov2Embeddings.interpolate_pos_encoding`` as PH-Reg's ``DINOv2_full`` code ran it (transformers >= 4.45:
#: explicit output size, no antialiasing); every model, student included, keeps the pretrained table and resizes it
#: at every forward whose grid differs (HF never resizes at load time).
#: ``explicit_size``: this project's earlier rule, kept as an option. Every model stores its table at the
#: ``img_size`` grid and resizes that stored table for other inputs. open_clip: bicubic to the explicit output
#: size (so a baseline head built at 448 and run on 336 crops is resized 14 -> 28 -> 21). timm: timm's own
#: ``resample_abs_pos_embed`` (antialiased bicubic), at load time (``img_size``) and per forward.
POS_EMBED_INTERP = ("official", "explicit_size")
#: what a configuration without the key gets: the behaviour before the option existed (old student configs load
#: unchanged); conf/base, conf/paper and conf/paper_dinov2 set ``official``
DEFAULT_POS_EMBED_INTERP = "explicit_size"
#: the "+0.1" of the official open_clip rule (DINO's guard against float rounding of the output size,
#: facebookresearch/dino issue 8); it also shifts the sampling positions, so it changes the values
OFFICIAL_SCALE_OFFSET = 0.1


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be fetched (no network, empty Hugging Face cache or unknown tag)."""


@dataclass(frozen=True)
class BackboneConfig:
    """What to build: architecture, weights source, resolution, dense head and number of registers.

    ``arch`` is ``"<family>:<name>"`` with family ``open_clip`` (``ViT-B-16``, ``hf-hub:apple/DFN2B-CLIP-ViT-B-16``)
    or ``timm`` (``vit_base_patch14_dinov2``). ``pretrained`` is an open_clip / timm tag (for ``hf-hub:`` names
    any non-empty value means "the hub repo's weights"); ``checkpoint`` a local weights file (for OpenAI weights
    from a file use the ``-quickgelu`` open_clip name). Neither: seeded random weights from ``init_seed``.
    ``implant``: ``None`` (the clean model) or the parameters of :class:`ph_reg.models.implant.ImplantConfig` (stored
    with every default filled in).
    ``pos_embed_interp``: how the positional embedding is resized to other grids, one of :data:`POS_EMBED_INTERP`
    (see there). ``student``: True for the distilled student, False for frozen models (teacher, baseline heads);
    under ``official`` an open_clip student stores its positional embedding at the ``img_size`` grid and frozen
    models keep the pretrained table; no effect otherwise. The pipelines set it; it is not a ``backbone`` key.
    """

    arch: str
    pretrained: str | None = None
    checkpoint: str | None = None
    img_size: int = 224
    head: str = "default"
    num_registers: int = 0
    init_seed: int = 0
    model_kwargs: dict = field(default_factory=dict, hash=False)
    implant: dict | None = field(default=None, hash=False)
    pos_embed_interp: str = DEFAULT_POS_EMBED_INTERP
    student: bool = False

    def __post_init__(self) -> None:
        family, sep, name = self.arch.partition(":")
        if not sep or family not in FAMILIES or not name:
            raise ValueError(f"arch must be '<family>:<name>' with family one of {FAMILIES}, got {self.arch!r}")
        if self.head not in HEADS[family]:
            raise ValueError(f"head {self.head!r} is not valid for {family}; expected one of {HEADS[family]}")
        if self.pretrained is not None and self.checkpoint is not None:
            raise ValueError("pretrained and checkpoint are mutually exclusive: set at most one of them")
        for key in ("img_size", "num_registers", "init_seed"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{key} must be an int, got {value!r}")
        if self.img_size <= 0:
            raise ValueError(f"img_size must be positive, got {self.img_size}")
        if self.num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {self.num_registers}")
        if self.pos_embed_interp not in POS_EMBED_INTERP:
            raise ValueError(f"pos_embed_interp must be one of {POS_EMBED_INTERP}, got {self.pos_embed_interp!r}")
        if not isinstance(self.student, bool):
            raise ValueError(f"student must be true or false, got {self.student!r}")
        if not isinstance(self.model_kwargs, Mapping):
            raise ValueError(f"model_kwargs must be a mapping, got {type(self.model_kwargs).__name__}")
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))
        if self.implant is not None:
            object.__setattr__(self, "implant", ImplantConfig.from_dict(self.implant).to_dict())

    @property
    def family(self) -> str:
        return self.arch.partition(":")[0]

    @property
    def model_name(self) -> str:
        return self.arch.partition(":")[2]

    @property
    def resolved_head(self) -> str:
        return DEFAULT_HEAD[self.family] if self.head == "default" else self.head

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BackboneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown BackboneConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DenseOutput(NamedTuple):
    patch: Tensor  # (B, h, w, C): patch tokens only, never CLS or registers
    cls: Tensor  # (B, C)


def resize_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                     num_prefix_tokens: int = 1, scale_offset: float | None = None,
                     antialias: bool = False) -> Tensor:
    """Resize the patch part of a ``(prefix + gh * gw, D)`` or ``(1, prefix + gh * gw, D)`` positional embedding
    bicubically (align_corners False, in float32, back to the input dtype); prefix rows (CLS) are kept. Returns
    ``pos_embed`` itself when the grid is unchanged.

    ``scale_offset`` None: to the explicit output size ``new_grid`` (``antialias`` as given). A number ``o``: with
    ``scale_factor = (new + o) / old`` per axis and ``recompute_scale_factor=False`` (the official open_clip rule
    with ``o = 0.1``, see :data:`POS_EMBED_INTERP`); ``antialias`` must then be False.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return pos_embed
    table = pos_embed if pos_embed.ndim == 3 else pos_embed.unsqueeze(0)
    prefix, grid = table[:, :num_prefix_tokens], table[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, dim).permute(0, 3, 1, 2).float()
    if scale_offset is None:
        grid = F.interpolate(grid, size=new_grid, mode=POS_EMBED_INTERPOLATION, align_corners=False,
                             antialias=antialias)
    else:
        if antialias:
            raise ValueError("resize_pos_embed: antialias is only supported with an explicit output size")
        scale = tuple((new + scale_offset) / old for new, old in zip(new_grid, old_grid))
        grid = F.interpolate(grid, scale_factor=scale, mode=POS_EMBED_INTERPOLATION, align_corners=False,
                             recompute_scale_factor=False)
        if tuple(grid.shape[-2:]) != new_grid:
            raise ValueError(f"resize_pos_embed: scale_offset {scale_offset} resized {old_grid} to "
                             f"{tuple(grid.shape[-2:])}, not {new_grid}")
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    out = torch.cat([prefix, grid], dim=1)
    return out if pos_embed.ndim == 3 else out[0]


class DenseViT(nn.Module):
    """Base class: registers, normalisation, trainable groups. Subclasses implement the family's forward."""

    def __init__(self, config: BackboneConfig, vit: nn.Module, patch_size: int, embed_dim: int, width: int,
                 mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.config = config
        self.vit = vit
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.num_registers = config.num_registers
        if config.num_registers > 0:
            generator = torch.Generator().manual_seed(config.init_seed)
            init = torch.randn(config.num_registers, width, generator=generator) / math.sqrt(width)
            self.registers = nn.Parameter(init)
        else:
            self.register_parameter("registers", None)
        self.implant = None
        if config.implant is not None:
            self.implant = ArtifactImplant(ImplantConfig.from_dict(config.implant), width, self._blocks_prefix()[1])
        self.requires_grad_(False)

    @property
    def head(self) -> str:
        return self.config.resolved_head

    def fill_value(self) -> Tensor:
        """(3,) value of a white pixel in the model's input normalisation: ``(1 - mean) / std``."""
        device = next(self.parameters()).device
        mean = torch.tensor(self.mean, device=device)
        std = torch.tensor(self.std, device=device)
        return (1 - mean) / std

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        if height % self.patch_size or width % self.patch_size or height <= 0 or width <= 0:
            raise ValueError(f"image size {height}x{width} must be positive and divisible by the patch size "
                             f"{self.patch_size}")
        return height // self.patch_size, width // self.patch_size

    def _checked_grid(self, images: Tensor) -> tuple[int, int]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        return self.grid_size(images.shape[-2], images.shape[-1])

    def forward(self, images: Tensor) -> DenseOutput:
        """Dense features of normalised images (B, 3, H, W), H and W divisible by the patch size."""
        return self._forward_dense(images, self._checked_grid(images))

    def forward_tokens(self, images: Tensor, pre_norm: bool = True) -> DenseOutput:
        """``pre_norm=False``: the dense output (as ``forward``). ``pre_norm=True``: the patch and CLS tokens of the
        last residual-stream state before any final normalisation (width D, no projection): the output of the
        last block for timm and for the open_clip ``vanilla`` head; the input of the dense head for the open_clip
        heads that replace the last block (MaskCLIP, NACLIP, ...), which normalise their input first. Token
        norms, and so high-norm artifacts, are visible only here: the final LayerNorm equalises them."""
        return self._forward_dense(images, self._checked_grid(images), pre_norm=pre_norm)

    def planted_mask(self, images: Tensor) -> Tensor:
        """The implant's ground-truth artifact mask (B, h, w) bool for normalised images (see ph_reg.models.implant)."""
        if self.implant is None:
            raise ValueError(f"this {self.config.arch} model has no implant (BackboneConfig.implant is None)")
        self._checked_grid(images)
        return self.implant.select(images, self.patch_size)

    def _forward_dense(self, images: Tensor, grid: tuple[int, int], pre_norm: bool = False) -> DenseOutput:
        raise NotImplementedError

    def _attention_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype attention logits are computed in: the autocast dtype when autocast is on, else ``x``'s."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def _expand_registers(self, x: Tensor) -> Tensor:
        return self.registers.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)

    # --- trainable parameter groups
    def _blocks_prefix(self) -> tuple[str, int]:
        """(parameter-name prefix of the transformer blocks, number of blocks)."""
        raise NotImplementedError

    def _named_groups(self) -> dict[str, list[str]]:
        """Group name -> fnmatch patterns over parameter names (blocks are handled separately)."""
        raise NotImplementedError

    def _group_patterns(self, name: str) -> list[str]:
        if name == "last_block":
            name = "block:-1"
        if name.startswith("block:"):
            prefix, depth = self._blocks_prefix()
            try:
                index = int(name.removeprefix("block:"))
            except ValueError:
                raise ValueError(f"trainable group {name!r}: expected 'block:<int>' (e.g. 'block:-2')") from None
            if not -depth <= index < depth:
                raise ValueError(f"trainable group {name!r}: block index out of range for {depth} blocks")
            return [f"{prefix}.{index % depth}.*"]
        return self._named_groups().get(name, [name])

    def set_trainable(self, names: Sequence[str]) -> list[str]:
        """Freeze everything, then unlock the named groups; return the sorted names of the unlocked parameters.

        Groups: ``registers``, ``pos_embed``, ``patch_embed``, ``last_block``, ``block:<index>`` (negative indices
        allowed), or else an fnmatch pattern on parameter names. ``registers`` with no registers matches nothing
        and is allowed; any other name matching nothing raises ValueError.
        """
        if isinstance(names, str):
            names = [names]
        params = dict(self.named_parameters())
        selected: set[str] = set()
        for name in names:
            patterns = self._group_patterns(name)
            matched = {p for p in params if any(fnmatchcase(p, pat) for pat in patterns)}
            if not matched and name != "registers":
                raise ValueError(f"trainable group {name!r} matches no parameter of {self.config.arch}; use one of "
                                 f"{DEFAULT_TRAINABLE}, 'block:<index>' or an fnmatch pattern on parameter names")
            selected |= matched
        for pname, param in params.items():
            param.requires_grad_(pname in selected)
        return sorted(selected)


class OpenClipDenseViT(DenseViT):
    """open_clip CLIP vision tower; tokens ``[CLS, patches, registers]``; last block replaced by the head."""

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

    def _run_blocks(self, blocks: Sequence[nn.Module], x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        transformer = self.vit.transformer
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        for block in blocks:
            if attn_mask is not None:
                if transformer.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
                else:
                    x = block(x, attn_mask=attn_mask)
            elif transformer.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x if transformer.batch_first else x.transpose(0, 1)

    def _run_implanted(self, blocks: Sequence[nn.Module], x: Tensor, images: Tensor) -> Tensor:
        """Run ``blocks`` with the implant: plant after block ``implant.block``, attention sinks afterwards."""
        implant = self.implant
        x = self._run_blocks(blocks[:implant.block + 1], x)
        mask = implant.select(images, self.patch_size)
        x = implant.plant(x, mask, patch_start=1)
        bias = implant.attention_bias(mask, x.shape[1], patch_start=1).to(self._attention_dtype(x))
        heads = blocks[0].attn.num_heads
        return self._run_blocks(blocks[implant.block + 1:], x, attn_mask=bias.repeat_interleave(heads, dim=0))

    def _forward_dense(self, images: Tensor, grid: tuple[int, int], pre_norm: bool = False) -> DenseOutput:
        vit = self.vit
        x = vit.conv1(images).flatten(2).transpose(1, 2)  # (B, h*w, D)
        cls_token = vit.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_token, x], dim=1) + self.pos_embed(grid).to(x.dtype)
        if self.registers is not None:
            x = torch.cat([x, self._expand_registers(x)], dim=1)
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
            y = x if self.head == "vanilla" else CLIP_HEADS[self.head](blocks[-1], x, grid=grid,
                                                                         num_registers=self.num_registers)
            y = vit.ln_post(y)
            if vit.proj is not None:
                y = y @ vit.proj
        num_patches = grid[0] * grid[1]
        patch = y[:, 1:1 + num_patches].reshape(y.shape[0], *grid, y.shape[-1])
        return DenseOutput(patch=patch, cls=y[:, 0])

    def _blocks_prefix(self) -> tuple[str, int]:
        return "vit.transformer.resblocks", len(self.vit.transformer.resblocks)

    def _named_groups(self) -> dict[str, list[str]]:
        return {"registers": ["registers"], "pos_embed": ["vit.positional_embedding"], "patch_embed": ["vit.conv1.*"]}


class TimmDenseViT(DenseViT):
    """timm VisionTransformer; tokens ``[registers, CLS, (native reg tokens), patches]``; final norm output."""

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

    def _run_implanted(self, x: Tensor, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """All blocks with the implant: plant after block ``implant.block``, attention sinks afterwards."""
        implant, blocks = self.implant, self.vit.blocks
        use_checkpoint = self.vit.grad_checkpointing and torch.is_grad_enabled()
        patch_start = x.shape[1] - grid[0] * grid[1]
        bias = None
        for index, block in enumerate(blocks):
            if use_checkpoint:
                x = checkpoint(block, x, bias, use_reentrant=False)
            else:
                x = block(x, attn_mask=bias)
            if index == implant.block:
                mask = implant.select(images, self.patch_size)
                x = implant.plant(x, mask, patch_start=patch_start)
                bias = implant.attention_bias(mask, x.shape[1], patch_start=patch_start)
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

    def _forward_dense(self, images: Tensor, grid: tuple[int, int], pre_norm: bool = False) -> DenseOutput:
        vit = self.vit
        x = vit.patch_embed(images)  # (B, h, w, D) with dynamic_img_size
        x = self._add_pos_embed(x)  # (B, prefix + h*w, D)
        if self.registers is not None:
            x = torch.cat([self._expand_registers(x), x], dim=1)
        x = vit.norm_pre(vit.patch_drop(x))
        if self.implant is not None:
            x = self._run_implanted(x, images, grid)
        elif vit.grad_checkpointing and torch.is_grad_enabled():
            for block in vit.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = vit.blocks(x)
        if not pre_norm:
            x = vit.norm(x)
        num_patches = grid[0] * grid[1]
        patch = x[:, -num_patches:].reshape(x.shape[0], *grid, x.shape[-1])
        cls = x[:, self.num_registers] if vit.cls_token is not None else patch.mean(dim=(1, 2))
        return DenseOutput(patch=patch, cls=cls)

    def _blocks_prefix(self) -> tuple[str, int]:
        return "vit.blocks", len(self.vit.blocks)

    def _named_groups(self) -> dict[str, list[str]]:
        return {"registers": ["registers"], "pos_embed": ["vit.pos_embed"], "patch_embed": ["vit.patch_embed.*"]}


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


def _weights_unavailable(config: BackboneConfig, exc: Exception, hint: str = "") -> WeightsUnavailableError:
    """One clear message (raised ``from None``, so no hub stack trace); the hub's error stays in ``.original``."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    error = WeightsUnavailableError(
        f"could not fetch pretrained weights for arch {config.arch!r} with pretrained={config.pretrained!r} "
        f"({type(exc).__name__}: {reason}). {hint}Either run once with network access (HF_HUB_OFFLINE unset) to "
        "fill the Hugging Face cache, or download the weights file on a machine with network access, copy it to "
        "e.g. data/01_raw/weights/, and set `checkpoint:` (backbone.checkpoint: data/01_raw/weights/<file>) with "
        "backbone.pretrained: null (OpenAI CLIP weights from a file need the '-quickgelu' arch, e.g. "
        "open_clip:ViT-B-16-quickgelu)."
    )
    error.original = exc
    return error


def _build_open_clip(config: BackboneConfig) -> OpenClipVisionTransformer:
    return _create_open_clip(config).visual


def _create_open_clip(config: BackboneConfig) -> nn.Module:
    """The full open_clip model (vision and text towers) of ``config``; the caller seeds the global RNG."""
    name = config.model_name
    kwargs = dict(config.model_kwargs)
    if name.startswith(HF_HUB_PREFIX):
        # config (and weights) come from the hub repo; open_clip ignores `pretrained` for hf-hub names
        try:
            model = open_clip.create_model(name, load_weights=config.pretrained is not None,
                                           require_pretrained=config.pretrained is not None, **kwargs)
        except Exception as exc:
            raise _weights_unavailable(config, exc) from None
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
            raise _weights_unavailable(config, exc, hint) from None
    else:
        model = open_clip.create_model(name, pretrained=config.checkpoint, **kwargs)
    return model


def timm_kwargs(config: BackboneConfig) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments of ``config`` (besides the weights): ``dynamic_img_size`` always;
    ``img_size`` (timm resizes the table at load time) only under ``explicit_size``: under ``official`` the table keeps
    the architecture's pretrained grid, as Hugging Face's DINOv2 does."""
    kwargs = dict(config.model_kwargs, dynamic_img_size=True)
    if config.pos_embed_interp == "explicit_size":
        kwargs["img_size"] = config.img_size
    return kwargs


def _build_timm(config: BackboneConfig) -> TimmVisionTransformer:
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
        raise _weights_unavailable(config, exc) from None
    vit.reset_classifier(0)  # the classification head is never used
    return vit


def build_backbone(config: BackboneConfig | Mapping[str, Any]) -> DenseViT:
    """Build the frozen dense backbone described by ``config`` (a BackboneConfig or its dict form).

    Two builds from the same config give bit-identical weights (random init is seeded with ``init_seed``).
    """
    config = _checked_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        if config.family == "open_clip":
            return OpenClipDenseViT(config, _build_open_clip(config))
        return TimmDenseViT(config, _build_timm(config))


def clean_copy(model: DenseViT) -> DenseViT:
    """The same model (same weights, head and registers) without its artifact implant: the clean ground truth of a
    planted-artifact benchmark. Eval mode, on the device of ``model``."""
    clean = build_backbone(BackboneConfig.from_dict({**model.config.to_dict(), "implant": None}))
    clean.load_state_dict(model.state_dict())  # the implant has no state, so the dicts match
    return clean.to(next(model.parameters()).device).eval()


def build_open_clip_model(config: BackboneConfig | Mapping[str, Any]) -> nn.Module:
    """The full open_clip CLIP model (vision and text towers) behind ``build_backbone(config)``, frozen, in eval
    mode: created by the same seeded call, so its ``visual`` has the same weights as the DenseViT's tower (before
    the positional embedding is resized to ``img_size``). Used for the text tower of zero-shot segmentation."""
    config = _checked_config(config)
    if config.family != "open_clip":
        raise ValueError(f"arch must be an open_clip architecture ('open_clip:<name>'), got {config.arch!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        model = _create_open_clip(config)
    return model.requires_grad_(False).eval()


def _checked_config(config: BackboneConfig | Mapping[str, Any]) -> BackboneConfig:
    if not isinstance(config, BackboneConfig):
        config = BackboneConfig.from_dict(config)
    if config.checkpoint is not None and not os.path.isfile(config.checkpoint):
        raise FileNotFoundError(
            f"checkpoint file not found: {config.checkpoint}. Download the {config.arch} weights once on a machine "
            "with network access (e.g. `huggingface-cli download <repo> <file>`, or build once with `pretrained:` "
            "set to fill the Hugging Face cache) and point `checkpoint:` at the local file."
        )
    return config


def trainable_state_dict(model: DenseViT) -> dict[str, Tensor]:
    """The parameters with ``requires_grad``, as detached contiguous CPU copies keyed by parameter name."""
    return {name: p.detach().to("cpu", copy=True).contiguous()
            for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: DenseViT, state: Mapping[str, Tensor]) -> None:
    """Copy ``state`` into the model's parameters (strict).

    Every key must name a model parameter with the same shape, and every currently trainable parameter
    (``requires_grad``) must be present; otherwise ValueError naming the offending keys.
    """
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state)
    mismatched = sorted(f"{n}: {tuple(state[n].shape)} vs model {tuple(params[n].shape)}"
                        for n in state if n in params and tuple(state[n].shape) != tuple(params[n].shape))
    if unknown or missing or mismatched:
        raise ValueError(f"state dict does not match the model's trainable parameters: unknown keys {unknown}, "
                         f"missing keys {missing}, shape mismatches {mismatched}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
