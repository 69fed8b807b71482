"""AGC: the optax reference, unit conventions, extreme inputs and error messages."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hlo import (
    distinct_kernels,
    entry_fusion_operands,
    entry_fusion_sizes,
    largest_fusion,
    update_hlo,
    while_body_sizes,
)

import optaxclip as oc

SHAPES = [(), (5,), (1, 6), (4, 6), (3, 2, 4), (3, 3, 2, 4), (2, 2, 2, 2, 3)]


def _tree(shapes, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        f"l{i}": jnp.asarray(rng.standard_normal(s) * scale, jnp.float32)
        for i, s in enumerate(shapes)
    }


def _agc(tx, grads, params, wrap=lambda f: f):
    return wrap(tx.update)(grads, tx.init(params), params)


@pytest.mark.parametrize("clipping", [0.01, 0.1, 1.0])
def test_equals_optax_on_ordinary_float32(clipping, maybe_jit):
    grads, params = _tree(SHAPES, 0), _tree(SHAPES, 1, scale=0.3)
    got, _ = _agc(oc.adaptive_grad_clip(clipping), grads, params, maybe_jit)
    expected, _ = optax.adaptive_grad_clip(clipping).update(grads, optax.EmptyState(), params)
    chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("axis", [0, (0, 1), -1])
def test_axis_override_equals_optax(axis):
    grads, params = _tree([(4, 6), (3, 5, 2)], 0), _tree([(4, 6), (3, 5, 2)], 1, scale=0.3)
    got, _ = _agc(oc.adaptive_grad_clip(0.05, axis=axis), grads, params)
    expected, _ = optax.adaptive_grad_clip(0.05, axis=axis).update(
        grads, optax.EmptyState(), params
    )
    chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=0)


def test_three_four_five():
    params = {"w": jnp.array([3.0, 4.0])}  # norm 5, bound 0.1 * 5 = 0.5
    got, state = _agc(oc.adaptive_grad_clip(0.1), {"w": jnp.array([0.0, 1.0])}, params)
    np.testing.assert_allclose(got["w"], [0.0, 0.5])
    s = oc.stats(state)
    np.testing.assert_allclose(s["adaptive_grad_clip/scale"], 0.5)
    assert np.isnan(float(s["adaptive_grad_clip/threshold"]))


def test_units_are_output_columns_of_a_linear_kernel():
    params = {"k": jnp.ones((4, 2))}  # each column has norm 2: bound 0.2
    grads = {"k": jnp.array([[1.0, 0.01]] * 4)}  # column norms 2 and 0.02
    got, state = _agc(oc.adaptive_grad_clip(0.1), grads, params)
    np.testing.assert_allclose(got["k"][:, 0], 0.1, rtol=1e-6)
    np.testing.assert_allclose(got["k"][:, 1], 0.01)
    np.testing.assert_allclose(oc.stats(state)["adaptive_grad_clip/clipped"], 0.5)


def test_zero_initialised_params_use_eps():
    params = {"b": jnp.zeros(4)}
    grads = {"b": jnp.full((4,), 1.0)}  # norm 2; bound 0.01 * 1e-3
    got, _ = _agc(oc.adaptive_grad_clip(0.01, eps=1e-3), grads, params)
    np.testing.assert_allclose(oc.global_norm(got), 1e-5, rtol=1e-6)


@pytest.mark.parametrize("value", [1e30, 1e-30])
def test_extreme_gradients_keep_direction(value, maybe_jit):
    # Parameters of the same magnitude as the gradients: the bound is 0.01 of their norm.
    params = {"w": jnp.ones((3, 2)) * value}
    grads = {"w": jnp.array([[3.0, 0.0], [0.0, 0.0], [4.0, 1.0]]) * value}
    got, _ = _agc(oc.adaptive_grad_clip(0.01, eps=0.0), grads, params, maybe_jit)
    bound = 0.01 * np.sqrt(3.0) * value
    col0 = np.asarray(got["w"][:, 0], np.float64)
    np.testing.assert_allclose(col0 / np.linalg.norm(col0), [0.6, 0.0, 0.8], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(col0), bound, rtol=1e-5)


def test_bfloat16_gradients_keep_dtype_and_bound():
    params = {"w": jnp.ones((8, 4), jnp.float32)}
    grads = {"w": jnp.full((8, 4), 3.0, jnp.bfloat16)}
    got, _ = _agc(oc.adaptive_grad_clip(0.1), grads, params)
    assert got["w"].dtype == jnp.bfloat16
    col_norms = np.linalg.norm(np.asarray(got["w"], np.float64), axis=0)
    np.testing.assert_allclose(col_norms, 0.1 * np.sqrt(8), rtol=1e-2)


def test_grad_through_agc_is_finite_at_zero():
    tx = oc.adaptive_grad_clip(0.1)
    loss = lambda g, p: jnp.sum(tx.update({"w": g}, tx.init({"w": p}), {"w": p})[0]["w"] ** 2)
    dg, dp = jax.grad(loss, argnums=(0, 1))(jnp.zeros((3, 2)), jnp.zeros((3, 2)))
    assert bool(jnp.all(jnp.isfinite(dg))) and bool(jnp.all(jnp.isfinite(dp)))


def test_missing_params_is_a_clear_error():
    tx = oc.adaptive_grad_clip(0.01)
    grads = {"w": jnp.ones(3)}
    with pytest.raises(
        ValueError, match=r"adaptive_grad_clip needs the current parameters.*`params=None`"
    ):
        tx.update(grads, tx.init(grads))


def test_rank_six_leaf_without_axis_names_the_leaf():
    tx = oc.adaptive_grad_clip(0.01)
    grads = {"block": {"w6": jnp.ones((2,) * 6)}}
    with pytest.raises(
        ValueError, match=r"leaf 'block/w6' of shape \(2, 2, 2, 2, 2, 2\).*pass `axis=`"
    ):
        tx.update(grads, tx.init(grads), grads)


def test_axis_out_of_range_names_the_leaf():
    tx = oc.adaptive_grad_clip(0.01, axis=3)
    grads = {"w": jnp.ones((2, 2))}
    with pytest.raises(
        ValueError, match=r"`axis=3` is out of range for the leaf 'w' of shape \(2, 2\)"
    ):
        tx.update(grads, tx.init(grads), grads)


def test_params_with_other_structure_is_a_clear_error():
    tx = oc.adaptive_grad_clip(0.01)
    grads = {"w": jnp.ones(2), "b": jnp.ones(2)}
    with pytest.raises(
        ValueError, match=r"`params` must have the same tree structure as the updates"
    ):
        tx.update(grads, tx.init(grads), {"w": jnp.ones(2)})


def test_params_with_other_shape_names_the_leaf():
    tx = oc.adaptive_grad_clip(0.01)
    grads = {"w": jnp.ones(2)}
    with pytest.raises(
        ValueError, match=r"update at 'w' has shape \(2,\) but its parameter has shape \(3,\)"
    ):
        tx.update(grads, tx.init(grads), {"w": jnp.ones(3)})


@pytest.mark.parametrize(
    ("arg", "kwargs"), [("clipping", {"clipping": -0.1}), ("eps", {"eps": -1.0})]
)
def test_negative_hyperparameters_are_rejected(arg, kwargs):
    with pytest.raises(ValueError, match=rf"`{arg}` must be >= 0"):
        oc.adaptive_grad_clip(**kwargs)


def test_clipping_schedule_follows_the_step_count():
    tx = oc.adaptive_grad_clip(optax.linear_schedule(0.2, 0.1, transition_steps=1))
    params = {"w": jnp.array([3.0, 4.0])}  # norm 5: bounds 1.0 then 0.5
    grads = {"w": jnp.array([0.0, 2.0])}
    state = tx.init(params)
    first, state = tx.update(grads, state, params)
    second, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(first["w"], [0.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(second["w"], [0.0, 0.5], rtol=1e-6)


def test_eps_must_be_a_number_not_a_schedule():
    with pytest.raises(TypeError, match=r"`eps` must be a number, not a schedule"):
        oc.adaptive_grad_clip(0.01, eps=lambda count: 1e-3)


def _layers(n):
    """A transformer-like tree: per layer, 4 kernels of many units and 8 single-unit leaves."""
    shapes = {}
    for i in range(n):
        shapes |= {f"{i}/w{j}": (16, 24) for j in range(4)}
        shapes |= {f"{i}/b{j}": (24,) for j in range(8)}
    return _tree(list(shapes.values()), seed=n)


def _small_leaves(n, seed, scale=1.0):
    """``n`` kernels of 12 units (16 x 12: below SMALL_UNIT_LEAF) and ``n`` biases."""
    shapes = [(16, 12)] * n + [(12,)] * n
    return _tree(shapes, seed, scale)


def test_small_leaves_of_several_units_are_clipped_on_one_vector():
    # Leaves below SMALL_UNIT_LEAF entries, of several units too, have their norms and
    # factors on the flat vector (kept apart, each cost a few dozen kernels: 2,000 small
    # leaves compiled in 105 s). 40 kernels of 12 units and 40 biases: 520 factors.
    tx = oc.adaptive_grad_clip(3.0)
    grads, params = _small_leaves(40, 0), _small_leaves(40, 1, scale=0.3)
    text = update_hlo(tx, grads, params)
    entry = text[text.index("\nENTRY") :]
    assert entry.count(" fusion(") <= 4 * 80, entry.count(" fusion(")  # about 40 a kernel apart
    # Each kernel's output reads the leaf and a block of at most 256 + 16 factors (a kernel
    # reading part of a longer vector costs much more to compile).
    kernels = entry_fusion_operands(text, "f32[16,12]")
    assert len(kernels) == 40
    assert all(max(n for n in sizes if n != 192) <= 272 for sizes in kernels), kernels
    _check_equals_optax_and_clips_some(3.0, grads, params)


def _check_equals_optax_and_clips_some(clipping, grads, params):
    tx = oc.adaptive_grad_clip(clipping)
    got, state = tx.update(grads, tx.init(params), params)
    expected, _ = optax.adaptive_grad_clip(clipping).update(grads, optax.EmptyState(), params)
    chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=0)
    assert 0.1 < float(state.stats.clipped) < 0.9  # some units clipped, not all


def test_factors_are_computed_once_per_unit_not_per_entry():
    # The kernel that scales a leaf of several units only multiplies by two factors read
    # from memory. With the factors' chain fused into it (selects, compares and products
    # per unit), XLA ran the chain once per entry: 1.18x optax on a (32000, 320) embedding.
    tx = oc.adaptive_grad_clip(1.0)
    grads, params = _tree([(96, 128), (128, 96)], 0), _tree([(96, 128), (128, 96)], 1)
    text = update_hlo(tx, grads, params)
    for shape in ("f32[96,128]", "f32[128,96]"):
        sizes = entry_fusion_sizes(text, shape)
        assert len(sizes) == 1 and sizes[0] <= 10, (shape, sizes)  # about 40 fused
    _check_equals_optax_and_clips_some(1.0, grads, params)


def test_large_leaves_add_a_few_kernels_each():
    # Units of large leaves sit on the flat vector too: their rescue tests, factors and
    # statistics are a few kernels for the whole tree, and each leaf adds its two norms and
    # its output (and the slicing of its factors). Kept apart, each leaf added 32 kernels:
    # 2,235 on the 147-leaf benchmark tree, against optax's 1,102.
    tx = oc.adaptive_grad_clip(1.0)

    def kernels(n):
        grads = _tree([(96, 128)] * n, 0)
        text = update_hlo(tx, grads, grads)
        entry = text[text.index("\nENTRY") :]
        return len(
            re.findall(r" (?:fusion|sort|while|conditional|copy|concatenate|gather)\(", entry)
        )

    assert (kernels(6) - kernels(2)) / 4 <= 6, (kernels(2), kernels(6))


def test_leaves_of_one_shape_share_their_compiled_kernels():
    # Each leaf reads its units' factors (and, in the rescue loop, its scales) at an offset
    # that is a runtime scalar: as static slices, every leaf's kernel was a kernel of its
    # own to compile (670 of them over 999 leaves: 9.6 s to compile, 7 s now).
    tx = oc.adaptive_grad_clip(1.0)

    def distinct(n):
        grads = _tree([(96, 128)] * n, 0)
        text = update_hlo(tx, grads, grads)
        return distinct_kernels(text, "f32[96,128]")

    assert distinct(3) == distinct(12) == 1


def test_rescue_loop_does_not_lay_small_leaves_out_again():
    # The rescue loop's body reads the ordinary pass's stacked rows: at 1,000 small leaves
    # laying them out again was 4,000 instructions in the body, for XLA's while-loop passes.
    tx = oc.adaptive_grad_clip(0.05)

    def body(n):
        grads = _small_leaves(n, 0)
        text = update_hlo(tx, grads, grads)
        return max(while_body_sizes(text))

    small, big = body(10), body(60)
    assert big <= small + 10, (small, big)


def test_kernels_do_not_grow_with_the_leaf_count():
    # Each leaf's scalar chains (unit factors, rescue tests, statistics) were fused by XLA
    # into one kernel per statistic, whose size grew with the leaves and whose compile time
    # grew faster than that (20 s at 147 leaves). Now no kernel holds more than a fixed
    # number of leaves' chains.
    tx = oc.adaptive_grad_clip(0.01)

    def largest(tree):
        lowered = jax.jit(tx.update).lower(tree, tx.init(tree), tree)
        return largest_fusion(lowered.compile().as_text())

    small, big = largest(_layers(1)), largest(_layers(3))
    assert big <= 1.5 * small, (small, big)
