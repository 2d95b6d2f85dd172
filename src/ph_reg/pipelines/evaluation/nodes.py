"""Nodes: artifact diagnostics and figures of teacher, denoised target and student."""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

# torch and the ph_reg library modules (which import torch) are imported inside the nodes, so loading the
# pipelines is fast (the signatures name their classes through node_types, which Kedro resolves without torch)
from ph_reg.pipelines.node_types import BackboneConfig, RecordStream, ShardReader, Tensor

RANDOM_WEIGHTS_WARNING = (
    "The backbone has random weights (no pretrained tag and no checkpoint): it has no learned artifacts, so these "
    "numbers show that the machinery runs, not that the method works."
)


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
    from ph_reg.models import BackboneConfig, build_backbone
    from ph_reg.method.targets import denoised_target_records
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
        tta = denoising["tta"]
        records = denoised_target_records(
            teacher, images, seed, n_views=tta["n_views"], shift_frac=tta["shift_frac"], flip_prob=tta["flip_prob"],
            pool_factor=tta["pool_factor"], batch_size=denoising["batch_size"],
            max_images_per_forward=denoising["max_images_per_forward"], progress=False, indices=indices)
        targets = {meta["image_index"]: record for record, meta in records}
    report, figure = artifact_evaluation(teacher, student, images, targets, indices, outlier_k=params["outlier_k"],
                                         batch_size=params["batch_size"], figure_images=params["figure_images"])
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
                               student_config: dict[str, Any], probe_metrics: dict[str, Any], params: dict[str, Any],
                               denoising: dict[str, Any], seed: int) -> tuple[dict[str, Any], str, Figure]:
    """The planted-artifact benchmark (ground truth known): clean model, implanted teacher, target and student."""
    import torch

    from ph_reg.evaluation.planted import planted_artifact_evaluation
    from ph_reg.models import BackboneConfig, build_backbone
    from ph_reg.runtime import resolve_device

    title = "# Planted-artifact benchmark (ground truth)\n\n"
    teacher_config = BackboneConfig.from_dict(student_config["teacher"])
    if teacher_config.implant is None:
        reason = "the backbone has no implant (backbone.implant is null), so no artifact is known"
        return {"skipped": reason}, f"{title}Skipped: {reason}.\n", _message_figure(reason)
    settings = params["planted"]
    device = resolve_device(params["device"])
    teacher = build_backbone(teacher_config).to(device).eval()
    student, _ = load_evaluated_student(student_weights, student_config, device)
    indices = sorted(images.indices(split=params["split"]), key=lambda i: (images.meta(i)["crop"], i))
    if settings["max_images"] is not None:
        indices = indices[:settings["max_images"]]
    if not indices:
        raise ValueError(f"evaluation.planted: no images in split {params['split']!r}")
    pixels = torch.stack([images[i]["image"] for i in indices])
    tta = denoising["tta"]
    report, markdown, figure = planted_artifact_evaluation(
        teacher, student, pixels, seed, n_views=settings["reference_views"], target_views=tta["n_views"],
        k=params["outlier_k"], low_cosine=settings["low_cosine"], batch_size=denoising["batch_size"],
        figure_images=params["figure_images"],
        probes=probe_metrics.get("results"), shift_frac=tta["shift_frac"], flip_prob=tta["flip_prob"],
        pool_factor=tta["pool_factor"], max_images_per_forward=denoising["max_images_per_forward"])
    header = (f"{title}The teacher carries a planted-artifact implant (`backbone.implant`, see the README); the clean "
              "model is the same network without it, so the artifact tokens and the clean features are known "
              f"exactly. The reference (clean_tta) is the clean model denoised with {settings['reference_views']} "
              f"TTA views (the teacher's TTA settings); the target uses teacher_denoising's {tta['n_views']} "
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


def _message_figure(text: str) -> Figure:
    figure = Figure(figsize=(6, 1.5))
    figure.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return figure


def selected(definitions: dict[str, Any], names: list[str], where: str) -> dict[str, Any]:
    """The definitions named in a ``run`` list (config environments add definitions; ``run`` picks them)."""
    missing = [name for name in names if name not in definitions]
    if missing:
        raise ValueError(f"{where}.run names {missing}, which are not defined in {where}; defined: {sorted(definitions)}")
    return {name: definitions[name] for name in names}


def selected_tasks(tasks: dict[str, dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    """Probe tasks filtered by ``run`` entries of the form ``"<task>/<benchmark>"``."""
    chosen: dict[str, dict[str, Any]] = {}
    for entry in names:
        task, _, benchmark = entry.partition("/")
        if benchmark not in (tasks.get(task) or {}):
            raise ValueError(f"evaluation.probes.run names {entry!r}, which is not defined in evaluation.probes.tasks")
        chosen.setdefault(task, {})[benchmark] = tasks[task][benchmark]
    return chosen


def evaluate_zero_shot_table(student_weights: dict[str, Tensor], student_config: dict[str, Any],
                             params: dict[str, Any], seed: int) -> tuple[dict[str, Any], str, dict[str, Figure]]:
    """Zero-shot open-vocabulary segmentation (Table 1): metrics JSON, Markdown and figures."""
    from ph_reg.evaluation.dense import zero_shot_evaluation, zero_shot_figures
    from ph_reg.models import BackboneConfig
    from ph_reg.runtime import check_precision, resolve_device
    from ph_reg.evaluation.zeroshot import table1

    precision = check_precision(params.get("precision"), "evaluation.precision")
    device = resolve_device(params["device"])
    settings = params["zero_shot"]
    base = BackboneConfig.from_dict(student_config["teacher"])
    benchmarks = selected(settings["benchmarks"], settings["run"], "evaluation.zero_shot")
    if base.family != "open_clip" or not benchmarks:  # decided before any weights are loaded
        reason = (f"zero-shot segmentation needs an open_clip backbone and benchmarks to run; backbone "
                  f"{base.arch!r}, benchmarks {settings['run']}")
        return ({"skipped": reason}, f"# Zero-shot open-vocabulary segmentation\n\nSkipped: {reason}.\n",
                {"zero_shot_skipped.png": _message_figure(reason)})
    student, _ = load_evaluated_student(student_weights, student_config, device)
    results = zero_shot_evaluation(student, base, settings["heads"], benchmarks,
                                   tta_views=settings["tta_views"], seed=seed, device=device,
                                   text_batch_size=settings["text_batch_size"], precision=precision)
    table, markdown = table1(results)
    figure = settings["figure"]
    figures = zero_shot_figures(student, base, settings["heads"], settings["benchmarks"][figure["benchmark"]],
                                figure["images"], figure["query"], tta_views=settings["tta_views"], seed=seed,
                                device=device, precision=precision, name=figure["benchmark"])
    header = "# Zero-shot open-vocabulary segmentation (mIoU %, Table 1 format)\n\n"
    if _is_random(base):
        header += f"**{RANDOM_WEIGHTS_WARNING}**\n\n"
    return {"results": results, "table": table, "random_weights": _is_random(base)}, header + markdown, figures


def cache_probe_features(student_weights: dict[str, Tensor], student_config: dict[str, Any],
                         params: dict[str, Any], seed: int) -> dict[str, RecordStream]:
    """Frozen features of teacher and student for every probe benchmark, computed once (the probe cache)."""
    from ph_reg.evaluation.dense import probe_feature_streams, probe_models
    from ph_reg.runtime import check_precision, resolve_device

    precision = check_precision(params.get("precision"), "evaluation.precision")
    device = resolve_device(params["device"])
    settings = params["probes"]
    student, base = load_evaluated_student(student_weights, student_config, device)
    models = {name: model.to(device) for name, model in probe_models(student, base, settings["teacher_head"]).items()}
    return probe_feature_streams(models, selected_tasks(settings["tasks"], settings["run"]), seed, feature_dtype=settings["feature_dtype"],
                                 batch_size=params["batch_size"], precision=precision, mode=settings["mode"])


def evaluate_probes(features: dict[str, ShardReader], student_weights: dict[str, Tensor],
                    student_config: dict[str, Any], params: dict[str, Any], seed: int
                    ) -> tuple[dict[str, Any], str, dict[str, pd.DataFrame]]:
    """Train the linear probes and report them in the paper's Table 2 format, with the training curves (one CSV
    per ``<task>-<benchmark>-<model>``: iteration, loss). ``evaluation.probes.mode``: ``cached`` trains from the
    train feature cache; ``online`` recomputes the teacher's and student's features for every batch under the
    official augmentation (the models are built here; the val side reads the cache in both modes)."""
    from ph_reg.evaluation.dense import probe_models, run_probes, table2
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
        built = probe_models(student, base, settings["teacher_head"])
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
    header = (f"# Linear probes (Table 2 format)\n\nteacher = the base model with the `{settings['teacher_head']}` "
              f"head; student = the distilled PH-Reg student.\n\n")
    if _is_random(base):
        header += f"**{RANDOM_WEIGHTS_WARNING}**\n\n"
    return {"results": results, "table": table, "random_weights": _is_random(base)}, header + markdown, curve_frames


SUMMARY_PROBE_METRICS = ("mIoU", "RMSE")   # the headline probe metric of each task (segmentation, depth)
SUMMARY_DECIMALS = 4


def summarize_evaluation(artifacts: dict[str, Any], zero_shot: dict[str, Any], probes: dict[str, Any],
                         planted: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of the four evaluation reports in one small file (``summary.json``, a DVC metric), so
    that ``dvc metrics show`` and ``dvc exp show`` read at a glance; each number is copied (rounded to 4 decimals)
    from the report named in its key, where the full context is:

    - ``artifacts.<teacher|student>.cosine_to_target``: evaluation.json, mean cosine to the denoised target;
    - ``planted.<teacher|target|student>.cosine_to_clean`` and ``.outlier_rate``: planted_artifacts.json, the mean
      cosine to the clean reference and the share of tokens whose cosine is below ``low_cosine`` (direction rule);
    - ``zero_shot_avg_miou.<head>``: zero_shot.json, the head's average mIoU (%) over the benchmarks run;
    - ``probes.<model>.<benchmark>/<mIoU|RMSE>``: probes.json, the final probe's segmentation mIoU (%) and depth
      RMSE (m).

    A report that its stage skipped gives ``<part>.skipped`` (the reason) instead of numbers."""

    def number(value: Any) -> float | None:
        return None if value is None else round(float(value), SUMMARY_DECIMALS)

    summary: dict[str, Any] = {"random_weights": bool(artifacts.get("random_weights"))}
    summary["artifacts"] = {name: {"cosine_to_target": number(values["mean"])}
                            for name, values in artifacts["cosine_to_target"].items()}
    if "skipped" in planted:
        summary["planted"] = {"skipped": planted["skipped"]}
    else:
        summary["planted"] = {name: {"cosine_to_clean": number(planted["sources"][name]["cosine"]["all"]),
                                     "outlier_rate": number(planted["sources"][name]["direction"]["rate"])}
                              for name in ("teacher", "target", "student")}
    if "skipped" in zero_shot:
        summary["zero_shot_avg_miou"] = {"skipped": zero_shot["skipped"]}
    else:
        summary["zero_shot_avg_miou"] = {head: number(row["ours"]["avg"])
                                         for head, row in zero_shot["table"]["rows"].items()}
    summary["probes"] = {model: {key: number(value) for key, value in row.items()
                                 if key.rsplit("/", 1)[-1] in SUMMARY_PROBE_METRICS}
                         for model, row in probes["results"].items()}
    return summary


def markdown_report(report: dict[str, Any]) -> str:
    """A short human-readable summary of the diagnostics."""
    lines = ["# PH-Reg artifact diagnostics", ""]
    if report["random_weights"]:
        lines += [f"**{RANDOM_WEIGHTS_WARNING}**", ""]
    if report.get("implant"):
        lines += ["The teacher carries **planted artifacts** (`backbone.implant`). The final normalisation equalises "
                  "token norms, so the norms below barely show them; planted_artifacts.md measures them against the "
                  "known mask and the clean model.", ""]
    b = report["backbone"]
    lines += [f"Backbone `{b['arch']}` at {b['img_size']} px, pretrained `{b['pretrained']}`, checkpoint "
              f"`{b['checkpoint']}`; {report['images']} images of the `{report.get('split')}` split"
              + (" (images the student trained on)" if report.get("split") == "train" else " (held out)")
              + f"; outliers: robust z of the token norm > {report['outlier_threshold_k']}.",
              "Student: " + (f"the snapshot after epoch {report['student_snapshot']} "
                             f"(`evaluation.student_snapshot`)." if report.get("student_snapshot") else
                             "the final student."), "",
              "| features | mean norm | outlier rate | cosine to target (mean) | share with cosine < 0.5 |",
              "|---|---|---|---|---|"]
    for name, stats in report["per_source"].items():
        cos = report["cosine_to_target"].get(name)
        cos_mean = f"{cos['mean']:.4f}" if cos else "-"
        low = f"{cos['low_share']:.4f}" if cos else "-"
        lines.append(f"| {name} | {stats['norm']['mean']:.4f} | {stats['outlier_rate']:.4f} | {cos_mean} | {low} |")
    return "\n".join(lines) + "\n"
