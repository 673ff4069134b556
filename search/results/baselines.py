"""The reference recipes a search must beat: each parent alone, mergekit's default recipes, and the simple
merges a user would tune by hand: one global knob or two per method, chosen on the SEARCH split.

Parents are scored through the same merge path as candidates (a one-model linear merge is the parent, bit for
bit), so every entry of the held-out table comes from the same code. A parent keeps its own vocabulary and
tokenizer; the merges carry the search's tokenizer setting, as its candidates do.
"""

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import yaml

from merge_core import Recipe
from search.config import MergeConfig
from search.genome.coarse import DENSITY_GRID

# Every grid point costs one evaluation on the search split, so the grids stay small (the README states them).
LAMBDA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SCALE_GRID = (0.5, 0.75, 1.0)
TUNED_SUFFIX = " (tuned on search)"
KNOB_LABELS = {"density": "d", "weight": "w", "lam": "λ"}  # task_vectors keyword -> how entry names show it


def parent(model: str) -> Recipe:
    return Recipe.from_dict({"merge_method": "linear", "models": [{"model": model, "parameters": {"weight": 1.0}}]})


def linear_average(children: list[str]) -> Recipe:
    models = [{"model": child, "parameters": {"weight": 1.0}} for child in children]
    return Recipe.from_dict({"merge_method": "linear", "models": models})


def task_vectors(
    method: str, base: str, children: list[str], weight: float = 1.0, density: float | None = None, lam: float = 1.0
) -> Recipe:
    """A task-arithmetic-family recipe with one weight (and density) for every fine-tune and one global λ."""
    shared = {"weight": weight} | ({} if density is None else {"density": density})
    models = [{"model": child, "parameters": dict(shared)} for child in children]
    recipe = {"merge_method": method, "base_model": base, "models": models}
    if lam != 1.0:
        recipe["parameters"] = {"lambda": lam}
    return Recipe.from_dict(recipe)


@dataclass(frozen=True)
class Family:
    """A method with global knobs (task_vectors keywords) and the grid its tuned baseline is chosen from."""

    label: str  # how its entries are named in the report
    method: str
    grid: Mapping[str, tuple[float, ...]]  # knob -> values; every combination is one grid point

    def name(self, knobs: Mapping[str, float]) -> str:
        return " ".join([self.label, *(f"{KNOB_LABELS[knob]}={value:g}" for knob, value in knobs.items())])

    def recipe(self, base: str, children: list[str], knobs: Mapping[str, float]) -> Recipe:
        return task_vectors(self.method, base, children, **knobs)

    def candidates(self, base: str, children: list[str]) -> dict[str, Recipe]:
        """Every grid point by name, in grid order (ties in fitness go to the first)."""
        points = [dict(zip(self.grid, values, strict=True)) for values in itertools.product(*self.grid.values())]
        return {self.name(knobs): self.recipe(base, children, knobs) for knobs in points}


TASK_ARITHMETIC = Family("task arithmetic", "task_arithmetic", {"lam": LAMBDA_GRID})
# TIES normalizes by the summed weights, so a weight shared by every fine-tune cancels out: λ is its scale.
TIES = Family("ties", "ties", {"density": DENSITY_GRID, "lam": SCALE_GRID})
# DARE-TIES does not normalize: the shared weight scales the merged task vector. Random drops use the search's seed.
DARE_TIES = Family("dare-ties", "dare_ties", {"density": DENSITY_GRID, "weight": SCALE_GRID})
TUNED = {family.method: family for family in (TASK_ARITHMETIC, TIES, DARE_TIES)}  # by baselines.tuned's names


def default_baselines(base: str, children: list[str]) -> dict[str, Recipe]:
    """What users start from: untuned, as mergekit's examples set them."""
    defaults = ((TIES, {"density": 0.5, "weight": 1.0}), (TASK_ARITHMETIC, {"lam": 1.0}))
    return {"linear average": linear_average(children)} | {
        family.name(knobs): family.recipe(base, children, knobs) for family, knobs in defaults
    }


def with_tokenizer(recipes: Mapping[str, Recipe], merge: MergeConfig | None, base: str) -> dict[str, Recipe]:
    """`recipes` carrying the search's tokenizer setting (merge.tokenizer_source / merge.tokenizer), if any."""
    if merge is None or merge.vocabulary_source is None:
        return dict(recipes)
    return {
        name: Recipe.from_dict(
            yaml.safe_load(recipe.to_yaml()) | merge.tokenizer_keys(None if recipe.base_model else base)
        )
        for name, recipe in recipes.items()
    }
