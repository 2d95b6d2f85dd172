"""Test-time registers (Jiang, Dravid, Efros, Gandelsman 2025, "Vision Transformers Don't Need Trained Registers",
arXiv 2506.08010; public code nickjiang2378/test-time-registers): post-hoc artifact removal without training.

1. **Detection** (:func:`detect_register_neurons`, the public ``find_register_neurons``). Over calibration images,
   run the frozen model and record per block the MLP hidden activations (after the nonlinearity, before the output
   projection) and the block outputs. Outlier positions: the tokens (all of them, CLS included, as in the public
   code) whose block-output norm at ``outlier_layer`` exceeds ``norm_threshold``. Every (layer, neuron) scores its
   mean absolute activation at the outlier positions of an image, averaged over the images that have outliers
   (optionally times the public code's sparsity filter); the pairs are ranked, restricted to ``lowest_layer ..
   highest_layer`` and the top ``top_k`` kept.
2. **Intervention** (:func:`attach_test_time_registers`, the public ``activate_on_registers``). ``num_registers``
   zero tokens are added to the sequence (the *test-time registers*: no positional embedding, they take part in
   attention and never appear in the dense output). In each block holding register neurons, after the nonlinearity,
   each register neuron's activation at the test-time registers becomes ``scale`` times its signed maximum over all
   tokens of the image (the value of larger magnitude of max and min) and at the patch tokens ``patch_values``:
   ``zero``, ``mean`` (the mean over the patches), ``only_outliers`` (the activations above mean + std of the
   patches set to the mean) or ``same`` (unchanged). CLS, native register tokens and post-hoc registers keep their
   activations (the public code has none of the latter two). ``max_over``: ``neuron`` (each neuron its own maximum,
   as the method is described) or ``layer`` (one maximum over all the layer's register neurons, what the public
   code's ``sign_max`` computes).

Where the test-time registers go: open_clip ``[CLS, patches, registers, test-time registers]`` (appended after the
positional embedding, before ``ln_pre``, as the public CLIP code does); timm ``[test-time registers, registers, CLS,
(native reg tokens), patches]`` (after ``_pos_embed``, before ``norm_pre``; the public DINOv2 code appends them at
the end, the order does not matter to attention). The CLIP dense heads see them as registers (NACLIP's spatial prior
is 0 on their rows and columns, the value-only MaskCLIP reads them and drops them with the registers).

Detection runs the model's pre-norm forward (``forward_tokens(images, pre_norm=True)``), which runs every block for
timm and for the open_clip ``vanilla`` head; the other open_clip heads replace the last block, so an outlier layer
there needs the same weights built with ``head: vanilla``. Weights are never changed: everything is forward hooks.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ph_reg.config import _known_keys, at_least, boolean, from_mapping, number_in, one_of, optional_at_least
from ph_reg.config import device as a_device
from ph_reg.data.prepare import SPLITS
from ph_reg.models.backbone import DenseViT
from ph_reg.runtime import module_device

__all__ = [
    "DETECTION_HEADS",
    "MAX_OVER",
    "PATCH_VALUES",
    "RegisterNeuron",
    "RegisterNeuronDetectionConfig",
    "TestTimeRegisters",
    "TestTimeRegistersConfig",
    "attach_from_artifact",
    "attach_test_time_registers",
    "detach_test_time_registers",
    "detect_register_neurons",
    "neuron_artifact",
    "register_neurons_from_rows",
]

log = logging.getLogger(__name__)

PATCH_VALUES = ("zero", "mean", "only_outliers", "same")  # the public code's normal_values
#: The head a detection runs, per family: one that runs every block (the open_clip dense heads replace the last).
DETECTION_HEADS = {"open_clip": "vanilla", "timm": "final_norm"}
MAX_OVER = ("neuron", "layer")


@dataclass(frozen=True)
class TestTimeRegistersConfig:
    """Detection and intervention parameters; defaults as in the public code (``find_register_neurons`` and
    ``configs/openai_clip_base.yaml``: threshold 30 at the last layer, 500 images, top 10; the DINOv2 ViT-L/14 config
    uses threshold 150 at layer -2, ``highest_layer`` 17 and top 50; the CLIP ViT-B/16 configs ``highest_layer`` 5).

    ``outlier_layer``: the block (0-based, negative from the end) whose output norms define the outliers;
    ``highest_layer`` (None: the last) and ``lowest_layer`` bound the layers the register neurons may come from;
    ``sparsity_filter`` (off in the public function, on in its notebook): a neuron counts in an image only if at least
    ``sparsity_fraction`` of the tokens have an activation below ``sparsity_activation``. ``batch_size``: images per
    detection forward (memory: every block's hidden activations of a batch are held until its outliers are known).
    """

    __test__ = False  # not a pytest test class despite its name

    norm_threshold: float = field(default=30.0, metadata=number_in(0.0, float("inf")))
    outlier_layer: int = -1
    num_images: int = field(default=500, metadata=at_least(1))
    top_k: int = field(default=10, metadata=at_least(0))
    highest_layer: int | None = field(default=None, metadata=optional_at_least(0))
    lowest_layer: int = field(default=0, metadata=at_least(0))
    sparsity_filter: bool = field(default=False, metadata=boolean())
    sparsity_fraction: float = field(default=0.5, metadata=number_in(0.0, 1.0))
    sparsity_activation: float = 0.5
    batch_size: int = field(default=16, metadata=at_least(1))
    num_registers: int = field(default=1, metadata=at_least(0))
    patch_values: str = field(default="zero", metadata=one_of(PATCH_VALUES))
    max_over: str = field(default="neuron", metadata=one_of(MAX_OVER))
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.outlier_layer, int) or isinstance(self.outlier_layer, bool):
            raise ValueError(f"outlier_layer must be an int (negative: from the end), got {self.outlier_layer!r}")
        for key in ("norm_threshold", "sparsity_fraction", "sparsity_activation", "scale"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"{key} must be a number, got {value!r}")
            object.__setattr__(self, key, float(value))
        if self.highest_layer is not None and self.highest_layer < self.lowest_layer:
            raise ValueError(f"highest_layer {self.highest_layer} is below lowest_layer {self.lowest_layer}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None,
                  section: str = "test_time_registers") -> TestTimeRegistersConfig:
        return from_mapping(cls, d, section)


@dataclass(frozen=True)
class RegisterNeuronDetectionConfig:
    """The ``test_time_registers`` section of a run (the pipeline of the same name): the detection and intervention
    parameters (``registers``, whose keys sit flat in the section) plus the ``split`` of the prepared images that
    calibrates the detection and the ``device`` it runs on."""

    registers: TestTimeRegistersConfig = field(default_factory=TestTimeRegistersConfig)
    split: str = field(default="train", metadata=one_of(SPLITS))
    device: str = field(default="auto", metadata=a_device())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None,
                  section: str = "test_time_registers") -> RegisterNeuronDetectionConfig:
        if d is None or isinstance(d, cls):
            return from_mapping(cls, d, section)
        own = ("split", "device")
        _known_keys(section, d, [*own, *(f.name for f in dataclasses.fields(TestTimeRegistersConfig))])
        registers = TestTimeRegistersConfig.from_dict({k: v for k, v in d.items() if k not in own}, section)
        return from_mapping(cls, {"registers": registers, **{k: d[k] for k in own if k in d}}, section)


class RegisterNeuron(NamedTuple):
    """A register neuron: block ``layer`` (0-based), hidden unit ``neuron`` of its MLP, detection ``score``.
    JSON-serialisable as ``[layer, neuron, score]``."""

    layer: int
    neuron: int
    score: float


def register_neurons_from_rows(rows: Iterable[Sequence[Any]]) -> list[RegisterNeuron]:
    """Register neurons from ``[layer, neuron, score]`` rows (a loaded JSON artifact) or ``(layer, neuron)`` pairs."""
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, Mapping):
            row = (row["layer"], row["neuron"], row.get("score", float("nan")))
        if len(row) not in (2, 3) or not all(isinstance(v, int) and not isinstance(v, bool) for v in row[:2]):
            raise ValueError(f"register neuron {i}: expected [layer, neuron(, score)] with int layer and neuron, "
                             f"got {row!r}")
        if row[0] < 0 or row[1] < 0:
            raise ValueError(f"register neuron {i}: layer and neuron must be >= 0, got {row!r}")
        out.append(RegisterNeuron(int(row[0]), int(row[1]), float(row[2]) if len(row) == 3 else float("nan")))
    return out


# --- detection ---------------------------------------------------------------------------------------------------

def _block_index(index: int, depth: int, key: str) -> int:
    if not -depth <= index < depth:
        raise ValueError(f"test_time_registers.{key} {index} is out of range for {depth} blocks")
    return index % depth


def _batches(images: Tensor | Iterable[Tensor], batch_size: int, limit: int) -> Iterator[Tensor]:
    """The first ``limit`` images of a (B, 3, H, W) tensor or of an iterable of such batches, in batches."""
    if isinstance(images, Tensor):
        images = images.split(batch_size)
    taken = 0
    for batch in images:
        if not isinstance(batch, Tensor) or batch.ndim != 4:
            raise ValueError(f"calibration images must be (B, 3, H, W) tensors, got "
                             f"{getattr(batch, 'shape', type(batch).__name__)}")
        batch = batch[:limit - taken]
        taken += batch.shape[0]
        yield batch
        if taken >= limit:
            return


def _image_scores(acts: Tensor, outliers: Tensor, config: TestTimeRegistersConfig) -> Tensor:
    """(b, H) per-image scores of one layer: mean |activation| over each image's outlier tokens (``outliers`` (b, N)
    bool, at least one per image), times the sparsity filter if on."""
    acts = acts.float()
    weights = outliers.float() / outliers.sum(dim=1, keepdim=True)
    scores = torch.einsum("bn,bnh->bh", weights, acts.abs())
    if config.sparsity_filter:
        low = (acts < config.sparsity_activation).sum(dim=1)
        scores = scores * (low >= config.sparsity_fraction * acts.shape[1]).float()
    return scores


@torch.no_grad()
def detect_register_neurons(model: DenseViT, images: Tensor | Iterable[Tensor],
                            config: TestTimeRegistersConfig | Mapping[str, Any] | None = None,
                            facts: dict[str, Any] | None = None) -> list[RegisterNeuron]:
    """The top ``config.top_k`` register neurons of ``model`` over its first ``config.num_images`` calibration images
    (normalised, a (B, 3, H, W) tensor or an iterable of such batches), best first (see the module docstring).
    ``facts``, if given, receives ``images_seen``, ``images_with_outliers`` and ``outlier_block`` (0-based).

    Raises ValueError when no image has an outlier token (lower ``norm_threshold``, or more images).
    """
    config = TestTimeRegistersConfig.from_dict(config)
    if model.test_time_registers is not None:
        raise ValueError("detect_register_neurons needs the model without test-time registers (detach them first)")
    depth = model._blocks_prefix()[1]
    outlier_layer = _block_index(config.outlier_layer, depth, "outlier_layer")
    if not model.runs_block(outlier_layer):
        raise ValueError(f"test_time_registers.outlier_layer {config.outlier_layer} is block {outlier_layer}, which "
                         f"the {model.head!r} head replaces: detect on the same weights with head 'vanilla', or use "
                         f"an earlier layer")
    layers = [i for i in range(depth) if model.runs_block(i)]
    sites = {i: model.mlp_site(i) for i in layers}
    acts: dict[int, Tensor] = {}
    outputs: list[Tensor] = []
    handles = [sites[i].act.register_forward_hook(partial(_keep, acts, i)) for i in layers]
    handles.append(model.mlp_site(outlier_layer).block.register_forward_hook(
        lambda module, args, output: outputs.append(output)))
    totals = {i: torch.zeros(sites[i].hidden, dtype=torch.float64) for i in layers}
    seen = with_outliers = 0
    device = module_device(model)
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(images, config.batch_size, config.num_images):
            acts.clear()
            outputs.clear()
            model.forward_tokens(batch.to(device), pre_norm=True)
            seen += batch.shape[0]
            outliers = torch.linalg.vector_norm(outputs[-1].float(), dim=-1) > config.norm_threshold  # (B, N)
            has = outliers.any(dim=1)
            if not has.any():
                continue
            with_outliers += int(has.sum())
            for i in layers:
                totals[i] += _image_scores(acts[i][has], outliers[has], config).sum(dim=0).double().cpu()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    log.info("register-neuron detection: %d of %d images have tokens of norm > %g at block %d", with_outliers, seen,
             config.norm_threshold, outlier_layer)
    if facts is not None:
        facts.update(images_seen=seen, images_with_outliers=with_outliers, outlier_block=outlier_layer)
    if with_outliers == 0:
        raise ValueError(f"no calibration image ({seen} seen) has a token of norm > {config.norm_threshold} at block "
                         f"{outlier_layer}: lower test_time_registers.norm_threshold or use more images")
    return _rank(totals, with_outliers, config)


def _keep(store: dict[int, Tensor], index: int, module: nn.Module, args: tuple, output: Tensor) -> None:
    store[index] = output


def _rank(totals: Mapping[int, Tensor], count: int, config: TestTimeRegistersConfig) -> list[RegisterNeuron]:
    """The top ``top_k`` (layer, neuron, mean score) of the allowed layers, best first (ties: earlier layer, lower
    index)."""
    highest = float("inf") if config.highest_layer is None else config.highest_layer
    allowed = [i for i in sorted(totals) if config.lowest_layer <= i <= highest]
    if not allowed:
        return []
    scores = torch.cat([totals[i] / count for i in allowed])
    layer_of = torch.cat([torch.full((totals[i].numel(),), i) for i in allowed])
    neuron_of = torch.cat([torch.arange(totals[i].numel()) for i in allowed])
    order = torch.sort(scores, descending=True, stable=True).indices[:config.top_k]
    return [RegisterNeuron(int(layer_of[j]), int(neuron_of[j]), float(scores[j])) for j in order]


# --- intervention ------------------------------------------------------------------------------------------------

class TestTimeRegisters:
    """The intervention carried by one model (see :func:`attach_test_time_registers`): forward hooks on the MLP
    nonlinearity of each block holding register neurons. ``remove()`` takes them off."""

    __test__ = False

    def __init__(self, model: DenseViT, neurons: Iterable[Sequence[Any]], config: TestTimeRegistersConfig):
        self.config = config
        self.num_registers = config.num_registers
        self.neurons = register_neurons_from_rows(neurons)
        self._layout = model.token_layout
        by_layer: dict[int, list[int]] = {}
        depth = model._blocks_prefix()[1]
        for layer, neuron, _ in self.neurons:
            if layer >= depth:
                raise ValueError(f"register neuron ({layer}, {neuron}): the model has {depth} blocks")
            if not model.runs_block(layer, mlp=True):
                raise ValueError(f"register neuron ({layer}, {neuron}): the {model.head!r} head replaces block "
                                 f"{layer} without its MLP, so the intervention would never run")
            hidden = model.mlp_site(layer).hidden
            if neuron >= hidden:
                raise ValueError(f"register neuron ({layer}, {neuron}): block {layer} has {hidden} hidden units")
            if neuron not in by_layer.setdefault(layer, []):
                by_layer[layer].append(neuron)
        self.layers = {layer: torch.tensor(units) for layer, units in sorted(by_layer.items())}
        self._handles = [model.mlp_site(layer).act.register_forward_hook(partial(self._intervene, layer))
                         for layer in self.layers]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _intervene(self, layer: int, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """The hidden activations (B, N, H) of block ``layer`` with its register neurons moved to the test-time
        registers."""
        if self.num_registers == 0:
            return output
        extra, patches = self._layout(output.shape[1])
        index = self.layers[layer].to(output.device)
        acts = output[:, :, index]  # (B, N, k): a copy
        high, low = acts.amax(dim=1), acts.amin(dim=1)  # (B, k)
        if self.config.max_over == "layer":
            high, low = high.amax(dim=1, keepdim=True), low.amin(dim=1, keepdim=True)
        peak = torch.where(high.abs() > low.abs(), high, low) * self.config.scale  # public sign_max: ties -> min
        out = output.clone()
        out[:, extra, index] = peak.unsqueeze(1).expand(-1, extra.stop - extra.start, index.numel()).to(out.dtype)
        mode = self.config.patch_values
        if mode == "zero":
            out[:, patches, index] = 0
        elif mode in ("mean", "only_outliers"):
            values = acts[:, patches]
            mean = values.mean(dim=1, keepdim=True)
            if mode == "mean":
                values = mean.expand_as(values)
            else:
                values = torch.where(values > mean + values.std(dim=1, keepdim=True), mean, values)
            out[:, patches, index] = values
        return out


def attach_test_time_registers(model: DenseViT, neurons: Iterable[Sequence[Any]],
                               config: TestTimeRegistersConfig | Mapping[str, Any] | None = None,
                               ) -> TestTimeRegisters:
    """Give ``model`` test-time registers: ``config.num_registers`` zero tokens in every forward and the intervention
    on ``neurons`` (``RegisterNeuron`` rows, ``[layer, neuron(, score)]``; every one is used, ``top_k`` applies to
    detection only). Weights are untouched; :func:`detach_test_time_registers` restores the plain model."""
    config = TestTimeRegistersConfig.from_dict(config)
    if model.test_time_registers is not None:
        raise ValueError("the model already carries test-time registers (detach them first)")
    registers = TestTimeRegisters(model, neurons, config)
    model.test_time_registers = registers
    return registers


def detach_test_time_registers(model: DenseViT) -> None:
    """Remove the test-time registers of ``model`` (hooks and extra tokens); a no-op without them."""
    if model.test_time_registers is not None:
        model.test_time_registers.remove()
        model.test_time_registers = None


# --- the detection artifact --------------------------------------------------------------------------------------

def neuron_artifact(neurons: Iterable[Sequence[Any]], config: TestTimeRegistersConfig,
                    **detection: Any) -> dict[str, Any]:
    """The JSON form of a detection: ``neurons`` as ``[layer, neuron, score]`` rows (best first), ``intervention``
    (the whole config, so that a reader attaches exactly what was detected for) and ``detection`` (free-form facts:
    images seen, images with outliers, the head used, ...)."""
    rows = [[n.layer, n.neuron, n.score] for n in register_neurons_from_rows(neurons)]
    return {"neurons": rows, "intervention": dataclasses.asdict(config), "detection": dict(detection)}


def attach_from_artifact(model: DenseViT, artifact: Mapping[str, Any], where: str = "register_neurons",
                         ) -> TestTimeRegisters:
    """:func:`attach_test_time_registers` with the neurons and the config of a :func:`neuron_artifact` (a loaded
    JSON file; ``where`` names it in errors)."""
    if not isinstance(artifact, Mapping) or not {"neurons", "intervention"} <= set(artifact):
        keys = sorted(artifact) if isinstance(artifact, Mapping) else type(artifact).__name__
        raise ValueError(f"{where}: expected a register-neuron artifact with keys 'neurons' and 'intervention' "
                         f"(ph_reg.models.test_time_registers.neuron_artifact), got {keys}")
    try:
        config = TestTimeRegistersConfig.from_dict(artifact["intervention"], f"{where}.intervention")
        neurons = register_neurons_from_rows(artifact["neurons"])
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{where}: {error}") from error
    return attach_test_time_registers(model, neurons, config)
