"""Pytree plumbing shared by every transform: leaf paths, argument checks, error text."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# ---------------------------------------------------------------------------
# Leaf paths
# ---------------------------------------------------------------------------


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """Joins a pytree key path with ``/``: ``"encoder/layers/0/kernel"``.

    A trailing ``.value`` attribute (how a flax ``nnx.Variable`` stores its array) is
    dropped, so paths from ``nnx.state(model)`` read like the model's own.
    """
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_key_name(k) for k in keys)


def leaves_with_paths(tree: Any) -> list[tuple[str, jax.Array]]:
    """Array leaves of ``tree`` with their ``/``-joined paths (``None``/``MaskedNode`` skipped)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(p), x) for p, x in flat]


# ---------------------------------------------------------------------------
# Argument checks (only concrete values are checked: hyperparameters may be traced)
# ---------------------------------------------------------------------------


def is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_threshold(value: Any, name: str, *, allow_zero: bool = True) -> None:
    """Checks a threshold argument: a number, a scalar array, or a schedule (callable)."""
    if callable(value):
        return
    if isinstance(value, bool) or not (
        isinstance(value, (numbers.Real, np.ndarray, np.generic, jax.Array))
    ):
        raise TypeError(
            f"`{name}` must be a float, a scalar array or an optax.Schedule (a callable of the "
            f"step count); got {value!r} of type {type(value).__name__}."
        )
    shape = np.shape(value)
    if shape != ():
        raise ValueError(
            f"`{name}` must be a scalar; got an array of shape {shape}. Pass one number, or use "
            "per_layer(...) to give different parts of the tree different thresholds."
        )
    if isinstance(value, jax.Array) and not is_concrete(value):
        return
    if isinstance(value, jax.Array) or isinstance(value, (np.ndarray, np.generic)):
        if not jnp.issubdtype(jnp.asarray(value).dtype, jnp.number):
            raise TypeError(f"`{name}` must be numeric; got an array of dtype {value.dtype}.")
    v = float(value)
    if math.isnan(v) or v < 0 or (v == 0 and not allow_zero):
        rule = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be {rule} (inf turns clipping off); got {v}.")


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, jax.Array):
        raise TypeError(
            f"`{name}` must be a Python int (it fixes the size of the state), not an array; "
            f"under optax.inject_hyperparams list it in `static_args=('{name}',)`."
        )
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(
            f"`{name}` must be a Python int >= {minimum} (it fixes the size of the state); "
            f"got {value!r} of type {type(value).__name__}."
        )
    if int(value) < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}; got {int(value)}.")
    return int(value)


def check_nonnegative(value: Any, name: str) -> None:
    """Checks a non-negative scalar hyperparameter (traced values pass)."""
    check_threshold(value, name)
    if callable(value):
        raise TypeError(f"`{name}` must be a number, not a schedule; got {value!r}.")


def check_positive(value: Any, name: str) -> None:
    """Checks a scalar hyperparameter that must be > 0 (traced values pass)."""
    check_nonnegative(value, name)
    if is_concrete(value) and float(value) <= 0:
        raise ValueError(f"`{name}` must be > 0; got {float(value):g}.")


def check_in_range(value: Any, name: str, low: float, high: float) -> None:
    """Checks a scalar hyperparameter in ``[low, high]``, ``low >= 0`` (traced values pass)."""
    check_nonnegative(value, name)
    if is_concrete(value) and not low <= float(value) <= high:
        raise ValueError(f"`{name}` must be in [{low:g}, {high:g}]; got {float(value):g}.")


def check_transform(value: Any, name: str) -> None:
    if not isinstance(value, optax.GradientTransformation):
        raise TypeError(
            f"`{name}` must be an optax.GradientTransformation (for example optax.adam(1e-3) or "
            f"optax.chain(...)); got {value!r} of type {type(value).__name__}."
        )


def compile_regex(pattern: Any, name: str) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise TypeError(f"`{name}` keys must be regex strings; got {pattern!r}.")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"`{name}` has an invalid regex {pattern!r}: {e}.") from None


# ---------------------------------------------------------------------------
# Per-leaf settings: a callable of the leaf path, or a pytree prefix
# ---------------------------------------------------------------------------


def per_leaf_values(
    tree: Any, spec: Any, is_value: Any, error: str, *, allow_callable: bool = True
) -> list[Any]:
    """One setting per leaf of ``tree`` (``None``/``MaskedNode`` leaves skipped).

    ``spec`` is a callable of the ``/``-joined leaf path, or a pytree prefix of ``tree`` whose
    values (``is_value``) hold for every leaf below them, as ``shard_map``'s specs do.
    ``error`` starts the message raised when the prefix does not match ``tree``.
    """
    if allow_callable and callable(spec):
        return [spec(path) for path, _ in leaves_with_paths(tree)]
    try:
        full = jax.tree.map(
            lambda value, sub: jax.tree.map(lambda _: (value,), sub), spec, tree, is_leaf=is_value
        )
    except (ValueError, TypeError) as e:
        raise ValueError(f"{error}; {e}") from None
    return [value for (value,) in jax.tree.structure(tree).flatten_up_to(full)]


# ---------------------------------------------------------------------------
# Stacked layers
# ---------------------------------------------------------------------------


def stacked_counts(tree: Any, stacked_axes: Any, name: str) -> list[int]:
    """How many leading axes of each leaf index stacked layers (``nnx.scan`` / ``nn.scan``).

    ``stacked_axes`` is None (none anywhere), an int (every leaf), a pytree prefix of the
    updates with ``None | int`` leaves, or a callable of the ``/``-joined leaf path returning
    ``None | int``.
    """
    paths = leaves_with_paths(tree)
    if stacked_axes is None:
        return [0] * len(paths)
    counts = per_leaf_values(
        tree,
        stacked_axes,
        lambda s: s is None or isinstance(s, (int, np.integer)),
        f"{name}: `stacked_axes` must be None, an int, a callable of the leaf path, or a "
        "pytree prefix of the updates with None/int leaves",
    )
    out = []
    for (path, x), k in zip(paths, counts):
        k = 0 if k is None else k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise TypeError(
                f"{name}: `stacked_axes` must give None or an int >= 0 for each leaf; got {k!r} "
                f"for '{path}'."
            )
        if k > jnp.ndim(x):
            raise ValueError(
                f"{name}: `stacked_axes` says the leaf '{path}' of shape {jnp.shape(x)} has {k} "
                f"stacked (layer) axes, but it has only {jnp.ndim(x)} dimensions."
            )
        out.append(int(k))
    return out
