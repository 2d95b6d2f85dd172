"""Prompt templates and class-name files for zero-shot open-vocabulary segmentation.

- Templates: the 80 OpenAI ImageNet prompt templates (``"a bad photo of a {}."`` ... ``"a tattoo of the {}."``),
  taken from ``open_clip.zero_shot_metadata`` and turned into ``str.format`` strings with one ``{}``.
- Class files (package data ``classnames/<benchmark>.txt``, SCLIP/NACLIP conventions which PH-Reg follows): one
  class per line in label-id order; a line may hold several comma-separated names (synonyms). Each name is one
  query mapped to its line's 0-based index; a class scores the max over its queries. VOC21 and COCO-Object expand
  the background (line 0) into 26 stuff words; COCO-Stuff and ADE20K keep SCLIP's concatenated names
  (``trafficlight``, ``chestofdrawers``).
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as _OPEN_CLIP_TEMPLATES

__all__ = [
    "BENCHMARKS",
    "OPENAI_IMAGENET_TEMPLATES",
    "format_prompts",
    "load_class_file",
    "parse_class_lines",
]

TEMPLATE_SLOT = "{}"
SYNONYM_SEPARATOR = ","
CLASSNAMES_DIR = "classnames"

# open_clip stores each template as a function of the class name; calling it with "{}" gives a format string
OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = tuple(template(TEMPLATE_SLOT) for template in _OPEN_CLIP_TEMPLATES)

# benchmark key -> (display name, number of classes); in the column order of the paper's Table 1
BENCHMARKS: dict[str, tuple[str, int]] = {
    "voc21": ("VOC21", 21),
    "context60": ("PC60", 60),
    "coco_object": ("Object", 81),
    "voc20": ("VOC20", 20),
    "context59": ("PC59", 59),
    "coco_stuff": ("Stuff", 171),
    "cityscapes": ("City", 19),
    "ade20k": ("ADE", 150),
}


def format_prompts(name: str, templates: Iterable[str] = OPENAI_IMAGENET_TEMPLATES) -> list[str]:
    """Every template filled with ``name``; each template must hold exactly one ``{}``."""
    prompts = []
    for template in templates:
        if not isinstance(template, str) or template.count(TEMPLATE_SLOT) != 1:
            raise ValueError(f"templates must be strings with exactly one '{{}}' slot, got {template!r}")
        prompts.append(template.format(name))
    if not prompts:
        raise ValueError("templates must not be empty")
    return prompts


def parse_class_lines(lines: Iterable[str]) -> tuple[list[str], list[int]]:
    """Class lines -> (queries, query_to_class): every comma-separated name is one query, mapped to the 0-based
    index of its line. Trailing blank lines are ignored; a blank line or an empty name elsewhere is an error."""
    lines = [line.strip() for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ValueError("class lines must hold at least one class, got none")
    queries: list[str] = []
    query_to_class: list[int] = []
    for index, line in enumerate(lines):
        names = [name.strip() for name in line.split(SYNONYM_SEPARATOR)]
        if not all(names):
            raise ValueError(f"class line {index} ({line!r}) has an empty name: expected comma-separated names")
        queries.extend(names)
        query_to_class.extend([index] * len(names))
    return queries, query_to_class


def load_class_file(benchmark: str) -> list[str]:
    """The class lines (one per class, synonyms comma-separated) of a benchmark key in :data:`BENCHMARKS`."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {sorted(BENCHMARKS)}, got {benchmark!r}")
    path = resources.files(__package__).joinpath(CLASSNAMES_DIR, f"{benchmark}.txt")
    if not path.is_file():
        raise FileNotFoundError(f"class file for {benchmark!r} not found at {path} (package data missing?)")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]
