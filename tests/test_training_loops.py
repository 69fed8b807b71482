"""Real training loops: stacked layers, parameter groups, one norm per step, loss scaling,
per-layer metrics and gradient accumulation."""

from __future__ import annotations

import gc
import math
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hlo import reduction_count, update_hlo

import optaxclip as oc

rng = np.random.default_rng(0)


def normal(*shape, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


# ---------------------------------------------------------------------------
# Stacked layers: every per-tensor method treats each slice as its own tensor
# ---------------------------------------------------------------------------

L = 3
LAYER_SCALES = np.array([1.0, 20.0, 0.05])  # one loud layer, one quiet one


def stacked_tree(seed=0):
    r = np.random.default_rng(seed)
    s = LAYER_SCALES.reshape(L, 1, 1)
    return {
        "layers": {
            "kernel": jnp.asarray(r.standard_normal((L, 6, 4)) * s, jnp.float32),
            "bias": jnp.asarray(r.standard_normal((L, 4)) * s[:, :, 0], jnp.float32),
        },
        "head": jnp.asarray(r.standard_normal((4, 2)), jnp.float32),
    }


def unstack(tree):
    """The same numbers as separate per-layer leaves."""
    out = {"head": tree["head"]}
    for i in range(L):
        out[f"layer{i}"] = {k: v[i] for k, v in tree["layers"].items()}
    return out


def restack(tree):
    layers = {k: jnp.stack([tree[f"layer{i}"][k] for i in range(L)]) for k in ("kernel", "bias")}
    return {"layers": layers, "head": tree["head"]}


STACKED = {"layers": 1, "head": None}  # a pytree prefix


def by_path(path):  # the callable form
    return 1 if path.startswith("layers/") else None


PER_TENSOR = {
    "clip_by_leaf_norm": (lambda **kw: oc.clip_by_leaf_norm(2.0, **kw), False),
    "clip_by_block_rms": (lambda **kw: oc.clip_by_block_rms(0.5, **kw), False),
    "adaptive_grad_clip": (lambda **kw: oc.adaptive_grad_clip(0.05, **kw), True),
    "adagc": (lambda **kw: oc.adagc(3.0, warmup_steps=2, **kw), False),
}


@pytest.mark.parametrize("form", ["prefix", "callable"])
@pytest.mark.parametrize("name", list(PER_TENSOR))
def test_stacked_slices_behave_as_separate_leaves(name, form):
    make, needs_params = PER_TENSOR[name]
    stacked_tx = make(stacked_axes=STACKED if form == "prefix" else by_path)
    separate_tx = make()
    params = stacked_tree(seed=1)
    s_state = stacked_tx.init(params)
    u_state = separate_tx.init(unstack(params))
    for step in range(5):  # several steps: AdaGC's warm-up, then its per-tensor EMA
        g = stacked_tree(seed=10 + step)
        out, s_state = jax.jit(stacked_tx.update)(g, s_state, params if needs_params else None)
        ref, u_state = jax.jit(separate_tx.update)(
            unstack(g), u_state, unstack(params) if needs_params else None
        )
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(restack(ref))):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        s, u = oc.stats(s_state), oc.stats(u_state)
        for field in ("norm", "clipped", "scale", "num_clipped"):
            np.testing.assert_allclose(s[f"{name}/{field}"], u[f"{name}/{field}"], rtol=1e-6)
    assert int(s[f"{name}/num_clipped"]) > 0


def test_unstacked_treatment_of_a_stacked_kernel_is_what_stacked_axes_fixes():
    # AGC without stacked_axes reads (L, in, out) as a multi-head kernel and reduces over
    # the layers: the quiet layer is held to the loud layer's scale (as in optax).
    params = stacked_tree(seed=1)
    g = stacked_tree(seed=2)
    plain_tx = oc.adaptive_grad_clip(0.05)
    stacked_tx = oc.adaptive_grad_clip(0.05, stacked_axes=STACKED)
    plain = plain_tx.update(g, plain_tx.init(params), params)[0]
    stacked = stacked_tx.update(g, stacked_tx.init(params), params)[0]
    assert not np.allclose(plain["layers"]["kernel"], stacked["layers"]["kernel"])


def test_adagc_keeps_one_threshold_per_slice():
    tx = oc.adagc(1.0, stacked_axes=by_path)
    state = tx.init(stacked_tree())
    assert state.gamma.shape == (2 * L + 1,)
    with pytest.raises(ValueError, match=r"1 tensors .* initialised for 7"):
        tx.update({"head": stacked_tree()["head"]}, state)


def test_monitor_reports_one_norm_per_layer():
    g = stacked_tree()
    tx = oc.monitor(per_leaf=True, stacked_axes=STACKED)
    _, state = tx.update(g, tx.init(g))
    s = oc.stats(state)
    kernel = s["monitor/layers/kernel"]
    assert kernel.shape == (L,)
    expected = [float(jnp.linalg.norm(g["layers"]["kernel"][i])) for i in range(L)]
    np.testing.assert_allclose(kernel, expected, rtol=1e-6)
    assert s["monitor/head"].shape == ()
    np.testing.assert_allclose(s["monitor/norm"], oc.global_norm(g), rtol=1e-6)


@pytest.mark.parametrize(
    "stacked_axes, error, match",
    [
        (3, ValueError, "only 2 dimensions"),
        ({"layers": -1, "head": None}, TypeError, "int >= 0"),
        ({"layers": 1}, ValueError, "prefix"),
        (lambda path: "one", TypeError, "'head'"),
    ],
)
def test_bad_stacked_axes_name_the_leaf(stacked_axes, error, match):
    g = stacked_tree()
    tx = oc.clip_by_leaf_norm(1.0, stacked_axes=stacked_axes)
    with pytest.raises(error, match=match):
        tx.update(g, tx.init(g))


class Block(nnx.Module):
    def __init__(self, d, rngs):
        self.linear = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.linear(x))


class ScannedModel(nnx.Module):
    """Layers stacked by nnx.vmap and applied by nnx.scan (kernels of shape (L, d, d))."""

    def __init__(self, d, layers, rngs):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(d, rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(d, 1, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(h, block):
            return block(h)

        return self.head(body(x, self.blocks))


class LoopModel(nnx.Module):
    """The same network with a Python list of layers (kernels of shape (d, d))."""

    def __init__(self, scanned: ScannedModel, layers):
        d = scanned.head.kernel[...].shape[0]
        self.blocks = nnx.List([Block(d, nnx.Rngs(0)) for _ in range(layers)])
        for i, block in enumerate(self.blocks):
            block.linear.kernel.set_value(scanned.blocks.linear.kernel[...][i])
            block.linear.bias.set_value(scanned.blocks.linear.bias[...][i])
        self.head = nnx.Linear(d, 1, rngs=nnx.Rngs(0))
        self.head.kernel.set_value(scanned.head.kernel[...])
        self.head.bias.set_value(scanned.head.bias[...])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.mark.parametrize("name", ["clip_by_leaf_norm", "adagc", "adaptive_grad_clip"])
def test_nnx_scan_model_matches_the_unrolled_model_leaf_for_leaf(name):
    layers, d = 3, 8
    scanned = ScannedModel(d, layers, nnx.Rngs(0))
    unrolled = LoopModel(scanned, layers)
    x = normal(16, d, scale=3.0)
    y = normal(16, 1)
    make, _ = PER_TENSOR[name]
    stacked_axes = lambda path: 1 if path.startswith("blocks/") else None
    opt_s = nnx.Optimizer(
        scanned, optax.chain(make(stacked_axes=stacked_axes), optax.sgd(0.05)), wrt=nnx.Param
    )
    opt_u = nnx.Optimizer(unrolled, optax.chain(make(), optax.sgd(0.05)), wrt=nnx.Param)

    def loss(model):
        return jnp.mean((model(x) - y) ** 2)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(loss)(model)
        optimizer.update(model, grads)

    with jax.numpy_dtype_promotion("standard"):
        for _ in range(4):
            step(scanned, opt_s)
            step(unrolled, opt_u)
    for i in range(layers):
        for field in ("kernel", "bias"):
            a = getattr(scanned.blocks.linear, field)[...][i]
            b = getattr(unrolled.blocks[i].linear, field)[...]
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(scanned.head.kernel[...], unrolled.head.kernel[...], rtol=2e-5)
    assert int(oc.stats(opt_s)[f"{name}/num_clipped"]) > 0


# ---------------------------------------------------------------------------
# Parameter groups
# ---------------------------------------------------------------------------


def group_tree():
    return {
        "embed": normal(10, 4, scale=3.0),
        "body": {"w": normal(4, 4), "b": normal(4)},
        "norm": {"scale": normal(4, scale=0.1)},
        "frozen": normal(4, 4, scale=100.0),
    }


def label_of(path):
    return path.split("/")[0]


def test_each_group_clipped_to_its_own_norm_float64_oracle():
    g = group_tree()
    limits = {"embed": 2.0, "body": 1.0, "norm": 10.0}
    tx = oc.clip_by_group_norm(label_of, limits)
    out, state = jax.jit(tx.update)(g, tx.init(g))
    for label, limit in limits.items():
        leaves = jax.tree.leaves(g[label])
        norm = math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in leaves))
        factor = min(1.0, limit / norm)
        for a, x in zip(jax.tree.leaves(out[label]), leaves):
            np.testing.assert_allclose(a, np.asarray(x, np.float64) * factor, rtol=1e-6)
    np.testing.assert_array_equal(out["frozen"], g["frozen"])  # no limit: untouched
    limited = [np.asarray(x, np.float64) for k in limits for x in jax.tree.leaves(g[k])]
    expected = math.sqrt(sum(float(np.sum(x**2)) for x in limited))
    np.testing.assert_allclose(state.stats.norm, expected, rtol=1e-6)  # frozen not in it
    assert float(state.stats.clipped) == pytest.approx(2 / 3)  # embed and body, not norm
    assert np.isnan(float(state.stats.threshold))


def test_group_labels_as_a_prefix_tree_and_three_four_five():
    g = {"a": jnp.array([3.0]), "b": jnp.array([4.0]), "c": jnp.array([30.0, 40.0])}
    tx = oc.clip_by_group_norm({"a": "x", "b": "x", "c": "y"}, {"x": 1.0, "y": 5.0})
    out, state = tx.update(g, tx.init(g))
    np.testing.assert_allclose(out["a"], [0.6], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [0.8], rtol=1e-6)
    np.testing.assert_allclose(out["c"], [3.0, 4.0], rtol=1e-6)
    assert float(state.stats.clipped) == 1.0
    one = oc.clip_by_group_norm({"a": "x", "b": "x", "c": None}, {"x": 1.0})
    _, state = one.update(g, one.init(g))
    assert float(state.stats.threshold) == 1.0 and float(state.stats.norm) == 5.0


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((label_of, [1.0]), TypeError, "mapping"),
        ((label_of, {"body": -1.0}), ValueError, "max_norms"),
        (({"embed": "e"}, {"e": 1.0}), ValueError, "prefix"),
    ],
)
def test_group_norm_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        tx = oc.clip_by_group_norm(*args)
        g = group_tree()
        tx.update(g, tx.init(g))


@pytest.mark.parametrize("kind", ["frozen", "fp8_stats"])
def test_masked_leaves_are_left_out_of_the_global_norm(kind):
    # Frozen leaves (zero or stale gradients) and fp8 scaling statistics (amax histories
    # carried in the gradient tree) must neither be clipped nor count in the norm.
    g = {"w": normal(8, 8), "b": normal(8), kind: normal(16, scale=1e4)}
    mask = {"w": True, "b": True, kind: False}
    tx = optax.masked(oc.clip_by_global_norm(1.0), mask)
    out, state = jax.jit(tx.update)(g, tx.init(g))
    np.testing.assert_array_equal(out[kind], g[kind])
    trainable = {"w": g["w"], "b": g["b"]}
    np.testing.assert_allclose(oc.global_norm({"w": out["w"], "b": out["b"]}), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        oc.stats(state)["clip_by_global_norm/norm"], oc.global_norm(trainable), rtol=1e-6
    )


# ---------------------------------------------------------------------------
# One norm per step: guards around a clipped optimizer read each leaf once
# ---------------------------------------------------------------------------

BIG = {"a": (64, 128), "b": (8192,), "c": (32, 256)}  # leaves reduced on their own


def big_tree(scale=1.0):
    return {k: normal(*s, scale=scale) for k, s in BIG.items()}


WRAPPED = {
    "skip_spikes(chain(zclip, adamw))": lambda: oc.skip_spikes(
        optax.chain(oc.zclip(), optax.adamw(1e-3))
    ),
    "skip_nonfinite(chain(clip_by_global_norm, adam))": lambda: oc.skip_nonfinite(
        optax.chain(oc.clip_by_global_norm(1.0), optax.adam(1e-3))
    ),
    "skip_spikes(skip_nonfinite(chain(clip_by_global_norm, adamw)))": lambda: oc.skip_spikes(
        oc.skip_nonfinite(optax.chain(oc.clip_by_global_norm(1.0), optax.adamw(1e-3)))
    ),
    "skip_nonfinite(chain(monitor, zclip, adam))": lambda: oc.skip_nonfinite(
        optax.chain(oc.monitor(per_leaf=True), oc.zclip(), optax.adam(1e-3))
    ),
}


@pytest.mark.parametrize("name", list(WRAPPED))
def test_compiled_update_reads_each_gradient_leaf_once(name):
    tx = WRAPPED[name]()
    g = big_tree()
    state = tx.init(g)
    with jax.numpy_dtype_promotion("standard"):
        lowered = jax.jit(tx.update).lower(g, state, g)
        jaxpr = jax.make_jaxpr(tx.update)(g, state, g)
    # In the compiled HLO: one reduction per gradient leaf on the path every step takes.
    assert reduction_count(lowered.compile().as_text(), {math.prod(s) for s in BIG.values()}) == 3
    # The guards share their norm with the clippers in the jaxpr already (not left to XLA's
    # CSE); monitor's per-leaf sums are separate reductions there, which XLA merges.
    sums = count_top_level_sums(jaxpr.jaxpr, {s for s in BIG.values()})
    assert sums == (6 if "monitor" in name else 3)


CHAINED = {
    "chain(skip_spikes, zclip, adamw)": lambda: optax.chain(
        oc.skip_spikes(window=8, warmup_steps=4), oc.zclip(warmup_steps=2), optax.adamw(1e-3)
    ),
    "chain(skip_nonfinite, clip_by_global_norm, adam)": lambda: optax.chain(
        oc.skip_nonfinite(), oc.clip_by_global_norm(1.0), optax.adam(1e-3)
    ),
    "chain(monitor, clip_by_global_norm, adam)": lambda: optax.chain(
        oc.monitor(), oc.clip_by_global_norm(1.0), optax.adam(1e-3)
    ),
}


@pytest.mark.parametrize("name", list(CHAINED))
def test_guard_chained_before_a_clipper_hands_it_the_norm(name):
    # Without inner, a guard returns the update or zeros and offers their norm to the next
    # transformation of the optax.chain, which does not read the leaves again (it did:
    # chain(skip_spikes, zclip) ran at 2.05x zclip alone); monitor returns what it measured.
    tx = CHAINED[name]()
    g = big_tree()
    with jax.numpy_dtype_promotion("standard"):
        text = update_hlo(tx, g, g)
        jaxpr = jax.make_jaxpr(tx.update)(g, tx.init(g), g)
    assert reduction_count(text, {math.prod(s) for s in BIG.values()}) == 3
    # In the jaxpr already (XLA would merge monitor's norm and the clipper's on its own).
    assert count_top_level_sums(jaxpr.jaxpr, set(BIG.values())) == 3


@pytest.mark.parametrize("guard", ["skip_spikes", "skip_nonfinite"])
def test_norm_handed_on_by_a_guard_equals_the_norm_measured_again(guard):
    # The same two transformations, chained (the clipper gets the guard's norm) and run one
    # after the other on a copy of the guard's output (the clipper measures it): equal
    # updates and statistics, bit for bit, on ordinary, skipped and non-finite steps.
    make = lambda: (
        oc.skip_spikes(window=8, warmup_steps=4) if guard == "skip_spikes" else oc.skip_nonfinite()
    )
    chained = optax.chain(make(), oc.zclip(warmup_steps=2))
    first, second = make(), oc.zclip(warmup_steps=2)
    g = big_tree()
    both, s1, s2 = chained.init(g), first.init(g), second.init(g)
    chained_step = jax.jit(chained.update)

    @jax.jit
    def apart(g, s1, s2):
        out, s1 = first.update(g, s1)
        out = jax.tree.map(lambda x: x + jnp.zeros_like(x), out)  # other arrays: no handover
        out, s2 = second.update(out, s2)
        return out, s1, s2

    steps = [0.9, 1.1, 1.0, 1.05, 0.95, 30.0, 1.0, np.inf, 1.02]  # a spike, a non-finite step
    skipped = 0
    for scale in steps:
        grads = jax.tree.map(lambda x, s=scale: x * s, g)
        got, both = chained_step(grads, both)
        expected, s1, s2 = apart(grads, s1, s2)
        chex.assert_trees_all_equal(got, expected)
        chex.assert_trees_all_equal(oc.stats(both), {**oc.stats(s1), **oc.stats(s2)})
        skipped += int(np.all(np.asarray(got["b"]) == 0))
    assert skipped == (2 if guard == "skip_spikes" else 1)


def test_handed_on_norms_do_not_outlive_their_arrays():
    # The guard's offer is matched by identity through weak references: once its output is
    # freed (the chain's step is over, eager or traced), nothing of it is kept, so no
    # finished trace stays alive through the norm's tracers.
    from optaxclip import _numerics as num

    before = list(getattr(num._OUTPUTS, "entries", []))  # other tests' arrays still alive
    tx = optax.chain(oc.skip_spikes(), oc.zclip())
    g = big_tree()
    state = tx.init(g)
    _, state = tx.update(g, state)
    jax.jit(tx.update)(g, state)
    gc.collect()
    assert [e for e in getattr(num._OUTPUTS, "entries", []) if e not in before] == []


def test_a_script_that_ends_after_a_guard_exits_quietly():
    # The arrays a guard's output norm is matched by are freed at interpreter exit, after
    # the modules' globals; the weak-reference callback then printed "Exception ignored".
    code = (
        "import jax.numpy as jnp, optaxclip as oc\n"
        "tx = oc.skip_nonfinite()\n"
        "g = {'w': jnp.ones(3)}\n"
        "out = tx.update(g, tx.init(g))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def count_top_level_sums(jaxpr, shapes) -> int:
    """reduce_sum equations over a gradient-leaf-shaped operand, outside cond branches and
    while loops (inside the guards, the norms' loops hold only the rescue trip)."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "reduce_sum" and tuple(eqn.invars[0].aval.shape) in shapes:
            count += 1
        if eqn.primitive.name in ("cond", "while"):
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += count_top_level_sums(inner, shapes)
    return count


def test_skip_decision_uses_the_pre_clip_norm():
    tx = oc.skip_spikes(
        optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(1.0)), window=8, warmup_steps=4
    )
    state = tx.init({"w": jnp.zeros(4)})
    for v in [2.0, 2.1, 1.9, 2.0, 2.05]:  # every step clipped to norm 1
        _, state = tx.update({"w": jnp.full(4, v / 2)}, state)
    updates, state = tx.update({"w": jnp.full(4, 50.0)}, state)  # clipped to 1, but a spike
    np.testing.assert_array_equal(updates["w"], 0.0)
    s = oc.stats(state)
    assert int(s["skip_spikes/num_clipped"]) == 1
    assert float(s["skip_spikes/norm"]) == pytest.approx(100.0)
    assert int(s["clip_by_global_norm/count"]) == 5  # the skipped step left it untouched


def test_shared_norm_is_not_reused_for_a_changed_update():
    # Inside a guard, a clipper placed after another transformation measures its own input.
    tx = oc.skip_nonfinite(optax.chain(optax.scale(10.0), oc.clip_by_global_norm(1e6)))
    g = {"w": jnp.array([3.0, 4.0])}
    _, state = tx.update(g, tx.init(g))
    s = oc.stats(state)
    assert float(s["skip_nonfinite/norm"]) == 5.0
    assert float(s["clip_by_global_norm/norm"]) == 50.0


# ---------------------------------------------------------------------------
# Loss scaling (float16): unscale, clip, skip on overflow
# ---------------------------------------------------------------------------


def test_dynamic_loss_scaling_recipe():
    """The README recipe: float16 gradients of a scaled loss, unscaled in float32."""
    params = {"w": jnp.asarray(normal(8) * 0.1, jnp.float16)}
    x = normal(32, 8)
    y = normal(32)
    tx = oc.skip_nonfinite(optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1)))
    state = tx.init(params)

    def scaled_loss(p, scale):
        pred = x.astype(jnp.float16) @ p["w"]
        return jnp.mean((pred.astype(jnp.float32) - y) ** 2) * scale

    @jax.jit
    def step(params, state, scale, good_steps):
        grads = jax.grad(scaled_loss)(params, scale)  # float16 gradients, may overflow
        grads = jax.tree.map(lambda g: g.astype(jnp.float32) / scale, grads)  # unscale
        before = oc.stats(state)["skip_nonfinite/num_nonfinite"]
        updates, state = tx.update(grads, state, params)  # clip, then skip if not finite
        overflow = oc.stats(state)["skip_nonfinite/num_nonfinite"] > before
        params = jax.tree.map(lambda p, u: p + u.astype(p.dtype), params, updates)
        grow = ~overflow & (good_steps + 1 >= 4)
        scale = jnp.where(overflow, scale / 2, jnp.where(grow, scale * 2, scale))
        good_steps = jnp.where(overflow | grow, 0, good_steps + 1)
        return params, state, scale, good_steps, overflow

    scale, good = jnp.float32(2.0**20), jnp.int32(0)  # starts far too high: float16 overflows
    overflows = []
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(20):
            params, state, scale, good, overflow = step(params, state, scale, good)
            overflows.append(bool(overflow))
    s = oc.stats(state)
    assert overflows[0] and not all(overflows)  # overflowed, then recovered
    assert int(s["skip_nonfinite/num_nonfinite"]) == sum(overflows)
    # No double counting: the clipper never saw the skipped steps' state changes.
    assert int(s["clip_by_global_norm/num_nonfinite"]) == 0
    assert int(s["clip_by_global_norm/count"]) == 20 - sum(overflows)
    assert params["w"].dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(params["w"])))


# ---------------------------------------------------------------------------
# Per-layer metrics
# ---------------------------------------------------------------------------


def test_monitor_per_leaf_norms_by_path_and_free_when_off():
    g = {"enc": {"kernel": normal(4, 3), "bias": normal(3)}, "out": normal(3)}
    tx = oc.monitor(per_leaf=True)
    _, state = jax.jit(tx.update)(g, tx.init(g))
    s = oc.stats(state)
    for path, x in [
        ("enc/kernel", g["enc"]["kernel"]),
        ("enc/bias", g["enc"]["bias"]),
        ("out", g["out"]),
    ]:
        np.testing.assert_allclose(s[f"monitor/{path}"], jnp.linalg.norm(x), rtol=1e-6)
    off = oc.monitor()
    state = off.init(g)
    assert state.leaf_norms is None and len(jax.tree.leaves(state)) == 2
    updates, state = off.update(g, state)
    assert updates is g  # the very same update, so a clipper after it can share its norm
    assert set(oc.stats(state)) == {"monitor/norm", "monitor/count"}


def test_monitor_inside_nnx_optimizer_uses_model_paths():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(
        model, optax.chain(oc.monitor(per_leaf=True), optax.sgd(0.1)), wrt=nnx.Param
    )
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 3))) ** 2))(model)
    opt.update(model, grads)
    s = oc.stats(opt)
    assert {"monitor/kernel", "monitor/bias", "monitor/norm"} <= set(s)


# ---------------------------------------------------------------------------
# Gradient accumulation
# ---------------------------------------------------------------------------


def test_clip_inside_multisteps_clips_the_accumulated_gradient_once():
    micro = [{"w": jnp.array([3.0, 0.0])}, {"w": jnp.array([0.0, 4.0])}]  # mean (1.5, 2)
    inside = optax.MultiSteps(optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(1.0)), 2)
    state = inside.init({"w": jnp.zeros(2)})
    with jax.numpy_dtype_promotion("standard"):
        for g in micro:
            updates, state = inside.update(g, state, {"w": jnp.zeros(2)})
    np.testing.assert_allclose(updates["w"], [-0.6, -0.8], rtol=1e-6)  # clip(mean), norm 2.5
    s = oc.stats(state)
    assert int(s["clip_by_global_norm/count"]) == 1
    assert float(s["clip_by_global_norm/norm"]) == 2.5


def test_clip_outside_multisteps_clips_every_micro_batch():
    micro = [{"w": jnp.array([3.0, 0.0])}, {"w": jnp.array([0.0, 4.0])}]
    outside = optax.chain(
        oc.clip_by_global_norm(1.0), optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2)
    )
    state = outside.init({"w": jnp.zeros(2)})
    with jax.numpy_dtype_promotion("standard"):
        for g in micro:
            updates, state = outside.update(g, state, {"w": jnp.zeros(2)})
    np.testing.assert_allclose(updates["w"], [-0.5, -0.5], rtol=1e-6)  # mean of clipped
    assert int(oc.stats(state)["clip_by_global_norm/count"]) == 2
