"""Zero-shot orchestration: the Table 1 results of the configured heads on the configured benchmarks, and the
zero-shot figures.

Heads are the training-free CLIP heads of :mod:`ph_reg.evaluation.zeroshot` (``vanilla``, ``maskclip``, ``sclip``,
``clearclip``, ``naclip``, ``maskclip_tta``) built on the student's base model, the test-time-register heads ``ttr``
and ``ttr_maskclip`` (the base model with the vanilla / MaskCLIP head carrying the test-time registers of the
``register_neurons`` artifact, :mod:`ph_reg.models.test_time_registers`), plus ``ph_reg``: the distilled student
itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from ph_reg.config import from_mapping
from ph_reg.evaluation.benchmarks import DenseDataset, build_dataset
from ph_reg.evaluation.zeroshot.harness import (TTR_HEADS, ZeroShotConfig, ZeroShotHead, backbone_head,
                                                evaluate_zero_shot_heads, make_dense_fn, model_dense_fn,
                                                precision_dense_fn, zero_shot_maps)
from ph_reg.evaluation.zeroshot.templates import load_class_file, parse_class_lines
from ph_reg.evaluation.zeroshot.text import build_text_encoder, text_embeddings
from ph_reg.method.tta import TTAConfig
from ph_reg.models import BackboneConfig, build_backbone
from ph_reg.models.test_time_registers import attach_from_artifact
from ph_reg.reporting.figures import class_palette, zero_shot_figure
from ph_reg.runtime import DEFAULT_PRECISION

__all__ = ["STUDENT_HEAD", "CLASSES_FROM_DATASET", "selected", "class_lines", "check_register_neurons", "head_model",
           "zero_shot_run", "zero_shot_evaluation", "zero_shot_figures"]

STUDENT_HEAD = "ph_reg"
CLASSES_FROM_DATASET = "dataset"


def selected(definitions: dict[str, Any], names: list[str], where: str) -> dict[str, Any]:
    """The definitions named in a ``run`` list (config environments add definitions; ``run`` picks them)."""
    missing = [name for name in names if name not in definitions]
    if missing:
        raise ValueError(f"{where}.run names {missing}, which are not defined in {where}; defined: {sorted(definitions)}")
    return {name: definitions[name] for name in names}


def class_lines(classes: str | Sequence[str], dataset: DenseDataset) -> list[str]:
    """Class-file lines: a benchmark key of the shipped class files, ``"dataset"`` (one name per dataset class),
    or an explicit list of lines (comma-separated synonyms allowed)."""
    if isinstance(classes, str):
        return list(dataset.class_names) if classes == CLASSES_FROM_DATASET else load_class_file(classes)
    return list(classes)


def check_register_neurons(heads: Sequence[str], register_neurons: Mapping[str, Any] | None) -> None:
    """A clear error when a test-time-register head (:data:`TTR_HEADS`) is asked for without the artifact."""
    wanted = [head for head in heads if head in TTR_HEADS]
    if wanted and register_neurons is None:
        raise ValueError(f"evaluation.zero_shot.heads names {wanted}, which need the register-neuron artifact "
                         f"(register_neurons, data/04_feature/register_neurons.json from the test_time_registers "
                         f"pipeline); none was given: run that pipeline first or drop the heads")


def head_model(head: str, base: BackboneConfig, student: nn.Module,
               register_neurons: Mapping[str, Any] | None = None) -> nn.Module:
    """The eval-mode model a zero-shot head runs: the student for ``ph_reg``, else the base model with the head, a
    frozen model (``student`` False): under ``pos_embed_interp: official`` it keeps the pretrained positional
    embedding and resizes it once to each crop's grid (NACLIP/SCLIP), never the img_size table again. The
    :data:`TTR_HEADS` carry the test-time registers of ``register_neurons`` (a ``neuron_artifact``, required by
    them)."""
    if head == STUDENT_HEAD:
        return student.eval()
    config = BackboneConfig.from_dict({**base.to_dict(), "head": backbone_head(head), "num_registers": 0,
                                       "student": False})
    model = build_backbone(config).eval()
    if head in TTR_HEADS:
        check_register_neurons([head], register_neurons)
        try:
            attach_from_artifact(model, register_neurons)
        except ValueError as error:
            raise ValueError(f"evaluation.zero_shot.heads: head {head!r} ({config.head!r} with test-time "
                             f"registers): {error}") from error
    return model


class _Benchmark(NamedTuple):
    """A benchmark ready to run: its dataset, queries and their text embeddings, and its harness settings."""

    dataset: DenseDataset
    queries: list[str]
    text: Tensor
    query_to_class: list[int]
    num_classes: int
    settings: ZeroShotConfig


def _prepare_benchmarks(base: BackboneConfig, benchmarks: Mapping[str, Mapping[str, Any]], device: torch.device,
                        text_batch_size: int) -> dict[str, _Benchmark]:
    """Datasets, queries and text embeddings of ``benchmarks``: the text tower is built once, each benchmark's
    queries are embedded once (for every head)."""
    encoder, tokenizer = build_text_encoder(base)
    encoder.to(device)
    prepared = {}
    for name, spec in benchmarks.items():
        dataset = build_dataset(spec["dataset"])
        queries, query_to_class = parse_class_lines(class_lines(spec.get("classes", CLASSES_FROM_DATASET), dataset))
        text = text_embeddings(encoder, tokenizer, queries, batch_size=text_batch_size, device=device)
        settings = from_mapping(ZeroShotConfig, spec["settings"], f"evaluation.zero_shot.benchmarks.{name}.settings")
        prepared[name] = _Benchmark(dataset, queries, text, query_to_class, len(set(query_to_class)), settings)
    return prepared


def _heads(student: nn.Module, base: BackboneConfig, heads: Sequence[str], tta: TTAConfig | None, seed: int,
           device: torch.device, precision: str, register_neurons: Mapping[str, Any] | None = None,
           ) -> dict[str, ZeroShotHead]:
    """Every head's model, built once, as the harness runs it (its dense function at ``precision``)."""
    built = {}
    for head in heads:
        model = head_model(head, base, student, register_neurons).to(device)
        dense_fn = model_dense_fn(model) if head == STUDENT_HEAD else make_dense_fn(model, head, tta, seed)
        built[head] = ZeroShotHead(precision_dense_fn(dense_fn, precision), model.mean, model.std)
    return built


def zero_shot_run(student: nn.Module, base: BackboneConfig, heads: Sequence[str],
                  benchmarks: Mapping[str, Mapping[str, Any]], figure: Mapping[str, Any] | None = None,
                  tta: TTAConfig | None = None, seed: int = 0, device: torch.device | None = None,
                  text_batch_size: int = 256, max_samples: int | None = None, precision: str = DEFAULT_PRECISION,
                  register_neurons: Mapping[str, Any] | None = None,
                  ) -> tuple[dict[str, dict[str, float]], dict[str, Figure]]:
    """``({head: {benchmark: mIoU}}, figures)``: every head on every benchmark, and the zero-shot figures.

    ``benchmarks[name]`` has ``dataset`` (a ``build_dataset`` spec), ``classes`` (see ``class_lines``) and
    ``settings`` (``ZeroShotConfig`` fields). ``figure``: ``{"benchmark": name, "images": n, "query": q}`` (its
    benchmark is one of ``benchmarks`` or an extra one, ``{"spec": ...}`` given with ``figure["spec"]``); None: no
    figures. The work is shared: the text tower is built once and each benchmark's queries are embedded once;
    each head's model is built once; each image is read once for all heads; the figures reuse the evaluation's
    predictions of their images. Every head's image forward runs at ``precision`` (``evaluation.precision``, see
    :data:`ph_reg.runtime.PRECISIONS`). ``register_neurons``: the detection artifact the ``ttr`` heads attach
    (:func:`ph_reg.models.test_time_registers.neuron_artifact` form; required by them only).
    """
    if base.family != "open_clip":
        raise ValueError(f"zero-shot segmentation needs an open_clip backbone, got {base.arch!r}")
    check_register_neurons(heads, register_neurons)   # before the text tower and the datasets are built
    device = device or torch.device("cpu")
    specs = dict(benchmarks)
    if figure is not None and figure["benchmark"] not in specs:
        specs[figure["benchmark"]] = figure["spec"]
    prepared = _prepare_benchmarks(base, specs, device, text_batch_size)
    models = _heads(student, base, heads, tta, seed, device, precision, register_neurons)
    results: dict[str, dict[str, float]] = {head: {} for head in heads}
    kept: list = []
    with torch.no_grad():
        for name in benchmarks:
            bench = prepared[name]
            keep = figure["images"] if figure is not None and figure["benchmark"] == name else 0
            scores, kept_here = evaluate_zero_shot_heads(models, bench.text, bench.query_to_class, bench.num_classes,
                                                         bench.dataset, bench.settings, max_samples, keep=keep)
            kept = kept_here if keep else kept
            for head in heads:
                results[head][name] = round(scores[head]["mIoU"], 4)
        figures = {} if figure is None else _figures(models, prepared[figure["benchmark"]], figure, kept)
    return results, figures


def _figures(models: Mapping[str, ZeroShotHead], bench: _Benchmark, figure: Mapping[str, Any],
             kept: Sequence[tuple[Any, Mapping[str, Any]]]) -> dict[str, Figure]:
    """The figures of the first ``figure["images"]`` images of ``bench``; the predictions in ``kept`` (sample,
    {head: prediction}) are reused, the other images are segmented here."""
    query, name, dataset = figure["query"], figure["benchmark"], bench.dataset
    if query not in bench.queries:
        raise ValueError(f"figure query {query!r} is not one of the benchmark's queries {bench.queries}")
    colours = class_palette(bench.num_classes)
    names = list(getattr(dataset, "class_names", None) or [])
    if len(names) != bench.num_classes:   # a class file that is not the dataset's names: each class's first query
        names = [bench.queries[bench.query_to_class.index(c)] for c in range(bench.num_classes)]
    figures = {}
    for i in range(min(figure["images"], len(dataset))):
        sample, predictions = kept[i] if i < len(kept) else (dataset[i], {})
        maps = {head: zero_shot_maps(model.dense_fn, sample.image, bench.text, bench.query_to_class,
                                     bench.num_classes, bench.settings, bench.queries.index(query), model.mean,
                                     model.std, prediction=predictions.get(head))
                for head, model in models.items()}
        title = f"Zero-shot segmentation, {name or dataset.name} image {i} ({sample.name})"
        figures[f"zero_shot_{i:02d}.png"] = zero_shot_figure(sample.image, maps, colours, query_name=query,
                                                             class_names=names, label=sample.label, title=title)
    return figures


def zero_shot_evaluation(student: nn.Module, base: BackboneConfig, heads: Sequence[str],
                         benchmarks: Mapping[str, Mapping[str, Any]], tta: TTAConfig | None = None, seed: int = 0,
                         device: torch.device | None = None, text_batch_size: int = 256,
                         max_samples: int | None = None, precision: str = DEFAULT_PRECISION,
                         register_neurons: Mapping[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """``{head: {benchmark: mIoU}}`` for every head on every benchmark (:func:`zero_shot_run` without figures)."""
    return zero_shot_run(student, base, heads, benchmarks, None, tta=tta, seed=seed, device=device,
                         text_batch_size=text_batch_size, max_samples=max_samples, precision=precision,
                         register_neurons=register_neurons)[0]


def zero_shot_figures(student: nn.Module, base: BackboneConfig, heads: Sequence[str], benchmark: Mapping[str, Any],
                      images: int, query: str, tta: TTAConfig | None = None, seed: int = 0,
                      device: torch.device | None = None, precision: str = DEFAULT_PRECISION,
                      name: str | None = None, register_neurons: Mapping[str, Any] | None = None,
                      ) -> dict[str, Figure]:
    """Per image: the image, its ground truth and the colour-to-class legend, then every head with its prediction,
    the probability map of ``query`` and a PCA map (``name``: the benchmark's name, for the titles). Only the
    figures; :func:`zero_shot_run` draws them from the evaluation's own predictions."""
    figure = {"benchmark": name, "images": images, "query": query, "spec": benchmark}
    return zero_shot_run(student, base, heads, {}, figure, tta=tta, seed=seed, device=device, precision=precision,
                         register_neurons=register_neurons)[1]
