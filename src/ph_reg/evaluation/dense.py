"""Dense-task evaluation orchestration: the zero-shot table (Table 1) over configured heads and benchmarks.

Heads are the training-free CLIP heads of ``ph_reg.evaluation.zeroshot`` (``vanilla``, ``maskclip``, ``sclip``,
``clearclip``, ``naclip``, ``maskclip_tta``) built on the student's base model, plus ``ph_reg``: the distilled
student itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from ph_reg.evaluation.benchmarks import DenseDataset, build_dataset
from ph_reg.models import BackboneConfig, build_backbone, clean_copy
from ph_reg.runtime import DEFAULT_PRECISION
from ph_reg.evaluation.zeroshot import (ZeroShotSettings, backbone_head, build_text_encoder, class_palette, load_class_file,
                       make_dense_fn, model_dense_fn, parse_class_lines, text_embeddings, zero_shot_figure,
                       zero_shot_maps)
from ph_reg.evaluation.zeroshot.harness import evaluate_zero_shot, precision_dense_fn

STUDENT_HEAD = "ph_reg"
CLASSES_FROM_DATASET = "dataset"


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
                         benchmarks: Mapping[str, Mapping[str, Any]], tta_views: int = 10, seed: int = 0,
                         device: torch.device | None = None, text_batch_size: int = 256,
                         max_samples: int | None = None, precision: str = DEFAULT_PRECISION) -> dict[str, dict[str, float]]:
    """``{head: {benchmark: mIoU}}`` for every head on every benchmark.

    ``benchmarks[name]`` has ``dataset`` (a ``build_dataset`` spec), ``classes`` (see ``class_lines``) and
    ``settings`` (``ZeroShotSettings`` fields). Text embeddings come from the base model's text tower, once per
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
        prepared[name] = (dataset, text, query_to_class, len(set(query_to_class)),
                          ZeroShotSettings.from_dict(spec["settings"]))
    del encoder
    results: dict[str, dict[str, float]] = {}
    for head in heads:
        model = head_model(head, base, student).to(device)
        dense_fn = model_dense_fn(model) if head == STUDENT_HEAD else make_dense_fn(model, head, tta_views, seed)
        dense_fn = precision_dense_fn(dense_fn, precision)
        results[head] = {}
        with torch.no_grad():
            for name, (dataset, text, query_to_class, num_classes, settings) in prepared.items():
                scores = evaluate_zero_shot(dense_fn, text, query_to_class, num_classes, dataset, settings,
                                            model.mean, model.std, max_samples=max_samples)
                results[head][name] = round(scores["mIoU"], 4)
    return results


def zero_shot_figures(student: nn.Module, base: BackboneConfig, heads: Sequence[str], benchmark: Mapping[str, Any],
                      images: int, query: str, tta_views: int = 10, seed: int = 0,
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
    settings = ZeroShotSettings.from_dict(benchmark["settings"])
    num_classes = len(set(query_to_class))
    maps: dict[int, dict[str, tuple]] = {i: {} for i in range(min(images, len(dataset)))}
    for head in heads:
        model = head_model(head, base, student).to(device)
        dense_fn = model_dense_fn(model) if head == STUDENT_HEAD else make_dense_fn(model, head, tta_views, seed)
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


# ---------------------------------------------------------------- linear probes (Table 2)

PROBE_TASKS = ("segmentation", "depth")
#: method.md section 7, Table 2 (mIoU %, RMSE m, AbsRel, delta1 %); mAcc is not published
PUBLISHED_TABLE2: dict[str, dict[str, dict[str, float]]] = {
    "clip": {
        "teacher": {"voc21/mIoU": 73.88, "ade20k/mIoU": 35.78, "nyuv2/RMSE_best_on_test": 0.6843,
                    "nyuv2/AbsRel_best_on_test": 0.2115, "nyuv2/delta1_best_on_test": 64.93},
        "student": {"voc21/mIoU": 75.32, "ade20k/mIoU": 38.07, "nyuv2/RMSE_best_on_test": 0.6746,
                    "nyuv2/AbsRel_best_on_test": 0.1995, "nyuv2/delta1_best_on_test": 68.17},
    },
    "dinov2": {
        "teacher": {"voc21/mIoU": 84.13, "ade20k/mIoU": 47.82, "nyuv2/RMSE_best_on_test": 0.4566,
                    "nyuv2/AbsRel_best_on_test": 0.1391, "nyuv2/delta1_best_on_test": 82.92},
        "student": {"voc21/mIoU": 84.85, "ade20k/mIoU": 48.66, "nyuv2/RMSE_best_on_test": 0.4306,
                    "nyuv2/AbsRel_best_on_test": 0.1216, "nyuv2/delta1_best_on_test": 86.35},
    },
}
SEGMENTATION_COLUMNS = ("mIoU", "mAcc")
# the published depth numbers are the best of the evaluations on the test set by AbsRel (the toolbox's save_best)
DEPTH_COLUMNS = ("RMSE", "AbsRel", "delta1", "RMSE_best_on_test", "AbsRel_best_on_test", "delta1_best_on_test")


def probe_models(student: nn.Module, base: BackboneConfig, teacher_head: str) -> dict[str, nn.Module]:
    """The models whose frozen features are probed: the base model with ``teacher_head`` and the student; with a
    planted-artifact implant (``base.implant``) also ``clean``, the same base model without it (the ground truth)."""
    teacher = build_backbone(BackboneConfig.from_dict({**base.to_dict(), "head": teacher_head, "num_registers": 0,
                                                       "student": False}))
    models = {"teacher": teacher.eval(), "student": student.eval()}
    if base.implant is not None:
        models["clean"] = clean_copy(teacher)
    return models


def probe_feature_streams(models: Mapping[str, nn.Module], tasks: Mapping[str, Mapping[str, Mapping[str, Any]]],
                          seed: int, feature_dtype: str = "float16", batch_size: int = 8,
                          precision: str = DEFAULT_PRECISION, mode: str = "cached") -> dict[str, Any]:
    """Lazy feature stores ``"<model>/<task>/<benchmark>/<train|val>"`` for every model and probe benchmark.
    ``mode`` (``evaluation.probes.mode``): ``"cached"`` makes train and val stores; ``"online"`` only the val
    stores (the probes then train on features recomputed under augmentation, see :mod:`ph_reg.evaluation.probes.online`).

    ``tasks[task][benchmark]`` has ``train`` and ``val`` dataset specs, ``crop_size``, ``stride`` and optionally
    ``short_side`` and (depth) ``flip_tta``. The backbones run at ``precision`` (``evaluation.precision``). Nothing
    is computed until a store is written.
    """
    from ph_reg.evaluation.probes import feature_stream
    from ph_reg.evaluation.probes.online import augmentation_for, check_mode

    check_mode(mode)
    streams = {}
    for task, benchmarks in tasks.items():
        if task not in PROBE_TASKS:
            raise ValueError(f"unknown probe task {task!r}; expected one of {PROBE_TASKS}")
        for name, spec in (benchmarks or {}).items():
            for model_name, model in models.items():
                common = dict(crop_size=spec["crop_size"], short_side=spec.get("short_side"), seed=seed,
                              feature_dtype=feature_dtype, batch_size=batch_size, precision=precision)
                if mode == "cached":
                    streams[f"{model_name}/{task}/{name}/train"] = feature_stream(
                        model, build_dataset(spec["train"]), split_kind="train", **common)
                else:
                    augmentation_for(task, spec)   # a bad augment key fails here, before any feature is computed
                streams[f"{model_name}/{task}/{name}/val"] = feature_stream(
                    model, build_dataset(spec["val"]), split_kind="val", stride=spec["stride"],
                    flip=task == "depth" and spec.get("flip_tta", False), **common)
    return streams


def write_probe_stores(streams: Mapping[str, Any], folder: str | Path) -> dict[str, Any]:
    """Write the lazy feature stores of :func:`probe_feature_streams` under ``folder`` (one sub-folder per key)
    and return them as ``{key: ShardReader}``, ready for :func:`run_probes` (the pipeline's catalog does the same)."""
    from ph_reg.io import ShardReader, write_stream

    stores = {}
    for key, stream in streams.items():
        target = Path(folder) / key
        write_stream(target, stream)
        stores[key] = ShardReader(target)
    return stores


def run_probes(stores: Mapping[str, Any], tasks: Mapping[str, Mapping[str, Mapping[str, Any]]],
               seed: int, curves: dict[str, list[float]] | None = None, *, mode: str = "cached",
               models: Mapping[str, nn.Module] | None = None, precision: str = DEFAULT_PRECISION,
               loader_workers: int = 0) -> dict[str, dict[str, float]]:
    """Train and evaluate every probe from the feature stores: ``{model: {"<benchmark>/<metric>": value}}``.
    ``curves``, when given, receives the training loss per iteration under ``"<model>/<task>/<benchmark>"``.

    ``mode`` (``evaluation.probes.mode``): ``"cached"`` trains on the train feature stores; ``"online"`` trains on
    features that ``models[<model>]`` recomputes for every batch under the benchmark's augmentation (its
    ``augment`` mapping, :mod:`ph_reg.evaluation.probes.online`), at ``precision``, reading images in ``loader_workers``
    workers. Evaluation always reads the val stores."""
    from ph_reg.evaluation.probes import eigen_crop_mask, evaluate_segmentation_probe, train_segmentation_probe
    from ph_reg.evaluation.probes.depth import depth_probe_scores
    from ph_reg.evaluation.probes.online import OnlineBatchSource, augmentation_for, check_mode
    from ph_reg.runtime import derive_seed

    check_mode(mode)
    if mode == "online" and models is None:
        raise ValueError("evaluation.probes.mode 'online' needs the models (run_probes(..., models=...))")
    results: dict[str, dict[str, float]] = {}
    names = {key.split("/")[0] for key in stores}
    order = [name for name in ("teacher", "student") if name in names] + sorted(names - {"teacher", "student"})
    for model_name in order:
        row = results.setdefault(model_name, {})
        for task, benchmarks in tasks.items():
            for name, spec in (benchmarks or {}).items():
                if mode == "cached":
                    train = stores[f"{model_name}/{task}/{name}/train"]
                else:
                    train = OnlineBatchSource(models[model_name], build_dataset(spec["train"]),
                                              augmentation_for(task, spec), precision=precision,
                                              num_workers=loader_workers)
                val = stores[f"{model_name}/{task}/{name}/val"]
                probe_seed = derive_seed(seed, "probe", task, name)  # the same for every model: a fair comparison
                history = None if curves is None else curves.setdefault(f"{model_name}/{task}/{name}", [])
                if task == "segmentation":
                    probe = train_segmentation_probe(train, spec.get("probe", {}), probe_seed, history)
                    scores = evaluate_segmentation_probe(probe, val)
                else:
                    # final probe + the official best-by-AbsRel every eval_interval iterations (*_best_on_test)
                    scores = depth_probe_scores(train, val, spec.get("probe", {}), probe_seed, history,
                                                mask_fn=eigen_crop_mask if spec.get("eigen_crop") else None,
                                                flip_tta=spec.get("flip_tta", False))
                row.update({f"{name}/{metric}": round(float(value), 4) for metric, value in scores.items()})
    return results


def table2(results: Mapping[str, Mapping[str, float]], published: str | None = None) -> tuple[dict, str]:
    """Table 2 format: one row per model; segmentation mIoU/mAcc and depth RMSE/AbsRel/delta1 per benchmark,
    with the published numbers (``published``: ``clip`` or ``dinov2``) and our difference from them."""
    order = SEGMENTATION_COLUMNS + DEPTH_COLUMNS
    benchmarks: list[str] = []
    for row in results.values():
        for key in row:
            name = key.rsplit("/", 1)[0]
            if name not in benchmarks:
                benchmarks.append(name)
    present = {key for row in results.values() for key in row}
    columns = [f"{name}/{metric}" for name in benchmarks for metric in order if f"{name}/{metric}" in present]
    reference = PUBLISHED_TABLE2.get(published or "", {})
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    table = {}
    for model, row in results.items():
        cells, entry = [], {}
        for column in columns:
            value, ref = row.get(column), reference.get(model, {}).get(column)
            entry[column] = {"ours": value, "published": ref,
                             "difference": None if value is None or ref is None else round(value - ref, 4)}
            text = "-" if value is None else f"{value:.4g}"
            if ref is not None and value is not None:
                text += f" / {ref:.4g} ({value - ref:+.4g})"
            cells.append(text)
        table[model] = entry
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    note = "\nCells: ours / published (difference) where the paper publishes the number.\n" if reference else ""
    return table, "\n".join(lines) + "\n" + note
