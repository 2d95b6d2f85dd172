"""Dense ViT backbones with post-hoc registers (PH-Reg): what every family shares.

:class:`BackboneConfig` (what to build), :class:`DenseViT` (the base class: registers, normalisation, trainable
groups) and the trainable state dicts. The families live in :mod:`ph_reg.models.open_clip` and
:mod:`ph_reg.models.timm`; :func:`ph_reg.models.factory.build_backbone` wraps an open_clip CLIP vision tower or
a timm ``VisionTransformer`` in a :class:`DenseViT` whose forward returns dense patch features ``(B, h, w, C)`` and the CLS feature ``(B, C)``.

- ``m`` post-hoc registers (``randn(m, D) / sqrt(D)``, no positional embedding) take part in every block and
  never appear in the output. open_clip order: ``[CLS, patches, registers]`` (appended after the positional
  embedding, before ``ln_pre``); timm order: ``[registers, CLS, (native reg tokens), patches]`` (after
  ``_pos_embed``, before ``patch_drop``/``norm_pre``).
- open_clip heads (last block only, see :mod:`.clip_heads`): ``vanilla`` | ``maskclip`` | ``maskclip_official``
  | ``sclip`` | ``clearclip`` | ``naclip``; every token then goes through ``ln_post`` and ``@ proj``. timm head:
  ``final_norm`` (the final LayerNormed tokens).
- The model is built frozen (every ``requires_grad`` False); ``set_trainable`` unlocks parameter groups.
- Positional embedding at grids other than the stored one: ``BackboneConfig.pos_embed_interp`` (see
  :data:`ph_reg.models.pos_embed.POS_EMBED_INTERP`), ``"official"`` resizing once from the pretrained table as the
  official code does, ``"explicit_size"`` this project's earlier rule.
- ``implant`` (optional, see :mod:`ph_reg.models.implant`): planted artifact tokens with a known mask, carried by every
  model built from the config (teacher and student); ``forward_tokens(images, pre_norm=True)`` returns the
  residual-stream tokens before any final normalisation, where their norm is visible.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ph_reg.config import from_mapping
from ph_reg.models.clip_heads import CLIP_HEADS
from ph_reg.models.implant import ArtifactImplant, ImplantConfig
from ph_reg.models.pos_embed import DEFAULT_POS_EMBED_INTERP, POS_EMBED_INTERP
from ph_reg.runtime import module_device

FAMILIES = ("open_clip", "timm")
HEADS = {
    "open_clip": ("default", "vanilla", *CLIP_HEADS),
    "timm": ("default", "final_norm"),
}
DEFAULT_HEAD = {"open_clip": "vanilla", "timm": "final_norm"}
DEFAULT_TRAINABLE = ("registers", "pos_embed", "patch_embed", "last_block")
HF_HUB_PREFIX = "hf-hub:"


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
    def from_dict(cls, d: Mapping[str, Any], section: str = "backbone") -> BackboneConfig:
        """The config of a mapping (a YAML section, a student's config.json): :func:`ph_reg.config.from_mapping`."""
        return from_mapping(cls, d, section)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DenseOutput(NamedTuple):
    patch: Tensor  # (B, h, w, C): patch tokens only, never CLS or registers
    cls: Tensor  # (B, C)


class MlpSite(NamedTuple):
    """Where a block's MLP can be read and changed (forward hooks): ``act`` outputs the hidden activations (after the
    nonlinearity, before the output projection ``proj``), ``hidden`` of them per token, implant units included."""

    block: nn.Module
    act: nn.Module
    proj: nn.Module
    hidden: int


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
        if config.num_registers > 0:
            generator = torch.Generator().manual_seed(config.init_seed)
            init = torch.randn(config.num_registers, width, generator=generator) / math.sqrt(width)
            self.registers = nn.Parameter(init)
        else:
            self.register_parameter("registers", None)
        self.implant = None
        if config.implant is not None:
            self.implant = ArtifactImplant(ImplantConfig.from_dict(config.implant), width, self._blocks_prefix()[1])
            if self.implant.neuron_mode:
                self.implant.install(self._mlp_site(self.implant.block))
        self.test_time_registers = None  # set by ph_reg.models.test_time_registers.attach_test_time_registers
        self.requires_grad_(False)

    @property
    def head(self) -> str:
        return self.config.resolved_head

    @property
    def num_registers(self) -> int:
        return self.config.num_registers

    @property
    def num_test_time_registers(self) -> int:
        """The number of zero test-time registers the forward appends (0 unless attached)."""
        return 0 if self.test_time_registers is None else self.test_time_registers.num_registers

    def _add_test_time_registers(self, x: Tensor, front: bool) -> Tensor:
        """``x`` (B, N, D) with the zero test-time registers in front or at the end; ``x`` itself when none."""
        count = self.num_test_time_registers
        if count == 0:
            return x
        zeros = x.new_zeros(x.shape[0], count, x.shape[-1])
        return torch.cat([zeros, x] if front else [x, zeros], dim=1)

    def mlp_site(self, index: int) -> MlpSite:
        """The MLP hook points of block ``index`` (0-based), implant units counted in ``hidden``."""
        site = self._mlp_site(index)
        if self.implant is not None and self.implant.neuron_mode and index == self.implant.block:
            site = site._replace(hidden=site.hidden + self.implant.config.neurons)
        return site

    def _mlp_site(self, index: int) -> MlpSite:
        raise NotImplementedError

    def runs_block(self, index: int, mlp: bool = False) -> bool:
        """Whether the forward runs block ``index`` as a block (``mlp``: whether it runs the block's MLP)."""
        return True

    def token_layout(self, num_tokens: int) -> tuple[slice, slice]:
        """(test-time registers, patch tokens) of a sequence of ``num_tokens`` tokens inside the blocks."""
        raise NotImplementedError

    #: The submodules of a block that form its MLP branch (norm, MLP, layer scale): open_clip's and timm's names.
    _MLP_BRANCH = ("ln_2", "mlp", "ls_2", "norm2", "ls2")

    def unread_parameters(self) -> list[str]:
        """The sorted names of the parameters the forward never reads with this head: the MLP branch (pre-norm,
        MLP, layer scale) of every block whose MLP it skips (see :meth:`runs_block`), e.g. the last block's
        ``ln_2`` and ``mlp`` under the MaskCLIP, ClearCLIP and NACLIP heads. They never get a gradient, so
        :meth:`set_trainable` keeps them frozen (and DDP needs no search for unused parameters). Parameters read in
        part (the q and k rows of the packed ``in_proj_weight`` under MaskCLIP) are read, as one tensor."""
        prefix, depth = self._blocks_prefix()
        skipped = [f"{prefix}.{index}.{part}." for index in range(depth) if not self.runs_block(index, mlp=True)
                   for part in self._MLP_BRANCH]
        return sorted(name for name, _ in self.named_parameters() if name.startswith(tuple(skipped)))

    def fill_value(self) -> Tensor:
        """(3,) value of a white pixel in the model's input normalisation: ``(1 - mean) / std``."""
        device = module_device(self)
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

    def forward_with_pre_norm(self, images: Tensor) -> tuple[DenseOutput, DenseOutput]:
        """``(forward(images), forward_tokens(images, pre_norm=True))`` from one forward, bit for bit: the dense
        output is computed from the pre-norm state, so both come out of the same pass."""
        return self._forward_dense(images, self._checked_grid(images), with_pre_norm=True)

    def planted_mask(self, images: Tensor) -> Tensor:
        """The implant's ground-truth artifact mask (B, h, w) bool for normalised images (see ph_reg.models.implant)."""
        if self.implant is None:
            raise ValueError(f"this {self.config.arch} model has no implant (BackboneConfig.implant is None)")
        self._checked_grid(images)
        return self.implant.select(images, self.patch_size)

    def _forward_dense(self, images: Tensor, grid: tuple[int, int], pre_norm: bool = False,
                       with_pre_norm: bool = False) -> DenseOutput | tuple[DenseOutput, DenseOutput]:
        """The dense output (``pre_norm``: the pre-norm tokens); ``with_pre_norm``: that and the pre-norm tokens."""
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
        and is allowed; any other name matching nothing raises ValueError. The parameters the head never reads
        (:meth:`unread_parameters`) stay frozen; a group that matches only those raises ValueError.
        """
        if isinstance(names, str):
            names = [names]
        params = dict(self.named_parameters())
        unread = set(self.unread_parameters())
        selected: set[str] = set()
        for name in names:
            patterns = self._group_patterns(name)
            matched = {p for p in params if any(fnmatchcase(p, pat) for pat in patterns)}
            if not matched and name != "registers":
                raise ValueError(f"trainable group {name!r} matches no parameter of {self.config.arch}; use one of "
                                 f"{DEFAULT_TRAINABLE}, 'block:<index>' or an fnmatch pattern on parameter names")
            if matched and matched <= unread:
                raise ValueError(f"trainable group {name!r} matches only parameters that the {self.head!r} head of "
                                 f"{self.config.arch} never reads ({', '.join(sorted(matched))}): they cannot learn")
            selected |= matched - unread
        for pname, param in params.items():
            param.requires_grad_(pname in selected)
        return sorted(selected)


def weights_unavailable(config: BackboneConfig, exc: Exception, hint: str = "") -> WeightsUnavailableError:
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


def checked_config(config: BackboneConfig | Mapping[str, Any]) -> BackboneConfig:
    """``config`` as a BackboneConfig, its ``checkpoint`` file (when set) checked to exist."""
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
