"""The project's ``kedro run`` (also ``python -m ph_reg``): Kedro's own command, except that a run stopped by a user
error ends with that error's one-line message and a non-zero exit status instead of a traceback.

A user error is a mistake in the configuration, the data or the machine whose message names the parameter or file
and what to change (:data:`USER_ERRORS`): a bad parameter, a missing file or configuration environment, an image
source that cannot be prepared, a full disk, missing pretrained weights, a run stopped by SIGTERM. Every other
exception is a bug and keeps its full traceback. Kedro's log keeps its usual lines (which node failed, and how to
resume the run) above the message.

``kedro export`` (also ``python -m ph_reg export``) writes a distilled student for plain timm or the Hugging Face
Hub (:mod:`ph_reg.method.export`).

Kedro reads the ``cli`` group of this module for every ``kedro`` command of the project, and its commands take
precedence over Kedro's built-in ones. It imports nothing heavy (``kedro viz`` starts fast).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import click
from kedro.framework.cli.project import run as kedro_run
from kedro.io import DatasetError

#: The exception classes (module and qualified name, so that recognising them imports nothing) whose message is
#: the whole story; their subclasses count too. tests/integration/test_workflow_robust.py checks that each one exists.
USER_ERRORS = frozenset({
    "ph_reg.config.ConfigError",                      # invalid parameter <key>: got <value>; allowed: ...
    "builtins.FileNotFoundError",                     # a configured path, a store or a weights file that is missing
    "kedro.config.abstract_config.MissingConfigException",  # e.g. a misspelt --env
    "ph_reg.data.sources.ImageSourceError",                  # no usable image; a bad file under on_error: raise
    "ph_reg.io.files.WriteError",                     # cannot write <file>: [Errno 28] No space left on device
    "ph_reg.runtime.Interrupted",                     # stopped by SIGTERM, finished work saved; rerun to resume
    "ph_reg.method.train.NonFiniteBatchesError",             # too many non-finite batches: lower the learning rate
    "ph_reg.method.checkpoint.ResumeMismatchError",          # resume with settings that differ from the checkpoint's
    "ph_reg.models.backbone.WeightsUnavailableError",  # no network and no cached or local weights
})


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def user_error(error: BaseException) -> BaseException | None:
    """The user error that ``error`` reports, or None if it is a bug. A Kedro ``DatasetError`` (a dataset's load or
    save failed) reports the error that caused it."""
    while error is not None:
        if any(_class_name(cls) in USER_ERRORS for cls in type(error).__mro__):
            return error
        error = error.__cause__ if isinstance(error, DatasetError) else None
    return None


def one_line_user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command's callback: a user error becomes a ``click.ClickException`` (``Error: <message>`` on stderr,
    exit status 1); anything else propagates unchanged, with its traceback."""

    @functools.wraps(command)
    def run_reporting_user_errors(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except Exception as error:
            cause = user_error(error)
            if cause is None:
                raise
            message = " ".join(str(cause).split())  # one line, however the message was wrapped
            raise click.ClickException(message) from error

    return run_reporting_user_errors


run = copy.copy(kedro_run)  # same name, options and help as Kedro's `kedro run`
run.callback = one_line_user_errors(kedro_run.callback)


@click.group(name="ph-reg")
def cli() -> None:
    """Project commands (Kedro's own ones, with user errors reported in one line)."""


cli.add_command(run)


@cli.command(name="export")
@click.argument("student", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["timm", "hub"]), default="hub", show_default=True,
              help="timm: a folder timm.create_model('local-dir:<out>', pretrained=True) loads; hub: that plus the "
                   "ph-reg student (ph_reg/) and a model card, ready for huggingface_hub.upload_folder")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="the folder to write (replaced)")
@click.option("--img-size", type=int, default=None,
              help="the resolution whose positional table is exported (exact there); default: the training one")
@click.option("--metrics", type=click.Path(exists=True, dir_okay=False), default=None,
              help="a JSON file of measured metrics for the model card, e.g. data/08_reporting/summary.json")
@one_line_user_errors
def export(student: str, fmt: str, out: str, img_size: int | None, metrics: str | None) -> None:
    """Export the distilled student in STUDENT (a folder with config.json + weights.safetensors, e.g.
    data/06_models/student) for use without ph-reg: plain timm, or a Hugging Face Hub folder."""
    from ph_reg.method.export import export as export_student

    click.echo(export_student(student, out, fmt, img_size=img_size, metrics=metrics))
