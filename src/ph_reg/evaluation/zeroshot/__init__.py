"""Zero-shot open-vocabulary segmentation with CLIP dense heads (SCLIP/NACLIP protocol, as used by PH-Reg)."""

from ph_reg.evaluation.zeroshot.harness import (
    CLIP_MEAN,
    CLIP_STD,
    TTA_HEADS,
    TTR_HEADS,
    ZERO_SHOT_HEADS,
    ZeroShotPrediction,
    ZeroShotConfig,
    backbone_head,
    classify,
    evaluate_zero_shot,
    image_dense_features,
    make_dense_fn,
    model_dense_fn,
    segment_image,
    sliding_window_logits,
    tta_dense_fn,
    zero_shot_maps,
)
from ph_reg.evaluation.windows import sliding_windows
from ph_reg.evaluation.zeroshot.templates import BENCHMARKS, OPENAI_IMAGENET_TEMPLATES, format_prompts, load_class_file, parse_class_lines
from ph_reg.evaluation.zeroshot.text import OpenClipTextEncoder, build_text_encoder, text_embeddings

__all__ = [
    "BENCHMARKS",
    "CLIP_MEAN",
    "CLIP_STD",
    "OPENAI_IMAGENET_TEMPLATES",
    "TTA_HEADS",
    "TTR_HEADS",
    "ZERO_SHOT_HEADS",
    "OpenClipTextEncoder",
    "ZeroShotPrediction",
    "ZeroShotConfig",
    "backbone_head",
    "build_text_encoder",
    "classify",
    "evaluate_zero_shot",
    "format_prompts",
    "image_dense_features",
    "load_class_file",
    "make_dense_fn",
    "model_dense_fn",
    "parse_class_lines",
    "segment_image",
    "sliding_window_logits",
    "sliding_windows",
    "text_embeddings",
    "tta_dense_fn",
    "zero_shot_maps",
]
