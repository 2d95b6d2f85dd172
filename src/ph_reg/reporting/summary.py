"""The evaluation summary: the headline numbers of the four evaluation reports in one small file (a DVC metric)."""

from __future__ import annotations

from typing import Any

__all__ = ["summarize_evaluation"]

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
