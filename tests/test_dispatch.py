"""No transform synchronises with the host: training loops dispatch ahead, states donate.

A transform that read a value back to Python (``float(x)``, ``if x:``), called back to the
host on every step, or held one array twice in its state would stall or break the
asynchronous training loop users write: ``jax.jit(step, donate_argnums=...)`` called in a
Python loop that runs ahead of the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import BATCHED, NOT_TRANSFORMS, TRANSFORMS, all_eqns, make_tree, params_like

import optaxclip as oc

# error_if_nonfinite exists to raise: eagerly it reads one flag back (documented); under jit
# its host callback sits in the branch that only a non-finite step takes, but a program that
# holds a host callback does not run ahead on CPU (measured; documented in its docstring).
RAISES_BY_DESIGN = {"error_if_nonfinite"}
CALLBACKS = {"debug_callback", "pure_callback", "io_callback", "callback"}

NAMES = sorted(TRANSFORMS)


def _primitives(jaxpr) -> list[str]:
    return [eqn.primitive.name for eqn in all_eqns(jaxpr)]


def _step_fn(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def test_registry_is_the_public_surface():
    public = {n for n in oc.__all__ if callable(getattr(oc, n)) and not n[0].isupper()}
    assert public - NOT_TRANSFORMS - BATCHED == set(TRANSFORMS)


@pytest.mark.parametrize("name", NAMES)
def test_state_holds_no_array_twice_and_donates(name):
    tx = TRANSFORMS[name].make()
    params = params_like(make_tree("nested_dict", jnp.float32))
    state = tx.init(params)
    leaves = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
    assert len({id(x) for x in leaves}) == len(leaves), f"{name}: an array appears twice"
    step = jax.jit(_step_fn(tx), donate_argnums=(0, 1))
    grads = make_tree("nested_dict", jnp.float32)
    for _ in range(3):
        params, state = step(params, state, grads)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize("name", NAMES)
def test_update_has_no_host_callback_on_the_step(name):
    tx = TRANSFORMS[name].make()
    params = params_like(make_tree("nested_dict", jnp.float32))
    grads = make_tree("nested_dict", jnp.float32)
    jaxpr = jax.make_jaxpr(tx.update)(grads, tx.init(params), params).jaxpr
    found = CALLBACKS & set(_primitives(jaxpr))
    if name in RAISES_BY_DESIGN:
        top = {e.primitive.name for e in jaxpr.eqns}
        assert not CALLBACKS & top  # only inside the non-finite branch of a cond
    else:
        assert not found, f"{name}: {found}"


@pytest.mark.parametrize("name", [n for n in NAMES if n not in RAISES_BY_DESIGN])
def test_eager_update_reads_nothing_back(name):
    tx = TRANSFORMS[name].make()
    params = params_like(make_tree("nested_dict", jnp.float32))
    grads = make_tree("nested_dict", jnp.float32)
    state = tx.init(params)
    with jax.transfer_guard_device_to_host("disallow"):
        for _ in range(2):
            _, state = tx.update(grads, state, params)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NAMES if n not in RAISES_BY_DESIGN])
def test_training_loop_dispatches_ahead(name):
    # Four 512x512 leaves (1M parameters): a step of chain(tx, adam) takes milliseconds,
    # dispatching one takes microseconds. After a loop of 100 steps the last one is still
    # running unless some step made the loop wait for the device.
    # (optax.adam itself mixes Python floats and int32: standard promotion for it)
    with jax.numpy_dtype_promotion("standard"):
        _run_ahead(name)


def _run_ahead(name):
    rng = np.random.default_rng(0)
    grads = {f"w{i}": jnp.asarray(rng.standard_normal((512, 512)), jnp.float32) for i in range(4)}
    params = jax.tree.map(lambda g: 0.1 * g, grads)
    tx = optax.chain(TRANSFORMS[name].make(), optax.adam(1e-3))
    state = tx.init(params)
    step = jax.jit(_step_fn(tx), donate_argnums=(0, 1))
    params, state = jax.block_until_ready(step(params, state, grads))
    with jax.transfer_guard("disallow"):
        for _ in range(100):
            params, state = step(params, state, grads)
        pending = not all(x.is_ready() for x in jax.tree.leaves(params))
        jax.block_until_ready(params)
    assert pending, f"chain({name}, adam): the loop waited for every step"
