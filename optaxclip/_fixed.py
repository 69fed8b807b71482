"""Fixed-threshold clipping: by value, by global norm, by leaf norm, by block RMS.

References: Mikolov 2012 (value clipping); Pascanu, Mikolov & Bengio 2013, "On the
difficulty of training recurrent neural networks" (global norm); Keras ``clipnorm`` (per
leaf); Shazeer & Stern 2018, "Adafactor" (block RMS).
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
from optaxclip._stats import ClipStats, init_stats, named_state, next_stats
from optaxclip._tree import check_threshold, stacked_counts

Threshold = float | jax.Array | optax.Schedule


def _init(state_cls):
    def init_fn(params):
        del params
        return state_cls(stats=init_stats())

    return init_fn


def _round_down(limit: jax.Array, dtype: np.dtype) -> jax.Array:
    """The largest value of ``dtype`` that is <= ``limit`` (so clipped entries never exceed it)."""
    low = limit.astype(dtype)
    return jnp.where(low.astype(limit.dtype) > limit, jnp.nextafter(low, jnp.zeros_like(low)), low)


# ---------------------------------------------------------------------------
# clip_by_value
# ---------------------------------------------------------------------------


def _value_statistics(
    chunks: list[jax.Array],
    reducer: num.Reducer,
    c: jax.Array,
    bounds: dict[Any, jax.Array],
    nan_seen: jax.Array,
    anchor: jax.Array,
    dtype: np.dtype,
) -> tuple[jax.Array, jax.Array]:
    """The largest magnitude and the number of entries above the bound, over ``chunks``;
    NaN entries are left out of both.

    Each is one reduction per chunk that XLA fuses with its element-wise producer (on CPU, a
    compare or a NaN test would write a full-size mask to memory first). The count reads
    the chunk through a barrier of its own, as the max of a bfloat16 or float16 chunk does:
    XLA would merge two kernels' ``|x|``, or their widening converts, into one array in
    memory. An entry above the bound ``b`` counts ``sign(max(|x| - b, 0))``: 1 for every
    ``|x| > b`` (subnormal differences aside, which the CPU flushes), NaN for a NaN entry.
    Entries of bfloat16 and float16 chunks are widened first and count ``min(max(|x| - b,
    0) / tiny, 1)`` (the difference of two distinct floats is at least ``tiny``): XLA's
    CPU backend runs a sign of a widened entry slower than that clamp, and a float32 sign
    faster. Paired, on the 25M-entry tree: float32 10.0 ms against 15.3 ms for the clamp;
    bfloat16 11.4 ms widened against 13.2 ms in bfloat16, and its max 5.0 ms widened
    against 5.9 ms. The count runs only when the largest magnitude is above a bound. A
    step with a NaN entry (``nan_seen``: the sum of squares is NaN), or a NaN count
    (``inf`` against an infinite bound), takes the exact branch instead: per chunk, one
    two-operand reduction of the finite maximum and the count
    (:func:`optaxclip._numerics.fused_reduce`), which keeps no mask in memory. Each
    chunk's count reads its own scalars
    (:func:`optaxclip._numerics.own_scalars`, ``anchor`` a zero that XLA cannot fold).
    """
    zero = jnp.zeros((), dtype)
    if not chunks:
        return zero, zero
    real = [i for i, x in enumerate(chunks) if jnp.issubdtype(x.dtype, jnp.floating)]
    wide_abs = lambda x: jnp.abs(num._wide(x, dtype))
    is_narrow = lambda x: x.dtype.itemsize < 4  # bfloat16, float16: computed widened
    maxes = [
        jnp.max(wide_abs(num.own_read(x, 1)))
        if i not in real or is_narrow(x)
        else jnp.max(jnp.abs(x)).astype(dtype)
        for i, x in enumerate(chunks)
    ]
    largest = reducer.max(maxes)

    def exact():
        # |x| feeds one kernel per chunk; two reductions of it would keep it in memory.
        def finite_max_and_count(x):
            a = wide_abs(x)
            over = (a > bounds.get(x.dtype, c).astype(dtype)).astype(np.int32)
            return num.fused_reduce(
                (jnp.where(jnp.isnan(a), 0, a), over), (0, 0), (lax.max, lax.add)
            )

        finite_max, over = zip(*map(finite_max_and_count, chunks))
        return reducer.max(list(finite_max)), reducer.sum([n.astype(dtype) for n in over])

    def fast():
        inv_tiny = 1 / jnp.finfo(dtype).tiny
        dtypes = [dtype if is_narrow(chunks[i]) else chunks[i].dtype for i in real]
        rows = [
            (bounds[x.dtype], 0, inv_tiny, 1) if is_narrow(x) else (bounds[x.dtype], 0)
            for x in (chunks[i] for i in real)
        ]
        shapes = [chunks[i].shape for i in real]
        copies = dict(zip(real, num.own_scalars(rows, dtypes, anchor, shapes)))
        overs = []
        for i, x in enumerate(chunks):
            if i in real and is_narrow(x):
                b, z, inv, one = copies[i]
                a = wide_abs(num.own_read(x, 2))
                overs.append(jnp.sum(jnp.minimum(jnp.maximum(a - b, z) * inv, one)))
            elif i in real:
                b, z = copies[i]
                a = jnp.abs(num.barrier(x, 2))
                overs.append(jnp.sum(jnp.sign(jnp.maximum(a - b, z)), dtype=dtype))
            else:  # complex (clipped by magnitude) and integer leaves
                overs.append(jnp.sum(jnp.sign(jnp.fmax(wide_abs(x) - c, 0))))
        n = reducer.sum(overs)
        return lax.cond(jnp.isnan(n), exact, lambda: (largest, n))

    lowest = num.stacked(jnp.min, [c.astype(dtype), *(b.astype(dtype) for b in bounds.values())])
    branch = jnp.where(nan_seen, 2, jnp.where(largest > lowest, 1, 0))
    # zeros_like: the count keeps the type of ``largest`` (varying per device inside
    # shard_map without axis_name), as the other branches' does.
    return lax.switch(branch, [lambda: (largest, jnp.zeros_like(largest)), fast, exact])


@named_state("clip_by_value")
class ClipByValueState(NamedTuple):
    """State of :func:`clip_by_value`: O(1) scalars."""

    stats: ClipStats


def clip_by_value(
    max_value: Threshold, *, axis_name: num.AxisName = None, partition_specs: Any = None
) -> optax.GradientTransformationExtraArgs:
    r"""Clips every entry of the update to ``[-max_value, max_value]``.

    .. math::
        u_j \leftarrow \min(\max(u_j, -c), c), \qquad c = \texttt{max\_value}

    NaN entries pass through unchanged and :math:`\pm\infty` become :math:`\pm c` (value
    clipping hides infinite gradients; put :func:`skip_nonfinite` in front to catch them).
    The bound is applied in each leaf's dtype, rounded down, so no output exceeds it.

    Args:
      max_value: the bound :math:`c \ge 0`: a float, a scalar array, or an ``optax.Schedule``
        of the step count.
      axis_name: inside ``shard_map``/``pmap``, the mesh axes every leaf is sharded over (the
        clipping is element-wise; only the statistics are reduced over the devices).
      partition_specs: inside ``shard_map``, a pytree of ``PartitionSpec`` (or a prefix).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state holds a :class:`ClipStats`
      (O(1) scalars). ``clipped`` is the fraction of entries clipped and ``scale`` is
      :math:`c / \max_j |u_j|` when anything was clipped, NaN entries left out of both. The
      statistics cost three reads of the update (the norm, the largest entry and, only
      when some entry is above :math:`c`, the count) besides the clip itself.

    Raises:
      ValueError: ``max_value`` is negative, NaN or not a scalar.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.clip_by_value(1.0)
      >>> g = {"w": jnp.array([-3.0, 0.5, 4.0])}
      >>> tx.update(g, tx.init(g))[0]
      {'w': Array([-1. ,  0.5,  1. ], dtype=float32)}

    References:
      Mikolov, "Statistical Language Models Based on Neural Networks", PhD thesis, Brno
      University of Technology, 2012.
    """
    check_threshold(max_value, "max_value")
    num.check_sharding_args(axis_name, partition_specs)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        leaves = [jnp.asarray(x) for x in jax.tree.leaves(updates)]
        dtype = num.accum_dtype(leaves)
        c = jnp.maximum(num.resolve(max_value, state.stats.count, dtype), 0)
        sharding = dict(axis_name=axis_name, partition_specs=partition_specs)
        norm = num.global_pair(updates, 2, **sharding)
        reducer = num.Reducer.build(updates, axis_name, partition_specs)
        chunks, chunk_reducer = reducer.chunks(leaves)
        # The bound applied to each floating dtype, computed once for every leaf.
        real = sorted({x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)}, key=str)
        bounds = dict(zip(real, num.materialize(*[_round_down(c, d) for d in real])))
        # A NaN entry makes the sum of squares NaN (even across devices, where a max may
        # drop it): the statistics then leave NaN entries out.
        anchor = state.stats.count.astype(dtype) * 0
        largest, n_over = _value_statistics(
            chunks, chunk_reducer, c, dict(bounds), jnp.isnan(norm.value), anchor, dtype
        )
        p, q, _ = num.global_factors(num._from_max(largest), c)
        any_clipped = n_over > 0
        size = reducer.count([x.size for x in leaves])
        fraction = n_over / jnp.maximum(jnp.asarray(size, dtype), 1)

        def bound_for(leaf_dtype):
            if leaf_dtype not in bounds:  # complex leaves clip their magnitude
                bounds[leaf_dtype] = num.materialize(_round_down(c, leaf_dtype))[0]
            return bounds[leaf_dtype]

        def clip_leaf(x):
            x = jnp.asarray(x)
            if jnp.iscomplexobj(x):  # clip the magnitude, keep the phase
                mag = jnp.abs(x)
                bound = bound_for(mag.dtype)
                factor = jnp.where(mag > bound, bound / jnp.where(mag > bound, mag, 1), 1)
                return (x * factor.astype(x.dtype)).astype(x.dtype)
            if not jnp.issubdtype(x.dtype, jnp.floating):
                return jnp.clip(x, -c, c).astype(x.dtype)
            bound = bound_for(x.dtype)
            if x.dtype == jnp.bfloat16:  # clamped in float32, whose result is a bfloat16
                wide, b = num.own_read(x, 3).astype(np.float32), bound.astype(np.float32)
                return num.narrow(jnp.clip(wide, -b, b), x.dtype, exact=True)
            return jnp.clip(num.own_read(x, 3), -bound, bound).astype(x.dtype)

        updates = jax.tree.map(clip_leaf, updates)
        stats = next_stats(
            state.stats,
            norm=norm.value,
            threshold=c,
            scale=p * q,
            clipped=fraction,
            any_clipped=any_clipped,
            nonfinite=~norm.finite,
        )
        return updates, ClipByValueState(stats=stats)

    return optax.GradientTransformationExtraArgs(_init(ClipByValueState), update_fn)


# ---------------------------------------------------------------------------
# clip_by_global_norm
# ---------------------------------------------------------------------------


def clip_to_norm(
    updates: Any, stats: ClipStats, norm: num.Norm, limit: jax.Array
) -> tuple[Any, ClipStats]:
    """``updates``, of global norm ``norm``, scaled to a norm of at most ``limit``, and the
    next :class:`ClipStats`: :func:`clip_by_global_norm` after its norm (the benchmarks
    call it with a norm taken without the rescue, to time the rescue alone)."""
    p, q, clipped = num.global_factors(norm, limit)
    updates = jax.tree.map(lambda x: num.scale_leaf(jnp.asarray(x), p, q), updates)
    stats = next_stats(
        stats,
        norm=norm.value,
        threshold=limit,
        scale=p * q,
        clipped=clipped,
        any_clipped=clipped,
        nonfinite=~norm.finite,
    )
    return updates, stats


@named_state("clip_by_global_norm")
class ClipByGlobalNormState(NamedTuple):
    """State of :func:`clip_by_global_norm`: O(1) scalars."""

    stats: ClipStats


def clip_by_global_norm(
    max_norm: Threshold,
    *,
    ord: Any = 2,
    axis_name: num.AxisName = None,
    partition_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Scales the whole update so its global norm is at most ``max_norm``.

    .. math::
        u \leftarrow u \cdot \min\!\Big(1, \frac{c}{\|u\|}\Big), \qquad c = \texttt{max\_norm}

    with :math:`\|u\|` the norm of all leaves together (:func:`global_norm`). Clips iff
    :math:`\|u\| > c` (no epsilon), multiplying by the factor so the scaling fuses into the
    optimizer's own elementwise pass. The norm is accumulated in float32 and never
    overflows or underflows: float32 entries of ``1e30`` are clipped to the right direction.
    A non-finite norm (a NaN or infinite entry) leaves the update unchanged and is counted
    in ``ClipStats.num_nonfinite``: put :func:`skip_nonfinite` around the optimizer to skip
    such steps. Each output leaf keeps its dtype.

    Args:
      max_norm: the threshold :math:`c \ge 0`: a float, a scalar array, or an
        ``optax.Schedule`` of the step count. Works under ``optax.inject_hyperparams``.
      ord: the norm: 2 (default), 1 or inf.
      axis_name: inside ``shard_map``/``pmap``, the mesh axes every leaf is sharded over.
      partition_specs: inside ``shard_map``, a pytree of ``PartitionSpec`` (or a prefix)
        saying how each leaf is sharded; see :func:`global_norm`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state holds a :class:`ClipStats`
      (O(1) scalars).

    Raises:
      ValueError: ``max_norm`` negative, NaN or not a scalar; ``ord`` not 1, 2 or inf; both
        ``axis_name`` and ``partition_specs``.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.clip_by_global_norm(1.0)
      >>> g = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
      >>> tx.update(g, tx.init(g))[0]
      {'a': Array([0.6], dtype=float32), 'b': Array([0.8], dtype=float32)}

    References:
      Pascanu, Mikolov & Bengio, `On the difficulty of training recurrent neural networks
      <https://arxiv.org/abs/1211.5063>`_, ICML 2013.
    """
    check_threshold(max_norm, "max_norm")
    ord = num.canonical_ord(ord)
    num.check_sharding_args(axis_name, partition_specs)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        norm = num.global_pair(updates, ord, axis_name=axis_name, partition_specs=partition_specs)
        limit = num.resolve(max_norm, state.stats.count, norm.m.dtype)
        updates, stats = clip_to_norm(updates, state.stats, norm, limit)
        return updates, ClipByGlobalNormState(stats=stats)

    return optax.GradientTransformationExtraArgs(_init(ClipByGlobalNormState), update_fn)


# ---------------------------------------------------------------------------
# Per-leaf clipping
# ---------------------------------------------------------------------------


def _per_leaf_update(updates, state, limit_of, ord, threshold, sharding, stacked_axes, name):
    """Clips each leaf (or stacked slice) to ``limit_of(size, dtype)``; the updates and stats.

    ``size`` is the logical number of entries of one slice (all shards together).
    """
    leaves, treedef = jax.tree.flatten(updates)
    leaves = [jnp.asarray(x) for x in leaves]
    dtype = num.accum_dtype(leaves)
    stacked = stacked_counts(updates, stacked_axes, name)
    axes = [tuple(range(k, x.ndim)) for k, x in zip(stacked, leaves)]
    mesh = num.leaf_meshes(leaves, updates, *sharding)
    splits = [lm.split(a) for lm, a in zip(mesh, axes)] if mesh else [((), ())] * len(leaves)
    sizes = [
        math.prod(x.shape[k:]) * num.axis_product(r)
        for x, k, (r, _) in zip(leaves, stacked, splits)
    ]
    limits_for = lambda n: limit_of(n, dtype)

    def zero_ok(sums, ord, sizes):
        # A slice whose sum underflowed to 0 has a norm below zero_bound: no clip can change.
        return [limits_for(n) >= num.zero_bound(n, ord, dtype) for n in sizes]

    norms = num.unit_pairs(leaves, ord, axes, zero_ok=zero_ok, mesh=mesh)
    factors, total, scale, n_clipped, n_units = num.unit_clip(
        leaves, norms, limits_for, sizes, ord, [k for _, k in splits]
    )
    out = [num.scale_leaf(x, p, q) for x, (p, q, _) in zip(leaves, factors)]
    stats = next_stats(
        state.stats,
        norm=total.value,
        threshold=threshold(dtype),
        scale=scale,
        clipped=n_clipped / max(n_units, 1),
        any_clipped=n_clipped > 0,
        nonfinite=~total.finite,
    )
    return jax.tree.unflatten(treedef, out), stats


@named_state("clip_by_leaf_norm")
class ClipByLeafNormState(NamedTuple):
    """State of :func:`clip_by_leaf_norm`: O(1) scalars."""

    stats: ClipStats


def clip_by_leaf_norm(
    max_norm: Threshold,
    *,
    ord: Any = 2,
    stacked_axes: Any = None,
    axis_name: num.AxisName = None,
    partition_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Scales each leaf (tensor) separately so its norm is at most ``max_norm``.

    .. math::
        u_i \leftarrow u_i \cdot \min\!\Big(1, \frac{c}{\|u_i\|}\Big)
        \quad \text{for every leaf } u_i, \qquad c = \texttt{max\_norm}

    This is "per-layer" clipping, Keras' ``clipnorm``. Norms use the robust float32
    accumulation of :func:`global_norm`; a leaf with a non-finite norm passes through.

    Args:
      max_norm: the threshold :math:`c \ge 0` (float, scalar array or schedule).
      ord: 2 (default), 1 or inf.
      stacked_axes: layers stacked by ``nnx.scan``/``nn.scan``: how many leading axes of a
        leaf index layers, as an int for every leaf, a pytree prefix of ``None | int``, or a
        callable of the ``/``-joined leaf path; each slice is then clipped as its own tensor
        (``stacked_axes=1`` on an ``(L, n, m)`` kernel acts as L separate ``(n, m)`` leaves).
      axis_name: inside ``shard_map``/``pmap``, the mesh axes every leaf is sharded over;
        each leaf's norm is then the whole (logical) tensor's, not the shard's.
      partition_specs: inside ``shard_map``, a pytree of ``PartitionSpec`` (or a prefix):
        each leaf's partial sum is added over the mesh axes its spec names.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state holds a :class:`ClipStats`
      (O(1) scalars). ``clipped`` is the fraction of leaves (slices) clipped; ``norm`` the
      global norm.

    Raises:
      ValueError: ``max_norm`` negative, NaN or not a scalar; ``ord`` not 1, 2 or inf.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.clip_by_leaf_norm(1.0)
      >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
      >>> tx.update(g, tx.init(g))[0]
      {'a': Array([0.6, 0.8], dtype=float32), 'b': Array([0.5], dtype=float32)}

    References:
      Keras ``Optimizer(clipnorm=...)``; Pascanu, Mikolov & Bengio, `On the difficulty of
      training recurrent neural networks <https://arxiv.org/abs/1211.5063>`_, ICML 2013.
    """
    check_threshold(max_norm, "max_norm")
    ord = num.canonical_ord(ord)
    num.check_sharding_args(axis_name, partition_specs)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        count = state.stats.count
        updates, stats = _per_leaf_update(
            updates,
            state,
            lambda n, dtype: num.resolve(max_norm, count, dtype),
            ord,
            lambda dtype: num.resolve(max_norm, count, dtype),
            (axis_name, partition_specs),
            stacked_axes,
            "clip_by_leaf_norm",
        )
        return updates, ClipByLeafNormState(stats=stats)

    return optax.GradientTransformationExtraArgs(_init(ClipByLeafNormState), update_fn)


@named_state("clip_by_block_rms")
class ClipByBlockRmsState(NamedTuple):
    """State of :func:`clip_by_block_rms`: O(1) scalars."""

    stats: ClipStats


def clip_by_block_rms(
    max_rms: Threshold,
    *,
    stacked_axes: Any = None,
    axis_name: num.AxisName = None,
    partition_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Scales each leaf (block) so its root-mean-square is at most ``max_rms``.

    .. math::
        u_i \leftarrow \frac{u_i}{\max\big(1, \mathrm{RMS}(u_i) / c\big)}, \qquad
        \mathrm{RMS}(u_i) = \sqrt{\tfrac{1}{n_i} \textstyle\sum_j |u_{ij}|^2},
        \qquad c = \texttt{max\_rms}

    Adafactor's update clipping when placed after the preconditioner (as in
    ``optax.adafactor``); gradient clipping by RMS when placed first. A 0-size leaf has RMS 0.

    Args:
      max_rms: the threshold :math:`c \ge 0` (float, scalar array or schedule).
      stacked_axes: how many leading axes index stacked layers (an int, a pytree prefix of
        ``None | int`` or a callable of the leaf path): each slice is its own block.
      axis_name: inside ``shard_map``/``pmap``, the mesh axes every leaf is sharded over;
        each block's RMS is then the whole (logical) tensor's, not the shard's.
      partition_specs: inside ``shard_map``, a pytree of ``PartitionSpec`` (or a prefix).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state holds a :class:`ClipStats`
      (O(1) scalars). ``clipped`` is the fraction of leaves clipped; ``norm`` the global
      L2 norm.

    Raises:
      ValueError: ``max_rms`` negative, NaN or not a scalar.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.clip_by_block_rms(1.0)
      >>> g = {"w": jnp.array([3.0, 4.0, 0.0, 0.0])}  # RMS 2.5
      >>> tx.update(g, tx.init(g))[0]
      {'w': Array([1.2, 1.6, 0. , 0. ], dtype=float32)}

    References:
      Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
      <https://arxiv.org/abs/1804.04235>`_, ICML 2018.
    """
    check_threshold(max_rms, "max_rms")
    num.check_sharding_args(axis_name, partition_specs)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        count = state.stats.count
        updates, stats = _per_leaf_update(
            updates,
            state,
            lambda n, dtype: num.resolve(max_rms, count, dtype) * np.sqrt(n).astype(dtype),
            2,
            lambda dtype: num.resolve(max_rms, count, dtype),
            (axis_name, partition_specs),
            stacked_axes,
            "clip_by_block_rms",
        )
        return updates, ClipByBlockRmsState(stats=stats)

    return optax.GradientTransformationExtraArgs(_init(ClipByBlockRmsState), update_fn)
