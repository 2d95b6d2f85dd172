"""Dense ViT backbones (open_clip CLIP and timm ViTs) with post-hoc registers and training-free CLIP heads."""

from ph_reg.models.backbone import (
    DEFAULT_TRAINABLE,
    POS_EMBED_INTERP,
    BackboneConfig,
    DenseOutput,
    DenseViT,
    WeightsUnavailableError,
    build_backbone,
    clean_copy,
    load_trainable_state_dict,
    resize_pos_embed,
    trainable_state_dict,
)
from ph_reg.models.clip_heads import CLIP_HEADS, NACLIP_SIGMA, naclip_omega

__all__ = [
    "CLIP_HEADS",
    "DEFAULT_TRAINABLE",
    "NACLIP_SIGMA",
    "POS_EMBED_INTERP",
    "BackboneConfig",
    "DenseOutput",
    "DenseViT",
    "WeightsUnavailableError",
    "build_backbone",
    "clean_copy",
    "load_trainable_state_dict",
    "naclip_omega",
    "resize_pos_embed",
    "trainable_state_dict",
]
