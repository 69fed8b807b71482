"""The contract every public transformation satisfies, driven by the TRANSFORMS registry."""

from __future__ import annotations

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import BATCHED, DTYPES, NOT_TRANSFORMS, TRANSFORMS, TREES, make_tree, params_like
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip as oc
from optaxclip import _numerics as num

NAMES = sorted(TRANSFORMS)


def _step(entry, tx, updates, wrap):
    params = params_like(updates) if entry.needs_params else None
    state = tx.init(params if params is not None else updates)
    return wrap(tx.update)(updates, state, params), state


def _assert_same_structure_shapes_dtypes(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, x.dtype, y.shape, y.dtype)


def test_registry_covers_every_public_transform():
    factories = {
        name
        for name in oc.__all__
        if inspect.isfunction(getattr(oc, name)) and name not in NOT_TRANSFORMS | BATCHED
    }
    assert factories == set(TRANSFORMS)


# Every tree in float32; the trees whose leaves take the dtype (not "empty", nor "mixed",
# which has its own) in the other dtypes too, but for the structure-only ones ("single",
# "tuple_none": their leaves are nested_dict's kinds).
STRUCTURE_CASES = [(jnp.float32, kind) for kind in TREES] + [
    (dtype, kind)
    for dtype in DTYPES[1:]
    for kind in TREES
    if kind not in ("empty", "mixed", "single", "tuple_none")
]


@pytest.mark.parametrize(
    ("dtype", "tree_kind"),
    STRUCTURE_CASES,
    ids=[f"{np.dtype(d).name}-{k}" for d, k in STRUCTURE_CASES],
)
@pytest.mark.parametrize("name", NAMES)
def test_update_keeps_structure_shapes_and_dtypes(name, dtype, tree_kind, maybe_jit):
    entry = TRANSFORMS[name]
    updates = make_tree(tree_kind, dtype)
    (out, _), _ = _step(entry, entry.make(), updates, maybe_jit)
    _assert_same_structure_shapes_dtypes(out, updates)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", NAMES)
def test_state_is_arrays_with_stable_shapes_and_dtypes(name, dtype, maybe_jit):
    entry = TRANSFORMS[name]
    updates = make_tree("nested_dict", dtype)
    (_, new_state), state = _step(entry, entry.make(), updates, maybe_jit)
    for leaf in jax.tree.leaves(state):
        assert isinstance(leaf, jax.Array), type(leaf)
    _assert_same_structure_shapes_dtypes(new_state, state)
    for x, y in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
        assert x.weak_type == y.weak_type


@pytest.mark.parametrize("scale", [0.0, 1e-30, "huge", "max"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", NAMES)
def test_finite_output_on_extreme_inputs(name, dtype, scale):
    entry = TRANSFORMS[name]
    if scale == "huge":
        scale = min(1e30, float(jnp.finfo(dtype).max) / 16)
    if scale == "max":
        scale = float(jnp.finfo(dtype).max) / 4  # entries up to 4 sigma reach the max
    updates = jax.tree.map(
        lambda x: jnp.clip(x.astype(jnp.float32), -4, 4), make_tree("nested_dict", jnp.float32)
    )
    updates = jax.tree.map(lambda x: (x * scale).astype(dtype), updates)
    (out, state), _ = _step(entry, entry.make(), updates, jax.jit)
    chex.assert_tree_all_finite(out)
    if entry.stats_key is not None and entry.clip_stats:
        assert int(oc.stats(state)[f"{entry.stats_key}/num_nonfinite"]) == 0


@pytest.mark.parametrize("tree_kind", ["nested_dict", "mixed", "conv", "scalar"])
@pytest.mark.parametrize("name", NAMES)
def test_identity_under_huge_threshold(name, tree_kind, maybe_jit):
    entry = TRANSFORMS[name]
    updates = make_tree(tree_kind, jnp.float32, scale=3.0)
    (out, _), _ = _step(entry, entry.make_loose(), updates, maybe_jit)
    chex.assert_trees_all_equal(out, updates)


@pytest.mark.parametrize("name", NAMES)
def test_no_retrace_on_second_step(name):
    entry = TRANSFORMS[name]
    tx = entry.make()
    updates = make_tree("nested_dict", jnp.float32)
    params = params_like(updates) if entry.needs_params else None
    traces = []

    @jax.jit
    def step(u, s, p):
        traces.append(1)
        return tx.update(u, s, p)

    state = tx.init(params if params is not None else updates)
    for _ in range(3):
        _, state = step(updates, state, params)
    assert len(traces) == 1


@pytest.mark.parametrize("name", NAMES)
def test_stats_recorded_and_counted(name):
    entry = TRANSFORMS[name]
    if entry.stats_key is None:
        pytest.skip("records no ClipStats")  # pragma: no cover (every entry records one)
    updates = make_tree("nested_dict", jnp.float32)
    (_, state), _ = _step(entry, entry.make(), updates, jax.jit)
    s = oc.stats(state)
    assert int(s[f"{entry.stats_key}/count"]) == 1
    np.testing.assert_allclose(s[f"{entry.stats_key}/norm"], oc.global_norm(updates), rtol=1e-6)
    for field in oc.ClipStats._fields if entry.clip_stats else ("norm", "count"):
        value = s[f"{entry.stats_key}/{field}"]
        assert value.shape == () and value.dtype in (jnp.float32, jnp.int32)


# ---------------------------------------------------------------------------
# Composition with optax's wrappers
# ---------------------------------------------------------------------------


def _run_steps(tx, entry, steps=3, dtype=jnp.float32):
    updates = make_tree("nested_dict", dtype, scale=2.0)
    params = params_like(updates)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(steps):
        out, state = step(updates, state, params)
    _assert_same_structure_shapes_dtypes(out, updates)
    chex.assert_tree_all_finite(out)
    return out, state


@pytest.mark.parametrize("name", NAMES)
def test_composes_with_chain(name):
    entry = TRANSFORMS[name]
    # optax.adam raises a float to an int32 power: not strict-promotion clean.
    with jax.numpy_dtype_promotion("standard"):
        _, state = _run_steps(optax.chain(entry.make(), optax.adam(1e-3)), entry)
    assert int(oc.stats(state)[f"{entry.stats_key}/count"]) == 3


@pytest.mark.parametrize("name", NAMES)
def test_composes_with_masked(name):
    entry = TRANSFORMS[name]
    mask = {"layer": {"kernel": True, "bias": False}, "head": {"w": True}}
    tx = optax.masked(entry.make(), mask)
    out, _ = _run_steps(tx, entry)
    updates = make_tree("nested_dict", jnp.float32, scale=2.0)
    chex.assert_trees_all_equal(out["layer"]["bias"], updates["layer"]["bias"])


@pytest.mark.parametrize("name", NAMES)
def test_composes_with_multisteps(name):
    entry = TRANSFORMS[name]
    # MultiSteps mixes int32 counters with Python ints; it is not strict-promotion clean.
    with jax.numpy_dtype_promotion("standard"):
        _, state = _run_steps(optax.MultiSteps(entry.make(), every_k_schedule=2), entry, steps=4)
    assert int(oc.stats(state)[f"{entry.stats_key}/count"]) == 2


@pytest.mark.parametrize("name", NAMES)
def test_composes_with_apply_if_finite(name):
    entry = TRANSFORMS[name]
    _, state = _run_steps(optax.apply_if_finite(entry.make(), max_consecutive_errors=2), entry)
    assert int(oc.stats(state)[f"{entry.stats_key}/count"]) == 3


@pytest.mark.parametrize("name", [n for n in NAMES if TRANSFORMS[n].threshold_arg])
def test_composes_with_inject_hyperparams(name):
    entry = TRANSFORMS[name]
    factory = getattr(oc, name)
    tx = optax.inject_hyperparams(factory)(**{entry.threshold_arg: 0.5})
    _, state = _run_steps(tx, entry)
    np.testing.assert_allclose(state.hyperparams[entry.threshold_arg], 0.5)
    s = oc.stats(state)
    assert int(s[f"{name}/count"]) == 3
    if entry.threshold_in_stats:  # not for per-unit thresholds or adaptive ones
        np.testing.assert_allclose(s[f"{name}/threshold"], 0.5)


@pytest.mark.parametrize(
    "name", [n for n in NAMES if TRANSFORMS[n].threshold_arg and TRANSFORMS[n].zero_threshold_ok]
)
def test_zero_update_with_zero_threshold_stays_zero(name, maybe_jit):
    entry = TRANSFORMS[name]
    tx = getattr(oc, name)(**{entry.threshold_arg: 0.0})
    zeros = jax.tree.map(jnp.zeros_like, make_tree("nested_dict", jnp.float32))
    (out, _), _ = _step(entry, tx, zeros, maybe_jit)
    chex.assert_trees_all_equal(out, zeros)


@pytest.mark.parametrize("name", [n for n in NAMES if TRANSFORMS[n].threshold_arg])
def test_grad_through_clipper_is_finite_at_zero_input(name):
    entry = TRANSFORMS[name]
    tx = entry.make()
    zeros = jax.tree.map(jnp.zeros_like, make_tree("nested_dict", jnp.float32))

    def loss(u, p):
        out, _ = tx.update(u, tx.init(p), p if entry.needs_params else None)
        return sum(jnp.sum(x**2) for x in jax.tree.leaves(out))

    grads = jax.grad(loss, argnums=(0, 1))(zeros, zeros)
    chex.assert_tree_all_finite(grads)


@pytest.mark.parametrize("name", NAMES)
def test_grad_through_a_large_bfloat16_leaf_is_the_conversions(name, monkeypatch):
    # A bfloat16 leaf of at least SMALL_LEAF entries leaves a transformation through bit
    # operations (rounding, a select of bits: see _numerics.narrow), which have no
    # derivative of their own; differentiated, they must be the conversion they stand for.
    entry = TRANSFORMS[name]
    rng = np.random.default_rng(0)
    u = {"w": jnp.asarray(rng.standard_normal((128, 96)) * 3).astype(jnp.bfloat16)}
    p = params_like(u)
    weights = jnp.asarray(rng.standard_normal((128, 96)), jnp.float32)

    def grad():
        tx = entry.make()

        def loss(u):
            with jax.numpy_dtype_promotion("standard"):
                out, _ = tx.update(u, tx.init(p), p if entry.needs_params else None)
            return jnp.sum(out["w"].astype(jnp.float32) * weights)

        # Jitted: a fresh trace each call (so the patch below applies); op by op, AdaGC's
        # derivative took 10 s here.
        return np.asarray(jax.jit(jax.grad(loss))(u)["w"].astype(jnp.float32))

    by_bits = grad()
    monkeypatch.setattr(num, "_by_bits", lambda x: False)
    converted = grad()
    np.testing.assert_array_equal(by_bits, converted)
    assert np.any(converted != 0)


@pytest.mark.parametrize("name", sorted(set(TRANSFORMS) - BATCHED))
def test_update_runs_per_device_inside_shard_map_without_axis_name(name):
    # Inside shard_map (JAX's default check_vma) without axis_name, each device clips what
    # it holds: the rescue loop's flag, and clip_by_value's branches, keep the per-device
    # type of the data (a literal False had the while_loop's carry types differ). One
    # device, so the result is the unsharded one.
    tx = TRANSFORMS[name].make()
    _check_one_device_shard_map(tx, tx, TRANSFORMS[name].needs_params)


def _check_one_device_shard_map(tx, unsharded, needs_params):
    """``tx``'s update inside ``shard_map`` over a one-device mesh ``("x",)`` (JAX's default
    check_vma) equals ``unsharded``'s update outside it."""
    grads = make_tree("nested_dict", jnp.float32)
    params = params_like(grads) if needs_params else grads
    state = tx.init(params)
    mesh = jax.make_mesh((1,), ("x",))
    spec = jax.tree.map(lambda x: P("x") if jnp.ndim(x) else P(), grads)
    placed = [
        jax.device_put(t, jax.tree.map(lambda s: NamedSharding(mesh, s), spec))
        for t in (grads, params)
    ]
    step = jax.shard_map(
        lambda g, p: tx.update(g, state, p)[0], mesh=mesh, in_specs=(spec, spec), out_specs=spec
    )
    got = jax.jit(step)(*placed)
    expected = unsharded.update(grads, state, params)[0]
    chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=0)


# Positional arguments of the factories that take ``axis_name`` (the others have defaults).
_AXIS_ARGS = {
    "clip_by_value": (0.5,),
    "clip_by_global_norm": (1.0,),
    "clip_by_leaf_norm": (1.0,),
    "clip_by_block_rms": (0.5,),
    "clip_by_group_norm": (lambda path: path.split("/")[0], {"layer": 1.0, "head": 0.5}),
}
_TAKE_AXIS_NAME = sorted(
    name
    for name in set(TRANSFORMS) - BATCHED
    if "axis_name" in inspect.signature(getattr(oc, name)).parameters
)


@pytest.mark.parametrize("name", _TAKE_AXIS_NAME)
def test_update_runs_inside_shard_map_with_axis_name_under_default_check_vma(name):
    # The distributed tests pass check_vma=False; JAX's default (True) types every value
    # as varying or not across the devices, and the collectives must leave the norms and
    # decisions invariant where the carries and branches expect it. One device.
    args = _AXIS_ARGS.get(name, ())
    tx = getattr(oc, name)(*args, axis_name="x")
    _check_one_device_shard_map(tx, getattr(oc, name)(*args), TRANSFORMS[name].needs_params)
