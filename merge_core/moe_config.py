"""mergekit-moe's config format (mergekit 0.1.5): a base model, experts with routing prompts, a gate mode.

Keys mergekit-moe reads are validated and used. Keys it ignores (its models take any extra key silently) are
accepted with a one-line warning each. `shared_experts` and `architecture` other than Mixtral select mergekit's
Qwen / DeepSeek outputs, which evomerge does not build: refused in one line.
"""

import logging
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, model_validator

from merge_core.errors import FieldProblem, InputError, from_validation
from merge_core.lora import split_lora
from merge_core.recipe import DTypeName, ModelRef, Recipe, read_yaml

logger = logging.getLogger(__name__)

# hidden and hidden_last route by each layer's input at the prompts' last token, hidden_avg by its mean over the
# positions; cheap_embed by the mean token embedding; random and uniform_random draw the router, prompts unused.
GateMode = Literal["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random"]
RANDOM_MODES = ("random", "uniform_random")
OUTPUT_ARCHITECTURE = "mixtral"


class _Lenient(BaseModel):
    # extra="allow": mergekit-moe ignores unknown keys, so a guide's config with one must still build (warned).
    model_config = ConfigDict(extra="allow", frozen=True)


class Expert(_Lenient):
    source_model: ModelRef
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None  # Gaussian noise of this std added to the expert's MLP weights
    residual_scale: float | None = None  # down_proj (the MLP's output) multiplied by this


class MoEConfig(_Lenient):
    base_model: ModelRef
    experts: list[Expert] = Field(min_length=1)
    gate_mode: GateMode = "hidden"
    dtype: DTypeName | None = None
    experts_per_token: Annotated[int, Field(ge=1)] = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None

    _where: str = PrivateAttr("<dict>")

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "MoEConfig":
        where = self._where = (info.context or {}).get("where", "<dict>")
        if self.shared_experts:
            raise FieldProblem(
                "shared_experts", "not supported: the Mixtral output has no shared experts (mergekit builds Qwen2-MoE)"
            )
        if self.architecture is not None and not OUTPUT_ARCHITECTURE.startswith(self.architecture.lower()):
            raise FieldProblem(
                "architecture", f"expected mixtral (the one MoE evomerge builds), got {self.architecture!r}"
            )
        if len(self.experts) < self.experts_per_token:
            raise FieldProblem(
                "experts_per_token", f"expected at most {len(self.experts)} (the experts), got {self.experts_per_token}"
            )
        if self.gate_mode not in RANDOM_MODES:
            self._check_prompts()
        if self.gate_mode.startswith("hidden") and split_lora(self.base_model)[1] is not None:
            # mergekit runs the bare model here, adapter left out: refused rather than routed by another model
            raise FieldProblem(
                "base_model", f"gate_mode {self.gate_mode} runs the base model: give a model, not MODEL+ADAPTER"
            )
        ignored = [(key, "") for key in self.model_extra or {}]
        ignored += [
            (key, f"experts[{i}].") for i, expert in enumerate(self.experts) for key in expert.model_extra or {}
        ]
        for key, prefix in ignored:
            logger.warning(
                "%s: %s%s: ignored (not a mergekit-moe key; mergekit-moe ignores it too)", where, prefix, key
            )
        return self

    def _check_prompts(self) -> None:
        """The router is built from the prompts: every expert needs some, and they must tell experts apart."""
        for index, expert in enumerate(self.experts):
            if not expert.positive_prompts:
                raise FieldProblem(
                    f"experts[{index}].positive_prompts",
                    f"expected at least one prompt (gate_mode {self.gate_mode} routes by them; "
                    "gate_mode random needs none)",
                )
        prompts = {(tuple(e.positive_prompts), tuple(e.negative_prompts or ())) for e in self.experts}
        if len(prompts) == 1:
            raise FieldProblem("experts", "every expert has the same prompts, so the router could not tell them apart")

    @property
    def where(self) -> str:
        """The file this config was read from, or "<text>" / "<dict>"."""
        return self._where

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)

    @classmethod
    def from_dict(cls, data: object, where: str = "<dict>") -> "MoEConfig":
        if isinstance(data, dict) and "merge_method" in data and "experts" not in data:
            raise InputError(where, "merge_method", "this is a mergekit-yaml recipe: merge it with `evomerge merge`")
        try:
            return cls.model_validate(data, context={"where": where})
        except ValidationError as error:
            raise from_validation(error, where, cls) from None

    @classmethod
    def from_yaml(cls, source: str | Path) -> "MoEConfig":
        """Read a config from a file (a Path, or a str naming an existing file) or from YAML text."""
        return cls.from_dict(*read_yaml(source))


def read_candidate(text: str) -> Recipe | MoEConfig:
    """A search candidate's YAML: a mergekit-moe config (genome.kind moe's candidates and plain MoE) where it
    has experts, else a mergekit recipe (every other candidate, and the references beside them)."""
    data, where = read_yaml(text)
    return (
        MoEConfig.from_dict(data, where)
        if isinstance(data, dict) and "experts" in data
        else Recipe.from_dict(data, where)
    )
