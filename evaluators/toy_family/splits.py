"""Fixed evaluation splits per skill, and the training streams that never show them.

Splits depend only on (skill, split_seed), never on the model seed or on which other skills a family has,
so every family built with one split seed is scored on the same items.
"""

import random
from collections.abc import Iterator, Sequence

from evaluators.toy_family.skills import Skill

Item = tuple[str, str]  # (prompt, answer)


def make_splits(skill: Skill, *, n_search: int, n_test: int, split_seed: int) -> dict[str, list[Item]]:
    """Disjoint 'search' and 'test' items of one skill: distinct prompts, the first n_search go to search."""
    rng = random.Random(f"{split_seed}:{skill.name}")
    items: dict[str, str] = {}
    for _ in range(100 * (n_search + n_test)):
        if len(items) == n_search + n_test:
            break
        prompt, answer = skill.sample(rng)
        items.setdefault(prompt, answer)
    else:
        raise ValueError(f"skill {skill.name!r}: cannot draw {n_search + n_test} distinct prompts")
    pairs = list(items.items())
    return {"search": pairs[:n_search], "test": pairs[n_search:]}


def training_stream(mix: Sequence[tuple[Skill, float]], held_out: frozenset[str], rng: random.Random) -> Iterator[Item]:
    """Endless (prompt, answer) pairs drawn from `mix` (skill, weight), skipping every held-out prompt."""
    skills, weights = zip(*mix, strict=True)
    while True:
        (skill,) = rng.choices(skills, weights)
        prompt, answer = skill.sample(rng)
        if prompt not in held_out:
            yield prompt, answer
