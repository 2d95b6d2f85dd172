"""Linear-probe orchestration (Table 2): the feature stores of every model and probe benchmark, then a probe
trained and evaluated per model, task and benchmark through the task registry :data:`PROBES`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ph_reg.evaluation.benchmarks import build_dataset
from ph_reg.evaluation.probes.cache import BatchSource, feature_stream
from ph_reg.evaluation.probes.depth import depth_probe_scores, eigen_crop_mask
from ph_reg.evaluation.probes.online import OnlineBatchSource, augmentation_for, check_mode
from ph_reg.evaluation.probes.segmentation import evaluate_segmentation_probe, train_segmentation_probe
from ph_reg.io.shards import ShardReader, write_stream
from ph_reg.models import BackboneConfig, build_backbone, clean_copy
from ph_reg.models.test_time_registers import attach_from_artifact
from ph_reg.runtime import DEFAULT_PRECISION, derive_seed, module_device

__all__ = ["PROBES", "PROBE_TASKS", "TTR_MODEL", "selected_tasks", "probe_models", "probe_feature_streams",
           "write_probe_stores", "run_probes"]

#: ``scores(train, val, spec, seed, history)``: train a probe on ``train`` (a store or a batch source), evaluate it
#: on the ``val`` store and return its metrics; ``spec`` is the benchmark's mapping of ``evaluation.probes.tasks``.
ProbeScores = Callable[[ShardReader | BatchSource, ShardReader, Mapping[str, Any], int, "list[float] | None"],
                       dict[str, float]]


def segmentation_scores(train: ShardReader | BatchSource, val: ShardReader, spec: Mapping[str, Any], seed: int,
                        history: list[float] | None) -> dict[str, float]:
    """The final segmentation probe's mIoU and mAcc."""
    probe = train_segmentation_probe(train, spec.get("probe", {}), seed, history)
    return evaluate_segmentation_probe(probe, val)


def depth_scores(train: ShardReader | BatchSource, val: ShardReader, spec: Mapping[str, Any], seed: int,
                 history: list[float] | None) -> dict[str, float]:
    """The final depth probe + the official best-by-AbsRel every eval_interval iterations (``*_best_on_test``)."""
    return depth_probe_scores(train, val, spec.get("probe", {}), seed, history,
                              mask_fn=eigen_crop_mask if spec.get("eigen_crop") else None,
                              flip_tta=spec.get("flip_tta", False))


#: The probe tasks (``evaluation.probes.tasks``) and how each is scored.
PROBES: dict[str, ProbeScores] = {"segmentation": segmentation_scores, "depth": depth_scores}
PROBE_TASKS = tuple(PROBES)
#: The probe row of the base model with test-time registers (``evaluation.probes.ttr``)
TTR_MODEL = "ttr"


def selected_tasks(tasks: dict[str, dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    """Probe tasks filtered by ``run`` entries of the form ``"<task>/<benchmark>"``."""
    chosen: dict[str, dict[str, Any]] = {}
    for entry in names:
        task, _, benchmark = entry.partition("/")
        if benchmark not in (tasks.get(task) or {}):
            raise ValueError(f"evaluation.probes.run names {entry!r}, which is not defined in evaluation.probes.tasks")
        chosen.setdefault(task, {})[benchmark] = tasks[task][benchmark]
    return chosen


def probe_models(student: nn.Module, base: BackboneConfig, teacher_head: str, ttr: bool = False,
                 register_neurons: Mapping[str, Any] | None = None) -> dict[str, nn.Module]:
    """The models whose frozen features are probed: the base model with ``teacher_head`` and the student; with a
    planted-artifact implant (``base.implant``) also ``clean``, the same base model without it (the ground truth);
    with ``ttr`` (``evaluation.probes.ttr``) also ``ttr``, the teacher (same weights, head and implant) carrying the
    test-time registers of ``register_neurons`` (a ``neuron_artifact``, :mod:`ph_reg.models.test_time_registers`)."""
    teacher = build_backbone(BackboneConfig.from_dict({**base.to_dict(), "head": teacher_head, "num_registers": 0,
                                                       "student": False}))
    models = {"teacher": teacher.eval(), "student": student.eval()}
    if base.implant is not None:
        models["clean"] = clean_copy(teacher)
    if ttr:
        if register_neurons is None:
            raise ValueError("evaluation.probes.ttr is true, which needs the register-neuron artifact "
                             "(register_neurons, data/04_feature/register_neurons.json from the test_time_registers "
                             "pipeline); none was given: run that pipeline first or set it false")
        with_registers = build_backbone(teacher.config)
        with_registers.load_state_dict(teacher.state_dict())
        try:
            attach_from_artifact(with_registers, register_neurons)
        except ValueError as error:
            raise ValueError(f"evaluation.probes.ttr ({teacher_head!r} head with test-time registers): {error}"
                             ) from error
        models[TTR_MODEL] = with_registers.to(module_device(teacher)).eval()
    return models


def probe_feature_streams(models: Mapping[str, nn.Module], tasks: Mapping[str, Mapping[str, Mapping[str, Any]]],
                          seed: int, feature_dtype: str = "float16", batch_size: int = 8,
                          precision: str = DEFAULT_PRECISION, mode: str = "cached") -> dict[str, Any]:
    """Lazy feature stores ``"<model>/<task>/<benchmark>/<train|val>"`` for every model and probe benchmark.
    ``mode`` (``evaluation.probes.mode``): ``"cached"`` makes train and val stores; ``"online"`` only the val
    stores (the probes then train on features recomputed under augmentation, see :mod:`ph_reg.evaluation.probes.online`).

    ``tasks[task][benchmark]`` has ``train`` and ``val`` dataset specs, ``crop_size``, ``stride`` and optionally
    ``short_side`` and (depth) ``flip_tta``. The backbones run at ``precision`` (``evaluation.precision``). Nothing
    is computed until a store is written.
    """
    check_mode(mode)
    streams = {}
    for task, benchmarks in tasks.items():
        if task not in PROBE_TASKS:
            raise ValueError(f"unknown probe task {task!r}; expected one of {PROBE_TASKS}")
        for name, spec in (benchmarks or {}).items():
            for model_name, model in models.items():
                common = dict(crop_size=spec["crop_size"], short_side=spec.get("short_side"), seed=seed,
                              feature_dtype=feature_dtype, batch_size=batch_size, precision=precision)
                if mode == "cached":
                    streams[f"{model_name}/{task}/{name}/train"] = feature_stream(
                        model, build_dataset(spec["train"]), split_kind="train", **common)
                else:
                    augmentation_for(task, spec)   # a bad augment key fails here, before any feature is computed
                streams[f"{model_name}/{task}/{name}/val"] = feature_stream(
                    model, build_dataset(spec["val"]), split_kind="val", stride=spec["stride"],
                    flip=task == "depth" and spec.get("flip_tta", False), **common)
    return streams


def write_probe_stores(streams: Mapping[str, Any], folder: str | Path) -> dict[str, Any]:
    """Write the lazy feature stores of :func:`probe_feature_streams` under ``folder`` (one sub-folder per key)
    and return them as ``{key: ShardReader}``, ready for :func:`run_probes` (the pipeline's catalog does the same)."""
    stores = {}
    for key, stream in streams.items():
        target = Path(folder) / key
        write_stream(target, stream)
        stores[key] = ShardReader(target)
    return stores


def run_probes(stores: Mapping[str, Any], tasks: Mapping[str, Mapping[str, Mapping[str, Any]]],
               seed: int, curves: dict[str, list[float]] | None = None, *, mode: str = "cached",
               models: Mapping[str, nn.Module] | None = None, precision: str = DEFAULT_PRECISION,
               loader_workers: int = 0) -> dict[str, dict[str, float]]:
    """Train and evaluate every probe from the feature stores: ``{model: {"<benchmark>/<metric>": value}}``.
    ``curves``, when given, receives the training loss per iteration under ``"<model>/<task>/<benchmark>"``.

    ``mode`` (``evaluation.probes.mode``): ``"cached"`` trains on the train feature stores; ``"online"`` trains on
    features that ``models[<model>]`` recomputes for every batch under the benchmark's augmentation (its
    ``augment`` mapping, :mod:`ph_reg.evaluation.probes.online`), at ``precision``, reading images in ``loader_workers``
    workers. Evaluation always reads the val stores."""
    check_mode(mode)
    if mode == "online" and models is None:
        raise ValueError("evaluation.probes.mode 'online' needs the models (run_probes(..., models=...))")
    results: dict[str, dict[str, float]] = {}
    names = {key.split("/")[0] for key in stores}
    order = [name for name in ("teacher", "student") if name in names] + sorted(names - {"teacher", "student"})
    for model_name in order:
        row = results.setdefault(model_name, {})
        for task, benchmarks in tasks.items():
            for name, spec in (benchmarks or {}).items():
                if mode == "cached":
                    train = stores[f"{model_name}/{task}/{name}/train"]
                else:
                    train = OnlineBatchSource(models[model_name], build_dataset(spec["train"]),
                                              augmentation_for(task, spec), precision=precision,
                                              num_workers=loader_workers)
                val = stores[f"{model_name}/{task}/{name}/val"]
                probe_seed = derive_seed(seed, "probe", task, name)  # the same for every model: a fair comparison
                history = None if curves is None else curves.setdefault(f"{model_name}/{task}/{name}", [])
                scores = PROBES[task](train, val, spec, probe_seed, history)
                row.update({f"{name}/{metric}": round(float(value), 4) for metric, value in scores.items()})
    return results
