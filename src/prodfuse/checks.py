"""Validation shared by the config objects: each failure is a ValueError naming the field, the value and the rule.

The bottom of the package: it imports nothing from prodfuse, so every stage may use it.
"""

from __future__ import annotations

import dataclasses
import math


def check_range(name: str, value, lo=None, hi=None, *, integer: bool = False, optional: bool = False) -> None:
    """`value` within [lo, hi] (either bound may be None); an int when `integer`; None allowed when `optional`."""
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        raise ValueError(f"{name} must be {kind}{_rule(lo, hi)}; got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be {kind}{_rule(lo, hi)}; got {value!r}")


def _rule(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def check_choice(name: str, value, choices, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}")


def comma_list(value) -> tuple[str, ...]:
    """("title", "description") from "title, description" (a flag or an older manifest) or from any sequence."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return tuple(value)


def blank_to_none(config, *names: str) -> None:
    """In a frozen config's __post_init__: "" means "no such column", as on the command line; store None."""
    for name in names:
        if getattr(config, name) == "":
            object.__setattr__(config, name, None)


def as_dict(config) -> dict:
    """A config's fields as plain JSON types (tuples become lists), for config.json and manifests."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def from_dict(cls, values: dict):
    """`cls(**values)` keeping only the fields `cls` has: old files with retired keys still load."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})
