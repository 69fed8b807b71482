"""per_example_clip against a float64 loop over examples, optax, and Andrew et al.'s rule."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc


def batch_tree(batch=6, seed=0, scales=None, dtype=jnp.float32):
    """Per-example gradients: leaves with a leading batch axis; example j scaled by scales[j]."""
    rng = np.random.default_rng(seed)
    scales = np.ones(batch) if scales is None else np.asarray(scales, np.float64)

    def a(*shape):
        x = rng.standard_normal((batch, *shape)) * scales.reshape((batch,) + (1,) * len(shape))
        return jnp.asarray(x).astype(dtype)

    return {"dense": {"kernel": a(4, 3), "bias": a(3)}, "head": a(3, 2), "s": a()}


def loop_oracle(tree, c, reduce="mean"):
    """float64, one example at a time, as written in the DP-SGD papers."""
    leaves, treedef = jax.tree.flatten(tree)
    xs = [np.asarray(x, np.float64) for x in leaves]
    batch = xs[0].shape[0]
    total = [np.zeros(x.shape[1:]) for x in xs]
    norms = []
    for j in range(batch):
        norm = math.sqrt(sum(float(np.sum(x[j] ** 2)) for x in xs))
        norms.append(norm)
        factor = min(1.0, c / norm) if norm > 0 else 1.0
        for t, x in zip(total, xs):
            t += x[j] * factor
    if reduce == "mean":
        total = [t / batch for t in total]
    return jax.tree.unflatten(treedef, total), np.asarray(norms)


def assert_tree_close(actual, expected, rtol=1e-5, atol=0.0):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("jit", [False, True])
def test_equals_float64_loop_over_examples(reduce, jit):
    tree = batch_tree(scales=[0.1, 1.0, 3.0, 10.0, 0.5, 2.0])
    tx = oc.per_example_clip(1.5, reduce=reduce)
    update = jax.jit(tx.update) if jit else tx.update
    out, state = update(tree, tx.init(None))
    expected, norms = loop_oracle(tree, 1.5, reduce)
    assert_tree_close(out, expected, atol=1e-6)
    stats = oc.stats(state)
    np.testing.assert_allclose(stats["per_example_clip/norm"], norms.mean(), rtol=1e-5)
    assert float(stats["per_example_clip/clipped"]) == pytest.approx(np.mean(norms > 1.5))
    assert float(stats["per_example_clip/threshold"]) == 1.5
    np.testing.assert_allclose(
        stats["per_example_clip/scale"], min(1.0, 1.5 / norms.max()), rtol=1e-5
    )
    assert int(stats["per_example_clip/num_clipped"]) == 1


def test_output_has_the_parameter_shapes_and_dtypes():
    tree = batch_tree(dtype=jnp.bfloat16)
    tx = oc.per_example_clip(1.0)
    out, _ = tx.update(tree, tx.init(None))
    for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(out)):
        assert y.shape == x.shape[1:] and y.dtype == x.dtype
    expected, _ = loop_oracle(tree, 1.0)
    assert_tree_close(out, expected, rtol=1e-2, atol=1e-3)


def test_equals_optax_per_example_global_norm_clip():
    tree = batch_tree(scales=[0.2, 5.0, 1.0, 8.0, 0.7, 3.0], seed=3)
    leaves = jax.tree.leaves(tree)
    ref_sum, ref_clipped = optax.per_example_global_norm_clip(leaves, 1.0)
    tx = oc.per_example_clip(1.0, reduce="sum")
    out, state = tx.update(tree, tx.init(None))
    for a, b in zip(jax.tree.leaves(out), ref_sum):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(state.stats.clipped) * 6 == int(ref_clipped)


def test_three_four_five():
    g = {"w": jnp.array([[3.0, 4.0], [0.0, 0.5], [-6.0, 8.0]])}  # norms 5, 0.5, 10
    tx = oc.per_example_clip(2.5, reduce="sum")
    out, state = tx.update(g, tx.init(None))
    # 0.5 * (3, 4) + (0, 0.5) + 0.25 * (-6, 8) = (0, 4.5)
    np.testing.assert_allclose(out["w"], [0.0, 4.5], atol=1e-6)
    assert float(state.stats.norm) == pytest.approx((5 + 0.5 + 10) / 3)
    assert float(state.stats.clipped) == pytest.approx(2 / 3)
    assert float(state.stats.scale) == pytest.approx(0.25)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_extreme_examples_clip_to_the_right_direction(scale):
    g = {"w": jnp.array([[3.0, 4.0], [6.0, 8.0]]) * scale, "b": jnp.zeros((2, 0))}
    tx = oc.per_example_clip(1.0 if scale > 1 else 1e-31, reduce="sum")
    out, state = jax.jit(tx.update)(g, tx.init(None))
    c = 1.0 if scale > 1 else 1e-31
    np.testing.assert_allclose(out["w"], [0.6 * c * 2, 0.8 * c * 2], rtol=1e-5)
    assert out["b"].shape == (0,)
    assert int(state.stats.num_nonfinite) == 0


def test_an_all_zero_example_is_left_alone():
    g = {"w": jnp.array([[0.0, 0.0], [3.0, 4.0]])}
    tx = oc.per_example_clip(1.0)
    out, state = tx.update(g, tx.init(None))
    np.testing.assert_allclose(out["w"], [0.3, 0.4], rtol=1e-6)
    assert float(state.stats.clipped) == 0.5


def quantile_model(norm_stream, c0, gamma, eta):
    """Andrew et al.'s geometric update with the exact (noise-free) unclipped fraction."""
    c, applied = c0, []
    for norms in norm_stream:
        applied.append(c)
        b = float(np.mean(np.asarray(norms) <= c))
        c = c * math.exp(-eta * (b - gamma))
    return applied, c


def test_adaptive_threshold_follows_the_geometric_rule():
    rng = np.random.default_rng(5)
    tx = oc.per_example_clip(0.1, target_quantile=0.7, learning_rate=0.2)
    state = tx.init(None)
    stream, thresholds = [], []
    update = jax.jit(tx.update)
    for t in range(40):
        scales = np.exp(rng.normal(0.0, 0.5, size=8))
        tree = batch_tree(batch=8, seed=t, scales=scales)
        _, norms = loop_oracle(tree, 1.0)
        stream.append(norms)
        out, state = update(tree, state)
        thresholds.append(float(state.stats.threshold))
        expected, _ = loop_oracle(tree, thresholds[-1])
        assert_tree_close(out, expected, rtol=2e-5, atol=1e-6)
    applied, final = quantile_model(stream, 0.1, 0.7, 0.2)
    np.testing.assert_allclose(thresholds, applied, rtol=1e-4)
    np.testing.assert_allclose(state.max_norm, final, rtol=1e-4)
    # The clip norm has grown from 0.1 toward the 70th percentile of the norms.
    assert float(state.max_norm) > 1.0


def test_a_norm_equal_to_the_threshold_counts_as_unclipped():
    g = {"w": jnp.array([[3.0, 4.0], [0.0, 10.0]])}  # norms 5 (== C) and 10
    tx = oc.per_example_clip(5.0, target_quantile=0.5, learning_rate=1.0)
    _, state = tx.update(g, tx.init(None))
    assert float(state.stats.clipped) == 0.5
    np.testing.assert_allclose(state.max_norm, 5.0, rtol=1e-6)  # b = 0.5 = gamma


def test_nonfinite_example_passes_through_and_freezes_the_threshold():
    g = {"w": jnp.array([[3.0, 4.0], [jnp.nan, 1.0]])}
    tx = oc.per_example_clip(1.0, target_quantile=0.5)
    state = tx.init(None)
    out, new = tx.update(g, state)
    assert not np.isfinite(np.asarray(out["w"])).all()
    assert int(new.stats.num_nonfinite) == 1
    assert float(new.max_norm) == float(state.max_norm)
    guarded = optax.chain(oc.skip_nonfinite(), oc.per_example_clip(1.0))
    # the guard sees the reduced update: place it after, where the update is reduced
    guarded = optax.chain(oc.per_example_clip(1.0), oc.skip_nonfinite())
    out, _ = guarded.update(g, guarded.init({"w": jnp.zeros(2)}))
    np.testing.assert_array_equal(out["w"], [0.0, 0.0])


def test_schedule_and_inject_hyperparams():
    tree = batch_tree(scales=[1.0, 4.0, 0.5, 2.0, 3.0, 1.0])
    sched = optax.linear_schedule(1.0, 3.0, 2)
    tx = oc.per_example_clip(sched)
    state = tx.init(None)
    for c in (1.0, 2.0, 3.0):
        out, state = tx.update(tree, state)
        assert_tree_close(out, loop_oracle(tree, c)[0], atol=1e-6)
        assert float(state.stats.threshold) == c
    injected = optax.inject_hyperparams(oc.per_example_clip)(max_norm=2.0)
    out, _ = jax.jit(injected.update)(tree, injected.init(None))
    assert_tree_close(out, loop_oracle(tree, 2.0)[0], atol=1e-6)


def test_dp_sgd_training_step_with_vmapped_gradients():
    params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
    xs = jnp.asarray(np.random.default_rng(0).standard_normal((16, 3)), jnp.float32) * 5
    ys = jnp.arange(16, dtype=jnp.float32)

    def loss(p, x, y):
        return (jnp.dot(p["w"], x) + p["b"] - y) ** 2

    tx = optax.chain(oc.per_example_clip(1.0), optax.sgd(0.1))
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, xs, ys)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, grads

    new, state, grads = step(params, state)
    expected, norms = loop_oracle(grads, 1.0)
    for k in params:
        np.testing.assert_allclose(params[k] - new[k], 0.1 * expected[k], rtol=1e-5, atol=1e-7)
    assert oc.global_norm(jax.tree.map(lambda a, b: a - b, params, new)) <= 0.1 + 1e-6
    assert float(oc.stats(state)["per_example_clip/clipped"]) == np.mean(norms > 1.0)


@pytest.mark.parametrize(
    "kwargs, tree, match",
    [
        ({}, {"w": jnp.ones(())}, "leading batch axis"),
        ({}, {"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))}, "batch size"),
        ({}, {"a": jnp.ones((0, 3))}, "empty"),
    ],
)
def test_bad_updates_raise_with_the_leaf_path(kwargs, tree, match):
    tx = oc.per_example_clip(1.0, **kwargs)
    with pytest.raises(ValueError, match=match):
        tx.update(tree, tx.init(None))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"reduce": "max"}, ValueError, "reduce"),
        ({"target_quantile": 1.5}, ValueError, "target_quantile"),
        ({"max_norm": -1.0}, ValueError, "max_norm"),
        ({"max_norm": 0.0, "target_quantile": 0.5}, ValueError, "max_norm"),
        ({"max_norm": optax.constant_schedule(1.0), "target_quantile": 0.5}, TypeError, "number"),
        ({"axis_name": "x", "partition_specs": {}}, ValueError, "not both"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        oc.per_example_clip(**kwargs)


def test_state_is_arrays_and_restores_bit_identically():
    tx = oc.per_example_clip(0.5, target_quantile=0.5)
    tree = batch_tree()
    _, state = tx.update(tree, tx.init(None))
    leaves = jax.tree.leaves(state)
    assert all(isinstance(x, jax.Array) for x in leaves)
    restored = jax.tree.unflatten(jax.tree.structure(state), [np.asarray(x) for x in leaves])
    a = tx.update(tree, state)
    b = tx.update(tree, restored)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
