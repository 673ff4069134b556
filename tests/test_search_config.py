"""search.yml: a minimal config works, every bad one is refused with ONE line naming the file and the field."""

import typing
from pathlib import Path

import pytest
import yaml

from evaluators.config import EvalConfig
from merge_core.errors import InputError
from search.config import SearchConfig, TunedFamily
from search.results import baselines

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = """\
models:
  base: ./family/base
  fine_tunes: [./family/srt, ./family/rev]
merge:
  method: ties
objectives:
  - task: toy_srt_search
    metric: acc
"""


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    for name in ("base", "srt", "rev", "tasks"):
        (tmp_path / "family" / name).mkdir(parents=True)
    return tmp_path


def write(directory: Path, data: dict | str, name: str = "search.yml") -> Path:
    path = directory / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_minimal_config_loads_with_defaults(config_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # relative paths follow the file, not the cwd
    config = SearchConfig.from_yaml(write(config_dir, MINIMAL))
    assert config.models.base == str(config_dir / "family" / "base")
    assert config.models.fine_tunes == [str(config_dir / "family" / s) for s in ("srt", "rev")]
    assert config.genome.params == ["weight", "density"]
    assert config.bounds("weight") == (0.0, 1.0) and config.bounds("density") == (0.1, 1.0)
    assert (config.genome.layer_granularity, config.genome.filters, config.genome.smooth) == (
        1,
        ["self_attn", "mlp"],
        None,
    )
    assert (config.optimizer.name, config.optimizer.seed, config.optimizer.popsize) == ("cmaes", 0, None)
    assert config.directions == ["maximize"]
    assert config.output_dir == config_dir / "runs" / "search"
    assert config.tracking.mlflow_uri == f"sqlite:///{config_dir / 'runs' / 'search' / 'mlflow.db'}"
    assert (config.budget.trials, config.budget.wall_time) == (100, None)
    assert (config.execution.ray_address, config.execution.workers, config.execution.device) == ("local", 1, "auto")
    assert config.trust_remote_code is False and config.held_out.tasks == []
    assert config.where == str(config_dir / "search.yml")


def test_hub_ids_stay_ids_and_durations_parse(config_dir: Path):
    data = yaml.safe_load(MINIMAL)
    data["models"] = {"base": "mistralai/Mistral-7B-v0.1", "fine_tunes": ["family/srt", "org/math-7b"]}
    data["budget"] = {"trials": None, "wall_time": "2h"}
    data["execution"] = {"trial_timeout": "90s", "device": "cuda:1"}
    data["tracking"] = {"mlflow_uri": "sqlite:///db/mlflow.db"}
    config = SearchConfig.from_yaml(write(config_dir, data))
    # "family/srt" exists next to the config: a local directory; the others are hub ids
    assert config.models.base == "mistralai/Mistral-7B-v0.1"
    assert config.models.fine_tunes == [str(config_dir / "family" / "srt"), "org/math-7b"]
    assert (config.budget.trials, config.budget.wall_time, config.execution.trial_timeout) == (None, 7200.0, 90.0)
    assert config.tracking.mlflow_uri == f"sqlite:///{config_dir / 'db' / 'mlflow.db'}"


def test_evaluator_options_and_task_specs(config_dir: Path):
    data = yaml.safe_load(MINIMAL)
    data["objectives"].append({"task": "toy_rev_search", "metric": "acc", "direction": "minimize", "num_fewshot": 0})
    data["optimizer"] = {"name": "nsga2"}
    data["fitness"] = {"limit": 50, "subset_seed": 7}
    data["held_out"] = {"tasks": [{"task": "toy_srt_test", "metric": "acc"}], "limit": 100}
    data["evaluation"] = {"include_path": "family/tasks", "num_fewshot": 2, "batch_size": "auto", "max_gen_toks": 32}
    config = SearchConfig.from_yaml(write(config_dir, data))
    assert config.directions == ["maximize", "minimize"]
    search, other = config.objective_specs()
    assert (search.task, search.metric, search.higher_is_better, search.limit, search.num_fewshot) == (
        "toy_srt_search",
        "acc",
        True,
        50,
        2,
    )
    assert (other.higher_is_better, other.num_fewshot) == (False, 0)  # a task's own num_fewshot wins
    [held_out] = config.held_out_specs()
    assert (held_out.task, held_out.limit) == ("toy_srt_test", 100)
    evaluation = config.eval_config()
    assert type(evaluation) is EvalConfig
    assert (evaluation.include_path, evaluation.subset_seed, evaluation.batch_size, evaluation.max_gen_toks) == (
        config_dir / "family" / "tasks",
        7,
        "auto",
        32,
    )


def test_dumped_config_reads_back_to_the_same_config(config_dir: Path):
    config = SearchConfig.from_yaml(write(config_dir, MINIMAL))
    (config_dir / "runs").mkdir()
    dumped = write(config_dir / "runs", config.model_dump(mode="json"))  # as a run dir keeps it
    assert SearchConfig.from_dict(yaml.safe_load(dumped.read_text()), where=config.where) == config


def test_fixed_parameters_are_not_searched(config_dir: Path):
    data = yaml.safe_load(MINIMAL)
    data["merge"]["parameters"] = {"density": 0.4, "normalize": False}
    config = SearchConfig.from_yaml(write(config_dir, data))
    assert config.genome.params == ["weight"]


HOSTILE = [
    ("optimizer.popsize", "ten", "optimizer.popsize: expected an integer >= 2, got 'ten'"),
    ("optimizer.popsize", 1, "optimizer.popsize: expected an integer >= 2, got 1"),
    ("optimizer.sigma0", 0, "optimizer.sigma0: expected a number > 0 and <= 1, got 0"),
    (
        "optimizer.name",
        "bayes",
        "optimizer.name: expected one of 'cmaes', 'nsga2', 'tpe', 'gp' or 'random', got 'bayes'",
    ),
    ("optimiser", {"name": "tpe"}, "optimiser: unknown key; expected one of: models, merge, objectives, genome,"),
    (
        "genome.granularity",
        2,
        "genome.granularity: unknown key; expected one of: kind, dfs, moe, params, bounds, layer_granularity,",
    ),
    ("merge.method", "frankenmerge", "merge.method: expected one of breadcrumbs, breadcrumbs_ties, dare_linear,"),
    ("merge.method", "model_stock", "merge.method: expected one of breadcrumbs,"),  # nothing to search
    ("merge.parameters", {"lamda": 0.5}, "merge.parameters.lamda: expected a parameter of ties (weight, density,"),
    ("merge.parameters", {"normalize": "yes"}, "merge.parameters.normalize: expected a number or true or false"),
    ("merge.parameters", {"normalize": 1}, "merge.parameters.normalize: expected true or false, got 1.0"),
    (
        "genome.params",
        ["normalize"],
        "genome.params[0]: expected a numeric parameter of ties (weight, density, lambda)",
    ),
    ("genome.params", ["weight", "weight"], "genome.params[1]: expected 'weight' once (searched OR fixed)"),
    ("genome.params", ["lambda"], "genome.bounds.lambda: expected [lower, upper] for searched 'lambda', got none"),
    ("genome.bounds", {"weight": [1, 0]}, "genome.bounds.weight: expected [lower, upper] with lower < upper"),
    ("genome.bounds", {"weight": [0]}, "genome.bounds.weight: expected at least 2 item(s), got [0]"),
    ("genome.bounds", {"t": [0, 1]}, "genome.bounds.t: expected bounds only for searched ['weight', 'density']"),
    ("genome.filters", ["mlp", "mlp"], "genome.filters[1]: expected distinct tensor-name substrings, got 'mlp'"),
    ("genome.smooth", 1, "genome.smooth: expected an integer >= 2, got 1"),
    ("genome", {"smooth": 3, "layer_granularity": 2}, "genome.smooth: expected smooth knots or layer_granularity"),
    ("genome.layer_granularity", 0, "genome.layer_granularity: expected an integer >= 1, got 0"),
    ("objectives", [], "objectives: expected at least 1 item(s), got []"),
    ("objectives", None, "objectives: expected a list, got None"),
    ("objectives.0.metric", "<delete>", "objectives[0].metric: expected a value, got nothing (this field is required)"),
    ("objectives.0.direction", "up", "objectives[0].direction: expected one of 'maximize' or 'minimize', got 'up'"),
    (
        "held_out.tasks",
        [{"task": "toy_srt_search", "metric": "acc"}],
        "held_out.tasks[0].task: expected a task the search never sees, got objective 'toy_srt_search'",
    ),
    ("budget", {"trials": None}, "budget.trials: expected a trial count, a wall_time or item_evals, got none"),
    (
        "budget.wall_time",
        "soon",
        "budget.wall_time: expected seconds or a duration like '90s', '30m', '2h', got 'soon'",
    ),
    ("execution.device", "tpu", "execution.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ("execution.workers", 0, "execution.workers: expected an integer >= 1, got 0"),
    ("evaluation.batch_size", 0, "evaluation.batch_size: expected an integer > 0 or one of 'auto', got 0"),
    ("evaluation.backend", "tgi", "evaluation.backend: expected one of 'hf' or 'vllm', got 'tgi'"),
    ("evaluation.subset_seed", 3, "evaluation.subset_seed: expected it in fitness.subset_seed"),
    (
        "evaluation.include_path",
        "nowhere",
        "evaluation.include_path: expected a directory of task YAMLs, got 'nowhere'",
    ),
    ("models.base", "./family/missing", "models.base: expected an existing model directory, got './family/missing'"),
    ("models.base", "not a hub id", "models.base: expected a local directory or a hub id like 'org/name'"),
    ("models.fine_tunes", [], "models.fine_tunes: expected at least 1 item(s), got []"),
    ("models.fine_tunes", ["./family/srt", "./family/srt"], "models.fine_tunes[1]: expected each fine-tune once"),
    ("models.fine_tunes", ["./family/base"], "models.fine_tunes[0]: expected a model other than the base"),
    ("merge.method", "slerp", "models.fine_tunes: expected exactly 2 models for slerp, the base included, got 3"),
    ("seed", "x", "seed: expected an integer, got 'x'"),
    ("trust_remote_code", "yes", "trust_remote_code: expected true or false, got 'yes'"),
    ("genome", [1], "genome: expected a mapping, got [1]"),
    ("merge.memory", "small", "merge.memory: expected one of 'fast', 'lean' or 'auto', got 'small'"),
    ("baselines.tuned", ["ties", "ties"], "baselines.tuned[1]: expected each family once, got 'ties' twice"),
    (
        "baselines.tuned",
        ["linear"],
        "baselines.tuned[0]: expected one of 'task_arithmetic', 'ties' or 'dare_ties', got 'linear'",
    ),
]


def edit(data: dict, dotted: str, value: object) -> dict:
    *parents, last = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    node = data
    for key in parents:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    if value == "<delete>":
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize(("field", "value", "message"), HOSTILE, ids=[f"{f}={v!r}" for f, v, _ in HOSTILE])
def test_hostile_config_gives_one_line_naming_the_field(config_dir: Path, field: str, value: object, message: str):
    path = write(config_dir, edit(yaml.safe_load(MINIMAL), field, value))
    with pytest.raises(InputError) as caught:
        SearchConfig.from_yaml(path)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: {message}"), text


def test_two_objectives_need_a_pareto_optimizer(config_dir: Path):
    data = yaml.safe_load(MINIMAL)
    data["objectives"].append({"task": "toy_rev_search", "metric": "acc"})
    with pytest.raises(InputError, match=r"search.yml: optimizer.name: expected nsga2 or random for 2 objectives"):
        SearchConfig.from_yaml(write(config_dir, data))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: [unclosed", r"search.yml: <yaml>: expected valid YAML, got .* at line 1, column \d+$"),
        ("- just\n- a list\n", r"search.yml: <top level>: expected a mapping of sections, got \['just', 'a list'\]$"),
        ("", r"search.yml: <top level>: expected a mapping of sections, got None$"),
    ],
)
def test_unreadable_files_give_one_line(config_dir: Path, text: str, message: str):
    with pytest.raises(InputError, match=message):
        SearchConfig.from_yaml(write(config_dir, text))


def test_missing_file_gives_one_line(tmp_path: Path):
    with pytest.raises(InputError, match=r"nope.yml: <file>: expected a readable YAML file, got No such file"):
        SearchConfig.from_yaml(tmp_path / "nope.yml")


def test_example_config_loads():
    config = SearchConfig.from_yaml(ROOT / "configs" / "example.yml")
    assert config.models.base == "mistralai/Mistral-7B-v0.1" and len(config.models.fine_tunes) == 3
    assert config.optimizer.name == "nsga2" and config.directions == ["maximize", "maximize"]
    assert config.eval_config().backend == "vllm" and config.budget.wall_time == 36 * 3600


def test_demo_config_loads_once_the_family_is_filled_in(tmp_path: Path):
    family = tmp_path / "family"
    for name in ("base", "srt", "rev", "cae", "tasks"):
        (family / name).mkdir(parents=True)
    text = (ROOT / "configs" / "demo.yml").read_text()
    config = SearchConfig.from_yaml(write(tmp_path, text.replace("{family}", str(family)), "demo.yml"))
    assert config.models.fine_tunes == [str(family / skill) for skill in ("srt", "rev", "cae")]
    assert config.output_dir == tmp_path / "run"
    assert config.merge.method == "ties"
    assert [spec.task for spec in config.held_out_specs()] == ["toy_srt_test", "toy_rev_test", "toy_cae_test"]
    with pytest.raises(InputError, match=r"demo.yml: models.base: expected a local directory or a hub id"):
        SearchConfig.from_yaml(ROOT / "configs" / "demo.yml")  # {family} not filled in


def test_every_tunable_family_has_a_grid(config_dir: Path):
    assert list(typing.get_args(TunedFamily)) == list(baselines.TUNED)
    assert SearchConfig.from_yaml(write(config_dir, MINIMAL)).baselines.tuned == list(baselines.TUNED)
