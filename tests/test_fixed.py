"""Fixed-threshold clippers: optax and float64 oracles, thresholds, hostile inputs, errors."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import oracle
import pytest
from helpers import DTYPES, all_eqns, enable_x64, make_tree, rtol
from hlo import distinct_fusions, entry_fusion_operands, slice_kernels, update_hlo

import optaxclip as oc
from optaxclip import _numerics as num


def _update(tx, updates, params=None, wrap=lambda f: f):
    state = tx.init(updates if params is None else params)
    return wrap(tx.update)(updates, state, params)


# ---------------------------------------------------------------------------
# Equal to optax on ordinary float32 inputs
# ---------------------------------------------------------------------------

OPTAX_PAIRS = {
    "clip_by_global_norm": (lambda c: oc.clip_by_global_norm(c), optax.clip_by_global_norm),
    "clip_by_block_rms": (lambda c: oc.clip_by_block_rms(c), optax.clip_by_block_rms),
    "clip_by_value": (lambda c: oc.clip_by_value(c), optax.clip),
}


@pytest.mark.parametrize("threshold", [0.1, 1.0, 3.0, 100.0])
@pytest.mark.parametrize("tree_kind", ["nested_dict", "conv", "scalar", "tuple_none"])
@pytest.mark.parametrize("name", sorted(OPTAX_PAIRS))
def test_equals_optax_on_ordinary_float32(name, tree_kind, threshold, maybe_jit):
    ours, theirs = OPTAX_PAIRS[name]
    updates = make_tree(tree_kind, jnp.float32, scale=2.0)
    got, _ = _update(ours(threshold), updates, wrap=maybe_jit)
    expected, _ = theirs(threshold).update(updates, optax.EmptyState())
    chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------
# clip_by_global_norm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ord", [1, 2, math.inf])
@pytest.mark.parametrize("threshold", [0.5, 2.0])
def test_global_norm_clip_matches_float64_oracle(ord, threshold, maybe_jit):
    updates = make_tree("nested_dict", jnp.float32, scale=2.0)
    got, _ = _update(oc.clip_by_global_norm(threshold, ord=ord), updates, wrap=maybe_jit)
    norm = oracle.global_norm(updates, ord)
    scale = min(1.0, threshold / norm)
    for g, u in zip(jax.tree.leaves(got), jax.tree.leaves(updates)):
        np.testing.assert_allclose(g, np.asarray(u, np.float64) * scale, rtol=1e-6)
    np.testing.assert_allclose(oracle.global_norm(got, ord), min(norm, threshold), rtol=1e-6)


def test_global_norm_clip_three_four_five():
    got, state = _update(
        oc.clip_by_global_norm(1.0), {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    )
    np.testing.assert_allclose(got["a"], [0.6])
    np.testing.assert_allclose(got["b"], [0.8])
    s = oc.stats(state)
    assert float(s["clip_by_global_norm/norm"]) == 5.0
    np.testing.assert_allclose(s["clip_by_global_norm/scale"], 0.2)
    assert float(s["clip_by_global_norm/clipped"]) == 1.0


def test_global_norm_clip_is_identity_at_the_threshold(maybe_jit):
    updates = {"a": jnp.array([3.0, 4.0])}
    got, state = _update(oc.clip_by_global_norm(5.0), updates, wrap=maybe_jit)
    chex.assert_trees_all_equal(got, updates)
    assert int(oc.stats(state)["clip_by_global_norm/num_clipped"]) == 0


@pytest.mark.parametrize("value", [1e20, 1e30, 1e36])
def test_global_norm_clip_float32_huge_keeps_direction(value, maybe_jit):
    # optax 0.2.8 returns zeros here: the sum of squares overflows.
    got, _ = _update(
        oc.clip_by_global_norm(1.0),
        [jnp.array([3 * value, 4 * value], jnp.float32)],
        wrap=maybe_jit,
    )
    np.testing.assert_allclose(got[0], [0.6, 0.8], rtol=1e-6)


def test_global_norm_clip_near_float32_max_keeps_direction(maybe_jit):
    big = float(jnp.finfo(jnp.float32).max) * 0.9
    updates = [jnp.array([big, -big, 1.0], jnp.float32)]
    got, state = _update(oc.clip_by_global_norm(1.0), updates, wrap=maybe_jit)
    np.testing.assert_allclose(got[0], [2**-0.5, -(2**-0.5), 0.0], rtol=1e-6, atol=1e-30)
    assert int(oc.stats(state)["clip_by_global_norm/num_nonfinite"]) == 0


def test_global_norm_clip_tiny_threshold_on_tiny_gradients(maybe_jit):
    updates = [jnp.array([3e-30, 4e-30], jnp.float32)]
    got, _ = _update(oc.clip_by_global_norm(1e-30), updates, wrap=maybe_jit)
    np.testing.assert_allclose(got[0], [6e-31, 8e-31], rtol=1e-6)


def test_global_norm_clip_float16_many_ones(maybe_jit):
    updates = [jnp.ones((100_000,), jnp.float16)]
    got, state = _update(oc.clip_by_global_norm(1.0), updates, wrap=maybe_jit)
    assert got[0].dtype == jnp.float16
    np.testing.assert_allclose(oracle.global_norm(got), 1.0, rtol=rtol(jnp.float16))
    np.testing.assert_allclose(
        oc.stats(state)["clip_by_global_norm/norm"], math.sqrt(1e5), rtol=1e-6
    )


def test_global_norm_clip_bfloat16_scalar_leaves_clips_at_twenty(maybe_jit):
    # optax 0.2.8 reports a norm of 16 for this tree and never clips at 20.
    updates = [jnp.ones((), jnp.bfloat16) for _ in range(1000)]
    got, state = _update(oc.clip_by_global_norm(20.0), updates, wrap=maybe_jit)
    assert int(oc.stats(state)["clip_by_global_norm/num_clipped"]) == 1
    np.testing.assert_allclose(oracle.global_norm(got), 20.0, rtol=rtol(jnp.bfloat16))


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_global_norm_clip_nonfinite_passes_through_and_counts(bad, maybe_jit):
    updates = {"a": jnp.array([1.0, bad]), "b": jnp.array([100.0])}
    got, state = _update(oc.clip_by_global_norm(1.0), updates, wrap=maybe_jit)
    chex.assert_trees_all_equal(got, updates)
    s = oc.stats(state)
    assert int(s["clip_by_global_norm/num_nonfinite"]) == 1
    assert int(s["clip_by_global_norm/num_clipped"]) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_global_norm_clip_zero_threshold(dtype, maybe_jit):
    zeros, _ = _update(oc.clip_by_global_norm(0.0), {"a": jnp.zeros(3, dtype)}, wrap=maybe_jit)
    chex.assert_trees_all_equal(zeros, {"a": jnp.zeros(3, dtype)})
    ones, _ = _update(oc.clip_by_global_norm(0.0), {"a": jnp.ones(3, dtype)}, wrap=maybe_jit)
    chex.assert_trees_all_equal(ones, {"a": jnp.zeros(3, dtype)})


@pytest.mark.parametrize("ord", [1, 2])
def test_global_norm_clip_complex_keeps_phase(ord):
    updates = {"z": jnp.array([3 + 4j, 0j], jnp.complex64)}
    got, _ = _update(oc.clip_by_global_norm(1.0, ord=ord), updates)
    assert got["z"].dtype == jnp.complex64
    np.testing.assert_allclose(got["z"], [0.6 + 0.8j, 0j], rtol=1e-6)


def test_global_norm_clip_float64_under_x64():
    with enable_x64():
        updates = {"a": jnp.array([3e200, 4e200]), "b": jnp.array([0.0], jnp.float32)}
        got, state = _update(oc.clip_by_global_norm(1.0), updates)
        assert got["a"].dtype == jnp.float64 and got["b"].dtype == jnp.float32
        np.testing.assert_allclose(got["a"], [0.6, 0.8], rtol=1e-14)
        assert oc.stats(state)["clip_by_global_norm/norm"].dtype == jnp.float32


@pytest.mark.parametrize("ord", [1, 2, math.inf])
def test_grad_through_global_norm_clip_is_finite_at_zero(ord):
    tx = oc.clip_by_global_norm(1.0, ord=ord)
    loss = lambda x: jnp.sum(tx.update({"x": x}, tx.init({"x": x}))[0]["x"] ** 2)
    g = jax.grad(loss)(jnp.zeros(4))
    assert bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(g, 0.0)


def test_grad_through_global_norm_clip_matches_analytic():
    tx = oc.clip_by_global_norm(1.0)
    # f(x) = sum(clip(x) * w); clip(x) = x / |x| when |x| > 1.
    x = jnp.array([3.0, 4.0])
    w = jnp.array([1.0, 2.0])
    g = jax.grad(lambda x: jnp.sum(tx.update({"x": x}, tx.init({"x": x}))[0]["x"] * w))(x)
    n = 5.0
    expected = w / n - x * jnp.dot(x, w) / n**3
    np.testing.assert_allclose(g, expected, rtol=1e-6)


# ---------------------------------------------------------------------------
# Thresholds: arrays, schedules, inject_hyperparams, bad values
# ---------------------------------------------------------------------------


def test_schedule_threshold_follows_the_step_count():
    schedule = optax.linear_schedule(4.0, 1.0, transition_steps=3)
    tx = oc.clip_by_global_norm(schedule)
    updates = {"a": jnp.array([3.0, 4.0])}
    state = tx.init(updates)
    step = jax.jit(tx.update)
    thresholds, norms = [], []
    for _ in range(5):
        out, state = step(updates, state)
        thresholds.append(float(oc.stats(state)["clip_by_global_norm/threshold"]))
        norms.append(float(oc.global_norm(out)))
    np.testing.assert_allclose(thresholds, [4.0, 3.0, 2.0, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(norms, thresholds, rtol=1e-6)


def test_array_threshold_is_accepted(maybe_jit):
    got, _ = _update(
        oc.clip_by_global_norm(jnp.asarray(1.0)), {"a": jnp.array([3.0, 4.0])}, wrap=maybe_jit
    )
    np.testing.assert_allclose(got["a"], [0.6, 0.8])


def test_traced_ord_under_inject_hyperparams():
    tx = optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=1.0, ord=1.0)
    updates = {"a": jnp.array([3.0, -4.0])}
    out, _ = jax.jit(tx.update)(updates, tx.init(updates))
    np.testing.assert_allclose(out["a"], [3 / 7, -4 / 7], rtol=1e-6)


def test_invalid_ord_under_inject_hyperparams_is_rejected_at_init():
    tx = optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=1.0, ord=3.0)
    with pytest.raises(ValueError, match=r"`ord` must be 1, 2 or inf"):
        tx.init({"a": jnp.ones(2)})


def test_traced_invalid_ord_gives_nan_norm_and_no_clipping():
    tx = optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=1.0, ord=2.0)
    updates = {"a": jnp.array([3.0, -4.0])}
    state = tx.init(updates)
    state.hyperparams["ord"] = jnp.asarray(3.0)  # changed after init: only a trace sees it
    out, state = jax.jit(tx.update)(updates, state)
    chex.assert_trees_all_equal(out, updates)
    assert math.isnan(float(oc.stats(state)["clip_by_global_norm/norm"]))


FACTORIES = {
    "clip_by_value": (oc.clip_by_value, "max_value"),
    "clip_by_global_norm": (oc.clip_by_global_norm, "max_norm"),
    "clip_by_leaf_norm": (oc.clip_by_leaf_norm, "max_norm"),
    "clip_by_block_rms": (oc.clip_by_block_rms, "max_rms"),
}


@pytest.mark.parametrize("value", [-1.0, float("nan"), np.float32(-2.0)])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_negative_or_nan_threshold_is_rejected(name, value):
    factory, arg = FACTORIES[name]
    with pytest.raises(ValueError, match=rf"`{arg}` must be >= 0 .* got"):
        factory(value)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_non_scalar_threshold_is_rejected(name):
    factory, arg = FACTORIES[name]
    with pytest.raises(
        ValueError, match=rf"`{arg}` must be a scalar; got an array of shape \(2,\)"
    ):
        factory(jnp.array([1.0, 2.0]))


@pytest.mark.parametrize("value", ["1.0", None, True])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_non_numeric_threshold_is_rejected(name, value):
    factory, arg = FACTORIES[name]
    with pytest.raises(
        TypeError, match=rf"`{arg}` must be a float, a scalar array or an optax.Schedule"
    ):
        factory(value)


def test_both_axis_name_and_partition_specs_is_rejected():
    from jax.sharding import PartitionSpec as P

    with pytest.raises(ValueError, match="Give `axis_name` or `partition_specs`, not both"):
        oc.clip_by_global_norm(1.0, axis_name="x", partition_specs=P())


def test_partition_specs_mismatch_is_rejected():
    from jax.sharding import PartitionSpec as P

    with pytest.raises(ValueError, match="`partition_specs` must match the updates' tree"):
        oc.global_norm({"a": jnp.ones(2), "b": jnp.ones(2)}, partition_specs={"a": P(), "c": P()})


# ---------------------------------------------------------------------------
# clip_by_leaf_norm and clip_by_block_rms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ord", [1, 2, math.inf])
def test_leaf_norm_clip_matches_float64_oracle(ord, maybe_jit):
    updates = make_tree("nested_dict", jnp.float32, scale=2.0)
    got, state = _update(oc.clip_by_leaf_norm(1.5, ord=ord), updates, wrap=maybe_jit)
    n_clipped = 0
    for g, u in zip(jax.tree.leaves(got), jax.tree.leaves(updates)):
        norm = oracle.leaf_norm(u, ord)
        n_clipped += norm > 1.5
        np.testing.assert_allclose(g, np.asarray(u, np.float64) * min(1.0, 1.5 / norm), rtol=1e-6)
    s = oc.stats(state)
    np.testing.assert_allclose(s["clip_by_leaf_norm/clipped"], n_clipped / 3)
    np.testing.assert_allclose(
        s["clip_by_leaf_norm/norm"], oracle.global_norm(updates, ord), rtol=1e-6
    )


def test_leaf_norm_clip_huge_leaf_beside_ordinary_one(maybe_jit):
    updates = {"huge": jnp.array([3e30, 4e30]), "small": jnp.array([0.3, 0.4])}
    got, state = _update(oc.clip_by_leaf_norm(1.0), updates, wrap=maybe_jit)
    np.testing.assert_allclose(got["huge"], [0.6, 0.8], rtol=1e-6)
    chex.assert_trees_all_equal(got["small"], updates["small"])
    np.testing.assert_allclose(oc.stats(state)["clip_by_leaf_norm/clipped"], 0.5)


def test_block_rms_three_four_five():
    got, state = _update(oc.clip_by_block_rms(1.0), {"w": jnp.array([3.0, 4.0, 0.0, 0.0])})
    np.testing.assert_allclose(got["w"], [1.2, 1.6, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(oc.stats(state)["clip_by_block_rms/scale"], 0.4, rtol=1e-6)


def test_block_rms_zero_size_leaf_is_untouched(maybe_jit):
    updates = {"empty": jnp.zeros((0, 4)), "w": jnp.array([3.0, 4.0])}
    got, _ = _update(oc.clip_by_block_rms(0.1), updates, wrap=maybe_jit)
    assert got["empty"].shape == (0, 4)


# ---------------------------------------------------------------------------
# clip_by_value
# ---------------------------------------------------------------------------


def test_value_clip_nan_passes_and_inf_clamps(maybe_jit):
    updates = {"a": jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.2])}
    got, state = _update(oc.clip_by_value(0.5), updates, wrap=maybe_jit)
    np.testing.assert_array_equal(got["a"], np.array([np.nan, 0.5, -0.5, 0.2], np.float32))
    assert int(oc.stats(state)["clip_by_value/num_nonfinite"]) == 1


def test_value_clip_stats_count_entries(maybe_jit):
    updates = {"a": jnp.array([-3.0, 0.5, 4.0, 1.0]), "b": jnp.array([0.0])}
    _, state = _update(oc.clip_by_value(1.0), updates, wrap=maybe_jit)
    s = oc.stats(state)
    np.testing.assert_allclose(s["clip_by_value/clipped"], 2 / 5)
    np.testing.assert_allclose(s["clip_by_value/scale"], 0.25)
    np.testing.assert_allclose(s["clip_by_value/norm"], math.sqrt(9 + 0.25 + 16 + 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_value_clip_never_exceeds_the_bound_in_low_precision(dtype):
    updates = {"a": jnp.linspace(-1, 1, 101).astype(dtype)}
    got, _ = _update(oc.clip_by_value(0.1), updates)
    assert float(jnp.max(jnp.abs(got["a"].astype(jnp.float32)))) <= float(jnp.float32(0.1))


def _value_stats_oracle(updates, c):
    """float64: fraction of entries above the bound as each leaf's dtype rounds it down,
    and the largest magnitude, NaN entries left out of both."""
    over, size, largest = 0, 0, 0.0
    for x in jax.tree.leaves(updates):
        mags = np.abs(oracle.as_f64(x)).ravel()
        bound = np.asarray(c, np.float32).astype(x.dtype)
        if float(bound) > c:  # the bound is rounded down to the dtype
            bound = np.nextafter(bound, np.zeros((), x.dtype))
        over += int(np.sum(mags > float(bound)))
        size += mags.size
        largest = max(largest, float(np.max(mags[~np.isnan(mags)], initial=0.0)))
    return over / size, largest


def _value_case(name):
    rng = np.random.default_rng(7)
    big = rng.standard_normal(9000).astype(np.float32)  # above SMALL_LEAF: its own reduction
    small = rng.standard_normal(37).astype(np.float32)
    if name == "none_clipped":
        return {"big": big, "small": small}, 100.0
    if name == "nan_and_clipped":
        big[[3, 70]] = np.nan
        return {"big": big, "small": small}, 1.5
    if name == "inf_against_inf_bound":
        small[[0, 1]] = [np.inf, -np.inf]
        return {"big": big, "small": small}, math.inf
    if name == "zero_bound":
        big[::2] = 0.0
        return {"big": big, "small": small}, 0.0
    if name == "entries_at_the_bound":  # clipped before: equal to the bound, not above it
        big = np.clip(big, -1.5, 1.5)
        big[[5, 6]] = [4.0, -2.0]
        return {"big": big, "small": small.astype(jnp.bfloat16)}, 1.5
    if name == "mixed_dtypes":
        tree = {"big": big.astype(jnp.bfloat16), "small": small.astype(jnp.float16), "f": small}
        return tree, 0.7
    raise ValueError(name)


@pytest.mark.parametrize(
    "case",
    [
        "none_clipped",
        "nan_and_clipped",
        "inf_against_inf_bound",
        "zero_bound",
        "entries_at_the_bound",
        "mixed_dtypes",
    ],
)
def test_value_clip_statistics_match_oracle(case, maybe_jit):
    # The count reads each chunk once with a fused indicator and runs only when the largest
    # magnitude is above a bound; NaN entries and an infinite bound take the exact recount.
    updates, c = _value_case(case)
    updates = {k: jnp.asarray(v) for k, v in updates.items()}
    got, state = _update(oc.clip_by_value(c), updates, wrap=maybe_jit)
    s = oc.stats(state)
    fraction, largest = _value_stats_oracle(updates, c)
    np.testing.assert_allclose(s["clip_by_value/clipped"], fraction, rtol=1e-6)
    if largest > c:
        np.testing.assert_allclose(s["clip_by_value/scale"], c / largest, rtol=1e-6)
    else:
        assert float(s["clip_by_value/scale"]) == 1.0
    changed = sum(
        int(np.sum(np.asarray(g != u) & ~np.isnan(oracle.as_f64(u))))
        for g, u in zip(jax.tree.leaves(got), jax.tree.leaves(updates))
    )
    size = sum(x.size for x in jax.tree.leaves(updates))
    np.testing.assert_allclose(changed / size, fraction, rtol=1e-6)
    assert int(s["clip_by_value/num_clipped"]) == (fraction > 0)
    assert int(s["clip_by_value/num_nonfinite"]) == (
        case in ("nan_and_clipped", "inf_against_inf_bound")
    )


def test_value_clip_statistics_read_their_scalars_without_a_slice_kernel_each():
    # Each chunk's count reads its own copies of its scalars (else XLA writes the shared
    # broadcast to memory). As slices of one vector, every slice was a kernel of its own:
    # 200 of them on a 147-leaf tree, which compiled in 1.9 s against 0.9 s without.
    grads = {f"l{i:02d}": jnp.full((64, 128), 3.0 if i % 2 else 0.5) for i in range(12)}
    grads.update({f"m{i}": jnp.full((32, 256), 0.25, jnp.bfloat16) for i in range(3)})
    tx = oc.clip_by_value(1.0)
    text = update_hlo(tx, grads)
    assert slice_kernels(text) == 0
    out, state = tx.update(grads, tx.init(grads))
    for k, g in grads.items():
        np.testing.assert_array_equal(out[k], jnp.minimum(g, 1.0))
    s = oc.stats(state)
    np.testing.assert_allclose(s["clip_by_value/clipped"], 6 * 8192 / (12 * 8192 + 3 * 8192))
    np.testing.assert_allclose(s["clip_by_value/scale"], 1 / 3, rtol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: oc.clip_by_leaf_norm(1.0),
        lambda: oc.adagc(),
        lambda: oc.monitor(per_leaf=True),
    ],
    ids=["clip_by_leaf_norm", "adagc", "monitor"],
)
def test_per_leaf_norms_are_read_without_a_slice_kernel_per_leaf(make):
    # Each leaf's norm (and, in the rescue loop's body, its scale) is read from a piece of
    # 16 entries of the flat vector, which XLA compiles once per offset: as a slice of the
    # whole vector, each was a kernel of its own (monitor(per_leaf=True) over 2,000 small
    # leaves compiled in 45 s, 17 s from pieces; adagc in 36 s, 19 s). The pieces are cut
    # inside a few reductions, not by a slice each.
    def distinct(n):
        g = {f"l{i:03d}": jnp.ones((64, 128)) for i in range(n)}
        tx = make()
        return slice_kernels(update_hlo(tx, g), True)

    assert distinct(60) == distinct(20)


@pytest.mark.parametrize(
    "make",
    [
        lambda: oc.clip_by_leaf_norm(1.0),
        lambda: oc.adagc(),
        lambda: oc.monitor(per_leaf=True),
        lambda: oc.adaptive_grad_clip(0.01),
    ],
    ids=["clip_by_leaf_norm", "adagc", "monitor", "adaptive_grad_clip"],
)
def test_per_leaf_norms_are_not_concatenated_back_into_a_vector(make):
    # The per-leaf norms are slices of one flat vector. Concatenating the slices back (for
    # the total norm of monitor and adagc, and adagc's per-leaf vector) made XLA's fusion
    # pass take 5.2 s over 999 leaves: monitor(per_leaf=True) compiled in 10 s, now 3 s.
    g = {f"w{i:02d}": jnp.ones((16, 8)) for i in range(30)} | {"b": jnp.ones(9000)}
    tx = make()
    jaxpr = jax.make_jaxpr(tx.update)(g, tx.init(g), g)
    one_entry = [
        sum(v.aval.size == 1 for v in eqn.invars)
        for eqn in all_eqns(jaxpr)
        if eqn.primitive.name == "concatenate"
    ]
    assert max(one_entry, default=0) <= 2


def test_value_clip_complex_clips_modulus():
    got, _ = _update(oc.clip_by_value(1.0), {"z": jnp.array([3 + 4j, 0.5j], jnp.complex64)})
    np.testing.assert_allclose(got["z"], [0.6 + 0.8j, 0.5j], rtol=1e-6)


def test_non_partition_spec_leaf_is_rejected():
    with pytest.raises(
        TypeError, match=r"`partition_specs` must hold jax.sharding.PartitionSpec leaves.*got 'x'"
    ):
        oc.global_norm({"a": jnp.ones(2)}, partition_specs={"a": "x"})


def test_boolean_array_threshold_is_rejected():
    with pytest.raises(TypeError, match=r"`max_norm` must be numeric; got an array of dtype bool"):
        oc.clip_by_global_norm(np.array(True))


@pytest.mark.parametrize("offsets", [True, False], ids=["runtime_offsets", "pieces"])
@pytest.mark.parametrize("name", ["clip_by_leaf_norm", "clip_by_block_rms"])
def test_leaf_kernels_read_their_factors_at_a_runtime_offset_or_from_small_pieces(
    name, offsets, monkeypatch
):
    # Up to num._OFFSET_UNITS units, each leaf's output kernel reads the leaf, its own
    # offset (a runtime scalar) and the factor vector: the kernels of one shape are one
    # compiled kernel, and no kernel stands between the factors and the scaling (in a chain,
    # Adam's). Beyond, it reads pieces of at most 16 factors: XLA's CPU compile time of a
    # kernel that reads a vector grows with the vector's length (15 s for 2,000 leaves
    # reading the factors of all as slices).
    if not offsets:
        monkeypatch.setattr(num, "_OFFSET_UNITS", 32)
    tx = getattr(oc, name)(1.0)
    grads = {f"l{i:02d}": jnp.full((8,), float(i), jnp.float32) for i in range(64)}
    text = update_hlo(tx, grads, grads)
    kernels = entry_fusion_operands(text, "f32[8]")
    assert len(kernels) == 64
    if offsets:
        assert all(sorted(sizes)[:2] == [1, 8] and max(sizes) <= 2 * 64 for sizes in kernels)
        assert distinct_fusions(text, "f32[8]") == 1
    else:
        assert all(max(n for n in sizes if n != 8) <= 16 for sizes in kernels), kernels
    out, _ = tx.update(grads, tx.init(grads))
    for i in range(64):  # each leaf got its own factor
        norm = math.sqrt(8) * i if name == "clip_by_leaf_norm" else float(i)
        expected = i * min(1.0, 1.0 / norm) if i else 0.0
        np.testing.assert_allclose(out[f"l{i:02d}"], np.full(8, expected), rtol=1e-6)


def test_adagc_leaf_kernels_read_their_factors_from_small_pieces():
    # The same for AdaGC's per-tensor factors: slicing each leaf's out of the whole vector,
    # 999 small leaves compiled in 22 s, 14 s from pieces.
    grads = {f"l{i:02d}": jnp.full((8,), float(i + 1), jnp.float32) for i in range(64)}
    tx = oc.adagc(clip_ratio=2.0, warmup_steps=0)
    state = tx.init(grads)._replace(gamma=jnp.arange(1, 65, dtype=jnp.float32) / 4)
    text = update_hlo(tx, grads, state=state)
    kernels = entry_fusion_operands(text, "f32[8]")
    assert len(kernels) == 64
    assert all(max(n for n in sizes if n != 8) <= 16 for sizes in kernels), kernels
    out, _ = tx.update(grads, state)
    for i in range(64):  # leaf i against its own threshold 2 * gamma_i = (i + 1) / 2
        norm, limit = math.sqrt(8) * (i + 1), (i + 1) / 2
        np.testing.assert_allclose(out[f"l{i:02d}"], np.full(8, (i + 1) * limit / norm), rtol=1e-6)
