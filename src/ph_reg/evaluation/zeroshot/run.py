"""Zero-shot orchestration: the Table 1 results of the configured heads on the configured benchmarks, and the
zero-shot figures.

Heads are the training-free CLIP heads of :mod:`ph_reg.evaluation.zeroshot` (``vanilla``, ``maskclip``, ``sclip``,
``clearclip``, ``naclip``, ``maskclip_tta``) built on the student's base model, plus ``ph_reg``: the distilled
student itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from ph_reg.config import from_mapping
from ph_reg.evaluation.benchmarks import DenseDataset, build_dataset
from ph_reg.evaluation.zeroshot.harness import (ZeroShotConfig, backbone_head, evaluate_zero_shot, make_dense_fn,
                                                model_dense_fn, precision_dense_fn, zero_shot_maps)
from ph_reg.evaluation.zeroshot.templates import load_class_file, parse_class_lines
from ph_reg.evaluation.zeroshot.text import build_text_encoder, text_embeddings
from ph_reg.method.tta import TTAConfig
from ph_reg.models import BackboneConfig, build_backbone
from ph_reg.reporting.figures import class_palette, zero_shot_figure
from ph_reg.runtime import DEFAULT_PRECISION

__all__ = ["STUDENT_HEAD", "CLASSES_FROM_DATASET", "selected", "class_lines", "head_model", "zero_shot_evaluation",
           "zero_shot_figures"]

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


def head_model(head: str, base: BackboneConfig, student: nn.Module) -> nn.Module:
    """The eval-mode model a zero-shot head runs: the student for ``ph_reg``, else the base model with the head, a
    frozen model (``student`` False): under ``pos_embed_interp: official`` it keeps the pretrained positional
    embedding and resizes it once to each crop's grid (NACLIP/SCLIP), never the img_size table again."""
    if head == STUDENT_HEAD:
        return student.eval()
    config = BackboneConfig.from_dict({**base.to_dict(), "head": backbone_head(head), "num_registers": 0,
                                       "student": False})
    return build_backbone(config).eval()


def zero_shot_evaluation(student: nn.Module, base: BackboneConfig, heads: Sequence[str],
                         benchmarks: Mapping[str, Mapping[str, Any]], tta: TTAConfig | None = None, seed: int = 0,
                         device: torch.device | None = None, text_batch_size: int = 256,
                         max_samples: int | None = None, precision: str = DEFAULT_PRECISION) -> dict[str, dict[str, float]]:
    """``{head: {benchmark: mIoU}}`` for every head on every benchmark.

    ``benchmarks[name]`` has ``dataset`` (a ``build_dataset`` spec), ``classes`` (see ``class_lines``) and
    ``settings`` (``ZeroShotConfig`` fields). Text embeddings come from the base model's text tower, once per
    benchmark. Every head's image forward runs at ``precision`` (``evaluation.precision``, see
    :data:`ph_reg.runtime.PRECISIONS`).
    """
    if base.family != "open_clip":
        raise ValueError(f"zero-shot segmentation needs an open_clip backbone, got {base.arch!r}")
    device = device or torch.device("cpu")
    encoder, tokenizer = build_text_encoder(base)
    encoder.to(device)
    prepared = {}
    for name, spec in benchmarks.items():
        dataset = build_dataset(spec["dataset"])
        queries, query_to_class = parse_class_lines(class_lines(spec.get("classes", CLASSES_FROM_DATASET), dataset))
        text = text_embeddings(encoder, tokenizer, queries, batch_size=text_batch_size, device=device)
        settings = from_mapping(ZeroShotConfig, spec["settings"], f"evaluation.zero_shot.benchmarks.{name}.settings")
        prepared[name] = (dataset, text, query_to_class, len(set(query_to_class)), settings)
    del encoder
    results: dict[str, dict[str, float]] = {}
    for head in heads:
        model = head_model(head, base, student).to(device)
        dense_fn = model_dense_fn(model) if head == STUDENT_HEAD else make_dense_fn(model, head, tta, seed)
        dense_fn = precision_dense_fn(dense_fn, precision)
        results[head] = {}
        with torch.no_grad():
            for name, (dataset, text, query_to_class, num_classes, settings) in prepared.items():
                scores = evaluate_zero_shot(dense_fn, text, query_to_class, num_classes, dataset, settings,
                                            model.mean, model.std, max_samples=max_samples)
                results[head][name] = round(scores["mIoU"], 4)
    return results


def zero_shot_figures(student: nn.Module, base: BackboneConfig, heads: Sequence[str], benchmark: Mapping[str, Any],
                      images: int, query: str, tta: TTAConfig | None = None, seed: int = 0,
                      device: torch.device | None = None, precision: str = DEFAULT_PRECISION,
                      name: str | None = None) -> dict[str, Figure]:
    """Per image: the image, its ground truth and the colour-to-class legend, then every head with its prediction,
    the probability map of ``query`` and a PCA map (``name``: the benchmark's name, for the titles)."""
    device = device or torch.device("cpu")
    dataset = build_dataset(benchmark["dataset"])
    queries, query_to_class = parse_class_lines(class_lines(benchmark.get("classes", CLASSES_FROM_DATASET), dataset))
    if query not in queries:
        raise ValueError(f"figure query {query!r} is not one of the benchmark's queries {queries}")
    encoder, tokenizer = build_text_encoder(base)
    text = text_embeddings(encoder.to(device), tokenizer, queries, device=device)
    settings = from_mapping(ZeroShotConfig, benchmark["settings"],
                            f"evaluation.zero_shot.benchmarks.{name or dataset.name}.settings")
    num_classes = len(set(query_to_class))
    maps: dict[int, dict[str, tuple]] = {i: {} for i in range(min(images, len(dataset)))}
    for head in heads:
        model = head_model(head, base, student).to(device)
        dense_fn = model_dense_fn(model) if head == STUDENT_HEAD else make_dense_fn(model, head, tta, seed)
        dense_fn = precision_dense_fn(dense_fn, precision)
        with torch.no_grad():
            for i in maps:
                maps[i][head] = zero_shot_maps(dense_fn, dataset[i].image, text, query_to_class, num_classes,
                                               settings, queries.index(query), model.mean, model.std)
    colours = class_palette(num_classes)
    names = list(getattr(dataset, "class_names", None) or [])
    if len(names) != num_classes:   # a class file that is not the dataset's names: each class's first query
        names = [queries[query_to_class.index(c)] for c in range(num_classes)]
    figures = {}
    for i in maps:
        sample = dataset[i]
        title = f"Zero-shot segmentation, {name or dataset.name} image {i} ({sample.name})"
        figures[f"zero_shot_{i:02d}.png"] = zero_shot_figure(sample.image, maps[i], colours, query_name=query,
                                                             class_names=names, label=sample.label, title=title)
    return figures
