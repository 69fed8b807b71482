"""Adaptive clipping with per-tensor or per-coordinate state: AdaGC and SPAM.

References: Wang et al. 2025, "AdaGC: Improving Training Stability for Large Language Model
Pretraining" (per-tensor EMA thresholds); Huang et al. 2025, "SPAM: Spike-Aware Adam with
Momentum Reset for Stable LLM Training" (coordinate-wise spike clipping).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optaxclip import _numerics as num
from optaxclip._stats import ClipStats, empty_step, init_stats, named_state, next_stats
from optaxclip._tree import (
    check_in_range,
    check_nonnegative,
    check_positive,
    check_threshold,
    stacked_counts,
)

_F32 = np.float32


_f32 = num.as_f32


def _check_leaf_count(found: int, expected: int, name: str) -> None:
    if found != expected:
        raise ValueError(
            f"{name}: the updates hold {found} tensors (leaves, or stacked slices) but the state "
            f"was initialised for {expected}; call `init` with parameters of the same structure "
            "as the updates."
        )


# ---------------------------------------------------------------------------
# AdaGC
# ---------------------------------------------------------------------------


@named_state("adagc")
class AdaGCState(NamedTuple):
    """State of :func:`adagc`: one float32 per leaf and O(1) scalars.

    ``gamma[i]`` is leaf i's threshold statistic :math:`\\gamma_i` (inf until first seen);
    ``step`` counts the finite steps (the warm-up counter).
    """

    stats: ClipStats
    gamma: jax.Array
    step: jax.Array


def adagc(
    max_norm: Any = 1.0,
    *,
    clip_ratio: Any = 1.04,
    beta: Any = 0.99,
    warmup_steps: Any = 100,
    eps: Any = 1e-6,
    stacked_axes: Any = None,
    axis_name: num.AxisName = None,
    partition_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaGC: per-tensor clipping relative to an EMA of each tensor's own clipped norms.

    With :math:`t` the finite-step count, :math:`g_i` leaf i of the update,
    :math:`\nu_i = \|g_i\|` and :math:`n` the global norm:

    * warm-up, :math:`t \le T` (``warmup_steps``): global clipping to :math:`C`
      (``max_norm``), :math:`g \leftarrow g \min(1, C / n)`; then with :math:`\hat\nu_i` the
      norm of the clipped leaf, :math:`\gamma_i \leftarrow \min(\gamma_i, \hat\nu_i)` (the
      running minimum, :math:`\hat\nu_i` on first sight);
    * afterwards, per leaf, with :math:`\lambda` = ``clip_ratio``, :math:`\beta` = ``beta``:

    .. math::
        g_i \leftarrow g_i \min\!\Big(1, \frac{\lambda \max(\gamma_i, \epsilon)}{\nu_i}\Big),
        \qquad
        \gamma_i \leftarrow \beta\,\gamma_i + (1 - \beta)\,\min\!\big(\nu_i,
        \lambda \max(\gamma_i, \epsilon)\big)

    so the EMA only ever sees clipped norms, and the threshold uses :math:`\gamma_{t-1}`.
    There is no bias correction. A leaf first seen after the warm-up starts from
    :math:`\gamma_i = \nu_i`.

    The paper says only that :math:`\gamma` is initialised during a global-clipping
    warm-up; the authors' Megatron patch (``lishuai-97/AdaGC``, ``AdaGC.clip_by_norm``) takes
    the running minimum of the clipped norms, and this follows the code step for step, with
    its defaults (:math:`\lambda = 1.04`, :math:`\beta = 0.99`, 100 warm-up steps; values
    in the paper's tables may differ). Deviations from the code: the scale has no epsilon
    (the reference divides by :math:`\nu_i + \epsilon`); instead :math:`\epsilon`
    (``eps``) floors :math:`\gamma_i` in the threshold, so a tensor whose warm-up gradients
    were all zero is not frozen at threshold 0 forever (for :math:`\gamma_i \gg \epsilon`
    this is exactly the reference); a step with a non-finite global norm passes through
    unchanged and does not advance the warm-up or any :math:`\gamma_i` (the reference would
    make :math:`\gamma` NaN).

    Args:
      max_norm: :math:`C`, the global threshold during warm-up (float, array or schedule;
        Megatron's ``--clip-grad``, 1.0 in the authors' scripts).
      clip_ratio: :math:`\lambda > 0`, the allowed ratio to :math:`\gamma_i` (1.04).
      beta: :math:`\beta \in [0, 1]`, the EMA decay (0.99).
      warmup_steps: :math:`T \ge 0`, the finite steps of global clipping (100).
      eps: :math:`\epsilon \ge 0`, the floor on :math:`\gamma_i` in the threshold.
      stacked_axes: how many leading axes of a leaf index stacked layers (``nnx.scan`` /
        ``nn.scan``): an int, a pytree prefix of ``None | int`` or a callable of the leaf
        path. Each slice is then a tensor of its own, with its own :math:`\gamma` (the state
        holds one float32 per slice); give ``init`` the same tree as ``update``.
      axis_name: inside ``shard_map``/``pmap``, the mesh axes every leaf is sharded over;
        each :math:`\nu_i` is then the whole (logical) tensor's norm, not the shard's.
      partition_specs: inside ``shard_map``, a pytree of ``PartitionSpec`` (or a prefix):
        each leaf's partial sum is added over the mesh axes its spec names.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its :class:`AdaGCState` holds one
      float32 per leaf, a step counter and a :class:`ClipStats` (``threshold`` is
      :math:`C` during warm-up and NaN afterwards; ``clipped`` the fraction of leaves clipped).
      ``init`` needs parameters with the updates' tree structure.

    Raises:
      ValueError: negative ``max_norm``, ``warmup_steps`` or ``eps``; ``clip_ratio`` not
        > 0; ``beta`` outside [0, 1]; updates with another number of leaves than ``init``'s.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.adagc(10.0, warmup_steps=1)
      >>> g = lambda a, b: {"a": jnp.array([a]), "b": jnp.array([b])}
      >>> state = tx.init(g(0.0, 0.0))
      >>> _, state = tx.update(g(3.0, 4.0), state)  # warm-up: gamma = (3, 4)
      >>> u, state = tx.update(g(30.0, 4.0), state)  # "a" spikes: clipped to 1.04 * 3
      >>> u
      {'a': Array([3.12], dtype=float32), 'b': Array([4.], dtype=float32)}

    References:
      Wang et al., `AdaGC: Improving Training Stability for Large Language Model
      Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025 (ICML 2026 as "AdaGC: Enhancing
      LLM Pretraining Stability via Adaptive Gradient Clipping").
    """
    check_threshold(max_norm, "max_norm")
    check_positive(clip_ratio, "clip_ratio")
    check_in_range(beta, "beta", 0.0, 1.0)
    check_nonnegative(warmup_steps, "warmup_steps")
    check_nonnegative(eps, "eps")
    num.check_sharding_args(axis_name, partition_specs)

    def slices(tree) -> list[int]:
        """How many tensors (stacked slices) each leaf holds."""
        counts = stacked_counts(tree, stacked_axes, "adagc")
        return [math.prod(jnp.shape(x)[:k]) for x, k in zip(jax.tree.leaves(tree), counts)]

    def init_fn(params):
        n = sum(slices(params))
        return AdaGCState(
            stats=init_stats(),
            gamma=jnp.full((n,), np.inf, _F32),
            step=jnp.zeros((), np.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        leaves, treedef = jax.tree.flatten(updates)
        leaves = [jnp.asarray(x) for x in leaves]
        _check_leaf_count(sum(slices(updates)), state.gamma.shape[0], "adagc")
        if not leaves:
            return updates, state._replace(stats=empty_step(state.stats, jnp.nan))
        dtype = num.accum_dtype(leaves)
        floor = _f32(eps)

        def zero_ok(sums, ord, sizes):  # every threshold is >= clip_ratio * eps: 0 decides nothing
            return [floor * _f32(clip_ratio) >= num.zero_bound(n, ord, dtype) for n in sizes]

        mesh = num.leaf_meshes(leaves, updates, axis_name, partition_specs)
        stacked = stacked_counts(updates, stacked_axes, "adagc")
        axes = [tuple(range(k, x.ndim)) for k, x in zip(stacked, leaves)]
        if mesh and any(lm.split(a)[1] for lm, a in zip(mesh, axes)):
            raise ValueError(
                "adagc: a stacked (layer) axis is sharded across devices in `partition_specs`; "
                "AdaGC keeps one threshold per layer on every device, so shard the layers' own "
                "dimensions instead (or use jax.jit with NamedSharding, which needs no specs)."
            )
        norms = num.unit_pairs(leaves, 2, axes, zero_ok=zero_ok, mesh=mesh)
        total = num.combine(norms, 2)
        # Every per-slice quantity as one vector over the slices: a few kernels, not a few
        # per leaf (compile time grows with the number of kernels).
        per_leaf = num.in_leaf_order(norms)
        offsets = np.cumsum([0] + [math.prod(x.shape[:k]) for x, k in zip(leaves, stacked)])
        value = _f32(total.value)
        ok = total.finite & jnp.isfinite(value)
        step = state.step + 1
        warming = step <= jnp.asarray(warmup_steps)
        ratio, b = _f32(clip_ratio), _f32(beta)

        # Warm-up: one global factor, and the running minimum of the clipped leaf norms.
        cap = num.resolve(max_norm, state.stats.count, dtype)
        gp, gq, g_clipped = num.clip_factors(total, cap)
        nu = _f32(per_leaf.value)
        warm_gamma = jnp.minimum(state.gamma, nu * _f32(gp * gq))

        # Afterwards: each leaf against its own gamma.
        gamma = jnp.where(jnp.isinf(state.gamma), nu, state.gamma)
        limits = ratio * jnp.maximum(gamma, floor)
        lp, lq, leaf_clipped = num.clip_factors(per_leaf, limits.astype(dtype))
        ema_gamma = b * gamma + (1 - b) * jnp.where(leaf_clipped, limits, nu)

        p = jnp.where(total.finite, jnp.where(warming, gp, lp), 1)
        q = jnp.where(total.finite, jnp.where(warming, gq, lq), 1)
        p, q = num.materialize(p, q)  # read by every leaf: computed once

        # Each leaf's slices of p and q, shaped to broadcast, read through leaf_pieces: a
        # slice of the whole vector per leaf made adagc over 999 small leaves compile in
        # 22 s, 14 s this way.
        spans = [(int(offsets[i]), int(offsets[i + 1] - offsets[i])) for i in range(len(leaves))]
        out = [
            num.scale_leaf(x, *(v.reshape(x.shape[:k] + (1,) * (x.ndim - k)) for v in pq))
            for x, k, pq in zip(leaves, stacked, num.leaf_pieces([p, q], spans))
        ]
        clipped = jnp.where(warming, g_clipped, leaf_clipped) & total.finite
        new_gamma = jnp.where(warming, warm_gamma, ema_gamma)
        stats = next_stats(
            state.stats,
            norm=value,
            threshold=jnp.where(warming, _f32(cap), jnp.nan),
            scale=jnp.min(p * q),
            clipped=jnp.mean(clipped.astype(_F32)),
            any_clipped=jnp.any(clipped),
            nonfinite=~total.finite,
        )
        new_state = AdaGCState(
            stats=stats,
            gamma=jnp.where(ok, new_gamma, state.gamma),
            step=jnp.where(ok, step, state.step),
        )
        return jax.tree.unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# SPAM spike-aware clipping
# ---------------------------------------------------------------------------


@named_state("spike_aware_clip")
class SpikeAwareClipState(NamedTuple):
    r"""State of :func:`spike_aware_clip`: ``nu``, one array per leaf (P floats), and scalars.

    ``nu`` holds :math:`\sqrt{v}`, the square root of SPAM's EMA :math:`v` of the squared
    clipped updates (float32 for float32, float16 and bfloat16 leaves, unless ``nu_dtype``
    says otherwise; ``nu ** 2`` is :math:`v`); ``step`` counts the finite steps.
    """

    stats: ClipStats
    nu: Any
    step: jax.Array


def _nu_dtype(x: jax.Array, nu_dtype: Any) -> np.dtype:
    if nu_dtype is not None:
        return np.dtype(nu_dtype)
    return np.dtype(np.float64 if x.dtype in (np.float64, np.complex128) else np.float32)


def _wide_of(x: jax.Array, v: jax.Array) -> np.dtype:
    return np.dtype(np.float64 if np.float64 in (np.dtype(v.dtype), x.dtype) else _F32)


def _bound_ratio(theta: jax.Array, beta: jax.Array) -> jax.Array:
    """``c`` with ``theta v = c v'`` on a spike, ``v' = beta v + (1 - beta) theta v`` the
    updated EMA: ``theta / (beta + (1 - beta) theta)`` (0 for ``theta = 0``, inf for an
    infinite ``theta``, where no entry is a spike)."""
    den = beta + (1 - beta) * theta
    c = jnp.where(theta > 0, theta / jnp.where(theta > 0, den, 1), 0)
    return jnp.where(jnp.isinf(theta), jnp.inf, c)


def _next_root(xw, rw, theta, beta) -> jax.Array:
    """``sqrt(v')`` in the (widened) dtype of ``xw`` and ``rw``, with ``v = rw ** 2`` and
    ``v' = beta v + (1 - beta) min(g**2, theta v)``: SPAM's second moment takes the clipped
    square, ``theta v`` on a spike (``g**2 > theta v``, as SPAM's code tests it). An
    infinite ``theta`` (the gate closed) finds no spike: ``theta v`` is inf, or NaN where
    ``v = 0``."""
    # lax, not jnp: a jnp operation is a jit of its own, traced for every leaf (this took
    # half of the trace over 2,000 small leaves).
    dtype = rw.dtype
    v = lax.mul(rw, rw)
    limit = lax.mul(num.as_dtype(theta, dtype), v)  # SPAM's threshold * exp_avg_sq
    square = lax.square(jnp.abs(xw)) if jnp.iscomplexobj(xw) else lax.mul(xw, xw)
    square = lax.select(lax.gt(square, limit), limit, square)
    b = num.as_dtype(beta, dtype)
    return _root(lax.add(lax.mul(b, v), lax.mul(lax.sub(num.constant(1, dtype), b), square)))


def _next_root_of(x, r, theta, beta) -> jax.Array:
    """:func:`_next_root` of a leaf and its root on an active step, stored in ``r``'s dtype."""
    wide = _wide_of(x, r)
    return num.as_dtype(_next_root(num._wide(x, wide), num.as_dtype(r, wide), theta, beta), r.dtype)


@jax.custom_jvp
def _root(v: jax.Array) -> jax.Array:
    """``sqrt(v)`` for ``v >= 0``, whose derivative at 0 is 0 (as ``jnp.abs``' is): an
    entry whose ``v`` is 0 takes no NaN into a gradient (0 times an infinite derivative)."""
    return lax.sqrt(v)


@_root.defjvp
def _root_jvp(primals, tangents):
    (v,), (dv,) = primals, tangents
    r = jnp.sqrt(v)
    return r, jnp.where(r > 0, dv / (2 * jnp.where(r > 0, r, 1)), 0).astype(r.dtype)


def _complex_spikes(mag: jax.Array, bound: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Complex entries of modulus ``mag`` against ``bound``: the spikes, and the factor that
    brings a spike's modulus down to the bound, keeping its phase (1 elsewhere)."""
    spike = mag > bound
    return spike, jnp.where(spike, bound / jnp.where(spike, mag, 1), 1)


def _clip_to_bound(xw: jax.Array, bound: jax.Array) -> jax.Array:
    """Entries above ``bound`` in magnitude brought down to it (complex ones keep their
    phase); none where ``bound`` is inf or NaN."""
    if jnp.iscomplexobj(xw):
        return xw * _complex_spikes(jnp.abs(xw), bound)[1].astype(xw.dtype)
    # The sign of a spike (never 0 or NaN) is that of xw < 0: fewer instructions than
    # copysign. (lax: see _next_root.)
    negative = lax.lt(xw, num.constant(0, xw.dtype))
    return lax.select(lax.gt(lax.abs(xw), bound), lax.select(negative, lax.neg(bound), bound), xw)


def _spike_statistics(leaves, roots, new_roots, theta, beta, root_c, anchor, reducer):
    """The number of spikes and the smallest factor ``b / |g|`` over them, on a step past
    the gate (every entry finite), with ``b = root_c * r`` the bound that the update
    applies (``r`` the leaf's new root of ``v``).

    Small leaves are stacked with their roots (:meth:`optaxclip._numerics.Reducer.
    aligned_chunks`): one leaf at a time, 999 small leaves took 96 s to compile. A stack
    takes the old roots and computes the new ones itself (:func:`_next_root`, the same
    values): under ``jit`` with shardings left to the compiler, a stack of the new roots
    had it give two leaves' new roots, and their updates, another sharding than their
    inputs'. Each statistic is one reduction per chunk that XLA fuses with its element-wise
    producer (on CPU, a compare or select would write a full-size mask to memory first): an
    entry counts
    ``sign(max(|g| - b, 0))``, or ``min(max(|g| - b, 0) / tiny, 1)`` where ``g`` is
    widened to the roots' dtype (1 for every spike, the difference of two distinct floats
    being at least ``tiny``, subnormals aside, which the CPU flushes; XLA's CPU backend
    runs the sign faster in float32 and slower on a widened entry), and its factor is
    ``min(1, (b + e) / (|g| + e))`` with ``e = 1 - min(|g| / tiny, 1)`` (1 for a zero
    entry, so 0 / 0 never forms; 0 otherwise, leaving ``b / |g|`` exact). Every chunk
    reads its own copies of the scalars (:func:`optaxclip._numerics.own_scalars`,
    ``anchor`` a zero that XLA cannot fold). Complex chunks compare magnitudes.
    """
    stacks, reducer = reducer.aligned_chunks(leaves, roots, new_roots)
    unstacked = {id(r) for r in new_roots}  # a leaf's own new root: not a stack
    chunks = [
        (x, new if id(new) in unstacked else _next_root_of(x, old, theta, beta))
        for x, old, new in stacks
    ]
    if not chunks:
        return jnp.zeros((), _F32) + anchor, jnp.ones((), _F32) + anchor
    wides = [_wide_of(x, v) for x, v in chunks]
    real = [j for j, (x, _) in enumerate(chunks) if not jnp.iscomplexobj(x)]
    first_copy = {j: 2 * n for n, j in enumerate(real)}  # chunk j's two rows of scalars
    # The count and the factor each read their own scalars, or XLA would merge the two
    # kernels' producers into one array.
    rows = [(root_c, 0, 1, 1 / np.finfo(wides[j]).tiny) for j in real for _ in (0, 1)]
    copies = num.own_scalars(
        rows,
        [wides[j] for j in real for _ in (0, 1)],
        anchor,
        [chunks[j][0].shape for j in real for _ in (0, 1)],
    )
    counts, mins = [], []
    for j, ((x, r), wide) in enumerate(zip(chunks, wides)):
        if j not in first_copy:
            b = root_c.astype(wide) * r.astype(wide)
            spike, factor = _complex_spikes(jnp.abs(num._wide(x, wide)), b)
            counts.append(jnp.sum(spike, dtype=_F32))
            mins.append(jnp.min(factor, initial=1.0).astype(_F32))
            continue
        k = first_copy[j]
        rc, zero, one, inv_tiny = copies[k]
        # Through a barrier even in float32: XLA would share |g| with the factor's kernel
        # below, in memory.
        xw, rw = num.barrier(x, 2).astype(wide), num.own_read(r, 2).astype(wide)
        over = jnp.maximum(jnp.abs(xw) - rc * rw, zero)
        # A float32 sign runs faster than the clamp; a sign of a widened entry, slower.
        spike = jnp.sign(over) if x.dtype == wide else jnp.minimum(over * inv_tiny, one)
        counts.append(jnp.sum(spike, dtype=_F32))
        rc, zero, one, inv_tiny = copies[k + 1]
        xw, rw = num.own_read(x, 3).astype(wide), num.own_read(r, 3).astype(wide)
        mag, b = jnp.abs(xw), rc * rw
        e = one - jnp.minimum(mag * inv_tiny, one)
        mins.append(jnp.min(jnp.minimum(one, (b + e) / (mag + e))).astype(_F32))
    return reducer.sum(counts), reducer.max([-m for m in mins]) * -1


def spike_aware_clip(
    threshold: Any = 5000.0,
    *,
    b2: Any = 0.999,
    warmup_steps: Any = 20,
    nu_dtype: Any = None,
    axis_name: num.AxisName = None,
    partition_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SPAM's spike-aware clipping: caps each coordinate against an EMA of its square.

    With :math:`v` the EMA of the squared clipped updates **before** this step,
    :math:`\theta` = ``threshold`` and :math:`\beta_2` = ``b2``, for every coordinate:

    .. math::
        g_j \leftarrow \begin{cases}
          \operatorname{sign}(g_j)\sqrt{\theta\, v_j} & g_j^2 > \theta\, v_j \\
          g_j & \text{otherwise}
        \end{cases}, \qquad
        v \leftarrow \beta_2\, v + (1 - \beta_2)\, g^2

    (complex entries keep their phase, and compare :math:`|g_j|` with
    :math:`\sqrt{\theta v_j}`). The test is computed as SPAM's code computes it, squares in
    float32: an entry whose square underflows to 0 is not a spike. :math:`v` starts at 0, so
    clipping is off while
    :math:`t + 1 < W` (:math:`t` the finite steps before this one, :math:`W` =
    ``warmup_steps``): SPAM's ``grad_accu_steps`` gate, which keeps the first steps from
    being clipped to 0. :math:`v` is updated on every finite step, gated or not.

    In SPAM, :math:`v` is Adam's own second moment; here it is an independent EMA with
    Adam's :math:`\beta_2`, so this works in front of any optimizer and costs P floats of
    state (float32 by default even for bfloat16 leaves, where an EMA with
    :math:`\beta_2 = 0.999` would round to no change). SPAM's periodic momentum reset and
    learning-rate re-warm belong to the optimizer and are not part of this transform. A
    step with a non-finite global norm passes through unchanged and leaves :math:`v` and
    the step count as they were.

    The state holds :math:`\sqrt{v}`, and the update reads only the new one. With
    :math:`v'` the updated EMA and :math:`c = \theta / (\beta_2 + (1 - \beta_2)\theta)`,
    a spike has :math:`\theta v = c v'`, and :math:`g_j^2 > \theta v_j` exactly when
    :math:`|g_j| > \sqrt{c}\sqrt{v'_j}`, so the bound is :math:`\sqrt{c}\sqrt{v'_j}`. The
    kernels that compute the clipped update (Adam's, in a chain) then read no state that
    the step overwrites and take no square root: a donated step of ``chain(
    spike_aware_clip(), adam)`` holds no copy of :math:`v`. It held one before, 96 MiB on
    a 25M-parameter tree, and ran 1.5x slower. The EMA takes SPAM's own test; the two
    tests agree up to rounding, so an entry within a few units in the last place of the
    bound may be clipped to a value that differs from it by as much.

    Args:
      threshold: :math:`\theta \ge 0` (float, array or schedule; SPAM's default 5000).
      b2: :math:`\beta_2 \in [0, 1]` (0.999, Adam's default).
      warmup_steps: :math:`W \ge 0`, SPAM's ``grad_accu_steps`` (20).
      nu_dtype: the dtype of the stored :math:`\sqrt{v}`; None means float32 (float64 for
        float64 leaves).
      axis_name: inside ``shard_map``/``pmap``, the mesh axes the leaves are sharded over
        (for the statistics; the clipping itself is per coordinate).
      partition_specs: inside ``shard_map``, a pytree of ``PartitionSpec`` per leaf.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its :class:`SpikeAwareClipState` holds
      :math:`\sqrt{v}` (one array per leaf, P floats in all), a step counter and a
      :class:`ClipStats` (``threshold`` NaN; ``clipped`` the fraction of coordinates
      clipped; ``scale`` the smallest coordinate factor). ``init`` needs parameters with
      the updates' tree structure.

    Raises:
      ValueError: negative ``threshold`` or ``warmup_steps``; ``b2`` outside [0, 1].

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.spike_aware_clip(4.0, b2=0.5, warmup_steps=2)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> _, state = tx.update({"w": jnp.array([2.0, 2.0])}, state)  # v = (2, 2)
      >>> u, state = tx.update({"w": jnp.array([1.0, -5.0])}, state)  # bound sqrt(4 * 2)
      >>> u  # sqrt(8) = 2.8284271, to a unit in the last place
      {'w': Array([ 1.      , -2.828427], dtype=float32)}

    References:
      Huang, Zhu, Jin, Liu, Wang & Liu, `SPAM: Spike-Aware Adam with Momentum Reset for
      Stable LLM Training <https://arxiv.org/abs/2501.06842>`_, ICLR 2025.
    """
    check_threshold(threshold, "threshold")
    check_in_range(b2, "b2", 0.0, 1.0)
    check_nonnegative(warmup_steps, "warmup_steps")
    if nu_dtype is not None and not jnp.issubdtype(np.dtype(nu_dtype), jnp.floating):
        raise ValueError(f"`nu_dtype` must be a real floating dtype; got {nu_dtype!r}.")
    num.check_sharding_args(axis_name, partition_specs)

    def init_fn(params):
        nu = jax.tree.map(
            # zeros_like keeps the parameter's sharding (P-sized state sharded like it)
            lambda p: jnp.zeros_like(p, dtype=_nu_dtype(jnp.asarray(p), nu_dtype)),
            params,
        )
        return SpikeAwareClipState(stats=init_stats(), nu=nu, step=jnp.zeros((), np.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        leaves, treedef = jax.tree.flatten(updates)
        leaves = [jnp.asarray(x) for x in leaves]
        nus = treedef.flatten_up_to(state.nu)
        norm = num.global_pair(updates, 2, axis_name=axis_name, partition_specs=partition_specs)
        ok = norm.finite
        theta = num.resolve(threshold, state.stats.count, _F32)
        active = (state.step + 1 >= jnp.asarray(warmup_steps)) & ok
        beta = _f32(b2)
        root_c = jnp.sqrt(_bound_ratio(theta, beta))
        # While the gate is closed, theta_now and root_now are inf and no entry is a spike
        # (else every kernel would test the gate too). Computed once, read by every leaf's
        # kernels: XLA would copy the scalar chain into each of them, and its copy
        # insertion takes time in the total instruction count (5 s over 999 leaves).
        shut = lambda y: jnp.where(active, y, jnp.inf)
        ok, theta_now, root_now = num.one_kernel((ok, shut(theta), shut(root_c)))

        out, new_roots = [], []
        for x, r in zip(leaves, nus):
            wide = _wide_of(x, r)
            xw, rw = num._wide(num.own_read(x, 1), wide), num.as_dtype(num.own_read(r, 1), wide)
            new_r = num.as_dtype(lax.select(ok, _next_root(xw, rw, theta_now, beta), rw), r.dtype)
            new_roots.append(new_r)
            # The update reads only the new root: sqrt(theta v) = root_c * sqrt(v') on a
            # spike (see the docstring), so Adam's kernels, which compute it, read no state
            # that this step overwrites, and compute no square root.
            bound = lax.mul(num.as_dtype(root_now, wide), num.as_dtype(new_r, wide))
            # Its NaNs are xw's (a spike's test is false on NaN): widened bfloat16 NaNs.
            out.append(num.narrow(_clip_to_bound(xw, bound), x.dtype, widened=True))
        reducer = num.Reducer.build(updates, axis_name, partition_specs)
        if leaves:
            anchor = state.step.astype(_F32) * 0
            n_clipped, scale = lax.cond(
                active,
                lambda: _spike_statistics(
                    leaves, nus, new_roots, theta, beta, root_c, anchor, reducer
                ),
                # zeros_like / ones_like of the norm: per device inside shard_map without
                # axis_name, as the other branch's figures are.
                lambda: (jnp.zeros_like(norm.m, _F32), jnp.ones_like(norm.m, _F32)),
            )
            size = jnp.asarray(reducer.count([x.size for x in leaves]), _F32)
        else:
            n_clipped, size, scale = jnp.zeros((), _F32), jnp.zeros((), _F32), _f32(1.0)
        stats = next_stats(
            state.stats,
            norm=norm.value,
            threshold=jnp.nan,
            scale=scale,
            clipped=n_clipped / jnp.maximum(size, 1),
            any_clipped=n_clipped > 0,
            nonfinite=~ok,
        )
        new_state = SpikeAwareClipState(
            stats=stats,
            nu=jax.tree.unflatten(treedef, new_roots),
            step=jnp.where(ok, state.step + 1, state.step),
        )
        return jax.tree.unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
