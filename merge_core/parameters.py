"""Parameter values as recipes write them, and their resolution for one tensor, by mergekit 0.1.5's rules.

A value is a scalar (number or true/false), a gradient (numbers interpolated over a slice's depth), or a
filter list (`[{filter: substr, value: ...}, {value: ...}]`, first matching entry wins; its value may be a
gradient). Values are parsed into one canonical form, so a recipe read back from its own YAML is equal to it.
"""

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from merge_core.methods.spec import Param

Scalar = float | bool
Gradient = tuple[float, ...]

# A number PyYAML left as a string: YAML 1.1 needs a dot and a signed exponent, so `1e-3` arrives as "1e-3".
NUMERIC_STRING = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass(frozen=True)
class Filtered:
    """One entry of a filter list: applies to tensors whose name contains `filter` (None: every tensor)."""

    filter: str | None
    value: Scalar | Gradient
    # Some recipes name tensors with `pattern:`, a key mergekit 0.1.5 drops unread: such an entry matches by its
    # filter alone, or every tensor without one. Kept only to write the recipe back as read and to warn about it.
    pattern: str | None = None


ParameterValue = Scalar | Gradient | tuple[Filtered, ...]

VALUE_FORMS = "a number, true/false, a gradient list of numbers, or a filter list [{filter: ..., value: ...}]"


def _number(raw: object) -> float:
    if isinstance(raw, str) and NUMERIC_STRING.fullmatch(raw):
        raw = float(raw)
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ValueError(f"expected a number, got {raw!r}")
    if not math.isfinite(raw):
        raise ValueError(f"expected a finite number, got {raw!r}")
    return float(raw)


def _scalar_or_gradient(raw: object) -> Scalar | Gradient:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, list):
        if not raw:
            raise ValueError("expected a gradient with at least one number, got []")
        return tuple(_number(item) for item in raw)
    return _number(raw)


def _filtered(raw: object, index: int) -> Filtered:
    if not isinstance(raw, dict):
        raise ValueError(f"entry {index}: expected {{filter: substring, value: ...}}, got {raw!r}")
    unknown = sorted(set(raw) - {"filter", "value", "pattern"}, key=str)
    if unknown:
        raise ValueError(f"entry {index}: unknown key {unknown[0]!r}; expected filter and value")
    if "value" not in raw:
        raise ValueError(f"entry {index}: missing value")
    name_filter = raw.get("filter")
    if name_filter is not None and (not isinstance(name_filter, str) or not name_filter):
        raise ValueError(
            f"entry {index}: filter: expected a non-empty substring of tensor names (omit it to match all)"
        )
    pattern = raw.get("pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise ValueError(
            f"entry {index}: pattern: expected a string (mergekit ignores it: prefer filter), got {pattern!r}"
        )
    try:
        value = _scalar_or_gradient(raw["value"])
    except ValueError as error:
        raise ValueError(f"entry {index}: value: {error}") from None
    return Filtered(name_filter, value, pattern)


def parse_value(raw: object) -> ParameterValue:
    """Canonical form of a value as YAML gives it; ValueError with the expected forms otherwise."""
    if isinstance(raw, dict):  # mergekit also takes a single {filter, value} entry without the list
        raw = [raw]
    if isinstance(raw, list) and raw and any(isinstance(item, dict) for item in raw):
        return tuple(_filtered(item, index) for index, item in enumerate(raw))
    if not isinstance(raw, bool | int | float | list) and not (isinstance(raw, str) and NUMERIC_STRING.fullmatch(raw)):
        raise ValueError(f"expected {VALUE_FORMS}, got {raw!r}")
    return _scalar_or_gradient(raw)


def dump_value(value: ParameterValue) -> object:
    """Plain YAML data that `parse_value` reads back to `value`."""
    if isinstance(value, tuple) and value and isinstance(value[0], Filtered):
        entries = []
        for entry in value:
            data = {} if entry.filter is None else {"filter": entry.filter}
            if entry.pattern is not None:
                data["pattern"] = entry.pattern
            data["value"] = list(entry.value) if isinstance(entry.value, tuple) else entry.value
            entries.append(data)
        return entries
    return list(value) if isinstance(value, tuple) else value


def kind_error(value: ParameterValue, param: Param) -> str | None:
    """Why `value` does not fit `param` (a true/false switch or a number), or None when it does."""
    leaves = [entry.value for entry in value] if _is_filter_list(value) else [value]
    if is_switch(param):
        if not all(isinstance(leaf, bool) for leaf in leaves):
            return "expected true or false (or a filter list of them)"
    elif any(isinstance(leaf, bool) for leaf in leaves):
        return "expected a number, a gradient list of numbers, or a filter list of them, not true/false"
    return None


def pattern_entries(value: ParameterValue) -> list[tuple[int, Filtered]]:
    """The filter entries of `value` that carry the `pattern:` key mergekit ignores, with their indices."""
    return [(i, entry) for i, entry in enumerate(value) if entry.pattern is not None] if _is_filter_list(value) else []


def is_switch(param: Param) -> bool:
    return isinstance(param.default, bool)


def _is_filter_list(value: ParameterValue) -> bool:
    return isinstance(value, tuple) and bool(value) and isinstance(value[0], Filtered)


def gradient_at(values: Gradient, t: float) -> float:
    # Same expression as mergekit, so the float result is bit-identical.
    position = t * (len(values) - 1)
    low = int(position)
    high = min(len(values) - 1, low + 1)
    fraction = position - low
    return (1 - fraction) * values[low] + fraction * values[high]


def value_at(value: ParameterValue, tensor_name: str, t: float) -> Scalar | None:
    """The value for one tensor at depth t, or None when a filter list has no entry for this tensor."""
    if _is_filter_list(value):
        for entry in value:
            # Plain substring match; "*" is the spelled-out catch-all.
            if entry.filter in (None, "*") or entry.filter in tensor_name:
                return value_at(entry.value, tensor_name, t)
        return None
    return gradient_at(value, t) if isinstance(value, tuple) else value


def resolve(
    name: str, scopes: Iterable[Mapping[str, ParameterValue] | None], tensor_name: str, t: float
) -> Scalar | None:
    """The first value that applies, walking `scopes` from highest precedence down; None if none does."""
    for scope in scopes:
        if scope and name in scope:
            value = value_at(scope[name], tensor_name, t)
            if value is not None:
                return value
    return None
