"""Merge recipes in mergekit's YAML format (the part evomerge merges): parsed, validated, written back.

Every problem surfaces as one InputError line "file: field.path: what was expected", checked against the
methods registered in merge_core.methods (their parameters, base policy and input counts). Unlike mergekit,
unknown keys and parameters are errors, since a typo there would silently fall back to a default.
"""

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from merge_core.chat_template import check_chat_template
from merge_core.errors import FieldProblem, InputError, from_validation, shown
from merge_core.methods import METHODS, MergeMethod
from merge_core.parameters import ParameterValue, dump_value, kind_error, parse_value, pattern_entries

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}

# mergekit keys evomerge does not merge yet, with what to do instead.
UNSUPPORTED: dict[str, str] = {}


def _model_ref(raw: object) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"expected a model directory or hub id (a string), got {raw!r}")
    if raw.count("+") > 1 or raw.startswith("+") or raw.endswith("+"):
        raise ValueError(f"expected MODEL or MODEL+LORA_ADAPTER, got {raw!r}")
    return raw


def _tokenizer_source(raw: object) -> str:
    """base, union, or a model reference (whose tokenizer is taken as it is)."""
    return _model_ref(raw)


TokenizerSource = Annotated[str, PlainValidator(_tokenizer_source)]


def _layer_range(raw: object) -> tuple[int, int]:
    if not (
        isinstance(raw, list | tuple)
        and len(raw) == 2
        and all(isinstance(index, int) and not isinstance(index, bool) for index in raw)
    ):
        raise ValueError(f"expected [start, end], two layer indices, got {raw!r}")
    start, end = raw
    if not 0 <= start < end:
        raise ValueError(f"expected 0 <= start < end (end excluded), got [{start}, {end}]")
    return start, end


def read_yaml(source: str | Path) -> tuple[object, str]:
    """(the parsed YAML, where it came from) of a file (a Path, or a str naming an existing file) or YAML text;
    an unreadable file or bad YAML is one InputError line."""
    is_path = isinstance(source, Path) or ("\n" not in source and os.path.isfile(source))
    if not is_path and "\n" not in source and source.strip().endswith((".yml", ".yaml")):
        raise InputError(source, "file", "not found")
    where = str(source) if is_path else "<text>"
    try:
        text = Path(source).read_text() if is_path else source
    except OSError as error:
        raise InputError(where, "file", f"cannot be read ({error.strerror})") from None
    try:
        return yaml.safe_load(text), where
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f"line {mark.line + 1}" if mark else "yaml"
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        raise InputError(where, line, f"invalid YAML ({problem})") from None


ModelRef = Annotated[str, PlainValidator(_model_ref)]
LayerRange = Annotated[tuple[int, int], PlainValidator(_layer_range), PlainSerializer(list)]
Value = Annotated[ParameterValue, PlainValidator(parse_value), PlainSerializer(dump_value)]
# An empty mapping means no parameters: stored as None so that it writes back as nothing.
Parameters = Annotated[dict[str, Value] | None, AfterValidator(lambda parameters: parameters or None)]
DTypeName = Literal["bfloat16", "float16", "float32", "float64"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelInput(_Strict):
    model: ModelRef
    parameters: Parameters = None


class SliceSource(_Strict):
    model: ModelRef
    layer_range: LayerRange
    parameters: Parameters = None


class Slice(_Strict):
    sources: list[SliceSource] = Field(min_length=1)
    base_model: ModelRef | None = None  # this slice's base, instead of the top-level one
    residual_weight: float | None = None  # mergekit 0.1.5 accepts it and reads it nowhere: warned about
    parameters: Parameters = None


class Module(_Strict):
    """mergekit's `modules:` entry: one module's models or slices, with a parameter level of its own."""

    models: list[ModelInput] | None = Field(None, min_length=1)
    slices: list[Slice] | None = Field(None, min_length=1)
    parameters: Parameters = None


class ZeroSource(_Strict):
    """A token's row is all zeros."""

    kind: Literal["zero"]


class ModelTokenSource(_Strict):
    """A token's row is another token's row of one model (by the token or its id in that model's vocabulary)."""

    kind: Literal["model_token"]
    model: ModelRef
    token: str | None = None
    token_id: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _one_token(self) -> "ModelTokenSource":
        if (self.token is None) == (self.token_id is None):
            raise ValueError("expected exactly one of token and token_id")
        return self


TOKEN_SOURCES = {"zero": ZeroSource, "model_token": ModelTokenSource}


def _token_source(raw: object) -> "str | ZeroSource | ModelTokenSource":
    """A model reference, or a mapping told apart by its `kind` (so that a mistake gets one message, not a
    union's worth)."""
    if not isinstance(raw, dict):
        return _model_ref(raw)
    kind = TOKEN_SOURCES.get(raw.get("kind"))
    if kind is None:
        raise FieldProblem(
            "kind",
            f"expected zero or model_token (or a model reference instead of a mapping), got {shown(raw.get('kind'))}",
        )
    try:
        return kind.model_validate(raw)
    except ValidationError as error:
        problem = from_validation(error, "", kind)
        field = problem.field if problem.field != "<top level>" else None
        if field is None:
            raise ValueError(problem.expected) from None
        raise FieldProblem(field, problem.expected) from None


class TokenSettings(_Strict):
    """`tokenizer.tokens.<TOKEN>`: where the token's embedding and lm_head rows come from. Without `force`,
    only models that lack the token take it; with it, every model does."""

    source: Annotated[
        str | ZeroSource | ModelTokenSource,
        PlainValidator(_token_source),
        PlainSerializer(lambda source: source if isinstance(source, str) else source.model_dump(exclude_none=True)),
    ]
    force: bool = False


class TokenizerSettings(_Strict):
    """mergekit's `tokenizer:` block: the output vocabulary (`source`), tokens to add or to fill from a chosen
    place, and a row count to round up to."""

    source: TokenizerSource = "union"
    tokens: dict[str, TokenSettings] | None = None
    pad_to_multiple_of: Annotated[int, Field(ge=1)] | None = None


# mergekit's name for the one module of a single-module architecture (every decoder-only LLM it merges)
SINGLE_MODULE = "default"


@dataclass(frozen=True)
class SliceInput:
    """One input of an output slice, in either syntax."""

    model: str
    parameters: Mapping[str, ParameterValue] | None
    path: str  # where the recipe wrote it, e.g. "models[2]", "slices[1].sources[0]", "base_model"
    layer_range: tuple[int, int] | None  # None: every layer of the model (models: syntax)


@dataclass(frozen=True)
class OutputSlice:
    """A run of output layers merged from the same inputs; `models:` syntax is one slice over all layers."""

    inputs: tuple[SliceInput, ...]
    parameters: Mapping[str, ParameterValue] | None
    path: str  # "models" or "slices[i]" (under modules: "modules.default.models" ...)
    base_model: str | None  # the slice's own base_model, else the top-level one
    module_parameters: Mapping[str, ParameterValue] | None = None  # modules.default.parameters

    @property
    def is_slice(self) -> bool:
        """Written as a slice (slices: syntax), not as the models: list."""
        return not self.path.endswith("models")


class Recipe(_Strict):
    name: str | None = None
    merge_method: str
    base_model: ModelRef | None = None
    models: list[ModelInput] | None = Field(None, min_length=1)
    slices: list[Slice] | None = Field(None, min_length=1)
    modules: dict[str, Module] | None = None
    parameters: Parameters = None
    dtype: DTypeName | None = None
    out_dtype: DTypeName | None = None
    tokenizer_source: TokenizerSource | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: Annotated[str, PlainValidator(check_chat_template)] | None = None

    _where: str = PrivateAttr("<dict>")

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "Recipe":
        self._where = (info.context or {}).get("where", "<dict>")
        _check_recipe(self, self._where)
        return self

    def __eq__(self, other: object) -> bool:
        # Where a recipe was read from is not part of it.
        return isinstance(other, Recipe) and self.__dict__ == other.__dict__

    @property
    def where(self) -> str:
        """The file this recipe was read from, or "<text>" / "<dict>"."""
        return self._where

    @property
    def method(self) -> MergeMethod:
        return _find_method(self.merge_method)

    @property
    def merge_dtype(self) -> torch.dtype | None:
        return DTYPES.get(self.dtype)

    @property
    def save_dtype(self) -> torch.dtype | None:
        return DTYPES.get(self.out_dtype)

    @property
    def vocabulary_source(self) -> str | None:
        """Where the output vocabulary comes from (base, union or a model), None when the sources' own is kept."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    @property
    def body(self) -> tuple[list[ModelInput] | None, list[Slice] | None, Mapping | None, str]:
        """(models, slices, module parameters, path prefix): the top level's, or the one module's."""
        if self.modules:
            module = next(iter(self.modules.values()))
            return module.models, module.slices, module.parameters, f"modules.{next(iter(self.modules))}."
        return self.models, self.slices, None, ""

    def output_slices(self) -> list[OutputSlice]:
        """The slices as mergekit merges them: `models:` becomes one slice with base_model appended last
        when it is not listed (mergekit's input order)."""
        models, slices, module_parameters, prefix = self.body
        if slices is not None:
            return [
                OutputSlice(
                    tuple(
                        SliceInput(
                            source.model, source.parameters, f"{prefix}slices[{i}].sources[{j}]", source.layer_range
                        )
                        for j, source in enumerate(piece.sources)
                    ),
                    piece.parameters,
                    f"{prefix}slices[{i}]",
                    piece.base_model or self.base_model,
                    module_parameters,
                )
                for i, piece in enumerate(slices)
            ]
        inputs = [
            SliceInput(entry.model, entry.parameters, f"{prefix}models[{i}]", None) for i, entry in enumerate(models)
        ]
        if self.base_model is not None and self.base_model not in (entry.model for entry in models):
            inputs.append(SliceInput(self.base_model, None, "base_model", None))
        return [OutputSlice(tuple(inputs), None, f"{prefix}models", self.base_model, module_parameters)]

    def model_refs(self) -> list[str]:
        """Every model the merge reads, base included, in first-seen (merge input) order."""
        pieces = self.output_slices()
        refs = [source.model for piece in pieces for source in piece.inputs]
        bases = [base for base in (self.base_model, *(piece.base_model for piece in pieces)) if base is not None]
        return list(dict.fromkeys(refs + bases))

    @classmethod
    def from_dict(cls, data: object, where: str = "<dict>") -> "Recipe":
        if not isinstance(data, dict):
            raise InputError(where, "recipe", "expected a mapping with merge_method and models: or slices:")
        if "experts" in data and "merge_method" not in data:
            raise InputError(
                where, "experts", "this is a mergekit-moe config (Mixture of Experts): build it with `evomerge moe`"
            )
        try:
            return cls.model_validate(data, context={"where": where})
        except ValidationError as error:
            raise from_validation(error, where, cls, UNSUPPORTED) from None

    @classmethod
    def from_yaml(cls, source: str | Path) -> "Recipe":
        """Read a recipe from a file (a Path, or a str naming an existing file) or from YAML text."""
        return cls.from_dict(*read_yaml(source))

    def to_yaml(self) -> str:
        """Minimal mergekit YAML: only what the recipe sets, floats at full precision."""
        return yaml.dump(self.model_dump(mode="json", exclude_none=True), Dumper=_Dumper, sort_keys=False)


class _Dumper(yaml.SafeDumper):
    """Writes gradients and layer ranges on one line: `weight: [0.2, 0.9]`."""

    def represent_list(self, data: list) -> yaml.Node:
        flow = all(isinstance(item, int | float) for item in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _Dumper.represent_list)


def _find_method(name: str) -> MergeMethod | None:
    return METHODS.get(name) or next((m for m in METHODS.values() if name in m.aliases), None)


def _check_recipe(recipe: Recipe, where: str) -> None:
    """What pydantic's types cannot say: the method, its inputs, and its parameters."""
    method = recipe.method
    if method is None:
        raise InputError(
            where, "merge_method", f"unknown method {recipe.merge_method!r}; expected one of {', '.join(METHODS)}"
        )
    if sum(part is not None for part in (recipe.models, recipe.slices, recipe.modules)) != 1:
        raise InputError(where, "models", "expected exactly one of models:, slices: or modules:")
    if recipe.modules is not None:
        if list(recipe.modules) != [SINGLE_MODULE]:
            raise InputError(
                where,
                "modules",
                f"expected one module named {SINGLE_MODULE} (mergekit's name for a decoder-only model's one "
                f"module; multi-module models are not supported), got {', '.join(recipe.modules) or 'none'}",
            )
        module = recipe.modules[SINGLE_MODULE]
        if (module.models is None) == (module.slices is None):
            raise InputError(where, f"modules.{SINGLE_MODULE}", "expected exactly one of models: or slices:")
    pieces = recipe.output_slices()
    unbased = next((piece for piece in pieces if piece.base_model is None), None)
    if method.base == "required" and unbased is not None:
        field = f"{unbased.path}.base_model" if unbased.is_slice else "base_model"
        raise InputError(where, field, f"required by {method.name} (set it here or at the top level)")
    _check_tokenizer(recipe, where)
    for piece in pieces:
        _check_inputs(piece, method, piece.base_model, where)
    if len(pieces[-1].inputs) > len(pieces[0].inputs):
        # mergekit merges the post-layer tensors (final norm, lm_head) from the last slice's models but only as
        # many as the first slice has, silently dropping the rest: refuse rather than reproduce that.
        raise InputError(
            where,
            f"{pieces[-1].path}.sources",
            f"has more sources than slices[0] ({len(pieces[0].inputs)}); give the first and last slice the same models",
        )
    _check_parameters(recipe, pieces, method, where)


def _check_tokenizer(recipe: Recipe, where: str) -> None:
    if recipe.tokenizer is not None and recipe.tokenizer_source is not None:
        raise InputError(
            where, "tokenizer", "expected tokenizer: or tokenizer_source:, not both (mergekit refuses both)"
        )
    field = "tokenizer.source" if recipe.tokenizer is not None else "tokenizer_source"
    if recipe.vocabulary_source == "base" and recipe.base_model is None:
        raise InputError(where, field, "'base' needs a base_model")
    models = recipe.model_refs()
    for token, settings in ((recipe.tokenizer and recipe.tokenizer.tokens) or {}).items():
        source = settings.source
        model = source if isinstance(source, str) else getattr(source, "model", None)
        if model is not None and model not in models:
            path = f"tokenizer.tokens.{token}.source" + ("" if isinstance(source, str) else ".model")
            raise InputError(
                where, path, f"{model!r} is not a model of this recipe; expected one of {', '.join(models)}"
            )


def _check_inputs(piece: OutputSlice, method: MergeMethod, base: str | None, where: str) -> None:
    models = [source.model for source in piece.inputs]
    for index, source in enumerate(piece.inputs):
        if source.model in models[:index]:
            raise InputError(where, f"{source.path}.model", f"{source.model!r} is already an input of this slice")
    inputs_field = "models" if piece.path == "models" else f"{piece.path}.sources"
    if base is not None and method.base != "ignored" and base not in models:
        raise InputError(where, inputs_field, f"must include base_model {base!r}: {method.name} merges against it")
    count = len(models)
    if count < method.min_models or (method.max_models is not None and count > method.max_models):
        raise InputError(where, inputs_field, f"{method.name} takes {_arity(method)}; got {count}")
    non_base = count - (base in models and method.base != "ignored")
    if method.non_base_models is not None and non_base != method.non_base_models:
        expected = f"exactly {method.non_base_models} models besides base_model"
        raise InputError(where, inputs_field, f"{method.name} takes {expected}; got {non_base}")
    first = piece.inputs[0]
    for source in piece.inputs[1:] if first.layer_range else ():
        if source.layer_range[1] - source.layer_range[0] != first.layer_range[1] - first.layer_range[0]:
            raise InputError(
                where,
                f"{source.path}.layer_range",
                f"spans {source.layer_range[1] - source.layer_range[0]} layers but {first.path} spans "
                f"{first.layer_range[1] - first.layer_range[0]}: every source of a slice must span as many",
            )


def _arity(method: MergeMethod) -> str:
    counted = "counting base_model" if method.base != "ignored" else "per slice"
    low, high = method.min_models, method.max_models
    if low == high:
        return f"exactly {low} input{'s' * (low != 1)} {counted}"
    if high is None:
        return f"at least {low} input{'s' * (low != 1)} {counted}"
    return f"{low} to {high} inputs {counted}" if low > 1 else f"at most {high} input{'s' * (high != 1)} {counted}"


def _check_parameters(recipe: Recipe, pieces: list[OutputSlice], method: MergeMethod, where: str) -> None:
    allowed = ", ".join(param.name for param in method.params)
    scopes = [("parameters", recipe.parameters, False)]
    _, _, module_parameters, prefix = recipe.body
    scopes += [(f"{prefix}parameters", module_parameters, False)] if prefix else []
    scopes += [(f"{piece.path}.parameters", piece.parameters, False) for piece in pieces]
    scopes += [(f"{source.path}.parameters", source.parameters, True) for piece in pieces for source in piece.inputs]
    # What mergekit accepts but never reads: said once the whole recipe is known to be good, so never before an error.
    no_effect: list[tuple[str, str]] = []
    _, slices, _, prefix = recipe.body
    for index, piece in enumerate(slices or []):
        if piece.residual_weight is not None:
            no_effect.append((f"{prefix}slices[{index}].residual_weight", "mergekit 0.1.5 reads it nowhere"))
    for path, parameters, per_input in scopes:
        for name, value in (parameters or {}).items():
            if name in method.ignored_params:
                no_effect.append((f"{path}.{name}", f"mergekit 0.1.5's {method.name} does not read it"))
                continue
            param = method.param(name)
            if param is None:
                raise InputError(
                    where, f"{path}.{name}", f"not a parameter of {method.name}; expected one of {allowed}"
                )
            if per_input and not param.per_model:
                raise InputError(
                    where,
                    f"{path}.{name}",
                    f"{name} is one value for all inputs: set it in the top-level or slice parameters",
                )
            problem = kind_error(value, param)
            if problem:
                raise InputError(where, f"{path}.{name}", problem)
            for index, entry in pattern_entries(value):
                matches = "every tensor" if entry.filter is None else f"by filter {entry.filter!r} alone"
                no_effect.append(
                    (f"{path}.{name}[{index}].pattern", f"mergekit 0.1.5 ignores it, so this entry matches {matches}")
                )

    # Required parameters must be set somewhere each input (or slice) can read them; a filter list that
    # matches no entry for some tensor is only found when planning.
    def is_set(name: str, *levels: Mapping | None) -> bool:
        return any(level and name in level for level in levels)

    for param in (param for param in method.params if param.required):
        for piece in pieces:
            if not param.per_model:
                if is_set(param.name, piece.parameters, piece.module_parameters, recipe.parameters):
                    continue
                if not piece.is_slice:
                    raise InputError(where, f"parameters.{param.name}", f"required by {method.name}")
                raise InputError(
                    where,
                    f"{piece.path}.parameters.{param.name}",
                    f"required by {method.name}: set it here or in the top-level parameters",
                )
            for source in piece.inputs:
                uses_it = method.base == "ignored" or source.model != piece.base_model
                levels = (source.parameters, piece.parameters, piece.module_parameters, recipe.parameters)
                if not uses_it or is_set(param.name, *levels):
                    continue
                if source.path == "base_model":
                    raise InputError(
                        where,
                        "base_model",
                        f"{method.name} reads {param.name} for every input and base_model is one: list it under "
                        f"models: with its {param.name}, or set {param.name} in the top-level parameters",
                    )
                places = "here, in the slice's parameters or" if piece.is_slice else "here or"
                raise InputError(
                    where,
                    f"{source.path}.parameters.{param.name}",
                    f"required by {method.name}: set it {places} in the top-level parameters",
                )
    for field_path, why in no_effect:
        logger.warning("%s: %s: has no effect: %s", where, field_path, why)
