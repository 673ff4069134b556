"""Hostile recipes through `evomerge merge`: exit code 2, one line on stderr, no traceback, no output directory."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_family

from search.cli import main


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    """Models that cannot be merged with tiny_family: another hidden size, another vocab, no weights."""
    root = tmp_path_factory.mktemp("odd")
    wide = make_tiny_family(root / "wide", tie_embeddings=False, children=0, hidden=48)["base"]
    vocab = make_tiny_family(root / "vocab", tie_embeddings=False, children=0, vocab=50)["base"]
    empty = root / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    return {"wide": wide, "vocab": vocab, "empty": str(empty)}


def hostile(f: dict, odd: dict) -> dict[str, tuple[str, str]]:
    """name -> (recipe text, a fragment the one-line error must contain)."""
    b, c0, c1 = f["base"], f["child0"], f["child1"]
    two = f"models:\n  - {{model: {c0}, parameters: {{weight: 1}}}}\n  - {{model: {c1}, parameters: {{weight: 1}}}}\n"
    return {
        "yaml_syntax": ("merge_method: linear\nmodels: [\n", "line"),
        "not_a_mapping": ("- just\n- a list\n", "mapping"),
        "unknown_method": (f"merge_method: frankenmerge\n{two}", "merge_method"),
        "unknown_key": (f"merge_method: linear\nmodelz: []\n{two}", "modelz"),
        "weight_wrong_type": (
            f"merge_method: linear\nmodels:\n  - {{model: {c0}, parameters: {{weight: heavy}}}}\n",
            "weight",
        ),
        "missing_weight": (
            f"merge_method: linear\nmodels:\n  - {{model: {c0}}}\n  - {{model: {c1}}}\n",
            "weight",
        ),
        "missing_base": (f"merge_method: ties\n{two}", "base_model"),
        "empty_models": ("merge_method: linear\nmodels: []\n", "models"),
        "nan_weight": (
            f"merge_method: linear\nmodels:\n  - {{model: {c0}, parameters: {{weight: .nan}}}}\n",
            "weight",
        ),
        "slerp_three_models": (
            f"merge_method: slerp\nbase_model: {b}\nparameters: {{t: 0.5}}\n{two}",
            "slerp",
        ),
        "layer_range_past_end": (
            f"merge_method: passthrough\nslices:\n  - sources: [{{model: {b}, layer_range: [0, 9]}}]\n",
            "layer_range",
        ),
        "layer_range_reversed": (
            f"merge_method: passthrough\nslices:\n  - sources: [{{model: {b}, layer_range: [3, 1]}}]\n",
            "layer_range",
        ),
        "missing_model_path": (
            f"merge_method: linear\nmodels:\n  - {{model: {b}/nowhere, parameters: {{weight: 1}}}}\n",
            "nowhere",
        ),
        "no_weights": (
            f"merge_method: linear\nmodels:\n  - {{model: {odd['empty']}, parameters: {{weight: 1}}}}\n",
            "no weights",
        ),
        "shape_mismatch": (
            f"merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n"
            f"  - {{model: {odd['wide']}, parameters: {{weight: 1}}}}\n",
            "shape",
        ),
        "vocab_mismatch": (
            f"merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n"
            f"  - {{model: {odd['vocab']}, parameters: {{weight: 1}}}}\n",
            "vocab",
        ),
        "two_tokenizer_settings": (
            f"merge_method: linear\ntokenizer_source: union\ntokenizer: {{source: union}}\n{two}",
            "not both",
        ),
        "bad_dtype": (f"merge_method: linear\ndtype: float8\n{two}", "dtype"),
    }


CASES = list(hostile({"base": "", "child0": "", "child1": ""}, {"wide": "", "vocab": "", "empty": ""}))


@pytest.mark.parametrize("case", CASES)
def test_hostile_recipe(case, tiny_family, odd_models, tmp_path, capsys):
    text, fragment = hostile(tiny_family, odd_models)[case]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(text)
    out = tmp_path / "out"
    code = main(["merge", str(recipe), str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evomerge: error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["recipe.yml"]


def test_hostile_recipe_through_the_real_command(tmp_path):
    """The installed console script, as a user runs it: same contract in a fresh process."""
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: linear\nmodels: [\n")
    result = subprocess.run(
        [Path(sys.executable).parent / "evomerge", "merge", recipe, tmp_path / "out"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and str(recipe) in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# --- search.yml mistakes: each is one line and exit 2 before any run directory exists --------------------


def search_config(tmp_path: Path, toy_family, models: dict, **sections) -> Path:
    config = {
        "models": models,
        "merge": {"method": "ties"},
        "objectives": [{"task": "toy_search", "metric": "acc"}],
        "evaluation": {"include_path": str(toy_family.tasks_dir)},
        "budget": {"trials": 2},
        "output_dir": str(tmp_path / "run"),
        **sections,
    }
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def toy_models(family) -> dict:
    return {"base": str(family.base), "fine_tunes": [str(path) for path in family.children.values()]}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "ray_address",
            r"search\.yml: execution\.ray_address: expected 'local', 'auto' or a cluster address .*'not an address'",
        ),
        ("cuda_without_gpu", r"search\.yml: execution\.device: expected a device this machine has \(no CUDA device"),
        (
            "shape_mismatch",
            r"wide/base: tensor [\w.]+ has shape \(48, 48\), .*/base has \(48, 32\)$",
        ),
        ("missing_task", r"toy_nope.*task: expected a task known to lm-eval"),
    ],
)
def test_search_config_mistakes_stop_before_a_run_dir(
    case, message, tmp_path, toy_family, tiny_family, odd_models, capsys
):
    if case == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: execution.device cuda is valid here")
    models, sections = toy_models(toy_family), {}
    if case == "ray_address":
        sections = {"execution": {"ray_address": "not an address"}}
    elif case == "cuda_without_gpu":
        sections = {"execution": {"device": "cuda"}}
    elif case == "shape_mismatch":
        models = {"base": tiny_family["base"], "fine_tunes": [tiny_family["child0"], odd_models["wide"]]}
    else:
        sections = {"objectives": [{"task": "toy_nope", "metric": "acc"}]}
    code = main(["run", str(search_config(tmp_path, toy_family, models, **sections))])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evomerge: error: ") and "Traceback" not in err, err
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()


# --- what is not the user's fault ---------------------------------------------------------------------


def test_an_internal_bug_is_exit_1_and_says_it_is_not_the_input(monkeypatch, capsys):
    def broken(args):
        raise KeyError("lost")

    monkeypatch.setattr("search.cli.cmd_merge", broken)
    monkeypatch.delenv("EVOMERGE_DEBUG", raising=False)
    assert main(["merge", "recipe.yml", "out"]) == 1
    err = capsys.readouterr().err
    assert err == "evomerge: internal error: KeyError: 'lost' (EVOMERGE_DEBUG=1 shows the traceback)\n"
    monkeypatch.setenv("EVOMERGE_DEBUG", "1")
    with pytest.raises(KeyError, match="lost"):  # with the switch, the real traceback
        main(["merge", "recipe.yml", "out"])


def test_ctrl_c_is_exit_130_and_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("search.cli.cmd_run", interrupted)
    assert main(["run", "search.yml"]) == 130
    assert capsys.readouterr().err == "evomerge: interrupted\n"
