"""Routing: a different transformation for each part of the tree, chosen by leaf path."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import optax

from optaxclip._tree import check_transform, compile_regex, path_str


class PerLayerState(NamedTuple):
    """State of :func:`per_layer`: each rule's state (then the default's), in rule order."""

    inner_states: tuple[Any, ...]


def per_layer(
    rules: Mapping[str, optax.GradientTransformation] | Any,
    default: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Applies a different transformation to each part of the tree, chosen by regex on paths.

    A leaf's path joins its dict keys, attribute names and sequence indices with ``/``
    (``"encoder/layers/0/kernel"``; flax ``nnx`` states give the model's own paths). Each
    leaf goes to the transformation of the first pattern that matches its whole path
    (``re.fullmatch``); unmatched leaves go to ``default``, or pass through unchanged when it
    is None. Each transformation sees only its own leaves (the others are
    ``optax.MaskedNode``), so a global-norm clipper in a rule clips by the norm of its group.

    .. math::
        u_i \leftarrow T_{r(i)}(u_i), \quad r(i) = \min\{r : \text{pattern}_r \text{ fullmatches
        } \mathrm{path}(i)\}

    Args:
      rules: a mapping (in priority order) from regex to ``optax.GradientTransformation``,
        or a sequence of ``(regex, transformation)`` pairs.
      default: the transformation for leaves no pattern matches, or None.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state holds each rule's state.
      A pattern that matches no leaf of a non-empty tree at ``init`` gives a
      ``UserWarning`` naming it (a typo would otherwise silently clip nothing).

    Raises:
      TypeError: ``rules`` is not a mapping or sequence of pairs, or a value is not a
        GradientTransformation.
      ValueError: a pattern is not a valid regex.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> tx = oc.per_layer({r".*/bias": oc.clip_by_value(0.1)}, default=oc.clip_by_leaf_norm(1.0))
      >>> g = {"dense": {"kernel": jnp.array([3.0, 4.0]), "bias": jnp.array([0.5])}}
      >>> tx.update(g, tx.init(g))[0]
      {'dense': {'bias': Array([0.1], dtype=float32), 'kernel': Array([0.6, 0.8], dtype=float32)}}
    """
    if isinstance(rules, Mapping):
        pairs = list(rules.items())
    else:
        try:
            pairs = [tuple(pair) for pair in rules]
        except TypeError:
            pairs = None
        if pairs is None or any(len(pair) != 2 for pair in pairs):
            raise TypeError(
                "`rules` must map regex strings to transformations, e.g. "
                "{r'.*/bias': oc.clip_by_value(0.1)}, or be a sequence of (regex, "
                f"transformation) pairs; got {rules!r}."
            )
    patterns: list[re.Pattern[str]] = []
    transforms: list[optax.GradientTransformationExtraArgs] = []
    for pattern, tx in pairs:
        patterns.append(compile_regex(pattern, "rules"))
        check_transform(tx, f"rules[{pattern!r}]")
        transforms.append(optax.with_extra_args_support(tx))
    if default is not None:
        check_transform(default, "default")
        transforms.append(optax.with_extra_args_support(default))

    def route(path) -> int:
        name = path_str(path)
        for i, pattern in enumerate(patterns):
            if pattern.fullmatch(name):
                return i
        return len(patterns)  # the default (or nothing)

    def masks(tree):
        routes = jax.tree_util.tree_map_with_path(lambda p, _: route(p), tree)
        return [jax.tree.map(lambda r, i=i: r == i, routes) for i in range(len(transforms))]

    def init_fn(params):
        routes = set(
            jax.tree.leaves(jax.tree_util.tree_map_with_path(lambda p, _: route(p), params))
        )
        unused = [p.pattern for i, p in enumerate(patterns) if i not in routes]
        if unused and routes:  # an empty tree matches nothing, and says nothing
            example = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0][:3]]
            warnings.warn(
                f"per_layer: the patterns {unused} match no leaf (patterns must match the whole "
                f"path; paths look like {example}).",
                UserWarning,
                stacklevel=2,
            )
        states = tuple(
            optax.masked(tx, mask).init(params) for tx, mask in zip(transforms, masks(params))
        )
        return PerLayerState(states)

    def update_fn(updates, state, params=None, **extra_args):
        new_states = []
        for tx, mask, inner_state in zip(transforms, masks(updates), state.inner_states):
            updates, new_state = optax.masked(tx, mask).update(
                updates, inner_state, params, **extra_args
            )
            new_states.append(new_state)
        return updates, PerLayerState(tuple(new_states))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
