"""lm-eval tasks for the toy skills: local jsonl data, greedy exact match by teacher forcing, or by generation.

`output_type: loglikelihood` with the answer + EOS as the continuation and metric `acc` (lm-eval's
`is_greedy`) scores an item right iff greedy decoding gives exactly the answer and then stops: one forward
pass per item. `target_delimiter: ""` because the answer follows the '=' directly, as in training.
The `_gen` twin of each task asks the same thing by generating (`generate_until`, greedy, exact match), the
path real generative benchmarks take; it costs one forward per generated token.
"""

import json
from pathlib import Path

import yaml

from evaluators.toy_family.splits import Item
from evaluators.toy_family.tokenizer import EOS

SPLITS = ("search", "test")


def task_name(skill: str, split: str, generative: bool = False) -> str:
    return f"toy_{skill}_{split}" + ("_gen" if generative else "")


def write_tasks(tasks_dir: Path, splits: dict[str, dict[str, list[Item]]], final_tasks_dir: Path) -> None:
    """One jsonl + YAML per (skill, split) and a group per split, in `tasks_dir`.

    The YAMLs name their data by absolute path under `final_tasks_dir`, where `tasks_dir` will be moved to.
    """
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for skill, by_split in splits.items():
        for split, items in by_split.items():
            name = task_name(skill, split)
            with open(tasks_dir / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in items)
            config = {
                "task": name,
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(final_tasks_dir / f"{name}.jsonl")}},
                "test_split": "test",
                "output_type": "loglikelihood",
                "doc_to_text": "{{prompt}}",
                "doc_to_target": "{{answer}}" + EOS,
                "target_delimiter": "",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                "metadata": {"version": 1},
            }
            (tasks_dir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            generative = {
                **config,
                "task": task_name(skill, split, generative=True),
                "output_type": "generate_until",
                "doc_to_target": "{{answer}}",
                # Greedy, stopping at EOS (lm-eval adds it to `until`); one token more than the longest answer.
                "generation_kwargs": {
                    "until": [EOS],
                    "do_sample": False,
                    "max_gen_toks": 1 + max(len(a) for _, a in items),
                },
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            }
            (tasks_dir / f"{generative['task']}.yaml").write_text(yaml.safe_dump(generative, sort_keys=False))
    for split in SPLITS:
        group = {
            "group": f"toy_{split}",
            "task": [task_name(skill, split) for skill in splits],
            # Unweighted: every skill counts the same, like the family's per-skill average.
            "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": False}],
            "metadata": {"version": 1},
        }
        (tasks_dir / f"toy_{split}.yaml").write_text(yaml.safe_dump(group, sort_keys=False))


def read_items(tasks_dir: Path, skill: str, split: str) -> list[Item]:
    with open(tasks_dir / f"{task_name(skill, split)}.jsonl") as f:
        return [(row["prompt"], row["answer"]) for row in map(json.loads, f)]
