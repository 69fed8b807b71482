"""Flax integration: nnx.Optimizer training, nnx paths in per_layer, a linen loop, checkpoints."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, serialization

import optaxclip as oc

STEPS = 8
MAX_NORM = 5.0  # the loops below start with gradient norms ~6.5 that fall under it


def _data():
    """A regression batch with large targets, so early gradients exceed ``MAX_NORM``."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3)).astype(np.float32)
    y = 5.0 * np.sin(x @ np.array([[1.0], [-2.0], [0.5]], np.float32)) + 3.0
    return jnp.asarray(x), jnp.asarray(y.astype(np.float32))


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(3, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def _mse(model, x, y):
    return jnp.mean(jnp.square(model(x) - y))


def _grads(model):
    return nnx.grad(_mse)(model, *_data())


# ---------------------------------------------------------------------------
# An nnx training loop
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nnx_history():
    """Per step of a jitted nnx loop: loss, independent global norm of the grads, and stats.

    The autouse strict-promotion fixture is function-scoped, so this module-scoped one turns
    strict promotion on itself.
    """
    with jax.numpy_dtype_promotion("strict"):
        model = MLP(nnx.Rngs(0))
        tx = optax.chain(oc.clip_by_global_norm(MAX_NORM), optax.adamw(1e-2))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

        @nnx.jit
        def train_step(model, optimizer, x, y):
            loss, grads = nnx.value_and_grad(_mse)(model, x, y)
            optimizer.update(model, grads)
            return loss, grads

        x, y = _data()
        history = []
        for _ in range(STEPS):
            # optax.adamw raises a float to an int32 power: not strict-promotion clean.
            with jax.numpy_dtype_promotion("standard"):
                loss, grads = train_step(model, optimizer, x, y)
            history.append(
                {
                    "loss": float(loss),
                    "grad_norm": float(oc.global_norm(grads)),
                    "optimizer": oc.stats(optimizer),
                    "opt_state": oc.stats(optimizer.opt_state),
                }
            )
        final_loss = float(_mse(model, x, y))
    return history, final_loss


def test_nnx_training_with_clipping_decreases_loss(nnx_history):
    history, final_loss = nnx_history
    assert final_loss < 0.9 * history[0]["loss"], (history[0]["loss"], final_loss)


@pytest.mark.parametrize("source", ["optimizer", "opt_state"])
def test_nnx_stats_norm_is_pre_clip_global_norm_of_each_step(nnx_history, source):
    history, _ = nnx_history
    norms = [h["grad_norm"] for h in history]
    assert min(norms) < MAX_NORM < max(norms)  # clipped and unclipped steps
    reported = [float(h[source]["clip_by_global_norm/norm"]) for h in history]
    np.testing.assert_allclose(reported, norms, rtol=1e-6)


@pytest.mark.parametrize("source", ["optimizer", "opt_state"])
def test_nnx_stats_count_equals_steps_taken(nnx_history, source):
    history, _ = nnx_history
    counts = [int(h[source]["clip_by_global_norm/count"]) for h in history]
    assert counts == list(range(1, STEPS + 1))


@pytest.mark.parametrize("source", ["optimizer", "opt_state"])
def test_nnx_stats_num_clipped_counts_steps_above_max_norm(nnx_history, source):
    history, _ = nnx_history
    expected = np.cumsum([h["grad_norm"] > MAX_NORM for h in history]).tolist()
    assert 0 < expected[-1] < STEPS
    assert [int(h[source]["clip_by_global_norm/num_clipped"]) for h in history] == expected


def test_nnx_optimizer_passes_params_to_agc_and_matches_optax():
    model = MLP(nnx.Rngs(1))
    clipping = 0.01
    tx = optax.chain(oc.adaptive_grad_clip(clipping), optax.sgd(1.0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    grads = _grads(model)
    updates = optimizer.update(model, grads)  # raises if nnx did not pass the params

    ref_tx = optax.adaptive_grad_clip(clipping)
    expected, _ = ref_tx.update(nnx.as_pure(grads), ref_tx.init(params), params)
    chex.assert_trees_all_close(updates, jax.tree.map(jnp.negative, expected), rtol=1e-6)
    assert float(oc.stats(optimizer)["adaptive_grad_clip/clipped"]) > 0  # AGC did clip


# ---------------------------------------------------------------------------
# per_layer on nnx paths
# ---------------------------------------------------------------------------

BOUND = 0.01


def _assert_bias_clipped_and_kernels_untouched(out, grads, biases=("l1", "l2")):
    out, grads = nnx.to_pure_dict(out), nnx.to_pure_dict(grads)
    for layer in ("l1", "l2"):
        g = grads[layer]["bias"]
        expected = jnp.clip(g, -BOUND, BOUND) if layer in biases else g
        chex.assert_trees_all_equal(out[layer]["bias"], expected)
        chex.assert_trees_all_equal(out[layer]["kernel"], grads[layer]["kernel"])


def test_per_layer_regex_on_nnx_grads_clips_only_bias_leaves():
    grads = _grads(MLP(nnx.Rngs(0)))
    biases = [nnx.to_pure_dict(grads)[layer]["bias"] for layer in ("l1", "l2")]
    assert all(float(jnp.max(jnp.abs(b))) > BOUND for b in biases)  # the rule has work to do
    tx = oc.per_layer({r".*bias": oc.clip_by_value(BOUND)})
    out, _ = tx.update(grads, tx.init(grads))
    _assert_bias_clipped_and_kernels_untouched(out, grads)


def test_per_layer_nnx_paths_have_no_trailing_value():
    # "l1/bias" must fullmatch the path: with a trailing "/value" it would match nothing, and
    # per_layer's no-match UserWarning is an error under the test configuration.
    grads = _grads(MLP(nnx.Rngs(0)))
    tx = oc.per_layer({r"l1/bias": oc.clip_by_value(BOUND)})
    out, _ = tx.update(grads, tx.init(grads))
    _assert_bias_clipped_and_kernels_untouched(out, grads, biases=("l1",))


def test_per_layer_in_nnx_optimizer_clips_only_bias_updates():
    model = MLP(nnx.Rngs(0))
    tx = optax.chain(oc.per_layer({r".*bias": oc.clip_by_value(BOUND)}), optax.sgd(1.0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = _grads(model)
    updates = optimizer.update(model, grads)
    _assert_bias_clipped_and_kernels_untouched(jax.tree.map(jnp.negative, updates), grads)


# ---------------------------------------------------------------------------
# A linen training loop
# ---------------------------------------------------------------------------


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(jnp.tanh(nn.Dense(16)(x)))


def _linen_loss(params, x, y):
    return jnp.mean(jnp.square(LinenMLP().apply(params, x) - y))


@pytest.fixture(scope="module")
def linen_history():
    """Per step of a jitted linen loop: oc's and optax's clipped updates of the same grads."""
    with jax.numpy_dtype_promotion("strict"):  # the autouse fixture is function-scoped
        x, y = _data()
        params = LinenMLP().init(jax.random.key(0), x)
        tx = optax.chain(oc.clip_by_global_norm(MAX_NORM), optax.sgd(0.05))
        ref = optax.chain(optax.clip_by_global_norm(MAX_NORM), optax.sgd(0.05))

        @jax.jit
        def step(params, state, ref_state):
            loss, grads = jax.value_and_grad(_linen_loss)(params, x, y)
            updates, state = tx.update(grads, state, params)
            ref_updates, ref_state = ref.update(grads, ref_state, params)
            new_params = optax.apply_updates(params, updates)
            return new_params, state, ref_state, loss, grads, updates, ref_updates

        state, ref_state = tx.init(params), ref.init(params)
        history = []
        for _ in range(STEPS):
            params, state, ref_state, loss, grads, updates, ref_updates = step(
                params, state, ref_state
            )
            history.append(
                {
                    "loss": float(loss),
                    "grad_norm": float(optax.tree.norm(grads)),
                    "stats": oc.stats(state),
                    "updates": updates,
                    "ref_updates": ref_updates,
                }
            )
        final_loss = float(_linen_loss(params, x, y))
    return history, final_loss


def test_linen_training_with_clipping_decreases_loss(linen_history):
    history, final_loss = linen_history
    assert final_loss < 0.9 * history[0]["loss"], (history[0]["loss"], final_loss)


def test_linen_clipped_update_equals_optax_clip_by_global_norm(linen_history):
    history, _ = linen_history
    norms = [h["grad_norm"] for h in history]
    assert min(norms) < MAX_NORM < max(norms)  # clipped and unclipped steps
    for h in history:
        chex.assert_trees_all_close(h["updates"], h["ref_updates"], rtol=1e-6)


def test_linen_stats_report_pre_clip_norm_and_counts(linen_history):
    history, _ = linen_history
    norms = [h["grad_norm"] for h in history]
    stats = [h["stats"] for h in history]
    np.testing.assert_allclose([float(s["clip_by_global_norm/norm"]) for s in stats], norms, 1e-6)
    assert [int(s["clip_by_global_norm/count"]) for s in stats] == list(range(1, STEPS + 1))
    expected_clipped = np.cumsum([n > MAX_NORM for n in norms]).tolist()
    assert 0 < expected_clipped[-1] < STEPS
    assert [int(s["clip_by_global_norm/num_clipped"]) for s in stats] == expected_clipped


# ---------------------------------------------------------------------------
# Checkpoints: flax.serialization round trips of optimizer states
# ---------------------------------------------------------------------------

TOTAL_STEPS, CHECKPOINT_STEP = 12, 6
SPIKE_STEP = 4  # its gradient is scaled by 1000: skip_spikes skips it, the clipper clips it
OPTIMIZERS = {
    "clip_by_global_norm": lambda: optax.chain(oc.clip_by_global_norm(MAX_NORM), optax.adam(1e-2)),
    "skip_spikes": lambda: oc.skip_spikes(optax.adam(1e-2), window=4),
    "autoclip": lambda: optax.chain(oc.autoclip(10.0), optax.adam(1e-2)),
    "zclip": lambda: optax.chain(oc.zclip(warmup_steps=3, max_norm=None), optax.adam(1e-2)),
    "adagc": lambda: optax.chain(oc.adagc(MAX_NORM, warmup_steps=3), optax.adam(1e-2)),
    "spike_aware_clip": lambda: optax.chain(oc.spike_aware_clip(warmup_steps=2), optax.adam(1e-2)),
    "quantile_clip": lambda: optax.chain(oc.quantile_clip(), optax.adam(1e-2)),
}


def _trainer(tx):
    """A jitted linen step ``(params, state, spike) -> (params, state)`` passing the loss."""
    x, y = _data()

    @jax.jit
    def step(params, state, spike):
        loss, grads = jax.value_and_grad(_linen_loss)(params, x, y)
        grads = jax.tree.map(lambda g: g * spike, grads)
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    def run(params, state, first, last):
        # optax.adam raises a float to an int32 power: not strict-promotion clean.
        with jax.numpy_dtype_promotion("standard"):
            for i in range(first, last):
                spike = jnp.float32(1000.0 if i == SPIKE_STEP else 1.0)
                params, state = step(params, state, spike)
        return params, state

    return run


def _start(tx):
    params = LinenMLP().init(jax.random.key(1), _data()[0])
    return params, tx.init(params)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_checkpoint_restores_optimizer_state_bit_identically(name):
    tx = OPTIMIZERS[name]()
    params, state = _trainer(tx)(*_start(tx), 0, CHECKPOINT_STEP)
    restored = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    chex.assert_trees_all_equal_dtypes(restored, state)
    chex.assert_trees_all_equal(restored, state)
    assert oc.stats(restored).keys() == oc.stats(state).keys()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_checkpoint_resume_continues_bit_identically(name):
    tx = OPTIMIZERS[name]()
    run = _trainer(tx)
    params, state = run(*_start(tx), 0, CHECKPOINT_STEP)
    blob_params, blob_state = serialization.to_bytes(params), serialization.to_bytes(state)
    template_params, template_state = _start(tx)
    resumed = run(
        serialization.from_bytes(template_params, blob_params),
        serialization.from_bytes(template_state, blob_state),
        CHECKPOINT_STEP,
        TOTAL_STEPS,
    )
    uninterrupted = run(params, state, CHECKPOINT_STEP, TOTAL_STEPS)
    s = oc.stats(uninterrupted[1])
    assert int(s[f"{name}/num_clipped"]) >= 1  # the state records a clip or a skip
    chex.assert_trees_all_equal(resumed, uninterrupted)
