"""The toy skills: each maps a prompt `pfx:input=` to one exact answer.

Every skill has its own prefix so a merged model can tell them apart, and all answers use the same
characters as the prompts so the skills compete for the same embeddings (merging them is not trivial).
`base_share` is the skill's weight in the base's pretraining mix, relative to the copy task's 1.0: enough
for the base to learn the format and a little of the skill, not enough to master it.
"""

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Skill:
    name: str
    base_share: float
    make: Callable[[random.Random], tuple[str, str]]  # rng -> (input, answer), both without the prefix

    def sample(self, rng: random.Random) -> tuple[str, str]:
        """One (prompt, answer) pair; the prompt ends with '=' so the answer follows directly."""
        text, answer = self.make(rng)
        return f"{self.name}:{text}=", answer


def _letters(rng: random.Random, low: int = 6, high: int = 12, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}+{b}", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    text = _letters(rng)
    return text, text[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    text = _letters(rng)
    return text, "".join(sorted(text))


def _caesar(rng: random.Random) -> tuple[str, str]:
    text = _letters(rng)
    return text, "".join(LETTERS[(LETTERS.index(ch) + 3) % 26] for ch in text)


def _dedupe(rng: random.Random) -> tuple[str, str]:
    # A small alphabet makes repeats common; the answer keeps each letter's first occurrence.
    text = _letters(rng, alphabet=LETTERS[: rng.randint(4, 10)])
    return text, "".join(dict.fromkeys(text))


def _digits(rng: random.Random) -> tuple[str, str]:
    text = _letters(rng, alphabet=LETTERS[:10])
    return text, "".join(str(LETTERS.index(ch)) for ch in text)


def _swap_pairs(rng: random.Random) -> tuple[str, str]:
    text = "".join(rng.choice(LETTERS) for _ in range(2 * rng.randint(3, 6)))
    return text, "".join(text[i + 1] + text[i] for i in range(0, len(text) - 1, 2))


def _rotate(rng: random.Random) -> tuple[str, str]:
    text = _letters(rng)
    return text, text[1:] + text[0]


SKILLS: dict[str, Skill] = {
    skill.name: skill
    for skill in (
        Skill("add", 0.05, _add),
        Skill("rev", 0.01, _reverse),
        Skill("srt", 0.04, _sort),
        Skill("cae", 0.003, _caesar),
        Skill("ddp", 0.02, _dedupe),
        Skill("dig", 0.003, _digits),
        Skill("swp", 0.005, _swap_pairs),
        Skill("rot", 0.003, _rotate),
    )
}


# The generic format task the base is mostly trained on: copying teaches "read after ':', answer after '='".
def _copy(rng: random.Random) -> tuple[str, str]:
    text = _letters(rng, 3, 12, LETTERS + string.digits)
    return text, text


COPY = Skill("cpy", 1.0, _copy)
