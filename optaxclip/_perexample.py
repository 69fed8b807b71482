"""Per-example clipping (DP-SGD style), with Andrew et al.'s adaptive quantile threshold.

References: Abadi et al. 2016, "Deep Learning with Differential Privacy" (per-example
clipping); Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private Learning with
Adaptive Clipping" (the geometric quantile update).
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
    check_threshold,
    leaves_with_paths,
)


@named_state("per_example_clip")
class PerExampleClipState(NamedTuple):
    """State of :func:`per_example_clip`: O(1) scalars.

    ``max_norm`` is the clip norm :math:`C` the next step applies (float32): with
    ``target_quantile`` it moves by the geometric rule; otherwise it is the value the last
    step applied (the argument, or the schedule's value).
    """

    stats: ClipStats
    max_norm: jax.Array


def _check_batched(paths: list[tuple[str, jax.Array]]) -> int:
    """The batch size shared by every leaf's leading axis (errors name the leaf)."""
    batch = None
    for path, x in paths:
        shape = jnp.shape(x)
        if not shape:
            raise ValueError(
                f"per_example_clip: the update at '{path}' is a scalar, but every leaf needs a "
                "leading batch axis (per-example gradients, e.g. from "
                "`jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)`)."
            )
        if batch is None:
            batch = shape[0]
        elif shape[0] != batch:
            raise ValueError(
                f"per_example_clip: leaves disagree on the batch size: '{paths[0][0]}' has "
                f"{batch} examples (shape {jnp.shape(paths[0][1])}) but '{path}' has "
                f"{shape[0]} (shape {shape}). Every leaf needs the same leading batch axis."
            )
    if batch == 0:
        raise ValueError("per_example_clip: the batch is empty (leading axis of size 0).")
    return batch


def per_example_clip(
    max_norm: Any = 1.0,
    *,
    reduce: str = "mean",
    target_quantile: Any = None,
    learning_rate: Any = 0.2,
    axis_name: num.AxisName = None,
    partition_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Clips each example's gradient to a global L2 norm, then reduces over the batch.

    The incoming updates carry a leading batch axis (per-example gradients
    :math:`g_1, \dots, g_B`, e.g. from ``jax.vmap(jax.grad(loss), in_axes=(None, 0))``); the
    output has the parameters' shapes:

    .. math::
        \bar g = \frac{1}{B} \sum_{j=1}^{B} g_j \min\!\Big(1, \frac{C}{\|g_j\|}\Big)
        \quad (\texttt{reduce="mean"}; \ \texttt{"sum"} \text{ drops the } 1/B)

    where :math:`\|g_j\|` is example j's norm over every leaf together, computed with the
    robust accumulation of :func:`global_norm` (float32 entries of 1e30 or 1e-30 clip to the
    right direction). An example is clipped iff its norm is strictly above :math:`C`.

    With ``target_quantile`` :math:`\gamma`, :math:`C` follows Andrew et al.'s geometric
    rule: with :math:`b` the fraction of examples whose norm is at most :math:`C`
    (unclipped, the comparison is :math:`\le` as in TF Privacy),

    .. math::
        C \leftarrow C \exp\!\big(-\eta\,(b - \gamma)\big), \qquad \eta = \texttt{learning\_rate}

    and the new :math:`C` applies from the next step. The fraction is exact here (TF
    Privacy's ``NoPrivacyQuantileEstimatorQuery``): this transform adds no noise, to the
    average or to the count, so on its own it gives no differential privacy. For DP-SGD add
    Gaussian noise of std :math:`\sigma C / B` to the mean after it, and privatise the count
    (the paper's :math:`\sigma_b = B/20`) if the threshold adapts; account for the privacy
    spent with a DP accountant.

    A step where some example's norm is not finite passes that example through unclipped (so
    the reduced update is not finite either, for a guard such as :func:`skip_nonfinite` to
    catch), is counted in ``num_nonfinite``, and leaves :math:`C` as it was.

    Args:
      max_norm: :math:`C > 0`, the per-example clip norm: a float, a scalar array or (without
        ``target_quantile``) an ``optax.Schedule`` of the step count; with
        ``target_quantile``, the initial value :math:`C_0` (TFF's default is 0.1).
      reduce: ``"mean"`` (default) or ``"sum"`` over the batch.
      target_quantile: :math:`\gamma \in [0, 1]`, the fraction of examples to leave
        unclipped (0.5 in the paper); None (default) keeps :math:`C` fixed.
      learning_rate: :math:`\eta \ge 0` of the geometric update (0.2 in the paper).
      axis_name: inside ``shard_map``/``pmap``, the mesh axes the batch axis is sharded over
        (data parallelism: each device holds some of the examples, the parameters are
        replicated); the reduction and the statistics then cover the whole global batch.
      partition_specs: inside ``shard_map``, a pytree of ``PartitionSpec`` for the incoming
        per-example updates: the first entry of each spec shards the batch axis, the others
        the parameter's own dimensions (per-example norms add their partial sums over those).
        The output is laid out as the spec without its first entry.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its :class:`PerExampleClipState` holds
      :math:`C` and a :class:`ClipStats` whose ``norm`` is the mean per-example norm,
      ``threshold`` the :math:`C` applied this step, ``scale`` the smallest factor and
      ``clipped`` the fraction of examples clipped.

    Raises:
      ValueError: a leaf without a leading batch axis, leaves with different batch sizes,
        an empty batch, ``reduce`` not "mean" or "sum", ``target_quantile`` outside [0, 1],
        a non-positive ``max_norm`` or a schedule together with ``target_quantile``.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.per_example_clip(1.0)
      >>> per_example = {"w": jnp.array([[3.0, 4.0], [0.6, 0.8]])}  # norms 5 and 1
      >>> tx.update(per_example, tx.init({"w": jnp.zeros(2)}))[0]  # mean of both, clipped
      {'w': Array([0.6, 0.8], dtype=float32)}

    References:
      Abadi et al., `Deep Learning with Differential Privacy
      <https://arxiv.org/abs/1607.00133>`_, CCS 2016; Andrew, Thakkar, McMahan & Ramaswamy,
      `Differentially Private Learning with Adaptive Clipping
      <https://arxiv.org/abs/1905.03871>`_, NeurIPS 2021.
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f'`reduce` must be "mean" or "sum"; got {reduce!r}.')
    adaptive = target_quantile is not None
    check_threshold(max_norm, "max_norm", allow_zero=not adaptive)
    if adaptive:
        if callable(max_norm):
            raise TypeError(
                "`max_norm` must be a number when `target_quantile` is set (it is the initial "
                f"clip norm, which then adapts); got the schedule {max_norm!r}."
            )
        check_in_range(target_quantile, "target_quantile", 0.0, 1.0)
        check_nonnegative(learning_rate, "learning_rate")
    num.check_sharding_args(axis_name, partition_specs)

    def init_fn(params):
        del params
        start = 0 if callable(max_norm) else max_norm
        return PerExampleClipState(stats=init_stats(), max_norm=num.as_f32(start))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        paths = leaves_with_paths(updates)
        leaves, treedef = jax.tree.flatten(updates)
        leaves = [jnp.asarray(x) for x in leaves]
        if not leaves:
            return updates, state._replace(stats=empty_step(state.stats, state.max_norm))
        batch = _check_batched(paths)
        dtype = num.accum_dtype(leaves)
        if adaptive:
            limit = state.max_norm.astype(dtype)
        else:
            limit = jnp.maximum(num.resolve(max_norm, state.stats.count, dtype), 0)

        mesh = num.leaf_meshes(leaves, updates, axis_name, partition_specs)
        if mesh is None:
            batch_axes, param_axes = (), [()] * len(leaves)
        else:
            splits = [lm.split(range(1, x.ndim)) for lm, x in zip(mesh, leaves)]
            param_axes = [r for r, _ in splits]
            batch_axes = tuple(dict.fromkeys(a for _, k in splits for a in k))
            if any(k not in ((), batch_axes) for _, k in splits):
                raise ValueError(
                    "per_example_clip: every leaf's batch axis must be sharded over the same "
                    f"mesh axes; got {[k for _, k in splits]}."
                )
        global_batch = batch * num.axis_product(batch_axes)
        norms = _example_norms(leaves, param_axes, batch_axes, limit, dtype)
        p, q, clipped = num.global_factors(norms, limit)

        def clip_and_reduce(x):
            wide = np.float64 if dtype == np.float64 else np.float32
            shape = (batch,) + (1,) * (x.ndim - 1)
            if jnp.iscomplexobj(x):
                xw = x.astype(np.complex128 if wide == np.float64 else np.complex64)
                pw, qw = p.astype(xw.dtype), q.astype(xw.dtype)
            else:
                xw, pw, qw = x.astype(wide), p.astype(wide), q.astype(wide)
            total = jnp.sum(xw * pw.reshape(shape) * qw.reshape(shape), axis=0)
            return total

        sums = [clip_and_reduce(x) for x in leaves]
        if batch_axes:  # the data-parallel all-reduce of the gradient, one per leaf
            sums = lax.psum(sums, batch_axes)
        if reduce == "mean":
            sums = [s * jnp.asarray(1 / global_batch, s.real.dtype).astype(s.dtype) for s in sums]
        out = [s.astype(x.dtype) for s, x in zip(sums, leaves)]

        values = norms.value.astype(np.float32)
        finite = norms.finite
        f32 = lambda v: jnp.asarray(v).astype(np.float32)
        counts = [
            jnp.sum(jnp.where(finite, values, 0)),
            jnp.sum(clipped.astype(np.float32)),
            jnp.sum(finite & ~clipped).astype(np.float32),
            jnp.sum((~finite).astype(np.float32)),
        ]
        smallest = jnp.min(f32(p * q))
        if batch_axes:
            counts = num.packed(lax.psum, counts, batch_axes)
            smallest = lax.pmin(smallest, batch_axes)
        norm_sum, n_clipped, n_unclipped, n_nonfinite = counts
        ok = n_nonfinite == 0
        mean_norm = jnp.where(ok, norm_sum / global_batch, jnp.nan)
        new_limit = state.max_norm
        if adaptive:
            b = n_unclipped / global_batch
            step = jnp.exp(-num.as_f32(learning_rate) * (b - num.as_f32(target_quantile)))
            new_limit = jnp.where(ok, state.max_norm * step, state.max_norm)
        else:
            new_limit = num.as_f32(limit)
        stats = next_stats(
            state.stats,
            norm=mean_norm,
            threshold=limit,
            scale=smallest,
            clipped=n_clipped / global_batch,
            any_clipped=n_clipped > 0,
            nonfinite=~ok,
        )
        return jax.tree.unflatten(treedef, out), PerExampleClipState(stats, new_limit)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _example_norms(
    leaves: list[jax.Array],
    param_axes: list[tuple[str, ...]],
    batch_axes: tuple[str, ...],
    limit: jax.Array,
    dtype: np.dtype,
) -> num.Norm:
    """Each example's global L2 norm as a pair of ``(B,)`` arrays.

    One fused reduction per leaf; a rescaled pass (``lax.cond``) only when some example's
    sum overflowed, or underflowed where it could change that example's clipping decision.
    """
    batch = leaves[0].shape[0]
    zero = jnp.zeros((), dtype)
    rows = lambda x: tuple(range(1, x.ndim))
    sizes = [math.prod(x.shape[1:]) * num.axis_product(a) for x, a in zip(leaves, param_axes)]
    n = max(sum(sizes), 1)

    reducer = num.Reducer.from_axes(param_axes)  # (B,) partials: one collective per axis set

    def per_example_sum(xs, scale=None):
        parts = []
        for x in xs:
            xw = num._wide(x, dtype)
            if scale is not None:
                xw = num.times_inverse(xw, scale.reshape((batch,) + (1,) * (x.ndim - 1)))
            parts.append(jnp.sum(num._magnitude(xw, 2, dtype), axis=rows(x)))
        return reducer.sum(parts)

    def rescue(xs) -> num.Norm:
        maxes = [jnp.max(jnp.abs(num._wide(x, dtype)), axis=rows(x), initial=zero) for x in xs]
        m = reducer.max(maxes)
        ok = (m >= jnp.finfo(dtype).tiny) & jnp.isfinite(m)
        s = per_example_sum(xs, jnp.where(ok, m, 1))
        degenerate = num._from_max(m)
        return num.Norm(jnp.where(ok, m, degenerate.m), jnp.where(ok, jnp.sqrt(s), degenerate.r))

    s = per_example_sum(leaves)
    floor = num._underflow_floor(n, dtype)
    zero_ok = limit >= num.zero_bound(n, 2, dtype)
    bad = jnp.isinf(s) | ((s > 0) & (s < floor)) | ((s == 0) & ~zero_ok)
    any_bad = jnp.any(bad)
    if batch_axes:  # devices hold different examples: decide together
        any_bad = lax.pmax(any_bad.astype(np.int32), batch_axes) > 0
    return lax.cond(any_bad, rescue, lambda xs: num.Norm(jnp.ones_like(s), jnp.sqrt(s)), leaves)
