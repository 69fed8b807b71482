"""oc.stats: finding ClipStats in any optimizer state and naming them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc

GRADS = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([0.0])}


def _state_after(tx, steps=1):
    state = tx.init(GRADS)
    for _ in range(steps):
        _, state = tx.update(GRADS, state, GRADS)
    return state


@pytest.fixture(autouse=True)
def standard_promotion():
    # optax.adam and optax.MultiSteps are not strict-promotion clean.
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.mark.parametrize(
    "wrap",
    [
        lambda tx: optax.chain(optax.scale(1.0), tx, optax.adam(1e-3)),
        lambda tx: optax.inject_hyperparams(lambda: tx)(),
        lambda tx: optax.MultiSteps(tx, every_k_schedule=1),
        lambda tx: optax.masked(tx, {"w": True, "b": False}),
        lambda tx: optax.partition({"a": tx, "b": optax.identity()}, {"w": "a", "b": "b"}),
        lambda tx: oc.skip_nonfinite(optax.chain(tx, optax.sgd(0.1))),
        lambda tx: oc.per_layer({"w": tx}),
    ],
    ids=[
        "chain",
        "inject_hyperparams",
        "MultiSteps",
        "masked",
        "partition",
        "guard_inner",
        "per_layer",
    ],
)
def test_stats_found_through_wrappers(wrap):
    s = oc.stats(_state_after(wrap(oc.clip_by_global_norm(1.0))))
    assert float(s["clip_by_global_norm/norm"]) == 5.0
    assert int(s["clip_by_global_norm/count"]) == 1


def test_repeated_factories_get_suffixes_in_depth_first_order():
    tx = optax.chain(
        oc.clip_by_global_norm(10.0),
        oc.skip_nonfinite(optax.chain(oc.clip_by_global_norm(2.0), oc.clip_by_global_norm(1.0))),
    )
    s = oc.stats(_state_after(tx))
    assert [
        float(s[f"{k}/threshold"])
        for k in ("clip_by_global_norm", "clip_by_global_norm_1", "clip_by_global_norm_2")
    ] == [10.0, 2.0, 1.0]
    assert "skip_nonfinite/count" in s


def test_stats_keys_are_every_field():
    s = oc.stats(_state_after(oc.clip_by_leaf_norm(1.0)))
    assert sorted(s) == sorted(f"clip_by_leaf_norm/{f}" for f in oc.ClipStats._fields)


def test_stats_of_a_state_without_clippers_is_empty():
    assert oc.stats(_state_after(optax.adam(1e-3))) == {}


def test_stats_counts_over_steps():
    state = _state_after(oc.clip_by_global_norm(1.0), steps=3)
    s = oc.stats(state)
    assert (
        int(s["clip_by_global_norm/count"]) == 3 and int(s["clip_by_global_norm/num_clipped"]) == 3
    )


def test_stats_works_inside_jit_without_host_transfer():
    tx = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1))

    @jax.jit
    def step(state):
        _, state = tx.update(GRADS, state, GRADS)
        return oc.stats(state)

    s = step(tx.init(GRADS))
    assert isinstance(s["clip_by_global_norm/norm"], jax.Array)
    np.testing.assert_allclose(s["clip_by_global_norm/scale"], 0.2)


def test_init_stats_have_fixed_dtypes():
    s = oc.stats(oc.clip_by_global_norm(1.0).init(GRADS))
    for key, value in s.items():
        expected = (
            jnp.int32
            if key.split("/")[1] in ("count", "num_clipped", "num_nonfinite")
            else jnp.float32
        )
        assert value.dtype == expected and value.shape == ()
