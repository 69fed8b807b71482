"""Flax end to end: stats returned from jitted nnx steps, linen TrainState, orbax resumes.

test_flax.py covers eager stats reads, per_layer on nnx paths, a hand-written linen loop and
flax.serialization round trips; this module covers what users write around them: a logging
``nnx.jit`` step that returns ``oc.stats(optimizer)``, ``TrainState.apply_gradients``, and
``orbax.checkpoint`` restores into newly built objects that continue bit-identically.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.training.train_state import TrainState

import optaxclip as oc

MAX_NORM = 5.0
SPIKE = 100.0  # factor on the gradients of the spike steps: every clipper below clips them


def _data():
    """A regression batch whose first gradient norms (~6.5) fall under ``MAX_NORM``."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3)).astype(np.float32)
    y = 5.0 * np.sin(x @ np.array([[1.0], [-2.0], [0.5]], np.float32)) + 3.0
    return jnp.asarray(x), jnp.asarray(y.astype(np.float32))


def _spike(step, spike_steps):
    return jnp.float32(SPIKE if step in spike_steps else 1.0)


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(3, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def _mse(model, x, y):
    return jnp.mean(jnp.square(model(x) - y))


@nnx.jit
def _nnx_logging_step(model, optimizer, x, y, spike):
    """The logging pattern: the step returns ``oc.stats(optimizer)`` with the loss.

    Also returns what the optimizer saw (the scaled gradients) and the parameters before the
    update, for the independent checks.
    """
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    loss, grads = nnx.value_and_grad(_mse)(model, x, y)
    grads = jax.tree.map(lambda g: g * spike, grads)
    optimizer.update(model, grads)
    return loss, nnx.as_pure(grads), params, oc.stats(optimizer)


# ---------------------------------------------------------------------------
# nnx: oc.stats(optimizer) returned from inside an nnx.jit step
# ---------------------------------------------------------------------------

NNX_STEPS = 10
NNX_SPIKES = (6,)  # after every warm-up below
AGC_CLIPPING = 0.05
NNX_CLIPPERS = {
    "clip_by_global_norm": lambda: oc.clip_by_global_norm(MAX_NORM),
    "zclip": lambda: oc.zclip(warmup_steps=3, max_norm=None),
    "autoclip": lambda: oc.autoclip(10.0, window=8),
    "adagc": lambda: oc.adagc(MAX_NORM, warmup_steps=3),
    "adaptive_grad_clip": lambda: oc.adaptive_grad_clip(AGC_CLIPPING),
    "spike_aware_clip": lambda: oc.spike_aware_clip(warmup_steps=2),
}
GLOBAL_CLIPPERS = ["autoclip", "clip_by_global_norm", "zclip"]  # one scale for the whole tree


@functools.cache
def _nnx_tx(name):
    """One chain per method: equal nnx graphs then share one compiled ``_nnx_logging_step``."""
    return optax.chain(NNX_CLIPPERS[name](), optax.adamw(1e-2))


def _make_nnx(name, seed=0):
    model = MLP(nnx.Rngs(seed))
    return model, nnx.Optimizer(model, _nnx_tx(name), wrt=nnx.Param)


def _train_nnx(model, optimizer, first, last, spike_steps):
    """Steps ``first..last-1`` of the jitted logging loop; per step, what it returned."""
    x, y = _data()
    steps = []
    # optax.adamw raises a float to an int32 power: not strict-promotion clean.
    with jax.numpy_dtype_promotion("standard"):
        for i in range(first, last):
            _, grads, params, logged = _nnx_logging_step(
                model, optimizer, x, y, _spike(i, spike_steps)
            )
            steps.append(
                {"grads": grads, "params": params, "logged": logged, "read": oc.stats(optimizer)}
            )
    return steps


@functools.cache
def _nnx_run(name):
    """Per step: the gradients, the parameters before it, the logged and the read stats."""
    return _train_nnx(*_make_nnx(name), 0, NNX_STEPS, NNX_SPIKES)


def _logged(name, field):
    return np.array([np.asarray(s["logged"][f"{name}/{field}"]) for s in _nnx_run(name)])


@pytest.mark.parametrize("name", sorted(NNX_CLIPPERS))
def test_nnx_jitted_step_logs_pre_clip_global_norm_of_its_grads(name):
    expected = [float(optax.tree.norm(s["grads"])) for s in _nnx_run(name)]
    assert expected[NNX_SPIKES[0]] > 10 * max(expected[: NNX_SPIKES[0]])  # the spike is seen
    np.testing.assert_allclose(_logged(name, "norm"), expected, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(NNX_CLIPPERS))
def test_nnx_jitted_step_logs_counts_of_steps_seen_and_clipped(name):
    assert _logged(name, "count").tolist() == list(range(1, NNX_STEPS + 1))
    assert _logged(name, "num_nonfinite").tolist() == [0] * NNX_STEPS
    # num_clipped counts the steps whose `clipped` fraction is positive, the spike among them.
    any_clipped = _logged(name, "clipped") > 0
    assert any_clipped[NNX_SPIKES[0]]
    assert _logged(name, "num_clipped").tolist() == np.cumsum(any_clipped).tolist()


@pytest.mark.parametrize("name", sorted(NNX_CLIPPERS))
def test_nnx_jitted_step_logged_stats_equal_stats_read_after_the_step(name):
    keys = {f"{name}/{field}" for field in oc.ClipStats._fields}
    for s in _nnx_run(name):
        assert s["logged"].keys() == s["read"].keys() == keys
        chex.assert_trees_all_equal(s["logged"], s["read"])
        chex.assert_trees_all_equal_dtypes(s["logged"], s["read"])


@pytest.mark.parametrize("name", GLOBAL_CLIPPERS)
def test_nnx_jitted_step_global_clipper_logs_scale_threshold_over_norm(name):
    norm, threshold = _logged(name, "norm"), _logged(name, "threshold")  # zclip warm-up: inf
    above = norm > threshold
    assert 0 < above.sum() < NNX_STEPS  # clipped and unclipped steps
    np.testing.assert_allclose(_logged(name, "scale"), np.minimum(1, threshold / norm), rtol=1e-6)
    np.testing.assert_array_equal(_logged(name, "clipped"), above.astype(np.float32))


def test_nnx_jitted_step_clip_by_global_norm_logs_its_max_norm():
    np.testing.assert_array_equal(_logged("clip_by_global_norm", "threshold"), MAX_NORM)


def test_nnx_jitted_step_agc_logs_smallest_unit_factor_from_params_before_step():
    # optax's AGC of the same gradients against the parameters before each step: the smallest
    # ratio clipped / unclipped is the smallest unit factor, so the logged scale can only
    # match if nnx.Optimizer handed the transform those parameters.
    ref = optax.adaptive_grad_clip(AGC_CLIPPING)
    expected, any_clipped = [], []
    for s in _nnx_run("adaptive_grad_clip"):
        out, _ = ref.update(s["grads"], ref.init(s["params"]), s["params"])
        ratios = [
            np.asarray(o)[np.asarray(g) != 0] / np.asarray(g)[np.asarray(g) != 0]
            for o, g in zip(jax.tree.leaves(out), jax.tree.leaves(s["grads"]))
        ]
        expected.append(min(1.0, float(np.min(np.concatenate(ratios)))))
        any_clipped.append(expected[-1] < 1.0)
    assert 0 < sum(any_clipped)
    np.testing.assert_allclose(_logged("adaptive_grad_clip", "scale"), expected, rtol=1e-5)
    np.testing.assert_array_equal(_logged("adaptive_grad_clip", "threshold"), np.nan)
    num_clipped = _logged("adaptive_grad_clip", "num_clipped")
    assert num_clipped.tolist() == np.cumsum(any_clipped).tolist()


# ---------------------------------------------------------------------------
# linen: TrainState.apply_gradients against optax's own clippers
# ---------------------------------------------------------------------------

LINEN_STEPS = 8
LINEN_PAIRS = {  # ours, optax's: equal on well-conditioned inputs
    "clip_by_global_norm": (
        lambda: oc.clip_by_global_norm(MAX_NORM),
        lambda: optax.clip_by_global_norm(MAX_NORM),
    ),
    "adaptive_grad_clip": (
        lambda: oc.adaptive_grad_clip(AGC_CLIPPING),
        lambda: optax.adaptive_grad_clip(AGC_CLIPPING),
    ),
    "clip_by_value": (lambda: oc.clip_by_value(0.5), lambda: optax.clip(0.5)),
}


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(jnp.tanh(nn.Dense(8)(x)))


def _linen_loss(params, apply_fn, x, y):
    return jnp.mean(jnp.square(apply_fn(params, x) - y))


def _train_state(tx, seed=0):
    params = LinenMLP().init(jax.random.key(seed), _data()[0])
    state = TrainState.create(apply_fn=LinenMLP().apply, params=params, tx=tx)
    # TrainState's step starts as a weakly typed 0, which orbax restores strongly typed: a
    # strong step from the start lets the restored state reuse the compiled step.
    return state.replace(step=jnp.zeros((), jnp.int32))


def _arrays(state):
    """A TrainState's arrays (its ``tx`` and ``apply_fn`` are static fields)."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


@functools.partial(jax.jit, static_argnums=0)
def _linen_lockstep(ref_clip, state, ref_state, x, y):
    """One ``apply_gradients`` of each state with the same gradients (those at ``state``)."""
    grads = jax.grad(_linen_loss)(state.params, state.apply_fn, x, y)
    clipped, _ = ref_clip.update(grads, ref_clip.init(state.params), state.params)
    ref_clipped = jax.tree.reduce(
        jnp.logical_or, jax.tree.map(lambda a, b: jnp.any(a != b), clipped, grads)
    )
    new_state, new_ref_state = (s.apply_gradients(grads=grads) for s in (state, ref_state))
    return new_state, new_ref_state, grads, ref_clipped


@functools.cache
def _linen_run(name):
    ours, theirs = LINEN_PAIRS[name]
    ref_clip = theirs()  # one object: it is a static argument of the jitted step
    state = _train_state(optax.chain(ours(), optax.adam(1e-2)))
    ref_state = _train_state(optax.chain(ref_clip, optax.adam(1e-2)))
    x, y = _data()
    steps = []
    with jax.numpy_dtype_promotion("standard"):  # optax.adam is not strict-promotion clean
        for _ in range(LINEN_STEPS):
            state, ref_state, grads, ref_clipped = _linen_lockstep(ref_clip, state, ref_state, x, y)
            steps.append(
                {
                    "state": state,
                    "ref_state": ref_state,
                    "grad_norm": float(optax.tree.norm(grads)),
                    "ref_clipped": bool(ref_clipped),
                    "stats": oc.stats(state.opt_state),
                }
            )
    return steps


@pytest.mark.parametrize("name", sorted(LINEN_PAIRS))
def test_train_state_apply_gradients_matches_optax_clipper_chain(name):
    steps = _linen_run(name)
    assert 0 < sum(s["ref_clipped"] for s in steps)  # the clipper had work to do
    for s in steps:
        assert int(s["state"].step) == int(s["ref_state"].step)
        # Adam's first moment: a running mean of the clipped gradients (atol for cancellation).
        ours, theirs = s["state"].opt_state[1], s["ref_state"].opt_state[1]
        chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=1e-9)
        # Parameters near 0 are differences of larger steps: an absolute tolerance below one
        # float32 ulp of the weights (6e-8 at 0.5). AGC sums small leaves' units in another
        # order than optax, so its factors can differ in the last bit.
        chex.assert_trees_all_close(s["state"].params, s["ref_state"].params, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", sorted(LINEN_PAIRS))
def test_train_state_opt_state_stats_report_norm_and_counts(name):
    steps = _linen_run(name)
    norms = [s["stats"][f"{name}/norm"] for s in steps]
    np.testing.assert_allclose(norms, [s["grad_norm"] for s in steps], rtol=1e-6)
    counts = [int(s["stats"][f"{name}/count"]) for s in steps]
    assert counts == list(range(1, LINEN_STEPS + 1))
    num_clipped = [int(s["stats"][f"{name}/num_clipped"]) for s in steps]
    assert num_clipped == np.cumsum([s["ref_clipped"] for s in steps]).tolist()


def test_train_state_clip_by_global_norm_stats_scale_is_max_norm_over_norm():
    steps = _linen_run("clip_by_global_norm")
    norms = np.array([s["grad_norm"] for s in steps])
    assert 0 < np.sum(norms > MAX_NORM) < LINEN_STEPS  # clipped and unclipped steps
    field = lambda f: np.array([s["stats"][f"clip_by_global_norm/{f}"] for s in steps])
    np.testing.assert_array_equal(field("threshold"), MAX_NORM)
    np.testing.assert_allclose(field("scale"), np.minimum(1, MAX_NORM / norms), rtol=1e-6)
    np.testing.assert_array_equal(field("clipped"), (norms > MAX_NORM).astype(np.float32))


# ---------------------------------------------------------------------------
# orbax: save mid-run, restore into new objects from an abstract target, continue
# ---------------------------------------------------------------------------

CHECKPOINT_STEP, RESUMED_STEPS = 6, 5
CHECKPOINT_SPIKES = (4, 8)  # one before the checkpoint, one after it
CHECKPOINT_CLIPPERS = ["adagc", "adaptive_grad_clip", "autoclip", "zclip"]


@pytest.mark.parametrize("name", CHECKPOINT_CLIPPERS)
def test_orbax_nnx_restore_into_new_optimizer_continues_bit_identically(name, tmp_path):
    model, optimizer = _make_nnx(name)
    _train_nnx(model, optimizer, 0, CHECKPOINT_STEP, CHECKPOINT_SPIKES)
    saved, saved_stats = nnx.state((model, optimizer)), oc.stats(optimizer)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", saved)

    graphdef, target = nnx.split(nnx.eval_shape(lambda: _make_nnx(name, seed=1)))
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "ckpt", target)
    new_model, new_optimizer = nnx.merge(graphdef, restored)
    chex.assert_trees_all_equal(nnx.state((new_model, new_optimizer)), saved)
    chex.assert_trees_all_equal(oc.stats(new_optimizer), saved_stats)
    chex.assert_trees_all_equal_dtypes(oc.stats(new_optimizer), saved_stats)

    end = CHECKPOINT_STEP + RESUMED_STEPS
    _train_nnx(new_model, new_optimizer, CHECKPOINT_STEP, end, CHECKPOINT_SPIKES)
    _train_nnx(model, optimizer, CHECKPOINT_STEP, end, CHECKPOINT_SPIKES)
    final = oc.stats(optimizer)
    assert int(final[f"{name}/count"]) == end
    assert int(final[f"{name}/num_clipped"]) > int(saved_stats[f"{name}/num_clipped"])
    chex.assert_trees_all_equal(nnx.state(new_model), nnx.state(model))
    chex.assert_trees_all_equal(nnx.state(new_optimizer), nnx.state(optimizer))


@jax.jit
def _linen_step(state, spike):
    x, y = _data()
    grads = jax.grad(_linen_loss)(state.params, state.apply_fn, x, y)
    return state.apply_gradients(grads=jax.tree.map(lambda g: g * spike, grads))


def _train_linen(state, first, last):
    with jax.numpy_dtype_promotion("standard"):  # optax.adam is not strict-promotion clean
        for i in range(first, last):
            state = _linen_step(state, _spike(i, CHECKPOINT_SPIKES))
    return state


@pytest.mark.parametrize("name", CHECKPOINT_CLIPPERS)
def test_orbax_train_state_restore_into_new_state_continues_bit_identically(name, tmp_path):
    tx = optax.chain(NNX_CLIPPERS[name](), optax.adam(1e-2))  # one tx: one compiled step
    make = lambda seed: _train_state(tx, seed)
    state = _train_linen(make(0), 0, CHECKPOINT_STEP)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", state)

    target = jax.eval_shape(lambda: make(1))
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "ckpt", target)
    assert isinstance(restored, TrainState)
    chex.assert_trees_all_equal(_arrays(restored), _arrays(state))
    chex.assert_trees_all_equal_dtypes(_arrays(restored), _arrays(state))

    end = CHECKPOINT_STEP + RESUMED_STEPS
    resumed = _train_linen(restored, CHECKPOINT_STEP, end)
    uninterrupted = _train_linen(state, CHECKPOINT_STEP, end)
    final = oc.stats(uninterrupted.opt_state)
    assert int(final[f"{name}/count"]) == end
    assert int(final[f"{name}/num_clipped"]) > int(oc.stats(state.opt_state)[f"{name}/num_clipped"])
    chex.assert_trees_all_equal(_arrays(resumed), _arrays(uninterrupted))
