"""Evaluators: lm-eval scoring of live in-memory candidates. They know nothing of search, and of merging only
the shared error type (merge_core.errors.InputError)."""

from evaluators.config import EvalConfig, TaskSpec, VLLMOptions, parse
from evaluators.harness import Evaluator, TaskScore, hf_lm

__all__ = ["EvalConfig", "Evaluator", "TaskScore", "TaskSpec", "VLLMOptions", "hf_lm", "parse"]
