"""Tiny char-level Llama families built here: a base, one fine-tune per skill, lm-eval tasks for each skill."""

from evaluators.toy_family.build import DEFAULT_SKILLS, SIZES, Family, build_family, load_family
from evaluators.toy_family.scoring import accuracy, exact_match
from evaluators.toy_family.skills import SKILLS
from evaluators.toy_family.tokenizer import build_tokenizer

__all__ = [
    "DEFAULT_SKILLS",
    "SIZES",
    "SKILLS",
    "Family",
    "accuracy",
    "build_family",
    "build_tokenizer",
    "exact_match",
    "load_family",
]
