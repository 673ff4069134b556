"""The candidate worker: one per Ray actor. Sources, a live model and the evaluators are loaded once; each
candidate then costs one in-memory merge written into the live model's weights, and one lm-eval pass. Layer
paths and MoE candidates get live models of their own (merge_core/path_model.py, merge_core/moe_model.py)."""

import time
from dataclasses import dataclass

import torch

from evaluators import EvalConfig, Evaluator, TaskSpec
from merge_core import MergeSession, Recipe
from merge_core.chat_template import template_text
from merge_core.layer_path import LayerPath
from merge_core.moe import MoESources
from merge_core.moe_config import MoEConfig, read_candidate
from merge_core.moe_model import MoEModel
from merge_core.path_model import PathModel
from merge_core.sources import resolve_model_dir
from merge_core.tokenizer_merge import VocabularySettings

# Mixed into vLLM's engine workers so the merge runs where the engine's weights live.
ENGINE_MERGE = "search.execution.engine_merge.EngineMerge"

# The fitness items; the same tasks' next items (where the winner is chosen); tasks the search never sees.
SEARCH, SELECTION, HELDOUT = "search", "selection", "heldout"


@dataclass(frozen=True)
class WorkerSpec:
    models: tuple[str, ...]  # every source a candidate may use; the first is the live model's skeleton
    device: str
    eval_config: EvalConfig
    search_parts: tuple[tuple[TaskSpec, ...], ...]  # the fitness items, one part per rung (SearchConfig.search_parts)
    heldout_tasks: tuple[TaskSpec, ...]
    selection_tasks: tuple[TaskSpec, ...] = ()  # none: no selection split configured
    threads: int | None = None
    trust_remote_code: bool = False
    lean: bool = False  # the merge session's mode (merge.memory, as the memory plan resolved it)
    # Merges kept resident as extra sources, (name, recipe YAML, seed): ps+dfs's stage 1, which paths read.
    stages: tuple[tuple[str, str, int], ...] = ()
    chat_template: str | None = None  # merge.chat_template: the evaluation tokenizer's template for every candidate
    moe: str | None = None  # genome.kind moe: the mergekit-moe config (YAML) whose experts candidates choose from


@dataclass(frozen=True)
class Job:
    recipe_yaml: str
    seed: int
    split: str = SEARCH  # SEARCH, SELECTION or HELDOUT
    part: int = 0  # of the search split: which rung's new items


@dataclass(frozen=True)
class JobResult:
    scores: dict[str, float]  # task -> metric value
    per_item: dict[str, list[float]]  # task -> per-item scores, for paired statistics
    merge_s: float
    eval_s: float
    cached_items: int = 0  # of per_item, the items a score cache answered instead of a model

    @property
    def items(self) -> int:
        """Items scored for this result, the unit evaluation cost scales with (a task group counts all its
        tasks' items); those the score cache answered cost nothing."""
        return sum(len(scores) for scores in self.per_item.values()) - self.cached_items


class CandidateWorker:
    def __init__(self, spec: WorkerSpec):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        # (recipe YAML, seed, the lm-eval model scoring it) of the candidate live now
        self.live: tuple[str, int, object] | None = None
        self.paths: PathModel | None = None  # built on the first layer-path candidate
        self.path_lm = None
        self.moe: MoEModel | None = None  # built on the first MoE candidate
        self.moe_lm = None
        # 'auto' is resolved here, not by the driver: on a cluster the worker's node decides what it has
        if spec.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = spec.device
        skeleton = resolve_model_dir(spec.models[0])
        self.evaluators = {(SEARCH, k): Evaluator(spec.eval_config, part) for k, part in enumerate(spec.search_parts)}
        if spec.heldout_tasks:  # a search may have none: its report then compares nothing held out
            self.evaluators[HELDOUT, 0] = Evaluator(spec.eval_config, spec.heldout_tasks)
        if spec.selection_tasks:
            self.evaluators[SELECTION, 0] = Evaluator(spec.eval_config, spec.selection_tasks)
        if spec.eval_config.backend == "vllm":
            from evaluators.vllm_backend import swap_weights, vllm_lm

            # The sources live inside the engine's workers, on the engine's devices (engine_merge.py).
            self.session = self.model = None
            self.lm = vllm_lm(skeleton, spec.eval_config, worker_extension=ENGINE_MERGE)
            swap_weights(self.lm, "evomerge_open", list(spec.models), spec.lean)
            return
        from evaluators import hf_lm

        self.session = MergeSession(list(spec.models), device=self.device, lean=spec.lean)
        for name, recipe_yaml, seed in spec.stages:
            self.session.add_merged(name, Recipe.from_yaml(recipe_yaml), seed)

        self.tokenizer = self._templated(
            AutoTokenizer.from_pretrained(skeleton, trust_remote_code=spec.trust_remote_code)
        )
        self.model = AutoModelForCausalLM.from_pretrained(
            skeleton, dtype="auto", trust_remote_code=spec.trust_remote_code
        ).to(self.device)
        self.model.eval()
        self.lm = hf_lm(self.model, self.tokenizer, spec.eval_config)
        # lm-eval models over the live model, one per output vocabulary (None: the skeleton's), built once each
        self.scorers: dict[VocabularySettings | str | None, object] = {None: self.lm}

    def run(self, job: Job) -> JobResult:
        start = time.perf_counter()
        # The candidate already live (its next rung, or another split): its weights are in place.
        if self.live is None or self.live[:2] != (job.recipe_yaml, job.seed):
            self.live = None  # a merge that fails half way leaves no candidate live
            lm = self._merge(read_candidate(job.recipe_yaml), job.seed)
            self.live = (job.recipe_yaml, job.seed, lm)
        merged = time.perf_counter()
        scores = self.evaluators[job.split, job.part].evaluate(self.live[2])
        return JobResult(
            scores={task: score.value for task, score in scores.items()},
            per_item={task: score.per_item for task, score in scores.items()},
            merge_s=merged - start,
            eval_s=time.perf_counter() - merged,
        )

    def _merge(self, recipe: Recipe | MoEConfig, seed: int):
        """Make `recipe` the live candidate; returns the lm-eval model that now scores it."""
        if isinstance(recipe, MoEConfig):
            return self._build_moe(recipe, seed)
        if self.model is None:
            from evaluators.vllm_backend import swap_weights

            swap_weights(self.lm, "evomerge_apply", recipe.to_yaml(), seed)
            return self.lm
        path = LayerPath.of(recipe)
        if path is None:
            lm = self._scorer(recipe)
            self.session.apply(recipe, self.model, seed=seed)
            return lm
        # A layer path is scored on a model whose layers are the sources' own: no merge, no copy.
        if self.paths is None:
            from evaluators import hf_lm

            self.paths = PathModel(self.session, self.spec.trust_remote_code)
            # never cast: the path model's tensors are the sources'
            uncast = self.spec.eval_config.model_copy(update={"dtype": "auto"})
            self.path_lm = hf_lm(self.paths.model, self.tokenizer, uncast)
        self.paths.build(path)
        return self.path_lm

    def _scorer(self, recipe: Recipe):
        """The lm-eval model scoring `recipe`, with the live model sized to its output vocabulary: with a tokenizer
        setting the merged vocabulary and tokenizer (what `evomerge merge` writes); without one the sources'
        own, which a parent whose vocabulary differs from the skeleton's brings with it."""
        from transformers import AutoTokenizer

        from evaluators import hf_lm

        settings = VocabularySettings.of(recipe)
        donor = self.session.checkpoints[recipe.base_model or recipe.model_refs()[0]]
        rows = self.session.checkpoints[self.spec.models[0]].vocab_size
        vocabulary = settings and self.session.vocabulary(self.session.plan(recipe))
        if vocabulary:
            key, rows = settings, vocabulary.size
        elif donor.vocab_size != rows:
            key, rows = donor.ref, donor.vocab_size
        else:
            key = None
        if self.model.get_input_embeddings().weight.shape[0] != rows:
            self.model.resize_token_embeddings(rows, mean_resizing=False)  # apply() writes every row
        if key not in self.scorers:
            tokenizer = (
                vocabulary.tokenizer
                if vocabulary
                else AutoTokenizer.from_pretrained(donor.path, trust_remote_code=self.spec.trust_remote_code)
            )
            self.scorers[key] = hf_lm(self.model, self._templated(tokenizer), self.spec.eval_config)
        return self.scorers[key]

    def _templated(self, tokenizer):
        """`tokenizer` with merge.chat_template, which the exported merge's tokenizer will carry, so candidates
        are scored through it."""
        if self.spec.chat_template:
            dirs = [self.session.checkpoints[ref].path for ref in self.spec.models]
            tokenizer.chat_template = template_text(self.spec.chat_template, dirs) or tokenizer.chat_template
        return tokenizer

    def _build_moe(self, config: MoEConfig, seed: int):
        """An MoE candidate is scored on a Mixtral built in memory from the sources loaded (and the prompt
        routers computed) on the first one."""
        from evaluators import hf_lm

        if self.moe is None:
            self.moe = MoEModel(MoESources(MoEConfig.from_yaml(self.spec.moe), device=self.device), self.device)
        if self.moe.build(config, seed):  # a new model object: the wrapper must hold it
            self.moe_lm = hf_lm(self.moe.model, self.tokenizer, self.spec.eval_config)
        return self.moe_lm
