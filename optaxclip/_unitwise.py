"""Unit-wise adaptive gradient clipping (AGC).

Reference: Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image Recognition
Without Normalization", ICML 2021 (NFNets).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.shard_alike import shard_alike

from optaxclip import _numerics as num
from optaxclip._stats import ClipStats, init_stats, named_state, next_stats
from optaxclip._tree import (
    check_nonnegative,
    check_threshold,
    leaves_with_paths,
    stacked_counts,
)


def _unit_axes(shape: tuple[int, ...], axis: Any, path: str) -> tuple[int, ...]:
    """The axes reduced to get one norm per unit (optax's and NFNets' convention)."""
    ndim = len(shape)
    if axis is not None:
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        if any(not -ndim <= a < ndim for a in axes):
            raise ValueError(
                f"adaptive_grad_clip: `axis={axis!r}` is out of range for the leaf "
                f"'{path}' of shape {shape}."
            )
        return tuple(sorted(a % ndim for a in axes))
    if sum(d != 1 for d in shape) <= 1:  # scalars and vectors: the whole tensor
        return tuple(range(ndim))
    if ndim in (2, 3):  # (in, out) linear, (in, heads, out) multi-head: one unit per column
        return (0,)
    if ndim in (4, 5):  # HWIO / DHWIO convolution kernels: one unit per output channel
        return tuple(range(ndim - 1))
    raise ValueError(
        f"adaptive_grad_clip: cannot tell the units of the leaf '{path}' of shape {shape} "
        f"(rank {ndim}); pass `axis=` with the axes to reduce over, for example "
        f"axis={tuple(range(ndim - 1))}."
    )


@named_state("adaptive_grad_clip")
class AdaptiveGradClipState(NamedTuple):
    """State of :func:`adaptive_grad_clip`: O(1) scalars."""

    stats: ClipStats


def adaptive_grad_clip(
    clipping: Any = 0.01,
    *,
    eps: Any = 1e-3,
    axis: Any = None,
    stacked_axes: Any = None,
    axis_name: num.AxisName = None,
    partition_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Unit-wise adaptive gradient clipping (AGC): bounds each unit's gradient by its weights.

    For each unit (an output column of a linear kernel, an output channel of a conv
    kernel, a whole vector or scalar), with :math:`W` the current parameters:

    .. math::
        G_u \leftarrow G_u \cdot \min\!\Big(1,
        \frac{\lambda \max(\|W_u\|_F, \epsilon)}{\|G_u\|_F}\Big),
        \qquad \lambda = \texttt{clipping}, \ \epsilon = \texttt{eps}

    Units: leaves with at most one non-unit dimension are one unit; rank 2 and 3 reduce
    over axis 0; rank 4 (HWIO) over axes (0, 1, 2); rank 5 (DHWIO) over (0, 1, 2, 3);
    ``axis=`` overrides this for every leaf. Clips iff the gradient norm is strictly above
    the bound, with no division guard (the reference's ``max(norm, 1e-6)`` never engages on
    a clipped unit). Equal to ``optax.adaptive_grad_clip`` on ordinary inputs. Put it before
    ``optax.add_decayed_weights`` to match the NFNets reference, and leave the final
    classifier layer out of it (``optax.masked`` or :func:`per_layer`), as the paper advises.

    Args:
      clipping: :math:`\lambda \ge 0`, the largest allowed ratio of gradient norm to weight
        norm per unit (NFNets uses 0.01): a float, a scalar array or an ``optax.Schedule`` of
        the step count.
      eps: :math:`\epsilon \ge 0`, the floor on the weight norm, so zero-initialised weights
        can still move.
      axis: an int or tuple of ints: the axes to reduce over in every leaf, instead of the
        rank-based default.
      stacked_axes: how many leading axes of a leaf index stacked layers (``nnx.scan`` /
        ``nn.scan``): an int, a pytree prefix of ``None | int`` or a callable of the leaf
        path. Units are then found in each layer's slice (``stacked_axes=1`` on an
        ``(L, n, m)`` kernel acts as L separate ``(n, m)`` kernels, one unit per column of
        each), where the default would take ``(L, n, m)`` for a multi-head kernel and
        reduce over the layers. ``axis=`` counts the slice's axes.
      axis_name: inside ``shard_map``/``pmap``, the mesh axes every leaf (and parameter) is
        sharded over along its first dimension (``P(axis_name)``); unit norms are then the
        whole (logical) tensor's.
      partition_specs: inside ``shard_map``, a pytree of ``PartitionSpec`` for the updates
        (the parameters are laid out the same way): a unit's partial sums are added over the
        mesh axes that shard its reduced dimensions (row-parallel kernels); units split by a
        kept dimension (column-parallel kernels) need no collective, and their statistics are
        combined across the devices.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``; its
      state holds a :class:`ClipStats` (O(1) scalars). ``clipped`` is the fraction of units
      clipped; ``threshold`` is NaN (one bound per unit).

    Raises:
      ValueError: ``update`` called without ``params``; a leaf whose units cannot be told
        from its rank (pass ``axis=``); ``params`` not matching the updates' structure;
        negative ``clipping`` or ``eps``.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.adaptive_grad_clip(0.1)
      >>> params = {"w": jnp.array([3.0, 4.0])}    # norm 5: bound 0.5
      >>> grads = {"w": jnp.array([0.0, 1.0])}
      >>> tx.update(grads, tx.init(params), params)[0]
      {'w': Array([0. , 0.5], dtype=float32)}

    References:
      Brock, De, Smith & Simonyan, `High-Performance Large-Scale Image Recognition Without
      Normalization <https://arxiv.org/abs/2102.06171>`_, ICML 2021.
    """
    check_threshold(clipping, "clipping")
    check_nonnegative(eps, "eps")
    num.check_sharding_args(axis_name, partition_specs)

    def init_fn(params):
        del params
        return AdaptiveGradClipState(stats=init_stats())

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "adaptive_grad_clip needs the current parameters: call "
                "`tx.update(updates, state, params)` (optax.chain and flax nnx.Optimizer pass "
                "them on); got `params=None`."
            )
        g_paths = leaves_with_paths(updates)
        treedef = jax.tree.structure(updates)
        try:
            p_leaves = treedef.flatten_up_to(params)
        except (ValueError, TypeError) as e:
            raise ValueError(
                "adaptive_grad_clip: `params` must have the same tree structure as the updates; "
                f"{e}"
            ) from None
        g_leaves = [jnp.asarray(x) for _, x in g_paths]
        p_leaves = [jnp.asarray(x) for x in p_leaves]
        for (path, g), p in zip(g_paths, p_leaves):
            if jnp.shape(g) != p.shape:
                raise ValueError(
                    f"adaptive_grad_clip: the update at '{path}' has shape {jnp.shape(g)} but "
                    f"its parameter has shape {p.shape}."
                )
        mesh = num.leaf_meshes(g_leaves, updates, axis_name, partition_specs)
        # Units follow the logical (whole-tensor) shape, not the shard's.
        shapes = [jnp.shape(x) for x in g_leaves]
        if mesh:
            shapes = [
                tuple(n * num.axis_product(a) for n, a in zip(shape, lm.dims))
                for shape, lm in zip(shapes, mesh)
            ]
        stacked = stacked_counts(updates, stacked_axes, "adaptive_grad_clip")
        axes = [
            tuple(k + a for a in _unit_axes(shape[k:], axis, path))
            for shape, k, (path, _) in zip(shapes, stacked, g_paths)
        ]
        keep = [lm.split(a)[1] for lm, a in zip(mesh, axes)] if mesh else [()] * len(axes)
        dtype = num.accum_dtype(g_leaves + p_leaves)
        lam = num.resolve(clipping, state.stats.count, dtype)
        floor = jnp.asarray(eps).astype(dtype)
        n = len(g_leaves)

        def zero_ok(sums, ord, sizes):
            # Units whose sum underflowed to exactly 0 skip the rescaled pass when no
            # decision can change: every limit is at least min(clipping, 1) * eps (a weight
            # norm is floored at eps), so a norm below the bound of a zero sum decides
            # nothing. (Elementwise in the sizes: the units may sit on one flat vector.)
            low = jnp.minimum(lam, 1) * floor
            return [
                jnp.broadcast_to(low >= num.zero_bound(k, ord, dtype), jnp.shape(s))
                for s, k in zip(sums, sizes)
            ]

        norms = num.unit_pairs(
            g_leaves + p_leaves,
            2,
            axes + axes,
            zero_ok=zero_ok,
            mesh=None if mesh is None else mesh + mesh,
        )
        g_norms, p_norms = norms[:n], norms[n:]
        limit = lambda p_norm: lam * jnp.maximum(p_norm.value, floor)
        # Leaves whose units sit on the flat vector (all but explicitly sharded ones) and
        # leaves of one unit have their factors computed together on one vector: per-leaf
        # chains of scalar work cost kernels to compile and to run (on the 147-leaf tree,
        # 2,235 kernels against optax's 1,102; together, 505). One-unit leaves come first,
        # so their factors are next to each other (see leaf_pieces). The factors end in a
        # division, so each leaf's kernel reads them rather than recomputing them per entry
        # (see clip_factors); no sort is needed to keep them apart.
        flat = getattr(norms, "flat", None)  # an empty tree's norms are a plain list
        on_vec = set(flat.order) if flat is not None else set()
        units = lambda i: int(jnp.size(g_norms[i].r))
        together = [
            i
            for i in range(n)
            if not keep[i] and (units(i) == 1 or (i in on_vec and n + i in on_vec))
        ]
        together.sort(key=lambda i: units(i) > 1)
        several = [i for i in range(n) if i not in set(together)]
        factors: list = [None] * n
        parts, part_norms, part_keep = [], [], []
        if together:
            g_vec = num.in_leaf_order(norms, together)
            p_vec = num.in_leaf_order(norms, [n + i for i in together])
            vec_factors = num.clip_factors(g_vec, limit(p_vec))
            counts = [units(i) for i in together]
            starts = np.cumsum([0, *counts[:-1]]).tolist()
            spans = num.leaf_pieces(vec_factors, list(zip(starts, counts)))
            for i, span in zip(together, spans):
                factors[i] = tuple(v.reshape(jnp.shape(g_norms[i].r)) for v in span)
            parts.append(vec_factors)
            part_norms.append(g_vec)
            part_keep.append(())
        for i in several:
            factors[i] = num.clip_factors(g_norms[i], limit(p_norms[i]))
            parts.append(factors[i])
            part_norms.append(g_norms[i])
            part_keep.append(keep[i])
        out = [num.scale_leaf(x, p, q) for x, (p, q, _) in zip(g_leaves, factors)]
        for i in together:
            if units(i) > 1:
                # Its factors come from the vector shared with the other leaves, whose
                # layout GSPMD's propagation may give them (a column-sharded kernel's units
                # sit beside replicated ones); the update keeps the gradient's.
                out[i] = shard_alike(g_leaves[i], out[i])[1]
        # Units split over devices (kept dimensions sharded) are counted once.
        total, scale, clipped_units, n_units = num.summarize_units(part_norms, parts, 2, part_keep)
        stats = next_stats(
            state.stats,
            norm=total.value,
            threshold=jnp.nan,
            scale=scale,
            clipped=clipped_units / max(n_units, 1),
            any_clipped=clipped_units > 0,
            nonfinite=~total.finite,
        )
        return jax.tree.unflatten(treedef, out), AdaptiveGradClipState(stats=stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
