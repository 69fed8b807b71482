"""Guards: skipping non-finite and spiking steps, zeroing, raising; inner state frozen on skip."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hlo import scalar_work, update_hlo, variadic_reductions

import optaxclip as oc

PARAMS = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.1)}


def _grads(value=1.0, bad=None):
    g = {"w": jnp.array([0.3, -0.2, 0.1]) * value, "b": jnp.array(0.05) * value}
    if bad is not None:
        g["w"] = g["w"].at[1].set(bad)
    return g


def _adam():
    return optax.adam(1e-2)


@pytest.fixture(autouse=True)
def standard_promotion():
    # optax.adam raises a float to an int32 power: not strict-promotion clean.
    with jax.numpy_dtype_promotion("standard"):
        yield


# ---------------------------------------------------------------------------
# skip_nonfinite
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_skip_nonfinite_freezes_inner_state_bit_identically(bad, maybe_jit):
    tx = oc.skip_nonfinite(_adam())
    state = tx.init(PARAMS)
    _, state = maybe_jit(tx.update)(_grads(), state, PARAMS)  # a real step first
    updates, new_state = maybe_jit(tx.update)(_grads(bad=bad), state, PARAMS)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))
    chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
    s = oc.stats(new_state)
    assert int(s["skip_nonfinite/num_nonfinite"]) == 1 and int(s["skip_nonfinite/num_clipped"]) == 1
    assert float(s["skip_nonfinite/scale"]) == 0.0


def test_skip_nonfinite_finite_step_equals_inner_alone(maybe_jit):
    tx, ref = oc.skip_nonfinite(_adam()), _adam()
    state, ref_state = tx.init(PARAMS), ref.init(PARAMS)
    for value in (1.0, 3.0):
        out, state = maybe_jit(tx.update)(_grads(value), state, PARAMS)
        expected, ref_state = maybe_jit(ref.update)(_grads(value), ref_state, PARAMS)
        chex.assert_trees_all_equal(out, expected)
    chex.assert_trees_all_equal(state.inner_state, ref_state)


def test_skip_nonfinite_does_not_mistake_huge_finite_for_inf(maybe_jit):
    tx = oc.skip_nonfinite()
    grads = _grads(1e30)  # squares overflow float32; entries are finite
    out, state = maybe_jit(tx.update)(grads, tx.init(PARAMS))
    chex.assert_trees_all_equal(out, grads)
    assert int(oc.stats(state)["skip_nonfinite/num_nonfinite"]) == 0


def test_skip_nonfinite_without_inner_zeroes(maybe_jit):
    tx = oc.skip_nonfinite()
    out, _ = maybe_jit(tx.update)(_grads(bad=jnp.nan), tx.init(PARAMS))
    chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, PARAMS))


def test_skip_nonfinite_passes_extra_args_to_inner():
    seen = []

    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None, **extra):
        seen.append(sorted(extra))
        return updates, state

    tx = oc.skip_nonfinite(optax.GradientTransformationExtraArgs(init, update))
    tx.update(_grads(), tx.init(PARAMS), PARAMS, value=jnp.asarray(1.0), other=3)
    assert seen == [["other", "value"]]


def test_skip_nonfinite_rejects_non_transform_inner():
    with pytest.raises(
        TypeError, match=r"`inner` must be an optax.GradientTransformation.*got 0.1"
    ):
        oc.skip_nonfinite(0.1)


# ---------------------------------------------------------------------------
# zero_nonfinite
# ---------------------------------------------------------------------------


def test_zero_nonfinite_replaces_and_counts(maybe_jit):
    tx = oc.zero_nonfinite()
    grads = {
        "a": jnp.array([1.0, jnp.nan, jnp.inf, -jnp.inf]),
        "b": jnp.array([2.0, 3.0, 4.0, 5.0]),
    }
    out, state = maybe_jit(tx.update)(grads, tx.init(grads))
    np.testing.assert_array_equal(out["a"], [1.0, 0.0, 0.0, 0.0])
    chex.assert_trees_all_equal(out["b"], grads["b"])
    s = oc.stats(state)
    np.testing.assert_allclose(s["zero_nonfinite/clipped"], 3 / 8)
    assert int(s["zero_nonfinite/num_nonfinite"]) == 1


def test_zero_nonfinite_finite_step_is_identity_with_zero_fraction(maybe_jit):
    tx = oc.zero_nonfinite()
    out, state = maybe_jit(tx.update)(_grads(1e30), tx.init(PARAMS))
    chex.assert_trees_all_equal(out, _grads(1e30))
    assert float(oc.stats(state)["zero_nonfinite/clipped"]) == 0.0


def test_zero_nonfinite_keeps_dtypes():
    tx = oc.zero_nonfinite()
    grads = {
        "h": jnp.array([jnp.nan, 1.0], jnp.float16),
        "z": jnp.array([complex(jnp.nan, 1.0)], jnp.complex64),
    }
    out, _ = tx.update(grads, tx.init(grads))
    assert out["h"].dtype == jnp.float16 and out["z"].dtype == jnp.complex64
    np.testing.assert_array_equal(out["z"], [0j])


@pytest.mark.parametrize(
    "make",
    [
        oc.skip_nonfinite,
        oc.skip_spikes,
        lambda: oc.skip_nonfinite(optax.adam(1e-3)),
        lambda: oc.skip_spikes(optax.adam(1e-3)),
    ],
    ids=["skip_nonfinite", "skip_spikes", "skip_nonfinite(adam)", "skip_spikes(adam)"],
)
def test_guards_decide_once_not_in_every_leaf_kernel(make):
    # The skip decision is computed once and read by each leaf's kernels. XLA had folded the
    # reduction meant to keep it apart (a bitwise or with 0), and copied skip_spikes' chain
    # (17 scalar instructions) into every kernel: 999 leaves with Adam compiled in 11 s,
    # now 8 s.
    g = {f"w{i}": jnp.ones((16, 8)) for i in range(3)}
    tx = make()
    text = update_hlo(tx, g, g)
    assert scalar_work(text, "f32[16,8]") <= 2


def _mixed_bad_tree():
    """Leaves of several dtypes, small ones (counted together) and large ones (alone),
    with NaN and infinite entries in some of them."""
    rng = np.random.default_rng(0)
    tree = {
        "big": rng.standard_normal(9000).astype(np.float32),
        "big_ok": rng.standard_normal((100, 90)).astype(np.float32),
        "small": [rng.standard_normal(5).astype(np.float32) for _ in range(4)],
        "half": rng.standard_normal((3, 4)).astype(np.float16),
        "brain": rng.standard_normal(10000).astype(jnp.bfloat16),
        "steps": np.arange(6, dtype=np.int32),
    }
    tree["big"][[0, 4000, 8999]] = [np.inf, np.nan, -np.inf]
    tree["small"][2][4] = np.nan
    tree["half"][1, 1] = np.float16(np.inf)
    tree["brain"][9999] = np.nan
    return jax.tree.map(jnp.asarray, tree)


def test_zero_nonfinite_counts_across_chunks_and_dtypes(maybe_jit):
    grads = _mixed_bad_tree()
    tx = oc.zero_nonfinite()
    out, state = maybe_jit(tx.update)(grads, tx.init(grads))
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
    bad = sum(int(np.sum(~np.isfinite(x))) for x in leaves)
    total = sum(x.size for x in leaves)
    np.testing.assert_allclose(oc.stats(state)["zero_nonfinite/clipped"], bad / total, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(out)):
        expect = np.where(np.isfinite(np.asarray(x, np.float64)), np.asarray(x, np.float64), 0)
        assert y.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(y, np.float64), expect)


@pytest.mark.parametrize("make", [oc.zero_nonfinite, oc.error_if_nonfinite])
def test_nonfinite_guards_compile_no_two_operand_reduction_per_leaf(make):
    # A count per leaf as a two-operand reduction compiled slowly: zero_nonfinite over 999
    # leaves took 7.7 s to compile (1.6 s now), error_if_nonfinite 5.2 s (2.4 s).
    def reductions(n):
        g = {f"w{i}": jnp.ones((16, 8)) for i in range(n)} | {"b": jnp.ones(9000)}
        tx = make()
        return variadic_reductions(update_hlo(tx, g))

    assert reductions(20) == reductions(60)


# ---------------------------------------------------------------------------
# error_if_nonfinite
# ---------------------------------------------------------------------------


def test_error_if_nonfinite_raises_eagerly_naming_leaf_paths():
    tx = oc.error_if_nonfinite()
    grads = {"enc": {"w": jnp.array([1.0, jnp.nan])}, "dec": [jnp.array([jnp.inf]), jnp.ones(2)]}
    with pytest.raises(
        FloatingPointError, match=r"non-finite values .* in 2 of 3 leaves: 'dec/0', 'enc/w'"
    ):
        tx.update(grads, tx.init(grads))


def test_error_if_nonfinite_raises_under_jit_naming_leaf_paths():
    tx = oc.error_if_nonfinite()
    grads = {"enc": {"w": jnp.array([1.0, jnp.nan])}, "dec": jnp.ones(2)}
    with pytest.raises(
        Exception, match=r"non-finite values \(NaN or Inf\) in 1 of 2 leaves: 'enc/w'"
    ) as info:
        out, _ = jax.jit(tx.update)(grads, tx.init(grads))
        jax.block_until_ready(out)
    assert "FloatingPointError" in str(info.value) or isinstance(info.value, FloatingPointError)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_error_if_nonfinite_names_exactly_the_bad_leaves_of_every_dtype(jit):
    grads = _mixed_bad_tree()
    tx = oc.error_if_nonfinite()
    update = jax.jit(tx.update) if jit else tx.update
    expected = "in 4 of 9 leaves: 'big', 'brain', 'half', 'small/2'\\."
    with pytest.raises(Exception, match=expected):
        out, _ = update(grads, tx.init(grads))
        jax.block_until_ready(out)


def test_error_if_nonfinite_is_silent_and_identity_on_finite_input(maybe_jit):
    tx = oc.error_if_nonfinite()
    out, state = maybe_jit(tx.update)(_grads(1e30), tx.init(PARAMS))
    chex.assert_trees_all_equal(out, _grads(1e30))
    assert int(oc.stats(state)["error_if_nonfinite/count"]) == 1


# ---------------------------------------------------------------------------
# skip_spikes: an independent float64 model of OLMo-core's rule, made NaN-safe
# ---------------------------------------------------------------------------


def olmo_model(norms, losses, window, sigmas, warmup):
    """Skip decisions of OLMo-core's SkipStepOptimizer, with optaxclip's NaN deviations.

    Keeps the last ``window`` finite values (skipped spikes included); a step is checked once
    ``len(previous) + 1 >= max(2, warmup)`` and ``len(previous) >= 2``, and is skipped iff a
    value exceeds mean + sigmas * std (unbiased) of the previous ones, or is not finite.
    """
    prev_n, prev_l, skips = [], [], []
    for n, loss in zip(norms, losses):
        finite = math.isfinite(n) and (loss is None or math.isfinite(loss))
        active = len(prev_n) + 1 >= max(2, warmup) and len(prev_n) >= 2
        spike = False
        if active and finite:
            spike = n - np.mean(prev_n) > sigmas * np.std(prev_n, ddof=1)
            if loss is not None:
                spike = spike or loss - np.mean(prev_l) > sigmas * np.std(prev_l, ddof=1)
        skips.append(bool(spike or not finite))
        if finite:
            prev_n = ([*prev_n, n])[-window:]
            prev_l = ([*prev_l, 0.0 if loss is None else loss])[-window:]
    return skips


def _norm_stream(steps, seed):
    rng = np.random.default_rng(seed)
    norms = np.abs(1.0 + 0.1 * rng.standard_normal(steps))
    norms[rng.choice(steps, 12, replace=False)] *= rng.uniform(1.5, 40, 12)  # spikes
    norms[rng.choice(steps, 3, replace=False)] = np.nan
    return norms


@pytest.mark.parametrize("with_loss", [False, True])
@pytest.mark.parametrize(
    ("window", "sigmas", "warmup"), [(16, 3.0, None), (8, 2.0, 2), (128, 6.0, None)]
)
def test_skip_spikes_matches_float64_model(window, sigmas, warmup, with_loss):
    steps = 200
    norms = _norm_stream(steps, seed=window)
    losses = list(_norm_stream(steps, seed=window + 1) + 2.0) if with_loss else [None] * steps
    tx = oc.skip_spikes(window=window, sigmas=sigmas, warmup_steps=warmup)
    direction = {"w": jnp.array([0.6, 0.8])}  # unit norm: the update's norm is n
    state = tx.init(direction)

    @jax.jit
    def step(state, n, loss):
        grads = jax.tree.map(lambda d: d * n, direction)
        kwargs = {} if loss is None else {"value": loss}
        return tx.update(grads, state, **kwargs)

    skips = []
    for n, loss in zip(norms, losses):
        out, state = step(state, jnp.float32(n), None if loss is None else jnp.float32(loss))
        skips.append(bool(jnp.all(out["w"] == 0)))
    expected = olmo_model(
        [float(np.float32(n)) for n in norms],
        losses if not with_loss else [float(np.float32(v)) for v in losses],
        window,
        sigmas,
        window // 2 if warmup is None else warmup,
    )
    assert skips == expected
    assert int(oc.stats(state)["skip_spikes/num_clipped"]) == sum(expected)
    assert 0 < sum(expected) < steps


def test_skip_spikes_freezes_inner_state_on_a_spike():
    tx = oc.skip_spikes(_adam(), window=4, sigmas=3.0, warmup_steps=3)
    state = tx.init(PARAMS)
    for value in (1.0, 1.1, 0.9, 1.0):
        _, state = tx.update(_grads(value), state, PARAMS)
    updates, new_state = tx.update(_grads(100.0), state, PARAMS)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))
    chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
    # The skipped spike's norm stays in the window, as in OLMo-core.
    assert int(new_state.size) == 4 and float(new_state.norms[int(state.head)]) > 10


def test_skip_spikes_nonfinite_loss_is_skipped_and_kept_out_of_window():
    tx = oc.skip_spikes(window=4, warmup_steps=2)
    state = tx.init(PARAMS)
    _, state = tx.update(_grads(), state, value=jnp.float32(1.0))
    out, new_state = tx.update(_grads(), state, value=jnp.float32(jnp.nan))
    chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, PARAMS))
    assert int(new_state.size) == int(state.size) == 1
    assert int(oc.stats(new_state)["skip_spikes/num_nonfinite"]) == 0  # the norm was finite


def test_skip_spikes_constant_history_skips_any_increase():
    tx = oc.skip_spikes(window=4, warmup_steps=3)
    state = tx.init(PARAMS)
    for _ in range(4):
        _, state = tx.update(_grads(1.0), state)
    out, _ = tx.update(_grads(1.001), state)
    assert bool(jnp.all(out["w"] == 0))


def test_skip_spikes_threshold_stat_is_mean_plus_sigmas_std():
    tx = oc.skip_spikes(window=3, sigmas=2.0, warmup_steps=2)
    state = tx.init(PARAMS)
    for value in (1.0, 2.0, 3.0):
        _, state = tx.update(_grads(value), state)
    _, state = tx.update(_grads(1.0), state)
    base = float(oc.global_norm(_grads(1.0)))
    prev = np.array([1.0, 2.0, 3.0]) * base
    np.testing.assert_allclose(
        oc.stats(state)["skip_spikes/threshold"], prev.mean() + 2.0 * prev.std(ddof=1), rtol=1e-5
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"window": 1}, ValueError, r"`window` must be >= 2; got 1"),
        ({"window": 3.5}, TypeError, r"`window` must be a Python int"),
        ({"sigmas": -1.0}, ValueError, r"`sigmas` must be >= 0"),
        ({"warmup_steps": -2}, ValueError, r"`warmup_steps` must be >= 0; got -2"),
    ],
)
def test_skip_spikes_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        oc.skip_spikes(**kwargs)


def test_skip_spikes_under_inject_hyperparams_needs_static_window():
    tx = optax.inject_hyperparams(oc.skip_spikes)(sigmas=3.0)
    with pytest.raises(
        TypeError, match=r"under optax.inject_hyperparams list it in `static_args=\('window',\)`"
    ):
        tx.init(PARAMS)


def test_skip_spikes_under_inject_hyperparams_with_static_window():
    tx = optax.inject_hyperparams(oc.skip_spikes, static_args=("window", "warmup_steps"))(
        window=4, sigmas=3.0, warmup_steps=3
    )
    state = tx.init(PARAMS)
    for value in (1.0, 1.1, 0.9, 1.0):
        _, state = jax.jit(tx.update)(_grads(value), state, PARAMS)
    out, state = jax.jit(tx.update)(_grads(50.0), state, PARAMS)
    chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, PARAMS))


def test_skip_spikes_sigmas_must_be_a_number():
    with pytest.raises(TypeError, match=r"`sigmas` must be a number, not a schedule"):
        oc.skip_spikes(sigmas=lambda count: 6.0)


def test_skip_spikes_value_must_be_a_scalar_loss():
    tx = oc.skip_spikes(window=4)
    with pytest.raises(ValueError, match=r"`value` must be the scalar loss .* shape \(3,\)"):
        tx.update(_grads(), tx.init(PARAMS), value=jnp.ones(3))
