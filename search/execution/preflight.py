"""What a search checks before anything starts (no Ray, no run dir), and what each worker is told to load.

Whatever can be wrong before the first trial is found here, as one InputError line: sources that do not fit
together, what vLLM would refuse (evaluators/vllm_backend.py), tasks and metrics that do not resolve (or that rungs cannot average), held-out tasks inside objective groups,
objective tasks too small for their rungs and selection items, a device this machine does not have, weights
that do not fit in it (execution/memory.py).
"""

import os
from dataclasses import dataclass

import torch

from evaluators import Evaluator
from merge_core import architecture
from merge_core.errors import InputError
from merge_core.layer_path import check_path_architecture
from merge_core.moe import load_sources
from merge_core.plan import plan_merge
from merge_core.recipe import Recipe
from merge_core.sources import CheckpointInfo, check_compatible, read_info
from search.config import SearchConfig
from search.execution.memory import MemoryPlan, check_memory, plan_memory
from search.execution.worker import WorkerSpec
from search.genome.data_flow import STAGE1

Sizes = dict[str, dict[str, int]]  # Evaluator.sizes(): spec task -> the tasks it resolves to -> their items


@dataclass(frozen=True)
class Preflight:
    tensor_names: list[str]
    num_layers: int
    memory: MemoryPlan
    stage1: Recipe | None = None  # ps+dfs's weight merge


def preflight(config: SearchConfig) -> Preflight:
    check_device(config)
    if config.genome.kind == "moe":  # each source's type and MLP shapes, from headers: naming its file and field
        load_sources(config.genome.moe.moe)
    infos = [read_info(ref) for ref in [config.models.base, *config.models.fine_tunes]]
    tokenized = config.genome.kind == "ps" and config.merge.vocabulary_source is not None
    if config.genome.kind == "ps" and not tokenized:
        check_vocabularies(config, infos)
    check_compatible(infos, same_vocabulary=not tokenized)  # a tokenizer setting aligns the token axis
    if config.evaluation.backend == "vllm":
        from evaluators.vllm_backend import check_engine

        execution = config.execution
        check_engine(infos[0].config, config.eval_config(), execution.device, execution.gpus_per_worker, config.where)
    memory = plan_memory(config, infos)
    check_memory(config, memory)
    names = list(infos[0].shapes)
    if config.genome.kind in ("dfs", "ps+dfs"):
        check_path_architecture(names, config.where, "genome.kind")
    # The first rung's part: binding it checks the metric averages items, which rungs need (the same sizes).
    searched = Evaluator(config.eval_config(), config.search_parts()[0]).sizes()
    held_out = Evaluator(config.eval_config(), config.held_out_specs()).sizes() if config.held_out.tasks else {}
    check_held_out(config, searched, held_out)
    check_items(config, searched)
    stage1 = stage1_recipe(config)
    return Preflight(tensor_names=names, num_layers=architecture.num_layers(names), memory=memory, stage1=stage1)


def stage1_recipe(config: SearchConfig) -> Recipe | None:
    """ps+dfs's weight merge (genome.dfs.stage1), checked to read only this search's models and to keep their
    depth, since paths index its layers like theirs; None for other genome kinds."""
    if config.genome.kind != "ps+dfs":
        return None
    path = config.genome.dfs.stage1
    recipe = Recipe.from_yaml(path)  # its own problems name its own file
    known = [config.models.base, *config.models.fine_tunes]
    for ref in recipe.model_refs():
        if ref not in known:
            raise InputError(
                config.where,
                "genome.dfs.stage1",
                f"expected a merge of this search's models (named as models: resolves them, {known[0]!r} ...), "
                f"but {path} reads {ref!r}",
            )
    tensor_names = list(read_info(config.models.base).shapes)
    depth = architecture.num_layers(tensor_names)
    merged = plan_merge(recipe, tensor_names, depth).num_hidden_layers
    if merged != depth:
        raise InputError(
            config.where, "genome.dfs.stage1", f"expected a merge of all {depth} layers, but {path} has {merged}"
        )
    return recipe


def check_vocabularies(config: SearchConfig, infos: list[CheckpointInfo]) -> None:
    """Without a tokenizer setting every recipe reads the sources' token rows as they are: their sizes must agree."""
    base = infos[0]
    for info in infos[1:]:
        if info.vocab_size != base.vocab_size:
            raise InputError(
                config.where,
                "merge.tokenizer_source",
                f"expected one for models whose vocabularies differ: {info.ref} has vocab_size {info.vocab_size}, "
                f"{base.ref} has {base.vocab_size} (set merge.tokenizer_source: union, base or one of the models)",
            )


def check_held_out(config: SearchConfig, searched: Sizes, held_out: Sizes) -> None:
    """The config compares task names; this compares the tasks they resolve to, so a held-out task inside an
    objective group (whose items the search and the selection split score) is refused too."""
    objective_of = {task: objective for objective, members in searched.items() for task in members}
    for index, (name, members) in enumerate(held_out.items()):
        shared = next((task for task in members if task in objective_of), None)
        if shared is not None:
            raise InputError(
                config.where,
                f"held_out.tasks[{index}].task",
                f"expected a task the search never sees, got {name!r} ({shared!r} is in objective "
                f"{objective_of[shared]!r})",
            )


def check_items(config: SearchConfig, searched: Sizes) -> None:
    """Every objective task must hold its fitness items (every rung's) and, after them, its selection items.
    Without rungs or a selection split, a fitness.limit past a task's size just takes all its items."""
    fitness, selection = config.fitness.limit, config.selection
    for members in searched.values():
        for task, size in members.items():
            if selection is not None and fitness + selection.limit > size:
                raise InputError(
                    config.where,
                    "selection.limit",
                    f"expected fitness.limit + selection.limit <= the {size} items of {task!r}, "
                    f"got {fitness} + {selection.limit}",
                )
            if config.fitness.rungs is not None and fitness > size:
                raise InputError(
                    config.where,
                    "fitness.rungs",
                    f"expected rungs of at most the {size} items of {task!r}, got {fitness}",
                )


def check_device(config: SearchConfig) -> None:
    """A local run's workers live on this machine: a CUDA device it lacks would fail every worker's start."""
    device = config.execution.device
    if config.execution.ray_address != "local" or not device.startswith("cuda"):
        return  # 'auto' adapts; on a cluster each worker's node decides what it has
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        have = f"{count} CUDA device(s)" if count else "no CUDA device (torch sees none)"
        raise InputError(
            config.where, "execution.device", f"expected a device this machine has ({have}), got {device!r}"
        )


def worker_spec(config: SearchConfig, memory: MemoryPlan) -> WorkerSpec:
    stage1 = stage1_recipe(config)
    return WorkerSpec(
        models=(config.models.base, *config.models.fine_tunes),
        device=config.execution.device,
        lean=memory.lean,
        eval_config=config.eval_config(),
        search_parts=tuple(tuple(part) for part in config.search_parts()),
        heldout_tasks=tuple(config.held_out_specs()),
        selection_tasks=tuple(config.selection_specs()),
        threads=max(1, (os.cpu_count() or 1) // config.execution.workers),
        trust_remote_code=config.trust_remote_code,
        stages=((STAGE1, stage1.to_yaml(), config.seed),) if stage1 else (),
        chat_template=config.merge.chat_template if config.merge else None,
        moe=config.genome.moe.moe.to_yaml() if config.genome.moe else None,
    )
