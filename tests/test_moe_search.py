"""The MoE search (genome.kind moe): the genome's experts and residual scales, the in-memory candidate against
the checkpoint `evomerge moe` writes for its exported config, refused configs, and a search end to end."""

import mlflow
import numpy as np
import pytest
import torch
import yaml
from test_search_e2e import write_config
from test_session import load_dir
from transformers import AutoModelForCausalLM

from merge_core.errors import InputError
from merge_core.moe import MoESources
from merge_core.moe_config import MoEConfig
from merge_core.moe_model import MoEModel
from search.cli import main
from search.config import SearchConfig
from search.genome.moe import MoEGenome, experts_line
from search.plan import start_line
from search.results.export import export_recipe
from search.results.final import PLAIN_MOE_REFERENCE
from search.results.summary import read_summary
from search.results.tracking import PATH_TAG
from search.run_dir import RunDir
from search.runner import run_search

PROMPTS = {"rev": ["rev abcd", "rev xyz"], "srt": ["srt dcba"], "cae": ["cae abc", "cae hello"]}


def moe_dict(base: str, experts: dict[str, str], **head) -> dict:
    entries = [{"source_model": path, "positive_prompts": PROMPTS[name]} for name, path in experts.items()]
    return {"base_model": base, "gate_mode": "hidden", "dtype": "float32", **head, "experts": entries}


MOE = moe_dict("org/base", {name: f"org/{name}" for name in PROMPTS})


def hub_config(**head) -> SearchConfig:
    experts = {name: f"org/{name}" for name in PROMPTS}
    data = {
        "genome": {"kind": "moe", "moe": {"config": moe_dict("org/base", experts, **head), "scale_bounds": [0.5, 1.5]}},
        "objectives": [{"task": "toy_search", "metric": "acc"}],
    }
    return SearchConfig.from_dict(data, where="search.yml")


def test_the_genome_keeps_experts_by_gene_and_repairs_to_enough_of_them():
    config = hub_config(experts_per_token=2)
    assert config.models.base == "org/base" and config.models.fine_tunes == ["org/rev", "org/srt", "org/cae"]
    genome = MoEGenome(config)
    assert genome.dim == 6 and genome.min_experts == 2
    assert genome.names == ["in[e0.rev]", "in[e1.srt]", "in[e2.cae]", "scale[e0.rev]", "scale[e1.srt]", "scale[e2.cae]"]
    assert genome.experts(np.array([0.9, 0.2, 0.7, 1.23456, 0.6, 0.8])) == [(0, 1.2346), (2, 0.8)]
    # One in: the two highest genes; none above 0.5 and a tie: the earlier expert.
    assert genome.experts(np.array([0.1, 0.9, 0.4, 1.0, 1.0, 1.0])) == [(1, 1.0), (2, 1.0)]
    assert genome.experts(np.array([0.3, 0.3, 0.3, 1.0, 1.1, 1.2])) == [(0, 1.0), (1, 1.1)]
    decoded = genome.decode(np.array([0.9, 0.2, 0.7, 1.25, 0.6, 0.8]))
    assert [(e.source_model, e.residual_scale, e.positive_prompts) for e in decoded.experts] == [
        ("org/rev", 1.25, PROMPTS["rev"]),
        ("org/cae", 0.8, PROMPTS["cae"]),
    ]
    assert (decoded.gate_mode, decoded.experts_per_token, decoded.dtype) == ("hidden", 2, "float32")
    assert experts_line(decoded.to_yaml()) == "rev ×1.25, cae ×0.8"
    assert [list(x) for x in genome.default_candidates()] == [[1, 1, 1, 1, 1, 1]]
    assert start_line(config, genome) == "the 1 mergekit-moe config(s) as given first"
    # Three experts per token: every candidate keeps all three.
    assert MoEGenome(hub_config(experts_per_token=3)).experts(np.zeros(6) + 0.1) == [(0, 0.1), (1, 0.1), (2, 0.1)]


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ({"merge": {"method": "ties"}}, "merge.method: expected none with genome.kind moe"),
        ({"models": {"base": "org/base", "fine_tunes": ["org/rev"]}}, "models: expected none with genome.kind moe"),
        ({"evaluation": {"backend": "vllm"}}, "evaluation.backend: expected hf with genome.kind moe"),
        ({"evaluation": {"dtype": "bfloat16"}}, "evaluation.dtype: expected auto with genome.kind moe"),
        ({"genome": {"kind": "moe", "moe": {"config": MOE}, "params": ["weight"]}}, "genome.params: expected none with genome.kind moe"),
        ({"genome": {"kind": "moe"}}, "genome.moe: expected the mergekit-moe config to search"),
        ({"genome": {"kind": "ps", "moe": {"config": MOE}}}, "genome.moe: expected it only with genome.kind moe"),
        ({"genome": {"kind": "moe", "moe": {"config": {"base_model": "org/base"}}}}, "genome.moe.config.experts: "),
        ({"genome": {"kind": "moe", "moe": {"config": moe_dict("org/base", {"rev": "org/base", "srt": "org/base"})}}},
         "genome.moe.config.experts: expected an expert other than base_model"),
        ({"genome": {"kind": "moe", "moe": {"config": "missing.yml"}}}, "missing.yml: file: cannot be read"),
        ({"genome": {"kind": "moe", "moe": {"config": moe_dict("org/base", {"rev": "org/rev", "srt": "org/srt"}),
                                            "scale_bounds": [0, 1]}}},
         "genome.moe.scale_bounds: expected [lower, upper] with 0 < lower < upper"),
        ({"genome": {"kind": "ps"}}, "models: expected a models section with genome.kind ps, got none"),
    ],
    ids=["merge", "models", "vllm", "dtype", "params", "no-moe", "moe-with-ps", "no-experts", "only-base", "no-file",
         "scale", "ps-without-merge"],
)  # fmt: skip
def test_a_moe_config_that_cannot_work_is_one_line(edits: dict, message: str, tmp_path):
    data = {"genome": {"kind": "moe", "moe": {"config": MOE}}, "objectives": [{"task": "toy_search", "metric": "acc"}]}
    with pytest.raises(InputError) as caught:
        SearchConfig.from_dict(data | edits, where="search.yml", base_dir=tmp_path)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"search.yml: {message}") or text.startswith(f"{tmp_path}/{message}"), text


def test_a_missing_expert_is_refused_before_ray_naming_the_moe_file(toy_family, tmp_path):
    from search.execution.preflight import preflight

    experts = {"rev": str(toy_family.children["rev"]), "srt": str(tmp_path / "nowhere")}
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(moe_dict(str(toy_family.base), experts)))
    (tmp_path / "nowhere").mkdir()  # exists, so the config resolves it; holds no model
    config = SearchConfig.from_yaml(write_config(tmp_path / "search.yml", toy_family, **moe_search("moe.yml")))
    with pytest.raises(InputError) as caught:
        preflight(config)
    assert str(caught.value).startswith(f"{tmp_path / 'moe.yml'}: experts[1].source_model: "), str(caught.value)


def moe_search(config: str) -> dict:
    # write_config's sections with the MoE genome: no models or merge section (the mergekit-moe config has both)
    return {"genome": {"kind": "moe", "moe": {"config": config, "scale_bounds": [0.5, 1.5]}}, "models": None,
            "merge": None}  # fmt: skip


@pytest.fixture(scope="module")
def moe_run(toy_family, tmp_path_factory):
    directory = tmp_path_factory.mktemp("moe_search")
    experts = {name: str(path) for name, path in toy_family.children.items()}
    (directory / "moe.yml").write_text(yaml.safe_dump(moe_dict(str(toy_family.base), experts)))
    path = write_config(directory / "search.yml", toy_family, **moe_search("moe.yml"), budget={"trials": 5})
    text = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({k: v for k, v in text.items() if v is not None}))
    return path, run_search(path)


def test_a_moe_search_starts_from_the_plain_moe_and_tags_each_trial_with_its_experts(moe_run):
    config, summary = moe_run
    run = RunDir.open(config.parent / "run")
    first = MoEConfig.from_yaml(run.read_text(run.trial_recipe(0)))
    assert [(e.source_model.rsplit("/", 1)[1], e.residual_scale) for e in first.experts] == [
        ("rev", 1.0), ("srt", 1.0), ("cae", 1.0)
    ]  # fmt: skip
    mlflow.set_tracking_uri(run.mlflow_uri)
    trials = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`evomerge.trial` != ''")
    assert len(trials) == 5
    for _, row in trials.iterrows():
        recipe = run.read_text(run.trial_recipe(int(row["tags.evomerge.trial"])))
        assert row[f"tags.{PATH_TAG}"] == experts_line(recipe)
    parent = trials["tags.mlflow.parentRunId"].iloc[0]
    front = mlflow.artifacts.load_text(f"runs:/{parent}/front.csv").splitlines()
    assert front[0].split(",")[:2] == ["trial", "path"]
    # The plain MoE and the parents are the references the gate compares the best with.
    stored = read_summary(run)
    assert PLAIN_MOE_REFERENCE in {entry.name for entry in stored.baselines}
    assert {entry.name for entry in stored.parents} == {"base", "rev", "srt", "cae"}
    gate = stored.gate
    assert gate.chosen in {f"evolved #{summary.best.trial}", PLAIN_MOE_REFERENCE, "base", "rev", "srt", "cae"}
    if not gate.passed:  # best.yml is the reference the gate chose, as `evomerge moe` or mergekit-yaml reads it
        assert run.read_text(run.best).startswith(f"# not evolved: {gate.chosen}, because ")


def test_the_exported_moe_rebuilds_as_the_best_trial_was_scored(moe_run, tmp_path):
    config, summary = moe_run
    run = RunDir.open(config.parent / "run")
    exported = tmp_path / "best-moe.yml"
    exported.write_text(export_recipe(run.path, evolved=True))
    assert "# reproduce: evomerge moe THIS_FILE OUT_DIR" in exported.read_text()
    best = MoEConfig.from_yaml(run.read_text(run.path / summary.best.recipe))
    assert MoEConfig.from_yaml(exported).to_yaml() == best.to_yaml()
    assert main(["moe", str(exported), str(tmp_path / "out")]) == 0
    # The worker's live model for the best trial, from sources whose routers were computed for all experts.
    plain = MoEConfig.from_yaml(run.read_text(run.trial_recipe(0)))
    live = MoEModel(MoESources(plain))
    live.build(best)
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert sorted(written.state_dict()) == sorted(live.model.state_dict())
    assert all(torch.equal(written.state_dict()[name], t) for name, t in live.model.state_dict().items())
    assert len(load_dir(tmp_path / "out")) > 0
    ids = torch.tensor([[1, 20, 21, 22, 4, 5, 30, 31]])
    with torch.no_grad():
        assert torch.equal(live.model(ids).logits, written(ids).logits)  # tolerance 0
