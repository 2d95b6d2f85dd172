"""Figures of the evaluation: PCA and token-norm maps of dense features, the planted-artifact benchmark, zero-shot
segmentation, and the one-line figure of a skipped stage.

Drawn with the object-oriented matplotlib API (no pyplot global state), so they are safe under the "Agg" backend
and in worker threads; the caller saves them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

from ph_reg.evaluation.artifacts import _check_dense, _quantile, cosine_map, patch_norms
from ph_reg.evaluation.benchmarks.base import IGNORE_INDEX

__all__ = [
    "pca_rgb",
    "feature_figure",
    "artifact_figure",
    "benchmark_figure",
    "class_palette",
    "zero_shot_figure",
    "message_figure",
]

#: Column titles of the artifact-diagnostics figure.
ARTIFACT_TITLES = {"teacher": "teacher", "target": "denoised target", "student": "student"}


def _pca_rgb_single(
    features: Tensor, n_components: int, low_percentile: float, high_percentile: float, name: str
) -> Tensor:
    _check_dense(features, name)
    B, h, w, C = features.shape
    if not 1 <= n_components <= C:
        raise ValueError(f"`n_components` must be in [1, {C}] (the channel count of {name}), got {n_components}")
    tokens = features.detach().reshape(-1, C).double()
    centred = tokens - tokens.mean(dim=0, keepdim=True)
    # Covariance eigendecomposition: deterministic (unlike randomised pca_lowrank) and cheap for C << tokens.
    _, eigvecs = torch.linalg.eigh(centred.T @ centred)
    components = eigvecs[:, -n_components:].flip(-1)  # (C, n) by decreasing variance
    # Fix each component's sign: its largest-magnitude loading is positive.
    idx = components.abs().argmax(dim=0)
    signs = torch.sign(components[idx, torch.arange(n_components, device=components.device)])
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    proj = (centred @ components).float()  # (N, n)
    out = torch.empty_like(proj)
    for c in range(n_components):
        lo = _quantile(proj[:, c], low_percentile / 100.0)
        hi = _quantile(proj[:, c], high_percentile / 100.0)
        span = torch.clamp(hi - lo, min=torch.finfo(torch.float32).eps)
        out[:, c] = ((proj[:, c] - lo) / span).clamp(0.0, 1.0)
    return out.reshape(B, h, w, n_components)


def pca_rgb(
    features: Mapping[str, Tensor] | Tensor,
    n_components: int = 3,
    low_percentile: float = 1.0,
    high_percentile: float = 99.0,
) -> dict[str, Tensor] | Tensor:
    """Deterministic PCA-to-RGB maps: ``(B, h, w, C) -> (B, h, w, n_components)`` in [0, 1], float32.

    One PCA is fitted per source over the centred tokens of all its images (so colours are comparable across the
    images of a source). Each component's sign is fixed so that its largest-magnitude loading is positive; each
    projection is min-max scaled between its ``low_percentile`` and ``high_percentile`` and clamped to [0, 1].
    A mapping of sources gives a dict of maps with the same keys; a single tensor gives a single map.
    """
    if not 0.0 <= low_percentile < high_percentile <= 100.0:
        raise ValueError(
            "`low_percentile` and `high_percentile` must satisfy 0 <= low < high <= 100, "
            f"got {low_percentile} and {high_percentile}"
        )
    if isinstance(features, Tensor):
        return _pca_rgb_single(features, n_components, low_percentile, high_percentile, "features")
    if not isinstance(features, Mapping):
        raise TypeError(f"`features` must be a Tensor or a mapping of tensors, got {type(features).__name__}")
    return {
        name: _pca_rgb_single(feats, n_components, low_percentile, high_percentile, f"features[{name!r}]")
        for name, feats in features.items()
    }


def _images_to_numpy(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] or uint8 -> (B, H, W, 3) float in [0, 1]."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"`images` must be a (B, 3, H, W) tensor, got {shape}")
    images = images.detach().cpu()
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0.0, 1.0)
    return images.permute(0, 2, 3, 1).numpy()


def feature_figure(
    images: Tensor,
    features: Mapping[str, Tensor],
    titles: Mapping[str, str] | None = None,
    max_images: int = 4,
    panel_size: float = 2.2,
    norm_cmap: str = "viridis",
) -> Figure:
    """Grid figure of dense features: one row per image (at most ``max_images``).

    Columns: the image, then for each source its PCA-RGB map (:func:`pca_rgb`, fitted over all given images) and
    its token-norm heatmap (one colour scale shared by all rows of a source, with a colorbar). ``images`` are
    un-normalised, (B, 3, H, W) floats in [0, 1] or uint8. ``titles`` maps source names to column titles (default:
    the names). The figure uses the object-oriented API only; the caller saves it.
    """
    if not isinstance(features, Mapping) or len(features) == 0:
        raise ValueError("`features` must be a non-empty mapping of source name -> (B, h, w, C) tensor")
    if max_images < 1:
        raise ValueError(f"`max_images` must be >= 1, got {max_images}")
    pixels = _images_to_numpy(images)
    for name, feats in features.items():
        _check_dense(feats, f"features[{name!r}]")
        if feats.shape[0] != pixels.shape[0]:
            raise ValueError(
                f"features[{name!r}] has batch size {feats.shape[0]} but `images` has {pixels.shape[0]}"
            )
    titles = dict(titles or {})
    n_rows = min(pixels.shape[0], max_images)
    n_cols = 1 + 2 * len(features)

    fig = Figure(figsize=(panel_size * n_cols, panel_size * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for row in range(n_rows):
        axes[row, 0].imshow(pixels[row])
    axes[0, 0].set_title("image")

    rgb_maps = pca_rgb(dict(features))
    for s, (name, feats) in enumerate(features.items()):
        label = titles.get(name, name)
        rgb = rgb_maps[name][:n_rows].cpu().numpy()
        norms = patch_norms(feats.detach()[:n_rows]).cpu().numpy()
        vmin, vmax = float(norms.min()), float(norms.max())
        col_pca, col_norm = 1 + 2 * s, 2 + 2 * s
        for row in range(n_rows):
            axes[row, col_pca].imshow(rgb[row], interpolation="nearest")
            im = axes[row, col_norm].imshow(
                norms[row], cmap=norm_cmap, vmin=vmin, vmax=vmax, interpolation="nearest"
            )
        fig.colorbar(im, ax=axes[:, col_norm].tolist(), shrink=0.8)
        axes[0, col_pca].set_title(f"{label} PCA")
        axes[0, col_norm].set_title(f"{label} norm")

    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def artifact_figure(pixels: Tensor, features: Mapping[str, Tensor], max_images: int = 4) -> Figure:
    """The artifact diagnostics' figure: :func:`feature_figure` of teacher, denoised target and student."""
    return feature_figure(pixels, features, titles=ARTIFACT_TITLES, max_images=max_images)


# --- the planted-artifact benchmark ------------------------------------------------------------------------------
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


def benchmark_figure(images: Tensor, features: Mapping[str, Any], planted: Tensor,
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


# --- zero-shot segmentation ------------------------------------------------------------------------------------
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


def zero_shot_figure(  # long: one figure layout (header row, one row per head, legend) drawn top to bottom
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


def message_figure(text: str) -> Figure:
    """A figure that only says ``text`` (the figure of a skipped stage)."""
    figure = Figure(figsize=(6, 1.5))
    figure.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return figure
