"""The genome: its dimension, and decoding checked tensor by tensor through the merge planner and mergekit."""

from functools import cache

import numpy as np
import pytest
import torch
import transformers
import yaml
from mergekit.config import MergeConfiguration, evaluate_setting

from merge_core.errors import InputError
from merge_core.plan import plan_merge
from merge_core.recipe import Recipe
from search.config import SearchConfig
from search.genome import Genome, anchor_stride
from search.genome.coarse import coarse_grid, knob_values
from search.plan import start_line

FINE_TUNES = ["org/sort", "org/reverse"]


@cache
def llama_names(num_layers: int, tied: bool = False) -> tuple[str, ...]:
    """Tensor names of a tiny Llama checkpoint, built on the meta device (no memory, no weights)."""
    config = transformers.LlamaConfig(
        hidden_size=16,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        vocab_size=32,
        tie_word_embeddings=tied,
    )
    with torch.device("meta"):
        names = transformers.LlamaForCausalLM(config).state_dict()
    # a tied checkpoint on disk holds no lm_head.weight (the state dict still lists the shared tensor)
    return tuple(name for name in names if not (tied and name == "lm_head.weight"))


def make_config(
    method: str = "ties", fine_tunes: list[str] = FINE_TUNES, fixed: dict | None = None, **sections
) -> SearchConfig:
    data = {
        "models": {"base": "org/base", "fine_tunes": fine_tunes},
        "merge": {"method": method, "parameters": fixed or {}},
        "objectives": [{"task": "sort", "metric": "exact_match"}],
        **sections,
    }
    return SearchConfig.from_dict(data, where="search.yml")


def make_genome(num_layers: int = 4, tied: bool = False, **config) -> Genome:
    return Genome(make_config(**config), llama_names(num_layers, tied), num_layers)


def expected_value(genome: Genome, x: np.ndarray, param: str, owner: str | None, tensor: str) -> float:
    """What the genome's documented layout says one tensor gets, read off the gene NAMES (not the decoder):
    'weight[sort].mlp.L3', '...L0-2' (a layer group) or '...knot1' (smooth knots, linearly interpolated)."""
    label = "" if owner is None else f"[{owner.rsplit('/', 1)[-1]}]"
    parts = tensor.split(".")
    if not tensor.startswith("model.layers."):
        part = "pre" if "embed_tokens" in tensor else "post"
        return float(x[genome.names.index(f"{param}{label}.{part}")])
    layer = int(parts[2])
    part = next((f for f in genome.config.genome.filters if f in tensor), "rest")  # mergekit: first match wins
    stem = f"{param}{label}.{part}."
    genes = [(name.removeprefix(stem), x[i]) for i, name in enumerate(genome.names) if name.startswith(stem)]
    if genes[0][0].startswith("knot"):
        knots = np.linspace(0, genome.num_layers - 1, len(genes))
        return float(np.interp(layer, knots, [value for _, value in genes]))
    for span, value in genes:
        first, _, last = span.removeprefix("L").partition("-")
        if int(first) <= layer <= int(last or first):
            return float(value)
    raise AssertionError(f"no gene covers {tensor}")


@pytest.mark.parametrize(
    ("config", "num_layers", "per_owner"),
    [
        ({}, 4, 2 + 3 * 4),  # pre, post, then self_attn / mlp / rest x 4 layers
        ({"genome": {"layer_granularity": 2}}, 4, 2 + 3 * 2),
        ({"genome": {"layer_granularity": 3}}, 4, 2 + 3 * 2),  # groups of 3: layers 0-2 and 3
        ({"genome": {"filters": ["self_attn"]}}, 4, 2 + 2 * 4),  # self_attn and rest
        ({"genome": {"filters": ["self_attn", "mlp", "layernorm"]}}, 4, 2 + 3 * 4),  # nothing left for rest
        ({"genome": {"smooth": 3}}, 4, 2 + 3 * 3),
        ({"genome": {"smooth": 3}}, 23, 2 + 3 * 3),  # smooth: depth does not grow the genome
    ],
)
def test_dimension(config: dict, num_layers: int, per_owner: int):
    genome = make_genome(num_layers, **config)
    assert genome.dim == 2 * 2 * per_owner  # (weight, density) x 2 fine-tunes
    assert len(genome.names) == len(set(genome.names)) == genome.dim
    assert genome.lower.shape == genome.upper.shape == (genome.dim,)


def test_dimension_of_shared_and_single_parameters():
    slerp = make_genome(method="slerp", fine_tunes=FINE_TUNES[:1])
    assert slerp.dim == 2 + 3 * 4  # one shared t, no per-model genes
    assert slerp.names[:2] == ["t.pre", "t.post"]
    task_arithmetic = make_genome(method="task_arithmetic")
    assert {name.split("[")[0] for name in task_arithmetic.names} == {"weight"}  # its density never sparsifies


def test_names_and_bounds_are_readable_and_per_parameter():
    genome = make_genome(genome={"layer_granularity": 2, "bounds": {"density": [0.2, 0.9]}})
    assert genome.names[:4] == [
        "weight[sort].pre",
        "weight[sort].post",
        "weight[sort].self_attn.L0-1",
        "weight[sort].self_attn.L2-3",
    ]
    density = [i for i, name in enumerate(genome.names) if name.startswith("density")]
    assert np.all(genome.lower[density] == 0.2) and np.all(genome.upper[density] == 0.9)
    assert np.all(np.delete(genome.upper, density) == 1.0)


def test_anchor_stride_covers_float_rounding():
    # 15 / 22 * 22 is 14.999999999999998: one anchor per layer would blend layers 14 and 15 at L = 23
    assert (15 / 22) * 22 != 15
    assert anchor_stride(4) == 1 and anchor_stride(23) == 3 and anchor_stride(1) == 1
    for num_layers in (2, 23, 24, 46, 80):
        stride, span = anchor_stride(num_layers), num_layers - 1
        assert all((i / span) * (stride * span) == stride * i for i in range(num_layers))


DECODE_CASES = [
    ({}, 4),
    ({}, 23),  # needs stride 3
    ({"genome": {"smooth": 4, "filters": ["mlp"]}}, 23),
    ({"genome": {"layer_granularity": 5}}, 24),  # stride 5
    ({"method": "slerp", "fine_tunes": FINE_TUNES[:1], "genome": {"layer_granularity": 2}}, 23),
    ({"method": "linear", "fixed": {"normalize": False}}, 5),
    ({"method": "breadcrumbs_ties", "fixed": {"lambda": 0.8, "gamma": 0.02}}, 4),
]


@pytest.mark.parametrize(("config", "num_layers"), DECODE_CASES)
def test_decode_is_exact_through_the_planner(config: dict, num_layers: int):
    genome = make_genome(num_layers, **config)
    names = llama_names(num_layers)
    fixed = genome.config.merge.parameters
    rng = np.random.default_rng(num_layers)
    for _ in range(3):
        x = rng.uniform(genome.lower, genome.upper)
        plan = plan_merge(genome.decode(x), names, num_layers)
        assert len(plan.jobs) == len(names)
        checked = 0
        for job in plan.jobs:
            for param in genome.config.genome.params:
                if genome.method.param(param).per_model:
                    for index, (ref, tensor) in enumerate(job.sources):
                        if index != job.base_index:
                            assert job.per_model[param][index] == expected_value(genome, x, param, ref, tensor), (
                                job,
                                param,
                            )
                            checked += 1
                else:
                    assert job.shared[param] == expected_value(genome, x, param, None, job.out_name), (job, param)
                    checked += 1
            for param, value in fixed.items():
                resolved = job.shared[param] if param in job.shared else job.per_model[param][0]
                assert resolved == value
        assert checked >= len(names)


@pytest.mark.parametrize(("config", "num_layers"), DECODE_CASES)
def test_decoded_yaml_is_a_mergekit_config_with_the_same_values(config: dict, num_layers: int):
    genome = make_genome(num_layers, **config)
    x = np.random.default_rng(1).uniform(genome.lower, genome.upper)
    recipe = genome.decode(x)
    text = recipe.to_yaml()
    assert Recipe.from_yaml(text) == recipe  # floats survive the YAML round trip
    merge_config = MergeConfiguration.model_validate(yaml.safe_load(text))
    # mergekit's own resolver (the oracle) reads the searched values back, tensor by tensor
    scopes = [(entry.model.model.path, entry.parameters) for entry in merge_config.models]
    scopes.append((None, merge_config.parameters))  # shared parameters (slerp's t)
    checked = 0
    for owner, parameters in scopes:
        for param in set(parameters or {}) & set(genome.config.genome.params):
            for tensor in llama_names(num_layers):
                layer = int(tensor.split(".")[2]) if tensor.startswith("model.layers.") else None
                t = 0.0 if layer is None else layer / (num_layers - 1)
                resolved = evaluate_setting(tensor, parameters[param], t, validate=float)
                assert resolved == expected_value(genome, x, param, owner, tensor)
                checked += 1
    assert checked == len(llama_names(num_layers)) * sum(len(owners) for owners in genome.owners.values())


def test_layer_values_follow_groups_and_knots():
    genome = make_genome(4, genome={"layer_granularity": 3})
    x = np.arange(genome.dim) / genome.dim
    values = genome.layer_values(x)
    groups = values[("org/sort", "weight", "mlp")]
    assert groups[0] == groups[1] == groups[2] != groups[3]
    smooth = make_genome(5, genome={"smooth": 3})
    x = np.zeros(smooth.dim)
    block = next(b for b in smooth.blocks if (b.owner, b.param, b.part) == ("org/sort", "density", None))
    x[block.start : block.start + 3] = [0.2, 0.6, 0.4]  # knots at layers 0, 2, 4
    np.testing.assert_array_equal(smooth.layer_values(x)[("org/sort", "density", None)], [0.2, 0.4, 0.6, 0.5, 0.4])


def _plan_values(genome: Genome, x: np.ndarray, param: str) -> dict[str, set]:
    """param -> the set of values each fine-tune gets over every tensor."""
    names = llama_names(genome.num_layers)
    plan = plan_merge(genome.decode(x), names, genome.num_layers)
    found = {}
    for job in plan.jobs:
        for index, (ref, _) in enumerate(job.sources):
            if index != job.base_index:
                found.setdefault(ref, set()).add(job.per_model[param][index])
    return found


def test_default_candidates_are_the_textbook_recipes():
    ties = make_genome()
    textbook, uniform = ties.default_candidates()
    assert _plan_values(ties, textbook, "weight") == {ref: {1.0} for ref in FINE_TUNES}
    assert _plan_values(ties, textbook, "density") == {ref: {0.5} for ref in FINE_TUNES}
    assert _plan_values(ties, uniform, "weight") == {ref: {0.5} for ref in FINE_TUNES}
    assert _plan_values(ties, uniform, "density") == {ref: {1.0} for ref in FINE_TUNES}
    [single] = make_genome(method="task_arithmetic", fine_tunes=FINE_TUNES[:1]).default_candidates()
    assert set(single) == {1.0}  # weight 1 and 1/n coincide for one fine-tune
    [slerp] = make_genome(method="slerp", fine_tunes=FINE_TUNES[:1]).default_candidates()
    assert set(slerp) == {0.5}
    clipped = make_genome(genome={"bounds": {"weight": [0.0, 0.8]}}).default_candidates()[0]
    assert _plan_values(make_genome(), clipped, "weight") == {ref: {0.8} for ref in FINE_TUNES}


def test_coarse_grid_is_every_one_knob_merge_of_the_searched_parameters():
    ties = make_genome()  # TIES normalizes weights: one shared weight is every shared weight
    assert knob_values(ties) == {"weight": [0.5], "density": [0.3, 0.5, 0.7, 0.9]}  # the middle of [0, 1]
    grid = coarse_grid(ties)
    assert len(grid) == 4
    for x, density in zip(grid, (0.3, 0.5, 0.7, 0.9), strict=True):
        assert _plan_values(ties, x, "density") == {ref: {density} for ref in FINE_TUNES}
        assert _plan_values(ties, x, "weight") == {ref: {0.5} for ref in FINE_TUNES}
    unnormalized = make_genome(merge={"method": "ties", "parameters": {"normalize": False}})
    assert knob_values(unnormalized)["weight"] == [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
    assert len(coarse_grid(unnormalized)) == 6 * 4  # the first parameter varies slowest
    assert _plan_values(unnormalized, coarse_grid(unnormalized)[4], "weight") == {ref: {0.2} for ref in FINE_TUNES}
    task_arithmetic = make_genome(method="task_arithmetic")  # density is inert there: not searched
    assert knob_values(task_arithmetic) == {"weight": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]}
    assert knob_values(make_genome(method="slerp", fine_tunes=FINE_TUNES[:1])) == {"t": [0.1, 0.3, 0.5, 0.7, 0.9]}
    clipped = make_genome(method="task_arithmetic", genome={"bounds": {"weight": [0.25, 0.6]}})
    assert knob_values(clipped) == {"weight": [0.25, 0.3, 0.5, 0.6]}  # clipped into the bounds, once each
    epsilon = make_genome(method="della_linear", genome={"params": ["epsilon"], "bounds": {"epsilon": [0.0, 0.3]}})
    assert knob_values(epsilon) == {"epsilon": [0.15]}  # no grid: the method's default


def test_plan_says_what_is_asked_before_the_optimizers_own_proposals():
    ties = make_genome()
    assert start_line(ties.config, ties) == "the 2 default recipe(s) of the method first"
    coarse = make_genome(optimizer={"coarse_to_fine": True, "warm_start": False})
    assert start_line(coarse.config, coarse) == (
        "coarse to fine: 4 one-knob genomes (weight 0.5, density 0.3/0.5/0.7/0.9) and the optimizer's own proposals; "
        "CMA-ES then starts from the best"
    )
    tpe = make_genome(optimizer={"name": "tpe", "coarse_to_fine": True})
    assert start_line(tpe.config, tpe).endswith("; the optimizer learns from them")


def test_encode_uniform_per_model_values_and_bounds():
    genome = make_genome()
    x = genome.encode_uniform({"weight": [0.3, 0.7], "density": 0.9})
    assert _plan_values(genome, x, "weight") == {"org/sort": {0.3}, "org/reverse": {0.7}}
    assert _plan_values(genome, x, "density") == {ref: {0.9} for ref in FINE_TUNES}
    with pytest.raises(ValueError, match=r"density\[sort\]\.pre = 0.05 is outside the bounds \[0.1, 1.0\]"):
        genome.encode_uniform({"weight": 1.0, "density": 0.05})


def test_tied_embeddings_have_only_the_final_norm_after_the_layers():
    genome = make_genome(4, tied=True)
    assert genome.post == ["model.norm.weight"] and genome.pre == ["model.embed_tokens.weight"]
    x = np.random.default_rng(2).uniform(genome.lower, genome.upper)
    plan = plan_merge(genome.decode(x), llama_names(4, tied=True), 4)
    norm = next(job for job in plan.jobs if job.out_name == "model.norm.weight")
    # the final norm's own gene, not the layer norms' (a bare "norm" filter would match input_layernorm too)
    assert norm.per_model["weight"][0] == x[genome.names.index("weight[sort].post")]


def test_filter_matching_no_layer_tensor_is_a_config_error():
    with pytest.raises(InputError, match=r"^search.yml: genome.filters\[1\]: expected a substring .* got 'attn_out'$"):
        make_genome(genome={"filters": ["mlp", "attn_out"]})
