"""What an evaluation needs: which lm-eval tasks and metrics, and how to run the model on them.

Everything lm-eval lets a user choose is a field here; nothing is hard-coded in the harness.
"""

import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError

from merge_core.errors import from_validation, shown

BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30}
BYTE_UNITS |= {"tib": 2**40}


def _bytes(value: Any) -> Any:
    """Sizes are bytes, or a number with a unit: '80GB', '141 GiB', '512MB'."""
    if not isinstance(value, str):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)\s*", value, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"expected bytes or a size like '80GB' or '141GiB', got {shown(value)}")
    return int(float(match[1]) * BYTE_UNITS[match[2].lower()])


Bytes = Annotated[int, BeforeValidator(_bytes), Field(gt=0)]


class _Strict(BaseModel):
    # Unknown keys are typos: reject them instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSpec(_Strict):
    task: str = Field(min_length=1)
    # None: the task's first metric. "name,filter" picks one of the task's filter pipelines (default: first).
    metric: str | None = None
    # None: lm-eval's own declaration for that metric.
    higher_is_better: bool | None = None
    # Items scored per candidate: a fixed subset drawn with EvalConfig.subset_seed. None: every item.
    limit: PositiveInt | None = None
    # Items of that seeded order to skip first: a spec with offset N never shares an item with the spec of
    # limit N (the search's fitness items), e.g. for a selection split on the same task.
    offset: NonNegativeInt = 0
    # Positions [start, stop) of those items in a second seeded order, for fitness rungs: the parts [0, a),
    # [a, b), ... are disjoint and a cheap rung's items are the first of every larger rung's. None: all of them.
    part: tuple[NonNegativeInt, PositiveInt] | None = None
    # None: the task's own setting (0 when the task has none).
    num_fewshot: NonNegativeInt | None = None


class VLLMOptions(_Strict):
    gpu_memory_utilization: float = Field(0.8, gt=0, le=1)
    tensor_parallel_size: PositiveInt = 1
    max_model_len: PositiveInt | None = None
    enforce_eager: bool = False
    seed: int = 1234
    # The engine's KV cache, e.g. '1GiB' (vLLM's kv_cache_memory_bytes). None: vLLM's default, a share of the
    # GPU (gpu_memory_utilization), or on CPU what vLLM's CPU platform picks from free RAM (10 GiB measured here).
    kv_cache_memory: Bytes | None = None
    engine_args: dict[str, Any] = {}  # passed through to vllm.LLM


class EvalConfig(_Strict):
    backend: Literal["hf", "vllm"] = "hf"
    include_path: Path | None = None  # a directory of lm-eval task YAMLs
    # None: lm-eval's built-in tasks only when no include_path is given (indexing them costs ~7 s).
    include_defaults: bool | None = None
    batch_size: PositiveInt | Literal["auto"] = 64
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_gen_toks: PositiveInt | None = None  # None: each generative task's own setting
    gen_kwargs: dict[str, Any] = {}  # merged into every generative task's generation_kwargs
    apply_chat_template: bool = False  # the tokenizer's own template (model_args may pass chat_template_args)
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    model_args: dict[str, Any] = {}  # passed through to lm-eval's model class (HFLM or VLLM)
    subset_seed: int = 0
    fewshot_seed: int = 1234  # lm-eval's default
    confirm_run_unsafe_code: bool = False  # tasks that execute model-written code refuse to run without it
    # False: task data must already be on local disk (or in the HF datasets cache), so a missing dataset fails
    # at once with one line. True: fetch it from the hub, once, into the cache (needs network on every worker).
    download_data: bool = False
    vllm: VLLMOptions = VLLMOptions()

    @property
    def uses_defaults(self) -> bool:
        return self.include_path is None if self.include_defaults is None else self.include_defaults


Model = TypeVar("Model", bound=BaseModel)


def parse(model: type[Model], data: object, where: str) -> Model:
    """Validate `data` (e.g. a YAML mapping read from `where`) into `model`, or raise a one-line error."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise from_validation(err, where, model) from None
