"""The one user-facing error of evomerge, and the one translator from pydantic's errors to it.

merge_core, evaluators and search all raise `InputError` for bad input (a recipe, a config, a model path, a
run directory): it names the file, the field and what was expected, on one line. The CLI shows exactly this
type as that line with exit code 2; any other exception is an internal error, never blamed on the user.
It lives in merge_core because that is the bottom layer: the other packages may import it, it imports nothing.
"""

import re
from collections.abc import Mapping
from typing import Any, get_args

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo


class InputError(Exception):
    """Bad input: `where` is the file (or model, task, '<text>'), `field` a dotted path in it (or None when the
    whole thing is wrong), `expected` what was expected and what came. str(err) is the whole one-line message."""

    def __init__(self, where: str, field: str | None, expected: str):
        self.where, self.field, self.expected = str(where), field, " ".join(expected.split())
        super().__init__(f"{self.where}: {field}: {self.expected}" if field else f"{self.where}: {self.expected}")


class FieldProblem(ValueError):
    """Raised inside a pydantic validator to blame a sub-field (dotted, relative to the model being validated)."""

    def __init__(self, field: str, expected: str):
        self.field, self.expected = field, expected
        super().__init__(expected)


def shown(value: Any) -> str:
    """A value as an error message quotes it: its repr on one line, cut at 60 characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


# --- pydantic errors -> one line ---------------------------------------------------------------------

TYPE_PHRASES = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "string_pattern_mismatch": "a string matching {pattern}",
    "literal_error": "one of {expected}",
    "too_short": "at least {min_length} item(s)",
    "too_long": "at most {max_length} item(s)",
    "string_too_short": "a non-empty string",
}
BOUND_TYPES = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
BOUND_SYMBOLS = {
    annotated_types.Ge: (">=", "ge"),
    annotated_types.Gt: (">", "gt"),
    annotated_types.Le: ("<=", "le"),
    annotated_types.Lt: ("<", "lt"),
}
# pydantic names the union member it tried ('int', 'constrained-int', "literal['auto']") and dict keys
# ('[key]') in an error's location: not keys the user wrote.
UNION_TAG = re.compile(r"(constrained-)?(int|float|str|bool)|[\w-]+\[.*\]|\[key\]")


def from_validation(
    err: ValidationError, where: str, root: type[BaseModel], unknown_keys: Mapping[str, str] | None = None
) -> InputError:
    """The first problem of `err` (raised validating `root`) as one InputError line.

    Errors at the same place are the alternatives of one union ('an integer >= 1 or one of 'auto''): they are
    explained together, and the other places only counted. `unknown_keys` maps a key the user may plausibly
    write (one mergekit accepts, say) to what to tell them instead of "unknown key".
    """
    by_place: dict[tuple, list[dict]] = {}
    for error in err.errors(include_url=False):
        by_place.setdefault(tuple(p for p in error["loc"] if not _is_union_tag(p)), []).append(error)
    loc, alternatives = next(iter(by_place.items()))
    explained = [_explain(error, list(loc), root, unknown_keys or {}) for error in alternatives]
    field, expected = explained[0]
    if len(explained) > 1 and all(e.startswith("expected ") and ", got " in e for _, e in explained):
        phrases = [e.removeprefix("expected ").rsplit(", got ", 1)[0] for _, e in explained]
        expected = f"expected {' or '.join(dict.fromkeys(phrases))}, got {expected.rsplit(', got ', 1)[1]}"
    more = f" (and {len(by_place) - 1} more problem(s))" if len(by_place) > 1 else ""
    return InputError(where, field, expected + more)


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and UNION_TAG.fullmatch(part) is not None


def _path(loc: list) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "<top level>"


def _explain(error: dict, loc: list, root: type[BaseModel], unknown_keys: Mapping[str, str]) -> tuple[str, str]:
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    problem = ctx.get("error")
    if isinstance(problem, FieldProblem):
        joint = "" if problem.field.startswith("[") or not loc else "."
        return (_path(loc) if loc else "") + joint + problem.field, problem.expected
    if isinstance(problem, InputError):  # a nested file's own error (a task YAML, say) already says it all
        return _path(loc), str(problem)
    if kind == "value_error":
        return _path(loc), str(problem) if problem else error["msg"]
    if kind == "missing":
        return _path(loc), "expected a value, got nothing (this field is required)"
    if kind == "extra_forbidden":
        if loc and loc[-1] in unknown_keys:
            return _path(loc), unknown_keys[loc[-1]]
        model = _model_at(root, loc[:-1])
        allowed = ", ".join(model.model_fields) if model else "none"
        return _path(loc), f"unknown key; expected one of: {allowed}"
    if kind in BOUND_TYPES:
        phrase = "an integer" if int in _field_types(root, loc) else "a number"
    else:
        phrase = TYPE_PHRASES.get(kind, error["msg"]).format(**ctx)
    numeric = kind in BOUND_TYPES or kind.startswith(("int_", "float_"))
    return _path(loc), f"expected {phrase}{_bounds_of(root, loc) if numeric else ''}, got {shown(value)}"


def _model_at(root: type[BaseModel], loc: list) -> type[BaseModel] | None:
    """The model class found at `loc` below `root` (list indices and dict keys step into item types)."""
    model: Any = root
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        model = _inner_model(field.annotation) if field else None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _field_at(root: type[BaseModel], loc: list) -> FieldInfo | None:
    if not loc or isinstance(loc[-1], int):
        return None
    parent = _model_at(root, loc[:-1])
    return parent.model_fields.get(loc[-1]) if parent else None


def _field_types(root: type[BaseModel], loc: list) -> set:
    """Every type named in the field's annotation, through unions and Annotated."""
    field = _field_at(root, loc)
    found, pending = set(), [field.annotation] if field else []
    while pending:
        annotation = pending.pop()
        found.add(annotation)
        pending += get_args(annotation)
    return found


def _bounds_of(root: type[BaseModel], loc: list) -> str:
    """' >= 2' style suffix from the numeric constraints declared on the field at `loc`."""
    field = _field_at(root, loc)
    metadata = list(field.metadata) if field else []
    for arg in get_args(field.annotation) if field else ():  # constraints inside `Annotated[...] | None`
        for item in getattr(arg, "__metadata__", ()):
            metadata += getattr(item, "metadata", [item])
    parts = []
    for item in metadata:
        for kind, (symbol, attribute) in BOUND_SYMBOLS.items():
            if isinstance(item, kind):
                parts.append(f"{symbol} {getattr(item, attribute)}")
    return " " + " and ".join(parts) if parts else ""
