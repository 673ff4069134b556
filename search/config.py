"""search.yml: what to merge, what to search, how to score it, where to run it.

`SearchConfig.from_yaml(path)` validates the file and fills defaults; any problem is an `InputError` whose
message is ONE line naming the file, the field and what was expected, e.g.
`search.yml: optimizer.popsize: expected an integer >= 2, got 'ten'`. Unknown keys are rejected.
Relative paths (local models, include_path, output_dir, a relative sqlite MLflow URI) resolve against the
config file's directory, so a config means the same thing from any working directory.
"""

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from evaluators.config import Bytes, EvalConfig, TaskSpec
from merge_core.chat_template import check_chat_template
from merge_core.errors import FieldProblem, InputError, from_validation, shown
from merge_core.methods import METHODS, MergeMethod
from merge_core.moe_config import MoEConfig
from merge_core.recipe import Recipe, TokenizerSettings, TokenizerSource
from search.run_dir import RunDir

SEARCHABLE_BY_DEFAULT = ("weight", "density", "t")
DEFAULT_BOUNDS = {"weight": (0.0, 1.0), "density": (0.1, 1.0), "t": (0.0, 1.0)}
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _base_dir(info: ValidationInfo) -> Path:
    return Path((info.context or {}).get("base_dir", Path.cwd()))


def _resolve(path: str | Path, info: ValidationInfo) -> Path:
    return (_base_dir(info) / Path(path).expanduser()).resolve()


def _seconds(value: Any) -> Any:
    """Durations are seconds, or a number with a unit: '90s', '30m', '2h', '1d'."""
    if not isinstance(value, str):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", value)
    if not match:
        raise ValueError(f"expected seconds or a duration like '90s', '30m', '2h', got {shown(value)}")
    return float(match[1]) * DURATION_UNITS[match[2]]


Seconds = Annotated[float, BeforeValidator(_seconds), Field(gt=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ModelsConfig(Section):
    """The base model and its fine-tunes: local directories or hub ids."""

    base: str
    fine_tunes: list[str] = Field(min_length=1)

    @field_validator("base", mode="before")
    @classmethod
    def _resolve_base(cls, value: Any, info: ValidationInfo) -> Any:
        return _model_ref(value, _base_dir(info))

    @field_validator("fine_tunes", mode="before")
    @classmethod
    def _resolve_fine_tunes(cls, value: Any, info: ValidationInfo) -> Any:
        return [_model_ref(ref, _base_dir(info)) for ref in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _distinct(self) -> Self:
        for index, ref in enumerate(self.fine_tunes):
            if ref == self.base:
                raise FieldProblem(f"fine_tunes[{index}]", f"expected a model other than the base, got {ref!r}")
            if ref in self.fine_tunes[:index]:
                raise FieldProblem(f"fine_tunes[{index}]", f"expected each fine-tune once, got {ref!r} twice")
        return self


def _model_ref(value: Any, base_dir: Path) -> Any:
    """An explicit path ('./x', '../x', '/x', '~/x') or an existing relative directory (of `base_dir`) is local;
    else a hub id."""
    if not isinstance(value, str) or not value.strip():
        return value  # strict str validation reports it
    explicit = value.startswith(("./", "../", "/", "~")) or value in (".", "..")
    local = (base_dir / Path(value).expanduser()).resolve()
    if explicit and not local.exists():
        raise ValueError(f"expected an existing model directory, got {value!r} ({local} does not exist)")
    if explicit or local.exists():
        return str(local)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", value):
        raise ValueError(f"expected a local directory or a hub id like 'org/name', got {value!r}")
    return value


class MergeConfig(Section):
    """The merge method and the parameters that stay fixed during the search."""

    method: str
    parameters: dict[str, float | bool] = {}
    dtype: Literal["float32", "bfloat16", "float16", "float64"] | None = None
    # fast: keep casts and the method's prepared state (task vectors, ranks) resident, so a candidate pays only
    # its own arithmetic; lean: keep only the sources and recompute those per tensor per candidate (bit for bit
    # the same merge, slower); auto: fast where the memory plan says it fits, else lean.
    memory: Literal["fast", "lean", "auto"] = "auto"
    # A mergekit chat_template (auto, chatml or Jinja text) every candidate recipe and the export carry; with
    # evaluation.apply_chat_template the candidates are also scored through it.
    chat_template: str | None = None
    # mergekit's tokenizer_source / tokenizer: block, which every recipe the search builds carries (and so the
    # export): what lets it merge models whose vocabularies differ. Model references resolve as models: do.
    tokenizer_source: TokenizerSource | None = None
    tokenizer: TokenizerSettings | None = None

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        return None if value is None else check_chat_template(value)

    @field_validator("tokenizer_source", mode="before")
    @classmethod
    def _resolve_source(cls, value: Any, info: ValidationInfo) -> Any:
        return value if value in ("base", "union") else _model_ref(value, _base_dir(info))

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _resolve_block(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, dict):
            return value
        block = dict(value)
        if "source" in block:
            block["source"] = cls._resolve_source(block["source"], info)
        if isinstance(block.get("tokens"), dict):
            block["tokens"] = {token: _resolve_token(entry, info) for token, entry in block["tokens"].items()}
        return block

    @property
    def vocabulary_source(self) -> str | None:
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    def tokenizer_keys(self, base: str | None = None) -> dict:
        """The tokenizer setting as recipe keys. `base`: the search's base model, for a recipe without a
        base_model (the linear average), where `base` names its tokenizer directly."""
        keys = self.model_dump(mode="json", include={"tokenizer_source", "tokenizer"}, exclude_none=True)
        if base is None or self.vocabulary_source != "base":
            return keys
        if self.tokenizer is not None:
            return keys | {"tokenizer": keys["tokenizer"] | {"source": base}}
        return keys | {"tokenizer_source": base}

    @property
    def spec(self) -> MergeMethod:
        return METHODS[self.method]


def _resolve_token(entry: Any, info: ValidationInfo) -> Any:
    """A `tokenizer.tokens` entry with its model reference resolved (a string source, or model_token's model)."""
    source = entry.get("source") if isinstance(entry, dict) else None
    if isinstance(source, str):
        return entry | {"source": _model_ref(source, _base_dir(info))}
    if isinstance(source, dict) and isinstance(source.get("model"), str):
        return entry | {"source": source | {"model": _model_ref(source["model"], _base_dir(info))}}
    return entry


class DataFlowConfig(Section):
    """The layer-path genome (search/genome/data_flow.py): the sources' layers laid out layer by layer,
    `repeats` times, one include gene and one residual scale gene per slot."""

    repeats: int = Field(2, ge=1, le=8)
    min_layers: int = Field(1, ge=1)
    max_layers: int | None = Field(None, ge=1)  # None: twice the sources' depth
    scale_bounds: Annotated[list[float], Field(min_length=2, max_length=2)] = [0.5, 1.5]
    include_base: bool = False  # the base's layers as slots too, beside the fine-tunes'
    # ps+dfs: the weight-space merge whose layers join the sources' (a finished search's best.yml, or any
    # recipe over these models), materialized once per worker
    stage1: Path | None = None

    @field_validator("stage1", mode="before")
    @classmethod
    def _resolve_stage1(cls, value: Any, info: ValidationInfo) -> Any:
        return _resolve(value, info) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        low, high = self.scale_bounds
        if not 0 <= low < high:
            raise FieldProblem("scale_bounds", f"expected [lower, upper] with 0 <= lower < upper, got {[low, high]}")
        if self.max_layers is not None and self.max_layers < self.min_layers:
            raise FieldProblem("max_layers", f"expected at least min_layers ({self.min_layers}), got {self.max_layers}")
        return self


class MoESearchConfig(Section):
    """The MoE genome (search/genome/moe.py): which experts of a mergekit-moe config are in, and each one's
    residual_scale. The config gives the base, the experts, their prompts and the gate mode."""

    # A mergekit-moe YAML (relative to this file), or the same mapping inline. Its relative model paths resolve
    # against its own directory (inline: this file's), and candidates carry them resolved.
    config: Path | dict[str, Any]
    scale_bounds: Annotated[list[float], Field(min_length=2, max_length=2)] = [0.5, 1.5]

    _moe: MoEConfig = PrivateAttr()

    @field_validator("config", mode="before")
    @classmethod
    def _resolve_config(cls, value: Any, info: ValidationInfo) -> Any:
        return _resolve(value, info) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _read(self, info: ValidationInfo) -> Self:
        low, high = self.scale_bounds
        if not 0 < low < high:
            raise FieldProblem("scale_bounds", f"expected [lower, upper] with 0 < lower < upper, got {[low, high]}")
        if isinstance(self.config, Path):  # its problems name its own file
            moe, base_dir = MoEConfig.from_yaml(self.config), self.config.parent
        else:
            try:
                moe, base_dir = MoEConfig.from_dict(self.config), _base_dir(info)
            except InputError as error:
                raise FieldProblem(f"config.{error.field}", error.expected) from None
        data = moe.model_dump(mode="json", exclude_none=True)
        data["base_model"] = _model_ref(moe.base_model, base_dir)
        for expert in data["experts"]:
            expert["source_model"] = _model_ref(expert["source_model"], base_dir)
        self._moe = MoEConfig.from_dict(data, where=moe.where)
        return self

    @property
    def moe(self) -> MoEConfig:
        """The mergekit-moe config searched around, its local model paths resolved."""
        return self._moe


GenomeKind = Literal["ps", "dfs", "ps+dfs", "moe"]


class GenomeConfig(Section):
    """What is searched: merge parameters per layer and module (kind ps, the default; see
    search/genome/parameter_space.py), layer paths (dfs), paths over a fixed merge and the sources (ps+dfs), or
    the experts of a mixture of experts and their residual scales (moe)."""

    kind: GenomeKind = "ps"
    dfs: DataFlowConfig | None = None  # dfs / ps+dfs: the path genome (defaults when absent)
    moe: MoESearchConfig | None = None  # moe: the mergekit-moe config searched around
    params: list[str] | None = None  # None: whichever of weight / density / t the method has and are not fixed
    bounds: dict[str, Annotated[list[float], Field(min_length=2, max_length=2)]] = {}
    layer_granularity: int = Field(1, ge=1)
    filters: list[Annotated[str, Field(min_length=1)]] = ["self_attn", "mlp"]
    smooth: int | None = Field(None, ge=2)  # knots per (model, param, filter), interpolated across layers

    @field_validator("filters")
    @classmethod
    def _distinct_filters(cls, filters: list[str]) -> list[str]:
        for index, name in enumerate(filters):
            if name in filters[:index] or name == "*":
                raise FieldProblem(f"[{index}]", f"expected distinct tensor-name substrings, got {name!r}")
        return filters

    @field_validator("bounds")
    @classmethod
    def _ordered_bounds(cls, bounds: dict[str, list[float]]) -> dict[str, list[float]]:
        for name, (low, high) in bounds.items():
            if not low < high:
                raise FieldProblem(name, f"expected [lower, upper] with lower < upper, got {[low, high]}")
        return bounds


class OptimizerConfig(Section):
    name: Literal["cmaes", "nsga2", "tpe", "gp", "random"] = "cmaes"
    popsize: int | None = Field(None, ge=2)  # CMA-ES lambda / NSGA-II population; None: the library default
    sigma0: float = Field(0.25, gt=0, le=1)  # CMA-ES initial step, as a fraction of each gene's range
    seed: int | None = None  # None: the top-level seed
    study_name: str = Field("search", min_length=1)
    warm_start: bool = True  # evaluate the method's default recipes first
    # Stage 1 first: every one-knob merge of the genome's parameters (search/genome/coarse.py); CMA-ES then
    # starts from the best one instead of the middle of the bounds.
    coarse_to_fine: bool = False
    # CMA-ES only. diagonal: separable CMA-ES (Ros & Hansen 2008), a per-gene variance instead of a full
    # covariance: linear cost per generation and learning rates about (genes + 2) / 3 times larger, so it adapts
    # within the few generations a search over many genes gets. auto: diagonal above DIAGONAL_ABOVE genes
    # (search/optimizers/cma_es.py; experiments/RESULTS.md has the measurements).
    covariance: Literal["auto", "full", "diagonal"] = "auto"

    @model_validator(mode="after")
    def _covariance_is_cma(self) -> Self:
        if self.covariance != "auto" and self.name != "cmaes":
            raise FieldProblem("covariance", f"expected it only with name: cmaes, got it with name: {self.name}")
        return self


class TaskConfig(Section):
    """One lm-eval task (or group) and the metric that scores it."""

    task: str = Field(min_length=1)
    metric: str = Field(min_length=1)
    direction: Literal["maximize", "minimize"] = "maximize"
    num_fewshot: int | None = Field(None, ge=0)


class FitnessConfig(Section):
    """Which items score a candidate. With `rungs`, asynchronous successive halving: a candidate is scored on
    the first rung's items, and goes on to the next rung's only while it ranks in the best `promote` share of
    all candidates scored at its rung so far; each rung's items hold the previous rung's, so going on costs
    only the new items."""

    limit: int | None = Field(None, ge=1)  # items per task; None: every item (with rungs: the last rung)
    subset_seed: int = 1234  # fixed, so every candidate is scored on the same items
    rungs: list[int] | None = None  # items per task at each fidelity, increasing; None: one rung of `limit`
    promote: float = Field(1 / 3, gt=0, lt=1)  # the share of a rung's candidates that go on to the next

    @model_validator(mode="after")
    def _rungs_nest(self) -> Self:
        rungs = self.rungs
        if rungs is None:
            return self
        if len(rungs) < 2 or rungs[0] < 1 or any(a >= b for a, b in zip(rungs, rungs[1:], strict=False)):
            raise FieldProblem("rungs", f"expected two or more increasing item counts from 1 up, got {rungs}")
        if self.limit is None:
            self.limit = rungs[-1]
        elif self.limit != rungs[-1]:
            raise FieldProblem("rungs", f"expected the last rung to be fitness.limit ({self.limit}), got {rungs[-1]}")
        return self


class SelectionConfig(Section):
    """Items of the objective tasks that the optimizer never fits, where the winner is chosen: the best of many
    candidates on the items they were all tuned on is an upward-biased pick (the winner's curse)."""

    limit: int = Field(ge=1)  # items per objective task, drawn after the fitness.limit fitness items
    top_k: int = Field(5, ge=1)  # candidates re-scored there: the best by search fitness, front members first


TunedFamily = Literal["task_arithmetic", "ties", "dare_ties"]  # search/results/baselines.py: TUNED


class BaselinesConfig(Section):
    """The one-knob merges the report and the gate compare the evolved recipe with, each tuned over a small
    grid on the search split after the search (search/results/baselines.py lists the grids: 10, 12 and 12
    points). Every point is one evaluation on the search split; a long run on a large model may keep fewer."""

    tuned: list[TunedFamily] = ["task_arithmetic", "ties", "dare_ties"]

    @field_validator("tuned")
    @classmethod
    def _distinct(cls, tuned: list[str]) -> list[str]:
        for index, name in enumerate(tuned):
            if name in tuned[:index]:
                raise FieldProblem(f"[{index}]", f"expected each family once, got {name!r} twice")
        return tuned


class HeldOutConfig(Section):
    tasks: list[TaskConfig] = []
    limit: int | None = Field(None, ge=1)


class EvaluationConfig(EvalConfig):
    """The evaluator's own options (evaluators.config.EvalConfig), plus a default num_fewshot for every task.

    The subset seed lives in fitness.subset_seed, so the scored items are chosen in one place.
    """

    num_fewshot: int | None = Field(None, ge=0)  # None: each task's own setting; objectives may override
    subset_seed: None = None  # always fitness.subset_seed (None here keeps a dumped config loadable)

    @field_validator("include_path", mode="before")
    @classmethod
    def _resolve_include(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            return value
        path = _resolve(value, info)
        if not path.is_dir():
            raise ValueError(f"expected a directory of task YAMLs, got {value!r} ({path} is not a directory)")
        return path

    @field_validator("subset_seed", mode="before")
    @classmethod
    def _subset_seed_elsewhere(cls, value: Any) -> Any:
        if value is None:
            return value
        raise ValueError(f"expected it in fitness.subset_seed (one place chooses the scored items), got {shown(value)}")


class BudgetConfig(Section):
    """When the search stops asking: whichever limit is reached first."""

    trials: int | None = Field(100, ge=1)
    wall_time: Seconds | None = None  # seconds, or '90s' / '30m' / '2h' / '1d'
    item_evals: int | None = Field(None, ge=1)  # scored items, what a real model's GPU time scales with

    @model_validator(mode="after")
    def _some_limit(self) -> Self:
        if self.trials is None and self.wall_time is None and self.item_evals is None:
            raise FieldProblem("trials", "expected a trial count, a wall_time or item_evals, got none")
        return self


class ExecutionConfig(Section):
    ray_address: str = "local"  # 'local' starts Ray in-process; else a cluster address for ray.init
    workers: int = Field(1, ge=1)
    gpus_per_worker: float = Field(0.0, ge=0)
    trial_timeout: Seconds = 3600.0
    device: str = "auto"
    # What one worker's device has (a cluster GPU's memory, or a node's RAM for CPU workers); None: read from
    # this machine for a local run, unchecked on a cluster. `evomerge plan` and every run check against it.
    device_memory: Bytes | None = None

    @field_validator("ray_address")
    @classmethod
    def _address(cls, value: str) -> str:
        if not re.fullmatch(r"local|auto|(ray://)?[\w.-]+:\d{1,5}", value):
            raise ValueError(
                f"expected 'local', 'auto' or a cluster address like 'head-node:6379' or 'ray://head:10001', got {value!r}"
            )
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
        return value


class TrackingConfig(Section):
    mlflow_uri: str | None = None  # None: sqlite file mlflow.db in output_dir
    experiment: str = Field("evomerge", min_length=1)

    @field_validator("mlflow_uri", mode="before")
    @classmethod
    def _resolve_uri(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            return value
        if value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
            return f"sqlite:///{_resolve(value.removeprefix('sqlite:///'), info)}"
        if "://" not in value:  # a plain path is a local MLflow file store
            return str(_resolve(value, info))
        return value


class SearchConfig(Section):
    # Both None only with genome.kind moe, whose mergekit-moe config names the models and how they combine:
    # models is then filled in from it (its base, and its experts' other models as the fine-tunes).
    models: ModelsConfig | None = None
    merge: MergeConfig | None = None
    objectives: list[TaskConfig] = Field(min_length=1)
    genome: GenomeConfig = GenomeConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    fitness: FitnessConfig = FitnessConfig()
    selection: SelectionConfig | None = None  # None: the winner is chosen on the search scores
    held_out: HeldOutConfig = HeldOutConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    budget: BudgetConfig = BudgetConfig()
    execution: ExecutionConfig = ExecutionConfig()
    tracking: TrackingConfig = TrackingConfig()
    output_dir: Path | None = None  # None: runs/<config file stem> next to the config
    seed: int = 0
    trust_remote_code: bool = False

    _where: str = PrivateAttr("<config>")

    @field_validator("output_dir", mode="before")
    @classmethod
    def _resolve_output(cls, value: Any, info: ValidationInfo) -> Any:
        return _resolve(value, info) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Self:
        kind = self.genome.kind
        if self.genome.dfs is not None and kind not in ("dfs", "ps+dfs"):
            raise FieldProblem("genome.dfs", "expected it only with genome.kind dfs or ps+dfs")
        if self.genome.moe is not None and kind != "moe":
            raise FieldProblem("genome.moe", "expected it only with genome.kind moe")
        if kind == "moe":
            self._check_moe(info)
        else:
            for section in ("models", "merge"):
                if getattr(self, section) is None:
                    raise FieldProblem(section, f"expected a {section} section with genome.kind {kind}, got none")
        if kind == "ps":
            self._check_method()
            self._check_genome()
        elif kind != "moe":
            self._check_data_flow()
        self._check_objectives()
        if self.merge and self.merge.vocabulary_source:
            self._check_tokenizer()
        if (
            self.merge
            and self.merge.chat_template
            and self.evaluation.backend == "vllm"
            and self.evaluation.apply_chat_template
        ):
            raise FieldProblem(
                "merge.chat_template",
                "expected none with evaluation.backend vllm and apply_chat_template (the engine keeps its model's "
                "template): score with the hf backend, or set the template after the search",
            )
        if self.selection is not None and self.fitness.limit is None:
            raise FieldProblem(
                "fitness.limit",
                "expected an item count with a selection section (its items follow the fitness ones), got none",
            )
        if self.output_dir is None:
            self.output_dir = _resolve(Path("runs") / (info.context or {}).get("stem", "search"), info)
        if self.tracking.mlflow_uri is None:
            self.tracking.mlflow_uri = RunDir(self.output_dir).mlflow_uri
        if self.optimizer.seed is None:
            self.optimizer.seed = self.seed
        return self

    def _check_tokenizer(self) -> None:
        """A tokenizer setting is checked as the recipes will carry it, and only where the scoring can follow it."""
        merge, models = self.merge, [self.models.base, *self.models.fine_tunes]
        field = "merge.tokenizer.source" if merge.tokenizer else "merge.tokenizer_source"
        if self.genome.kind != "ps":
            raise FieldProblem(
                field, f"expected none with genome.kind {self.genome.kind} (layer paths keep the sources' embeddings)"
            )
        if self.evaluation.backend == "vllm":
            raise FieldProblem(
                field, "expected none with evaluation.backend vllm (the engine keeps its model's vocabulary size)"
            )
        probe = {"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}} for ref in models]}
        if merge.spec.base != "ignored":
            probe["base_model"] = self.models.base
        try:
            Recipe.from_dict(probe | merge.tokenizer_keys())
        except InputError as error:
            raise FieldProblem(f"merge.{error.field}", error.expected) from None
        source = merge.vocabulary_source
        if source not in ("base", "union", *models):
            raise FieldProblem(field, f"expected base, union or one of this search's models, got {source!r}")

    def _check_data_flow(self) -> None:
        """A path genome stacks layers (exported as passthrough slices) and evaluates the sources' own tensors."""
        genome = self.genome
        if genome.dfs is None:
            genome.dfs = DataFlowConfig()
        kind = genome.kind
        if self.merge.method != "passthrough":
            raise FieldProblem(
                "merge.method",
                f"expected passthrough with genome.kind {kind} (a layer path is exported as passthrough slices), "
                f"got {self.merge.method!r}",
            )
        self._check_live_model(
            "layer paths",
            "a vLLM engine's depth is fixed when it starts",
            "paths are scored on the sources' own tensors, uncast",
        )
        if (kind == "ps+dfs") != (genome.dfs.stage1 is not None):
            expected = "the weight-space recipe (e.g. a finished search's best recipe)" if kind == "ps+dfs" else "none"
            raise FieldProblem("genome.dfs.stage1", f"expected {expected} with genome.kind {kind}")

    def _check_live_model(self, searched: str, engine: str, dtype: str) -> None:
        """dfs and moe candidates are models built in memory for transformers, not merges into a fixed model."""
        kind, genome = self.genome.kind, self.genome
        if genome.params or genome.bounds:
            field = "genome.params" if genome.params else "genome.bounds"
            raise FieldProblem(field, f"expected none with genome.kind {kind} (it searches {searched})")
        genome.params = []
        if self.evaluation.backend != "hf":
            raise FieldProblem(
                "evaluation.backend", f"expected hf with genome.kind {kind} ({engine}), got {self.evaluation.backend!r}"
            )
        if self.evaluation.dtype != "auto":
            raise FieldProblem("evaluation.dtype", f"expected auto with genome.kind {kind}: {dtype}")

    def _check_moe(self, info: ValidationInfo) -> None:
        """The mergekit-moe config names the models and how they combine; the references are its parents."""
        if self.genome.moe is None:
            raise FieldProblem("genome.moe", "expected the mergekit-moe config to search (genome.moe.config), got none")
        for section, field in (("models", "models"), ("merge", "merge.method")):
            if getattr(self, section) is not None:
                raise FieldProblem(
                    field,
                    "expected none with genome.kind moe (genome.moe.config names the models and how they combine)",
                )
        self._check_live_model(
            "experts and their residual scales",
            "an engine's experts are fixed when it starts",
            "candidates are scored in the mergekit-moe config's dtype",
        )
        moe = self.genome.moe.moe
        children = [e.source_model for e in moe.experts if e.source_model != moe.base_model]
        if not children:
            raise FieldProblem("genome.moe.config.experts", "expected an expert other than base_model, got none")
        models = {"base": moe.base_model, "fine_tunes": list(dict.fromkeys(children))}
        self.models = ModelsConfig.model_validate(models, context=info.context)

    def _check_method(self) -> None:
        name = self.merge.method
        searchable = sorted(n for n, m in METHODS.items() if _searchable(m))
        if name not in METHODS or not _searchable(METHODS[name]):
            raise FieldProblem("merge.method", f"expected one of {', '.join(searchable)}, got {name!r}")
        method = self.merge.spec
        inputs = len(self.models.fine_tunes) + (method.base != "ignored")
        low, high = method.min_models, method.max_models
        if inputs < low or (high is not None and inputs > high):
            count = f"exactly {low}" if low == high else f"{low} to {high}" if high else f"at least {low}"
            base = "" if method.base == "ignored" else ", the base included"
            raise FieldProblem("models.fine_tunes", f"expected {count} models for {name}{base}, got {inputs}")
        for key, value in self.merge.parameters.items():
            param = method.param(key)
            if param is None:
                known = ", ".join(p.name for p in method.params)
                raise FieldProblem(f"merge.parameters.{key}", f"expected a parameter of {name} ({known}), got {key!r}")
            if isinstance(param.default, bool) != isinstance(value, bool):
                kind = "true or false" if isinstance(param.default, bool) else "a number"
                raise FieldProblem(f"merge.parameters.{key}", f"expected {kind}, got {shown(value)}")

    def _check_genome(self) -> None:
        method, genome = self.merge.spec, self.genome
        if genome.params is None:
            searched = _default_searched(method) - set(self.merge.parameters)  # fixed ones stay fixed
            genome.params = [p.name for p in method.params if p.name in searched]
        for index, name in enumerate(genome.params):
            param = method.param(name)
            if param is None or isinstance(param.default, bool):
                numeric = ", ".join(p.name for p in method.params if not isinstance(p.default, bool))
                raise FieldProblem(
                    f"genome.params[{index}]",
                    f"expected a numeric parameter of {method.name} ({numeric}), got {name!r}",
                )
            if name in genome.params[:index] or name in self.merge.parameters:
                raise FieldProblem(
                    f"genome.params[{index}]", f"expected {name!r} once (searched OR fixed), got it twice"
                )
            if name not in genome.bounds and name not in DEFAULT_BOUNDS:
                raise FieldProblem(f"genome.bounds.{name}", f"expected [lower, upper] for searched {name!r}, got none")
        for name in genome.bounds:
            if name not in genome.params:
                raise FieldProblem(
                    f"genome.bounds.{name}", f"expected bounds only for searched {genome.params}, got {name!r}"
                )
        if not genome.params:
            raise FieldProblem("genome.params", "expected at least one parameter to search, got none")
        if genome.smooth and genome.layer_granularity != 1:
            raise FieldProblem("genome.smooth", "expected smooth knots or layer_granularity groups, got both")

    def _check_objectives(self) -> None:
        seen = set()
        for index, objective in enumerate(self.objectives):
            key = (objective.task, objective.metric)
            if key in seen:
                raise FieldProblem(f"objectives[{index}]", f"expected each task/metric once, got {key} twice")
            seen.add(key)
        if len(self.objectives) > 1 and self.optimizer.name in ("cmaes", "tpe", "gp"):
            raise FieldProblem(
                "optimizer.name",
                f"expected nsga2 or random for {len(self.objectives)} objectives (a Pareto search), "
                f"got {self.optimizer.name!r}",
            )
        searched = {objective.task for objective in self.objectives}
        for index, task in enumerate(self.held_out.tasks):
            if task.task in searched:
                raise FieldProblem(
                    f"held_out.tasks[{index}].task",
                    f"expected a task the search never sees, got objective {task.task!r}",
                )

    @property
    def where(self) -> str:
        """The file this config was read from (or what from_dict was told)."""
        return self._where

    def eval_config(self) -> EvalConfig:
        """The evaluator's config: the evaluation section with the fitness subset seed."""
        options = self.evaluation.model_dump(exclude={"num_fewshot", "subset_seed"})
        return EvalConfig(**options, subset_seed=self.fitness.subset_seed)

    def objective_specs(self) -> list[TaskSpec]:
        """What the search scores, one TaskSpec per objective, limited to fitness.limit items."""
        return [self._spec(objective, self.fitness.limit) for objective in self.objectives]

    def search_parts(self) -> list[list[TaskSpec]]:
        """The fitness items in parts, one per rung: the items rung k adds to rung k - 1 (without rungs, one
        part: objective_specs). Rung k scores parts 0..k."""
        rungs = self.fitness.rungs
        if rungs is None:
            return [self.objective_specs()]
        bounds = zip([0, *rungs[:-1]], rungs, strict=True)
        return [[spec.model_copy(update={"part": bound}) for spec in self.objective_specs()] for bound in bounds]

    def held_out_specs(self) -> list[TaskSpec]:
        """What only the final report scores; never seen by the search."""
        return [self._spec(task, self.held_out.limit) for task in self.held_out.tasks]

    def selection_specs(self) -> list[TaskSpec]:
        """The objectives again, on the selection.limit items that follow the fitness ones; none without a
        selection section."""
        if self.selection is None:
            return []
        return [self._spec(objective, self.selection.limit, self.fitness.limit) for objective in self.objectives]

    def _spec(self, task: TaskConfig, limit: int | None, offset: int = 0) -> TaskSpec:
        fewshot = self.evaluation.num_fewshot if task.num_fewshot is None else task.num_fewshot
        return TaskSpec(
            task=task.task,
            metric=task.metric,
            higher_is_better=task.direction == "maximize",
            limit=limit,
            offset=offset,
            num_fewshot=fewshot,
        )

    @property
    def directions(self) -> list[str]:
        """One Optuna direction per objective, in order."""
        return [objective.direction for objective in self.objectives]

    def bounds(self, param: str) -> tuple[float, float]:
        low, high = self.genome.bounds.get(param, DEFAULT_BOUNDS.get(param))
        return float(low), float(high)

    @classmethod
    def from_dict(cls, data: Any, where: str = "<config>", base_dir: Path | None = None, stem: str = "search") -> Self:
        if not isinstance(data, dict):
            raise InputError(where, "<top level>", f"expected a mapping of sections, got {shown(data)}")
        context = {"base_dir": base_dir or Path.cwd(), "stem": stem}
        try:
            config = cls.model_validate(data, context=context)
        except ValidationError as err:
            raise from_validation(err, where, cls) from None
        config._where = where
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        path = Path(path)
        where = str(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as err:
            raise InputError(where, "<file>", f"expected a readable YAML file, got {err.strerror or err}") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
            problem = getattr(err, "problem", None) or "unparseable"
            raise InputError(where, "<yaml>", f"expected valid YAML, got {problem} at {at}") from None
        return cls.from_dict(data, where=where, base_dir=path.resolve().parent, stem=path.stem)


def _searchable(method: MergeMethod) -> bool:
    return bool(_default_searched(method))


def _default_searched(method: MergeMethod) -> set[str]:
    # task_arithmetic declares density, as mergekit's does, but never sparsifies: a gene for it would be wasted.
    return {p.name for p in method.params if not p.inert} & set(SEARCHABLE_BY_DEFAULT)
