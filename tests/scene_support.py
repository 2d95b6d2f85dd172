"""Test helper: a stack of the project's synthetic scenes (ph_reg.evaluation.benchmarks.SyntheticScenes)."""

from __future__ import annotations

import torch

from ph_reg.evaluation.benchmarks import SyntheticScenes


def scene_images(n: int, split: str, seed: int, size: int) -> torch.Tensor:
    """(n, 3, size, size) images in [0, 1] of ``SyntheticScenes(n, size, seed, split)``."""
    dataset = SyntheticScenes(n, image_size=size, seed=seed, split=split)
    return torch.stack([dataset[i].image for i in range(len(dataset))])
