"""Evaluators: lm-eval scoring of live in-memory candidates. They know nothing of merging or search."""

from evaluators.config import EvalConfig, TaskSpec, VLLMOptions, parse
from evaluators.errors import EvaluatorError
from evaluators.harness import Evaluator, TaskScore, hf_lm

__all__ = ["EvalConfig", "Evaluator", "EvaluatorError", "TaskScore", "TaskSpec", "VLLMOptions", "hf_lm", "parse"]
