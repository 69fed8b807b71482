"""Parameter groups: a global-norm clip per group of leaves, and leaves left out entirely.

Reference: Pascanu, Mikolov & Bengio 2013 (global-norm clipping), applied per parameter group
as in PyTorch's per-param-group ``clip_grad_norm_`` recipes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _numerics as num
from optaxclip._stats import ClipStats, init_stats, named_state, next_stats
from optaxclip._tree import check_threshold, per_leaf_values


@named_state("clip_by_group_norm")
class ClipByGroupNormState(NamedTuple):
    """State of :func:`clip_by_group_norm`: O(1) scalars."""

    stats: ClipStats


def _labels(tree: Any, labels: Any) -> list[Any]:
    """Each leaf's label, from a callable of the leaf path or a pytree prefix of labels."""
    return per_leaf_values(
        tree,
        labels,
        lambda s: s is None or isinstance(s, str),
        "clip_by_group_norm: `labels` must be a callable of the leaf path or a pytree prefix "
        "of the updates with string (or None) leaves",
    )


def clip_by_group_norm(
    labels: Any,
    max_norms: Mapping[str, Any],
    *,
    ord: Any = 2,
    axis_name: num.AxisName = None,
    partition_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Clips each group of leaves to its own global norm; groups without a limit pass through.

    With :math:`G_\ell` the leaves labelled :math:`\ell` and :math:`c_\ell` =
    ``max_norms[`` :math:`\ell` ``]``:

    .. math::
        u_i \leftarrow u_i \min\!\Big(1, \frac{c_\ell}{\|G_\ell\|}\Big)
        \quad \text{for every } u_i \in G_\ell,
        \qquad \|G_\ell\| = \Big(\sum_{u_j \in G_\ell} \|u_j\|^2\Big)^{1/2}

    A label missing from ``max_norms`` (or None) leaves its group untouched and out of every
    norm: frozen leaves, fp8 scaling statistics, or embeddings clipped elsewhere. Each group's
    norm has the robust numerics of :func:`global_norm`; clipping happens iff it is strictly
    above :math:`c_\ell`, and a group with a non-finite norm passes through.

    Args:
      labels: each leaf's group: a pytree prefix of the updates with string (or None)
        leaves, or a callable of the ``/``-joined leaf path returning one (``lambda path:
        "embed" if path.startswith("embed") else "body"``).
      max_norms: a mapping from label to threshold :math:`c_\ell \ge 0` (float, scalar array
        or schedule of the step count).
      ord: 2 (default), 1 or inf.
      axis_name: inside ``shard_map``/``pmap``, the mesh axes every leaf is sharded over.
      partition_specs: inside ``shard_map``, a pytree of ``PartitionSpec`` (or a prefix).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state holds a :class:`ClipStats`
      (O(1) scalars): ``norm`` over every leaf of the limited groups, ``threshold`` the one
      limit when a single group has one (NaN otherwise), ``scale`` the smallest factor,
      ``clipped`` the fraction of limited groups clipped.

    Raises:
      TypeError: ``max_norms`` not a mapping; a threshold not a number or schedule.
      ValueError: a negative threshold; ``labels`` not matching the updates.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.clip_by_group_norm({"a": "x", "b": "x", "c": "y"}, {"x": 1.0})
      >>> g = {"a": jnp.array([3.0]), "b": jnp.array([4.0]), "c": jnp.array([50.0])}
      >>> out, _ = tx.update(g, tx.init(g))  # group x has norm 5; y has no limit
      >>> [float(v[0]) for v in out.values()]
      [0.6, 0.8, 50.0]

    References:
      Pascanu, Mikolov & Bengio, `On the difficulty of training recurrent neural networks
      <https://arxiv.org/abs/1211.5063>`_, ICML 2013.
    """
    if not isinstance(max_norms, Mapping):
        raise TypeError(
            "clip_by_group_norm: `max_norms` must be a mapping from label to threshold, e.g. "
            f'{{"body": 1.0, "embed": 10.0}}; got {max_norms!r}.'
        )
    for label, value in max_norms.items():
        check_threshold(value, f"max_norms[{label!r}]")
    ord = num.canonical_ord(ord)
    num.check_sharding_args(axis_name, partition_specs)

    def init_fn(params):
        del params
        return ClipByGroupNormState(stats=init_stats())

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        leaves, treedef = jax.tree.flatten(updates)
        leaves = [jnp.asarray(x) for x in leaves]
        groups: dict[Any, list[int]] = {}
        for i, label in enumerate(_labels(updates, labels)):
            if label is not None and label in max_norms:
                groups.setdefault(label, []).append(i)
        specs = None
        if partition_specs is not None:
            specs = num.expand_specs(updates, partition_specs)
        out = list(leaves)
        norms, factors = [], []
        count = state.stats.count
        for label, idx in groups.items():
            members = [leaves[i] for i in idx]
            norm = num.global_pair(
                members,
                ord,
                axis_name=axis_name,
                partition_specs=None if specs is None else [specs[i] for i in idx],
            )
            limit = num.resolve(max_norms[label], count, norm.m.dtype)
            p, q, clipped = num.global_factors(norm, limit)
            for i in idx:
                out[i] = num.scale_leaf(leaves[i], p, q)
            norms.append(norm)
            factors.append((p, q, clipped))
        if norms:
            total = num.combine(norms, ord)
            n_clipped = sum(c.astype(np.int32) for _, _, c in factors)
            scale = jnp.min(jnp.stack([(p * q).astype(np.float32) for p, q, _ in factors]))
            only = next(iter(groups)) if len(groups) == 1 else None
            threshold = jnp.nan if only is None else num.resolve(max_norms[only], count, np.float32)
            finite = total.finite
        else:
            total = num.Norm(jnp.ones((), np.float32), jnp.zeros((), np.float32))
            n_clipped, scale, threshold, finite = 0, 1.0, jnp.nan, True
        stats = next_stats(
            state.stats,
            norm=total.value,
            threshold=threshold,
            scale=scale,
            clipped=n_clipped / max(len(groups), 1),
            any_clipped=n_clipped > 0,
            nonfinite=~jnp.asarray(finite),
        )
        return jax.tree.unflatten(treedef, out), ClipByGroupNormState(stats=stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
