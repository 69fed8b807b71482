"""Adaptive global-norm clipping: the threshold follows the history of gradient norms.

References: Seetharaman, Wichern, Pardo & Le Roux 2020 (AutoClip); Kumar, Owen, Roy
Chowdhury & Güra 2025 (ZClip); Andrew, Thakkar, McMahan & Ramaswamy 2021 (quantile-based
adaptive clipping).

All three share one step: the global L2 norm ``n`` of the update, a threshold from the
state, a scale of ``threshold / n`` iff ``n > threshold`` (no epsilon), then the state update.
A norm that is not a finite float32 (a NaN or infinite entry, or entries so large the norm
exceeds float32's range) never enters the state: the update passes through (or, for a finite
but huge norm, is clipped against the current threshold) and the state is left as it was.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _numerics as num
from optaxclip._stats import ClipStats, init_stats, named_state, next_stats
from optaxclip._tree import (
    check_in_range,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_threshold,
)

_F32 = np.float32


_f32 = num.as_f32


class _Step(NamedTuple):
    """What the shared global-norm step computed."""

    norm: num.Norm
    value: jax.Array  # the norm as a float32
    ok: jax.Array  # the norm may enter the statistics (a finite float32)
    usable: jax.Array  # the norm where ok, else float32's max (what a huge norm would get)


def _measure(updates: Any, axis_name: Any, partition_specs: Any) -> _Step:
    norm = num.global_pair(updates, 2, axis_name=axis_name, partition_specs=partition_specs)
    value = _f32(norm.value)
    ok = norm.finite & jnp.isfinite(value)
    return _Step(norm, value, ok, jnp.where(ok, value, jnp.finfo(_F32).max))


def _clip(updates: Any, step: _Step, limit: jax.Array, prev: ClipStats, reported: Any = None):
    """Scales ``updates`` to global norm ``limit`` iff the norm exceeds it; the new stats.

    ``reported`` is the threshold to record, when it differs from ``limit`` without changing
    the outcome (``limit`` by default).
    """
    p, q, clipped = num.global_factors(step.norm, limit)
    updates = jax.tree.map(lambda x: num.scale_leaf(jnp.asarray(x), p, q), updates)
    stats = next_stats(
        prev,
        norm=step.value,
        threshold=limit if reported is None else reported,
        scale=p * q,
        clipped=clipped,
        any_clipped=clipped,
        nonfinite=~step.norm.finite,
    )
    return updates, stats


def _keep(ok: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``ok``, else ``old``, leaf by leaf."""
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


# ---------------------------------------------------------------------------
# AutoClip
# ---------------------------------------------------------------------------

# The whole-history sketch: a histogram over log2 of the norm with _BINS_PER_OCTAVE bins per
# octave across float32's normal range, plus exact counts of zero norms and the exact
# smallest positive and largest norm. Reading a value off a bin by its geometric centre is
# off by at most 2**(1 / (2 * 40)) - 1 = 0.87% relative; interpolating between two such
# values keeps that bound.
_BINS_PER_OCTAVE = 40
_LOG2_LOW = -126  # float32's smallest normal exponent
_LOG2_HIGH = 128
_NUM_BINS = (_LOG2_HIGH - _LOG2_LOW) * _BINS_PER_OCTAVE
SKETCH_RELATIVE_ERROR = 2.0 ** (1 / (2 * _BINS_PER_OCTAVE)) - 1


@named_state("autoclip")
class AutoClipState(NamedTuple):
    """State of :func:`autoclip`.

    With ``window=N``: ``history`` is a ring of the last N finite norms (N float32),
    ``size`` how many are valid, ``head`` the next slot. With ``window=None``: ``history``
    is a cumulative histogram over log-spaced bins (``history[i]`` counts the positive norms
    in bins ``<= i``, so a percentile is one binary search; 10,160 int32, 40 KiB, whatever
    the number of steps), ``size`` the number of norms seen, ``head`` the number of zero
    norms, and ``low``/``high`` the smallest positive and the largest norm seen.
    """

    stats: ClipStats
    history: jax.Array
    size: jax.Array
    head: jax.Array
    low: jax.Array
    high: jax.Array


def _interpolate(value_at, k: jax.Array, percentile: jax.Array) -> jax.Array:
    """numpy's ``linear`` percentile of k sorted values read through ``value_at(rank)``."""
    h = percentile / 100 * (k - 1).astype(_F32)
    i0 = jnp.clip(jnp.floor(h).astype(np.int32), 0, jnp.maximum(k - 1, 0))
    i1 = jnp.minimum(i0 + 1, jnp.maximum(k - 1, 0))
    frac = jnp.clip(h - i0.astype(_F32), 0, 1)
    v0, v1 = value_at(i0), value_at(i1)
    value = jnp.where(frac > 0, v0 + frac * (v1 - v0), v0)
    return jnp.where(k > 0, value, jnp.inf)


def _window_add(state: AutoClipState, x: jax.Array, window: int) -> AutoClipState:
    return state._replace(
        history=state.history.at[state.head].set(x),
        size=jnp.minimum(state.size + 1, window),
        head=(state.head + 1) % window,
    )


def _window_percentile(state: AutoClipState, percentile: jax.Array) -> jax.Array:
    valid = jnp.arange(state.history.shape[0]) < state.size
    ordered = jnp.sort(jnp.where(valid, state.history, jnp.inf))
    return _interpolate(lambda i: ordered[i], state.size, percentile)


def _bin_of(x: jax.Array) -> jax.Array:
    position = (jnp.log2(jnp.maximum(x, jnp.finfo(_F32).tiny)) - _LOG2_LOW) * _BINS_PER_OCTAVE
    return jnp.clip(jnp.floor(position), 0, _NUM_BINS - 1).astype(np.int32)


def _sketch_add(state: AutoClipState, x: jax.Array) -> AutoClipState:
    positive = x > 0
    at_or_above = jnp.arange(_NUM_BINS, dtype=np.int32) >= _bin_of(x)
    return state._replace(
        history=state.history + (at_or_above & positive).astype(np.int32),
        size=state.size + 1,
        head=state.head + (~positive).astype(np.int32),
        low=jnp.where(positive, jnp.minimum(state.low, x), state.low),
        high=jnp.maximum(state.high, x),
    )


def _sketch_percentile(state: AutoClipState, percentile: jax.Array) -> jax.Array:
    zeros, k = state.head, state.size

    def value_at(rank):
        b = jnp.searchsorted(state.history, rank - zeros, side="right")
        centre = jnp.exp2((b.astype(_F32) + 0.5) / _BINS_PER_OCTAVE + _LOG2_LOW)
        value = jnp.clip(centre, state.low, state.high)
        value = jnp.where(rank == zeros, state.low, value)  # the smallest positive: exact
        value = jnp.where(rank == k - 1, state.high, value)  # the largest: exact
        return jnp.where(rank < zeros, 0.0, value)

    return _interpolate(value_at, k, percentile)


def autoclip(
    percentile: Any = 10.0,
    *,
    window: int | None = None,
    axis_name: num.AxisName = None,
    partition_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AutoClip: clips to the p-th percentile of all gradient norms seen so far.

    With :math:`H_t = \{n_1, \dots, n_t\}` the global norms of every step so far, the
    current one included:

    .. math::
        c_t = \operatorname{percentile}(H_t, p), \qquad
        u \leftarrow u \cdot \min\!\Big(1, \frac{c_t}{n_t}\Big),
        \qquad p = \texttt{percentile}

    with numpy's default linear interpolation between order statistics. The history holds
    the unclipped norms. On the first step :math:`c_1 = n_1`, so nothing is clipped; the
    threshold then moves only as fast as the percentile allows. ``percentile=100`` never
    clips; ``percentile=0`` clips every step to the smallest norm seen (normalised
    gradients for Adam). The paper recommends 10.

    ``window=N`` keeps the last N norms in a ring buffer and the percentile over them is
    exact. ``window=None`` (default, the paper's whole history) keeps an O(1) sketch: a
    histogram of the norms over 40 log-spaced bins per octave across float32's range,
    plus the exact smallest and largest norm and the number of zero norms. The percentile
    read off it is within 0.87% (relative) of the exact one for any stream, and exact for
    percentiles 0 and 100 and a one-step history.

    Deviations from the reference (``pseeth/autoclip``): the scale is :math:`c_t / n_t`
    with no epsilon; a step with a non-finite norm passes through unchanged and stays out
    of the history (the reference appends it, and NaN then poisons ``np.percentile``).
    The TF reference's per-tensor clipping and ``nearest`` interpolation are not followed.

    Args:
      percentile: :math:`p \in [0, 100]` (a number; traced under ``inject_hyperparams``).
      window: None for the whole history, or N >= 1 for the last N finite norms (a Python
        int: it fixes the state's size; list it in ``static_args`` of
        ``inject_hyperparams``).
      axis_name: inside ``shard_map``/``pmap``, the mesh axes every leaf is sharded over.
      partition_specs: inside ``shard_map``, a pytree of ``PartitionSpec`` per leaf.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its :class:`AutoClipState` holds
      ``window`` float32 (window N) or 10,160 int32 (whole history, 40 KiB), a few scalars
      and a :class:`ClipStats` whose ``threshold`` is :math:`c_t`.

    Raises:
      ValueError: ``percentile`` outside [0, 100]; ``window`` < 1.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.autoclip(50.0, window=3)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for g in ([3.0, 4.0], [6.0, 8.0]):  # norms 5, 10
      ...     u, state = tx.update({"w": jnp.array(g)}, state)
      >>> u  # median of [5, 10] is 7.5: the norm-10 step is scaled by 0.75
      {'w': Array([4.5, 6. ], dtype=float32)}

    References:
      Seetharaman, Wichern, Pardo & Le Roux, `AutoClip: Adaptive Gradient Clipping for
      Source Separation Networks <https://arxiv.org/abs/2007.14469>`_, MLSP 2020.
    """
    check_in_range(percentile, "percentile", 0.0, 100.0)
    if window is not None:
        window = check_positive_int(window, "window")
    num.check_sharding_args(axis_name, partition_specs)

    def init_fn(params):
        del params
        i32 = lambda: jnp.zeros((), np.int32)  # one array per field: the state can be donated
        length = _NUM_BINS if window is None else window
        history_dtype = np.int32 if window is None else _F32
        return AutoClipState(
            stats=init_stats(),
            history=jnp.zeros((length,), history_dtype),
            size=i32(),
            head=i32(),
            low=jnp.asarray(np.inf, _F32),
            high=jnp.zeros((), _F32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        step = _measure(updates, axis_name, partition_specs)
        x = jnp.where(step.ok, step.value, 0.0)
        p = _f32(percentile)
        if window is None:
            new = _keep(step.ok, _sketch_add(state, x), state)
            limit = _sketch_percentile(new, p)
        else:
            new = _keep(step.ok, _window_add(state, x, window), state)
            limit = _window_percentile(new, p)
        updates, stats = _clip(updates, step, limit, state.stats)
        return updates, new._replace(stats=stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# ZClip
# ---------------------------------------------------------------------------

_ZCLIP_MODES = ("zscore", "percentile")
_ZCLIP_OPTIONS = ("adaptive_scaling", "mean")


@named_state("zclip")
class ZClipState(NamedTuple):
    """State of :func:`zclip`: O(1) float32/int32 scalars.

    ``mean`` and ``var`` are the running mean and population variance of the warm-up norms
    while ``count < warmup_steps``, then ZClip's EMA statistics; ``count`` is the number
    of finite norms seen (capped at ``warmup_steps``, which is all it needs).
    """

    stats: ClipStats
    mean: jax.Array
    var: jax.Array
    count: jax.Array


def _choice(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed} (any case); got {value!r}.")
    return value.lower()


def zclip(
    *,
    alpha: Any = 0.97,
    z_thresh: Any = 2.5,
    mode: str = "zscore",
    clip_option: str = "adaptive_scaling",
    clip_factor: Any = 1.0,
    warmup_steps: Any = 25,
    max_norm: Any = 1.0,
    eps: Any = 1e-6,
    skip_update_on_spike: Any = False,
    axis_name: num.AxisName = None,
    partition_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""ZClip: clips gradient-norm spikes detected by a z-score against EMA statistics.

    Warm-up: the first :math:`W` finite norms (:math:`W` = ``warmup_steps``) give the
    initial mean :math:`\mu` and population variance :math:`\sigma^2`; meanwhile only the
    fixed cap applies. Afterwards, with :math:`n` the global norm and
    :math:`z = (n - \mu) / (\sigma + \epsilon)`, a spike is :math:`z > z_{th}`
    (``mode="zscore"``) or :math:`n > \mu + z_{th}\sigma` (``mode="percentile"``), and its
    clip value is

    .. math::
        c = \begin{cases}
          \kappa\,\big(\mu + z_{th}\,\sigma \,/\, (z / z_{th})\big)
            & \text{zscore, adaptive\_scaling (the reciprocal z-score)} \\
          \mu & \text{zscore, mean} \\
          \mu + z_{th}\,\sigma & \text{percentile}
        \end{cases}

    (:math:`\kappa` = ``clip_factor``, :math:`z_{th}` = ``z_thresh``). The update is scaled
    to :math:`e = \min(c, C)` iff :math:`n > e`, with :math:`c = n` when there is no spike
    and :math:`C` = ``max_norm`` (``None``: no cap). Then the statistics follow
    :math:`x = c` on a spike, else :math:`x = n` (never the capped value), with
    :math:`\alpha` = ``alpha``:

    .. math::
        \mu \leftarrow \alpha\mu + (1 - \alpha)\,x, \qquad
        \sigma^2 \leftarrow \alpha\sigma^2 + (1 - \alpha)\,(x - \mu)^2

    where the variance uses the already-updated mean, as the reference does. With
    ``skip_update_on_spike=True`` a spike leaves the statistics as they were (the clipped
    update is still applied). Note the default ``max_norm=1.0``: like the reference, ZClip
    also clips every step to global norm 1 unless told otherwise.

    Deviations from the reference (``bluorion-com/ZClip``): the scale is :math:`e / n`
    with no epsilon (the reference divides by :math:`n + 10^{-6}`); a non-finite norm
    passes through and never enters the warm-up or the statistics (the reference lets one
    NaN make :math:`\mu, \sigma` NaN forever); the warm-up statistics are accumulated as a
    running mean and variance (Welford) instead of a buffer of ``warmup_steps`` floats, so
    the state is O(1) and ``warmup_steps`` can be injected.

    Args:
      alpha: EMA decay :math:`\alpha \in [0, 1]`.
      z_thresh: :math:`z_{th} > 0`, the z-score above which a norm is a spike.
      mode: ``"zscore"`` or ``"percentile"`` (a fixed :math:`\mu + z_{th}\sigma` threshold,
        despite the name).
      clip_option: in zscore mode, ``"adaptive_scaling"`` or ``"mean"``.
      clip_factor: :math:`\kappa > 0`, multiplies the adaptive-scaling clip value.
      warmup_steps: :math:`W \ge 0`, finite steps that only collect statistics (0 acts as 1).
      max_norm: the fixed cap :math:`C` (float, array or schedule), or None for no cap.
      eps: :math:`\epsilon \ge 0` in the z-score's denominator.
      skip_update_on_spike: leave the statistics unchanged on a spike.
      axis_name: inside ``shard_map``/``pmap``, the mesh axes every leaf is sharded over.
      partition_specs: inside ``shard_map``, a pytree of ``PartitionSpec`` per leaf.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its :class:`ZClipState` holds O(1)
      scalars and a :class:`ClipStats` whose ``threshold`` is :math:`e` on a spike and
      otherwise the spike-detection level :math:`\mu + z_{th}(\sigma + \epsilon)`
      (:math:`\mu + z_{th}\sigma` in percentile mode), capped at :math:`C`; during warm-up
      it is :math:`C` (inf when there is no cap).

    Raises:
      ValueError: an unknown ``mode`` or ``clip_option``; ``alpha`` outside [0, 1];
        ``z_thresh`` or ``clip_factor`` not > 0; negative ``eps``, ``warmup_steps`` or
        ``max_norm``.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.zclip(warmup_steps=3, max_norm=None)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for norm in (4.0, 5.0, 6.0, 5.0):  # warm-up, then an ordinary step
      ...     _, state = tx.update({"w": jnp.array([0.0, norm])}, state)
      >>> u, state = tx.update({"w": jnp.array([0.0, 50.0])}, state)  # a spike
      >>> bool(u["w"][1] < 6.0), int(oc.stats(state)["zclip/num_clipped"])
      (True, 1)

    References:
      Kumar, Owen, Roy Chowdhury & Güra, `ZClip: Adaptive Spike Mitigation for LLM
      Pre-Training <https://arxiv.org/abs/2504.02507>`_, 2025; reference code
      ``bluorion-com/ZClip``.
    """
    mode = _choice(mode, "mode", _ZCLIP_MODES)
    clip_option = _choice(clip_option, "clip_option", _ZCLIP_OPTIONS)
    check_in_range(alpha, "alpha", 0.0, 1.0)
    check_positive(z_thresh, "z_thresh")
    check_positive(clip_factor, "clip_factor")
    check_nonnegative(eps, "eps")
    check_nonnegative(warmup_steps, "warmup_steps")
    if max_norm is not None:
        check_threshold(max_norm, "max_norm")
    num.check_sharding_args(axis_name, partition_specs)

    def init_fn(params):
        del params
        zero = lambda: jnp.zeros((), _F32)  # one array per field: the state can be donated
        return ZClipState(
            stats=init_stats(), mean=zero(), var=zero(), count=jnp.zeros((), np.int32)
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        step = _measure(updates, axis_name, partition_specs)
        n = step.usable
        a, k, kappa = _f32(alpha), _f32(z_thresh), _f32(clip_factor)
        warmup = jnp.maximum(jnp.asarray(warmup_steps).astype(np.int32), 1)
        cap = (
            jnp.asarray(np.inf, _F32)
            if max_norm is None
            else num.resolve(max_norm, state.stats.count, _F32)
        )
        warming = state.count < warmup

        # Warm-up: Welford's running mean and population variance.
        c = (state.count + 1).astype(_F32)
        delta = n - state.mean
        warm_mean = state.mean + delta / c
        warm_var = (state.var * (c - 1) + delta * (n - warm_mean)) / c

        # After warm-up: spike detection and the clip value.
        std = jnp.sqrt(jnp.maximum(state.var, 0))
        if mode == "percentile":
            detect = state.mean + k * std
            spike = n > detect
            clip_value = detect
        else:
            detect = state.mean + k * (std + _f32(eps))  # z > k  <=>  n > detect
            z = (n - state.mean) / (std + _f32(eps))
            spike = z > k
            if clip_option == "mean":
                clip_value = state.mean
            else:
                clip_value = kappa * (state.mean + k * std / (jnp.where(spike, z, k) / k))
        spike = spike & ~warming
        x = jnp.where(spike, clip_value, n)
        ema_mean = a * state.mean + (1 - a) * x
        ema_var = a * state.var + (1 - a) * (x - ema_mean) ** 2
        hold = spike & jnp.asarray(skip_update_on_spike).astype(bool)

        limit = jnp.where(warming, cap, jnp.minimum(x, cap))
        # Record the level above which this step is clipped: the clip value on a spike,
        # otherwise the spike-detection level (both capped), never the norm itself.
        reported = jnp.where(warming | spike, limit, jnp.minimum(detect, cap))
        updates, stats = _clip(updates, step, limit, state.stats, reported)
        new = ZClipState(
            stats=stats,
            mean=jnp.where(warming, warm_mean, jnp.where(hold, state.mean, ema_mean)),
            var=jnp.where(warming, warm_var, jnp.where(hold, state.var, ema_var)),
            count=jnp.where(warming, state.count + 1, state.count),
        )
        return updates, _keep(step.ok, new, state._replace(stats=stats))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# Quantile-tracking clip
# ---------------------------------------------------------------------------


@named_state("quantile_clip")
class QuantileClipState(NamedTuple):
    """State of :func:`quantile_clip`: O(1) scalars; ``max_norm`` is the next threshold."""

    stats: ClipStats
    max_norm: jax.Array


def quantile_clip(
    initial_norm: Any = 0.1,
    *,
    target_quantile: Any = 0.5,
    learning_rate: Any = 0.2,
    axis_name: num.AxisName = None,
    partition_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Clips to a threshold that tracks a target quantile of the stream of gradient norms.

    With :math:`C_t` the threshold (:math:`C_1` = ``initial_norm``), :math:`n_t` the global
    norm, :math:`\gamma` = ``target_quantile`` and :math:`\eta` = ``learning_rate``:

    .. math::
        u \leftarrow u \cdot \min\!\Big(1, \frac{C_t}{n_t}\Big), \qquad
        b_t = \mathbb{1}[n_t \le C_t], \qquad
        C_{t+1} = C_t \exp\!\big(-\eta\,(b_t - \gamma)\big)

    so about a fraction :math:`\gamma` of steps go unclipped once :math:`C` settles. The
    new threshold applies from the next step. A non-finite norm passes through and leaves
    :math:`C` unchanged.

    This is a single-stream extrapolation of Andrew et al.'s geometric rule, which the
    paper states for per-example (or per-client) norms in a round, with a privately
    released count: here each step contributes one noise-free record. It is not
    published in this form; :func:`per_example_clip` with ``target_quantile`` implements
    the published per-example rule.

    Args:
      initial_norm: :math:`C_1 > 0` (Andrew et al. / TFF default 0.1).
      target_quantile: :math:`\gamma \in [0, 1]`, the target fraction of unclipped steps.
      learning_rate: :math:`\eta \ge 0` (default 0.2, as recommended).
      axis_name: inside ``shard_map``/``pmap``, the mesh axes every leaf is sharded over.
      partition_specs: inside ``shard_map``, a pytree of ``PartitionSpec`` per leaf.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its :class:`QuantileClipState` holds
      O(1) scalars and a :class:`ClipStats` whose ``threshold`` is :math:`C_t`.

    Raises:
      ValueError: ``initial_norm`` not > 0, ``target_quantile`` outside [0, 1], negative
        ``learning_rate``.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.quantile_clip(1.0, target_quantile=0.5, learning_rate=0.2)
      >>> g = {"w": jnp.array([3.0, 4.0])}
      >>> u, state = tx.update(g, tx.init(g))  # norm 5 > 1: clipped, C grows
      >>> u["w"], round(float(state.max_norm), 4)  # exp(0.1)
      (Array([0.6, 0.8], dtype=float32), 1.1052)

    References:
      Andrew, Thakkar, McMahan & Ramaswamy, `Differentially Private Learning with Adaptive
      Clipping <https://arxiv.org/abs/1905.03871>`_, NeurIPS 2021.
    """
    check_threshold(initial_norm, "initial_norm", allow_zero=False)
    if callable(initial_norm):
        raise TypeError(f"`initial_norm` must be a number, not a schedule; got {initial_norm!r}.")
    check_in_range(target_quantile, "target_quantile", 0.0, 1.0)
    check_nonnegative(learning_rate, "learning_rate")
    num.check_sharding_args(axis_name, partition_specs)

    def init_fn(params):
        del params
        return QuantileClipState(stats=init_stats(), max_norm=_f32(initial_norm))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        step = _measure(updates, axis_name, partition_specs)
        limit = state.max_norm
        unclipped = (step.value <= limit).astype(_F32)
        target, lr = _f32(target_quantile), _f32(learning_rate)
        updated = limit * jnp.exp(-lr * (unclipped - target))
        updates, stats = _clip(updates, step, limit, state.stats)
        return updates, QuantileClipState(stats=stats, max_norm=jnp.where(step.ok, updated, limit))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
