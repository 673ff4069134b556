"""The reference recipes a search must beat: each parent alone and mergekit's default recipes.

Parents are scored through the same merge path as candidates (a one-model linear merge is the parent, bit for
bit), so every entry of the held-out table comes from the same code.
"""

from merge_core import Recipe

LAMBDA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def parent(model: str) -> Recipe:
    return Recipe.from_dict({"merge_method": "linear", "models": [{"model": model, "parameters": {"weight": 1.0}}]})


def linear_average(children: list[str]) -> Recipe:
    models = [{"model": child, "parameters": {"weight": 1.0}} for child in children]
    return Recipe.from_dict({"merge_method": "linear", "models": models})


def ties_default(base: str, children: list[str]) -> Recipe:
    """mergekit's usual TIES recipe: density 0.5, weight 1 for every fine-tune."""
    models = [{"model": child, "parameters": {"weight": 1.0, "density": 0.5}} for child in children]
    return Recipe.from_dict({"merge_method": "ties", "base_model": base, "models": models})


def task_arithmetic(base: str, children: list[str], lam: float = 1.0) -> Recipe:
    models = [{"model": child, "parameters": {"weight": 1.0}} for child in children]
    recipe = {"merge_method": "task_arithmetic", "base_model": base, "models": models}
    if lam != 1.0:
        recipe["parameters"] = {"lambda": lam}
    return Recipe.from_dict(recipe)


def default_baselines(base: str, children: list[str]) -> dict[str, Recipe]:
    return {
        "linear average": linear_average(children),
        "ties d=0.5 w=1": ties_default(base, children),
        "task arithmetic λ=1": task_arithmetic(base, children),
    }
