"""CLIP text side of zero-shot segmentation: the text tower of the backbone's model and prompt-averaged queries."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ph_reg.models.backbone import BackboneConfig
from ph_reg.models.open_clip import build_open_clip_model
from ph_reg.evaluation.zeroshot.templates import OPENAI_IMAGENET_TEMPLATES, format_prompts

__all__ = ["OpenClipTextEncoder", "build_text_encoder", "text_embeddings"]

DEFAULT_TEXT_BATCH_SIZE = 256


class OpenClipTextEncoder(nn.Module):
    """Token ids (N, context_length) -> text embeddings (N, embed_dim) with an open_clip model's text tower.

    The vision tower is dropped (replaced by ``nn.Identity``) to save memory; ``encode_text`` does not use it.
    """

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        if not hasattr(clip_model, "encode_text"):
            raise ValueError(f"clip_model must be an open_clip model with encode_text, got {type(clip_model).__name__}")
        clip_model.visual = nn.Identity()
        self.model = clip_model.requires_grad_(False).eval()

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens)


def build_text_encoder(
        backbone_config: BackboneConfig | Mapping[str, Any],
) -> tuple[OpenClipTextEncoder, Callable[[Sequence[str]], Tensor]]:
    """(encode_fn, tokenizer) of the same open_clip model as ``build_backbone(backbone_config)``.

    The model comes from the same seeded ``create_model`` call (``build_open_clip_model``), so with random weights
    the text tower belongs to the very model whose vision tower the DenseViT wraps; with ``pretrained`` or
    ``checkpoint`` both towers come from the same weights. Only ``arch``, ``pretrained``, ``checkpoint``,
    ``init_seed`` and ``model_kwargs`` matter here.
    """
    if not isinstance(backbone_config, BackboneConfig):
        backbone_config = BackboneConfig.from_dict(backbone_config)
    if backbone_config.family != "open_clip":
        raise ValueError(f"zero-shot segmentation needs an open_clip backbone (arch 'open_clip:<name>'), "
                         f"got {backbone_config.arch!r}")
    encoder = OpenClipTextEncoder(build_open_clip_model(backbone_config))
    tokenizer = open_clip.get_tokenizer(backbone_config.model_name)
    return encoder, tokenizer


def _module_device(fn: Callable) -> torch.device:
    if isinstance(fn, nn.Module):
        for tensor in (*fn.parameters(), *fn.buffers()):
            return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def text_embeddings(
        encode_fn: Callable[[Tensor], Tensor],
        tokenizer: Callable[[Sequence[str]], Tensor],
        names: Sequence[str],
        templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES,
        batch_size: int = DEFAULT_TEXT_BATCH_SIZE,
        device: torch.device | str | None = None,
) -> Tensor:
    """(Q, D) float32 query embeddings: per name, every template's embedding L2-normalised, averaged over the
    templates and L2-normalised again. Prompts are encoded ``batch_size`` at a time on ``device`` (default: the
    device of ``encode_fn``'s parameters, else CPU); the result stays on that device."""
    if isinstance(names, str) or not names:
        raise ValueError(f"names must be a non-empty sequence of class names, got {names!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = torch.device(device) if device is not None else _module_device(encode_fn)
    prompts = [prompt for name in names for prompt in format_prompts(name, templates)]
    embeddings = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start:start + batch_size]).to(device)
        embeddings.append(F.normalize(encode_fn(tokens).float(), dim=-1))
    per_prompt = torch.cat(embeddings).reshape(len(names), len(prompts) // len(names), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)
