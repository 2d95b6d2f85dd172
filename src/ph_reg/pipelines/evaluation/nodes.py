"""Nodes: artifact diagnostics and figures of teacher, denoised target and student."""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

# torch and the ph_reg library modules (which import torch) are imported inside the nodes, so loading the
# pipelines is fast (the signatures name their classes through node_types, which Kedro resolves without torch)
from ph_reg.pipelines.node_types import BackboneConfig, RecordStream, ShardReader, Tensor

def select_student(student_weights: dict[str, Tensor], student_config: dict[str, Any],
                   snapshots: dict[str, Any], params: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The student every evaluation node measures: the final one (``evaluation.student_snapshot: null``) or the
    snapshot kept after that epoch (conf/paper_dinov2: 30, the student of the paper's DINOv2 numbers), read from the
    snapshot index that student_distillation wrote; an epoch without a snapshot is an error naming the parameter."""
    from ph_reg.method.student import read_student, snapshot_folder

    epoch = params.get("student_snapshot")
    if epoch is None:
        return student_weights, student_config
    return read_student(snapshot_folder(snapshots, epoch))


def evaluate_artifacts(images: ShardReader, targets: ShardReader, student_weights: dict[str, Tensor],
                       student_config: dict[str, Any], params: dict[str, Any], denoising: dict[str, Any],
                       seed: int) -> tuple[dict[str, Any], Figure, str]:
    """Diagnostics JSON (DVC metrics), the feature-map figure and a Markdown report, on the prepared images of
    ``evaluation.split`` (at most ``evaluation.max_images``). With online targets (nothing cached) the denoised
    targets of those images are computed here, with teacher_denoising's settings and the cached mode's view keys."""
    from ph_reg.evaluation.artifacts import artifact_evaluation
    from ph_reg.reporting.figures import artifact_figure
    from ph_reg.reporting.tables import markdown_report
    from ph_reg.models import BackboneConfig, build_backbone
    from ph_reg.config import from_mapping
    from ph_reg.method.targets import TeacherDenoisingConfig, denoised_target_records
    from ph_reg.runtime import resolve_device

    device = resolve_device(params["device"])
    teacher = build_backbone(BackboneConfig.from_dict(student_config["teacher"])).to(device)
    student, _ = load_evaluated_student(student_weights, student_config, device)
    # first crops first, so the figure shows distinct photos
    indices = sorted(images.indices(split=params["split"]), key=lambda i: (images.meta(i)["crop"], i))
    if params.get("max_images") is not None:
        indices = indices[:params["max_images"]]
    if not indices:
        raise ValueError(f"evaluation.split: no prepared image has split {params['split']!r} (data_preparation."
                         f"val_fraction 0 holds none out: evaluate the 'train' split)")
    if targets.attrs.get("mode") == "online":
        config = from_mapping(TeacherDenoisingConfig, denoising, "teacher_denoising")
        records = denoised_target_records(teacher, images, seed, config.tta, batch_size=config.batch_size,
                                          max_images_per_forward=config.max_images_per_forward, progress=False,
                                          indices=indices)
        targets = {meta["image_index"]: record for record, meta in records}
    report, pixels, features = artifact_evaluation(teacher, student, images, targets, indices,
                                                   outlier_k=params["outlier_k"], batch_size=params["batch_size"])
    figure = artifact_figure(pixels, features, max_images=params["figure_images"])
    report["split"] = params["split"]
    report["student_snapshot"] = student_config.get("epoch")   # None: the final student
    backbone = student_config["backbone"]
    random_weights = not backbone.get("pretrained") and not backbone.get("checkpoint")
    report["random_weights"] = random_weights
    report["implant"] = backbone.get("implant")
    report["backbone"] = {"arch": backbone["arch"], "pretrained": backbone.get("pretrained"),
                          "checkpoint": backbone.get("checkpoint"), "img_size": backbone["img_size"]}
    return report, figure, markdown_report(report)


def evaluate_planted_artifacts(images: ShardReader, student_weights: dict[str, Tensor],
                               student_config: dict[str, Any], probe_metrics: dict[str, Any],
                               register_neurons: dict[str, Any], params: dict[str, Any], denoising: dict[str, Any],
                               distillation: dict[str, Any], seed: int) -> tuple[dict[str, Any], str, Figure]:
    """The planted-artifact benchmark (ground truth known): clean model, implanted teacher, target, student, the
    teacher with test-time registers (``ttr``, from ``register_neurons``) and, with ``evaluation.planted.both``, a
    student distilled from that teacher with student_distillation's recipe (``both``)."""
    from ph_reg.config import from_mapping
    from ph_reg.evaluation.planted import planted_artifact_evaluation
    from ph_reg.evaluation.planted_ttr import both_skip_reason, both_student, neuron_summary, ttr_teacher
    from ph_reg.method.config import StudentDistillationConfig
    from ph_reg.method.data import image_crops
    from ph_reg.reporting.figures import message_figure
    from ph_reg.method.targets import TeacherDenoisingConfig
    from ph_reg.models import BackboneConfig, build_backbone
    from ph_reg.runtime import resolve_device

    title = "# Planted-artifact benchmark (ground truth)\n\n"
    teacher_config = BackboneConfig.from_dict(student_config["teacher"])
    if teacher_config.implant is None:
        reason = "the backbone has no implant (backbone.implant is null), so no artifact is known"
        return {"skipped": reason}, f"{title}Skipped: {reason}.\n", message_figure(reason)
    settings = params["planted"]
    device = resolve_device(params["device"])
    teacher = build_backbone(teacher_config).to(device).eval()
    student, _ = load_evaluated_student(student_weights, student_config, device)
    indices = sorted(images.indices(split=params["split"]), key=lambda i: (images.meta(i)["crop"], i))
    if settings["max_images"] is not None:
        indices = indices[:settings["max_images"]]
    if not indices:
        raise ValueError(f"evaluation.planted: no images in split {params['split']!r}")
    pixels = images.stack("image", indices)
    config = from_mapping(TeacherDenoisingConfig, denoising, "teacher_denoising")
    extra = {"ttr": ttr_teacher(teacher, register_neurons)}
    details = {"test_time_registers": neuron_summary(teacher, register_neurons), "rows_skipped": {}}
    recipe = from_mapping(StudentDistillationConfig, distillation, "student_distillation")
    skipped = both_skip_reason(settings["both"], recipe)
    if skipped is not None:
        details["rows_skipped"]["both"] = skipped
    else:
        crops = list(image_crops(images, images.indices(split=recipe.train_split)).values())
        extra["both"] = both_student(student_config, extra["ttr"], images, crops, recipe, config, seed, device)
    report, markdown, figure = planted_artifact_evaluation(
        teacher, student, pixels, seed, config.tta, reference_views=settings["reference_views"],
        k=params["outlier_k"], low_cosine=settings["low_cosine"], batch_size=config.batch_size,
        figure_images=params["figure_images"], probes=probe_metrics.get("results"),
        max_images_per_forward=config.max_images_per_forward, extra=extra, details=details)
    header = (f"{title}The teacher carries a planted-artifact implant (`backbone.implant`, see the README); the clean "
              "model is the same network without it, so the artifact tokens and the clean features are known "
              f"exactly. The reference (clean_tta) is the clean model denoised with {settings['reference_views']} "
              f"TTA views (the teacher's TTA settings); the target uses teacher_denoising's {config.tta.n_views} "
              "view(s).\n\n")
    return report, header + markdown, figure


def load_evaluated_student(student_weights: dict[str, Tensor], student_config: dict[str, Any], device):
    """The distilled student (eval mode, on ``device``) and its base model's config."""
    from ph_reg.models import BackboneConfig, load_trainable_state_dict
    from ph_reg.method.student import build_student_from_config

    student = build_student_from_config(student_config)
    load_trainable_state_dict(student, student_weights)
    return student.to(device).eval(), BackboneConfig.from_dict(student_config["teacher"])


def _is_random(config: BackboneConfig) -> bool:
    return not config.pretrained and not config.checkpoint


def evaluate_zero_shot(student_weights: dict[str, Tensor], student_config: dict[str, Any],
                       register_neurons: dict[str, Any], params: dict[str, Any], denoising: dict[str, Any],
                       seed: int) -> tuple[dict[str, Any], str, dict[str, Figure]]:
    """Zero-shot open-vocabulary segmentation (Table 1): metrics JSON, Markdown and figures. The ``maskclip_tta``
    head denoises with ``teacher_denoising.tta``, with ``evaluation.zero_shot.tta_views`` views; the ``ttr`` heads
    carry the test-time registers of ``register_neurons`` (the test_time_registers pipeline's artifact)."""
    import dataclasses

    from ph_reg.config import from_mapping
    from ph_reg.method.targets import TeacherDenoisingConfig
    from ph_reg.evaluation.zeroshot.run import selected, zero_shot_run
    from ph_reg.reporting.figures import message_figure
    from ph_reg.reporting.tables import RANDOM_WEIGHTS_WARNING, table1
    from ph_reg.models import BackboneConfig
    from ph_reg.runtime import check_precision, resolve_device

    precision = check_precision(params.get("precision"), "evaluation.precision")
    device = resolve_device(params["device"])
    settings = params["zero_shot"]
    base = BackboneConfig.from_dict(student_config["teacher"])
    benchmarks = selected(settings["benchmarks"], settings["run"], "evaluation.zero_shot")
    if base.family != "open_clip" or not benchmarks:  # decided before any weights are loaded
        reason = (f"zero-shot segmentation needs an open_clip backbone and benchmarks to run; backbone "
                  f"{base.arch!r}, benchmarks {settings['run']}")
        return ({"skipped": reason}, f"# Zero-shot open-vocabulary segmentation\n\nSkipped: {reason}.\n",
                {"zero_shot_skipped.png": message_figure(reason)})
    student, _ = load_evaluated_student(student_weights, student_config, device)
    tta = dataclasses.replace(from_mapping(TeacherDenoisingConfig, denoising, "teacher_denoising").tta,
                              n_views=settings["tta_views"])
    figure = {**settings["figure"], "spec": settings["benchmarks"][settings["figure"]["benchmark"]]}
    results, figures = zero_shot_run(student, base, settings["heads"], benchmarks, figure, tta=tta, seed=seed,
                                     device=device, text_batch_size=settings["text_batch_size"], precision=precision,
                                     register_neurons=register_neurons)
    table, markdown = table1(results)
    header = "# Zero-shot open-vocabulary segmentation (mIoU %, Table 1 format)\n\n"
    if _is_random(base):
        header += f"**{RANDOM_WEIGHTS_WARNING}**\n\n"
    return {"results": results, "table": table, "random_weights": _is_random(base)}, header + markdown, figures


def cache_probe_features(student_weights: dict[str, Tensor], student_config: dict[str, Any],
                         register_neurons: dict[str, Any], params: dict[str, Any], seed: int
                         ) -> dict[str, RecordStream]:
    """Frozen features of teacher and student (and, with ``evaluation.probes.ttr``, the teacher with the test-time
    registers of ``register_neurons``) for every probe benchmark, computed once (the probe cache)."""
    from ph_reg.evaluation.probes.run import probe_feature_streams, probe_models, selected_tasks
    from ph_reg.runtime import check_precision, resolve_device

    precision = check_precision(params.get("precision"), "evaluation.precision")
    device = resolve_device(params["device"])
    settings = params["probes"]
    student, base = load_evaluated_student(student_weights, student_config, device)
    built = probe_models(student, base, settings["teacher_head"], settings["ttr"], register_neurons)
    models = {name: model.to(device) for name, model in built.items()}
    return probe_feature_streams(models, selected_tasks(settings["tasks"], settings["run"]), seed,
                                 feature_dtype=settings["feature_dtype"], batch_size=params["batch_size"],
                                 precision=precision, mode=settings["mode"])


def evaluate_probes(features: dict[str, ShardReader], student_weights: dict[str, Tensor],
                    student_config: dict[str, Any], register_neurons: dict[str, Any], params: dict[str, Any],
                    seed: int) -> tuple[dict[str, Any], str, dict[str, pd.DataFrame]]:
    """Train the linear probes and report them in the paper's Table 2 format, with the training curves (one CSV
    per ``<task>-<benchmark>-<model>``: iteration, loss). ``evaluation.probes.mode``: ``cached`` trains from the
    train feature cache; ``online`` recomputes the teacher's and student's features for every batch under the
    official augmentation (the models are built here, the ``ttr`` one with ``register_neurons``; the val side reads
    the cache in both modes)."""
    from ph_reg.evaluation.probes.run import probe_models, run_probes, selected_tasks
    from ph_reg.reporting.tables import RANDOM_WEIGHTS_WARNING, table2
    from ph_reg.models import BackboneConfig
    from ph_reg.evaluation.probes.online import check_mode
    from ph_reg.runtime import check_precision, resolve_device

    settings = params["probes"]
    mode = check_mode(settings["mode"])
    precision = check_precision(params.get("precision"), "evaluation.precision")
    models = None
    if mode == "online":
        device = resolve_device(params["device"])
        student, base = load_evaluated_student(student_weights, student_config, device)
        built = probe_models(student, base, settings["teacher_head"], settings["ttr"], register_neurons)
        models = {name: model.to(device) for name, model in built.items()}
    curves: dict[str, list[float]] = {}
    results = run_probes(features, selected_tasks(settings["tasks"], settings["run"]), seed, curves=curves, mode=mode,
                         models=models, precision=precision, loader_workers=settings["loader_workers"])
    curve_frames = {}
    for key, losses in curves.items():
        model, task, benchmark = key.split("/")
        curve_frames[f"{task}-{benchmark}-{model}"] = pd.DataFrame({"iteration": range(1, len(losses) + 1),
                                                                    "loss": losses})
    table, markdown = table2(results, settings.get("published"))
    base = BackboneConfig.from_dict(student_config["teacher"])
    rows = (f"teacher = the base model with the `{settings['teacher_head']}` head; student = the distilled PH-Reg "
            f"student")
    if settings["ttr"]:
        rows += (f"; ttr = the teacher with test-time registers ({len(register_neurons['neurons'])} register neurons "
                 f"of register_neurons)")
    header = f"# Linear probes (Table 2 format)\n\n{rows}.\n\n"
    if _is_random(base):
        header += f"**{RANDOM_WEIGHTS_WARNING}**\n\n"
    return {"results": results, "table": table, "random_weights": _is_random(base)}, header + markdown, curve_frames
