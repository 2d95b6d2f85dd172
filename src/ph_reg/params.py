"""A run's parameters, from the YAML sections to the typed configs: every mistake is caught at pipeline start with a
message naming the key, the value and what is allowed.

The config dataclasses live beside the code they configure (:class:`~ph_reg.data.prepare.DataPreparationConfig`,
:class:`~ph_reg.method.targets.TeacherDenoisingConfig` with its :class:`~ph_reg.method.tta.TTAConfig`,
:class:`~ph_reg.method.config.StudentDistillationConfig`); this module builds them from the sections with
:func:`ph_reg.config.from_mapping` (the ``*_params`` functions, which each pipeline's nodes call first) and adds what
needs more than one section: the backbone (looked up on PyTorch's ``meta`` device: no weights are built or
downloaded, so the check takes a fraction of a second even for a ViT-g), the ``evaluation`` section's checks and the
cross-section checks. :func:`validate_parameters` checks every section at once (the hooks call it before a run).
"""


from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ph_reg.config import (ConfigError, _bool, _choice, _device, _int, _is_int, _known_keys, _number, _optional_int,
                           _typed, from_mapping)
from ph_reg.data.prepare import SPLITS, DataPreparationConfig
from ph_reg.method.config import StudentDistillationConfig
from ph_reg.method.targets import TeacherDenoisingConfig
from ph_reg.models.backbone import DEFAULT_TRAINABLE, HEADS, HF_HUB_PREFIX, BackboneConfig, DenseViT
from ph_reg.models.factory import FAMILY_ADAPTERS, meta_backbone, patch_size
from ph_reg.models.pos_embed import DEFAULT_POS_EMBED_INTERP, POS_EMBED_INTERP
from ph_reg.models.test_time_registers import DETECTION_HEADS, RegisterNeuronDetectionConfig

SUGGESTIONS = 3
#: The top-level sections of the parameters; any other top-level key is refused (a misspelt section would else be
#: ignored, and its section's defaults used without a word).
SECTIONS = ("seed", "backbone", "data_preparation", "teacher_denoising", "student_distillation",
            "test_time_registers", "evaluation")


# --- backbone --------------------------------------------------------------------------------------------------

def _check_arch(arch: Any, key: str = "backbone.arch") -> tuple[str, str]:
    families = tuple(HEADS)
    if not isinstance(arch, str) or arch.partition(":")[0] not in families or not arch.partition(":")[2]:
        raise ConfigError(key, arch, f"'<family>:<name>' with family one of {list(families)}, e.g. "
                                     f"'open_clip:ViT-B-16' or 'timm:vit_base_patch14_dinov2'")
    family, _, name = arch.partition(":")
    if FAMILY_ADAPTERS[family].is_known(name):
        return family, name
    close = difflib.get_close_matches(name, FAMILY_ADAPTERS[family].list_models(), SUGGESTIONS)
    hint = f"; did you mean {[f'{family}:{c}' for c in close]}?" if close else ""
    raise ConfigError(key, arch, f"an architecture {family} knows (see {family}.list_models()){hint}")


def _check_pretrained(family: str, name: str, tag: Any, key: str = "backbone.pretrained") -> None:
    if tag is None or name.startswith(HF_HUB_PREFIX):
        return
    if not isinstance(tag, str) or not tag:
        raise ConfigError(key, tag, "null (random or checkpoint weights) or a pretrained tag string")
    tags = FAMILY_ADAPTERS[family].pretrained_tags(name)
    if tags is None:
        raise ConfigError(key, tag, f"null: the arch {name!r} already names its tag after the dot")
    if tag not in tags:
        raise ConfigError(key, tag, f"a pretrained tag of {family}:{name}: {tags}" if tags else
                          f"null: {family}:{name} has no pretrained weights (set backbone.checkpoint to a local file)")


def check_resolution(key: str, size: Any, patch: int | None, arch: str) -> None:
    """``size`` must be a positive multiple of the backbone's patch size."""
    _int(key, size, 1)
    if patch and size % patch:
        lower, upper = max(patch, size - size % patch), size - size % patch + patch
        raise ConfigError(key, size, f"a multiple of the patch size {patch} of {arch}, e.g. {lower} or {upper}")


def backbone_params(backbone: Mapping[str, Any], head: Any = "default", num_registers: Any = 0,
                    head_key: str = "head", registers_key: str = "num_registers",
                    student: bool = False) -> BackboneConfig:
    """Validate the ``backbone`` section with a head and a register count from another section; ``student``: the
    config is the distilled student's (``BackboneConfig.student``), else a frozen model's."""
    known = [f.name for f in dataclasses.fields(BackboneConfig) if f.name not in ("head", "num_registers", "student")]
    _known_keys("backbone", backbone, known)
    family, name = _check_arch(backbone.get("arch"))
    if head not in HEADS[family]:
        raise ConfigError(head_key, head, f"a {family} head: {list(HEADS[family])}")
    _int(registers_key, num_registers, 0)
    _check_pretrained(family, name, backbone.get("pretrained"))
    checkpoint = backbone.get("checkpoint")
    if checkpoint is not None:
        if backbone.get("pretrained") is not None:
            raise ConfigError("backbone.checkpoint", checkpoint, "null when backbone.pretrained is set (use one)")
        if not isinstance(checkpoint, (str, os.PathLike)) or not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"invalid parameter backbone.checkpoint: got {checkpoint!r}, which is not an "
                                    f"existing file; allowed: null, or the path of a local weights file")
    _int("backbone.init_seed", backbone.get("init_seed", 0), 0)
    _choice("backbone.pos_embed_interp", backbone.get("pos_embed_interp", DEFAULT_POS_EMBED_INTERP), POS_EMBED_INTERP)
    size = backbone.get("img_size", 224)
    config = BackboneConfig.from_dict({**backbone, "head": head, "num_registers": num_registers, "student": student})
    check_resolution("backbone.img_size", size, patch_size(config), config.arch)
    return config


# --- sections --------------------------------------------------------------------------------------------------

def data_preparation_params(values: Mapping[str, Any] | None, section: str = "data_preparation",
                            ) -> DataPreparationConfig:
    """The ``data_preparation`` section (a folder source must exist)."""
    return from_mapping(DataPreparationConfig, values, section)


def teacher_denoising_params(backbone: Mapping[str, Any], values: Mapping[str, Any] | None,
                             ) -> tuple[BackboneConfig, TeacherDenoisingConfig]:
    """The ``teacher_denoising`` section and the teacher's backbone (its head, no registers)."""
    params = from_mapping(TeacherDenoisingConfig, values, "teacher_denoising")
    config = backbone_params(backbone, params.head, 0, head_key="teacher_denoising.head")
    return config, params


def check_trainable(config: BackboneConfig, trainable: Sequence[str], model: DenseViT | None = None,
                    key: str = "student_distillation.trainable") -> None:
    """Every trainable group must unlock some parameter of the architecture (``registers`` may match none)."""
    model = model if model is not None else meta_backbone(config)
    if model is None:
        return
    for name in trainable:
        try:
            model.set_trainable([name])
        except ValueError as error:
            raise ConfigError(key, name, f"{list(DEFAULT_TRAINABLE)}, 'block:<index>' or an fnmatch pattern "
                                         f"matching parameters of {config.arch} ({error})") from None


def student_distillation_params(backbone: Mapping[str, Any], values: Mapping[str, Any] | None,
                                ) -> tuple[BackboneConfig, StudentDistillationConfig]:
    """The ``student_distillation`` section, the student's backbone (head, registers) and its trainable groups."""
    section = "student_distillation"
    params = from_mapping(StudentDistillationConfig, values, section)
    config = backbone_params(backbone, params.head, params.num_registers, head_key=f"{section}.head",
                             registers_key=f"{section}.num_registers", student=True)
    check_trainable(config, params.trainable)
    return config, params


def check_student_snapshot(epoch: Any, params: StudentDistillationConfig,
                           key: str = "evaluation.student_snapshot") -> int:
    """``evaluation.student_snapshot`` must name an epoch that the training keeps a snapshot of (checked before
    training starts, so a 100-epoch run never ends without the snapshot its evaluation needs)."""
    kept = params.training.snapshot_epoch_numbers() if params.snapshot_dir is not None else []
    if not _is_int(epoch) or epoch not in kept:
        raise ConfigError(key, epoch, f"null (the final student) or an epoch the training keeps a snapshot of: {kept} "
                                      f"(student_distillation.training.snapshot_every, snapshot_epochs and epochs; "
                                      f"student_distillation.snapshot_dir)")
    return epoch


def register_detection_params(backbone: Mapping[str, Any], values: Mapping[str, Any] | None,
                               ) -> tuple[BackboneConfig, RegisterNeuronDetectionConfig]:
    """The ``test_time_registers`` section and the model its detection runs: the base model with a head that runs
    every block (``DETECTION_HEADS``: CLIP ``vanilla``, timm ``final_norm``), no registers. The layers must fit the
    architecture, and for CLIP the register neurons must lie below the last block, which the NACLIP and MaskCLIP
    heads replace (``highest_layer`` at most depth - 2), so that every row can carry the intervention."""
    section = "test_time_registers"
    params = RegisterNeuronDetectionConfig.from_dict(values, section)
    family = _check_arch(backbone.get("arch"))[0]
    config = backbone_params(backbone, DETECTION_HEADS[family], 0)
    model = meta_backbone(config)
    if model is None:
        return config, params
    registers, depth = params.registers, model._blocks_prefix()[1]
    if not -depth <= registers.outlier_layer < depth:
        raise ConfigError(f"{section}.outlier_layer", registers.outlier_layer,
                          f"a block index in [{-depth}, {depth - 1}] (negative: from the end; {config.arch} has "
                          f"{depth} blocks)")
    highest = depth - 2 if family == "open_clip" else depth - 1
    why = " (the CLIP dense heads replace the last block, so its neurons could not be intervened on)" \
        if family == "open_clip" else ""
    if (registers.highest_layer is None and family == "open_clip") or (registers.highest_layer or 0) > highest:
        raise ConfigError(f"{section}.highest_layer", registers.highest_layer,
                          f"a block index in [lowest_layer, {highest}]{why}")
    if registers.lowest_layer > highest:
        raise ConfigError(f"{section}.lowest_layer", registers.lowest_layer, f"a block index <= {highest}{why}")
    return config, params


# --- evaluation ------------------------------------------------------------------------------------------------

EVALUATION_KEYS = ("student_snapshot", "split", "max_images", "outlier_k", "batch_size", "figure_images", "device",
                   "precision", "planted", "zero_shot", "probes")
EVALUATION_OPTIONAL = ("student_snapshot", "max_images")
PLANTED_KEYS = ("max_images", "low_cosine", "reference_views", "both")
ZERO_SHOT_KEYS = ("heads", "tta_views", "text_batch_size", "run", "benchmarks", "figure")
ZERO_SHOT_BENCHMARK_KEYS = ("dataset", "classes", "settings")
ZERO_SHOT_FIGURE_KEYS = ("benchmark", "images", "query")
PROBES_KEYS = ("mode", "loader_workers", "teacher_head", "ttr", "feature_dtype", "published", "run", "tasks")
#: The keys of a probe benchmark ``evaluation.probes.tasks.<task>.<benchmark>`` (the first four are required).
PROBE_BENCHMARK_KEYS = {
    "segmentation": ("train", "val", "crop_size", "stride", "short_side", "augment", "probe"),
    "depth": ("train", "val", "crop_size", "stride", "short_side", "flip_tta", "eigen_crop", "augment", "probe"),
}
PROBE_BENCHMARK_REQUIRED = ("train", "val", "crop_size", "stride")


def _required(section: str, values: Mapping[str, Any], keys: Sequence[str]) -> None:
    missing = [k for k in keys if k not in values]
    if missing:
        raise ConfigError(f"{section}.{missing[0]}", None, "", reason=f"missing; {section} needs the keys {list(keys)}")


def _name(key: str, value: Any, allowed: Sequence[Any]) -> Any:
    """``value`` if it is one of ``allowed``, else a ConfigError with the close match."""
    if value not in allowed:
        close = difflib.get_close_matches(value, [str(a) for a in allowed], 1) if isinstance(value, str) else []
        raise ConfigError(key, value, f"one of {list(allowed)}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return value


def _names(key: str, value: Any, allowed: Sequence[str], what: str) -> list[str]:
    """A list of entries of ``allowed`` (a single string counts as a list of one)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(key, value, f"a list of {what}: {list(allowed)}")
    for entry in value:
        _name(key, entry, allowed)
    return list(value)


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _dataset_spec(key: str, spec: Any) -> None:
    """A ``build_dataset`` spec, checked without reading data: its type, its keys and the arguments it requires."""
    from ph_reg.evaluation.benchmarks import DATASETS, dataset_arguments, dataset_keys

    if not isinstance(spec, Mapping):
        raise ConfigError(key, spec, f"a dataset spec: a mapping with 'type' (one of {sorted(DATASETS)}) and the "
                                     f"dataset's arguments, e.g. {{type: voc, root: data/01_raw/VOCdevkit/VOC2012}}")
    kind = _name(f"{key}.type", spec.get("type"), sorted(DATASETS))
    accepted = dataset_keys(DATASETS[kind])
    _known_keys(key, spec, ["type", *accepted])
    _typed(key, spec, lambda: dataset_arguments(spec), accepted)


def _zero_shot_benchmark(key: str, spec: Any) -> list[str] | None:
    """One ``evaluation.zero_shot.benchmarks`` entry; returns its queries where known without data (None for
    ``classes: dataset``)."""
    from ph_reg.evaluation.zeroshot.run import CLASSES_FROM_DATASET
    from ph_reg.evaluation.zeroshot import BENCHMARKS, ZeroShotConfig, load_class_file, parse_class_lines

    _known_keys(key, spec, ZERO_SHOT_BENCHMARK_KEYS)
    _required(key, spec, ("dataset", "settings"))
    _dataset_spec(f"{key}.dataset", spec["dataset"])
    settings = spec["settings"]
    _known_keys(f"{key}.settings", settings, _fields(ZeroShotConfig))  # a null is refused, not defaulted
    from_mapping(ZeroShotConfig, settings, f"{key}.settings")
    classes = spec.get("classes", CLASSES_FROM_DATASET)
    if isinstance(classes, str):
        _name(f"{key}.classes", classes, [CLASSES_FROM_DATASET, *sorted(BENCHMARKS)])
        return None if classes == CLASSES_FROM_DATASET else parse_class_lines(load_class_file(classes))[0]
    if not isinstance(classes, Sequence) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise ConfigError(f"{key}.classes", classes, f"{CLASSES_FROM_DATASET!r} (the dataset's class names), a shipped "
                                                     f"class file {sorted(BENCHMARKS)} or a list of class lines")
    return _typed(f"{key}.classes", classes, lambda: parse_class_lines(list(classes)))[0]


def _zero_shot(key: str, values: Any) -> None:
    from ph_reg.evaluation.zeroshot.run import STUDENT_HEAD
    from ph_reg.evaluation.zeroshot import ZERO_SHOT_HEADS

    _known_keys(key, values, ZERO_SHOT_KEYS)
    _required(key, values, ZERO_SHOT_KEYS)
    if not _names(f"{key}.heads", values["heads"], (*ZERO_SHOT_HEADS, STUDENT_HEAD), "zero-shot heads"):
        raise ConfigError(f"{key}.heads", values["heads"], "a non-empty list of heads (run: [] skips zero-shot)")
    _int(f"{key}.tta_views", values["tta_views"], 1)
    _int(f"{key}.text_batch_size", values["text_batch_size"], 1)
    benchmarks = values["benchmarks"] or {}
    if not isinstance(benchmarks, Mapping):
        raise ConfigError(f"{key}.benchmarks", benchmarks, "a mapping of benchmark names to {dataset, classes, "
                                                           "settings}")
    queries = {name: _zero_shot_benchmark(f"{key}.benchmarks.{name}", spec) for name, spec in benchmarks.items()}
    run = _names(f"{key}.run", values["run"], list(benchmarks), f"benchmarks defined in {key}.benchmarks")
    figure = values["figure"]
    _known_keys(f"{key}.figure", figure, ZERO_SHOT_FIGURE_KEYS)
    _required(f"{key}.figure", figure, ZERO_SHOT_FIGURE_KEYS)
    _int(f"{key}.figure.images", figure["images"], 1)
    if not run:   # no zero-shot evaluation, no figure
        return
    benchmark = _name(f"{key}.figure.benchmark", figure["benchmark"], list(benchmarks))
    known_queries = queries[benchmark]
    if not isinstance(figure["query"], str) or (known_queries is not None and figure["query"] not in known_queries):
        raise ConfigError(f"{key}.figure.query", figure["query"],
                          f"one of the queries of {key}.benchmarks.{benchmark}: {known_queries}" if known_queries
                          else "a class name of the benchmark's dataset")


def _probe_benchmark(key: str, task: str, spec: Any, patch: int | None, batch_size: int, feature_dtype: str) -> None:
    """One ``evaluation.probes.tasks.<task>.<benchmark>`` entry: its datasets, the crop, stride and short side as
    the feature cache checks them (with the backbone's patch size), the online augmentation and the probe recipe."""
    from types import SimpleNamespace

    from ph_reg.evaluation.probes.cache import SPLIT_KINDS, TRAIN_CROPS, _check_args
    from ph_reg.evaluation.probes.depth import DepthProbeConfig
    from ph_reg.evaluation.probes.online import AUGMENTATIONS, augmentation_for
    from ph_reg.evaluation.probes.segmentation import SegmentationProbeConfig

    keys = PROBE_BENCHMARK_KEYS[task]
    _known_keys(key, spec, keys)
    _required(key, spec, PROBE_BENCHMARK_REQUIRED)
    for split in ("train", "val"):
        _dataset_spec(f"{key}.{split}", spec[split])
    _int(f"{key}.crop_size", spec["crop_size"], 1)
    _optional_int(f"{key}.stride", spec["stride"], 1)
    _optional_int(f"{key}.short_side", spec.get("short_side"), 1)
    for flag in ("flip_tta", "eigen_crop"):
        if flag in spec:
            _bool(f"{key}.{flag}", spec[flag])
    model = SimpleNamespace(patch_size=patch or 1)   # the feature cache's own checks, with the backbone's patch size
    for kind in SPLIT_KINDS:
        _typed(key, spec, lambda: _check_args(model, spec["crop_size"], spec["stride"] if kind == "val" else None,
                                              kind, batch_size, spec.get("short_side"), feature_dtype,
                                              TRAIN_CROPS[0]), keys)
    augment = spec.get("augment")
    if augment is not None:
        _known_keys(f"{key}.augment", augment, _fields(AUGMENTATIONS[task]))
    _typed(f"{key}.augment", augment or {}, lambda: augmentation_for(task, spec), _fields(AUGMENTATIONS[task]))
    recipe = {"segmentation": SegmentationProbeConfig, "depth": DepthProbeConfig}[task]
    probe = spec.get("probe") or {}
    from_mapping(recipe, probe, f"{key}.probe")


def _probes(key: str, values: Any, backbone: BackboneConfig, batch_size: int) -> None:
    from ph_reg.evaluation.probes.run import PROBE_TASKS
    from ph_reg.evaluation.published import PUBLISHED_TABLE2
    from ph_reg.evaluation.probes.cache import FEATURE_DTYPES
    from ph_reg.evaluation.probes.online import PROBE_MODES

    _known_keys(key, values, PROBES_KEYS)
    _required(key, values, [k for k in PROBES_KEYS if k != "published"])
    _choice(f"{key}.mode", values["mode"], PROBE_MODES)
    _int(f"{key}.loader_workers", values["loader_workers"], 0)
    _name(f"{key}.teacher_head", values["teacher_head"], HEADS[backbone.family])
    _bool(f"{key}.ttr", values["ttr"])
    feature_dtype = _name(f"{key}.feature_dtype", values["feature_dtype"], sorted(FEATURE_DTYPES))
    if values.get("published") is not None:
        _name(f"{key}.published", values["published"], sorted(PUBLISHED_TABLE2))
    tasks = values["tasks"] or {}
    _known_keys(f"{key}.tasks", tasks, PROBE_TASKS)
    patch = patch_size(backbone)
    defined = []
    for task, benchmarks in tasks.items():
        if not isinstance(benchmarks or {}, Mapping):
            raise ConfigError(f"{key}.tasks.{task}", benchmarks, "a mapping of benchmark names to probe benchmarks")
        for name, spec in (benchmarks or {}).items():
            _probe_benchmark(f"{key}.tasks.{task}.{name}", task, spec, patch, batch_size, feature_dtype)
            defined.append(f"{task}/{name}")
    _names(f"{key}.run", values["run"], defined, f"'<task>/<benchmark>' entries of {key}.tasks")


def evaluation_params(values: Mapping[str, Any], backbone: BackboneConfig, section: str = "evaluation"
                      ) -> dict[str, Any]:
    """Validate the ``evaluation`` section for ``backbone`` (the evaluated base model) without reading any data:
    every key (a typo gets the close match), its type and allowed values; each zero-shot benchmark (its dataset
    spec, classes and ``ZeroShotConfig``); each probe benchmark (its dataset specs, the crop, stride and short
    side as the feature cache checks them, the online ``augment`` and the ``probe`` recipe:
    ``SegmentationProbeConfig`` / ``DepthProbeConfig``); and that every ``run`` entry and the zero-shot figure
    name a defined benchmark. The typed configs' own ``from_dict`` checks do the work, their errors re-raised with
    the dotted key. Returns the section as a dict (the nodes read it so)."""
    from ph_reg.runtime import PRECISIONS

    _known_keys(section, values, EVALUATION_KEYS)
    _required(section, values, [k for k in EVALUATION_KEYS if k not in EVALUATION_OPTIONAL])
    _optional_int(f"{section}.student_snapshot", values.get("student_snapshot"), 1)
    _choice(f"{section}.split", values["split"], SPLITS)
    _optional_int(f"{section}.max_images", values.get("max_images"), 1)
    _number(f"{section}.outlier_k", values["outlier_k"], 0.0, float("inf"), closed=False)
    batch_size = _int(f"{section}.batch_size", values["batch_size"], 1)
    _int(f"{section}.figure_images", values["figure_images"], 1)
    _device(f"{section}.device", values["device"])
    _choice(f"{section}.precision", values["precision"], PRECISIONS)
    planted = values["planted"]
    _known_keys(f"{section}.planted", planted, PLANTED_KEYS)
    _required(f"{section}.planted", planted, PLANTED_KEYS)
    _optional_int(f"{section}.planted.max_images", planted["max_images"], 1)
    _number(f"{section}.planted.low_cosine", planted["low_cosine"], -1.0, 1.0)
    _int(f"{section}.planted.reference_views", planted["reference_views"], 1)
    _bool(f"{section}.planted.both", planted["both"])
    _zero_shot(f"{section}.zero_shot", values["zero_shot"])
    _probes(f"{section}.probes", values["probes"], backbone, batch_size)
    return dict(values)


def validate_parameters(params: Mapping[str, Any], sections: Sequence[str] | None = None) -> dict[str, Any]:
    """Check a run's parameters before anything runs; return the typed sections.

    Every top-level key must be one of ``SECTIONS`` (a misspelt section is refused with the close match). The
    sections ``data_preparation``, ``teacher_denoising``, ``student_distillation``, ``test_time_registers`` and
    ``evaluation`` (each with ``backbone``) are checked whole; ``sections`` limits the check to those (default: every one present; the
    validation hook passes the sections its pipeline's nodes read). Also checks what ties the sections together:
    the crop size is a multiple of the patch size, cached student targets need a cached teacher, and
    ``evaluation.student_snapshot`` names a snapshot the training keeps.
    """
    _known_keys("", params, SECTIONS)
    if "seed" in params:
        _int("seed", params["seed"], 0)
    wanted = [name for name in (sections if sections is not None else params) if name in params]
    backbone = params.get("backbone")
    if backbone is None:
        raise ConfigError("backbone", None, "a mapping with at least 'arch'")
    result: dict[str, Any] = {}
    if "data_preparation" in wanted:
        result["data_preparation"] = data_preparation_params(params["data_preparation"])
    if "teacher_denoising" in wanted:
        result["teacher"], result["teacher_denoising"] = teacher_denoising_params(backbone, params["teacher_denoising"])
    if "student_distillation" in wanted:
        student, distill_params = student_distillation_params(backbone, params["student_distillation"])
        result["student"], result["student_distillation"] = student, distill_params
        teacher = result.get("teacher_denoising")
        if teacher is not None and distill_params.targets == "cached" and teacher.mode != "cached":
            raise ConfigError("student_distillation.targets", distill_params.targets,
                              f"'online' while teacher_denoising.mode is {teacher.mode!r} (or set both to 'cached')")
        evaluation = params.get("evaluation")
        if isinstance(evaluation, Mapping) and evaluation.get("student_snapshot") is not None:
            check_student_snapshot(evaluation["student_snapshot"], distill_params)
    if "test_time_registers" in wanted:
        result["register_detector"], result["test_time_registers"] = register_detection_params(
            backbone, params["test_time_registers"])
    if "data_preparation" in result or "evaluation" in wanted:
        config = backbone_params(backbone, HEADS[_check_arch(backbone.get("arch"))[0]][0])
        if "data_preparation" in result:
            check_resolution("data_preparation.image_size", result["data_preparation"].image_size,
                             patch_size(config), config.arch)
        if "evaluation" in wanted:
            result["evaluation"] = evaluation_params(params["evaluation"], config)
    return result
