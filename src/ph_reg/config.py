"""Configuration primitives, a leaf of the library (it imports nothing of ph_reg): :class:`ConfigError`, the field
checks, and :func:`from_mapping`, the one way a frozen config dataclass is built from a YAML mapping with
unknown-key errors. The config dataclasses themselves live beside the code they configure; :mod:`ph_reg.params`
turns the YAML sections of a run into them and checks what ties the sections together.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A parameter with a value that is not allowed; ``key`` is its dotted path in the configuration. ``reason``
    (when given) replaces the "got ...; allowed: ..." wording: a typed config's own message."""

    def __init__(self, key: str, value: Any, allowed: str, reason: str | None = None):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"invalid parameter {key}: {reason}" if reason is not None else
                         f"invalid parameter {key}: got {value!r}; allowed: {allowed}")


# --- field checks ------------------------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(key: str, value: Any, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise ConfigError(key, value, f"an integer >= {minimum}")
    return value


def _optional_int(key: str, value: Any, minimum: int) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < minimum:
        raise ConfigError(key, value, f"an integer >= {minimum}, or null")
    return value


def _number(key: str, value: Any, low: float, high: float, closed: bool = True) -> float:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    inside = numeric and (low <= value <= high if closed else low < value < high)
    if not inside:
        interval = f"[{low}, {high}]" if closed else f"the open interval ({low}, {high})"
        raise ConfigError(key, value, f"a number in {interval}")
    return float(value)


def _choice(key: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ConfigError(key, value, f"one of {list(choices)}")
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value


def _device(key: str, value: Any) -> str:
    if value == "auto":
        return value
    import torch  # only here: the rest of this leaf needs no torch

    try:
        torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(key, value, "'auto' or a torch device such as 'cpu', 'cuda' or 'cuda:1'") from None
    return value


def _known_keys(section: str, values: Mapping[str, Any], known: Sequence[str]) -> None:
    """Every key of ``values`` is one of ``known``, else a ConfigError naming the dotted key and the close match
    (``section`` "": the top level of the parameters)."""
    if not isinstance(values, Mapping):
        raise ConfigError(section, values, "a mapping of parameters")
    unknown = sorted(set(values) - set(known), key=str)
    if unknown:
        where = f"{section}." if section else ""
        hints = {k: difflib.get_close_matches(str(k), known, 1) for k in unknown}
        did_you_mean = "; ".join(f"{where}{k}: did you mean {v[0]!r}?" for k, v in hints.items() if v)
        raise ConfigError(f"{where}{unknown[0]}" if len(unknown) == 1 else section or "(top level)", unknown,
                          f"the keys {sorted(known)}" + (f" ({did_you_mean})" if did_you_mean else ""))


def _typed(key: str, values: Any, build: Callable[[], T], fields: Sequence[str] = ()) -> T:
    """``build()``: a typed config's own validation (its ``from_dict`` or constructor), its error re-raised as a
    ConfigError naming the dotted ``key``, or ``key.<field>`` for the first of ``fields`` its message names."""
    try:
        return build()
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        message = str(error)
        named = sorted((m.start(), name) for name in fields
                       if (m := re.search(rf"(?<!\w){re.escape(name)}\b", message)))
        if named and isinstance(values, Mapping):
            name = named[0][1]
            raise ConfigError(f"{key}.{name}", values.get(name), message, reason=message) from None
        raise ConfigError(key, values, message, reason=message) from None


# --- typed configs from mappings ------------------------------------------------------------------------------

#: ``field(metadata=...)`` builders for :func:`from_mapping`: each returns ``{"check": fn}`` where ``fn(key, value)``
#: returns the accepted value or raises a ConfigError naming ``key``.
def at_least(minimum: int) -> dict[str, Any]:
    return {"check": lambda key, value: _int(key, value, minimum)}


def optional_at_least(minimum: int) -> dict[str, Any]:
    return {"check": lambda key, value: _optional_int(key, value, minimum)}


def number_in(low: float, high: float, closed: bool = True) -> dict[str, Any]:
    return {"check": lambda key, value: _number(key, value, low, high, closed)}


def one_of(choices: Sequence[Any]) -> dict[str, Any]:
    return {"check": lambda key, value: _choice(key, value, choices)}


def boolean() -> dict[str, Any]:
    return {"check": _bool}


def device() -> dict[str, Any]:
    return {"check": _device}


def from_mapping(cls: type[T], values: Any, section: str) -> T:
    """The one way a frozen config dataclass is built from configuration values.

    ``values`` None gives the defaults and an instance of ``cls`` is returned as it is. Otherwise ``values`` must be
    a mapping whose keys are fields of ``cls`` (an unknown key is refused with the close match); a field whose
    metadata has ``"check"`` (see :func:`at_least` and its siblings) is checked by it, and a field whose default is
    a dataclass is built from its sub-mapping the same way. The class's own ``__post_init__`` checks run last; their
    TypeError or ValueError becomes a ConfigError naming ``<section>.<field>`` for the first field its message
    names. Every error names the dotted key ``<section>.<field>``.
    """
    if values is None:
        return cls()
    if isinstance(values, cls):
        return values
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _known_keys(section, values, list(fields))
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        spec, key = fields[name], f"{section}.{name}"
        nested = spec.default_factory if spec.default_factory is not dataclasses.MISSING else None
        if nested is not None and dataclasses.is_dataclass(nested):
            value = from_mapping(nested, value, key)
        elif "check" in spec.metadata:
            value = spec.metadata["check"](key, value)
        kwargs[name] = value
    return _typed(section, values, lambda: cls(**kwargs), list(fields))


