"""MergeSession: sources loaded once and kept resident; each candidate recipe costs only its arithmetic.

A search merges hundreds of recipes over the same models, so everything that does not depend on the recipe's
numbers is done once and kept: the source tensors (on the session's device), their casts to the merge dtype,
and each method's `prepare` output (task vectors, magnitude order). `apply` then writes a candidate straight
into a live model's parameters, so evaluating it needs no checkpoint and no reload.

`lean=True` keeps only the sources: casts and prepared state are computed per tensor for each candidate and
dropped (the methods' unprepared path is the same arithmetic, so the result is bit for bit the same). That
trades time for memory: for TIES on a 7B family the prepared state is twice the sources (merge_core/memory.py).
"""

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from merge_core import architecture
from merge_core.chat_template import template_text
from merge_core.errors import InputError
from merge_core.methods import MergeInputs
from merge_core.plan import MergePlan, TensorJob, plan_merge
from merge_core.recipe import Recipe
from merge_core.sharding import Shard, check_heads, check_shardable
from merge_core.sources import Checkpoint, check_compatible, check_same_vocabulary, load_checkpoint, load_lazily
from merge_core.tokenizer_merge import Vocabulary, VocabularySettings, align, build_vocabulary
from merge_core.writer import DEFAULT_SHARD_BYTES, write_checkpoint


class MergeSession:
    def __init__(
        self,
        models: Sequence[str],
        device: str = "cpu",
        lean: bool = False,
        shard: Shard | None = None,
        out_of_core: bool = False,
    ):
        """`shard`: hold and merge only that tensor-parallel rank's part of every tensor (merge_core/sharding.py).
        `out_of_core`: keep nothing resident; every input tensor is read from disk when merged (a one-off merge
        of models larger than memory: `evomerge merge`), which implies lean."""
        if not models:
            raise ValueError("MergeSession needs at least one model")
        if out_of_core and shard is not None:
            raise ValueError("an out-of-core session cannot be sharded")
        self.device, self.lean, self.shard = device, lean or out_of_core, shard
        load = (
            (lambda ref: load_lazily(ref, device)) if out_of_core else (lambda ref: load_checkpoint(ref, device, shard))
        )
        self.checkpoints: dict[str, Checkpoint] = {ref: load(ref) for ref in dict.fromkeys(models)}
        # Vocabularies may differ: a recipe with a tokenizer setting aligns them, `plan` refuses any other.
        check_compatible(list(self.checkpoints.values()), same_vocabulary=False)
        if shard is not None:
            for ref, checkpoint in self.checkpoints.items():
                check_heads(checkpoint.config, shard, ref)
        reference = next(iter(self.checkpoints.values()))
        self.tensor_names = list(reference.tensors)
        self.num_layers = architecture.num_layers(self.tensor_names)
        self._casts: dict[tuple[str, str, torch.dtype], torch.Tensor] = {}
        self._prepared: dict[tuple, dict] = {}
        # per tokenizer setting: the output vocabulary, and the token-indexed inputs aligned to it
        self._vocabularies: dict[VocabularySettings, Vocabulary] = {}
        self._aligned: dict[tuple, dict[str, torch.Tensor]] = {}

    def add_merged(self, name: str, recipe: Recipe, seed: int = 0) -> None:
        """Keep `recipe`'s merge resident as one more source named `name` (a two-stage merge's first stage,
        which the second then reads like any model). It must keep the sources' depth and tensor names."""
        plan = self.plan(recipe)
        if plan.num_hidden_layers != self.num_layers:
            raise InputError(
                recipe.where,
                "slices",
                f"expected a merge of all {self.num_layers} layers, got {plan.num_hidden_layers}",
            )
        donor = self.checkpoints[plan.base_model or plan.models[0]]
        tensors = dict(self.merged_tensors(plan, seed))
        shapes = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
        dtypes = {key: tensor.dtype for key, tensor in tensors.items()}
        config = self._output_config(plan, donor.config)
        self.checkpoints[name] = Checkpoint(name, donor.path, config, shapes, dtypes, tensors)

    def plan(self, recipe: Recipe) -> MergePlan:
        loaded = list(self.checkpoints)
        for ref in recipe.model_refs():
            if ref not in self.checkpoints:
                raise InputError(recipe.where, "models", f"{ref} is not loaded in this session (loaded: {loaded})")
        if self.shard is not None:
            check_shardable(recipe.merge_method, recipe.method.elementwise, recipe.where)
        plan = plan_merge(recipe, self.tensor_names, self.num_layers, recipe.where)
        if plan.vocabulary is None:
            check_same_vocabulary([self.checkpoints[ref] for ref in recipe.model_refs()])
        elif self.shard is not None:
            raise InputError(recipe.where, plan.vocabulary.source_field, "a tokenizer merge cannot be sharded yet")
        elif plan.vocabulary.source not in ("base", "union"):
            self._checkpoint(plan.vocabulary.source, recipe, plan.vocabulary.source_field)
        return plan

    def vocabulary(self, plan: MergePlan) -> Vocabulary | None:
        """The plan's output vocabulary, built once per tokenizer setting; None when it keeps the sources'."""
        settings = plan.vocabulary
        if settings is None:
            return None
        if settings not in self._vocabularies:
            refs = (*settings.models, *(() if settings.source in ("base", "union") else (settings.source,)))
            dirs = {ref: self.checkpoints[ref].path for ref in refs}
            sizes = {ref: self.checkpoints[ref].vocab_size for ref in refs}
            self._vocabularies[settings] = build_vocabulary(settings, dirs, sizes)
        return self._vocabularies[settings]

    def materialize(self, recipe: Recipe, seed: int = 0) -> dict[str, torch.Tensor]:
        return dict(self.merged_tensors(self.plan(recipe), seed))

    @torch.no_grad()
    def apply(self, recipe: Recipe, model: torch.nn.Module, seed: int = 0) -> None:
        """Overwrite `model`'s weights in place with the merge; raises on non-finite results."""
        targets = model.state_dict(keep_vars=True)
        for name, tensor in self.merged_tensors(self.plan(recipe), seed):
            target = targets.get(name)
            if target is None or target.shape != tensor.shape:
                raise ValueError(f"live model has no tensor {name} of shape {tuple(tensor.shape)}")
            if not torch.isfinite(tensor).all():
                raise InputError(recipe.where, None, f"merged tensor {name} has NaN or infinite values")
            target.data.copy_(tensor)

    def write(self, recipe: Recipe, out_dir: str | Path, seed: int = 0, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
        plan = self.plan(recipe)
        donor = self.checkpoints[plan.base_model or plan.models[0]]
        config = self._output_config(plan, dict(donor.config, num_hidden_layers=plan.num_hidden_layers))
        out_dtype = plan.out_dtype or plan.dtype
        if out_dtype is not None:
            config["dtype"] = str(out_dtype).removeprefix("torch.")
        tokenizer_ref = recipe.vocabulary_source
        own = tokenizer_ref in (None, "base", "union")
        tokenizer_dir = donor.path if own else self._checkpoint(tokenizer_ref, recipe).path
        # `auto` finding no template leaves the tokenizer copied as it is (mergekit rewrites it, unchanged but for
        # the loading flags transformers saves along).
        model_dirs = [self.checkpoints[ref].path for ref in recipe.model_refs()]
        chat_template = recipe.chat_template and template_text(recipe.chat_template, model_dirs)
        vocabulary = self.vocabulary(plan)
        return write_checkpoint(
            Path(out_dir),
            self.merged_tensors(plan, seed),
            config=config,
            tokenizer_dir=tokenizer_dir,
            tokenizer=vocabulary and vocabulary.tokenizer,
            recipe_yaml=recipe.to_yaml(),
            chat_template=chat_template,
            shard_bytes=shard_bytes,
        )

    def merged_tensors(self, plan: MergePlan, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
        method = plan.method
        generator = None
        jobs = plan.jobs
        if method.random:
            # mergekit draws masks from one seeded RNG, tensor by tensor in name order: do the same so a
            # seed reproduces `mergekit-yaml --random-seed N` on CPU.
            generator = torch.Generator(device=self.device).manual_seed(seed)
            jobs = tuple(sorted(jobs, key=lambda job: job.out_name))
        for job in jobs:
            tensors = self._inputs(plan, job)
            inputs = MergeInputs(
                tensors=tensors,
                base_index=job.base_index,
                per_model={key: list(values) for key, values in job.per_model.items()},
                shared=dict(job.shared),
                prepared=self._prepare(plan, job, tensors),
                generator=generator,
                name=job.out_name,
            )
            merged = method.merge(inputs)
            yield job.out_name, merged if plan.out_dtype is None else merged.to(plan.out_dtype)

    def _inputs(self, plan: MergePlan, job: TensorJob) -> list[torch.Tensor]:
        """The job's input tensors, cast to the merge dtype; a token-indexed one aligned to the output vocabulary
        (computed once per tokenizer setting and kept, unless lean; the sources stay as they are)."""
        tensors = [self._input(ref, name, plan.dtype) for ref, name in job.sources]
        axis = architecture.vocabulary_axis(job.out_name)
        if plan.vocabulary is None or axis is None:
            return tensors
        key = (plan.vocabulary, job.sources, job.base_index, plan.dtype)
        aligned = self._aligned.get(key)
        if aligned is None:
            refs = [ref for ref, _ in job.sources]
            base = refs[job.base_index] if job.base_index is not None else None
            vocabulary = self.vocabulary(plan)
            aligned = align(
                vocabulary, plan.vocabulary, dict(zip(refs, tensors, strict=True)), base, axis, job.out_name
            )
            if not self.lean:
                self._aligned[key] = aligned
        return [aligned[ref] for ref, _ in job.sources]

    def _output_config(self, plan: MergePlan, config: dict) -> dict:
        """`config` with the output vocabulary's size (padded), where a tokenizer merge changes it."""
        vocabulary = self.vocabulary(plan)
        if vocabulary is None:
            return config
        if "vocab_size" in config or "text_config" not in config:
            return dict(config, vocab_size=vocabulary.size)
        return dict(config, text_config=dict(config["text_config"], vocab_size=vocabulary.size))

    def _checkpoint(self, ref: str, recipe: Recipe, field: str = "tokenizer_source") -> Checkpoint:
        if ref not in self.checkpoints:
            raise InputError(recipe.where, field, f"{ref} is not loaded in this session")
        return self.checkpoints[ref]

    def _input(self, ref: str, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        tensor = self.checkpoints[ref].tensors[name]
        if dtype is None or tensor.dtype == dtype:
            return tensor
        if self.lean:
            return tensor.to(dtype)
        key = (ref, name, dtype)
        if key not in self._casts:
            self._casts[key] = tensor.to(dtype)
        return self._casts[key]

    def _prepare(self, plan: MergePlan, job: TensorJob, tensors: list[torch.Tensor]) -> dict | None:
        if plan.method.prepare is None or self.lean:
            return None
        # aligned token-indexed inputs differ from the sources': their prepared state too
        vocabulary = plan.vocabulary if architecture.vocabulary_axis(job.out_name) is not None else None
        key = (plan.method.name, job.sources, job.base_index, plan.dtype, vocabulary)
        if key not in self._prepared:
            self._prepared[key] = plan.method.prepare(tensors, job.base_index)
        return self._prepared[key]
