"""What each clipper did: ``ClipStats`` in every clipper's state, and ``stats(state)``."""

from __future__ import annotations

from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from optaxclip._numerics import one_kernel
from optaxclip._tree import leaves_with_paths


class ClipStats(NamedTuple):
    """What a clipping transformation did on its last step, and counts over all steps.

    Every clipping transformation of optaxclip keeps one in its state (field ``stats``);
    :func:`stats` finds them all in any optimizer state.

    Attributes:
      norm: float32, the global norm of the incoming update before clipping.
      threshold: float32, the threshold applied this step (per-unit methods whose threshold is
        not a single number: NaN; guards without a threshold: inf).
      scale: float32, the smallest factor applied to any unit this step (1 when nothing was
        clipped, 0 for a skipped step).
      clipped: float32, the fraction of units clipped (or replaced, or skipped) this step, 0..1.
        A unit is the whole tree for global methods, the leaf for per-leaf methods, the unit
        slice for AGC, the element for ``clip_by_value`` and ``zero_nonfinite``.
      count: int32, steps seen.
      num_clipped: int32, steps in which anything was clipped (or skipped).
      num_nonfinite: int32, steps whose update had a NaN or infinite entry.
    """

    norm: jax.Array
    threshold: jax.Array
    scale: jax.Array
    clipped: jax.Array
    count: jax.Array
    num_clipped: jax.Array
    num_nonfinite: jax.Array


def init_stats() -> ClipStats:
    # A fresh array per field: a state holding one array twice cannot be donated
    # (``jax.jit(..., donate_argnums=...)`` refuses to donate a buffer twice).
    f32 = lambda v: jnp.asarray(v, np.float32)
    i32 = lambda: jnp.zeros((), np.int32)
    return ClipStats(f32(0.0), f32(0.0), f32(1.0), f32(0.0), i32(), i32(), i32())


def next_stats(
    prev: ClipStats,
    *,
    norm: jax.Array,
    threshold: Any,
    scale: jax.Array,
    clipped: jax.Array,
    any_clipped: jax.Array,
    nonfinite: jax.Array,
) -> ClipStats:
    """The stats after one more step (casts everything to the fixed dtypes), computed by one
    kernel (:func:`optaxclip._numerics.one_kernel`)."""
    f32 = lambda v: jnp.asarray(v).astype(np.float32)
    i32 = lambda v: jnp.asarray(v).astype(np.int32)
    stats = ClipStats(
        norm=f32(norm),
        threshold=f32(threshold),
        scale=f32(scale),
        clipped=f32(clipped),
        count=prev.count + 1,
        num_clipped=prev.num_clipped + i32(any_clipped),
        num_nonfinite=prev.num_nonfinite + i32(nonfinite),
    )
    return one_kernel(stats)


def empty_step(prev: ClipStats, threshold: Any) -> ClipStats:
    """The stats after a step over an empty tree: norm 0, nothing clipped."""
    return next_stats(
        prev,
        norm=0.0,
        threshold=threshold,
        scale=1.0,
        clipped=0.0,
        any_clipped=False,
        nonfinite=False,
    )


# Which factory made a state: filled by ``named_state``; ``stats`` uses it for the key prefix.
_STATE_NAMES: dict[type, str] = {}

S = TypeVar("S", bound=type)


def named_state(name: str):
    """Class decorator: records that states of this class come from factory ``name``."""

    def register(cls: S) -> S:
        _STATE_NAMES[cls] = name
        return cls

    return register


def _is_named_state(x: Any) -> bool:
    return type(x) in _STATE_NAMES and (hasattr(x, "stats") or hasattr(x, "leaf_norms"))


def _fields(state: Any) -> dict[str, Any]:
    """The ``stats`` entries of a named state: its ClipStats, or a monitor's norms by path."""
    if hasattr(state, "stats"):
        return state.stats._asdict()
    fields = {"norm": state.norm, "count": state.count}
    if state.leaf_norms is not None:
        fields.update(leaves_with_paths(state.leaf_norms))
    return fields


def _array(x: Any) -> jax.Array:
    """The array inside a stats field (unwraps a flax ``nnx.Variable``)."""
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return x
    (leaf,) = jax.tree.leaves(x)
    return leaf


def _collect(node: Any, found: list[tuple[str, dict[str, Any]]]) -> None:
    if _is_named_state(node):
        found.append((_STATE_NAMES[type(node)], _fields(node)))
        if not hasattr(node, "stats"):
            return
        children = [v for k, v in node._asdict().items() if k != "stats"]
        for child in children:
            _collect(child, found)
        return
    for leaf in jax.tree.leaves(node, is_leaf=_is_named_state):
        if _is_named_state(leaf):
            _collect(leaf, found)


def stats(state: Any) -> dict[str, jax.Array]:
    """Every ``ClipStats`` in an optimizer state, as a flat dict ready for a logger.

    Also holds what a :func:`monitor` recorded: ``"monitor/norm"`` and, with
    ``per_leaf=True``, ``"monitor/<leaf path>"``.

    Looks through ``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``,
    ``optax.masked``, ``optax.multi_transform``, :func:`per_layer`, the guards' inner states
    and a flax ``nnx.Optimizer`` (pass the optimizer or its ``opt_state``). Keys are
    ``"<factory name>/<field>"``; when a factory appears more than once, the later ones are
    ``"<name>_1/..."``, ``"<name>_2/..."`` in depth-first order. Values are the arrays
    themselves: nothing is copied to the host, so it can be called inside ``jit``.

    Args:
      state: an optimizer state (or a flax ``nnx.Optimizer``).

    Returns:
      A dict from ``"<name>/<field>"`` to scalar arrays (empty when there is no clipper).

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip as oc
      >>> tx = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> grads = {"w": jnp.array([3.0, 4.0])}
      >>> _, state = tx.update(grads, tx.init(grads))
      >>> s = oc.stats(state)
      >>> float(s["clip_by_global_norm/norm"]), float(s["clip_by_global_norm/scale"])
      (5.0, 0.2)
    """
    if hasattr(state, "opt_state") and hasattr(state, "tx"):  # flax nnx.Optimizer
        state = state.opt_state
    found: list[tuple[str, dict[str, Any]]] = []
    _collect(state, found)
    seen: dict[str, int] = {}
    out: dict[str, jax.Array] = {}
    for name, fields in found:
        k = seen.get(name, 0)
        seen[name] = k + 1
        prefix = name if k == 0 else f"{name}_{k}"
        for field, value in fields.items():
            out[f"{prefix}/{field}"] = _array(value)
    return out
