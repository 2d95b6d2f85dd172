"""The distilled student outside ph-reg: a stock timm ``VisionTransformer`` holding the student's weights, and a
Hugging Face Hub folder around it.

**The timm form** (:func:`to_timm`). A timm ``VisionTransformer`` already holds a ViT with registers:
``reg_tokens=N`` adds ``N`` learnt tokens after the CLS token, before the patches, exactly how timm holds DINOv2
with registers (``vit_base_patch14_reg4_dinov2``). The student maps onto one with ``reg_tokens = m (+ native)``:

- *Order.* ph-reg runs timm students as ``[registers, CLS, native reg tokens, patches]`` and open_clip students as
  ``[CLS, patches, registers]``; timm runs ``[CLS, reg_token, patches]``. Attention, LayerNorm and the MLP treat
  every token alike whatever its position (no causal mask, no relative position), so only the positional
  embedding depends on the order: ``reg_token = [our m registers, the model's native reg tokens]``.
- *Positional embedding.* Our registers carry none. The architecture's ``no_embed_class`` is kept: with
  ``no_embed_class=True`` (DINOv2-reg, DeiT-III) the table covers the patches only and nothing changes; with
  ``no_embed_class=False`` (DINOv2, CLIP) timm's table has a row for every prefix token, so ``m`` rows of zeros
  are inserted after the CLS row (``x + 0`` is ``x`` exactly). Every other tensor is copied unchanged (timm
  family) or renamed by timm's own open_clip converter (CLIP: ``conv1`` -> ``patch_embed.proj``, ``in_proj`` ->
  ``qkv``, ``ln_post`` -> ``norm``, ``proj`` -> ``head``, ...).
- *Resolution.* The exported table is the one ph-reg uses at the export resolution (``img_size``, by default the
  training resolution): :meth:`DenseViT.pos_embed` of that grid, with ``img_size`` set to it, so at that
  resolution timm adds exactly our table. At other resolutions the model is built with ``dynamic_img_size=True``
  and timm resizes that table per input with its one rule, antialiased bicubic (``resample_abs_pos_embed``
  defaults; no timm ``VisionTransformer`` option selects another). That is also ph-reg's rule under
  ``pos_embed_interp: explicit_size`` for timm students, so those match at **every** resolution. Elsewhere
  ph-reg resizes differently (timm ``official``: plain bicubic from the pretrained table; CLIP ``official``: scale
  factor ``(side + 0.1) / old``; CLIP ``explicit_size``: plain bicubic), so an export matches **at its own
  resolution** only; export at the resolution you will run at (``img_size=...``, ``--img-size``) for an exact
  match there. (timm's ``NaFlexVit``, ``use_naflex=True, pos_embed_antialias=False``, resizes with plain bicubic;
  it is not used here: its loader folds the table differently.)
- *Dense output.* timm family: ``model.forward_features(x)[:, model.num_prefix_tokens:]`` are the student's final
  normalised patch tokens. CLIP: the student's head is MaskCLIP, the value path of the last block, which a stock
  forward does not run; :data:`MASKCLIP_SNIPPET` is the four lines that read it (the ``vanilla`` head is
  ``model.head(model.forward_features(x))``).
- *Not exported:* a planted-artifact implant (``backbone.implant``, the benchmark of ``conf/base``) is a rule of
  ph-reg's code, not weights: the export is the student without it (``ph_reg.models.clean_copy``).

**The Hub folder** (:func:`save_pretrained`): the timm form at the top (``model.safetensors`` + timm's
``config.json``: ``timm.create_model("hf-hub:<id>")`` or ``"local-dir:<folder>"``), the ph-reg student under
``ph_reg/`` (what :func:`from_pretrained` reads back: the trainable-weights delta, the base weights coming from
the base's own source) and a ``README.md`` model card. Nothing is uploaded: ``huggingface_hub.upload_folder``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ph_reg.method.student import CONFIG_NAME, WEIGHTS_NAME, load_student, read_student
from ph_reg.models import DenseViT

EXPORT_FORMATS = ("timm", "hub")
TIMM_WEIGHTS, TIMM_CONFIG, MODEL_CARD = "model.safetensors", "config.json", "README.md"
PH_REG_FOLDER = "ph_reg"   # the ph-reg student inside a Hub folder
#: timm architectures that hold an open_clip CLIP tower (dimensions then set by ``model_args``)
TIMM_CLIP_ARCH = {"gelu": "vit_base_patch16_clip_224", "quick_gelu": "vit_base_patch16_clip_quickgelu_224"}

#: The lines that read a CLIP student's MaskCLIP dense features from its timm form (``images``: normalised
#: ``(B, 3, H, W)``): the tokens entering the last block, then that block's value path, ``norm`` (CLIP's ln_post)
#: and ``head`` (CLIP's proj). Executed as written by the tests; the README and the model card show it.
MASKCLIP_SNIPPET = """\
blk = model.blocks[-1]  # MaskCLIP: the last block's value path, no attention, residual or MLP
x = model.forward_intermediates(images, indices=[len(model.blocks) - 2], output_fmt="NLC", intermediates_only=True)[0]
w_v, b_v = blk.attn.qkv.weight.chunk(3)[2], blk.attn.qkv.bias.chunk(3)[2]
dense = model.head(model.norm(blk.ls1(blk.attn.proj(torch.nn.functional.linear(blk.norm1(x), w_v, b_v)))))
"""
#: The same for a timm-family student (its head is the final norm).
FINAL_NORM_SNIPPET = "dense = model.forward_features(images)[:, model.num_prefix_tokens:]\n"


@dataclass(frozen=True)
class TimmExport:
    """A student as a stock timm model: ``timm.create_model(architecture, **model_args)`` + ``state_dict``.
    ``dense_head``: the student's head (``final_norm``, ``maskclip`` or ``vanilla``); ``snippet``: the lines that
    read its dense features from ``model`` and ``images`` into ``dense`` ``(B, h * w, C)``."""

    architecture: str
    model_args: dict[str, Any]
    state_dict: dict[str, Tensor]
    data_config: dict[str, Any]
    dense_head: str

    @property
    def snippet(self) -> str:
        return MASKCLIP_SNIPPET if self.dense_head == "maskclip" else FINAL_NORM_SNIPPET

    def build(self) -> nn.Module:
        """The timm model with the weights loaded (strict), in eval mode; the global RNG is left as it was."""
        import timm

        with torch.random.fork_rng(devices=[]):
            model = timm.create_model(self.architecture, pretrained=False, **self.model_args)
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()


def to_timm(model: DenseViT, img_size: int | None = None) -> TimmExport:
    """The timm form of a student (see the module docstring for the mapping); the positional table is the one the
    student uses at ``img_size`` (default: its training resolution ``config.img_size``)."""
    size = model.config.img_size if img_size is None else img_size
    grid = model.grid_size(size, size)
    with torch.no_grad():
        if model.config.family == "timm":
            architecture, args, state = _timm_family(model, grid)
            head = "final_norm"
        else:
            architecture, args, state = _open_clip_family(model, grid)
            head = model.head
            if head not in ("maskclip", "vanilla"):
                raise ValueError(f"a CLIP student with the {head!r} head has no timm form: only maskclip (the "
                                 f"student's head) and vanilla are exported")
    args = {**args, "img_size": size, "dynamic_img_size": True}
    data = {"input_size": (3, size, size), "mean": model.mean, "std": model.std, "interpolation": "bicubic",
            "crop_pct": 1.0}
    state = {name: tensor.detach().to("cpu", torch.float32).contiguous().clone() for name, tensor in state.items()}
    return TimmExport(architecture, args, state, data, head)


def _with_register_rows(pos: Tensor, prefix_rows: int, num_registers: int) -> Tensor:
    """``pos`` (1, rows, D) with ``num_registers`` zero rows inserted after its first ``prefix_rows`` rows."""
    zeros = pos.new_zeros(1, num_registers, pos.shape[-1])
    return torch.cat([pos[:, :prefix_rows], zeros, pos[:, prefix_rows:]], dim=1)


def _timm_family(model: DenseViT, grid: tuple[int, int]) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    vit = model.vit
    state = dict(vit.state_dict())
    native = vit.reg_token.shape[1] if vit.reg_token is not None else 0
    if model.num_registers:
        ours = model.registers.unsqueeze(0)
        state["reg_token"] = torch.cat([ours, vit.reg_token], dim=1) if native else ours
    pos = model.pos_embed(grid)
    if pos is not None and not vit.no_embed_class:  # rows for [CLS, reg tokens, patches]: zeros for ours
        pos = _with_register_rows(pos, 1 if vit.cls_token is not None else 0, model.num_registers)
    if pos is not None:
        state["pos_embed"] = pos
    args = {**model.config.model_kwargs, "reg_tokens": model.num_registers + native,
            "no_embed_class": vit.no_embed_class, "num_classes": 0}
    return model.config.model_name.partition(".")[0], args, state


def _open_clip_family(model: DenseViT, grid: tuple[int, int]) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    from timm.models.vision_transformer import _convert_openai_clip

    vit = model.vit
    block = vit.transformer.resblocks[0]
    unsupported = {"ln_pre": isinstance(vit.ln_pre, nn.Identity), "final_ln_after_pool": vit.final_ln_after_pool,
                   "pool_type": vit.pool_type != "tok", "proj": vit.proj is None,
                   "layer scale": not isinstance(block.ls_1, nn.Identity),
                   "attention without bias": block.attn.in_proj_bias is None,
                   "attention norms": hasattr(block, "ln_attn") and not isinstance(block.ln_attn, nn.Identity)}
    bad = sorted(name for name, flag in unsupported.items() if flag)
    if bad:
        raise ValueError(f"{model.config.arch}: no timm CLIP ViT holds this tower ({', '.join(bad)})")
    quick = type(block.mlp.gelu).__name__ == "QuickGELU"
    state = _convert_openai_clip({f"visual.{k}": v for k, v in vit.state_dict().items()}, None)
    state["pos_embed"] = _with_register_rows(model.pos_embed(grid).unsqueeze(0), 1, model.num_registers)
    if model.num_registers:
        state["reg_token"] = model.registers.unsqueeze(0)
    width = vit.transformer.width
    args = {"patch_size": model.patch_size, "embed_dim": width, "depth": len(vit.transformer.resblocks),
            "num_heads": block.attn.num_heads, "mlp_ratio": block.mlp.c_fc.out_features / width,
            "pre_norm": True, "class_token": True, "global_pool": "token", "num_classes": vit.proj.shape[1],
            "reg_tokens": model.num_registers, "no_embed_class": False}
    return TIMM_CLIP_ARCH["quick_gelu" if quick else "gelu"], args, state


def write_timm(export: TimmExport, folder: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``export`` as timm writes a Hub folder (``timm.models.save_for_hf``: ``model.safetensors`` and
    ``config.json`` with the architecture, ``model_args`` and preprocessing), plus ``extra`` keys in the config
    (timm ignores them). Replaces ``folder`` atomically. ``timm.create_model("local-dir:<folder>",
    pretrained=True)`` loads it; so does ``timm.create_model(architecture, **model_args, pretrained=True,
    pretrained_cfg_overlay={"file": "<folder>/model.safetensors"})``."""
    from timm.models import save_for_hf

    from ph_reg.io.files import replace_folder

    from ph_reg.io.files import write_json

    model = export.build()
    with replace_folder(folder) as staging:
        save_for_hf(model, str(staging), model_config=dict(extra or {}), model_args=export.model_args,
                    safe_serialization=True, data_config=export.data_config)
        config = json.loads((staging / TIMM_CONFIG).read_text())
        # the architecture's default tag and licence describe other weights, not these
        for key in ("tag", "license", "hf_hub_id", "url"):
            config["pretrained_cfg"].pop(key, None)
        write_json(staging / TIMM_CONFIG, config)
    return Path(folder)


def save_pretrained(student: str | os.PathLike, folder: str | os.PathLike,
                    metrics: Mapping[str, Any] | None = None, img_size: int | None = None) -> Path:
    """Write a Hub folder for the student folder ``student``: the timm form at the top, the ph-reg student under
    ``ph_reg/`` and a model card (``README.md``) naming the training settings, ``metrics`` (if given) and the
    loading lines. ``huggingface_hub.upload_folder(repo_id=..., folder_path=folder)`` uploads it."""
    weights, config = read_student(student)
    return write_hub(load_student(student), weights, config, folder, metrics, img_size)


def write_hub(model: DenseViT, weights: Mapping[str, Tensor], config: Mapping[str, Any], folder: str | os.PathLike,
              metrics: Mapping[str, Any] | None = None, img_size: int | None = None) -> Path:
    """:func:`save_pretrained` for a student in memory (``weights``: its trainable-weights delta, ``config``: its
    student config), as the Kedro node writes it."""
    from ph_reg.io.files import replace_folder, save_tensors, write_json
    export = to_timm(model, img_size)
    with replace_folder(folder) as staging:
        write_timm(export, staging / "timm", extra={"ph_reg": {"dense_head": export.dense_head}})
        for name in (TIMM_WEIGHTS, TIMM_CONFIG):
            os.replace(staging / "timm" / name, staging / name)
        shutil.rmtree(staging / "timm")
        save_tensors(staging / PH_REG_FOLDER / WEIGHTS_NAME, weights)
        write_json(staging / PH_REG_FOLDER / CONFIG_NAME, dict(config))
        (staging / MODEL_CARD).write_text(model_card(config, export, metrics))
    return Path(folder)


@dataclass(frozen=True)
class HubExport:
    """A student in memory on its way to a Hub folder (what the Kedro node hands to its dataset)."""

    model: DenseViT
    weights: dict[str, Tensor]
    config: dict[str, Any]
    metrics: dict[str, Any] | None = None
    img_size: int | None = None

    def write(self, folder: str | os.PathLike) -> Path:
        return write_hub(self.model, self.weights, self.config, folder, self.metrics, self.img_size)


def hub_folder(folder_or_id: str | os.PathLike) -> Path:
    """A local Hub folder, or the snapshot of Hub repo ``folder_or_id`` (``huggingface_hub.snapshot_download``;
    offline or unreachable: FileNotFoundError saying so)."""
    path = Path(folder_or_id)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(folder_or_id)))
    except Exception as exc:  # offline, unknown repo, bad id: one message naming the id
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FileNotFoundError(f"{folder_or_id!s} is neither a local folder nor a Hugging Face Hub repo that could be "
                                f"downloaded ({type(exc).__name__}: {reason}); with HF_HUB_OFFLINE=1 only repos "
                                f"already in the Hugging Face cache load") from None


def from_pretrained(folder_or_id: str | os.PathLike, device: str | None = None) -> DenseViT:
    """The ph-reg student of a Hub folder written by :func:`save_pretrained` (a local folder or a Hub repo id),
    as :func:`ph_reg.load_student` returns it (the base weights come from the base's own source)."""
    folder = hub_folder(folder_or_id)
    if not (folder / PH_REG_FOLDER / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder / PH_REG_FOLDER / CONFIG_NAME} not found: not a ph-reg Hub folder "
                                f"(written by ph_reg.method.export.save_pretrained or `python -m ph_reg export`)")
    return load_student(folder / PH_REG_FOLDER, device=device)


def export(student: str | os.PathLike, out: str | os.PathLike, fmt: str = "hub", img_size: int | None = None,
           metrics: str | os.PathLike | None = None) -> Path:
    """``python -m ph_reg export``: the student folder ``student`` as a timm folder or a Hub folder at ``out``;
    ``metrics``: a JSON file (e.g. ``data/08_reporting/summary.json``) for the model card."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    if metrics is not None and not Path(metrics).is_file():
        raise FileNotFoundError(f"metrics file not found: {metrics}")
    measured = json.loads(Path(metrics).read_text()) if metrics is not None else None
    if fmt == "hub":
        return save_pretrained(student, out, measured, img_size)
    export = to_timm(load_student(student), img_size)
    return write_timm(export, out, extra={"ph_reg": {"dense_head": export.dense_head}})


def model_card(config: Mapping[str, Any], export: TimmExport, metrics: Mapping[str, Any] | None = None) -> str:
    """The Hub model card (``README.md``): what the student is, how to load it (plain timm, ph-reg), the settings
    it was trained with (the student config's ``backbone``, ``teacher``, ``trainable_groups``, ``targets`` and
    ``training``) and ``metrics`` when given."""
    backbone = config["backbone"]
    lines = ["---", "library_name: timm", "tags: [image-feature-extraction, ph-reg, vision-transformer, registers]",
             "---", "", f"# PH-Reg student of `{backbone['arch']}`", "",
             f"A ViT distilled with [PH-Reg](https://arxiv.org/abs/2505.21501) (post-hoc self-distilled registers): "
             f"{backbone['num_registers']} registers, {export.dense_head} dense head, trained at "
             f"{backbone['img_size']} px; timm architecture `{export.architecture}` with `reg_tokens` "
             f"{export.model_args['reg_tokens']}.", ""]
    if backbone.get("implant") is not None:
        lines += ["**Planted artifacts.** This student was trained on ph-reg's planted-artifact benchmark "
                  "(`backbone.implant`); the implant is a rule of ph-reg's code, not weights, so these weights are "
                  "the student without it.", ""]
    lines += ["## Use it in plain timm", "", "```python", "import timm, torch",
              'model = timm.create_model("hf-hub:<user>/<repo>", pretrained=True).eval()  '
              '# or "local-dir:<this folder>"',
              "# images: (B, 3, H, W), normalised with the mean/std of model.pretrained_cfg",
              export.snippet.rstrip(), "# dense: (B, h * w, C) patch features, row-major over the patch grid", "```",
              "", "## Use it in ph-reg", "", "```python", "from ph_reg.method.export import from_pretrained",
              'student = from_pretrained("<user>/<repo>")  # or this folder; a DenseViT: student(images).patch', "```",
              "", "## Training settings", "", "```json",
              json.dumps({key: config[key] for key in ("backbone", "teacher", "trainable_groups", "targets",
                                                        "training", "epoch") if key in config}, indent=2), "```", ""]
    lines += ["## Metrics", ""]
    lines += (["```json", json.dumps(dict(metrics), indent=2), "```"] if metrics else
              ["None were given at export (`python -m ph_reg export ... --metrics data/08_reporting/summary.json` "
               "adds the run's)."])
    return "\n".join(lines) + "\n"
