"""The PH-Reg paper's published numbers: zero-shot Table 1 (and its ablation averages) and linear-probe Table 2,
which the reports print beside ours (:mod:`ph_reg.reporting.tables`)."""

from __future__ import annotations

__all__ = ["ABLATION_HEAD_ROWS", "PUBLISHED_ABLATION_AVG", "PUBLISHED_HEAD_ROWS", "PUBLISHED_TABLE1",
           "PUBLISHED_TABLE2"]

# Zero-shot mIoU (%), OpenAI CLIP ViT-B/16 (docs/method.md section 7); the paper's Avg is the mean of the 8 columns
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
# result key (head name) -> published row; heads without one (``vanilla``: docs/method.md publishes no vanilla CLIP
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

#: docs/method.md section 7, Table 2 (mIoU %, RMSE m, AbsRel, delta1 %); mAcc is not published
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
