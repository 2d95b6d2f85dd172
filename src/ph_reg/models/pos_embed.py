"""Absolute positional embeddings at grids other than the stored one (``BackboneConfig.pos_embed_interp``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import Tensor

POS_EMBED_INTERPOLATION = "bicubic"
#: ``BackboneConfig.pos_embed_interp`` values. Every rule is bicubic with align_corners False, computed in float32,
#: CLS (prefix) rows kept, and leaves the table unchanged at its own grid.
#: ``official``: what the official code did. open_clip: ``scale_factor = (new_side + 0.1) / old_side``
#: (recompute_scale_factor False; sinahmr/NACLIP ``clip/model.py`` and 0raiser0/PH-Reg
#: ``CLIP/models/augNaCLIP/model.py`` (teacher) and ``CLIP/zero_shot/models/student_CLIP.py`` (student)
#: ``interpolate_pos_encoding``). Frozen models (teacher, baseline heads) keep the pretrained table and resize it
#: once to each input's grid; the student (``BackboneConfig.student``) stores its table at the ``img_size`` grid,
#: resized once from the pretrained one at build (StudentCLIP's constructor, where it is trained), and resizes
#: that stored table for other inputs (StudentCLIP's forward). timm: Hugging Face
#: ``Dinov2Embeddings.interpolate_pos_encoding`` as PH-Reg's ``DINOv2_full`` code ran it (transformers >= 4.45:
#: explicit output size, no antialiasing); every model, student included, keeps the pretrained table and resizes it
#: at every forward whose grid differs (HF never resizes at load time).
#: ``explicit_size``: this project's earlier rule, kept as an option. Every model stores its table at the
#: ``img_size`` grid and resizes that stored table for other inputs. open_clip: bicubic to the explicit output
#: size (so a baseline head built at 448 and run on 336 crops is resized 14 -> 28 -> 21). timm: timm's own
#: ``resample_abs_pos_embed`` (antialiased bicubic), at load time (``img_size``) and per forward.
POS_EMBED_INTERP = ("official", "explicit_size")
#: what a configuration without the key gets: the behaviour before the option existed (old student configs load
#: unchanged); conf/base, conf/paper and conf/paper_dinov2 set ``official``
DEFAULT_POS_EMBED_INTERP = "explicit_size"
#: the "+0.1" of the official open_clip rule (DINO's guard against float rounding of the output size,
#: facebookresearch/dino issue 8); it also shifts the sampling positions, so it changes the values
OFFICIAL_SCALE_OFFSET = 0.1


def resize_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                     num_prefix_tokens: int = 1, scale_offset: float | None = None,
                     antialias: bool = False) -> Tensor:
    """Resize the patch part of a ``(prefix + gh * gw, D)`` or ``(1, prefix + gh * gw, D)`` positional embedding
    bicubically (align_corners False, in float32, back to the input dtype); prefix rows (CLS) are kept. Returns
    ``pos_embed`` itself when the grid is unchanged.

    ``scale_offset`` None: to the explicit output size ``new_grid`` (``antialias`` as given), with timm's
    ``resample_abs_pos_embed`` (tests/unit/models/test_models_layout.py checks it equals the rule written out). A number ``o``:
    with ``scale_factor = (new + o) / old`` per axis and ``recompute_scale_factor=False`` (the official open_clip
    rule with ``o = 0.1``, see :data:`POS_EMBED_INTERP`); ``antialias`` must then be False.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return pos_embed
    table = pos_embed if pos_embed.ndim == 3 else pos_embed.unsqueeze(0)
    if scale_offset is None:
        out = resample_abs_pos_embed(table, list(new_grid), list(old_grid), num_prefix_tokens,
                                     interpolation=POS_EMBED_INTERPOLATION, antialias=antialias, align_corners=False)
        return out if pos_embed.ndim == 3 else out[0]
    # timm has no scale-factor rule: the official open_clip resize is written out here
    if antialias:
        raise ValueError("resize_pos_embed: antialias is only supported with an explicit output size")
    prefix, grid = table[:, :num_prefix_tokens], table[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, dim).permute(0, 3, 1, 2).float()
    scale = tuple((new + scale_offset) / old for new, old in zip(new_grid, old_grid))
    grid = F.interpolate(grid, scale_factor=scale, mode=POS_EMBED_INTERPOLATION, align_corners=False,
                         recompute_scale_factor=False)
    if tuple(grid.shape[-2:]) != new_grid:
        raise ValueError(f"resize_pos_embed: scale_offset {scale_offset} resized {old_grid} to "
                         f"{tuple(grid.shape[-2:])}, not {new_grid}")
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    out = torch.cat([prefix, grid], dim=1)
    return out if pos_embed.ndim == 3 else out[0]
