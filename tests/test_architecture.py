"""The shape of the library: no import cycle, no Kedro in the library, and `dvc.yaml` deps that cover what each
stage imports. The import graph is read from the source with `ast` (module-level and in-function imports alike)."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SRC = PROJECT_ROOT / "src"
PACKAGE = SRC / "ph_reg"
#: The Kedro project shell: the only modules that may import kedro (the library below them never does).
KEDRO_SHELL = ("ph_reg.settings", "ph_reg.pipeline_registry", "ph_reg.hooks", "ph_reg.kedro_datasets",
               "ph_reg.cli", "ph_reg.__main__", "ph_reg.pipelines")


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


MODULES = module_files()


def _resolve(name: str) -> str | None:
    """The module of the project that ``name`` (a module or a name inside one) refers to, or None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


@cache
def imports_of(module: str) -> tuple[frozenset[str], frozenset[str]]:
    """(project modules imported by ``module``, top-level external packages it imports)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    internal, external = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            names = [root] + [f"{root}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "ph_reg":
                target = _resolve(name)
                if target is not None and target != module:
                    internal.add(target)
            else:
                external.add(name.split(".")[0])
    # importing a.b.c runs a/__init__ and a/b/__init__ first
    for target in list(internal):
        parts = target.split(".")
        internal.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) != module)
    return frozenset(internal), frozenset(external)


def closure(roots: list[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(imports_of(module)[0])
    return seen


def test_the_import_graph_has_no_cycle():
    """Depth-first search over every import edge, package __init__ -> child edges included."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(imports_of(module)[0]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module)


def test_the_library_never_imports_kedro():
    offenders = [module for module in MODULES
                 if not any(module == shell or module.startswith(shell + ".") for shell in KEDRO_SHELL)
                 and "kedro" in imports_of(module)[1]]
    assert not offenders, f"library modules that import kedro: {offenders}"


def test_config_is_a_leaf():
    """ph_reg.config (errors, field checks, dataclass-from-mapping) imports nothing of the project."""
    assert imports_of("ph_reg.config")[0] <= {"ph_reg"}, imports_of("ph_reg.config")[0]


def _stage_roots(stage: dict) -> list[str]:
    """What `kedro run` of a stage imports and runs: the project shell and the stage's pipelines."""
    cmd = stage["cmd"]
    pipelines = cmd.split("--pipelines")[1].split()[0].split(",")
    return ["ph_reg.settings", "ph_reg.kedro_datasets", "ph_reg.hooks",
            *(f"ph_reg.pipelines.{name}.nodes" for name in pipelines),
            *(f"ph_reg.pipelines.{name}.pipeline" for name in pipelines)]


def test_each_dvc_stage_depends_on_every_module_it_imports():
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    assert stages
    for name, stage in stages.items():
        deps = [dep for dep in stage["deps"] if dep.startswith("src/")]
        missing = []
        for module in sorted(closure(_stage_roots(stage))):
            path = MODULES[module].relative_to(PROJECT_ROOT).as_posix()
            if not any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps):
                missing.append(path)
        assert not missing, f"dvc.yaml stage {name!r} imports modules its deps do not cover: {missing}"
