"""evomerge's merge core: mergekit-compatible recipes merged in memory from resident sources."""

from merge_core.errors import InputError
from merge_core.recipe import Recipe
from merge_core.session import MergeSession

__all__ = ["InputError", "MergeSession", "Recipe"]
