"""Errors the merge core raises for bad input. Each renders as one line for the user."""


class MergeCoreError(Exception):
    """Base of every user-facing merge-core error; str(err) is the whole one-line message."""


class RecipeError(MergeCoreError):
    """A recipe that cannot be merged: `where` is the file (or '<text>'), `field` a dotted path."""

    def __init__(self, where: str, field: str, expected: str):
        self.where, self.field, self.expected = where, field, expected
        super().__init__(f"{where}: {field}: {expected}")


class SourceError(MergeCoreError):
    """A source model that cannot be loaded or does not fit the others."""
