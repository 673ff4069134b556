"""The score cache: per-item results by recipe, split and part, kept in the run dir.

Scoring a recipe again on items it was already scored on costs nothing: a candidate going on to the next rung
pays only that rung's new items; a recipe asked twice, a tuned baseline the search already scored, and
everything a resumed run scored before its kill are answered from here. A recipe is keyed by its YAML and the
merge seed (DARE's drops depend on it), so equal keys are the same candidate model.

Each key's file holds, per split, the parts scored so far in part order (part k only after parts 0..k-1),
each as the worker returned it. It is our own JSON, read back as data; a file that does not parse is a miss
(the items are scored again and the file rewritten), never an error.
"""

import hashlib
import json
from dataclasses import asdict
from typing import Any

import numpy as np

from search.execution.worker import JobResult
from search.run_dir import RunDir

FORMAT = 1


def recipe_key(recipe_yaml: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\n{recipe_yaml}".encode()).hexdigest()[:32]


class ScoreCache:
    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir
        self._entries: dict[str, dict[str, list[dict[str, Any]]]] = {}  # key -> split -> parts, as in the file

    def parts(self, key: str, split: str) -> list[JobResult]:
        """The parts of `split` this recipe was scored on, in part order."""
        return [JobResult(**part) for part in self._entry(key).get(split, [])]

    def add(self, key: str, split: str, part: int, result: JobResult) -> None:
        """Keep part `part` of `split`; a part already kept stays as it was (the same items, the same model)."""
        entry = self._entry(key)
        parts = entry.setdefault(split, [])
        if part < len(parts):
            return
        if part != len(parts):
            raise ValueError(f"score cache: part {part} of {split} before part {len(parts)}")
        parts.append(asdict(result) | {"cached_items": 0})
        self.run_dir.write_json(self.run_dir.item_scores(key), {"format": FORMAT, "splits": entry})

    def _entry(self, key: str) -> dict[str, list[dict[str, Any]]]:
        if key not in self._entries:
            self._entries[key] = self._read(key)
        return self._entries[key]

    def _read(self, key: str) -> dict[str, list[dict[str, Any]]]:
        path = self.run_dir.item_scores(key)
        try:
            data = json.loads(path.read_text())
            splits = data["splits"] if data.get("format") == FORMAT else {}
            for parts in splits.values():
                for part in parts:
                    JobResult(**part)  # the fields it must have, and no others
            return splits
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return {}


def combine(parts: list[JobResult], fresh: list[bool]) -> JobResult:
    """One result over parts 0..k; `fresh` says which were scored for this request (the others came from the
    cache and cost nothing). One part keeps lm-eval's own aggregate; over several, a task's score is the mean
    of its items, which is its aggregate: rungs only take item-averaged metrics (the harness checks)."""
    if len(parts) == 1 and fresh[0]:
        return parts[0]
    per_item = {task: [v for part in parts for v in part.per_item[task]] for task in parts[0].per_item}
    scores = parts[0].scores if len(parts) == 1 else {task: float(np.mean(v)) for task, v in per_item.items()}
    return JobResult(
        scores=scores,
        per_item=per_item,
        merge_s=sum(part.merge_s for part, new in zip(parts, fresh, strict=True) if new),
        eval_s=sum(part.eval_s for part, new in zip(parts, fresh, strict=True) if new),
        cached_items=sum(part.items for part, new in zip(parts, fresh, strict=True) if not new),
    )
