"""The shape of the library: no import cycle, no Kedro in the library, and `dvc.yaml` deps that cover what each
stage imports. The import graph is read from the source with `ast` (module-level and in-function imports alike)."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]
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


def _module_level(tree: ast.Module) -> list[ast.stmt]:
    """The import statements that run when the module is imported (top level, and inside top-level if/try)."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, (ast.If, ast.Try)):
            todo.extend(node.body + node.orelse + getattr(node, "finalbody", []) +
                        [s for h in getattr(node, "handlers", []) for s in h.body])
    return out


@cache
def imports_of(module: str) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(project modules that importing ``module`` runs, top-level external packages it imports, the project
    modules its import statements name).

    Imports inside functions count (a lazy import is still a dependency, and a lazy import that dodges a cycle is
    still a cycle), except in a package ``__init__``: there only the module-level imports count, since its lazy
    ``__getattr__`` imports (``ph_reg.load_student``) are the public API's door and run only when a user opens it,
    not whenever a submodule is imported. Importing ``a.b.c`` runs ``a`` and ``a.b`` first: those edges are added.
    """
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes = _module_level(tree) if path.name == "__init__.py" else list(ast.walk(tree))
    internal, external = set(), set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            # ``from a import b``: b is the module a.b when it is one, else a name that a's __init__ defines
            names = [f"{root}.{alias.name}" if f"{root}.{alias.name}" in MODULES else root for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "ph_reg":
                target = _resolve(name)
                if target is not None and target != module:
                    internal.add(target)
            else:
                external.add(name.split(".")[0])
    named = frozenset(internal)
    for target in named:
        parts = target.split(".")
        internal.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) != module)
    parts = module.split(".")  # a module's own parent packages run before it
    internal.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return frozenset(internal), frozenset(external), named


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
    """Depth-first search over the edges the import statements name (a package's ``__init__`` importing its
    children and the children running their parent first is how packages work, not a cycle)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(imports_of(module)[2]):
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
