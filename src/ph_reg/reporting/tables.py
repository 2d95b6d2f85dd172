"""The Markdown reports: artifact diagnostics, zero-shot Table 1, linear-probe Table 2 and the planted-artifact
benchmark, all through the one table renderer :func:`markdown_table`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ph_reg.evaluation.published import (ABLATION_HEAD_ROWS, PUBLISHED_ABLATION_AVG, PUBLISHED_HEAD_ROWS,
                                         PUBLISHED_TABLE1, PUBLISHED_TABLE2)
from ph_reg.evaluation.zeroshot.templates import BENCHMARKS

__all__ = ["RANDOM_WEIGHTS_WARNING", "markdown_table", "markdown_report", "benchmark_markdown", "table1", "table2"]

RANDOM_WEIGHTS_WARNING = (
    "The backbone has random weights (no pretrained tag and no checkpoint): it has no learned artifacts, so these "
    "numbers show that the machinery runs, not that the method works."
)
DECIMALS = 2   # of the zero-shot table (Table 1)
SEGMENTATION_COLUMNS = ("mIoU", "mAcc")
# the published depth numbers are the best of the evaluations on the test set by AbsRel (the toolbox's save_best)
DEPTH_COLUMNS = ("RMSE", "AbsRel", "delta1", "RMSE_best_on_test", "AbsRel_best_on_test", "delta1_best_on_test")


def _row(cells: Sequence[str]) -> str:
    # the first cell, then the rest: a row without further cells renders one empty cell ("| x |  |")
    return f"| {cells[0]} | " + " | ".join(cells[1:]) + " |"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a GitHub Markdown table: ``| a | b |``, a ``|---|---|`` rule, then one line per row. The cells
    are written as given (format numbers before); every row should have as many cells as ``header``."""
    return [_row(header), "|---" * len(header) + "|", *(_row(cells) for cells in rows)]


# --- artifact diagnostics ---------------------------------------------------------------------------------
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
                             "the final student."), ""]
    rows = []
    for name, stats in report["per_source"].items():
        cos = report["cosine_to_target"].get(name)
        cos_mean = f"{cos['mean']:.4f}" if cos else "-"
        low = f"{cos['low_share']:.4f}" if cos else "-"
        rows.append([name, f"{stats['norm']['mean']:.4f}", f"{stats['outlier_rate']:.4f}", cos_mean, low])
    lines += markdown_table(["features", "mean norm", "outlier rate", "cosine to target (mean)",
                             "share with cosine < 0.5"], rows)
    return "\n".join(lines) + "\n"


# --- the planted-artifact benchmark ------------------------------------------------------------------------
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
    ]
    header = ["source", "norm: outlier rate", "precision", "recall", "planted norm / median",
              f"cos < {report['low_cosine']}: rate", "precision", "recall", "cos all", "cos planted", "cos adjacent",
              "cos rest", *probe_keys]
    rows = []
    for name, s in report["sources"].items():
        n, d, c = s["norm"], s["direction"], s["cosine"]
        cells = [f"{100 * n['rate']:.2f} %", _fmt(n["precision"]), _fmt(n["recall"]), _fmt(n["planted_norm_ratio"], 2),
                 f"{100 * d['rate']:.2f} %", _fmt(d["precision"]), _fmt(d["recall"]), _fmt(c["all"], 4),
                 _fmt(c["planted"], 4), _fmt(c["adjacent"], 4), _fmt(c["rest"], 4)]
        cells += [_fmt(s.get("probes", {}).get(key), 4) for key in probe_keys]
        rows.append([name, *cells])
    lines += markdown_table(header, rows)
    lines += _ttr_lines(report)
    if targets:
        lines += ["", "Targets. Target and student are dense outputs, so their outliers are counted by direction; "
                  "their norm-rule rates above read a residual stream that still carries the implant (student) or "
                  "a pre-normalisation TTA average (target), not their output.", ""]
        met = {True: "yes", False: "**no**", None: "-"}
        lines += markdown_table(["target", "value", "threshold", "met"],
                                [[name, _fmt(t["value"]), _fmt(t["threshold"]), met[t["met"]]]
                                 for name, t in targets.items()])
    return "\n".join(lines) + "\n"


def _ttr_lines(report: dict[str, Any]) -> list[str]:
    """The notes under the planted table on the test-time-registers rows: what ``ttr`` ran with, skipped rows."""
    lines = []
    ttr = report.get("test_time_registers")
    if ttr is not None:
        neurons = ", ".join(f"({layer}, {neuron})" for layer, neuron, *_ in ttr["neurons"]) or "none"
        intervention = ttr["intervention"]
        text = (f"`ttr`: the implanted teacher with {intervention['num_registers']} test-time register(s) "
                f"(patch values {intervention['patch_values']}) on the detected register neurons (block, unit): "
                f"{neurons}.")
        if "planted_neurons" in ttr:
            text += (f" The implant's planted units: {len(ttr['planted_neurons'])}, of which the detection found "
                     f"{ttr['planted_found']}.")
        if "both" in report["sources"]:
            text += (" `both`: a PH-Reg student (the pipeline's recipe and seed) distilled from the TTA-denoised "
                     "targets of the `ttr` teacher.")
        lines += ["", text]
    for name, reason in report.get("rows_skipped", {}).items():
        lines += ["", f"Row `{name}` skipped: {reason}."]
    return lines


# --- zero-shot segmentation (Table 1) ----------------------------------------------------------------------
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
    ]
    table_rows = []
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
        table_rows.append([title, *cells])
    lines += markdown_table(["head", *names], table_rows)
    return report, "\n".join(lines) + "\n"


# --- linear probes (Table 2) -------------------------------------------------------------------------------
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
    table, rows = {}, []
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
        rows.append([model, *cells])
    lines = markdown_table(["model", *columns], rows)
    note = "\nCells: ours / published (difference) where the paper publishes the number.\n" if reference else ""
    return table, "\n".join(lines) + "\n" + note
