"""The planted-artifact benchmark: ground-truth metrics of clean model, implanted teacher, denoised target, student.

The implanted teacher (:mod:`ph_reg.models.implant`) has artifacts at known tokens (the *planted mask*) and the same model
without the implant is the clean ground truth. For every source (``clean``, ``teacher``, ``target`` = the teacher
denoised by TTA, ``student``, ...) the benchmark reports two readings of the same images:

* **norm reading** (the evaluation's norm-outlier rule, :func:`ph_reg.evaluation.diagnostics.robust_outlier_mask`, robust z
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

Linear-probe results (mIoU, depth RMSE, ...) computed elsewhere are merged with :func:`add_probe_results`.
:func:`benchmark_markdown` renders a table and :func:`check_targets` the issue's targets; :func:`benchmark_figure`
draws pre-norm norm maps with the planted mask outlined.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from torch import Tensor

from ph_reg.method.tta import TTADenoiser, image_generators
from ph_reg.evaluation.diagnostics import cosine_map, patch_norms, robust_outlier_mask
from ph_reg.runtime import autocast_dtype, normalize

__all__ = [
    "SourceFeatures",
    "dense_tokens",
    "tta_tokens",
    "benchmark_features",
    "adjacent_mask",
    "per_image_outliers",
    "detection_scores",
    "source_metrics",
    "artifact_benchmark",
    "add_probe_results",
    "check_targets",
    "benchmark_markdown",
    "benchmark_figure",
    "planted_artifact_evaluation",
]

REFERENCE = "clean_tta"  # the name of the clean reference in reports


class SourceFeatures(NamedTuple):
    """Features of one source on the benchmark images: dense output and pre-norm tokens, both (B, h, w, C)."""

    output: Tensor
    pre_norm: Tensor


def _autocast(device: torch.device):
    amp = autocast_dtype(device)
    return torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()


@torch.no_grad()
def dense_tokens(model: torch.nn.Module, images: Tensor, pre_norm: bool = False, batch_size: int = 8) -> Tensor:
    """(B, h, w, C) float32 CPU tokens of normalised images: the dense output or the pre-norm tokens."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        with _autocast(device):
            out.append(model.forward_tokens(images[start:start + batch_size].to(device), pre_norm=pre_norm)
                       .patch.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def tta_tokens(model: torch.nn.Module, images: Tensor, seed: int, n_views: int = 10, pre_norm: bool = False,
               batch_size: int = 4, max_images_per_forward: int = 20, **tta: Any) -> Tensor:
    """TTA-denoised (B, h, w, C) float32 CPU tokens. Image ``i`` draws its views from ``generator(seed, "tta", 0,
    i)`` (``image_generators``), the key of the teacher-denoising stage, so that with the same seed the dense output
    equals the cached target. ``tta``: ``shift_frac``, ``flip_prob``, ``pool_factor``."""
    device = next(model.parameters()).device
    model.eval()
    denoiser = TTADenoiser(lambda x: model.forward_tokens(x, pre_norm=pre_norm).patch, model.patch_size,
                           model.fill_value().to(device), n_views=n_views,
                           max_images_per_forward=max_images_per_forward, **tta)
    out = []
    for start in range(0, images.shape[0], batch_size):
        indices = list(range(start, min(start + batch_size, images.shape[0])))
        with _autocast(device):
            out.append(denoiser(images[indices].to(device), image_generators(seed, 0, indices)).float().cpu())
    return torch.cat(out)


def benchmark_features(models: Mapping[str, torch.nn.Module], clean: torch.nn.Module, teacher: torch.nn.Module,
                       images: Tensor, seed: int, n_views: int = 10, batch_size: int = 4,
                       target_views: int | None = None, **tta: Any) -> tuple[dict[str, SourceFeatures], Tensor]:
    """Everything the benchmark reads, for normalised ``images`` (B, 3, H, W).

    Returns ``(features, reference)``: ``features`` has ``clean``, ``teacher``, ``target`` (the teacher denoised
    with ``target_views`` views, default ``n_views``) and one entry per model of ``models`` (e.g. students);
    ``reference`` is the clean model's dense output denoised with ``n_views`` views (same views as the target).
    """
    target_views = n_views if target_views is None else target_views
    common = dict(seed=seed, batch_size=batch_size, **tta)
    features = {
        "clean": SourceFeatures(dense_tokens(clean, images), dense_tokens(clean, images, pre_norm=True)),
        "teacher": SourceFeatures(dense_tokens(teacher, images), dense_tokens(teacher, images, pre_norm=True)),
        "target": SourceFeatures(tta_tokens(teacher, images, n_views=target_views, **common),
                                 tta_tokens(teacher, images, n_views=target_views, pre_norm=True, **common)),
    }
    for name, model in models.items():
        features[name] = SourceFeatures(dense_tokens(model, images), dense_tokens(model, images, pre_norm=True))
    reference = tta_tokens(clean, images, n_views=n_views, **common)
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
    """Merge precomputed probe results ``{source: {"<benchmark>/<metric>": value}}`` (e.g. ``dense_eval.run_probes``
    output, keys renamed to the report's source names) into ``report["sources"][source]["probes"]``."""
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
    """The issue's targets: ``{name: {"value", "threshold", "met"}}`` (``met`` is None when not measured).

    The teacher's artifacts are detected with the norm rule on its residual stream (pre-norm tokens). The outlier
    reductions of the target and the student are read on what they are, dense outputs, with the direction rule
    (cosine < low_cosine): their norm-rule readings are in the report, but by construction they cannot show a
    removal (see the module docstring), so they are not targets. The cosine target compares the mean over all
    tokens to the teacher's.
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
    for name in ("target", student):
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


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def benchmark_markdown(report: dict[str, Any], targets: Mapping[str, Mapping[str, Any]] | None = None,
                       probe_metrics: Sequence[str] = ("mIoU", "RMSE")) -> str:
    """A Markdown table of the report (one row per source; probe columns: the ``<benchmark>/<metric>`` results whose
    metric is in ``probe_metrics``), followed by the targets when given."""
    probe_keys = sorted({key for s in report["sources"].values() for key in s.get("probes", {})
                         if key.rsplit("/", 1)[-1] in probe_metrics})
    lines = [
        f"Planted artifacts: {100 * report['planted_rate']:.2f} % of the tokens of {report['images']} images. "
        f"Norm rule: robust z of the pre-norm token norm > {report['outlier_k']} (per image). Direction rule: "
        f"cosine to the TTA-denoised clean model < {report['low_cosine']}. The norm rule reads the residual stream "
        "(pre-norm tokens); a student carries the implant, so it keeps firing there; the target's pre-norm tokens are "
        "a TTA average taken before the final normalisation, stricter than the real target. The dense outputs are "
        "read by direction.",
        "",
        "| source | norm: outlier rate | precision | recall | planted norm / median | cos < "
        f"{report['low_cosine']}: rate | precision | recall | cos all | cos planted | cos adjacent | cos rest |"
        + "".join(f" {key} |" for key in probe_keys),
        "|---" * (12 + len(probe_keys)) + "|",
    ]
    for name, s in report["sources"].items():
        n, d, c = s["norm"], s["direction"], s["cosine"]
        cells = [f"{100 * n['rate']:.2f} %", _fmt(n["precision"]), _fmt(n["recall"]), _fmt(n["planted_norm_ratio"], 2),
                 f"{100 * d['rate']:.2f} %", _fmt(d["precision"]), _fmt(d["recall"]), _fmt(c["all"], 4),
                 _fmt(c["planted"], 4), _fmt(c["adjacent"], 4), _fmt(c["rest"], 4)]
        cells += [_fmt(s.get("probes", {}).get(key), 4) for key in probe_keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if targets:
        lines += ["", "Targets. Target and student are dense outputs, so their outliers are counted by direction; "
                  "their norm-rule rates above read a residual stream that still carries the implant (student) or "
                  "a pre-normalisation TTA average (target), not their output.", "",
                  "| target | value | threshold | met |", "|---|---|---|---|"]
        for name, t in targets.items():
            met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
            lines.append(f"| {name} | {_fmt(t['value'])} | {_fmt(t['threshold'])} | {met} |")
    return "\n".join(lines) + "\n"


def _to_pixels(images: Tensor) -> np.ndarray:
    images = images.detach().cpu()
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0.0, 1.0)
    return images.permute(0, 2, 3, 1).numpy()


def _outline(ax, mask: np.ndarray, scale: float = 1.0, color: str = "red") -> None:
    """Outline the True cells of a (h, w) mask on an ``imshow`` panel whose cells are ``scale`` units wide."""
    segments = []
    padded = np.pad(mask, 1)
    for y, x in zip(*np.nonzero(mask)):
        x0, x1, y0, y1 = x * scale - 0.5, (x + 1) * scale - 0.5, y * scale - 0.5, (y + 1) * scale - 0.5
        if not padded[y, x + 1]:
            segments.append([(x0, y0), (x1, y0)])
        if not padded[y + 2, x + 1]:
            segments.append([(x0, y1), (x1, y1)])
        if not padded[y + 1, x]:
            segments.append([(x0, y0), (x0, y1)])
        if not padded[y + 1, x + 2]:
            segments.append([(x1, y0), (x1, y1)])
    ax.add_collection(LineCollection(segments, colors=color, linewidths=1.0), autolim=False)


def benchmark_figure(images: Tensor, features: Mapping[str, SourceFeatures], planted: Tensor,
                     reference: Tensor | None = None, max_images: int = 4, panel_size: float = 2.2,
                     cmap: str = "viridis") -> Figure:
    """One row per image: the image, then per source its pre-norm token-norm map (one colour scale per source) and,
    with ``reference``, its cosine-to-clean map; the planted mask is outlined on every panel (red on the image and
    the norm maps, cyan on the cosine maps). Each column's colour bar sits under it, labelled with what it measures."""
    if not features:
        raise ValueError("features must name at least one source")
    pixels = _to_pixels(images)
    n_rows = min(max_images, pixels.shape[0])
    per_source = 2 if reference is not None else 1
    n_cols = 1 + per_source * len(features)
    fig = Figure(figsize=(panel_size * n_cols, panel_size * n_rows + 0.9), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    mask = planted[:n_rows].cpu().numpy()
    h = mask.shape[1]
    for row in range(n_rows):
        axes[row, 0].imshow(pixels[row])
        _outline(axes[row, 0], mask[row], scale=pixels.shape[1] / h)
        axes[row, 0].set_ylabel(f"image {row}", fontsize=8)
    axes[0, 0].set_title("image\nplanted tokens (red)", fontsize=8)
    for s, (name, feats) in enumerate(features.items()):
        norms = patch_norms(feats.pre_norm[:n_rows]).numpy()
        col = 1 + per_source * s
        vmax = float(np.percentile(norms, 99.5))
        for row in range(n_rows):
            im = axes[row, col].imshow(norms[row], cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
            _outline(axes[row, col], mask[row])
        fig.colorbar(im, ax=axes[:, col].tolist(), location="bottom", fraction=0.12, aspect=12,
                     label=f"{name}: token norm")
        axes[0, col].set_title(f"{name}\npre-norm token norm", fontsize=8)
        if reference is not None:
            cos = cosine_map(feats.output[:n_rows], reference[:n_rows]).numpy()
            for row in range(n_rows):
                im = axes[row, col + 1].imshow(cos[row], cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
                _outline(axes[row, col + 1], mask[row], color="cyan")
            fig.colorbar(im, ax=axes[:, col + 1].tolist(), location="bottom", fraction=0.12, aspect=12,
                         label=f"{name}: cosine to clean")
            axes[0, col + 1].set_title(f"{name}\ncosine to clean", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Planted-artifact benchmark: " + ", ".join(features) + " against the known artifact tokens "
                 "(outlined)" + (" and the clean reference (cosine 1 = as clean)" if reference is not None else ""),
                 fontsize=10)
    return fig


def planted_artifact_evaluation(teacher: torch.nn.Module, student: torch.nn.Module, pixels: Tensor, seed: int,
                                n_views: int = 10, target_views: int | None = None, k: float = 3.5,
                                low_cosine: float = 0.5, batch_size: int = 4,
                                figure_images: int = 4, probes: Mapping[str, Mapping[str, float]] | None = None,
                                **tta: Any) -> tuple[dict[str, Any], str, Figure]:
    """The whole benchmark on uint8 images (B, 3, H, W): JSON-ready report (with the targets), Markdown and figure.

    ``teacher`` carries the implant (``teacher.config.implant``); the clean ground truth is the same model built
    without it. ``student`` is the distilled student. ``n_views`` views denoise the clean reference and
    ``target_views`` (default ``n_views``) the teacher's target; ``tta`` (``shift_frac``, ``flip_prob``,
    ``pool_factor``, ...) are the teacher-denoising settings. Keep ``n_views`` fixed across an ablation of
    ``target_views``, so that every arm is measured against the same reference.
    ``probes``: linear-probe results ``{source: {"<benchmark>/<metric>": value}}`` merged into the report.
    """
    from ph_reg.models import clean_copy

    if getattr(teacher.config, "implant", None) is None:
        raise ValueError("the planted-artifact benchmark needs a teacher with an implant (backbone.implant)")
    device = next(teacher.parameters()).device
    clean = clean_copy(teacher)
    images = normalize(pixels, teacher.mean, teacher.std)
    features, reference = benchmark_features({"student": student}, clean, teacher, images, seed=seed,
                                             n_views=n_views, target_views=target_views, batch_size=batch_size,
                                             **tta)
    planted = teacher.planted_mask(images.to(device)).cpu()
    report = artifact_benchmark(features, reference, planted, k=k, low_cosine=low_cosine)
    if probes:
        add_probe_results(report, {name: values for name, values in probes.items() if name in report["sources"]})
    report["implant"] = dict(teacher.config.implant)
    report["targets"] = check_targets(report)
    figure = benchmark_figure(pixels, {name: features[name] for name in ("teacher", "target", "student")}, planted,
                              reference, max_images=figure_images)
    return report, benchmark_markdown(report, report["targets"]), figure
