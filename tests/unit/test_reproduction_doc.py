"""docs/reproduction.md cannot drift from conf/paper and conf/paper_dinov2.

Every row of its settings tables names a dotted parameter key (``*`` matches one level; a key may name a whole
section, whose value is then compared whole), its value in each paper environment and the official source. ``-``
means absent from that environment; ``n/a`` means present but not used there (a conf/base benchmark that the paper
configuration does not run). The test resolves both environments as Kedro does, checks every row's values, and
checks that every setting of both environments is covered by some row.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml
from kedro.config import OmegaConfigLoader

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reproduction.md"
ENVS = ("paper", "paper_dinov2")
HEADER = "| setting | conf/paper | conf/paper_dinov2 | official source |"
ABSENT, UNUSED = "-", "n/a"
#: settings the issue names: a row for each must exist (the table may not silently lose them)
REQUIRED = (
    "student_distillation.targets", "teacher_denoising.mode", "student_distillation.training.weight_decay",
    "student_distillation.training.lr", "student_distillation.training.lr_end", "data_preparation.val_fraction",
    "evaluation.zero_shot.heads", "evaluation.probes.tasks.segmentation.voc21.train",
)


def resolved(env: str) -> dict[str, Any]:
    from ph_reg.settings import CONFIG_LOADER_ARGS, CONFIG_LOADER_CLASS

    loader = CONFIG_LOADER_CLASS(str(ROOT / "conf"), env=env, **CONFIG_LOADER_ARGS)
    assert isinstance(loader, OmegaConfigLoader)
    return loader["parameters"]


def leaves(values: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for every leaf (lists are leaves)."""
    if isinstance(values, dict) and values:
        out = {}
        for key, value in values.items():
            out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: values}


def doc_rows() -> list[tuple[str, list[Any], str]]:
    text = DOC.read_text()
    assert HEADER in text, f"{DOC} has no settings table starting with {HEADER!r}"
    rows = []
    for block in text.split(HEADER)[1:]:
        for line in block.splitlines()[2:]:  # skip the header's separator row
            if not line.startswith("|"):
                break
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            assert len(cells) >= 4, f"row {line!r} needs a key, two values and a source"
            key = cells[0].strip("`")
            values = [cell if cell in (ABSENT, UNUSED) else yaml.safe_load(cell.strip("`")) for cell in cells[1:3]]
            rows.append((key, values, cells[3]))
    return rows


def matches(key: str, pattern: str) -> bool:
    parts, wanted = key.split("."), pattern.split(".")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))


def covers(key: str, pattern: str) -> bool:
    """``pattern`` names ``key`` or a section above it."""
    parts = key.split(".")
    return any(matches(".".join(parts[:n]), pattern) for n in range(1, len(parts) + 1))


def lookup(values: dict[str, Any], pattern: str) -> dict[str, Any]:
    """Every key (section or leaf) of ``values`` that ``pattern`` matches, with its value."""
    found: dict[str, Any] = {}

    def walk(node: Any, prefix: list[str], rest: list[str]) -> None:
        if not rest:
            found[".".join(prefix)] = node
        elif isinstance(node, dict):
            for key, sub in node.items():
                if fnmatch.fnmatchcase(str(key), rest[0]):
                    walk(sub, [*prefix, str(key)], rest[1:])

    walk(values, [], pattern.split("."))
    return found


@pytest.fixture(scope="module")
def settings() -> dict[str, dict[str, Any]]:
    return {env: resolved(env) for env in ENVS}


def test_every_row_equals_the_resolved_configuration(settings) -> None:
    rows = doc_rows()
    assert rows
    for key, values, source in rows:
        assert source, f"docs/reproduction.md: {key} names no source"
        for env, expected in zip(ENVS, values):
            found = lookup(settings[env], key)
            if expected == ABSENT:
                assert not found, f"docs/reproduction.md says {key} is absent from conf/{env}, but it holds {found}"
                continue
            assert found, f"docs/reproduction.md: {key} matches no setting of conf/{env}"
            if expected == UNUSED:
                continue
            for k, v in found.items():
                assert v == expected, f"docs/reproduction.md: {key} is {expected!r} there, but conf/{env} has {k}={v!r}"


def test_every_setting_of_the_paper_configurations_has_a_row(settings) -> None:
    patterns = [key for key, _, _ in doc_rows()]
    for env in ENVS:
        missing = [k for k in leaves(settings[env]) if not any(covers(k, p) for p in patterns)]
        assert not missing, f"settings of conf/{env} without a row in docs/reproduction.md: {missing}"


def test_the_issue_settings_have_rows() -> None:
    keys = {key for key, _, _ in doc_rows()}
    assert not [k for k in REQUIRED if k not in keys]


def test_the_checker_sees_sections_and_wildcards(settings) -> None:
    """The helpers above find what they must (guards against a checker that compares nothing)."""
    paper = settings["paper"]
    assert lookup(paper, "student_distillation.training.lr") == {"student_distillation.training.lr": 3.0e-4}
    section = lookup(paper, "evaluation.zero_shot.benchmarks.voc21.settings")
    assert section["evaluation.zero_shot.benchmarks.voc21.settings"]["short_side"] == 448
    assert len(lookup(paper, "evaluation.probes.tasks.*.synthetic")) == 2
    assert covers("evaluation.planted.low_cosine", "evaluation.planted")
    assert not covers("evaluation.planted_x", "evaluation.planted")
