"""Planted artifacts: a deterministic implant that gives any :class:`~ph_reg.models.DenseViT` known artifact tokens.

A ViT with random weights has no artifacts. The implant reproduces the mechanism reported for large pretrained
ViTs (Darcet et al. 2024, "Vision Transformers Need Registers"; Jiang et al. 2025, "Vision Transformers Don't
Need Trained Registers") as an explicit, parameter-free module, so that a benchmark knows exactly which tokens
are artifacts (the *planted mask*) and what the clean features are (the same model without the implant).

Mechanism, applied to the patch tokens only (CLS, native register tokens and post-hoc registers never compete):

1. **Candidates are low-information patches.** Content score ``c = -log(pixel std of the patch + std_floor)``
   (spatial std per channel of the model's normalised input, averaged over channels), standardised over the
   patches of each image: uniform or low-variance patches (sky, walls, background, the white fill of a shifted
   view) score high.
2. **A competition that depends on absolute position.** Score ``s = c + position_weight * b(u, v)``, where ``b`` is
   a fixed random field over the normalised patch-centre coordinates ``(u, v) in (0, 1)^2``: a unit-variance
   Gaussian-process sample with a squared-exponential kernel of length ``position_scale``, drawn once from
   ``seed`` as random Fourier features. Being defined over normalised coordinates, it resamples to any grid. The
   top ``fraction`` of the patches of each image by ``s`` (at least one) win: the planted mask. Because ``b`` stays
   put while the content moves, the winners are **not shift-equivariant**, which is what TTA relies on.
3. **Write: a massive activation.** After block ``block`` (0-based; default the middle block ``depth // 2``),
   every winner gets ``strength * m * d`` added to its residual stream, where ``m`` is the median patch-token norm
   of its image at that point and ``d`` a fixed unit direction drawn from ``seed``: what the "register neurons"
   of a middle MLP write (Jiang et al.). Their norm is then far above the typical token norm in every later
   residual stream.
4. **Read: attention sinks.** In every later full block, attention logits towards the planted tokens get
   ``+ sink_logit`` (default ``log P`` for ``P`` patches: one planted key then draws about as much attention as
   all the patches together, whatever the resolution and the number of registers): from the CLS token and the
   registers (global readers) everywhere, and from patch tokens weighted by ``exp(-dist^2 / (2 sink_radius^2))``
   of their normalised grid distance to the planted token. In a pre-LayerNorm ViT a large norm alone does not
   attract attention (keys are computed from normed tokens; in a random ViT the planted tokens are practically
   ignored); in trained models the artifact tokens are attention sinks that hold global information, so the
   neighbouring and the global features are disturbed too. Planted tokens themselves read normally.

**Neuron mode** (``mode: neurons``): the write of step 3 is done by planted *register neurons* instead of an explicit
addition, so that a detection of register neurons (:mod:`ph_reg.models.test_time_registers`) has something to find.
``neurons`` hidden units are appended to the MLP of block ``block`` (forward hooks, no weight changes): their
activation, after the nonlinearity, is ``strength * m`` at the planted tokens and 0 elsewhere (``m``: the median
patch-token norm of the image at the block's *input*), and their output weights (``direction / neurons`` each) write
into the block's output, past any layer scale. The read of step 4 then follows the units' activation as the next
output projection sees it (after any intervention on them): a token is a sink in proportion ``w = activation /
(strength * m)`` (clamped to [0, 1]); global readers (CLS, registers, any other non-patch token) get ``sink_logit
* w`` towards every token, patch queries get the Gaussian-weighted logit towards patch keys only (a token outside
the grid has no distance), and a token reads with its row scaled by ``1 - w``. Without an intervention ``w`` is
the planted mask and the bias is that of the add mode. The planted mask and the clean model are the same in both
modes; the add mode (the default) is unchanged and serialises as before (``to_dict`` omits the neuron-mode keys).

The implant has no trainable parameters: its direction and field are non-persistent buffers derived from
``seed`` (they move with ``.to()``, survive pickling and never enter a state dict or the trainable set). The
planted mask depends only on the input images and the patch size, so ``model.planted_mask(images)`` is the
ground truth of any model that carries the implant (teacher and student alike).

Where the artifacts are visible: the final LayerNorm (``ln_post`` / ``norm``) equalises token norms, and the CLIP
dense heads (MaskCLIP, NACLIP, ...) normalise their input before a value-only readout, so a norm rule on the
dense output sees nothing. The norm-outlier rule therefore reads ``DenseViT.forward_tokens(images,
pre_norm=True)``: the last residual-stream state before any final normalisation (see that method). At the dense
output the artifacts show as a change of *direction*, read by the cosine to the clean model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ph_reg.config import from_mapping

__all__ = ["IMPLANT_MODES", "ImplantConfig", "ArtifactImplant", "patch_pixel_std", "position_field"]

IMPLANT_MODES = ("add", "neurons")  # the write: an explicit addition after the block, or planted MLP neurons

NUM_FOURIER_FEATURES = 256  # random Fourier features of the position field


@dataclass(frozen=True)
class ImplantConfig:
    """Parameters of the artifact implant (see the module docstring for the mechanism).

    ``block``: 0-based index of the block after which the implant writes; ``None`` = ``depth // 2``; negative
    indices count from the end. It must leave at least the last block to read the planted tokens.
    ``mode``: one of :data:`IMPLANT_MODES`; ``neurons``: the number of planted hidden units (neuron mode only).
    """

    block: int | None = None
    fraction: float = 0.04
    strength: float = 6.0
    position_weight: float = 1.5
    position_scale: float = 0.04
    std_floor: float = 0.02
    sink_logit: float | None = None
    sink_radius: float = 0.15
    seed: int = 0
    mode: str = "add"
    neurons: int = 1

    def __post_init__(self) -> None:
        if self.mode not in IMPLANT_MODES:
            raise ValueError(f"implant.mode must be one of {IMPLANT_MODES}, got {self.mode!r}")
        if not isinstance(self.neurons, int) or isinstance(self.neurons, bool) or self.neurons < 1:
            raise ValueError(f"implant.neurons must be an int >= 1, got {self.neurons!r}")
        if self.mode == "add" and self.neurons != 1:
            raise ValueError(f"implant.neurons applies to mode 'neurons' only, got {self.neurons} with mode 'add'")
        if self.block is not None and (not isinstance(self.block, int) or isinstance(self.block, bool)):
            raise ValueError(f"implant.block must be an int or None, got {self.block!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"implant.seed must be an int, got {self.seed!r}")
        for key in ("fraction", "strength", "position_weight", "position_scale", "std_floor", "sink_logit",
                    "sink_radius"):
            value = getattr(self, key)
            if key == "sink_logit" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"implant.{key} must be a finite number, got {value!r}")
            object.__setattr__(self, key, float(value))
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"implant.fraction must be in (0, 1], got {self.fraction}")
        for key in ("strength", "position_scale", "std_floor", "sink_radius"):
            if getattr(self, key) <= 0:
                raise ValueError(f"implant.{key} must be > 0, got {getattr(self, key)}")
        for key in ("position_weight", "sink_logit"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"implant.{key} must be >= 0, got {getattr(self, key)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], section: str = "implant") -> ImplantConfig:
        """The config of a mapping of implant parameters: :func:`ph_reg.config.from_mapping`."""
        return from_mapping(cls, d, section)

    def to_dict(self) -> dict[str, Any]:
        """Every field; in the add mode without ``mode`` and ``neurons``, the form stored before the neuron mode
        existed (configs and reports of the add mode stay as they were)."""
        d = dataclasses.asdict(self)
        if self.mode == "add":
            del d["mode"], d["neurons"]
        return d

    def block_index(self, depth: int) -> int:
        """The resolved 0-based block index for a model with ``depth`` blocks."""
        index = depth // 2 if self.block is None else self.block
        if not -depth <= index < depth:
            raise ValueError(f"implant.block {self.block} is out of range for {depth} blocks")
        index %= depth
        if index > depth - 2:
            raise ValueError(f"implant.block {self.block} leaves no later block to read the planted tokens "
                             f"({depth} blocks): use a block index <= {depth - 2}")
        return index


def patch_pixel_std(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, H / p, W / p) float32: per-patch spatial std of each channel, averaged over channels."""
    b, c, height, width = images.shape
    h, w = height // patch_size, width // patch_size
    patches = images.float().reshape(b, c, h, patch_size, w, patch_size)
    return patches.std(dim=(3, 5), correction=0).mean(dim=1)


def position_field(frequencies: Tensor, phases: Tensor, grid: tuple[int, int]) -> Tensor:
    """The random field ``sqrt(2 / F) * sum_f cos(2 pi <w_f, (u, v)> + phi_f)`` at the patch centres of ``grid``:
    (h, w) float32, on the device of ``frequencies``."""
    h, w = grid
    device = frequencies.device
    u = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    v = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    coords = torch.stack(torch.meshgrid(u, v, indexing="ij"), dim=-1)  # (h, w, 2)
    angles = 2 * math.pi * coords @ frequencies.float().T + phases.float()
    return math.sqrt(2.0 / frequencies.shape[0]) * torch.cos(angles).sum(dim=-1)


class _Write:
    """The state of one implanted forward (neuron mode): the planted tokens, their amplitude, the units' activation
    as the output projection read it, and the resulting sink weights ``sinks`` (B, N) for the read."""

    def __init__(self, mask: Tensor, patch_start: int):
        self.mask, self.patch_start = mask, patch_start
        self.amplitude: Tensor | None = None  # (B,) strength * median input patch norm
        self.units: Tensor | None = None  # (B, N, neurons) the units' activation after any intervention
        self.sinks: Tensor | None = None


class ArtifactImplant(nn.Module):
    """The implant of one model: selection (:meth:`select`), write (:meth:`plant`), read (:meth:`attention_bias`).

    ``width`` is the residual-stream width and ``depth`` the number of blocks of the model that carries it.
    """

    def __init__(self, config: ImplantConfig, width: int, depth: int):
        super().__init__()
        self.config = config
        self.block = config.block_index(depth)
        generator = torch.Generator().manual_seed(config.seed)
        direction = torch.randn(width, generator=generator, dtype=torch.float64)
        # squared-exponential kernel of length l <=> frequencies ~ N(0, 1 / (2 pi l)^2)
        frequencies = torch.randn(NUM_FOURIER_FEATURES, 2, generator=generator, dtype=torch.float64)
        phases = torch.rand(NUM_FOURIER_FEATURES, generator=generator, dtype=torch.float64) * 2 * math.pi
        self.register_buffer("direction", (direction / direction.norm()).float(), persistent=False)
        self.register_buffer("frequencies", (frequencies / (2 * math.pi * config.position_scale)).float(),
                             persistent=False)
        self.register_buffer("phases", phases.float(), persistent=False)
        self._hidden: int | None = None  # neuron mode: the MLP's own hidden width (install)
        self._write: _Write | None = None  # neuron mode: the state of the forward in progress (writing)

    @property
    def neuron_mode(self) -> bool:
        return self.config.mode == "neurons"

    def planted_neurons(self) -> list[tuple[int, int]]:
        """Neuron mode: the (block, hidden index) of the planted units, appended after the MLP's own units."""
        if not self.neuron_mode or self._hidden is None:
            raise ValueError("planted neurons exist only in implant mode 'neurons' once installed in a model")
        return [(self.block, self._hidden + i) for i in range(self.config.neurons)]

    def install(self, site: Any) -> None:
        """Neuron mode: hooks on the implant block's MLP (``site``, a :class:`ph_reg.models.backbone.MlpSite`): read
        the block input, append the units after the nonlinearity, strip them before the output projection, write
        their output into the block's output. Prepended, so they run before any later hook (detection, test-time
        registers see the units; their interventions reach the write)."""
        if not self.neuron_mode:
            raise ValueError("install: the implant is in mode 'add' (an explicit addition, no neurons)")
        self._hidden = site.hidden
        site.block.register_forward_pre_hook(self._read_input, prepend=True)
        site.act.register_forward_hook(self._add_units, prepend=True)
        site.proj.register_forward_pre_hook(self._strip_units, prepend=True)
        site.block.register_forward_hook(self._write_output, prepend=True)

    @contextmanager
    def writing(self, mask: Tensor, patch_start: int) -> Iterator[_Write]:
        """The span of a forward through the implant block: the neuron-mode hooks read ``mask`` (B, h, w) and the
        patch offset; the yielded state holds the sink weights afterwards. In the add mode only a holder."""
        write = _Write(mask, patch_start)
        if not self.neuron_mode:
            yield write
            return
        if self._write is not None:
            raise RuntimeError("the implant's neuron-mode forward is not re-entrant")
        self._write = write
        try:
            yield write
        finally:
            self._write = None

    def _state(self) -> _Write:
        if self._write is None:
            raise RuntimeError("the implant block ran outside an implanted forward (DenseViT.forward); in neuron "
                               "mode it needs the planted mask (gradient checkpointing of it is not supported)")
        return self._write

    def _read_input(self, block: nn.Module, args: tuple) -> None:
        write = self._state()
        x, num_patches = args[0], write.mask.shape[1] * write.mask.shape[2]
        patches = x[:, write.patch_start:write.patch_start + num_patches]
        median = torch.linalg.vector_norm(patches.float(), dim=-1).median(dim=1).values
        write.amplitude = (self.config.strength * median).clamp_min(torch.finfo(torch.float32).tiny)

    def _add_units(self, act: nn.Module, args: tuple, output: Tensor) -> Tensor:
        write = self._state()
        b, n = output.shape[:2]
        planted = torch.zeros(b, n, device=output.device)
        num_patches = write.mask.shape[1] * write.mask.shape[2]
        planted[:, write.patch_start:write.patch_start + num_patches] = write.mask.reshape(b, num_patches).float()
        units = (write.amplitude.view(b, 1) * planted).unsqueeze(-1).expand(b, n, self.config.neurons)
        return torch.cat([output, units.to(output.dtype)], dim=-1)

    def _strip_units(self, proj: nn.Module, args: tuple) -> tuple:
        write, hidden = self._state(), args[0]
        write.units = hidden[..., self._hidden:]
        return (hidden[..., :self._hidden], *args[1:])

    def _write_output(self, block: nn.Module, args: tuple, output: Tensor) -> Tensor:
        write = self._state()
        level = write.units.float().mean(dim=-1)  # (B, N): each unit writes direction / neurons
        write.sinks = (level / write.amplitude.view(-1, 1)).clamp(0.0, 1.0)
        delta = level.unsqueeze(-1) * self.direction.to(output.device).view(1, 1, -1)
        return output + delta.to(output.dtype)

    def extra_repr(self) -> str:
        return f"block={self.block}, " + ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items() if k != "block")

    def num_planted(self, grid: tuple[int, int]) -> int:
        """Planted tokens per image on a grid: ``round(fraction * h * w)``, at least 1."""
        return max(1, round(self.config.fraction * grid[0] * grid[1]))

    def scores(self, images: Tensor, patch_size: int) -> Tensor:
        """Competition scores (B, h, w) float32: standardised low-information score + weighted position field."""
        content = -torch.log(patch_pixel_std(images, patch_size) + self.config.std_floor)
        mean = content.mean(dim=(1, 2), keepdim=True)
        std = content.std(dim=(1, 2), keepdim=True, correction=0).clamp_min(torch.finfo(torch.float32).eps)
        field = position_field(self.frequencies.to(images.device), self.phases.to(images.device),
                               tuple(content.shape[1:]))
        return (content - mean) / std + self.config.position_weight * field

    def select(self, images: Tensor, patch_size: int) -> Tensor:
        """The planted mask (B, h, w) bool of normalised images (B, C, H, W): the top-scoring patches per image."""
        scores = self.scores(images, patch_size)
        b, h, w = scores.shape
        top = scores.reshape(b, h * w).topk(self.num_planted((h, w)), dim=1).indices
        mask = torch.zeros(b, h * w, dtype=torch.bool, device=scores.device)
        return mask.scatter_(1, top, True).reshape(b, h, w)

    def plant(self, x: Tensor, mask: Tensor, patch_start: int) -> Tensor:
        """Add ``strength * median patch norm * direction`` to the planted patch tokens of ``x`` (B, N, D), whose
        patch tokens are ``x[:, patch_start:patch_start + h * w]`` in row-major grid order. Returns a new tensor.
        Neuron mode: ``x`` itself (the planted units wrote inside the block)."""
        if self.neuron_mode:
            return x
        b, num_patches = mask.shape[0], mask.shape[1] * mask.shape[2]
        patches = x[:, patch_start:patch_start + num_patches]
        median = torch.linalg.vector_norm(patches.float(), dim=-1).median(dim=1).values  # (B,)
        amplitude = self.config.strength * median.view(b, 1, 1) * mask.reshape(b, num_patches, 1).to(median.dtype)
        delta = (amplitude * self.direction.to(x.device).view(1, 1, -1)).to(x.dtype)
        return torch.cat([x[:, :patch_start], patches + delta, x[:, patch_start + num_patches:]], dim=1)

    def attention_bias(self, mask: Tensor, num_tokens: int, patch_start: int, sinks: Tensor | None = None) -> Tensor:
        """Additive attention logits (B, N, N) float32 (rows: queries, columns: keys) towards the planted tokens.

        Non-patch queries (CLS, registers) get ``sink_logit`` (default ``log(h * w)``) on every planted key; patch
        queries get it weighted by a Gaussian of the normalised grid distance; planted queries and other keys get 0.
        Neuron mode: ``sinks`` (B, N), the sink weights of the forward (``writing``), replace the mask (see the
        module docstring). The same for every head: the models add it as (B, 1, N, N), broadcast over the heads.
        """
        if self.neuron_mode:
            if sinks is None:
                raise ValueError("attention_bias in neuron mode needs the sink weights of the implant block's forward")
            return self._neuron_attention_bias(mask, sinks, patch_start)
        b, h, w = mask.shape
        sink, local = self._sink_logits(mask)
        num_patches = h * w
        device = mask.device
        planted = mask.reshape(b, 1, num_patches).float()
        bias = torch.zeros(b, num_tokens, num_tokens, device=device)
        patch_rows = slice(patch_start, patch_start + num_patches)
        bias[:, :, patch_rows] = sink * planted  # global readers
        bias[:, patch_rows, patch_rows] = local * planted
        bias[:, patch_rows] *= (~mask.reshape(b, num_patches, 1)).float()  # planted tokens read normally
        return bias

    def _sink_logits(self, mask: Tensor) -> tuple[float, Tensor]:
        """(sink logit, (P, P) Gaussian-weighted logits between the patches of the grid of ``mask``)."""
        _, h, w = mask.shape
        sink = math.log(h * w) if self.config.sink_logit is None else self.config.sink_logit
        device = mask.device
        u = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        v = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        coords = torch.stack(torch.meshgrid(u, v, indexing="ij"), dim=-1).reshape(h * w, 2)
        sq_dist = (coords[:, None, :] - coords[None, :, :]).square().sum(dim=-1)
        return sink, sink * torch.exp(-sq_dist / (2 * self.config.sink_radius ** 2))

    def _neuron_attention_bias(self, mask: Tensor, sinks: Tensor, patch_start: int) -> Tensor:
        """The neuron-mode read: global readers towards every token by its sink weight, patch queries towards
        patch keys by the Gaussian-weighted logit times the weight, rows scaled by ``1 - weight``."""
        sink, local = self._sink_logits(mask)
        weights = sinks.float()
        b, n = weights.shape
        patch_rows = slice(patch_start, patch_start + local.shape[0])
        bias = (sink * weights).unsqueeze(1).repeat(1, n, 1)
        bias[:, patch_rows] = 0.0
        bias[:, patch_rows, patch_rows] = local * weights[:, None, patch_rows]
        return bias * (1.0 - weights).unsqueeze(-1)
