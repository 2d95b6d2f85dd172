"""Published zero-shot numbers (PH-Reg paper, Table 1), our-vs-published tables and zero-shot figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

from ph_reg.evaluation.benchmarks.base import IGNORE_INDEX
from ph_reg.evaluation.diagnostics import pca_rgb
from ph_reg.evaluation.zeroshot.templates import BENCHMARKS

__all__ = [
    "PUBLISHED_ABLATION_AVG",
    "PUBLISHED_HEAD_ROWS",
    "PUBLISHED_TABLE1",
    "class_palette",
    "table1",
    "zero_shot_figure",
]

DECIMALS = 2

# Zero-shot mIoU (%), OpenAI CLIP ViT-B/16 (method.md section 7); the paper's Avg is the mean of the 8 columns
PUBLISHED_TABLE1: dict[str, dict[str, float]] = {
    "MaskCLIP": {"voc21": 49.27, "context60": 25.46, "coco_object": 26.94, "voc20": 66.56,
                 "context59": 28.62, "coco_stuff": 18.80, "cityscapes": 28.33, "ade20k": 13.70, "avg": 32.21},
    "SCLIP": {"voc21": 59.62, "context60": 31.74, "coco_object": 33.52, "voc20": 81.53,
              "context59": 34.46, "coco_stuff": 22.65, "cityscapes": 32.34, "ade20k": 16.45, "avg": 40.08},
    "ClearCLIP": {"voc21": 59.76, "context60": 32.56, "coco_object": 32.77, "voc20": 84.56,
                  "context59": 35.91, "coco_stuff": 23.89, "cityscapes": 30.04, "ade20k": 16.65, "avg": 39.52},
    "NACLIP": {"voc21": 58.88, "context60": 32.20, "coco_object": 33.15, "voc20": 79.70,
               "context59": 35.16, "coco_stuff": 23.30, "cityscapes": 35.48, "ade20k": 17.42, "avg": 39.41},
    "PH-Reg": {"voc21": 63.01, "context60": 34.52, "coco_object": 35.27, "voc20": 83.05,
               "context59": 37.88, "coco_stuff": 24.66, "cityscapes": 37.17, "ade20k": 19.22, "avg": 41.85},
}
# Component ablation (average mIoU over the 8 benchmarks only)
PUBLISHED_ABLATION_AVG: dict[str, float] = {
    "MaskCLIP": 32.21,
    "MaskCLIP + 10x TTA": 34.55,
    "distill, no registers, no denoising": 40.68,
    "distill + denoising, no registers": 41.48,
    "PH-Reg": 41.85,
}
# result key (head name) -> published row; heads without one (``vanilla``: method.md publishes no vanilla CLIP
# numbers) are reported with our numbers only
PUBLISHED_HEAD_ROWS: dict[str, str] = {
    "maskclip": "MaskCLIP",
    "sclip": "SCLIP",
    "clearclip": "ClearCLIP",
    "naclip": "NACLIP",
    "ph_reg": "PH-Reg",
    "student": "PH-Reg",
}
ABLATION_HEAD_ROWS: dict[str, str] = {"maskclip_tta": "MaskCLIP + 10x TTA"}


def _published_row(head: str) -> tuple[str | None, dict[str, float]]:
    """(label, numbers) of the published row for a head; numbers may hold only "avg" (ablation rows)."""
    if head in PUBLISHED_HEAD_ROWS:
        label = PUBLISHED_HEAD_ROWS[head]
        return label, PUBLISHED_TABLE1[label]
    if head in ABLATION_HEAD_ROWS:
        label = ABLATION_HEAD_ROWS[head]
        return label, {"avg": PUBLISHED_ABLATION_AVG[label]}
    return None, {}


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), DECIMALS)


def table1(results: Mapping[str, Mapping[str, float]]) -> tuple[dict, str]:
    """Our zero-shot mIoU next to the published Table 1.

    ``results`` maps a head (e.g. ``maskclip``, ``naclip``, ``ph_reg``) to ``{benchmark key: mIoU %}``. Columns
    are the benchmarks present, in the paper's order (unknown keys after, sorted), plus ``avg`` over each head's
    benchmarks. The published average is compared over the same benchmarks (the paper's Avg when all 8 are
    there; ablation rows only publish the 8-benchmark Avg). Returns (JSON-ready dict, markdown table).
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty mapping {head: {benchmark: mIoU}}")
    present = {bench for scores in results.values() for bench in scores}
    columns = [b for b in BENCHMARKS if b in present] + sorted(present - set(BENCHMARKS))
    rows: dict[str, dict] = {}
    for head, scores in results.items():
        if not isinstance(scores, Mapping) or not scores:
            raise ValueError(f"results[{head!r}] must be a non-empty mapping {{benchmark: mIoU}}, got {scores!r}")
        ours = {bench: float(value) for bench, value in scores.items()}
        ours["avg"] = float(np.mean(list(ours.values())))
        label, published = _published_row(head)
        pub = {bench: published.get(bench) for bench in scores}
        all_eight = set(scores) == set(BENCHMARKS)
        if all_eight and "avg" in published:
            pub["avg"] = published["avg"]
        elif all(value is not None for value in pub.values()):
            pub["avg"] = float(np.mean(list(pub.values())))
        else:
            pub["avg"] = None
        diff = {k: None if pub.get(k) is None else ours[k] - pub[k] for k in ours}
        rows[head] = {
            "published_row": label,
            "ours": {k: _round(v) for k, v in ours.items()},
            "published": {k: _round(v) for k, v in pub.items()},
            "diff": {k: _round(v) for k, v in diff.items()},
        }
    report = {"columns": [*columns, "avg"], "metric": "mIoU (%)", "rows": rows}

    names = [BENCHMARKS[c][0] if c in BENCHMARKS else c for c in columns] + ["Avg"]
    lines = [
        "Zero-shot mIoU (%): ours / published (ours - published)",
        "",
        "| head | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for head, row in rows.items():
        cells = []
        for col in [*columns, "avg"]:
            ours_v, pub_v, diff_v = row["ours"].get(col), row["published"].get(col), row["diff"].get(col)
            if ours_v is None:
                cells.append("")
            elif pub_v is None:
                cells.append(f"{ours_v:.2f}")
            else:
                cells.append(f"{ours_v:.2f} / {pub_v:.2f} ({diff_v:+.2f})")
        title = head if row["published_row"] is None else f"{head} ({row['published_row']})"
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return report, "\n".join(lines) + "\n"


def class_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, the PASCAL VOC bit-interleaving colour map (deterministic)."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        value, colour = index, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                colour[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        palette[index] = colour
    return palette


def _colourise(labels: Tensor, colours: np.ndarray, ignore_colour: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """(H, W, 3) uint8 picture of class ids; ``IGNORE_INDEX`` and ids without a colour get ``ignore_colour``."""
    ids = labels.detach().cpu().numpy().astype(np.int64)
    valid = (ids >= 0) & (ids < len(colours)) & (ids != IGNORE_INDEX)
    out = np.empty((*ids.shape, 3), dtype=np.uint8)
    out[...] = np.asarray(ignore_colour, dtype=np.uint8)
    out[valid] = colours[ids[valid]]
    return out


IGNORE_COLOUR = (255, 255, 255)   # ground-truth pixels that are not scored (IGNORE_INDEX): white, unlike any class


def zero_shot_figure(
        image: Tensor,
        heads: Mapping[str, tuple[Tensor, Tensor, Tensor]],
        class_colours: np.ndarray | Tensor | Sequence[Sequence[int]],
        query_name: str = "query",
        class_names: Sequence[str] | None = None,
        label: Tensor | None = None,
        title: str | None = None,
        panel_size: float = 3.0,
) -> Figure:
    """The image, its ground truth and the colour-to-class legend on top; below, one row per head: predicted
    segmentation | probability map of one query | PCA of the dense features.

    ``image`` is uint8 (3, H, W); ``heads`` maps a head name to ``(pred (H, W) class ids, heatmap (H, W) for
    the query, features (h, w, C) or (1, h, w, C))``; ``class_colours`` is (num_classes, 3) uint8 RGB (or floats in
    [0, 1]); ``label`` the (H, W) ground-truth class ids (``IGNORE_INDEX``: not scored, drawn white), or None when
    the dataset has none (the panel says so). The legend lists every class in the ground truth or in a prediction,
    by name (``class_names``, one per class id) or by id.
    """
    if not heads:
        raise ValueError("heads must map at least one head name to (pred, heatmap, features)")
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a (3, H, W) tensor, got {getattr(image, 'shape', type(image).__name__)}")
    colours = np.asarray(torch.as_tensor(class_colours).cpu() if isinstance(class_colours, Tensor) else class_colours)
    if colours.ndim != 2 or colours.shape[1] != 3:
        raise ValueError(f"class_colours must be (num_classes, 3), got shape {colours.shape}")
    if colours.dtype != np.uint8:
        colours = np.clip(np.rint(colours.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if class_names is not None and len(class_names) != len(colours):
        raise ValueError(f"class_names has {len(class_names)} names for {len(colours)} class colours")
    picture = image.detach().cpu()
    picture = (picture.float() / 255.0 if picture.dtype == torch.uint8 else picture.float()).clamp(0, 1)
    picture = picture.permute(1, 2, 0).numpy()
    size = picture.shape[:2]
    if label is not None and tuple(label.shape) != size:
        raise ValueError(f"label must be (H, W) = {size}, got {tuple(label.shape)}")

    figure = Figure(figsize=(3 * panel_size, panel_size * (1 + len(heads))), layout="constrained")
    grid = figure.add_gridspec(1 + len(heads), 3)
    shown: set[int] = set()
    ignored = False
    top = figure.add_subplot(grid[0, 0])
    top.imshow(picture)
    top.set_title("image", fontsize=9)
    truth = figure.add_subplot(grid[0, 1])
    if label is None:
        truth.text(0.5, 0.5, "no ground truth\nin this dataset", ha="center", va="center", fontsize=9,
                   transform=truth.transAxes)
    else:
        ids = label.detach().cpu()
        ignored = bool((ids == IGNORE_INDEX).any())
        shown |= {c for c in torch.unique(ids).tolist() if c != IGNORE_INDEX}
        truth.imshow(_colourise(ids, colours, IGNORE_COLOUR), interpolation="nearest")
    truth.set_title("ground truth", fontsize=9)
    legend_axes = figure.add_subplot(grid[0, 2])
    legend_axes.set_axis_off()
    probability = None
    for row, (head, (pred, heatmap, features)) in enumerate(heads.items(), start=1):
        if tuple(pred.shape) != size or tuple(heatmap.shape) != size:
            raise ValueError(f"heads[{head!r}]: pred and heatmap must be (H, W) = {size}, got "
                             f"{tuple(pred.shape)} and {tuple(heatmap.shape)}")
        feats = features if features.ndim == 4 else features.unsqueeze(0)
        pca = pca_rgb(feats.detach().float().cpu())[0].numpy()
        shown |= set(torch.unique(pred.detach().cpu()).tolist())
        axes = [figure.add_subplot(grid[row, col]) for col in range(3)]
        axes[0].imshow(_colourise(pred, colours), interpolation="nearest")
        axes[0].set_title(f"{head}: prediction", fontsize=9)
        probability = axes[1].imshow(heatmap.detach().float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        axes[1].set_title(f"{head}: P('{query_name}')", fontsize=9)
        axes[2].imshow(pca, interpolation="nearest")
        axes[2].set_title(f"{head}: PCA of features", fontsize=9)
        axes[0].set_ylabel(head)
    for ax in figure.axes:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.colorbar(probability, ax=axes[1], location="bottom", shrink=0.8,
                    label=f"probability of the query '{query_name}'")

    listed = sorted(c for c in shown if 0 <= c < len(colours))
    handles = [Patch(facecolor=colours[c] / 255.0, edgecolor="black", linewidth=0.5,
                     label=f"{c}: {class_names[c]}" if class_names is not None else f"class {c}") for c in listed]
    if ignored:
        handles.append(Patch(facecolor=np.asarray(IGNORE_COLOUR) / 255.0, edgecolor="black", linewidth=0.5,
                             label="not scored (ignore)"))
    legend_axes.legend(handles=handles, loc="center", title="class colours", fontsize=8, title_fontsize=9,
                       ncols=max(1, -(-len(handles) // 14)), frameon=False)
    figure.suptitle(title or "Zero-shot open-vocabulary segmentation", fontsize=11)
    return figure
