"""Data-flow search: layer paths as recipes, the live path model against mergekit's frankenmerge of the same
path, the path genome, and dfs / ps+dfs searches end to end (mergekit-yaml and mergekit-multi as the oracle)."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from test_search_e2e import write_config
from test_session import load_dir, mergekit_merge
from transformers import AutoModelForCausalLM

from merge_core import MergeSession, Recipe
from merge_core.errors import InputError
from merge_core.layer_path import LayerPath, Slot
from merge_core.path_model import PathModel
from search.config import SearchConfig
from search.genome.data_flow import STAGE1, PathGenome
from search.plan import start_line
from search.results.export import export_recipe, export_text
from search.results.final import STAGE1_REFERENCE
from search.results.summary import read_summary
from search.results.tracking import PATH_TAG
from search.run_dir import RunDir
from search.runner import run_search

MERGEKIT_MULTI = Path(sys.executable).parent / "mergekit-multi"


def test_a_path_collapses_runs_into_slices_and_reads_back():
    path = LayerPath((Slot("a", 0), Slot("a", 1), Slot("b", 1, 0.8), Slot("b", 2, 0.8), Slot("a", 1), Slot("b", 3)))
    recipe = path.recipe_dict("float32")
    scaled = {"scale": [{"filter": "o_proj", "value": 0.8}, {"filter": "down_proj", "value": 0.8}, {"value": 1.0}]}
    assert recipe == {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 2]}]},
            {"sources": [{"model": "b", "layer_range": [1, 3], "parameters": scaled}]},
            {"sources": [{"model": "a", "layer_range": [1, 2]}]},
            {"sources": [{"model": "b", "layer_range": [3, 4]}]},
        ],
        "dtype": "float32",
    }
    assert LayerPath.of(Recipe.from_yaml(yaml.safe_dump(recipe))) == path
    assert path.describe() == "a 0-1, b 1-2 ×0.8, a 1, b 3"


@pytest.mark.parametrize(
    "recipe",
    [
        "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1.0}}]",
        "merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [0, 2], parameters: {scale: 0.5}}]}]",
        "merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [0, 2], "
        "parameters: {scale: [{filter: o_proj, value: 0.5}, {value: 1.0}]}}]}]",
        "merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [0, 2], "
        "parameters: {scale: [{filter: o_proj, value: 0.5}, {filter: down_proj, value: 0.7}, {value: 1.0}]}}]}]",
    ],
    ids=["not-passthrough", "scale-on-every-tensor", "one-projection-scaled", "two-scales"],
)
def test_recipes_that_are_not_a_residual_scaled_path_are_merged_the_ordinary_way(recipe: str):
    assert LayerPath.of(Recipe.from_yaml(recipe)) is None


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(params=["untied", "tied"])
def family(request, tiny_family, tiny_tied_family) -> dict:
    return tiny_family if request.param == "untied" else tiny_tied_family


@pytest.mark.parametrize("scaled", [False, True], ids=["scale-1", "scaled"])
def test_the_path_model_is_the_model_mergekit_writes_for_the_path(family, scaled, tmp_path):
    """Embeddings from the first slot's model, norm and head from the last's, a layer reused: exactly
    mergekit's frankenmerge at scale 1. A scale multiplies the projection's output where mergekit scales its
    weight: (x W) s against x (W s), equal up to float rounding (a few ulps per layer)."""
    children = [family[name] for name in family if name != "base"]
    s = 0.7 if scaled else 1.0
    path = LayerPath(
        (
            Slot(children[0], 0),
            Slot(children[0], 1),
            Slot(family["base"], 1, s),
            Slot(children[1], 1),
            Slot(children[1], 2, s),
        )
    )
    theirs = tmp_path / "mergekit"
    mergekit_merge(yaml.safe_dump(path.recipe_dict("float32")), theirs)
    reference = AutoModelForCausalLM.from_pretrained(theirs).eval()
    assert reference.config.num_hidden_layers == 5
    live = PathModel(MergeSession(list(family.values()))).build(path)
    ids = torch.randint(0, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    expected, got = logits(reference, ids), logits(live, ids)
    if scaled:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not torch.equal(got, logits(PathModel(MergeSession(list(family.values()))).build(
            LayerPath(tuple(Slot(slot.model, slot.layer) for slot in path.slots))
        ), ids))  # fmt: skip
    else:
        assert torch.equal(got, expected)


def test_a_layer_used_twice_keeps_two_cache_entries_and_the_sources_untouched(tiny_family):
    session = MergeSession(list(tiny_family.values()))
    paths = PathModel(session)
    child = tiny_family["child0"]
    model = paths.build(
        LayerPath((Slot(child, 0), Slot(child, 1), Slot(child, 1, 0.9), Slot(child, 1), Slot(child, 3)))
    )
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3, 4]
    assert [layer.self_attn.layer_idx for layer in paths._stack(child)] == [0, 1, 2, 3]  # the source's own
    # Shared, not copied: the path's layer 1 and 3 are the session's resident tensor.
    resident = session.checkpoints[child].tensors["model.layers.1.mlp.up_proj.weight"]
    assert model.model.layers[1].mlp.up_proj.weight.data_ptr() == resident.data_ptr()
    assert model.model.layers[3].mlp.up_proj.weight.data_ptr() == resident.data_ptr()
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        cache = model(ids[:, :-1], use_cache=True).past_key_values
        step = model(ids[:, -1:], past_key_values=cache).logits[:, -1]
    # One shared cache slot for the reused layer would feed layer 3 the keys of layer 1's second use.
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def path_config(**dfs) -> SearchConfig:
    data = {
        "models": {"base": "org/base", "fine_tunes": ["org/sort", "org/reverse"]},
        "merge": {"method": "passthrough"},
        "genome": {"kind": "dfs", "dfs": dfs},
        "objectives": [{"task": "sort", "metric": "exact_match"}],
    }
    return SearchConfig.from_dict(data, where="search.yml")


def test_the_genome_lays_slots_out_layer_by_layer_and_repairs_lengths():
    genome = PathGenome(path_config(repeats=2, min_layers=2, max_layers=3), num_layers=2)
    assert genome.dim == 2 * (2 * 2 * 2)
    assert genome.names[:4] == ["in[sort.L0.r0]", "in[reverse.L0.r0]", "in[sort.L1.r0]", "in[reverse.L1.r0]"]
    assert genome.names[8] == "scale[sort.L0.r0]"
    count = len(genome.slots)
    x = np.concatenate([np.zeros(count), np.full(count, 1.25)])
    x[[1, 2]] = 0.9  # reverse L0, sort L1
    assert genome.path(x).slots == (Slot("org/reverse", 0, 1.25), Slot("org/sort", 1, 1.25))
    x[:count] = 1.0  # every slot: the first three by gene (ties: earliest)
    assert [(s.model, s.layer) for s in genome.path(x).slots] == [("org/sort", 0), ("org/reverse", 0), ("org/sort", 1)]
    x[:count] = 0.0
    x[6] = 0.3  # none in: the two highest genes
    assert [(s.model, s.layer) for s in genome.path(x).slots] == [("org/sort", 0), ("org/sort", 1)]
    assert [genome.path(c).describe(genome.label) for c in genome.default_candidates()] == ["sort 0-1", "reverse 0-1"]
    assert start_line(genome.config, genome) == "the 2 path model(s)' own full-depth paths first"


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ({"merge": {"method": "ties"}}, "merge.method: expected passthrough with genome.kind dfs"),
        ({"genome": {"kind": "dfs", "dfs": {"min_layers": 4, "max_layers": 3}}}, "genome.dfs.max_layers: expected at least min_layers (4), got 3"),
        ({"evaluation": {"backend": "vllm"}}, "evaluation.backend: expected hf with genome.kind dfs"),
        ({"evaluation": {"dtype": "bfloat16"}}, "evaluation.dtype: expected auto with genome.kind dfs"),
        ({"genome": {"kind": "ps+dfs"}}, "genome.dfs.stage1: expected the weight-space recipe"),
        ({"genome": {"kind": "dfs", "dfs": {"stage1": "best.yml"}}}, "genome.dfs.stage1: expected none with genome.kind dfs"),
        ({"genome": {"kind": "dfs", "params": ["weight"]}}, "genome.params: expected none with genome.kind dfs"),
        ({"genome": {"dfs": {"repeats": 2}}, "merge": {"method": "ties"}}, "genome.dfs: expected it only with genome.kind dfs or ps+dfs"),
    ],
    ids=["method", "layers", "vllm", "dtype", "no-stage1", "stage1-for-dfs", "params", "dfs-with-ps"],
)  # fmt: skip
def test_a_path_config_that_cannot_work_is_one_line(edits: dict, message: str):
    data = {
        "models": {"base": "org/base", "fine_tunes": ["org/sort", "org/reverse"]},
        "merge": {"method": "passthrough"},
        "genome": {"kind": "dfs"},
        "objectives": [{"task": "sort", "metric": "exact_match"}],
    }
    with pytest.raises(InputError) as caught:
        SearchConfig.from_dict(data | edits, where="search.yml")
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"search.yml: {message}"), str(caught.value)


def test_a_stage1_merge_of_other_models_or_fewer_layers_is_refused(toy_family, tmp_path):
    from search.execution.preflight import stage1_recipe

    children = [str(path) for path in toy_family.children.values()]
    for name, recipe, message in [
        ("other.yml", {"merge_method": "linear", "models": [{"model": "/elsewhere/model", "parameters": {"weight": 1.0}}]},
         "expected a merge of this search's models"),
        ("shallow.yml", {"merge_method": "passthrough", "slices": [{"sources": [{"model": children[0], "layer_range": [0, 1]}]}]},
         "expected a merge of all 2 layers"),
    ]:  # fmt: skip
        (tmp_path / name).write_text(yaml.safe_dump(recipe))
        config = SearchConfig.from_yaml(
            write_config(tmp_path / "search.yml", toy_family, merge={"method": "passthrough"},
                         genome={"kind": "ps+dfs", "dfs": {"stage1": name}})
        )  # fmt: skip
        with pytest.raises(InputError) as caught:
            stage1_recipe(config)
        assert f"genome.dfs.stage1: {message}" in str(caught.value), str(caught.value)


def stage1_yaml(toy_family) -> str:
    children = [str(path) for path in toy_family.children.values()]
    models = [
        {"model": child, "parameters": {"weight": weight}}
        for child, weight in zip(children, [0.5, 0.3, 0.2], strict=True)
    ]
    return yaml.safe_dump({"merge_method": "linear", "models": models, "dtype": "float32"})


@pytest.fixture(scope="module")
def ps_dfs_run(toy_family, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ps_dfs")
    (directory / "stage1.yml").write_text(stage1_yaml(toy_family))
    config = write_config(
        directory / "search.yml",
        toy_family,
        merge={"method": "passthrough"},
        genome={"kind": "ps+dfs", "dfs": {"stage1": "stage1.yml", "max_layers": 4}},
        budget={"trials": 6},
    )
    return config, run_search(config)


def test_a_ps_dfs_search_starts_from_the_stage1_merge_and_tags_every_trial(ps_dfs_run, toy_family):
    config, summary = ps_dfs_run
    run = RunDir.open(config.parent / "run")
    assert Recipe.from_yaml(run.read_text(run.stage1)) == Recipe.from_yaml(stage1_yaml(toy_family))
    # Trial 0 is the stage-1 merge's own full-depth path, then each fine-tune's.
    first = LayerPath.of(Recipe.from_yaml(run.read_text(run.trial_recipe(0))))
    assert first.slots == (Slot(STAGE1, 0), Slot(STAGE1, 1))
    mlflow.set_tracking_uri(run.mlflow_uri)
    trials = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`evomerge.trial` != ''")
    assert len(trials) == 6
    for _, row in trials.iterrows():
        recipe = run.read_text(run.trial_recipe(int(row["tags.evomerge.trial"])))
        path = LayerPath.of(Recipe.from_yaml(recipe))
        assert row[f"tags.{PATH_TAG}"] == path.describe(lambda ref: Path(ref).name or ref)
    # The front as MLflow keeps it has each member's path.
    parent = trials["tags.mlflow.parentRunId"].iloc[0]
    front = mlflow.artifacts.load_text(f"runs:/{parent}/front.csv").splitlines()
    assert front[0].split(",")[:2] == ["trial", "path"]
    for line in front[1:]:
        number, path_text = line.split(",")[:2]
        assert path_text.strip('"') == LayerPath.of(
            Recipe.from_yaml(run.read_text(run.trial_recipe(int(number))))
        ).describe(lambda ref: Path(ref).name or ref)
    # The stage-1 merge is a reference the gate and the held-out table compare the paths with.
    assert STAGE1_REFERENCE in {entry.name for entry in read_summary(run).baselines}


def test_a_path_over_the_stage1_merge_exports_as_mergekit_multi_reproduces_it(ps_dfs_run, toy_family, tmp_path):
    config, summary = ps_dfs_run
    run = RunDir.open(config.parent / "run")
    path = LayerPath((Slot(STAGE1, 0), Slot(STAGE1, 1, 0.8), Slot(str(toy_family.children["rev"]), 1)))
    exported = tmp_path / "two-stage.yml"
    exported.write_text(export_text(run, yaml.safe_dump(path.recipe_dict("float32")), seed=3))
    assert "# reproduce: mergekit-multi" in exported.read_text()
    out = tmp_path / "out"
    subprocess.run(
        [MERGEKIT_MULTI, exported, "--intermediate-dir", tmp_path / "stages", "--out-path", out],
        check=True,
        capture_output=True,
    )
    theirs = load_dir(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == len(path) == 3
    session = MergeSession([str(toy_family.base), *map(str, toy_family.children.values())])
    session.add_merged(STAGE1, Recipe.from_yaml(run.read_text(run.stage1)))
    ours = session.materialize(path.recipe("float32"))
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[name], tensor) for name, tensor in theirs.items())


def test_a_dfs_search_exports_its_best_path_for_mergekit_yaml(toy_family, tmp_path):
    config = write_config(
        tmp_path / "search.yml",
        toy_family,
        merge={"method": "passthrough"},
        genome={"kind": "dfs", "dfs": {"repeats": 1, "scale_bounds": [0.8, 1.2]}},
        budget={"trials": 5},
    )
    summary = run_search(config)
    run = RunDir.open(config.parent / "run")
    # The first trials are the fine-tunes' own full-depth paths, so the best path scores at least the best of
    # them: the cae child, perfect on its third of the items.
    firsts = [
        LayerPath.of(Recipe.from_yaml(run.read_text(run.trial_recipe(n)))).describe(lambda r: Path(r).name)
        for n in range(3)
    ]
    assert firsts == ["rev 0-1", "srt 0-1", "cae 0-1"]
    assert summary.best.search["toy_search"] >= 0.3
    best = LayerPath.of(Recipe.from_yaml(run.read_text(run.path / summary.best.recipe)))
    assert best is not None and 1 <= len(best) <= 4
    exported = export_recipe(run.path, evolved=True)
    assert "# reproduce: mergekit-yaml" in exported
    assert LayerPath.of(Recipe.from_yaml(exported)) == best
