"""`evomerge toy-family` and `evomerge plan` end to end, as a user runs them (the installed console script)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from merge_core import Recipe

EVOMERGE = Path(sys.executable).parent / "evomerge"


def test_toy_family_command_writes_loadable_checkpoints_equal_to_the_cache(toy_family, tmp_path):
    out = tmp_path / "family"
    result = subprocess.run([EVOMERGE, "toy-family", out, "--size", "test"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(out) in result.stdout and "rev/search" in result.stdout  # the family and its score table
    for name in ["base", *toy_family.children]:
        written = (out / name / "model.safetensors").read_bytes()
        cached = (toy_family.root / name / "model.safetensors").read_bytes()
        assert written == cached, name
    model = AutoModelForCausalLM.from_pretrained(out / "rev")
    assert model.config.num_hidden_layers == json.loads((out / "base" / "config.json").read_text())["num_hidden_layers"]
    assert sorted(p.name for p in (out / "tasks").glob("toy_*_test.yaml")) == [
        f"toy_{skill}_test.yaml" for skill in sorted(toy_family.children)
    ]


def test_plan_validates_times_and_projects_without_a_run_dir(toy_family, tmp_path):
    config = {
        "models": {"base": str(toy_family.base), "fine_tunes": [str(p) for p in toy_family.children.values()]},
        "merge": {"method": "ties"},
        "objectives": [{"task": "toy_search", "metric": "acc"}],
        "fitness": {"limit": 20},
        "evaluation": {"include_path": str(toy_family.tasks_dir)},
        "budget": {"trials": 50},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([EVOMERGE, "plan", path], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    # By hand: per fine-tune and parameter (weight, density) one gene for the embeddings, one for the final
    # norm + lm_head, and one per layer for each of self_attn, mlp and the remaining layer tensors (the norms).
    layers = json.loads((toy_family.base / "config.json").read_text())["num_hidden_layers"]
    genes = 3 * 2 * (2 + 3 * layers)
    assert lines["genome"].startswith(f"genome        {genes} genes (ties: weight, density), {layers} layers")
    assert f"valid; 3 fine-tunes of {toy_family.base}" in lines["config"]
    advice = (
        f"cmaes ({genes} genes): separable CMA-ES adapts a variance per gene (covariance auto: diagonal above 40 "
        f"genes); at {genes} genes gp would also fit"
    )
    assert genes > 40
    assert lines["optimizer"] == f"optimizer     {advice}"
    assert "50 trials" in lines["budget"] and "projected" in lines
    # Four float32 sources, TIES' task vectors (float32) and ranks (int32) of three fine-tunes, the live model.
    models = [toy_family.base, *toy_family.children.values()]
    weights = [load_file(model / "model.safetensors") for model in models]
    sources, one = sum(t.nbytes for w in weights for t in w.values()), sum(t.nbytes for t in weights[0].values())
    prepared = 3 * one * 2  # per fine-tune and element: a float32 task vector and an int32 rank
    assert lines["memory"].startswith(
        f"memory        cpu, merge.memory fast: sources {sources / 1e6:.1f} MB + task vectors and ranks {prepared / 1e6:.1f} MB + "
        f"live model {one / 1e6:.1f} MB"
    )
    timing = re.fullmatch(r"one candidate merge (\S+)s \+ search eval (\S+)s; worker start (\S+)s", lines["one"])
    assert timing and all(float(seconds) > 0 for seconds in timing.groups()), lines["one"]
    assert not (tmp_path / "run").exists()  # planning starts nothing and writes nothing


def test_demo_end_to_end_on_the_test_family(toy_family, tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [EVOMERGE, "demo", "--out", out, "--size", "test", "--trials", "3"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (out / "search.yml").read_text().count(str(toy_family.root)) >= 4  # the family filled in
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert (summary["trials"]["complete"], summary["trials"]["failed"]) == (3, 0)
    best, gate = summary["best"]["trial"], summary["gate"]
    # best.yml is what the gate chose: the best trial's recipe if it beat the parents and tuned baselines
    exported = Recipe.from_yaml((out / "best.yml").read_text())
    references = {entry["name"]: entry["recipe"] for entry in summary["parents"] + summary["baselines"]}
    chosen = (
        (out / "run" / "recipes" / f"trial-{best}.yml").read_text() if gate["passed"] else references[gate["chosen"]]
    )
    assert exported == Recipe.from_yaml(chosen)
    assert "[3/3] trial" in result.stdout and "best recipe:" in result.stdout
