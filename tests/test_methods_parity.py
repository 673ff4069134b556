"""Every merge method against mergekit 0.1.5's own merge_tensors, at tolerance 0.

Inputs look like real fine-tunes: a base plus children whose deltas are a few percent of the base (bf16 then
has many equal magnitudes, which exercises the tie order of the magnitude sorts). Random methods run
mergekit under torch.manual_seed(N) and ours on a CPU generator seeded N: same draws, same bits.
"""

import pytest
import torch
from mergekit.merge_methods import merge_tensors

from merge_core.errors import InputError
from merge_core.methods import METHODS, MergeInputs
from merge_core.methods.sparsify import della_rank_norm

SHAPES = [(37,), (12, 16), (3, 5, 6)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def family(shape, children, dtype, seed=0, delta=0.03):
    """[child_1, ..., child_n, base]: mergekit's order when the base is not listed among the models."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    kids = [base + delta * torch.randn(shape, generator=generator) for _ in range(children)]
    return [t.to(dtype) for t in [*kids, base]]


def our_merge(method, tensors, base_index, per_model, shared, seed=None, prepared=False):
    """Run our method; per_model values are given for the non-base inputs (mergekit's NON_BASE scope) unless
    the method ignores the base, and the base slot is filled with the declared default like the planner does."""
    spec = METHODS[method]
    full = {}
    for name, values in per_model.items():
        if base_index is None or spec.base == "ignored":
            full[name] = list(values)
        else:
            full[name] = list(values)
            full[name].insert(base_index, spec.param(name).default)
    for param in spec.params:
        if param.per_model and param.name not in full:
            full[param.name] = [param.default] * len(tensors)
    shared = {p.name: p.default for p in spec.params if not p.per_model} | shared
    inputs = MergeInputs(
        tensors=tensors,
        base_index=base_index,
        per_model=full,
        shared=shared,
        prepared=spec.prepare(tensors, base_index) if prepared else None,
        generator=None if seed is None else torch.Generator().manual_seed(seed),
        name="model.layers.0.mlp.up_proj.weight",
    )
    return spec.merge(inputs)


def mergekit_merge(method, tensors, base_index, per_model, shared, seed=None):
    parameters = {**per_model, **shared}
    if seed is None:
        return merge_tensors(tensors, method, base_index=base_index, parameters=parameters)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return merge_tensors(tensors, method, base_index=base_index, parameters=parameters)


def assert_bit_equal(ours, theirs):
    """Tolerance 0; NaN equals NaN because mergekit's own guards can let one through (see the fp16 case)."""
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)


def check_parity(method, tensors, base_index, per_model, shared=None, seed=None):
    shared = shared or {}
    theirs = mergekit_merge(method, tensors, base_index, per_model, shared, seed)
    ours = our_merge(method, tensors, base_index, per_model, shared, seed)
    assert_bit_equal(ours, theirs)
    if METHODS[method].prepare is not None:
        assert_bit_equal(our_merge(method, tensors, base_index, per_model, shared, seed, prepared=True), theirs)
    return ours


# --- the task-arithmetic family ---------------------------------------------------------------------------

TASK_ARITHMETIC_CASES = [
    ("task_arithmetic", {"weight": [0.5, 1.0, -0.3]}, {}),
    ("task_arithmetic", {"weight": [0.5, 1.0, -0.3]}, {"normalize": True, "lambda": 0.7}),
    # Weights summing to 0: the divisor guard (|sum| < 1e-8) catches it, except in fp16 where 1e-8 rounds
    # to 0 and mergekit divides by zero; we match that too (inf/NaN), bit for bit.
    ("task_arithmetic", {"weight": [1.0, -1.0, 0.0]}, {"normalize": True}),
    ("ties", {"weight": [1.0, 1.0, 1.0], "density": [0.5, 0.5, 0.5]}, {}),
    ("ties", {"weight": [0.7, -0.4, 1.2], "density": [0.3, 0.8, 1.0]}, {"normalize": False, "lambda": 1.3}),
    ("ties", {"weight": [0.6, 0.9, 0.3], "density": [0.2, 0.01, 0.6]}, {"rescale": True, "int8_mask": True}),
    ("ties", {"weight": [1.0, 0.5, 0.5], "density": [0.0, 0.5, 1.5]}, {}),  # density 0 and > 1
    ("breadcrumbs", {"weight": [0.5, 0.8, 0.4], "density": [0.7, 0.7, 0.5]}, {}),
    ("breadcrumbs", {"weight": [0.5, -0.8, 0.4], "density": [0.9, 0.6, 0.3], "gamma": [0.05, 0.1, 0.2]}, {}),
    (
        "breadcrumbs",
        {"weight": [1.0, 1.0, 1.0], "density": [0.95, 0.8, 0.5], "gamma": [0.1, 0.1, 0.1]},
        {"rescale": True},
    ),
    ("breadcrumbs_ties", {"weight": [0.5, 0.8, 0.4], "density": [0.7, 0.5, 0.9]}, {"normalize": True}),
    ("breadcrumbs_ties", {"weight": [0.5, 0.8, -0.4], "density": [0.7, 0.5, 0.9], "gamma": [0.02, 0.0, 0.3]}, {}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("method", "per_model", "shared"), TASK_ARITHMETIC_CASES)
def test_task_arithmetic_family_matches_mergekit(method, per_model, shared, shape, dtype):
    tensors = family(shape, 3, dtype, seed=len(shape))
    check_parity(method, tensors, len(tensors) - 1, per_model, shared)


def test_base_first_and_base_only():
    tensors = family((9, 10), 2, torch.bfloat16, seed=3)
    base_first = [tensors[-1], *tensors[:-1]]
    check_parity("ties", base_first, 0, {"weight": [0.8, 0.6], "density": [0.4, 0.6]})
    check_parity("task_arithmetic", tensors[-1:], 0, {"weight": []})


RANDOM_CASES = [
    ("dare_ties", {"weight": [1.0, 1.0, 1.0], "density": [0.5, 0.5, 0.5]}, {}),
    ("dare_ties", {"weight": [0.7, -0.3, 0.9], "density": [0.3, 1.0, 0.8]}, {"rescale": False, "normalize": True}),
    ("dare_linear", {"weight": [0.5, 0.5, 0.5], "density": [0.6, 0.4, 0.9]}, {}),
    ("dare_linear", {"weight": [0.5, 1.5, -0.5], "density": [0.6, 0.0, 0.9]}, {"lambda": 0.8}),
    ("della", {"weight": [1.0, 1.0, 1.0], "density": [0.5, 0.5, 0.5]}, {}),
    ("della", {"weight": [0.7, 0.4, 1.1], "density": [0.3, 0.7, 1.0], "epsilon": [0.1, 0.2, 0.05]}, {"rescale": False}),
    ("della_linear", {"weight": [0.5, 0.5, 0.5], "density": [0.6, 0.4, 0.0], "epsilon": [0.3, 0.1, 0.1]}, {}),
    ("della_linear", {"weight": [0.6, -0.4, 0.3], "density": [0.5, 0.5, 0.5]}, {"normalize": True, "lambda": 1.2}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("method", "per_model", "shared"), RANDOM_CASES)
def test_random_methods_match_mergekit_under_the_same_seed(method, per_model, shared, shape, dtype):
    tensors = family(shape, 3, dtype, seed=len(shape))
    check_parity(method, tensors, len(tensors) - 1, per_model, shared, seed=1234)


@pytest.mark.parametrize("method", ["dare_ties", "della_linear"])
def test_random_methods_repeat_with_a_seed_and_vary_across_seeds(method):
    tensors = family((40, 50), 2, torch.float32)
    per_model = {"weight": [1.0, 1.0], "density": [0.5, 0.5]}
    first = our_merge(method, tensors, 2, per_model, {}, seed=7)
    assert torch.equal(first, our_merge(method, tensors, 2, per_model, {}, seed=7, prepared=True))
    assert not torch.equal(first, our_merge(method, tensors, 2, per_model, {}, seed=8))


def test_draws_continue_on_one_generator_like_mergekit_across_tensors():
    """A session passes one generator through all tensors; mergekit draws from the global RNG in turn."""
    pairs = [family((30,), 2, torch.float32, seed=s) for s in (1, 2)]
    per_model = {"weight": [1.0, 0.5], "density": [0.4, 0.6]}
    with torch.random.fork_rng():
        torch.manual_seed(99)
        theirs = [merge_tensors(t, "dare_linear", base_index=2, parameters=per_model) for t in pairs]
    generator = torch.Generator().manual_seed(99)
    for tensors, expected in zip(pairs, theirs, strict=True):
        spec = METHODS["dare_linear"]
        inputs = MergeInputs(
            tensors=tensors,
            base_index=2,
            per_model={"weight": [1.0, 0.5, 0.0], "density": [0.4, 0.6, 1.0]},
            shared={p.name: p.default for p in spec.params if not p.per_model},
            generator=generator,
        )
        assert_bit_equal(spec.merge(inputs), expected)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_kept_fraction_and_l1_rescale_hold(method):
    """One child over a zero base, weight 1, lambda 1: the output IS the sparsified, rescaled task vector."""
    delta = torch.randn(200, 500, generator=torch.Generator().manual_seed(0))
    base = torch.zeros_like(delta)
    for density in (0.2, 0.5, 0.8):
        plain = our_merge(method, [delta, base], 1, {"weight": [1.0], "density": [density]}, {"rescale": False}, 5)
        kept = plain != 0
        assert abs(kept.float().mean().item() - density) < 0.01  # 100k draws: std of the fraction < 0.0016
        assert torch.equal(plain[kept], delta[kept])
        rescaled = our_merge(method, [delta, base], 1, {"weight": [1.0], "density": [density]}, {"rescale": True}, 5)
        assert torch.equal(rescaled != 0, kept)  # same seed, same mask
        ratio = (delta.abs().sum() / plain.abs().sum()).item()
        assert ratio > 1.1
        assert torch.allclose(rescaled[kept], delta[kept] * ratio, rtol=1e-5)
        assert rescaled.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)


def test_della_keeps_large_magnitudes_more_often():
    torch.manual_seed(0)
    delta = torch.randn(400, 300)
    rank_norm = della_rank_norm(delta)
    base = torch.zeros_like(delta)
    per_model = {"weight": [1.0], "density": [0.5], "epsilon": [0.3]}
    kept = our_merge("della_linear", [delta, base], 1, per_model, {"rescale": False}, seed=1) != 0
    low, high = kept[rank_norm < 0.2].float().mean().item(), kept[rank_norm > 0.8].float().mean().item()
    # Keep probability is 0.2 + 0.6 * rank_norm: ~0.26 in the lowest fifth, ~0.74 in the highest.
    assert low == pytest.approx(0.26, abs=0.02) and high == pytest.approx(0.74, abs=0.02)


def test_della_ranks_round_like_mergekit_in_wide_bf16_rows():
    # bf16 cannot hold every rank above 256: the rank normalization must see the rounded ranks.
    tensors = family((16, 1000), 2, torch.bfloat16)
    check_parity("della", tensors, 2, {"weight": [0.8, 0.6], "density": [0.5, 0.4]}, {}, seed=11)


def test_della_rejects_epsilon_outside_the_density_band():
    tensors = family((10,), 1, torch.float32)
    with pytest.raises(InputError, match="density ± epsilon"):
        our_merge("della", tensors, 1, {"weight": [1.0], "density": [0.2], "epsilon": [0.3]}, {}, seed=0)


# --- interpolation and the rest -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(
    ("weight", "normalize"),
    [([0.3, 0.5, 0.2], True), ([1.0, -0.4, 0.7], True), ([0.6, 1.3, -0.2], False), ([1 / 3, 1 / 3, 1 / 3], True)],
)
def test_linear_matches_mergekit(weight, normalize, shape, dtype):
    tensors = family(shape, 2, dtype, seed=1)
    check_parity("linear", tensors, None, {"weight": weight}, {"normalize": normalize})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.77, 1.0])
@pytest.mark.parametrize("parallel", [False, True], ids=["generic", "near_parallel"])
def test_slerp_matches_mergekit(t, parallel, shape, dtype):
    base, other = family(shape, 1, torch.float32, seed=2, delta=1e-4 if parallel else 0.5)[::-1]
    tensors = [base.to(dtype), other.to(dtype)]
    out = check_parity("slerp", tensors, 0, {}, {"t": t})
    if t == 0:
        assert torch.equal(out, tensors[0])
    # the base listed second: t still measures the distance from the base
    check_parity("slerp", tensors[::-1], 1, {}, {"t": t})


def test_slerp_on_tensors_larger_than_one_chunk():
    base, other = family((1100, 1000), 1, torch.bfloat16, seed=4, delta=0.5)[::-1]
    check_parity("slerp", [base, other], 0, {}, {"t": 0.4})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no_base"])
@pytest.mark.parametrize(
    "shared",
    [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}],
    ids=["flat", "rows", "row_wise"],
)
@pytest.mark.parametrize("weight", [[0.3, 0.7], [1.0, -1.0]], ids=["w", "w_sum_zero"])
def test_nuslerp_matches_mergekit(weight, shared, with_base, shape, dtype):
    tensors = family(shape, 2, dtype, seed=5, delta=0.2)
    if not with_base:
        tensors = tensors[:2]
    check_parity("nuslerp", tensors, 2 if with_base else None, {"weight": weight}, shared)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("children", [2, 3])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_mergekit(filter_wise, children, shape, dtype):
    tensors = family(shape, children, dtype, seed=6)
    check_parity("model_stock", tensors, len(tensors) - 1, {}, {"filter_wise": filter_wise})


def test_model_stock_keeps_the_base_for_opposed_children():
    base = torch.zeros(8)
    child = torch.ones(8)
    out = check_parity("model_stock", [child, -child, base], 2, {}, {})
    assert torch.equal(out, base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.0])
def test_passthrough_matches_mergekit(scale, dtype):
    (tensor,) = family((6, 7), 0, dtype)
    out = check_parity("passthrough", [tensor], None, {"scale": [scale]}, {})
    assert torch.equal(out, tensor * scale)


def test_registry_declares_all_thirteen_methods():
    assert sorted(METHODS) == sorted(
        [
            "linear",
            "slerp",
            "nuslerp",
            "task_arithmetic",
            "ties",
            "dare_ties",
            "dare_linear",
            "breadcrumbs",
            "breadcrumbs_ties",
            "della",
            "della_linear",
            "model_stock",
            "passthrough",
        ]
    )
    assert {name for name, method in METHODS.items() if method.random} == {
        "dare_ties",
        "dare_linear",
        "della",
        "della_linear",
    }
    assert METHODS["ties"].param("density").default == 1.0 and METHODS["ties"].param("normalize").default is True
    assert METHODS["breadcrumbs"].param("gamma").default == 0.01
    assert METHODS["della"].param("epsilon").default == 0.15


def tensors_in(value):
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for item in value for t in tensors_in(item)] if isinstance(value, list | tuple) else []


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "della", "dare_linear", "task_arithmetic", "slerp"])
def test_merge_leaves_inputs_and_prepared_untouched(method):
    """A session reuses inputs and prepare() output across hundreds of candidates: merge must not write them."""
    spec = METHODS[method]
    tensors = family((10, 12), 1 if method == "slerp" else 2, torch.bfloat16)
    prepared = spec.prepare(tensors, len(tensors) - 1)
    kept = tensors_in((tensors, prepared))
    snapshot = [t.clone() for t in kept]
    per_model = {} if method == "slerp" else {"weight": [0.7, 0.5, 1.0], "density": [0.5, 0.5, 1.0]}
    per_model |= {p.name: [p.default] * 3 for p in spec.params if p.per_model and p.name not in per_model}
    shared = {p.name: p.default for p in spec.params if not p.per_model} | {"t": 0.4, "normalize": True}
    spec.merge(MergeInputs(tensors, len(tensors) - 1, per_model, shared, prepared, torch.Generator().manual_seed(0)))
    assert len(kept) >= len(tensors) + 1
    assert all(torch.equal(a, b) for a, b in zip(kept, snapshot, strict=True))
