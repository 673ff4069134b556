"""Score a live in-memory model with lm-eval tasks, many times over.

The search scores one model object again and again while the merge core overwrites its weights in place, so
everything that does not depend on the weights happens once: tasks are resolved and their data read when the
Evaluator is built, each task's item subset is fixed there, and the requests (prompts, few-shot contexts) are
built on the first call. Each call then only runs the model and scores the answers, with lm-eval's own
request, filter, metric and aggregation code. Rebuilding requests on every call (what
`lm_eval.evaluator.evaluate` does) costs more than the forward passes on small models: lm-eval compiles a
Jinja template per document per call.
"""

import difflib
import functools
import numbers
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import datasets.config
import huggingface_hub.constants
import torch
from lm_eval.api.group import Group
from lm_eval.api.metrics import mean, nanmean
from lm_eval.api.model import LM
from lm_eval.api.task import Task
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evaluators.config import EvalConfig, TaskSpec
from evaluators.vllm_backend import require_vllm
from merge_core.errors import InputError


@dataclass(frozen=True)
class TaskScore:
    task: str  # the TaskSpec's task: one task, or a group
    metric: str  # "name,filter", lm-eval's result key
    value: float  # lm-eval's aggregate over the items (a group's: its own aggregate over its tasks)
    higher_is_better: bool
    n_items: int
    # Which items, in scoring order: indices into the task's evaluation split; for a group "task:index".
    item_ids: list[int] | list[str]
    # One number per item, aligned with item_ids (for paired statistics). Corpus-level metrics (bleu,
    # perplexity) have no per-item number of their own: theirs is the aggregate over that one item.
    per_item: list[float]


class _LiveHFLM(HFLM):
    """HFLM that computes once what stays fixed while only the weights change. On the toy families these
    took ~45% of an evaluation: tokenizing the same prompts again (~35%), and `max_length`, which HFLM
    re-derives from the model config three times per request (~10%)."""

    @functools.cached_property
    def max_length(self) -> int:
        return super().max_length

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list[int]:
        if kwargs:
            return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
        key = (string, add_special_tokens, left_truncate_len)
        cache = self.__dict__.setdefault("_encoded", {})
        if key not in cache:
            cache[key] = super().tok_encode(string, add_special_tokens, left_truncate_len)
        return list(cache[key])  # a copy: callers may slice and extend what they get


def hf_lm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: EvalConfig) -> HFLM:
    """Wrap a live model for lm-eval once. HFLM keeps a reference, not a copy: weights the caller later
    overwrites in place are what the next `Evaluator.evaluate` scores. A dtype other than "auto" casts the
    model in place."""
    if config.dtype != "auto":
        model.to(getattr(torch, config.dtype))
    return _LiveHFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size, **config.model_args)


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Task data must be on local disk. With the hub libraries online, a dataset that is not would be
    retried over the network for tens of seconds (or hang behind a firewall) instead of failing at once."""
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _first_line(err: BaseException) -> str:
    text = str(err).strip().strip("'\"") or type(err).__name__
    return text.splitlines()[0]


def _subset(n_docs: int, spec: TaskSpec, rng: random.Random) -> list[int]:
    """Items [offset, offset + limit) of one seeded order of the task's items, in index order.

    The order starts with the subset a spec of `limit: offset` draws (so an offset-less spec keeps the items it
    always had) and goes on with the other items, drawn from the same generator. Not the prefix of one long
    sample: random.sample switches algorithm with the sample's size, so that would move the first items.
    """
    skipped = set(rng.sample(range(n_docs), spec.offset))
    rest = [i for i in range(n_docs) if i not in skipped]
    return sorted(rng.sample(rest, len(rest) if spec.limit is None else min(spec.limit, len(rest))))


def _part(item_ids: list[int], part: tuple[int, int], rng: random.Random, where: str) -> list[int]:
    """Positions [start, stop) of the items in one seeded shuffle, in index order: parts that tile [0, n) are
    disjoint, and the first k parts are the first items of the shuffle whatever comes after them."""
    start, stop = part
    if not start < stop <= len(item_ids):
        raise InputError(where, "part", f"expected start < stop <= the {len(item_ids)} items, got {start}..{stop}")
    order = list(item_ids)
    rng.shuffle(order)
    return sorted(order[start:stop])


@dataclass
class _BoundTask:
    """One lm-eval task resolved for a TaskSpec: the task object, its fixed items and the metric to read."""

    task: Task
    metric: str
    filter_name: str
    higher_is_better: bool
    item_ids: list[int]
    aggregate: Callable[[list], float]

    def score(self) -> TaskScore:
        """Score the responses the last run left on the task's instances."""
        self.task.apply_filters()
        by_doc = defaultdict(list)
        for instance in self.task.instances:
            by_doc[instance.doc_id].append(instance)
        raw = []
        for doc_id in sorted(by_doc):
            instances = sorted(by_doc[doc_id], key=lambda instance: instance.idx)
            responses = [instance.filtered_resps[self.filter_name] for instance in instances]
            raw.append(self.task.process_results(instances[0].doc, responses)[self.metric])
        return TaskScore(
            task=self.task.task_name,
            metric=f"{self.metric},{self.filter_name}",
            value=float(self.aggregate(raw)),
            higher_is_better=self.higher_is_better,
            n_items=len(raw),
            item_ids=list(self.item_ids),
            per_item=[float(x) if isinstance(x, numbers.Real) else float(self.aggregate([x])) for x in raw],
        )


@dataclass
class _BoundSpec:
    """A TaskSpec resolved: one task, or an lm-eval group of tasks scored as one by the group's aggregate."""

    spec: TaskSpec
    members: list[_BoundTask]
    group: Group | None

    def score(self) -> TaskScore:
        scores = [member.score() for member in self.members]
        if self.group is None:
            return scores[0]
        key = scores[0].metric
        aggregated = self.group.aggregate({s.task: {key: s.value, "sample_len": s.n_items} for s in scores})
        return TaskScore(
            task=self.spec.task,
            metric=key,
            value=float(aggregated[key]),
            higher_is_better=scores[0].higher_is_better,
            n_items=sum(s.n_items for s in scores),
            item_ids=[f"{s.task}:{i}" for s in scores for i in s.item_ids],
            per_item=[x for s in scores for x in s.per_item],
        )


class Evaluator:
    """Scores an lm-eval LM on a fixed list of tasks; build one per task list (search, held-out test)."""

    def __init__(self, config: EvalConfig, tasks: Sequence[TaskSpec]):
        if config.backend == "vllm":
            require_vllm()
        if not tasks:
            raise InputError("tasks", "tasks", "expected at least one task, got an empty list")
        seen: set[str] = set()
        for i, spec in enumerate(tasks):
            if spec.task in seen:
                raise InputError(f"tasks[{i}] ({spec.task})", "task", "expected each task once, got it twice")
            seen.add(spec.task)
        self.config = config
        manager = self._task_manager()
        self.tasks = [self._bind(manager, spec, f"tasks[{i}] ({spec.task})") for i, spec in enumerate(tasks)]
        self._requests_for: LM | None = None

    def evaluate(self, lm: LM) -> dict[str, TaskScore]:
        """Score `lm` as its weights are now. Nothing is cached between calls except the requests."""
        if self._requests_for is not lm:
            self._build_requests(lm)
        pending = defaultdict(list)
        for member in self._members():
            for instance in member.task.instances:
                instance.resps.clear()
                instance.filtered_resps.clear()
                pending[instance.request_type].extend([instance] * instance.repeats)
        # One call per request type across all tasks, as lm-eval does: the LM batches them together.
        for request_type, instances in pending.items():
            responses = getattr(lm, request_type)(instances, disable_tqdm=True)
            for instance, response in zip(instances, responses, strict=True):
                instance.resps.append(response)
        return {bound.spec.task: bound.score() for bound in self.tasks}

    def sizes(self) -> dict[str, dict[str, int]]:
        """Each spec's tasks (a group's members, or the task itself) and their item counts, before any limit."""
        return {
            bound.spec.task: {member.task.task_name: len(member.task.eval_docs) for member in bound.members}
            for bound in self.tasks
        }

    def _members(self) -> list[_BoundTask]:
        return [member for bound in self.tasks for member in bound.members]

    def _task_manager(self) -> TaskManager:
        path = self.config.include_path
        if path is not None and not path.is_dir():
            raise InputError("eval config", "include_path", f"expected a directory of task YAMLs, got {path}")
        if path is None and not self.config.uses_defaults:
            raise InputError(
                "eval config", "include_defaults", "expected include_path or include_defaults, got neither"
            )
        return TaskManager(include_path=path, include_defaults=self.config.uses_defaults)

    def _bind(self, manager: TaskManager, spec: TaskSpec, where: str) -> _BoundSpec:
        if spec.task not in manager.all_tasks:
            source = f" in {self.config.include_path}" if self.config.include_path else ""
            close = difflib.get_close_matches(spec.task, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise InputError(where, "task", f"expected a task known to lm-eval{source}, got {spec.task!r}{hint}")
        try:
            with nullcontext() if self.config.download_data else _hub_offline():
                loaded = manager.load([spec.task])
        except Exception as err:  # any failure to read the data is the user's input, not our bug
            raise InputError(
                where, "data", f"expected the task's data on local disk: {type(err).__name__}: {_first_line(err)}"
            ) from None
        group = loaded["groups"].get(spec.task)
        if group is None and len(loaded["tasks"]) != 1:
            members = ", ".join(sorted(loaded["tasks"])[:5])
            raise InputError(
                where, "task", f"expected a task or group, got a tag of {len(loaded['tasks'])} tasks ({members}, ...)"
            )
        members = [self._bind_task(task, spec, where) for task in loaded["tasks"].values()]
        if group is not None:
            metric, filter_name = members[0].metric, members[0].filter_name
            aggregates = group.aggregate_metric_list or []
            if not any(a.metric == metric and filter_name in (a.filter_list or [filter_name]) for a in aggregates):
                raise InputError(
                    where, "metric", f"expected a metric the group aggregates, got {metric},{filter_name} (it has none)"
                )
        return _BoundSpec(spec=spec, members=members, group=group)

    def _bind_task(self, task: Task, spec: TaskSpec, where: str) -> _BoundTask:
        if getattr(task, "UNSAFE_CODE", False) and not self.config.confirm_run_unsafe_code:
            raise InputError(where, "task", "runs model-written code; set confirm_run_unsafe_code to allow it")
        declared = task.higher_is_better()  # every metric the task computes -> lm-eval's direction
        filters = [f["name"] for f in task.config.filter_list] if task.config.filter_list else ["none"]
        metric, _, filter_name = (spec.metric or "").partition(",")
        metric, filter_name = metric or next(iter(declared)), filter_name or filters[0]
        if metric not in declared:
            raise InputError(where, "metric", f"expected one of {', '.join(declared)}, got {metric!r}")
        if filter_name not in filters:
            raise InputError(where, "metric", f"expected a filter of {', '.join(filters)}, got {filter_name!r}")

        # The same overrides lm-eval's simple_evaluate applies, set once on the task object.
        if spec.num_fewshot is not None:
            task.set_config(key="num_fewshot", value=spec.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        if task.get_config("output_type") == "generate_until":
            overrides = dict(self.config.gen_kwargs)
            if self.config.max_gen_toks is not None:
                overrides["max_gen_toks"] = self.config.max_gen_toks
            if overrides:
                task.set_config(key="generation_kwargs", value=overrides, update=True)
        task.set_fewshot_seed(seed=self.config.fewshot_seed)

        n_docs = len(task.eval_docs)
        if spec.offset >= n_docs:
            raise InputError(where, "offset", f"expected fewer than the task's {n_docs} items, got {spec.offset}")
        # The task name in the seed: a group's equally sized members do not all get the same indices.
        seed = f"{self.config.subset_seed}:{task.task_name}"
        item_ids = _subset(n_docs, spec, random.Random(seed))
        aggregate = task.aggregation()[metric]
        if spec.part is not None:
            if aggregate not in (mean, nanmean):
                raise InputError(
                    where,
                    "metric",
                    f"expected a metric averaged over items (fitness rungs score parts of them), got {metric} "
                    f"aggregated by {getattr(aggregate, '__name__', aggregate)}",
                )
            item_ids = _part(item_ids, spec.part, random.Random(f"{seed}:parts"), where)
        return _BoundTask(
            task=task,
            metric=metric,
            filter_name=filter_name,
            higher_is_better=declared[metric] if spec.higher_is_better is None else spec.higher_is_better,
            item_ids=item_ids,
            aggregate=aggregate,
        )

    def _build_requests(self, lm: LM) -> None:
        """Prompts depend on the LM only through its chat template, so they are built once per LM object."""
        chat = self.config.apply_chat_template
        for member in self._members():
            everything = len(member.item_ids) == len(member.task.eval_docs)
            member.task.build_all_requests(
                samples=None if everything else member.item_ids,
                system_instruction=self.config.system_instruction,
                apply_chat_template=chat,
                fewshot_as_multiturn=self.config.fewshot_as_multiturn,
                chat_template=lm.apply_chat_template if chat else None,
                tokenizer_name=lm.tokenizer_name if chat else "",
            )
        self._requests_for = lm
