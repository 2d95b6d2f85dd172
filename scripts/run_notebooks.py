"""Execute the analysis notebooks against a project's outputs (CI runs it after the default ``kedro run``).

    python scripts/run_notebooks.py                       # notebooks/*.ipynb on this project's data/
    python scripts/run_notebooks.py --project /path/to/project --env tiny --output-dir /tmp/executed

Each notebook runs in a fresh ``python3`` kernel of this interpreter with the project root as working directory
(where ``%load_ext kedro.ipython`` finds the project). Executed copies, outputs included, are written to
``--output-dir`` (default ``test-artifacts/notebooks/``, git-ignored); the committed notebooks are never modified.
Exits non-zero if any cell of any notebook fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
DEFAULT_OUTPUT_DIR = REPO_ROOT / "test-artifacts" / "notebooks"
KERNEL_NAME = "python3"
CELL_TIMEOUT_S = 600
# nothing phones home
OFFLINE_ENV = {"KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
               "DVC_DAEMON": "0"}


def notebook_paths(folder: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The analysis notebooks, in order (``01_...``, ``02_...``, ...)."""
    paths = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no notebooks matching NN_*.ipynb in {folder}")
    return paths


def kernel_env(env: str | None = None) -> dict[str, str]:
    """Environment of the kernel: this process's, offline, with this interpreter first on PATH and ``KEDRO_ENV``.

    ``MPLBACKEND`` is dropped (tests set it to Agg), so the kernel keeps its inline backend and figures are kept
    in the executed copies.
    """
    result = {**os.environ, **OFFLINE_ENV}
    result.pop("MPLBACKEND", None)
    result["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), result.get("PATH", "")])
    if env:
        result["KEDRO_ENV"] = env
    return result


def execute_notebook(path: Path, project: Path, output: Path | None = None, env: str | None = None,
                     inject: dict[str, str] | None = None, append: str | None = None,
                     timeout: int = CELL_TIMEOUT_S) -> nbformat.NotebookNode:
    """Execute the notebook at ``path`` with ``project`` as working directory and return it with its outputs.

    ``inject`` maps a cell tag (e.g. ``"parameters"``) to code run right after that cell (papermill's convention
    for overriding settings); ``append`` is code run after the last cell. The executed copy is written to ``output``
    (if given) even when a cell fails; a failing cell raises ``nbclient.exceptions.CellExecutionError``.
    """
    project = Path(project)
    if not (project / "pyproject.toml").is_file():
        raise FileNotFoundError(f"project={project} is not a Kedro project root (no pyproject.toml)")
    notebook = nbformat.read(path, as_version=4)
    for tag, source in (inject or {}).items():
        positions = [i for i, cell in enumerate(notebook.cells) if tag in cell.get("metadata", {}).get("tags", [])]
        if not positions:
            raise ValueError(f"inject names tag {tag!r}, but no cell of {path.name} has it")
        cell = nbformat.v4.new_code_cell(source)
        cell.metadata["tags"] = ["injected"]
        notebook.cells.insert(positions[0] + 1, cell)
    if append:
        cell = nbformat.v4.new_code_cell(append)
        cell.metadata["tags"] = ["injected"]
        notebook.cells.append(cell)
    client = NotebookClient(notebook, timeout=timeout, kernel_name=KERNEL_NAME,
                            resources={"metadata": {"path": str(project)}})
    try:
        client.execute(cwd=str(project), env=kernel_env(env))
    finally:
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(notebook, output)
    return notebook


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: notebooks/NN_*.ipynb)")
    parser.add_argument("--project", type=Path, default=REPO_ROOT, help="Kedro project root whose data/ is read")
    parser.add_argument("--env", default=None, help="Kedro configuration environment (KEDRO_ENV)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where executed copies go")
    parser.add_argument("--timeout", type=int, default=CELL_TIMEOUT_S, help="seconds allowed per cell")
    args = parser.parse_args(argv)

    failures = []
    for path in args.notebooks or notebook_paths():
        start = time.perf_counter()
        try:
            execute_notebook(path, args.project, args.output_dir / path.name, env=args.env, timeout=args.timeout)
        except CellExecutionError as error:
            failures.append(path.name)
            print(f"FAILED {path.name} after {time.perf_counter() - start:.1f} s:\n{error}", file=sys.stderr)
        else:
            print(f"ok     {path.name} in {time.perf_counter() - start:.1f} s -> {args.output_dir / path.name}")
    if failures:
        print(f"{len(failures)} notebook(s) failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
