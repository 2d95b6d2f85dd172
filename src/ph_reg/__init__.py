"""PH-Reg: post-hoc self-distilled registers for Vision Transformers.

``ph_reg.load_student(folder)`` returns a distilled student ready for use; ``ph_reg.models.build_backbone`` builds
any supported teacher. Heavy imports (torch, timm, open_clip) happen on first use, not on ``import ph_reg``.
"""

__version__ = "0.1.0"

__all__ = ["load_student", "build_backbone", "BackboneConfig"]


def __getattr__(name: str):
    if name == "load_student":
        from ph_reg.method.student import load_student

        return load_student
    if name in ("build_backbone", "BackboneConfig"):
        from ph_reg import models

        return getattr(models, name)
    raise AttributeError(f"module 'ph_reg' has no attribute {name!r}")
