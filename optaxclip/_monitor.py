"""Diagnostics: the global norm and, on request, every leaf's (or layer's) norm, on device."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _numerics as num
from optaxclip._stats import named_state
from optaxclip._tree import stacked_counts


@named_state("monitor")
class MonitorState(NamedTuple):
    """State of :func:`monitor`.

    ``norm`` is the global norm of the last update (float32), ``count`` the steps seen
    (int32); ``leaf_norms`` (with
    ``per_leaf=True``, else None) has the updates' tree structure, with a float32 norm per
    leaf: a scalar, or an array of shape ``leaf.shape[:k]`` for a leaf with ``k`` stacked axes.
    """

    norm: jax.Array
    count: jax.Array
    leaf_norms: Any


def monitor(
    *,
    per_leaf: bool = False,
    stacked_axes: Any = None,
    axis_name: num.AxisName = None,
    partition_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Records the update's global norm (and each leaf's) in its state; the update is unchanged.

    .. math::
        \texttt{norm} = \|u\|_2, \qquad \texttt{leaf\_norms}_i = \|u_i\|_2
        \ \text{(per stacked slice with } \texttt{stacked\_axes}\text{)}

    :func:`stats` exposes them as ``"monitor/norm"`` and ``"monitor/<path>"`` (the leaf's
    ``/``-joined path; for an ``nnx.Optimizer``, the model's paths), ready for a logger, with
    no host transfer. Put it first to see the gradient, or after the optimizer to see the
    update. Per-leaf norms are off by default and cost nothing then; with ``per_leaf=True``
    the global norm is combined from them (each leaf is read once), and inside a guard
    (:func:`skip_nonfinite`, :func:`skip_spikes`) a clipper after it reuses that norm.

    Args:
      per_leaf: also record each leaf's norm (or each stacked slice's).
      stacked_axes: how many leading axes of a leaf index stacked layers (an int, a pytree
        prefix of ``None | int`` or a callable of the leaf path): the leaf's record is then
        an array of norms, one per layer.
      axis_name: inside ``shard_map``/``pmap``, the mesh axes every leaf is sharded over.
      partition_specs: inside ``shard_map``, a pytree of ``PartitionSpec`` (or a prefix).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` returning its input unchanged; its
      :class:`MonitorState` holds a float32 scalar, and with ``per_leaf`` one float32 per
      leaf (per stacked slice).

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.monitor(per_leaf=True)
      >>> g = {"a": jnp.array([3.0]), "b": {"w": jnp.array([4.0])}}
      >>> _, state = tx.update(g, tx.init(g))
      >>> {k: float(v) for k, v in oc.stats(state).items()}
      {'monitor/norm': 5.0, 'monitor/count': 1.0, 'monitor/a': 3.0, 'monitor/b/w': 4.0}
    """
    num.check_sharding_args(axis_name, partition_specs)
    if not isinstance(per_leaf, bool):
        raise TypeError(f"monitor: `per_leaf` must be True or False; got {per_leaf!r}.")

    def init_fn(params):
        leaf_norms = None
        if per_leaf:
            leaves, treedef = jax.tree.flatten(params)
            counts = stacked_counts(params, stacked_axes, "monitor")
            leaf_norms = jax.tree.unflatten(
                treedef,
                [jnp.zeros(jnp.shape(x)[:k], np.float32) for x, k in zip(leaves, counts)],
            )
        zero = jnp.zeros((), np.float32)
        return MonitorState(norm=zero, count=jnp.zeros((), np.int32), leaf_norms=leaf_norms)

    sharding = dict(axis_name=axis_name, partition_specs=partition_specs)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        if not per_leaf:
            norm = num.global_pair(updates, 2, **sharding)
            # It returns the very arrays it measured: a clipper after it in an optax.chain
            # reads this norm instead of the leaves.
            num.offer_global_pair(jax.tree.leaves(updates), norm, **sharding)
            return updates, MonitorState(num.as_f32(norm.value), state.count + 1, None)
        raw, treedef = jax.tree.flatten(updates)
        leaves = [jnp.asarray(x) for x in raw]
        counts = stacked_counts(updates, stacked_axes, "monitor")
        axes = [tuple(range(k, x.ndim)) for k, x in zip(counts, leaves)]
        mesh = num.leaf_meshes(leaves, updates, axis_name, partition_specs)
        norms = num.unit_pairs(leaves, 2, axes, mesh=mesh)
        keep = [lm.split(a)[1] for lm, a in zip(mesh, axes)] if mesh else None
        if keep and any(keep):
            raise ValueError(
                "monitor: a stacked (layer) axis is sharded across devices in "
                "`partition_specs`; per-layer norms need every layer on every device (use "
                "jax.jit with NamedSharding, which needs no specs)."
            )
        total = num.combine(norms, 2)
        # A clipper after this one, inside a guard, reads this norm instead of the leaves.
        num.offer_global_pair(raw, total, **sharding, beyond_scope=False)
        per = [num.as_f32(n.value).reshape(x.shape[:k]) for n, x, k in zip(norms, leaves, counts)]
        return updates, MonitorState(
            num.as_f32(total.value), state.count + 1, jax.tree.unflatten(treedef, per)
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
