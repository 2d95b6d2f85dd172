"""Dense ViT backbones (open_clip CLIP and timm ViTs) with post-hoc registers and training-free CLIP heads.

``backbone`` (the config, the DenseViT base class with its registers and trainable groups, the trainable state
dicts), ``open_clip`` and ``timm`` (the two families), ``factory`` (``build_backbone``: the family registry),
``pos_embed`` (positional-embedding resizing), ``clip_heads`` (the CLIP dense heads), ``implant`` (planted artifacts),
``test_time_registers`` (register-neuron detection and test-time registers, Jiang et al. 2025).
"""

from ph_reg.models.backbone import (
    DEFAULT_TRAINABLE,
    BackboneConfig,
    DenseOutput,
    DenseViT,
    WeightsUnavailableError,
    load_trainable_state_dict,
    trainable_state_dict,
)
from ph_reg.models.clip_heads import CLIP_HEADS, NACLIP_SIGMA, naclip_omega
from ph_reg.models.factory import build_backbone, clean_copy
from ph_reg.models.pos_embed import POS_EMBED_INTERP, resize_pos_embed
from ph_reg.models.test_time_registers import (RegisterNeuron, TestTimeRegistersConfig, attach_test_time_registers,
                                               detach_test_time_registers, detect_register_neurons)

__all__ = [
    "CLIP_HEADS",
    "DEFAULT_TRAINABLE",
    "NACLIP_SIGMA",
    "POS_EMBED_INTERP",
    "BackboneConfig",
    "RegisterNeuron",
    "TestTimeRegistersConfig",
    "DenseOutput",
    "DenseViT",
    "WeightsUnavailableError",
    "attach_test_time_registers",
    "build_backbone",
    "clean_copy",
    "detach_test_time_registers",
    "detect_register_neurons",
    "load_trainable_state_dict",
    "naclip_omega",
    "resize_pos_embed",
    "trainable_state_dict",
]
