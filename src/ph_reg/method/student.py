"""The distilled student as an artifact: a JSON config plus the trainable-weights delta in safetensors.

``load_student(folder)`` rebuilds the base model named in the config (pretrained tag, local checkpoint or seeded
random weights), adds the registers and loads the distilled weights: the result is a ready ``DenseViT``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ph_reg.io.files import load_tensors
from ph_reg.models import BackboneConfig, DenseViT, build_backbone, load_trainable_state_dict

STUDENT_FORMAT = "ph-reg-student/1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.safetensors"


def teacher_backbone(backbone: Mapping[str, Any], head: str) -> BackboneConfig:
    """The teacher: the shared backbone parameters with the teacher head and no registers (a frozen model)."""
    return BackboneConfig.from_dict({**backbone, "head": head, "num_registers": 0, "student": False})


def student_config(backbone: BackboneConfig, trainable_groups: Sequence[str], trainable_names: Sequence[str],
                   teacher: BackboneConfig | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON config from which ``load_student`` rebuilds a student."""
    config = {
        "format": STUDENT_FORMAT,
        "backbone": backbone.to_dict(),
        "trainable_groups": list(trainable_groups),
        "trainable_parameters": sorted(trainable_names),
    }
    if teacher is not None:
        config["teacher"] = teacher.to_dict()
    if extra:
        config.update(extra)
    return config


def build_student_from_config(config: Mapping[str, Any]) -> DenseViT:
    """Rebuild the student (before loading weights) from its config dict.

    Configs written before ``pos_embed_interp`` and ``student`` existed load as before: a missing
    ``pos_embed_interp`` is ``"explicit_size"`` (``BackboneConfig``'s default, the only rule of those versions) and
    the model is a student whatever ``student`` says (that flag only matters under ``official``).
    """
    if config.get("format") != STUDENT_FORMAT:
        raise ValueError(f"not a PH-Reg student config: format is {config.get('format')!r}, expected {STUDENT_FORMAT!r}")
    model = build_backbone(BackboneConfig.from_dict({**config["backbone"], "student": True}))
    model.set_trainable(config["trainable_groups"])
    return model


def read_student(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(weights, config)`` of a student folder (``config.json`` + ``weights.safetensors``): the exported student
    or one of its epoch snapshots."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for required in (config_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(
                f"{required} not found: a student folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                f"(written by the student_distillation pipeline)"
            )
    return load_tensors(weights_path), json.loads(config_path.read_text())


def write_student(folder: str | os.PathLike, weights: Mapping[str, Any], config: Mapping[str, Any]) -> Path:
    """Write a student folder atomically: both files go to a temporary sibling folder that then replaces
    ``folder``, so a reader (or a run killed mid-write) sees the old student or the new one, never a mix."""
    import shutil
    import tempfile

    from ph_reg.io.files import save_tensors, write_json

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{folder.name}.*.tmp"):  # left by a writer killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        save_tensors(tmp / WEIGHTS_NAME, weights)
        write_json(tmp / CONFIG_NAME, dict(config))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the snapshot from co-workers
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.{os.getpid()}.old.tmp"
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_student(path: str | os.PathLike, device: str | None = None) -> DenseViT:
    """Load a distilled student from its folder (``config.json`` + ``weights.safetensors``), in eval mode: the
    exported student (``data/06_models/student``) or an epoch snapshot (``data/06_models/snapshots/epoch_030``)."""
    weights, config = read_student(path)
    model = build_student_from_config(config)
    load_trainable_state_dict(model, weights)
    model.eval()
    return model.to(device) if device else model


#: Snapshot folders are named ``epoch_<3-digit 1-based epoch>`` inside the snapshot folder.
SNAPSHOT_PREFIX = "epoch_"
SNAPSHOT_INDEX = "index.json"


def snapshot_name(epoch: int) -> str:
    return f"{SNAPSHOT_PREFIX}{epoch:03d}"


class StudentSnapshots:
    """The student kept after chosen epochs (``student_distillation.training.snapshot_every`` / ``snapshot_epochs``):
    ``<folder>/epoch_NNN/`` holds ``config.json`` + ``weights.safetensors`` like the exported student, so
    ``load_student`` reads either. ``config`` is the exported student's config; each snapshot adds its ``epoch``.
    Picklable (it travels to spawned DDP processes)."""

    def __init__(self, folder: str | os.PathLike, config: Mapping[str, Any]):
        self.folder, self.config = Path(folder), dict(config)

    def path(self, epoch: int) -> Path:
        return self.folder / snapshot_name(epoch)

    def save(self, epoch: int, weights: Mapping[str, Any]) -> Path:
        """Keep the student after 1-based ``epoch`` (written atomically)."""
        return write_student(self.path(epoch), weights, {**self.config, "epoch": epoch})

    def clear(self) -> None:
        """Remove the snapshots of an earlier run (a run that starts from its first epoch), nothing else."""
        import shutil

        for epoch in self.epochs():
            shutil.rmtree(self.path(epoch))

    def epochs(self) -> list[int]:
        """The epochs whose snapshot folder is complete."""
        if not self.folder.is_dir():
            return []
        found = []
        for child in self.folder.iterdir():
            number = child.name[len(SNAPSHOT_PREFIX):]
            if (child.name.startswith(SNAPSHOT_PREFIX) and number.isdigit() and (child / CONFIG_NAME).is_file()
                    and (child / WEIGHTS_NAME).is_file()):
                found.append(int(number))
        return sorted(found)

    def index(self) -> dict[str, Any]:
        """What the evaluation reads to find a snapshot by epoch (``evaluation.student_snapshot``)."""
        return {"folder": self.folder.as_posix(),
                "snapshots": {str(epoch): self.path(epoch).as_posix() for epoch in self.epochs()}}


def snapshot_folder(index: Mapping[str, Any], epoch: int | None, key: str = "evaluation.student_snapshot") -> Path:
    """The folder of the snapshot after ``epoch`` listed in a snapshot ``index``, with an error naming ``key``."""
    from ph_reg.config import ConfigError

    snapshots = index.get("snapshots", {})
    if epoch is None or str(epoch) not in snapshots:
        saved = sorted(int(e) for e in snapshots)
        raise ConfigError(key, epoch, f"null (the final student) or the epoch of a saved snapshot: {saved} in "
                                      f"{index.get('folder')} (student_distillation.training.snapshot_every and "
                                      f"snapshot_epochs choose them; rerun student_distillation to write others)")
    return Path(snapshots[str(epoch)])


def merged_state_dict(model: DenseViT) -> dict[str, Any]:
    """The full state dict of a student (base weights, distilled weights and registers), for use without ph_reg's
    delta format; keys are the DenseViT's parameter and buffer names."""
    return {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}


def export_merged(student_folder: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write the merged full state dict of the student in ``student_folder`` to ``output`` (safetensors), with the
    student config as metadata. Returns the output path."""
    from ph_reg.io.files import save_tensors

    folder = Path(student_folder)
    model = load_student(folder)
    config = (folder / CONFIG_NAME if folder.is_dir() else folder.parent / CONFIG_NAME).read_text()
    save_tensors(output, merged_state_dict(model), metadata={"ph_reg_student_config": config})
    return Path(output)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ph_reg.method.student STUDENT_FOLDER OUTPUT.safetensors``: export the merged full state dict."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("student_folder")
    parser.add_argument("output")
    args = parser.parse_args(argv)
    print(export_merged(args.student_folder, args.output))


if __name__ == "__main__":
    main()
