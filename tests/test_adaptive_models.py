"""The adaptive clippers against independent float64 numpy models, step by step.

The models (``adaptive_models.py``) follow the published rules and the reference code, with
the deviations listed in the optaxclip spec. Every stream is fed to the jitted ``update`` and
to the model; each step compares every output leaf and the ``ClipStats`` record.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import numpy as np
import pytest
from adaptive_models import (
    LEAF_SHAPES,
    MODELS,
    SPIKE,
    STREAMS,
    StepInfo,
    boundary_stream,
    global_norm,
    leaf_norm,
    make_stream,
)

import optaxclip as oc

RTOL = 1e-4  # float32 state and norms against a float64 model
ATOL_REL = 1e-7  # absolute tolerance of an output entry, relative to its expected leaf norm
SKETCH_RTOL = 1e-2  # autoclip(window=None): a 1% log-spaced sketch of the whole history


# ---------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------


def _config(method, case_id, **kwargs):
    name = f"{method}-{case_id}"
    return pytest.param(method, kwargs, name, id=name)


CONFIGS = [
    *(
        _config("autoclip", f"p{p:g}-window_{w}", percentile=p, window=w)
        for w in (None, 10)
        for p in (10.0, 50.0, 0.0, 100.0)
    ),
    _config("zclip", "default"),
    _config("zclip", "warmup_5", warmup_steps=5),
    _config("zclip", "percentile_mode", mode="percentile", max_norm=None, warmup_steps=5),
    _config("zclip", "percentile_mode_capped", mode="percentile", max_norm=0.5, warmup_steps=5),
    _config("zclip", "zscore_capped", max_norm=0.4, warmup_steps=5),
    _config("zclip", "mean_option", clip_option="mean", max_norm=None),
    _config("zclip", "clip_factor_0.8", clip_factor=0.8, max_norm=5.0),
    _config(
        "zclip", "clip_factor_1.5", clip_factor=1.5, z_thresh=1.5, max_norm=None, warmup_steps=5
    ),
    _config("zclip", "max_norm_none", max_norm=None, alpha=0.9, z_thresh=2.0),
    _config("zclip", "skip_on_spike", skip_update_on_spike=True, max_norm=None, warmup_steps=5),
    _config(
        "zclip",
        "skip_on_spike_percentile",
        mode="percentile",
        skip_update_on_spike=True,
        max_norm=2.0,
        warmup_steps=10,
    ),
    _config("adagc", "default"),
    _config(
        "adagc",
        "warmup_5_clips_in_warmup",
        max_norm=0.3,
        warmup_steps=5,
        clip_ratio=1.3,
        beta=0.9,
    ),
    _config("adagc", "warmup_0", warmup_steps=0),
    _config("adagc", "ratio_1.5_beta_0.9", clip_ratio=1.5, beta=0.9, warmup_steps=10),
    _config("spike_aware_clip", "default"),
    _config("spike_aware_clip", "warmup_3_threshold_4", threshold=4.0, b2=0.9, warmup_steps=3),
    _config("spike_aware_clip", "warmup_2_threshold_20", threshold=20.0, b2=0.99, warmup_steps=2),
    _config("quantile_clip", "default"),
    _config("quantile_clip", "target_0.9", target_quantile=0.9),
    _config("quantile_clip", "target_0.5_lr_0.5", initial_norm=1.0, learning_rate=0.5),
]

# (config id, stream) pairs where the model legitimately never clips; everywhere else it
# must clip on some steps and not on others, so the comparison exercises both branches.
NEVER_CLIPS = {
    *((f"autoclip-p100-window_{w}", s) for w in (None, 10) for s in STREAMS),
    ("spike_aware_clip-default", "ordinary"),
    ("spike_aware_clip-default", "drift"),
    ("spike_aware_clip-default", "zero_leaf"),
}


def _key(kwargs: dict) -> tuple:
    return tuple(sorted(kwargs.items()))


@functools.cache
def _jitted(method: str, key: tuple):
    """The transform and its jitted update, compiled once per configuration."""
    tx = getattr(oc, method)(**dict(key))
    return tx, jax.jit(tx.update)


def _tree(leaves) -> dict:
    return dict(zip(LEAF_SHAPES, leaves))


def _run(method: str, kwargs: dict, stream):
    """Outputs (numpy leaves) and stats (numpy scalars) of the jitted update, step by step."""
    tx, update = _jitted(method, _key(kwargs))
    state = tx.init(_tree(stream[0]))
    outs, stats = [], []
    for leaves in stream:
        out, state = update(_tree(leaves), state)
        out, s = jax.device_get((out, oc.stats(state)))
        outs.append(jax.tree.leaves(out))
        stats.append({k.split("/", 1)[1]: v for k, v in s.items() if k.startswith(method + "/")})
    return outs, stats, state


# ---------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------


def _close(got, want, rtol, atol=0.0) -> bool:
    """``np.allclose`` with NaN == NaN (a fast path for scalars)."""
    if np.ndim(got) == 0 and np.ndim(want) == 0:
        got, want = float(got), float(want)
        if math.isnan(got) or math.isnan(want):
            return math.isnan(got) and math.isnan(want)
        if math.isinf(got) or math.isinf(want):
            return got == want
        return abs(got - want) <= atol + rtol * abs(want)
    return bool(np.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True))


def _fail(where: str, what: str, got, want):
    raise AssertionError(f"{where}: {what}: got {got!r}, expected {want!r}")


def _check_leaves(where, got_leaves, want_leaves):
    for name, got, want in zip(LEAF_SHAPES, got_leaves, want_leaves):
        assert got.dtype == np.float32, (where, name, got.dtype)
        if not _close(got, want, RTOL, ATOL_REL * leaf_norm(want)):
            err = np.max(np.abs(got.astype(np.float64) - want))
            _fail(where, f"leaf {name!r} (max abs err {err:.3g})", got, want)


def _is_sketch(method: str, kwargs: dict) -> bool:
    """autoclip over the whole history at a percentile other than 0 or 100 (approximate)."""
    return (
        method == "autoclip"
        and kwargs.get("window") is None
        and kwargs.get("percentile", 10.0) not in (0.0, 100.0)
    )


def _compare_stream(method: str, kwargs: dict, stream, where: str) -> list[StepInfo]:
    """Feeds ``stream`` to the transform and the model; asserts agreement at every step."""
    outs, stats, _ = _run(method, kwargs, stream)
    model = MODELS[method](**kwargs)
    sketch = _is_sketch(method, kwargs)
    thr_rtol = SKETCH_RTOL if sketch else RTOL
    infos, num_clipped, num_nonfinite = [], 0, 0
    for t, (leaves, got, s) in enumerate(zip(stream, outs, stats), start=1):
        at = f"{where} step {t}"
        want, info = model.step(leaves)
        infos.append(info)
        if info.nonfinite:
            num_nonfinite += 1
            for name, g, x in zip(LEAF_SHAPES, got, leaves):
                np.testing.assert_array_equal(g, x, err_msg=f"{at}: leaf {name!r} not passed")
            if method == "autoclip" and not _close(s["threshold"], info.threshold, thr_rtol):
                _fail(at, "threshold on a non-finite step", s["threshold"], info.threshold)
        else:
            if not _close(s["norm"], info.norm, RTOL):
                _fail(at, "norm", s["norm"], info.norm)
            if not _close(s["threshold"], info.threshold, thr_rtol):
                _fail(at, "threshold", s["threshold"], info.threshold)
            if sketch:
                # Clipped against its own (approximate) threshold; the same decision as the
                # exact model whenever the norm is clearly on one side of the threshold.
                thr, norm = float(s["threshold"]), float(s["norm"])
                factor = thr / norm if norm > thr else 1.0
                if abs(info.norm - info.threshold) > 2 * SKETCH_RTOL * info.threshold:
                    if (norm > thr) != info.any_clipped:
                        _fail(at, "clip decision (norm, thr)", (norm, thr), info)
                want = [x.astype(np.float64) * factor for x in leaves]
                info = StepInfo(info.norm, thr, factor, float(norm > thr), False)
            _check_leaves(at, got, want)
            if not _close(s["scale"], info.scale, RTOL):
                _fail(at, "scale", s["scale"], info.scale)
            if not _close(s["clipped"], info.clipped, 0.0, 1e-6):
                _fail(at, "clipped fraction", s["clipped"], info.clipped)
            num_clipped += info.any_clipped
        counts = (int(s["count"]), int(s["num_clipped"]), int(s["num_nonfinite"]))
        if counts != (t, num_clipped, num_nonfinite):
            _fail(
                at, "(count, num_clipped, num_nonfinite)", counts, (t, num_clipped, num_nonfinite)
            )
    return infos


@pytest.mark.parametrize("stream_kind", STREAMS)
@pytest.mark.parametrize(("method", "kwargs", "config_id"), CONFIGS)
def test_transform_matches_model_on_stream(method, kwargs, config_id, stream_kind):
    infos = _compare_stream(method, kwargs, make_stream(stream_kind), f"{config_id}/{stream_kind}")
    clipped = [i.any_clipped for i in infos if not i.nonfinite]
    if (config_id, stream_kind) in NEVER_CLIPS:
        assert not any(clipped)
    else:
        assert 0 < sum(clipped) < len(clipped), (config_id, stream_kind, sum(clipped))


# ---------------------------------------------------------------------------
# Non-finite steps leave the state untouched
# ---------------------------------------------------------------------------

SMALL_CONFIGS = [
    _config("autoclip", "window_4", window=4),
    _config("autoclip", "whole_history"),
    _config("zclip", "warmup_3", warmup_steps=3),
    _config("adagc", "warmup_3", warmup_steps=3),
    _config("spike_aware_clip", "warmup_3", warmup_steps=3),
    _config("quantile_clip", "default"),
]


@pytest.mark.parametrize("before", [2, 6], ids=["in_warmup", "after_warmup"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("method", "kwargs", "config_id"), SMALL_CONFIGS)
def test_nonfinite_step_passes_through_and_freezes_state(method, kwargs, config_id, bad, before):
    stream = boundary_stream(before + 1)
    stream[-1][1][1, 2] = bad
    tx, update = _jitted(method, _key(kwargs))
    state = tx.init(_tree(stream[0]))
    for leaves in stream[:-1]:
        _, state = update(_tree(leaves), state)
    out, new_state = update(_tree(stream[-1]), state)
    chex.assert_trees_all_equal(out, _tree(stream[-1]))
    fields = lambda st: {k: v for k, v in st._asdict().items() if k != "stats"}
    chex.assert_trees_all_equal(fields(new_state), fields(state))
    old, new = oc.stats(state), oc.stats(new_state)
    assert int(new[f"{method}/count"]) == before + 1
    assert int(new[f"{method}/num_nonfinite"]) == int(old[f"{method}/num_nonfinite"]) + 1
    assert int(new[f"{method}/num_clipped"]) == int(old[f"{method}/num_clipped"])


# ---------------------------------------------------------------------------
# Warm-up boundaries (1-based steps)
# ---------------------------------------------------------------------------

W = 5

# (nan_at, spike_at, adaptive): a NaN step in warm-up does not count, so it shifts the boundary.
BOUNDARY_CASES = [
    pytest.param(None, W, False, id="spike_at_W"),
    pytest.param(None, W + 1, True, id="spike_at_W+1"),
    pytest.param(2, W + 1, False, id="nan_then_spike_at_W+1"),
    pytest.param(2, W + 2, True, id="nan_then_spike_at_W+2"),
]


def _finite_before(stream, t):
    """The finite steps strictly before 1-based step ``t``."""
    return [s for s in stream[: t - 1] if all(np.isfinite(x).all() for x in s)]


@pytest.mark.parametrize("max_norm", [None, 1.0])
@pytest.mark.parametrize(("nan_at", "spike_at", "adaptive"), BOUNDARY_CASES)
def test_zclip_first_z_clipped_step_is_warmup_plus_one(nan_at, spike_at, adaptive, max_norm):
    stream = boundary_stream(spike_at + 2, nan_at=nan_at, spike_at=spike_at)
    outs, stats, _ = _run("zclip", {"warmup_steps": W, "max_norm": max_norm}, stream)
    cap = math.inf if max_norm is None else max_norm
    for t in range(1, spike_at):  # nothing but the fixed cap before the spike
        n = global_norm(stream[t - 1])
        if math.isfinite(n):
            want = [x * (min(cap, n) / n) for x in stream[t - 1]]
            _check_leaves(f"step {t}", outs[t - 1], want)
    n = global_norm(stream[spike_at - 1])
    if adaptive:
        norms = [global_norm(s) for s in _finite_before(stream, spike_at)]
        assert len(norms) == W
        mean, std = np.mean(norms), np.std(norms)
        z = (n - mean) / (std + 1e-6)
        assert z > 2.5
        expected = min(mean + 2.5**2 * std / z, cap)
    else:
        expected = min(n, cap)
    got = global_norm(outs[spike_at - 1])
    assert math.isclose(got, expected, rel_tol=RTOL), (got, expected, n)
    thr = float(stats[spike_at - 1]["threshold"])
    assert math.isclose(thr, expected if adaptive else cap, rel_tol=RTOL), thr


@pytest.mark.parametrize("max_norm", [1e3, 0.3], ids=["no_global_clip", "global_clip"])
@pytest.mark.parametrize(("nan_at", "spike_at", "per_tensor"), BOUNDARY_CASES)
def test_adagc_first_per_tensor_step_is_warmup_plus_one(nan_at, spike_at, per_tensor, max_norm):
    kernel = list(LEAF_SHAPES).index("kernel")
    stream = boundary_stream(spike_at + 1, nan_at=nan_at, spike_at=spike_at, spike_leaves=[kernel])
    outs, stats, _ = _run("adagc", {"warmup_steps": W, "max_norm": max_norm}, stream)
    g = stream[spike_at - 1]
    n = global_norm(g)
    if per_tensor:
        warm = _finite_before(stream, spike_at)
        assert len(warm) == W
        clipped = [[x * min(1.0, max_norm / global_norm(s)) for x in s] for s in warm]
        gammas = [min(leaf_norm(s[i]) for s in clipped) for i in range(len(LEAF_SHAPES))]
        want = [x * min(1.0, 1.04 * gam / leaf_norm(x)) for x, gam in zip(g, gammas)]
        assert leaf_norm(want[kernel]) < leaf_norm(g[kernel])  # the spiking leaf is clipped
        assert math.isnan(stats[spike_at - 1]["threshold"])
    else:
        want = [x * min(1.0, max_norm / n) for x in g]  # one factor for every leaf
        assert float(stats[spike_at - 1]["threshold"]) == float(np.float32(max_norm))
    _check_leaves(f"step {spike_at}", outs[spike_at - 1], want)


def _constant_magnitude_stream(length, c, nan_at, spike_at, seed=0):
    rng = np.random.default_rng(seed)
    stream = [
        [np.where(rng.random(s) < 0.5, -c, c).astype(np.float32) for s in LEAF_SHAPES.values()]
        for _ in range(length)
    ]
    if nan_at is not None:
        stream[nan_at - 1][0][0] = np.nan
    stream[spike_at - 1] = [x * np.float32(SPIKE) for x in stream[spike_at - 1]]
    return stream


# (nan_at, spike_at, active): with warmup_steps=W, the W-th finite step is the first active one.
SPAM_W = 3
SPAM_CASES = [
    pytest.param(None, SPAM_W - 1, False, id="spike_at_W-1"),
    pytest.param(None, SPAM_W, True, id="spike_at_W"),
    pytest.param(1, SPAM_W, False, id="nan_then_spike_at_W"),
    pytest.param(1, SPAM_W + 1, True, id="nan_then_spike_at_W+1"),
]


@pytest.mark.parametrize(("nan_at", "spike_at", "active"), SPAM_CASES)
def test_spike_aware_clip_first_active_step_is_warmup_steps(nan_at, spike_at, active):
    c, b2, theta = 0.1, 0.999, 5000.0
    stream = _constant_magnitude_stream(spike_at + 1, c, nan_at, spike_at)
    outs, _, _ = _run("spike_aware_clip", {"warmup_steps": SPAM_W}, stream)
    g = stream[spike_at - 1]
    if active:
        k = len(_finite_before(stream, spike_at))  # v = c^2 (1 - b2^k) after k steps of c^2
        assert k == SPAM_W - 1
        limit = math.sqrt(theta * c**2 * (1 - b2**k))
        assert limit < SPIKE * c
        want = [np.sign(x) * limit for x in g]
    else:
        want = g
    _check_leaves(f"step {spike_at}", outs[spike_at - 1], want)
    # The step after the spike is ordinary: |g|^2 = c^2 < theta * v, never clipped.
    _check_leaves(f"step {spike_at + 1}", outs[spike_at], stream[spike_at])


# ---------------------------------------------------------------------------
# Small hand-computed cases
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 3])
def test_autoclip_clips_to_median_of_hand_history(window):
    # Norms 5, 10, 1, 20. Whole history: medians 5, 7.5, 5, 7.5; last 3: 5, 7.5, 5, 10.
    steps = [[3.0, 4.0], [6.0, 8.0], [0.6, 0.8], [12.0, 16.0]]
    expected_thr = [5.0, 7.5, 5.0, 7.5] if window is None else [5.0, 7.5, 5.0, 10.0]
    tx = oc.autoclip(50.0, window=window)
    update = jax.jit(tx.update)
    state = tx.init({"w": np.zeros(2, np.float32)})
    for step, thr in zip(steps, expected_thr):
        g = np.array(step, np.float32)
        out, state = update({"w": g}, state)
        n = float(np.linalg.norm(np.float64(g)))
        got_thr = float(oc.stats(state)["autoclip/threshold"])
        assert math.isclose(got_thr, thr, rel_tol=RTOL if window else SKETCH_RTOL), got_thr
        want = g * (got_thr / n if n > got_thr else 1.0)
        np.testing.assert_allclose(np.asarray(out["w"]), want, rtol=RTOL)


@pytest.mark.parametrize("window", [None, 10])
def test_autoclip_first_step_threshold_is_its_norm_exactly(window):
    tx = oc.autoclip(10.0, window=window)
    g = {"w": np.array([0.3, -0.4, 1.2], np.float32)}
    out, state = jax.jit(tx.update)(g, tx.init(g))
    s = oc.stats(state)
    assert float(s["autoclip/threshold"]) == float(s["autoclip/norm"])
    chex.assert_trees_all_equal(out, g)
    assert int(s["autoclip/num_clipped"]) == 0


def test_autoclip_nonfinite_first_step_reports_inf_threshold():
    tx = oc.autoclip(10.0)
    g = {"w": np.array([0.3, np.nan, 1.2], np.float32)}
    _, state = jax.jit(tx.update)(g, tx.init(g))
    s = oc.stats(state)
    assert float(s["autoclip/threshold"]) == math.inf
    assert (int(s["autoclip/count"]), int(s["autoclip/num_nonfinite"])) == (1, 1)


def test_quantile_clip_hand_computed_geometric_update():
    # C = 1: norm 5 > C, clipped to 1, b = 0 -> C = exp(0.2 * 0.5); norm 0.5 <= C: b = 1.
    tx = oc.quantile_clip(1.0)
    update = jax.jit(tx.update)
    state = tx.init({"w": np.zeros(2, np.float32)})
    out, state = update({"w": np.array([3.0, 4.0], np.float32)}, state)
    np.testing.assert_allclose(np.asarray(out["w"]), [0.6, 0.8], rtol=1e-6)
    out, state = update({"w": np.array([0.3, 0.4], np.float32)}, state)
    np.testing.assert_allclose(np.asarray(out["w"]), [0.3, 0.4], rtol=1e-6)
    assert math.isclose(
        float(oc.stats(state)["quantile_clip/threshold"]), math.exp(0.1), rel_tol=1e-6
    )
    _, state = update({"w": np.array([0.3, 0.4], np.float32)}, state)
    assert math.isclose(float(oc.stats(state)["quantile_clip/threshold"]), 1.0, rel_tol=1e-6)


def test_quantile_clip_norm_equal_to_c_counts_as_unclipped():
    # ||[0.5]|| == C == 0.5 exactly: not clipped and b = 1, so C shrinks to 0.5 * exp(-0.1).
    tx = oc.quantile_clip(0.5)
    update = jax.jit(tx.update)
    g = {"w": np.array([0.5], np.float32)}
    out, state = update(g, tx.init(g))
    chex.assert_trees_all_equal(out, g)
    assert int(oc.stats(state)["quantile_clip/num_clipped"]) == 0
    _, state = update(g, state)
    got = float(oc.stats(state)["quantile_clip/threshold"])
    assert math.isclose(got, 0.5 * math.exp(-0.1), rel_tol=1e-6), got


# ---------------------------------------------------------------------------
# ZClip: mode and clip_option names
# ---------------------------------------------------------------------------


def test_zclip_mode_and_clip_option_are_case_insensitive():
    stream = make_stream("spikes")
    lower = {"mode": "zscore", "clip_option": "mean", "warmup_steps": 5, "max_norm": None}
    upper = {"mode": "ZScore", "clip_option": "MEAN", "warmup_steps": 5, "max_norm": None}
    got, _, _ = _run("zclip", upper, stream)
    want, _, _ = _run("zclip", lower, stream)
    chex.assert_trees_all_equal(got, want)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"mode": "sigma"}, "mode"), ({"clip_option": "median"}, "clip_option")],
    ids=["mode", "clip_option"],
)
def test_zclip_rejects_unknown_mode_or_clip_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        oc.zclip(**kwargs)


# ---------------------------------------------------------------------------
# AutoClip over the whole history: accuracy of the O(1) sketch on 10^5 steps
# ---------------------------------------------------------------------------

LONG = 100_000
CHECKPOINTS = (10, 1_000, 10_000, LONG)


def _long_stream(kind: str) -> np.ndarray:
    rng = np.random.default_rng(["lognormal", "pareto", "drift"].index(kind))
    if kind == "lognormal":
        x = rng.lognormal(0.0, 2.0, LONG)
    elif kind == "pareto":
        x = rng.pareto(1.5, LONG) + 1.0  # Pareto with x_m = 1, alpha = 1.5
    else:
        x = np.geomspace(1e-3, 1e3, LONG) * rng.lognormal(0.0, 0.1, LONG)
    return x.astype(np.float32)


@functools.cache
def _scan_autoclip(percentile: float):
    """Jitted: the whole stream through ``lax.scan``; thresholds of every step, last state."""
    tx = oc.autoclip(percentile)

    def run(xs):
        def body(state, x):
            _, state = tx.update(x, state)
            return state, oc.stats(state)["autoclip/threshold"]

        return jax.lax.scan(body, tx.init(xs[0]), xs)

    return tx, jax.jit(run)


def _nbytes(state) -> int:
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))


@pytest.mark.slow
@pytest.mark.parametrize("percentile", [1.0, 10.0, 50.0, 90.0])
@pytest.mark.parametrize("kind", ["lognormal", "pareto", "drift"])
def test_autoclip_whole_history_within_one_percent_on_long_stream(kind, percentile):
    xs = _long_stream(kind)
    tx, run = _scan_autoclip(percentile)
    final_state, thresholds = run(xs)
    thresholds = np.asarray(thresholds)
    history = xs.astype(np.float64)
    for t in CHECKPOINTS:
        exact = np.percentile(history[:t], percentile)
        rel = abs(float(thresholds[t - 1]) - exact) / exact
        assert rel <= SKETCH_RTOL, (t, float(thresholds[t - 1]), exact, rel)
    # O(1) state: the same bytes at init, after 10 steps and after 10^5 steps.
    update = jax.jit(tx.update)
    state = tx.init(xs[0])
    init_bytes = _nbytes(state)
    for x in xs[:10]:
        _, state = update(x, state)
    assert _nbytes(state) == init_bytes == _nbytes(final_state)
