"""The planted-artifact benchmark: ground-truth metrics of clean model, implanted teacher, denoised target, student.

The implanted teacher (:mod:`ph_reg.models.implant`) has artifacts at known tokens (the *planted mask*) and the same model
without the implant is the clean ground truth. For every source (``clean``, ``teacher``, ``target`` = the teacher
denoised by TTA, ``student``, ...) the benchmark reports two readings of the same images:

* **norm reading** (the evaluation's norm-outlier rule, :func:`ph_reg.evaluation.artifacts.robust_outlier_mask`, robust z
  of the token norm > ``k``, judged per image): on the *pre-norm* tokens, ``forward_tokens(images,
  pre_norm=True)``, the last residual-stream state before any final normalisation. The final LayerNorm equalises
  norms, so the rule cannot see anything at the dense output. Reported: outlier rate, precision and recall against
  the planted mask, and the mean norm of the planted tokens over the image's median norm. Two caveats, by
  construction: (1) the target's pre-norm tokens are the TTA average of the teacher's pre-norm tokens; the real
  target is averaged *after* the final normalisation, where a planted token weighs 1/n of a unit-norm token,
  whereas before it 1/n of a ``strength``-fold norm still stands out, so this reading is much stricter than the
  target the student learns; (2) a student carries the implant, which writes in a frozen middle block from the
  pixels alone, so its residual stream keeps the planted tokens whatever it learns (for the CLIP heads the pre-norm
  tokens are the head's input): the norm reading of a student shows where the mechanism fires, not its output.
* **direction reading** on the dense output: the cosine to the clean reference, the *TTA-denoised clean model*
  (teacher head, same views as the target). A random ViT is far from shift-equivariant, so TTA alone moves its
  features; against the plain clean model, TTA's own smoothing would look like damage. Reported: mean cosine on all
  tokens, on planted tokens, on tokens adjacent to a planted token (8-neighbourhood ring) and on the rest, and the
  share of tokens with cosine < ``low_cosine`` with its precision and recall against the planted mask.

The test-time-registers rows (:mod:`ph_reg.evaluation.planted_ttr`) are measured like the student: ``ttr``, the
implanted teacher with test-time registers (its pre-norm and dense outputs leave the extra tokens out, as they leave
out the registers), and ``both``, a PH-Reg student distilled from the denoised targets of that teacher.

Linear-probe results (mIoU, depth RMSE, ...) computed elsewhere are merged with :func:`add_probe_results`.
:func:`check_targets` checks the benchmark's targets; :func:`ph_reg.reporting.tables.benchmark_markdown` renders a table
and :func:`ph_reg.reporting.figures.benchmark_figure` draws pre-norm norm maps with the planted mask outlined.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from ph_reg.method.targets import TeacherDenoisingConfig
from ph_reg.method.tta import MAX_IMAGES_PER_FORWARD, TTAConfig, TTADenoiser, image_generators
from ph_reg.evaluation.artifacts import cosine_map, patch_norms, robust_outlier_mask
from ph_reg.evaluation.features import dense_features_with_pre_norm
from ph_reg.reporting.figures import benchmark_figure
from ph_reg.reporting.tables import benchmark_markdown
from ph_reg.runtime import autocast, module_device, normalize

__all__ = [
    "SourceFeatures",
    "tta_tokens",
    "tta_features",
    "benchmark_features",
    "adjacent_mask",
    "per_image_outliers",
    "detection_scores",
    "source_metrics",
    "artifact_benchmark",
    "add_probe_results",
    "check_targets",
    "planted_artifact_evaluation",
]

REFERENCE = "clean_tta"  # the name of the clean reference in reports
#: The test-time-registers rows (ph_reg.evaluation.planted_ttr): the teacher with test-time registers, and a
#: PH-Reg student distilled from that teacher's denoised targets.
TTR_ROWS = ("ttr", "both")
#: The sources the figure shows, when present.
FIGURE_SOURCES = ("teacher", "target", "student", "ttr")


class SourceFeatures(NamedTuple):
    """Features of one source on the benchmark images: dense output and pre-norm tokens, both (B, h, w, C)."""

    output: Tensor
    pre_norm: Tensor


def _autocast(device: torch.device):  # the precision of tta_tokens: "auto" (bf16 on CUDA, fp32 on the CPU)
    return autocast(device, "auto")


@torch.no_grad()
def _tta_average(model: torch.nn.Module, features_fn, images: Tensor, seed: int, tta: TTAConfig, batch_size: int,
                 max_images_per_forward: int) -> Tensor:
    """``features_fn`` of ``model`` denoised by TTA: (B, h, w, C) float32 CPU; image ``i`` draws its views from
    ``generator(seed, "tta", 0, i)`` (``image_generators``), the key of the teacher-denoising stage."""
    device = module_device(model)
    model.eval()
    denoiser = TTADenoiser(features_fn, model.patch_size, model.fill_value().to(device), tta, max_images_per_forward)
    out = []
    for start in range(0, images.shape[0], batch_size):
        indices = list(range(start, min(start + batch_size, images.shape[0])))
        with _autocast(device):
            out.append(denoiser(images[indices].to(device), image_generators(seed, 0, indices)).float().cpu())
    return torch.cat(out)


def tta_tokens(model: torch.nn.Module, images: Tensor, seed: int, tta: TTAConfig, pre_norm: bool = False,
               batch_size: int = TeacherDenoisingConfig.batch_size,
               max_images_per_forward: int = MAX_IMAGES_PER_FORWARD) -> Tensor:
    """TTA-denoised (B, h, w, C) float32 CPU tokens. Image ``i`` draws its views from ``generator(seed, "tta", 0,
    i)`` (``image_generators``), the key of the teacher-denoising stage, so that with the same seed and ``tta`` the
    dense output equals the cached target."""
    return _tta_average(model, lambda x: model.forward_tokens(x, pre_norm=pre_norm).patch, images, seed, tta,
                        batch_size, max_images_per_forward)


def tta_features(model: torch.nn.Module, images: Tensor, seed: int, tta: TTAConfig,
                 batch_size: int = TeacherDenoisingConfig.batch_size,
                 max_images_per_forward: int = MAX_IMAGES_PER_FORWARD) -> SourceFeatures:
    """``SourceFeatures(tta_tokens(...), tta_tokens(..., pre_norm=True))`` from one TTA pass: each view's dense
    output and pre-norm tokens come from one forward (``forward_with_pre_norm``), concatenated on the channels; the
    un-shift average is per channel, so the two halves split after it equal the two separate passes bit for bit."""
    channels = []

    def both(x: Tensor) -> Tensor:
        output, pre_norm = model.forward_with_pre_norm(x)
        channels.append(output.patch.shape[-1])
        return torch.cat([output.patch, pre_norm.patch], dim=-1)

    joint = _tta_average(model, both, images, seed, tta, batch_size, max_images_per_forward)
    split = channels[0]
    return SourceFeatures(joint[..., :split].contiguous(), joint[..., split:].contiguous())


def benchmark_features(models: Mapping[str, torch.nn.Module], clean: torch.nn.Module, teacher: torch.nn.Module,
                       images: Tensor, seed: int, tta: TTAConfig, reference_views: int | None = None,
                       batch_size: int = TeacherDenoisingConfig.batch_size,
                       max_images_per_forward: int = MAX_IMAGES_PER_FORWARD,
                       ) -> tuple[dict[str, SourceFeatures], Tensor]:
    """Everything the benchmark reads, for normalised ``images`` (B, 3, H, W).

    Returns ``(features, reference)``: ``features`` has ``clean``, ``teacher``, ``target`` (the teacher denoised
    with ``tta``) and one entry per model of ``models`` (e.g. students); ``reference`` is the clean model's dense
    output denoised with ``tta`` but ``reference_views`` views (default ``tta.n_views``; the first views are the
    target's). Each source's dense output and pre-norm tokens come from one forward (one TTA pass for the target).
    """
    reference_tta = tta if reference_views is None else dataclasses.replace(tta, n_views=reference_views)
    common = dict(seed=seed, batch_size=batch_size, max_images_per_forward=max_images_per_forward)
    features = {
        "clean": SourceFeatures(*dense_features_with_pre_norm(clean, images)),
        "teacher": SourceFeatures(*dense_features_with_pre_norm(teacher, images)),
        "target": tta_features(teacher, images, tta=tta, **common),
    }
    for name, model in models.items():
        features[name] = SourceFeatures(*dense_features_with_pre_norm(model, images))
    reference = tta_tokens(clean, images, tta=reference_tta, **common)
    return features, reference


def adjacent_mask(planted: Tensor) -> Tensor:
    """Tokens in the 8-neighbourhood of a planted token that are not planted themselves: (B, h, w) bool."""
    grown = F.max_pool2d(planted.float().unsqueeze(1), kernel_size=3, stride=1, padding=1).squeeze(1) > 0
    return grown & ~planted


def per_image_outliers(tokens: Tensor, k: float = 3.5) -> Tensor:
    """The norm-outlier rule (robust z of the token norm > ``k``) applied to each image on its own: (B, h, w)."""
    norms = patch_norms(tokens)
    return torch.stack([robust_outlier_mask(n, k=k) for n in norms])


def detection_scores(detected: Tensor, planted: Tensor) -> dict[str, float]:
    """Rate of ``detected`` tokens and its precision / recall against ``planted`` (NaN precision if none)."""
    if detected.shape != planted.shape:
        raise ValueError(f"detected {tuple(detected.shape)} and planted {tuple(planted.shape)} masks differ in shape")
    hits = (detected & planted).sum().item()
    found, total = detected.sum().item(), planted.sum().item()
    return {"rate": detected.float().mean().item(), "precision": hits / found if found else float("nan"),
            "recall": hits / total if total else float("nan")}


def _mean(values: Tensor) -> float:
    return values.mean().item() if values.numel() else float("nan")


def source_metrics(features: SourceFeatures, reference: Tensor, planted: Tensor, k: float = 3.5,
                   low_cosine: float = 0.5) -> dict[str, dict[str, float]]:
    """The norm reading (pre-norm tokens) and the direction reading (dense output vs ``reference``) of a source."""
    norms = patch_norms(features.pre_norm)
    median = norms.flatten(1).median(dim=1).values.view(-1, 1, 1)
    norm = detection_scores(per_image_outliers(features.pre_norm, k), planted)
    norm["planted_norm_ratio"] = _mean((norms / median)[planted])
    cos = cosine_map(features.output, reference)
    adjacent = adjacent_mask(planted)
    direction = detection_scores(cos < low_cosine, planted)
    cosine = {"all": _mean(cos), "planted": _mean(cos[planted]), "adjacent": _mean(cos[adjacent]),
              "rest": _mean(cos[~planted & ~adjacent])}
    return {"norm": norm, "direction": direction, "cosine": cosine}


def artifact_benchmark(features: Mapping[str, SourceFeatures], reference: Tensor, planted: Tensor, k: float = 3.5,
                       low_cosine: float = 0.5) -> dict[str, Any]:
    """JSON-ready report: ``{"planted_rate", "outlier_k", "low_cosine", "reference", "sources": {name: metrics}}``
    with the metrics of :func:`source_metrics` for every source."""
    if planted.dtype != torch.bool or planted.ndim != 3:
        raise ValueError(f"planted must be a (B, h, w) bool mask, got {planted.dtype} {tuple(planted.shape)}")
    for name, feats in features.items():
        if feats.output.shape[:3] != planted.shape or feats.pre_norm.shape[:3] != planted.shape:
            raise ValueError(f"features[{name!r}] do not match the planted mask's (B, h, w) = {tuple(planted.shape)}")
    if reference.shape[:3] != planted.shape:
        raise ValueError(f"reference {tuple(reference.shape)} does not match the planted mask {tuple(planted.shape)}")
    return {
        "planted_rate": planted.float().mean().item(),
        "images": planted.shape[0],
        "outlier_k": float(k),
        "low_cosine": float(low_cosine),
        "reference": REFERENCE,
        "sources": {name: source_metrics(feats, reference, planted, k, low_cosine) for name, feats in features.items()},
    }


def add_probe_results(report: dict[str, Any], probes: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Merge precomputed probe results ``{source: {"<benchmark>/<metric>": value}}`` (e.g. the output of
    :func:`ph_reg.evaluation.probes.run.run_probes`, keys renamed to the report's source names) into ``report["sources"][source]["probes"]``."""
    for source, values in probes.items():
        if source not in report["sources"]:
            raise ValueError(f"probe results for {source!r}, which is not a source of the report "
                             f"({sorted(report['sources'])})")
        report["sources"][source]["probes"] = {key: float(value) for key, value in values.items()}
    return report


def _reduction(report: dict[str, Any], source: str, reading: str = "norm") -> float:
    teacher = report["sources"]["teacher"][reading]["rate"]
    value = report["sources"][source][reading]["rate"]
    return 1.0 - value / teacher if teacher > 0 else float("nan")


def check_targets(report: dict[str, Any], student: str = "student", min_planted_rate: float = 0.02,
                  min_recall: float = 0.9, min_reduction: float = 0.8,
                  probe_metric: str = "synthetic/mIoU") -> dict[str, dict[str, Any]]:
    """The benchmark's targets: ``{name: {"value", "threshold", "met"}}`` (``met`` is None when not measured).

    The teacher's artifacts are detected with the norm rule on its residual stream (pre-norm tokens). The outlier
    reductions of the target and the student are read on what they are, dense outputs, with the direction rule
    (cosine < low_cosine): their norm-rule readings are in the report, but by construction they cannot show a
    removal (see the module docstring), so they are not targets. The cosine target compares the mean over all
    tokens to the teacher's. The rows ``ttr`` and ``both`` (:data:`TTR_ROWS`), when present, get the student's two
    targets.
    """
    sources = report["sources"]
    teacher_cos = sources["teacher"]["cosine"]["all"]

    def entry(value: float, threshold: float, higher: bool = True) -> dict[str, Any]:
        met = None if value is None or np.isnan(value) else bool(value >= threshold if higher else value > threshold)
        return {"value": value, "threshold": threshold, "met": met}

    targets = {
        "teacher planted rate": entry(report["planted_rate"], min_planted_rate),
        "teacher planted tokens detected (norm rule recall)": entry(sources["teacher"]["norm"]["recall"], min_recall),
    }
    for name in ("target", student, *TTR_ROWS):
        if name not in sources:
            continue
        targets[f"{name}: fewer outlier tokens than the teacher (direction rule, share removed)"] = entry(
            _reduction(report, name, "direction"), min_reduction)
        targets[f"{name}: cosine to clean above the teacher's"] = entry(sources[name]["cosine"]["all"], teacher_cos,
                                                                        higher=False)
    probes_t, probes_s = sources["teacher"].get("probes", {}), sources.get(student, {}).get("probes", {})
    if probe_metric in probes_t and probe_metric in probes_s:
        targets[f"{student}: probe {probe_metric} at least the teacher's"] = entry(probes_s[probe_metric],
                                                                                  probes_t[probe_metric])
    return targets


def planted_artifact_evaluation(teacher: torch.nn.Module, student: torch.nn.Module, pixels: Tensor, seed: int,
                                tta: TTAConfig, reference_views: int | None = None, k: float = 3.5,
                                low_cosine: float = 0.5, batch_size: int = TeacherDenoisingConfig.batch_size,
                                figure_images: int = 4, probes: Mapping[str, Mapping[str, float]] | None = None,
                                max_images_per_forward: int = MAX_IMAGES_PER_FORWARD,
                                extra: Mapping[str, torch.nn.Module] | None = None,
                                details: Mapping[str, Any] | None = None,
                                ) -> tuple[dict[str, Any], str, Figure]:
    """The whole benchmark on uint8 images (B, 3, H, W): JSON-ready report (with the targets), Markdown and figure.

    ``teacher`` carries the implant (``teacher.config.implant``); the clean ground truth is the same model built
    without it. ``student`` is the distilled student. ``tta`` (``teacher_denoising.tta``) denoises the teacher's
    target, and with ``reference_views`` views (default ``tta.n_views``) the clean reference. Keep
    ``reference_views`` fixed across an ablation of ``tta.n_views``, so that every arm is measured against the same
    reference.
    ``probes``: linear-probe results ``{source: {"<benchmark>/<metric>": value}}`` merged into the report.
    ``extra``: more models measured as the student is, after it (e.g. ``ttr`` and ``both``, :data:`TTR_ROWS`);
    ``details``: entries added to the report before it is rendered (``test_time_registers``: what the ``ttr`` row
    ran with, :func:`ph_reg.evaluation.planted_ttr.neuron_summary`; ``rows_skipped``: ``{row: reason}``).
    """
    from ph_reg.models import clean_copy

    if getattr(teacher.config, "implant", None) is None:
        raise ValueError("the planted-artifact benchmark needs a teacher with an implant (backbone.implant)")
    device = module_device(teacher)
    clean = clean_copy(teacher)
    images = normalize(pixels, teacher.mean, teacher.std)
    models = {"student": student, **(extra or {})}
    if len(models) != 1 + len(extra or {}) or {"clean", "teacher", "target"} & set(models):
        raise ValueError(f"extra rows {sorted(extra or {})} must not reuse the names clean, teacher, target, student")
    features, reference = benchmark_features(models, clean, teacher, images, seed=seed, tta=tta,
                                             reference_views=reference_views, batch_size=batch_size,
                                             max_images_per_forward=max_images_per_forward)
    planted = teacher.planted_mask(images.to(device)).cpu()
    report = artifact_benchmark(features, reference, planted, k=k, low_cosine=low_cosine)
    if probes:
        add_probe_results(report, {name: values for name, values in probes.items() if name in report["sources"]})
    report["implant"] = dict(teacher.config.implant)
    report.update(details or {})
    report["targets"] = check_targets(report)
    figure = benchmark_figure(pixels, {name: features[name] for name in FIGURE_SOURCES if name in features}, planted,
                              reference, max_images=figure_images)
    return report, benchmark_markdown(report, report["targets"]), figure
