"""Errors the evaluators raise for bad input. Each renders as one line for the user."""

from pydantic import ValidationError


class EvaluatorError(Exception):
    """A task list or eval config that cannot be evaluated: `where` names the file or task, `field` the key."""

    def __init__(self, where: str, field: str, expected: str):
        self.where, self.field, self.expected = where, field, expected
        super().__init__(f"{where}: {field}: {expected}")

    @classmethod
    def from_validation(cls, where: str, err: ValidationError) -> "EvaluatorError":
        """The first pydantic error as one line: the dotted field path, what was expected and what came."""
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "<root>"
        got = "" if first["type"] == "missing" else f", got {first['input']!r}"
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        return cls(where, field, f"{first['msg']}{got}{more}")
