"""Nodes: the register neurons of the frozen base model (test-time registers, Jiang et al. 2025)."""

from __future__ import annotations

from typing import Any

# the ph_reg library modules import torch: they are imported inside the nodes, so loading the pipelines is fast
# (the signatures name their classes through node_types, which Kedro resolves without torch)
from ph_reg.pipelines.node_types import ShardReader


def detect_register_neurons(images: ShardReader, backbone: dict[str, Any], params: dict[str, Any],
                            seed: int) -> dict[str, Any]:
    """The ``register_neurons`` artifact (:func:`ph_reg.models.test_time_registers.neuron_artifact`): the top
    ``test_time_registers.top_k`` register neurons of the base model (head ``vanilla`` for CLIP, ``final_norm`` for
    timm, no registers, the implant if any) over the first ``num_images`` prepared images of
    ``test_time_registers.split``, in store order, with the facts of the detection. Deterministic: no random draw
    (``seed`` is recorded with the facts)."""
    from ph_reg.models import build_backbone
    from ph_reg.models.test_time_registers import detect_register_neurons as detect
    from ph_reg.models.test_time_registers import neuron_artifact
    from ph_reg.params import check_resolution, patch_size, register_detection_params
    from ph_reg.runtime import normalize, resolve_device

    config, settings = register_detection_params(backbone, params)
    registers = settings.registers
    if "image_size" in images.attrs:
        check_resolution("data_preparation.image_size", images.attrs["image_size"], patch_size(config), config.arch)
    indices = images.indices(split=settings.split)[:registers.num_images]
    if not indices:
        raise ValueError(f"test_time_registers.split: no prepared image has split {settings.split!r} "
                         f"(data_preparation.val_fraction 0 holds none out: calibrate on 'train')")
    device = resolve_device(settings.device)
    model = build_backbone(config).to(device).eval()
    batches = (normalize(images.stack("image", indices[i:i + registers.batch_size]).to(device), model.mean, model.std)
               for i in range(0, len(indices), registers.batch_size))
    facts: dict[str, Any] = {}
    neurons = detect(model, batches, registers, facts=facts)
    planted = model.implant.planted_neurons() if model.implant is not None and model.implant.neuron_mode else None
    return neuron_artifact(neurons, registers, **facts, split=settings.split, seed=seed, arch=config.arch,
                           head=config.resolved_head, img_size=config.img_size,
                           planted_neurons=[list(n) for n in planted] if planted is not None else None)
