"""Norms that are never silently wrong, and the factors that clip by them.

Every norm is accumulated in float32 (float64 when a leaf is float64), in one fused pass
per leaf on the path ordinary inputs take. Only when that pass overflowed (``inf``) or may
have lost mass to underflow (a sum below ``n * tiny / eps``, ``n`` the number of entries)
does a rescaled pass run: it multiplies every entry (of the global norm, or of each unit
that needs it) by a fixed power of two chosen so that nothing overflows and no mass that
matters is lost (see ``_RESCUE_EXPONENTS``), in a ``lax.while_loop`` that takes at most one
trip and none on ordinary inputs.

A norm is carried as a pair ``Norm(m, r)`` whose value is ``m * r``: ``m`` is 1 on the
ordinary path and the rescaling factor (a power of two, or the largest magnitude) on the
rescaled one. The pair stays exact where the
value itself would not fit the dtype (entries near float32's max), and clipping factors are
derived from the pair so a clipped update keeps its direction on every finite input.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from optaxclip._tree import per_leaf_values

AxisName = str | tuple[str, ...] | None

# Clipping factors are split as p * q with p a power of two, so neither underflows when the
# largest entry is near the dtype's max (the scale itself would be subnormal there).
_SPLIT_EXPONENT = {np.dtype(np.float32): 64, np.dtype(np.float64): 512}


class Norm(NamedTuple):
    """A norm as a pair: its value is ``m * r``; ``m > 0`` (1 on the ordinary path)."""

    m: jax.Array
    r: jax.Array

    @property
    def value(self) -> jax.Array:
        return self.m * self.r

    @property
    def finite(self) -> jax.Array:
        """True when every entry that went into the norm was finite."""
        return jnp.isfinite(self.m) & jnp.isfinite(self.r)


# ---------------------------------------------------------------------------
# Arguments and dtypes
# ---------------------------------------------------------------------------


def canonical_ord(ord: Any) -> Any:
    """Returns 1, 2 or inf; accepts ``"inf"``, ``jnp.inf`` and ``float("inf")``.

    A traced ``ord`` (``optax.inject_hyperparams`` makes one of the default) is returned as
    is: the norms then pick the rule with ``lax.switch``, and a value other than 1, 2 or inf
    gives a NaN norm (no clipping).
    """
    if isinstance(ord, str) and ord.lower() == "inf":
        return math.inf
    if isinstance(ord, jax.core.Tracer):
        return ord
    if not isinstance(ord, bool):
        try:
            value = float(ord)
        except (TypeError, ValueError):
            value = None
        if value in (1.0, 2.0, math.inf):
            return value
    raise ValueError(f"`ord` must be 1, 2 or inf (also 'inf' or jnp.inf); got {ord!r}.")


def accum_dtype(leaves: Sequence[Any]) -> np.dtype:
    """float64 when any leaf is float64 or complex128, else float32."""
    for x in leaves:
        dtype = jnp.result_type(x)
        if jnp.issubdtype(dtype, jnp.inexact) and jnp.finfo(dtype).bits == 64:
            return np.dtype(np.float64)
    return np.dtype(np.float32)


def _wide(x: jax.Array, dtype: np.dtype) -> jax.Array:
    """``x`` in the accumulation dtype (complex leaves stay complex)."""
    if jnp.iscomplexobj(x):
        return x.astype(np.complex128 if dtype == np.float64 else np.complex64)
    return jnp.asarray(x).astype(dtype)


def _times(x: jax.Array, c: jax.Array, dtype: np.dtype) -> jax.Array:
    """``x * c`` in the accumulation dtype for a real ``c`` (complex ``x`` stays complex)."""
    xw = _wide(x, dtype)
    if xw.dtype != jnp.result_type(x):
        # Inside the rescue loop the widening convert does not depend on the loop: XLA hoists
        # it out and writes a widened copy of the leaf on every step (3.4x the time of the
        # norm of a bfloat16 tree). Passing x through a barrier with c keeps it in the loop.
        x, c = lax.optimization_barrier((x, c))
        xw = _wide(x, dtype)
    return xw * c.astype(xw.dtype)


def _magnitude(x: jax.Array, ord: float, dtype: np.dtype) -> jax.Array:
    """Per-entry contribution to a sum: |x|**2 for ord 2, |x| for ord 1 (real, in ``dtype``)."""
    xw = _wide(x, dtype)
    if ord == 2:
        if jnp.iscomplexobj(xw):
            return jnp.square(jnp.real(xw)) + jnp.square(jnp.imag(xw))
        return xw * xw
    return jnp.abs(xw)


def _finish(s: jax.Array, ord: float) -> jax.Array:
    return jnp.sqrt(s) if ord == 2 else s


def _underflow_floor(n: int | jax.Array, dtype: np.dtype) -> jax.Array:
    """Below this sum, mass lost to flushed subnormals could exceed one ulp of the result."""
    info = jnp.finfo(dtype)
    return jnp.asarray(n, dtype) * (float(info.tiny) / float(info.eps))


def _pow2(k: jax.Array, dtype: np.dtype) -> jax.Array:
    """2**k exactly, built from its bits (k within the dtype's normal exponent range)."""
    info = jnp.finfo(dtype)
    int_dtype = np.int64 if info.bits == 64 else np.int32
    bias = info.maxexp - 1
    bits = (k.astype(int_dtype) + bias) << info.nmant
    return lax.bitcast_convert_type(bits, dtype)


def times_inverse(x: jax.Array, m: jax.Array) -> jax.Array:
    """``x / m`` for finite ``m >= tiny``, without forming ``1/m``.

    XLA rewrites division by a broadcast scalar as multiplication by its reciprocal, which
    is subnormal (flushed to 0) when ``m`` is near the dtype's max. Here ``m = f * 2**e`` and
    ``x / m = x * 2**-e1 * 2**-e2 * (1/f)`` with every factor a normal number.
    """
    f, e = jnp.frexp(m)
    e1 = e // 2
    a, b, c = _pow2(-e1, m.dtype), _pow2(e1 - e, m.dtype), 1 / f
    if jnp.iscomplexobj(x):
        a, b, c = (v.astype(x.dtype) for v in (a, b, c))
    return x * a * b * c


ZeroOk = Callable[[list[jax.Array], float, list[int]], list[jax.Array]]


def zero_bound(n: Any, ord: float, dtype: np.dtype) -> Any:
    """Largest norm a unit of ``n`` entries can have when its ordinary sum is exactly 0.

    Squares below ``tiny`` flush to 0 (ord 2: every entry below ``sqrt(tiny)``); subnormal
    entries read as 0 (ord 1: every entry below ``tiny``). ``n`` may be a numpy array.
    """
    tiny = float(jnp.finfo(dtype).tiny)
    bound = np.sqrt(np.asarray(n, np.float64) * tiny) if ord == 2 else np.asarray(n) * tiny
    return float(bound) if np.ndim(bound) == 0 else bound.astype(dtype)


def _from_max(m: jax.Array) -> Norm:
    """The degenerate cases of a rescaled norm: all zero (or subnormal), inf, NaN."""
    tiny = jnp.finfo(m.dtype).tiny
    big = ~(m < tiny)  # NaN counts as big, so it propagates
    one = jnp.ones_like(m)
    return Norm(jnp.where(big, m, one), jnp.where(big, one, jnp.zeros_like(m)))


def _nan_max(x: jax.Array, dtype: np.dtype, axis: Any, keepdims: bool) -> jax.Array:
    """``max(|x|)`` over ``axis``, in ``dtype``, that is NaN when any entry is.

    XLA's max propagates NaN on one device, but a max over a sharded array (GSPMD's
    all-reduce on CPU) drops it; an or-reduction of ``isnan`` does not. Each reduction reads
    ``x`` through a barrier of its own (see :func:`barrier`).
    """
    a = jnp.abs(_wide(barrier(x, 4), dtype))
    m = jnp.max(a, axis=axis, keepdims=keepdims, initial=jnp.zeros((), a.dtype))
    nan = jnp.any(jnp.isnan(barrier(x, 5)), axis=axis, keepdims=keepdims)
    return jnp.where(nan, jnp.nan, m)


def _by_ord(ord: Any, fn: Callable[[float], Any]) -> Any:
    """``fn(ord)``; for a traced ``ord``, ``lax.switch`` over 1, 2, inf (else NaN results)."""
    if not isinstance(ord, jax.core.Tracer):
        return fn(ord)
    ord = jnp.asarray(ord)
    index = jnp.where(ord == 1, 0, jnp.where(ord == 2, 1, jnp.where(jnp.isposinf(ord), 2, 3)))
    shapes = jax.eval_shape(lambda: fn(2.0))
    nan = lambda: jax.tree.map(lambda a: jnp.full(a.shape, jnp.nan, a.dtype), shapes)
    return lax.switch(index, [lambda: fn(1.0), lambda: fn(2.0), lambda: fn(math.inf), nan])


# ---------------------------------------------------------------------------
# Cross-device reduction
# ---------------------------------------------------------------------------


def _spec_axes(spec: Any) -> tuple[str, ...]:
    if spec is None:
        return ()
    if not isinstance(spec, PartitionSpec):
        raise TypeError(
            "`partition_specs` must hold jax.sharding.PartitionSpec leaves (or a prefix of the "
            f"updates' tree of them); got {spec!r} of type {type(spec).__name__}."
        )
    axes: list[str] = []
    for entry in spec:
        if entry is None:
            continue
        for name in entry if isinstance(entry, tuple) else (entry,):
            if name not in axes and name is not PartitionSpec.UNCONSTRAINED:
                axes.append(name)
    return tuple(axes)


# Leaves of fewer entries are flattened and stacked before they are reduced: on CPU a
# reduction kernel costs more to launch and to compile than copying that many floats.
# SMALL_LEAF is for reductions over whole leaves (Reducer.chunks): the runtime of
# chain(clip_by_global_norm, adam) on trees of equal float32 leaves is lower stacked up to
# 8,192 entries a leaf, higher from 12,288 (the copy's cost); stacking 4,096-entry leaves
# took the compile of that chain over 999 leaves from 1.73x adam's to 1.40x. SMALL_UNIT_LEAF
# is for unit norms (_FlatUnits), whose stacking also pads every unit to a power-of-two width.
SMALL_LEAF = 8192
SMALL_UNIT_LEAF = 4096
# At most this many small leaves go into one concatenation. XLA (CPU) emits a concatenate
# as one function with a loop per operand, which LLVM compiles in time superlinear in their
# number: the global norm of 4,995 small leaves compiled in 7.3-8.1 s as one concatenation
# against 2.2-2.9 s in groups of 64-512, and chain(clip_by_global_norm, adam) over 999
# leaves in 1.30x adam's time against 1.17x (paired medians of 5 rounds). The unit norms
# (_FlatUnits) stack small leaves the same way, padded, in one loop fusion: leaf_norms of
# 4,995 leaves was still compiling after 11 minutes (1,250 leaves to a stack), against
# 109 s in groups. Each group costs kernels at run time: clip_by_global_norm over 2,000
# leaves of 64 and 256 entries (four groups) ran 4.6-5.9% slower than with one
# concatenation, still 0.84x optax's time; clip_by_leaf_norm, clip_by_block_rms and AGC
# 1.5-2.2% slower.
_CONCAT_GROUP = 512


def _concat_groups(items: Sequence[Any]) -> list[Sequence[Any]]:
    """``items`` in consecutive groups of at most ``_CONCAT_GROUP``."""
    return [items[k : k + _CONCAT_GROUP] for k in range(0, len(items), _CONCAT_GROUP)]


def check_sharding_args(axis_name: AxisName, partition_specs: Any) -> None:
    """Raises when both ways of naming the mesh axes are given."""
    if axis_name is not None and partition_specs is not None:
        raise ValueError(
            "Give `axis_name` or `partition_specs`, not both: `axis_name` says every leaf is "
            "sharded over those axes, `partition_specs` says it leaf by leaf."
        )


def _explicitly_sharded(x: jax.Array) -> bool:
    """Whether ``x``'s type names mesh axes it is sharded over (JAX's explicit sharding).

    Such leaves are reduced on their own: concatenating them with leaves sharded otherwise
    (or replicated) is a sharding type error.
    """
    typeof = getattr(jax, "typeof", None)
    if typeof is None:  # JAX without sharding in types
        return False
    spec = getattr(getattr(typeof(x), "sharding", None), "spec", None)
    return spec is not None and any(entry is not None for entry in spec)


def expand_specs(tree: Any, partition_specs: Any) -> list[Any]:
    """One ``PartitionSpec`` (or None: replicated) per leaf of ``tree``, from a prefix tree."""
    specs = per_leaf_values(
        tree,
        partition_specs,
        lambda s: isinstance(s, PartitionSpec) or s is None,
        "`partition_specs` must match the updates' tree structure or be a prefix of it "
        "(as passed to shard_map)",
        allow_callable=False,
    )
    for spec in specs:
        _spec_axes(spec)  # type check
    return specs


def _entry_axes(entry: Any) -> tuple[str, ...]:
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


class LeafMesh(NamedTuple):
    """How one leaf is laid out on the mesh: the mesh axes that shard each of its dimensions.

    ``whole`` holds axes that shard the leaf without a known dimension (``axis_name=`` on a
    scalar, as under ``pmap``): they count as reduced by every norm of the leaf.
    """

    dims: tuple[tuple[str, ...], ...]
    whole: tuple[str, ...] = ()

    def split(self, reduced: Sequence[int]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(reduce_axes, keep_axes)`` for a norm over the dimensions ``reduced``."""
        reduce, keep = list(self.whole), []
        for d, axes in enumerate(self.dims):
            target = reduce if d in reduced else keep
            target.extend(a for a in axes if a not in target)
        return tuple(reduce), tuple(a for a in keep if a not in reduce)


def leaf_meshes(
    leaves: Sequence[Any], tree: Any, axis_name: AxisName, partition_specs: Any
) -> list[LeafMesh] | None:
    """Each leaf's :class:`LeafMesh`, or None when no mesh axes are named.

    ``axis_name`` says every leaf is sharded over those axes along its first dimension (the
    layout of ``pmap`` and of ``shard_map`` with ``P(axis_name)``); a scalar leaf is sharded
    as a whole.
    """
    check_sharding_args(axis_name, partition_specs)
    if axis_name is None and partition_specs is None:
        return None
    if partition_specs is None:
        axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
        return [
            LeafMesh((axes,) + ((),) * (jnp.ndim(x) - 1)) if jnp.ndim(x) else LeafMesh((), axes)
            for x in leaves
        ]
    out = []
    for x, spec in zip(leaves, expand_specs(tree, partition_specs)):
        entries = tuple(spec) if spec is not None else ()
        ndim = jnp.ndim(x)
        if len(entries) > ndim:
            raise ValueError(
                f"`partition_specs`: the spec {spec} names {len(entries)} dimensions but the "
                f"leaf has shape {jnp.shape(x)}."
            )
        dims = tuple(_entry_axes(e) for e in entries) + ((),) * (ndim - len(entries))
        out.append(LeafMesh(dims))
    return out


def axis_product(axes: tuple[str, ...]) -> int:
    """How many devices the mesh axes ``axes`` span (1 for none)."""
    return lax.psum(1, axes) if axes else 1


def packed(op: Callable, arrays: Sequence[jax.Array], axes: tuple[str, ...]) -> list[jax.Array]:
    """``op`` of each of ``arrays`` over ``axes`` as one collective per dtype.

    The arrays (per-unit norms, counts: small) are flattened and concatenated first: a
    collective of several operands is still one collective per operand.
    """
    out: list[Any] = [None] * len(arrays)
    by_dtype: dict[Any, list[int]] = {}
    for i, x in enumerate(arrays):
        by_dtype.setdefault(jnp.result_type(x), []).append(i)
    for idx in by_dtype.values():
        flat = [jnp.ravel(arrays[i]) for i in idx]
        result = op(flat[0] if len(flat) == 1 else jnp.concatenate(flat), axes)
        start = 0
        for i in idx:
            size = jnp.size(arrays[i])
            out[i] = result[start : start + size].reshape(jnp.shape(arrays[i]))
            start += size
    return out


def _pmax_one(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    flat = jnp.ravel(x)
    nan = jnp.isnan(flat)
    clean = jnp.where(nan, jnp.asarray(-jnp.inf, flat.dtype), flat)
    both = lax.pmax(jnp.concatenate([clean, nan.astype(flat.dtype)]), axes)
    n = flat.size
    return jnp.where(both[n:] > 0, jnp.nan, both[:n]).reshape(jnp.shape(x))


def pmax(x: Any, axes: tuple[str, ...]) -> Any:
    """``lax.pmax`` that propagates NaN (XLA's cross-device max may drop it).

    ``x`` is a floating array or a list of them; one collective either way.
    """
    if isinstance(x, list):
        return packed(_pmax_one, x, axes)
    return _pmax_one(x, axes)


def grouped_collective(arrays: Sequence[jax.Array], axes: Sequence[tuple[str, ...]], op):
    """``op`` (``lax.psum``/``pmin``, or :func:`pmax`) of each array over its own mesh axes.

    One collective per distinct axis set (and dtype), not one per array.
    """
    out = list(arrays)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, a in enumerate(axes):
        if a:
            groups.setdefault(a, []).append(i)
    for a, idx in groups.items():
        for i, r in zip(idx, packed(op, [arrays[i] for i in idx], a)):
            out[i] = r
    return out


_FENCE_GROUP = 16


def stacked(op: Callable, xs: Sequence[jax.Array], fence: bool = False) -> jax.Array:
    """``op`` (``jnp.sum``, ``jnp.max``, ...) over ``xs`` element-wise, as one reduction.

    A Python chain ``x1 + x2 + ...`` of scalars is one long fusible chain, which XLA's CPU
    fusion pass handles in time quadratic in its length (minutes at 2,000 leaves); a stack
    and one reduction are compiled in linear time.

    ``fence=True`` is for ``xs`` made by per-leaf chains of element-wise work (per-unit
    factors, rescue tests): XLA fuses every such chain into the reduction's one kernel,
    whose compile time grows faster than linearly (AGC: 20 s at 147 leaves). Each group of
    ``_FENCE_GROUP`` values passes through a sort (which XLA never fuses), so no kernel
    holds more than that many chains.
    """
    if len(xs) == 1:
        return xs[0]
    if fence and len(xs) > _FENCE_GROUP:
        parts = []
        for i in range(0, len(xs), _FENCE_GROUP):
            (group,) = _through_sort([jnp.stack(xs[i : i + _FENCE_GROUP])])
            parts.append(op(group, axis=0))
        xs = parts
    return op(jnp.stack(xs), axis=0)


class Reducer:
    """Sums or maxes per-leaf partial results, then over the mesh axes each leaf is sharded on.

    Partials are arrays of one shape (scalars, or per-example vectors), combined element-wise.
    Leaves sharded over the same axes are combined locally first, so there is one collective
    per distinct axis set, never one per leaf. Without axes it is a plain local reduction.
    """

    def __init__(self, groups: list[tuple[tuple[str, ...], list[int]]]):
        self.groups = groups

    @classmethod
    def from_axes(cls, axes: Sequence[tuple[str, ...]]) -> Reducer:
        """A Reducer over partials where partial i is sharded over the mesh axes ``axes[i]``."""
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, a in enumerate(axes):
            groups.setdefault(a, []).append(i)
        return cls(list(groups.items()))

    @classmethod
    def build(cls, tree: Any, axis_name: AxisName = None, partition_specs: Any = None) -> Reducer:
        n = len(jax.tree.leaves(tree))
        check_sharding_args(axis_name, partition_specs)
        if partition_specs is None:
            axes = (
                ()
                if axis_name is None
                else ((axis_name,) if isinstance(axis_name, str) else tuple(axis_name))
            )
            return cls([(axes, list(range(n)))])
        specs = expand_specs(tree, partition_specs)
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, spec in enumerate(specs):
            groups.setdefault(_spec_axes(spec), []).append(i)
        return cls(list(groups.items()))

    def chunks(self, leaves: Sequence[jax.Array]) -> tuple[list[jax.Array], Reducer]:
        """The arrays to reduce, and a Reducer over them.

        Leaves of at least ``SMALL_LEAF`` entries are reduced as they are; smaller ones are
        flattened and concatenated (per dtype and per axis set, ``_CONCAT_GROUP`` leaves at
        most to a concatenation), so a tree of thousands of small leaves costs a few
        reductions to compile and run instead of thousands (on CPU a reduction kernel costs
        more to launch than copying 8,192 floats). 0-size leaves contribute nothing and are
        left out.
        """
        chunks, reducer = self.aligned_chunks(leaves)
        return [c[0] for c in chunks], reducer

    def aligned_chunks(
        self, *lists: Sequence[jax.Array]
    ) -> tuple[list[tuple[jax.Array, ...]], Reducer]:
        """:meth:`chunks` of several lists of leaves at once (the gradient and a state of
        its shape), leaf i of every list in the same place of the same chunk: small leaves
        are grouped by the tuple of their dtypes. Sizes and sharding are the first list's.
        """
        chunks: list[tuple[jax.Array, ...]] = []
        groups: list[tuple[tuple[str, ...], list[int]]] = []
        for axes, idx in self.groups:
            members: list[int] = []
            small: dict[Any, list[tuple[jax.Array, ...]]] = {}
            for i in idx:
                x = lists[0][i]
                if x.size == 0:
                    continue
                if x.size >= SMALL_LEAF or _explicitly_sharded(x):
                    members.append(len(chunks))
                    chunks.append(tuple(xs[i] for xs in lists))
                else:
                    flat = tuple(lax.reshape(xs[i], (x.size,)) for xs in lists)
                    small.setdefault(tuple(f.dtype for f in flat), []).append(flat)
            for rows in small.values():
                for part in _concat_groups(rows):
                    members.append(len(chunks))
                    if len(part) == 1:
                        chunks.append(part[0])
                    else:
                        chunks.append(tuple(lax.concatenate(list(c), 0) for c in zip(*part)))
            groups.append((axes, members))
        return chunks, Reducer(groups)

    def _combine(self, partials: Sequence[jax.Array], local: Callable, collective: Callable):
        out = None
        for axes, idx in self.groups:
            if not idx:
                continue
            part = local([partials[i] for i in idx])
            if axes:
                part = collective(part, axes)
            out = part if out is None else local([out, part])
        return out

    def sum(self, partials: Sequence[jax.Array]) -> jax.Array:
        return self._combine(partials, lambda xs: stacked(jnp.sum, xs), lax.psum)

    def max(self, partials: Sequence[jax.Array]) -> jax.Array:
        return self._combine(partials, lambda xs: stacked(jnp.max, xs), pmax)

    def count(self, sizes: Sequence[int]) -> int | jax.Array:
        """Total number of entries across devices (an upper bound is all that is needed)."""
        total = 0
        for axes, idx in self.groups:
            size = sum(sizes[i] for i in idx)
            total = total + (size * lax.psum(1, axes) if axes else size)
        return total


# ---------------------------------------------------------------------------
# One norm per step: sharing within a scope
# ---------------------------------------------------------------------------

# Entries (kind, leaves, settings, exact, value) of the innermost sharing scope, or None.
_SHARED: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "optaxclip_shared_norms", default=None
)


@contextlib.contextmanager
def sharing_norms():
    """Within this scope, norms of the very same leaves (by identity) are computed once.

    The guards open it around their inner transformation, so ``skip_spikes(optax.chain(
    zclip(...), optax.adamw(...)))`` reads each gradient leaf once per step: the clipper gets
    the guard's norm back (``optax.chain`` hands its first transformation the very arrays it
    received). Leaves are matched by identity, so an update changed on the way (by another
    transformation) is measured anew. Scopes nest; the outermost one holds the entries.
    """
    if _SHARED.get() is not None:
        yield
        return
    token = _SHARED.set([])
    try:
        yield
    finally:
        _SHARED.reset(token)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (jax.Array, jax.core.Tracer)) or isinstance(b, (jax.Array, jax.core.Tracer)):
        return a is b
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # settings that do not compare (arrays inside a pytree): not shared
        return False


def shared(kind: str, leaves: Sequence[Any], settings: tuple, compute: Callable, exact=True):
    """``compute()``, or the value an earlier call in this scope got for the same leaves.

    ``exact=False`` marks a value a caller may not reuse unless it also passes
    ``exact=False`` (per-unit norms whose exactly-zero sums skipped the rescue pass).
    """
    value = _offered_output(kind, leaves, settings) if exact else None
    if value is not None:
        return value
    entries = _SHARED.get()
    if entries is None:
        return compute()
    for k, ls, st, ex, value in entries:
        if (
            k == kind
            and (ex or not exact)
            and len(ls) == len(leaves)
            and all(a is b for a, b in zip(ls, leaves))
            and _same(st, settings)
        ):
            return value
    value = compute()
    entries.append((kind, list(leaves), settings, exact, value))
    return value


def offer(kind: str, leaves: Sequence[Any], settings: tuple, value: Any) -> None:
    """Records ``value`` for later :func:`shared` calls in this scope (if any)."""
    entries = _SHARED.get()
    if entries is not None:
        entries.append((kind, list(leaves), settings, True, value))


# Norms of a transformation's own output, offered outside any scope (see offer_output): one
# list per thread, of the last few entries.
_OUTPUTS = threading.local()
_MAX_OUTPUTS = 8


class _Output:
    """An offered norm: weak references to the leaves, and the value (compared by identity)."""

    __slots__ = ("__weakref__", "kind", "refs", "settings", "value")

    def __init__(self, kind: str, settings: tuple, value: Any):
        self.kind, self.settings, self.value = kind, settings, value
        self.refs: list = []


def offer_output(kind: str, leaves: Sequence[Any], settings: tuple, value: Any) -> None:
    """Records ``value``, the norm of ``leaves`` that a transformation returns, for the
    :func:`shared` calls of the transformations after it, even outside a scope.

    ``optax.chain(skip_spikes(), zclip())`` hands zclip the guard's output, whose norm the
    guard knows (its input's, or zero's); without this, zclip read every leaf again (2.05x
    ``zclip`` alone). ``value`` must be exactly what :func:`shared`'s ``compute`` would give.
    Matched by identity through weak references: the entry (and the value, which may be a
    tracer of a finished trace) is dropped as soon as one of its leaves is freed. (A guard's
    own scope, around its ``inner``, has closed by the time its output is read.)
    """
    offer(kind, leaves, settings, value)  # the enclosing scope, if any, as well
    if not leaves:
        return
    entries = getattr(_OUTPUTS, "entries", None)
    if entries is None:
        entries = _OUTPUTS.entries = []
    entry = _Output(kind, settings, value)
    mine = weakref.ref(entry)

    def drop(_, entries=entries, mine=mine):
        # No module globals here: at interpreter exit the callback can run after this
        # module's globals are gone (``contextlib.suppress`` printed an AttributeError).
        try:
            entries.remove(mine())
        except ValueError:
            pass

    try:
        entry.refs = [weakref.ref(x, drop) for x in leaves]
    except TypeError:  # a leaf that is not an array (a Python scalar): nothing to match
        return
    entries.append(entry)
    del entries[:-_MAX_OUTPUTS]


def _offered_output(kind: str, leaves: Sequence[Any], settings: tuple) -> Any:
    for entry in reversed(tuple(getattr(_OUTPUTS, "entries", ()))):
        if (
            entry.kind == kind
            and len(entry.refs) == len(leaves)
            and all(r() is x for r, x in zip(entry.refs, leaves))
            and _same(entry.settings, settings)
        ):
            return entry.value
    return None


# ---------------------------------------------------------------------------
# Global norm
# ---------------------------------------------------------------------------


# Scales of the rescue pass of the global norm: exponents ``(down, up)`` of the power of two
# ``c`` that multiplies every entry when the ordinary sum overflowed (down) or fell below
# ``n * tiny / eps`` (up). With ``n <= 2**48`` entries, ``eps`` the dtype's epsilon, ``T`` its
# tiny, ``M`` its max and ``D`` its smallest subnormal:
# * ord 2, down: ``c**2 * n * M**2 <= M`` (no overflow), and the entries lost to underflow,
#   each below ``sqrt(T) / c``, weigh at most ``n * T / (c**2 * M)`` of the overflowed sum
#   (2**-30 of float32's eps);
# * ord 2, up: ``(c * D)**2 >= T`` (no entry flushes), and ``c**2 * n * T / eps <= M``;
# * ord 1: the same with ``c * n * M <= M`` and ``c * D >= T``.
_RESCUE_EXPONENTS = {
    (np.dtype(np.float32), 2): (-88, 88),
    (np.dtype(np.float32), 1): (-48, 24),
    (np.dtype(np.float64), 2): (-536, 565),
    (np.dtype(np.float64), 1): (-48, 53),
}


def zero_pair(dtype: Any, ord: float = 2) -> Norm:
    """The pair :func:`global_pair` gives for leaves that are all zero (a zero sum takes
    the rescaled trip upward, so ``m`` is that trip's factor)."""
    up = _RESCUE_EXPONENTS[(np.dtype(dtype), ord)][1]
    return Norm(jnp.asarray(2.0**-up, dtype), jnp.zeros((), dtype))


def _global_pair(leaves: list[jax.Array], ord: float, reducer: Reducer, dtype: np.dtype) -> Norm:
    zero = jnp.zeros((), dtype)
    one = jnp.ones((), dtype)

    if ord == math.inf:
        chunks, red = reducer.chunks(leaves)
        maxes = [_nan_max(c, dtype, None, False) for c in chunks]
        return _from_max(red.max(maxes)) if chunks else Norm(one, zero)

    down, up = (jnp.asarray(2.0**e, dtype) for e in _RESCUE_EXPONENTS[(np.dtype(dtype), ord)])

    @jax.custom_jvp
    def pair(xs):
        chunks, red = reducer.chunks(xs)
        if not chunks:
            return Norm(one, zero)
        floor = _underflow_floor(red.count([c.size for c in chunks]), dtype)

        def sums(c):
            if c is None:
                # The ordinary pass reads each chunk through a barrier (see :func:`barrier`).
                return red.sum([jnp.sum(_magnitude(barrier(x, 4), ord, dtype)) for x in chunks])
            # A copy of c per chunk where chunks share a shape: XLA (CPU) would otherwise
            # broadcast c once per shape and keep the broadcast in memory, feeding the kernels
            # of every leaf of that shape. (Without such chunks, the copies were a kernel.)
            shapes = [x.shape for x in chunks]
            shared = len(set(shapes)) < len(shapes)
            cs = separate([c] * len(chunks), c * 0) if shared else [c] * len(chunks)
            parts = [
                jnp.sum(_magnitude(_times(x, ci, dtype), ord, dtype)) for x, ci in zip(chunks, cs)
            ]
            return red.sum(parts)

        # The ordinary pass runs outside the loop: a loop body costs the ordinary path a
        # multiplication by c (measured 10% on a 25M float32 tree), and XLA merges identical
        # reductions of the same leaves (monitor's, inside a guard) only outside a loop. Only
        # a sum that overflowed or fell below the floor takes the loop's one trip, rescaled by
        # 2**down or 2**up (a loop, not a cond: under vmap a cond runs both branches).
        s = sums(None)
        bad = jnp.isinf(s) | (s < floor)
        c = jnp.where(bad, jnp.where(jnp.isinf(s), down, up), one)
        # The scalars before and after the loop are computed by one kernel each (the root
        # is taken in the loop's body and in that kernel, not in a kernel of its own).
        m, c, r, bad = one_kernel((1 / c, c, _finish(s, ord), bad))
        # The cleared flag keeps the flag's type (inside shard_map without axis_name, each
        # device's own flag: a literal False would not match the varying carry).
        body = lambda st: (st[0], _finish(sums(st[0]), ord), st[2] & False)
        c, r, _ = lax.while_loop(lambda st: st[2], body, (c, r, bad))
        return Norm(m, r)

    @pair.defjvp
    def pair_jvp(primals, tangents):
        (xs,), (dxs,) = primals, tangents
        out = pair(xs)
        parts = [_tangent_partial(x, dx, out.m, ord, dtype, None) for x, dx in zip(xs, dxs)]
        return out, Norm(zero, _tangent_r(reducer.sum(parts), out, ord))

    return pair(leaves)


def _tangent_partial(x, dx, m, ord, dtype, axes) -> jax.Array:
    """sum(d|x|^ord-norm contributions): <x/m, dx> (ord 2) or <sign(x), dx> (ord 1)."""
    if jax.dtypes.result_type(dx) == jax.dtypes.float0:
        return jnp.zeros(m.shape, dtype)
    xw, dxw = _wide(x, dtype), _wide(dx, dtype)
    if ord == 2:
        direction = times_inverse(xw, m)
    else:
        direction = jnp.sign(xw)
    prod = jnp.real(jnp.conj(direction) * dxw) if jnp.iscomplexobj(xw) else direction * dxw
    return jnp.sum(prod, axis=axes, keepdims=axes is not None)


def _tangent_r(dvalue: jax.Array, out: Norm, ord: float) -> jax.Array:
    """d r for d(norm) computed from direction partials (zero where the norm is 0)."""
    if ord == 2:  # d||x|| = <x, dx>/||x|| = m <x/m, dx> / (m r)  ->  dr = <x/m, dx> / (m r)
        ok = out.r > 0
        return jnp.where(ok, times_inverse(dvalue / jnp.where(ok, out.r, 1), out.m), 0)
    return times_inverse(dvalue, out.m)


# ---------------------------------------------------------------------------
# Norms per unit (per leaf, or per slice of a leaf)
# ---------------------------------------------------------------------------


def unit_pairs(
    leaves: list[jax.Array],
    ord: Any,
    axes: Sequence[tuple[int, ...] | None],
    *,
    zero_ok: ZeroOk | None = None,
    mesh: Sequence[LeafMesh] | None = None,
) -> list[Norm]:
    """Norms of each unit (``keepdims`` arrays); see :func:`_unit_pairs`."""
    return shared(
        "units",
        leaves,
        (ord, tuple(axes), None if mesh is None else tuple(mesh)),
        lambda: _by_ord(
            ord,
            lambda o: _plain_if(
                isinstance(ord, jax.core.Tracer),
                _unit_pairs(leaves, o, axes, zero_ok=zero_ok, mesh=mesh),
            ),
        ),
        exact=zero_ok is None,
    )


def _plain_if(plain: bool, norms: list[Norm]) -> list[Norm]:
    """``norms`` as a plain list (the branches of a ``lax.switch`` over ``ord`` must agree)."""
    return list(norms) if plain else norms


def _unit_matrix(x: jax.Array, axes: tuple[int, ...], width: int) -> jax.Array:
    """``x`` as one row per unit (its reduced axes last, flattened), zero-padded to ``width``."""
    kept = tuple(i for i in range(x.ndim) if i not in axes)
    rows = math.prod(x.shape[i] for i in kept)
    # lax, not jnp: a jnp operation is a jit of its own, traced again for every leaf.
    perm = kept + tuple(axes)
    if perm != tuple(range(x.ndim)):
        x = lax.transpose(x, perm)
    matrix = lax.reshape(x, (rows, x.size // max(rows, 1)))
    if width == matrix.shape[1]:
        return matrix
    return lax.pad(matrix, constant(0, matrix.dtype), ((0, 0, 0), (0, width - matrix.shape[1], 0)))


class Flat(NamedTuple):
    """The units of ``leaves[order[0]], leaves[order[1]], ...`` on one vector, in that order."""

    norm: Norm
    order: list[int]


class UnitNorms(list):
    """Per-leaf unit norms (a list), with the flat vector they were sliced from (or None)."""

    def __init__(self, norms: Sequence[Norm], flat: Flat | None):
        super().__init__(norms)
        self.flat = flat


class _FlatUnits:
    """Every unit of a list of leaves on one flat vector, and their sums with few kernels.

    Leaves of at least ``SMALL_UNIT_LEAF`` entries are reduced in place (one kernel each). Smaller
    ones are laid out one row per unit, zero-padded to a power-of-two width, and stacked per
    (dtype, width), ``_CONCAT_GROUP`` leaves at most to a stack, so a tree of thousands of
    small leaves costs a few kernels to compile and run (and a copy of its small leaves).
    Units are ordered big leaves first, then one group after the other, so every group's
    rows are one contiguous slice of the vector.
    """

    def __init__(self, leaves: Sequence[jax.Array], axes: Sequence[tuple[int, ...]]):
        self.leaves, self.axes = list(leaves), list(axes)
        self.shapes = [
            tuple(1 if i in a else d for i, d in enumerate(x.shape)) for x, a in zip(leaves, axes)
        ]
        direct: list[int] = []
        groups: dict[Any, list[int]] = {}
        for i, (x, a) in enumerate(zip(leaves, axes)):
            if x.size >= SMALL_UNIT_LEAF or x.size == 0:
                direct.append(i)
            else:
                width = 1 << max(math.prod(x.shape[j] for j in a) - 1, 0).bit_length()
                groups.setdefault((x.dtype, width), []).append(i)
        self.direct = direct
        self.groups = [(key, part) for key, idx in groups.items() for part in _concat_groups(idx)]
        self._rows: dict[tuple, jax.Array] = {}
        self.order = direct + [i for _, idx in self.groups for i in idx]
        self.offsets: dict[int, int] = {}
        start = 0
        for i in self.order:
            self.offsets[i] = start
            start += math.prod(self.shapes[i])
        self.size = start

    def take_all(self, vectors: Sequence[jax.Array], idx: Sequence[int]) -> list[tuple]:
        """Each leaf's units (for each leaf in ``idx``) of each flat vector, in the leaf's
        ``keepdims`` shape, read from pieces of the vectors (:func:`leaf_pieces`): as a slice
        of the vector per leaf, each was a kernel of its own, 194 to read the per-leaf norms
        of a 147-leaf tree and 52 in the rescue loop's body."""
        spans = [(self.offsets[i], math.prod(self.shapes[i])) for i in idx]
        return [
            tuple(lax.reshape(v, self.shapes[i]) for v in piece)
            for i, piece in zip(idx, leaf_pieces(vectors, spans))
        ]

    def unit_sizes(self, sizes: Sequence[int]) -> np.ndarray:
        """The number of entries of each unit, as a vector aligned with the units."""
        return np.concatenate([np.full(math.prod(self.shapes[i]), sizes[i]) for i in self.order])

    def stacked_rows(self, width: int, idx: list[int]) -> jax.Array:
        """The rows of a group's units, stacked once: the rescue loop's body reads the
        ordinary pass's matrix rather than laying the leaves out again (at 1,000 small
        leaves that was 4,000 instructions in the body, for XLA's while-loop passes)."""
        key = (width, tuple(idx))
        if key not in self._rows:
            rows = [_unit_matrix(self.leaves[i], self.axes[i], width) for i in idx]
            self._rows[key] = rows[0] if len(rows) == 1 else jnp.concatenate(rows)
        return self._rows[key]

    def sums(self, ord: float, dtype: np.dtype, c: jax.Array | None) -> jax.Array:
        """``sum(|x * c|**ord)`` of every unit, ``c`` a flat vector of per-unit scales (or
        ``None``: unscaled)."""
        parts = []
        cs = [None] * len(self.direct) if c is None else self.take_all([c], self.direct)
        for i, ci in zip(self.direct, cs):
            x, a = self.leaves[i], self.axes[i]
            # The ordinary pass reads the leaf through a barrier (see :func:`barrier`).
            x = barrier(x, 4) if c is None else _times(x, ci[0], dtype)
            s = jnp.sum(_magnitude(x, ord, dtype), a, keepdims=True)
            parts.append(jnp.ravel(s))
        for (_, width), idx in self.groups:
            stacked_rows = self.stacked_rows(width, idx)
            if c is not None:
                start = self.offsets[idx[0]]
                scale = c[start : start + stacked_rows.shape[0], None]
                stacked_rows = _times(stacked_rows, scale, dtype)
            parts.append(jnp.sum(_magnitude(stacked_rows, ord, dtype), 1))
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def _unit_pairs(
    leaves: list[jax.Array],
    ord: float,
    axes: Sequence[tuple[int, ...] | None],
    *,
    zero_ok: ZeroOk | None = None,
    mesh: Sequence[LeafMesh] | None = None,
    flat: bool = True,
) -> list[Norm]:
    """Norms of each unit (``keepdims`` arrays); ``axes[i]`` are the axes reduced in leaf i.

    The ordinary pass sums each unit as is. A unit whose sum overflowed, or fell below
    ``n * tiny / eps``, is summed again with its entries multiplied by a fixed power of two
    (``_RESCUE_EXPONENTS``), in one trip of a ``lax.while_loop`` (no trip on ordinary inputs).

    A unit whose ordinary sum is exactly 0 may hold entries that all flushed to zero (the
    true norm is then below :func:`zero_bound`). By default such a unit takes the rescaled
    pass like any underflow. A clipper passes ``zero_ok``: given the ordinary sums, the ord
    and the (logical) unit sizes, it says per unit where 0 can be taken as is because no
    clipping decision could change (the unit's limit is at least the bound), so exactly-zero
    units (dead units, zero-initialised weights) cost nothing on its path.

    Without a mesh, the units of all leaves that are not explicitly sharded live on one
    flat vector (see :class:`_FlatUnits`): the loop carries two vectors, and ``zero_ok`` is
    called once with ``[sums]`` and ``[unit sizes]`` (a numpy vector). Under GSPMD the vector
    ties the layouts of units sharded along a kept dimension to the others' (their norms are
    small); a caller keeps its output in the input's layout (AGC: ``shard_alike``).

    With ``mesh`` (inside ``shard_map``/``pmap``), each unit's partial sum is added over the
    mesh axes that shard its reduced dimensions (one collective per distinct axis set), so
    every norm is the logical tensor's; the rescue decision is shared by every device.
    """
    if not leaves:
        return []
    dtype = accum_dtype(leaves)
    axes = [tuple(range(jnp.ndim(x))) if a is None else tuple(a) for x, a in zip(leaves, axes)]
    split = [lm.split(a) for lm, a in zip(mesh, axes)] if mesh else [((), ())] * len(leaves)
    red_axes = [r for r, _ in split]
    keep_union = tuple(dict.fromkeys(a for _, k in split for a in k))
    sizes = [
        math.prod(x.shape[i] for i in a) * axis_product(r)
        for x, a, r in zip(leaves, axes, red_axes)
    ]

    if ord == math.inf:
        local = [_nan_max(x, dtype, a, True) for x, a in zip(leaves, axes)]
        return [_from_max(m) for m in grouped_collective(local, red_axes, pmax)]

    one = jnp.ones((), dtype)
    down, up = (jnp.asarray(2.0**e, dtype) for e in _RESCUE_EXPONENTS[(np.dtype(dtype), ord)])

    def rescue(s, ok, floor):
        """Which units take the rescaled trip, and their scales (element-wise)."""
        bad = jnp.isinf(s) | ((s > 0) & (s < floor))
        bad = bad | (s == 0) if ok is None else bad | ((s == 0) & ~ok)
        return bad, jnp.where(bad, jnp.where(jnp.isinf(s), down, up), one)

    def on_vector(xs):
        """The leaves whose units go on the flat vector: all but explicitly sharded ones.
        Kept apart, each leaf's rescue test costs a few kernels (AGC over 2,000 small
        leaves compiled in 105 s; on the 147-leaf tree it ran 2,235 kernels, not 505)."""
        return [] if mesh else [i for i, x in enumerate(xs) if not _explicitly_sharded(x)]

    def leaf_sums(xs, cs, idx):
        # The ordinary pass reads each leaf through a barrier (see :func:`barrier`).
        scaled = lambda x, c: barrier(x, 4) if c is None else _times(x, c, dtype)
        local = [
            jnp.sum(_magnitude(scaled(xs[i], cs[j]), ord, dtype), axes[i], keepdims=True)
            for j, i in enumerate(idx)
        ]
        return grouped_collective(local, [red_axes[i] for i in idx], lax.psum)

    @jax.custom_jvp
    def pairs(xs):
        # Leaves on the flat vector, and leaves kept apart (one array per leaf).
        on_vec = on_vector(xs)
        apart = [i for i in range(len(xs)) if i not in set(on_vec)]
        apart_sizes = [sizes[i] for i in apart]
        units = _FlatUnits([xs[i] for i in on_vec], [axes[i] for i in on_vec])
        vec_sizes = units.unit_sizes([sizes[i] for i in on_vec]) if on_vec else None
        vec_floor = None if not on_vec else _underflow_floor(vec_sizes.astype(dtype), dtype)

        # The ordinary trip runs outside the loop (see _global_pair) and decides, once, which
        # units take the rescaled trip and at which scale: a rescaled unit is final, so a
        # second decision could change nothing. The loop body only sums again, and clears
        # the flag its condition reads. (A body that decided again had XLA's while-loop
        # passes analyse every per-leaf test: 15 of AGC's 20 s of compile at 147 leaves.)
        s_vec = units.sums(ord, dtype, None) if on_vec else jnp.ones((0,), dtype)
        s_apart = leaf_sums(xs, [None] * len(apart), apart)
        flags = []
        c_vec = jnp.ones((units.size,), dtype)
        if on_vec:
            ok = None if zero_ok is None else zero_ok([s_vec], ord, [vec_sizes])[0]
            bad, c_vec = rescue(s_vec, ok, vec_floor)
            flags.append(jnp.any(bad))
        oks = None if zero_ok is None or not apart else zero_ok(s_apart, ord, apart_sizes)
        c_apart = []
        for j, i in enumerate(apart):
            ok = None if oks is None else oks[j]
            floor = _underflow_floor(sizes[i], dtype)
            bad, c = rescue(s_apart[j], ok, floor)
            c_apart.append(c)
            flags.append(jnp.any(bad))
        again = stacked(jnp.any, flags, fence=True)
        if keep_union:  # units sharded over these axes differ per device: decide together
            again = lax.pmax(again.astype(np.int32), keep_union) > 0

        def body(state):
            s_vec = units.sums(ord, dtype, c_vec) if on_vec else state[0]
            return s_vec, leaf_sums(xs, c_apart, apart), state[2] & False  # see _global_pair

        s_vec, s_apart, _ = lax.while_loop(lambda st: st[2], body, (s_vec, s_apart, again))
        out: list[Any] = [None] * len(xs)
        vec = Norm(1 / c_vec, _finish(s_vec, ord))
        for i, (m, r) in zip(on_vec, units.take_all([vec.m, vec.r], range(len(on_vec)))):
            out[i] = Norm(m, r)
        for j, i in enumerate(apart):
            out[i] = Norm(1 / c_apart[j], _finish(s_apart[j], ord))
        return out, vec

    # The flat vector travels with the per-leaf norms (as the attribute ``flat`` of the list),
    # so :func:`unit_clip` works on it directly instead of concatenating the per-leaf slices
    # back (each slice would be a kernel of its own).
    order = []
    on_vec = on_vector(leaves)
    if on_vec:
        units = _FlatUnits([leaves[i] for i in on_vec], [axes[i] for i in on_vec])
        order = [on_vec[j] for j in units.order]

    @pairs.defjvp
    def pairs_jvp(primals, tangents):
        (xs,), (dxs,) = primals, tangents
        out, vec = pairs(xs)
        local = [
            _tangent_partial(x, dx, o.m, ord, dtype, a) for x, dx, a, o in zip(xs, dxs, axes, out)
        ]
        dvalues = grouped_collective(local, red_axes, lax.psum)
        dout = [Norm(jnp.zeros_like(o.m), _tangent_r(dv, o, ord)) for o, dv in zip(out, dvalues)]
        dvec = Norm(jnp.zeros_like(vec.m), jnp.zeros_like(vec.r))  # unused by any caller's jvp
        if order:
            dvec = Norm(dvec.m, jnp.concatenate([jnp.ravel(dout[i].r) for i in order]))
        return (out, vec), (dout, dvec)

    out, vec = pairs(list(leaves))
    return UnitNorms(out, Flat(vec, order) if order else None)


def combine(units: Sequence[Norm], ord: Any, keep: Sequence[tuple[str, ...]] | None = None) -> Norm:
    """The norm over all units together (for ``ClipStats.norm`` of per-unit methods).

    ``keep[i]``: the mesh axes over which leaf i's units differ (its kept dimensions are
    sharded there); those units are combined across the devices as well, each once.

    Norms from :func:`unit_pairs` are combined from the flat vector they were sliced from
    (:class:`UnitNorms`), not from their slices concatenated back: XLA's fusion pass took
    5.2 s over the 999 slices of ``monitor(per_leaf=True)`` on a 999-leaf tree.
    """
    flat = getattr(units, "flat", None)
    if flat is not None and not (keep and any(keep)):
        on_vector = set(flat.order)
        units = [flat.norm] + [u for i, u in enumerate(units) if i not in on_vector]
    return _by_ord(ord, lambda o: _combine_sharded(units, o, keep))


def in_leaf_order(units: Sequence[Norm], idx: Sequence[int] | None = None) -> Norm:
    """The units of leaves ``idx`` (default: all), one leaf after the other (each leaf's
    units flattened), as one vector.

    From :class:`UnitNorms` whose flat vector holds those leaves, a gather of that vector
    (one kernel, none when the orders agree), rather than its slices concatenated back (see
    :func:`combine`); otherwise a concatenation.
    """
    idx = list(range(len(units))) if idx is None else list(idx)
    flat = getattr(units, "flat", None)
    if flat is None or not set(idx) <= set(flat.order):
        return Norm(
            *(jnp.concatenate([jnp.ravel(u) for u in us]) for us in zip(*[units[i] for i in idx]))
        )
    counts = {i: int(jnp.size(units[i].r)) for i in flat.order}
    starts = dict(zip(flat.order, np.cumsum([0, *[counts[i] for i in flat.order]]).tolist()))
    index = np.concatenate([np.arange(starts[i], starts[i] + counts[i]) for i in idx])
    if np.array_equal(index, np.arange(flat.norm.r.shape[0])):
        return flat.norm
    return Norm(flat.norm.m[index], flat.norm.r[index])


def _combine_sharded(units, ord, keep) -> Norm:
    if not keep or not any(keep):
        return _combine(units, ord)
    groups: dict[tuple[str, ...], list[Norm]] = {}
    for u, k in zip(units, keep):
        groups.setdefault(k, []).append(u)
    parts = []
    for k, members in groups.items():
        local = _combine(members, ord)
        parts.append(_across(local, ord, k) if k else local)
    return _combine(parts, ord)


def _across(norm: Norm, ord: float, axes: tuple[str, ...]) -> Norm:
    """Combines one norm per device over the mesh ``axes`` (pivoting like :func:`_combine`)."""
    m, r = norm
    value = m * r
    if ord == math.inf:
        return _from_max(pmax(value, axes))
    bad = (~(jnp.isfinite(m) & jnp.isfinite(r))).astype(m.dtype)
    big, m_max, any_bad = pmax([value, m, bad], axes)
    pivot = jnp.where(jnp.isinf(big) & (any_bad == 0), m_max, big)
    ok = (pivot >= jnp.finfo(pivot.dtype).tiny) & jnp.isfinite(pivot)
    ratio = times_inverse(m, jnp.where(ok, pivot, 1)) * r
    s = lax.psum(ratio * ratio if ord == 2 else ratio, axes)
    degenerate = _from_max(pivot)
    return Norm(jnp.where(ok, pivot, degenerate.m), jnp.where(ok, _finish(s, ord), degenerate.r))


def _combine(units: Sequence[Norm], ord: float) -> Norm:
    if not units:
        return Norm(jnp.ones((), np.float32), jnp.zeros((), np.float32))
    # Single-unit norms are concatenated into one array; arrays of units (AGC) are reduced
    # each on its own: concatenating them would tie their shardings together (a type error
    # under explicit sharding; under GSPMD, a replicated leaf's output would pick up another
    # leaf's sharding).
    plain = [u for u in units if jnp.size(u.r) == 1]
    chunks = [u for u in units if jnp.size(u.r) != 1]
    if plain:
        chunks.append(
            Norm(
                jnp.concatenate([jnp.ravel(u.m) for u in plain]),
                jnp.concatenate([jnp.ravel(u.r) for u in plain]),
            )
        )
    top = lambda xs: stacked(jnp.max, xs, fence=True)
    big = top([jnp.max(c.m * c.r, initial=0) for c in chunks])
    if ord == math.inf:
        return _from_max(big)
    # When a unit's value overflowed (entries near the dtype's max), pivot on the largest m.
    finite = [jnp.all(jnp.isfinite(c.m) & jnp.isfinite(c.r)) for c in chunks]
    finite = stacked(jnp.all, finite, fence=True)
    m_max = top([jnp.max(c.m, initial=0) for c in chunks])
    pivot = jnp.where(jnp.isinf(big) & finite, m_max, big)
    ok = (pivot >= jnp.finfo(pivot.dtype).tiny) & jnp.isfinite(pivot)
    ratios = [times_inverse(c.m, jnp.where(ok, pivot, 1)) * c.r for c in chunks]
    s = stacked(jnp.sum, [jnp.sum(x * x) if ord == 2 else jnp.sum(x) for x in ratios], fence=True)
    degenerate = _from_max(pivot)
    return Norm(jnp.where(ok, pivot, degenerate.m), jnp.where(ok, _finish(s, ord), degenerate.r))


def summarize_units(
    norms: Sequence[Norm],
    factors: Sequence[tuple[jax.Array, jax.Array, jax.Array]],
    ord: Any,
    keep: Sequence[tuple[str, ...]],
) -> tuple[Norm, jax.Array, jax.Array, int | jax.Array]:
    """What a per-unit clipper did, each unit counted once across the devices.

    ``factors[i]`` is :func:`clip_factors`' ``(p, q, clipped)`` for leaf i's units, and
    ``keep[i]`` the mesh axes over which those units differ (see :func:`combine`). Returns
    the norm over all units, the smallest factor, the number of units clipped and of units.
    """
    total = combine(norms, ord, keep)
    scales = [jnp.min(p * q, initial=1.0) for p, q, _ in factors]
    clipped = [jnp.sum(c, dtype=np.int32) for _, _, c in factors]
    clipped = grouped_collective(clipped, keep, lax.psum)
    scales = grouped_collective(scales, keep, lax.pmin)
    units = sum(c.size * axis_product(k) for (_, _, c), k in zip(factors, keep))
    smallest = stacked(jnp.min, scales, fence=True) if scales else jnp.ones((), np.float32)
    n_clipped = stacked(jnp.sum, clipped, fence=True) if clipped else jnp.zeros((), np.int32)
    return total, smallest, n_clipped, units


def unit_clip(
    leaves: Sequence[jax.Array],
    norms: Sequence[Norm],
    limits_for: Callable[[Any], jax.Array],
    sizes: Sequence[int],
    ord: Any,
    keep: Sequence[tuple[str, ...]],
) -> tuple[list[tuple[jax.Array, jax.Array, jax.Array]], Norm, jax.Array, Any, Any]:
    """Each leaf's :func:`clip_factors` against ``limits_for(unit sizes)``, and the summary.

    Returns the factors per leaf and :func:`summarize_units`' figures. Units of leaves that
    are not explicitly sharded and whose units are the same on every device (no ``keep``
    axes) are handled as one flat vector: per-leaf scalar chains would be merged by XLA into
    one giant kernel, compiled in time superlinear in the number of leaves.
    """
    n = len(leaves)
    flat = [i for i in range(n) if not keep[i] and not _explicitly_sharded(leaves[i])]
    rest = [i for i in range(n) if i not in set(flat)]
    factors: list[Any] = [None] * n
    parts = []
    given = getattr(norms, "flat", None)
    if given is not None and set(given.order) <= set(flat):
        flat = list(given.order)  # in the norms' own order: their vector, no gather
        rest = [i for i in range(n) if i not in set(flat)]
    if flat:
        vec = in_leaf_order(norms, flat)
        counts = [int(jnp.size(norms[i].r)) for i in flat]
        unit_sizes = np.concatenate([np.full(k, sizes[i]) for k, i in zip(counts, flat)])
        p, q, clipped = materialize(*clip_factors(vec, limits_for(unit_sizes)))
        starts = np.cumsum([0, *counts[:-1]])
        spans = factor_spans([p, q, clipped], list(zip(starts.tolist(), counts)))
        for i, span in zip(flat, spans):
            shape = jnp.shape(norms[i].r)
            factors[i] = tuple(lax.reshape(v, shape) for v in span)
        parts.append((jnp.min(p * q, initial=1.0), jnp.sum(clipped, dtype=np.int32)))
    for i in rest:
        factors[i] = clip_factors(norms[i], limits_for(sizes[i]))
    if flat and not any(keep):
        total = combine([vec] + [norms[i] for i in rest], ord)
    else:
        total = combine(norms, ord, keep)
    if rest:
        _, smallest, n_clipped, _ = summarize_units(
            [norms[i] for i in rest], [factors[i] for i in rest], ord, [keep[i] for i in rest]
        )
        parts.append((smallest, n_clipped))
    units = sum(int(jnp.size(norms[i].r)) * axis_product(keep[i]) for i in range(n))
    smallest = stacked(jnp.min, [a for a, _ in parts]) if parts else jnp.ones((), np.float32)
    n_clipped = stacked(jnp.sum, [b for _, b in parts]) if parts else jnp.zeros((), np.int32)
    return factors, total, smallest, n_clipped, units


# ---------------------------------------------------------------------------
# Clipping factors
# ---------------------------------------------------------------------------


def clip_factors(norm: Norm, limit: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Factors ``(p, q, clipped)`` so that ``x * p * q`` has norm ``min(norm, limit)``.

    Clips iff the norm is finite and strictly above ``limit``; a non-finite norm passes
    through (a guard decides what to do with it). ``p`` is 1, or ``2**-K`` when the norm's
    magnitude ``m`` exceeds ``2**K``, so neither factor underflows even where the true scale
    ``limit / norm`` is below the dtype's tiny (entries near its max). No division by a
    value that can be 0 is ever formed, so ``jax.grad`` through it stays finite.
    """
    m, r = norm
    dtype = m.dtype
    limit = jnp.maximum(jnp.asarray(limit).astype(dtype), 0)
    k = _SPLIT_EXPONENT[np.dtype(dtype)]
    one = jnp.ones_like(m)
    # Decide on the reported value m * r itself, so "norm <= limit" always means unchanged;
    # a value that overflows (entries near the dtype's max) is above any finite limit.
    value = m * r
    positive = r > 0
    above = jnp.where(jnp.isinf(value), jnp.isfinite(limit), value > limit)
    clipped = norm.finite & positive & above
    big = m > 2.0**k
    m_reduced = jnp.where(big, m * jnp.asarray(2.0**-k, dtype), m)  # <= 2**k: 1/m is normal
    # limit / norm == p * q, with p = 2**-k when big, else 1
    q = (limit / jnp.where(positive, r, one)) / m_reduced
    p = jnp.where(big, jnp.asarray(2.0**-k, dtype), one)
    # Keep the split only where the scale itself is subnormal: otherwise (x * p) * q would
    # flush small entries that x * (p * q) keeps. Unsplit, p * q equals (limit / r) / m:
    # the powers of two scale exactly.
    split = p * q < jnp.finfo(dtype).tiny
    # Each factor is made by a division, the last operation: XLA (CPU) does not fuse an
    # expensive operation into a kernel that broadcasts it, so per-unit factors are computed
    # once per unit. Fused, the whole chain above ran once per entry in the kernel that
    # scales the leaf (AGC on a (32000, 320) embedding: 1.18x optax, 0.99x computed once).
    # Unclipped units divide 1 by 1.
    q = jnp.where(clipped, limit / jnp.where(positive, r, one), one) / jnp.where(
        clipped, jnp.where(split, m_reduced, m), one
    )
    p = one / jnp.where(clipped & split & big, jnp.asarray(2.0**k, dtype), one)
    return p, q, clipped


def _through_sort(arrays: Sequence[jax.Array]) -> list[jax.Array]:
    """``arrays`` (of one shape) unchanged, as outputs of one sort keyed on their index
    along axis 0: XLA never fuses a sort, so each is computed once, an array of its own.
    Booleans travel as int32. Arrays with a sharding in their type are returned as they
    are (a sort needs one sharding for keys and values)."""
    if any(_explicitly_sharded(a) for a in arrays):
        return list(arrays)
    carriers = [a.astype(np.int32) if a.dtype == np.bool_ else a for a in arrays]
    keys = lax.broadcasted_iota(np.int32, carriers[0].shape, 0)
    out = lax.sort([keys, *carriers], dimension=0, num_keys=1)[1:]
    return [o.astype(a.dtype) for o, a in zip(out, arrays)]


def materialize(*xs: jax.Array) -> tuple[jax.Array, ...]:
    """``xs`` unchanged, but computed once instead of inside every kernel that reads them.

    XLA duplicates cheap scalar computations into each fusion that consumes them. For a
    factor or a predicate applied to every leaf, that copies the whole chain that made it
    into one kernel per leaf (compile time then grows as leaves x chain length: 40% of
    the instructions of ``clip_by_global_norm`` at 100 leaves). Values of one dtype and
    shape are stacked and passed through one reduction (:func:`_reduced`), which XLA never
    fuses into the kernels that read its output, and into which it fuses the computation
    that made them. (A sort keyed on the index, used before, is never fused either, but
    the sort, its keys and the stacking were kernels of their own.) Complex values still
    go through a sort (:func:`_through_sort`).
    """
    out: list[Any] = list(xs)
    groups: dict[Any, list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault((jnp.result_type(x), jnp.shape(x)), []).append(i)
    for (dtype, _), idx in groups.items():
        values = jnp.stack([jnp.asarray(xs[i]).astype(dtype) for i in idx])
        if _explicitly_sharded(values):
            continue
        (values,) = _reduced((values,)) if _fusible([values]) else _through_sort([values])
        for j, i in enumerate(idx):
            out[i] = values[j]
    return tuple(out)


_PIECE = 16
_BLOCK = 256
_WINDOWS_PER_KERNEL = 32
# Up to this many units (of all leaves together), each leaf's clipping factors are read at
# a runtime offset of the factor vectors rather than from pieces (see factor_spans).
_OFFSET_UNITS = 512


def leaf_pieces(vectors: Sequence[jax.Array], spans: Sequence[tuple[int, int]]) -> list[tuple]:
    """``v[start : start + count]`` of every vector, for every ``(start, count)`` span.

    XLA's CPU compile time of a kernel that reads part of a vector grows faster than the
    vector's length: 1,000 kernels each reading one entry took 0.5 s from a vector of 16
    entries, 1.7 s from 256 and 6 s from 1,024; reading 16 entries, 0.6 s from 272 and
    8.7 s from 16,000. So spans of up to ``_PIECE`` entries read from a block of their
    own: the block of ``_BLOCK`` entries (plus ``_PIECE`` of overlap, so no such span
    crosses two) that holds them, only where some span starts; one-entry spans (a leaf of
    one unit), which cost more, from a piece of ``_PIECE`` entries. The windows are
    outputs of variadic reductions of up to ``_WINDOWS_PER_KERNEL`` windows each
    (:func:`_copies`), which compute their slices in the same kernel (as operands of one
    sort, each slice was a kernel: monitor(per_leaf=True) over 2,000 small leaves compiled
    in 14.3 s instead of 17.8 s, ``clip_by_leaf_norm`` 5.6 s instead of 7.0 s); complex
    vectors go through a sort. Longer spans are dynamic slices of the vectors, each at an
    offset that is a runtime scalar of its own (outputs of :func:`_copies`, which XLA
    cannot fold into constants), so the kernels that read spans of one length compile
    once. As static slices, each reader was a kernel to compile of its own: AGC over 999
    leaves had 670 of them and compiled in 9.6 s, now 7.8 s; on the 147-leaf tree 2.4 s,
    now 1.7 s, at the same speed (paired, new/old 1.00x). Copying the spans out instead
    compiled as fast but ran 3-4% slower: the copies' kernels sit between the factors and
    every leaf's scaling.
    """
    n = int(jnp.shape(vectors[0])[0])
    if n <= _PIECE or any(_explicitly_sharded(v) for v in vectors):
        return [tuple(v[start : start + count] for v in vectors) for start, count in spans]

    def cut(width: int, stride: int, starts: list[int]) -> dict[int, tuple]:
        """The windows ``v[w * stride : w * stride + width]`` holding ``starts``, each
        an array of its own: {w: one per vector}."""
        if not starts:
            return {}
        windows = sorted({s // stride for s in starts})
        pad = max(max(w * stride + width for w in windows) - n, 0)
        padded = [jnp.pad(v, (0, pad)) for v in vectors]
        parts = [
            lax.slice(v, (w * stride,), (w * stride + width,)) for v in padded for w in windows
        ]
        flat = _copies(parts)
        k = len(windows)
        return {
            w: tuple(flat[j * k + i] for j in range(len(vectors))) for i, w in enumerate(windows)
        }

    singles = cut(_PIECE, _PIECE, [s for s, c in spans if c == 1])
    small = [s for s, c in spans if 1 < c <= _PIECE] if n > _BLOCK + _PIECE else []
    blocks = cut(_BLOCK + _PIECE, _BLOCK, small)
    # Longer spans are read at an offset that is a runtime scalar of its own, so the kernels
    # that read spans of one length are one compiled kernel (see the docstring).
    longer = [i for i, (_, count) in enumerate(spans) if count > _PIECE]
    own = dict(zip(longer, _at_runtime_offsets(vectors, [spans[i] for i in longer])))
    out = []
    for i, (start, count) in enumerate(spans):
        if i in own:
            out.append(own[i])
            continue
        if count == 1 and singles:
            base, window = start % _PIECE, singles[start // _PIECE]
        elif 1 < count <= _PIECE and blocks:
            base, window = start % _BLOCK, blocks[start // _BLOCK]
        else:
            base, window = start, vectors
        out.append(tuple(_span(v, base, count) for v in window))
    return out


def _span(v: jax.Array, start: int, count: int) -> jax.Array:
    """``v[start : start + count]``, with ``lax`` (``jnp`` indexing is a jit of its own,
    traced for every leaf: 0.7 s of the 1.6 s trace of ``clip_by_leaf_norm`` over 2,000
    small leaves)."""
    return lax.slice(v, (start,), (start + count,))


def _at_runtime_offsets(
    vectors: Sequence[jax.Array], spans: Sequence[tuple[int, int]]
) -> list[tuple]:
    """``v[start : start + count]`` of every vector, for every span, each a dynamic slice at
    an offset that is a runtime scalar of its own (outputs of :func:`_copies`, which XLA
    cannot fold into constants): the kernels that read spans of one length compile once,
    and the offsets, which depend on nothing the step computes, are ready before the
    vectors are."""
    if not spans:
        return []
    # Unsigned, so the slice needs no wrapping of negative offsets in every reader.
    zero = lax.optimization_barrier(jnp.zeros((), np.uint32))  # no folding past it
    offsets = _copies([jnp.uint32(start) + zero for start, _ in spans])
    return [
        tuple(lax.dynamic_slice(v, (offset,), (count,)) for v in vectors)
        for offset, (_, count) in zip(offsets, spans)
    ]


def factor_spans(vectors: Sequence[jax.Array], spans: Sequence[tuple[int, int]]) -> list[tuple]:
    """Each leaf's span of the factor vectors, for the kernels that scale the leaves.

    For vectors of more than ``_PIECE`` and at most ``_OFFSET_UNITS`` entries, every span is
    a dynamic slice at a runtime offset (:func:`_at_runtime_offsets`), read by the scaling
    kernel itself; otherwise (and for explicitly sharded vectors) :func:`leaf_pieces`.
    The pieces' kernels sit between the factors and every leaf's scaling, so in a chain
    no kernel of Adam could start before them: ``chain(clip_by_leaf_norm, adam)`` on a
    147-leaf float32 tree of 25M parameters cost 1.13-1.17x ``adam`` from pieces and
    1.07-1.10x from runtime offsets (``clip_by_block_rms`` 1.13x against 1.08x; alone
    1.04-1.07x either way). That chain also compiled faster: 0.70-0.87x at 147 leaves, and
    0.86x and 0.89x over about 300 and 500 small leaves; but 1.3x over 999, where the
    pieces stay.
    """
    n = int(jnp.shape(vectors[0])[0])
    if not _PIECE < n <= _OFFSET_UNITS or any(_explicitly_sharded(v) for v in vectors):
        return leaf_pieces(vectors, spans)
    return _at_runtime_offsets(vectors, spans)


def _copies(parts: Sequence[jax.Array]) -> list[jax.Array]:
    """``parts`` unchanged, each an array of its own: the outputs of variadic reductions
    (:func:`_reduced`) of up to ``_WINDOWS_PER_KERNEL`` parts of one shape and dtype, which
    compute the parts (slices) in their own kernel; complex parts go through a sort."""
    out: list[Any] = [None] * len(parts)
    groups: dict[Any, list[int]] = {}
    for i, part in enumerate(parts):
        groups.setdefault((part.shape, part.dtype), []).append(i)
    for idx in groups.values():
        if not _fusible([parts[idx[0]]]):
            for i, o in zip(idx, _through_sort([parts[i] for i in idx])):
                out[i] = o
            continue
        for g in range(0, len(idx), _WINDOWS_PER_KERNEL):
            group = idx[g : g + _WINDOWS_PER_KERNEL]
            for i, o in zip(group, _reduced(tuple(parts[i] for i in group))):
                out[i] = o
    return out


_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


# The bits that stand for "no value" in _reduced, per width (a NaN in float16, float32 and
# float64). Any pattern would do (see _keep_value); a rare one spares the select's work.
_MARK = {2: 0x7E5A, 4: 0x7FC5A5A5, 8: 0x7FF8A5A5A5A5A5A5}


def _bitwise(dtype: np.dtype) -> bool:
    """Booleans and integers, whose mark in :func:`_reduced` is 0, compared as they are."""
    return dtype == np.bool_ or jnp.issubdtype(dtype, jnp.integer)


def _mark(dtype: np.dtype) -> np.ndarray:
    """The mark of :func:`_reduced` in ``dtype``, a numpy scalar (a constant when traced)."""
    if _bitwise(dtype):
        return np.zeros((), dtype)
    return np.asarray(_MARK[dtype.itemsize], _UNSIGNED[dtype.itemsize]).view(dtype)


def _keep_value(a: jax.Array, b: jax.Array) -> jax.Array:
    """The combiner of :func:`_reduced`: ``b`` unless it is the mark, then ``a``. Whatever
    the order, ``[v, mark]`` from ``mark`` reduces to ``v``'s bits (a ``v`` with the mark's
    bits gives the same bits); no arithmetic, so nothing is flushed or canonicalised."""
    if _bitwise(a.dtype):
        # Not a bitwise or with 0, which XLA's simplifier folds away with the reduction:
        # the values' computation was then fused into every kernel that read them.
        return lax.select(b == _mark(a.dtype), a, b)
    unsigned = _UNSIGNED[a.dtype.itemsize]
    is_mark = lax.bitcast_convert_type(b, unsigned) == _mark(a.dtype).view(unsigned)
    return lax.select(is_mark, a, b)


def _keep_values(u: tuple, v: tuple) -> tuple:
    # One function for every call: lax.reduce caches the traced combiner by its identity.
    return tuple(_keep_value(a, b) for a, b in zip(u, v))


@jax.custom_jvp
def _reduced(arrays: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """``arrays`` (one shape; real, integer or boolean) unchanged, bit for bit (but for the
    payload of a bfloat16 NaN: XLA computes bfloat16 selects in float32): the outputs of
    one variadic reduction over two rows, the values and a mark (:func:`_keep_value`).
    Differentiated, the identity."""
    if not arrays:
        return arrays
    inits = [_mark(a.dtype) for a in arrays]
    rows = [
        lax.concatenate([lax.broadcast(a, (1,)), lax.broadcast(m, (1, *a.shape))], 0)
        for a, m in zip(arrays, inits)
    ]
    return tuple(lax.reduce(rows, inits, _keep_values, (0,)))


@_reduced.defjvp
def _reduced_jvp(primals, tangents):
    return _reduced(primals[0]), tangents[0]


def _fusible(xs: Sequence[jax.Array]) -> bool:
    """Whether :func:`_reduced` can carry ``xs``: real, integer or boolean, without a
    sharding in their type (a reduction's operands share one)."""
    return all(
        not jnp.iscomplexobj(x) and not _explicitly_sharded(x) and x.dtype.itemsize in _UNSIGNED
        for x in xs
    )


def one_kernel(tree: Any) -> Any:
    """``tree`` (a pytree of scalars) unchanged, bit for bit, computed by one kernel.

    XLA (CPU) compiles each scalar computation that several kernels or outputs read into a
    kernel of its own, about 5 ms each. Here the scalars are the outputs of one variadic
    reduction that passes their bits through (:func:`_reduced`): XLA fuses everything
    that computes them into that reduction. Eight chains of a square root and a division
    compiled in 25 ms this way, 60 ms as separate kernels; the statistics of
    ``chain(clip_by_global_norm, adam)`` over 99 leaves took 7 kernels fewer.
    """
    leaves, treedef = jax.tree.flatten(tree)
    xs = [jnp.asarray(x) for x in leaves]
    if not xs or any(x.ndim for x in xs) or not _fusible(xs):
        return tree
    return jax.tree.unflatten(treedef, list(_reduced(tuple(xs))))


def global_factors(norm: Norm, limit: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`clip_factors` for factors shared by many leaves, each computed once.

    ``p`` and ``q`` are the two outputs of one kernel (:func:`_reduced`), so each leaf's
    kernel reads two scalars. As two entries of one vector (:func:`materialize`), every
    kernel that scales a leaf also sliced them out of it: ``chain(clip_by_global_norm,
    adam)`` compiled in 1.43x ``adam``'s time at 999 leaves, against 1.35x with the two
    scalars (1.28x against 1.21x at 99 leaves; paired medians of 4 and 40 rounds). See
    :func:`scale_leaf` for the order in which they are applied.
    """
    p, q, clipped = clip_factors(norm, limit)
    p, q = _reduced((p, q)) if _fusible([p, q]) else materialize(p, q)
    return p, q, clipped


def separate(values: Sequence[jax.Array], anchor: jax.Array) -> list[jax.Array]:
    """``values``, each an array of its own: ``values[i] + i * anchor`` (``anchor`` a zero
    computed at run time, so that neither constant folding nor CSE can make two of them
    equal again) as the outputs of one optimization barrier.

    For scalars read by many kernels that XLA (CPU) would otherwise share, the way
    :func:`materialize` does it, but as separate buffers rather than slices of one sort's
    output. In the rescue loop of a 147-leaf float32 tree that took the compile from 0.58 s
    to 0.36 s, and the memory the process keeps after compiling down by 9 MiB.
    """
    if not values:
        return []
    values = [jnp.asarray(v) for v in values]
    copies = [v + (i * anchor).astype(v.dtype) for i, v in enumerate(values)]
    return list(lax.optimization_barrier(tuple(copies)))


def own_scalars(
    rows: Sequence[Sequence[Any]],
    dtypes: Sequence[Any],
    anchor: jax.Array,
    shapes: Sequence[tuple[int, ...]],
) -> list:
    """Each kernel's own copies of its scalars: ``rows[i]`` in ``dtypes[i]``, one tuple each,
    for the kernel that reduces an array of shape ``shapes[i]``.

    XLA (CPU) fuses a broadcast scalar into a reduction's kernel only when no other kernel
    reads the same broadcast; a scalar shared by the kernels of leaves of one shape (an equal
    constant, or the same threshold) becomes a full-size array in memory feeding them all.
    So the k-th kernel of each shape and dtype reads copy k, whose values carry
    ``k * anchor`` (``anchor`` a zero computed at run time, so that neither constant folding
    nor CSE can make two copies equal again); kernels of different shapes share a copy.
    Each copy is an output of one variadic reduction per k and dtype (:func:`_reduced`), so
    a kernel reads a buffer of its own: as slices of one vector, each slice was a kernel of
    its own, and ``clip_by_value`` over a 147-leaf tree compiled 200 of them (1.9 s against
    0.9 s without).
    """
    ranks: list[int] = []
    seen: dict[Any, int] = {}
    for shape, d in zip(shapes, dtypes):
        key = (tuple(shape), np.dtype(d))
        ranks.append(seen.get(key, 0))
        seen[key] = ranks[-1] + 1
    out: list[Any] = [None] * len(rows)
    groups: dict[tuple[int, np.dtype], list[int]] = {}
    for i, (k, d) in enumerate(zip(ranks, dtypes)):
        groups.setdefault((k, np.dtype(d)), []).append(i)  # a reduction has one float type
    for (k, d), idx in groups.items():
        values = [jnp.asarray(v, d) + (k * anchor).astype(d) for i in idx for v in rows[i]]
        flat = _reduced(tuple(values)) if _fusible(values) else materialize(*values)
        start = 0
        for i in idx:
            out[i] = tuple(flat[start : start + len(rows[i])])
            start += len(rows[i])
    return out


def own_read(x: jax.Array, tag: int = 0) -> jax.Array:
    """``x``, read by its own kernel.

    XLA (CPU) computes bfloat16 and float16 arithmetic in float32, and merges the widening
    converts of every kernel that reads one leaf (the norm's reduction and the kernel that
    writes the output) into one float32 copy of the leaf in memory. A barrier stops it;
    distinct ``tag``s keep two barriers on one leaf from being merged in turn.
    """
    if x.dtype.itemsize >= 4:
        return x
    return barrier(x, tag)


def barrier(x: jax.Array, tag: int) -> jax.Array:
    """``x`` through an optimization barrier (``tag`` keeps two barriers apart).

    A norm's ordinary pass reads every leaf through ``barrier(x, 4)``: XLA merges equal
    element-wise work of different kernels into one array in memory, so a norm beside
    Adam (``monitor()``, a guard, a norm logged next to the step) shared Adam's ``g * g``
    (float32) or its widening convert (bfloat16), and the step held a copy of every leaf.
    """
    return lax.optimization_barrier((x, jnp.int8(tag)))[0]


def fused_reduce(
    operands: Sequence[jax.Array], inits: Sequence[Any], ops: Sequence[Callable]
) -> tuple[jax.Array, ...]:
    """Reduces each of ``operands`` over all its axes with its ``op``, in one kernel.

    XLA (CPU) hands a reduction of one operand to its YNNPACK emitter, which fuses no
    compare or select: such an element-wise producer is written to memory first, a
    temporary the size of the leaf that every compiled program reserves, even for a branch
    that only a non-finite step takes. A reduction of two or more operands is emitted by
    XLA's own loop, which computes its producers in place (and runs slower: this is for
    statistics that only rare steps need). Every result must be used, or XLA drops its
    operand and the reduction has one again. Statistics only: no derivative flows through.
    """
    if len(operands) < 2:
        raise ValueError(f"fused_reduce needs two or more operands; got {len(operands)}.")
    operands = tuple(lax.stop_gradient(jnp.asarray(x)) for x in operands)
    inits = tuple(jnp.asarray(i, x.dtype) for i, x in zip(inits, operands))
    return tuple(
        lax.reduce(
            operands,
            inits,
            lambda u, v: tuple(op(a, b) for op, a, b in zip(ops, u, v)),
            tuple(range(operands[0].ndim)),
        )
    )


def nonfinite_count(x: jax.Array) -> jax.Array:
    """The number of NaN and infinite entries of ``x`` (int32), with no mask in memory.

    NaNs and infinities are counted apart in one :func:`fused_reduce` and added.
    """
    x = jnp.asarray(x)
    n_nan, n_inf = fused_reduce(
        (jnp.isnan(x).astype(np.int32), jnp.isinf(x).astype(np.int32)), (0, 0), (lax.add, lax.add)
    )
    return n_nan + n_inf


def all_finite(x: jax.Array) -> jax.Array:
    """Whether every entry of ``x`` is finite, as one plain sum: ``x - x`` is a zero for a
    finite entry and NaN for a NaN or an infinity, and the sum of zeros never overflows
    (``x * 0`` would read a broadcast zero, which XLA shares among the leaves of a shape
    and keeps in memory).

    A one-operand reduction, which XLA (CPU) compiles once for every leaf of a shape. With
    :func:`nonfinite_count` per leaf (a two-operand reduction each) for its flags,
    ``error_if_nonfinite`` over 999 leaves compiled in 5.2 s; 2.4 s this way.
    """
    x = lax.stop_gradient(jnp.asarray(x))
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.ones((), bool)
    return ~jnp.isnan(jnp.sum(x - x))


# Bit operations have no derivative: differentiated, the bit paths are the conversion and
# the select they stand for (without these rules, gradients through them were zero).
@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _bfloat16_by_bits(y: jax.Array, exact: bool, widened: bool) -> jax.Array:
    """``y.astype(bfloat16)`` for float32 ``y`` (round to nearest, ties to even), from bits.

    The top 16 bits of a float32 are its bfloat16; adding ``0x7FFF`` plus the lowest kept
    bit rounds them to nearest even (a carry into the exponent gives the next binade, or
    infinity past the largest bfloat16, as the conversion does). A NaN with nonzero low 16
    bits could round to a number (an infinity where its kept mantissa bits are 0, a zero
    where the carry runs past the exponent), so NaNs are mapped to one NaN first, unless
    ``widened``: then every NaN of ``y`` has low bits 0 (a widened bfloat16 NaN, or the NaN
    of an invalid operation), to which the rounding adds at most ``0x8000``, no carry: its
    top half, a bfloat16 NaN, is kept.
    ``exact``: every value of ``y`` is a bfloat16 already (or a quiet NaN, whose top bits
    stay a NaN), so the low bits are dropped.
    """
    bits = lax.bitcast_convert_type(y, jnp.uint32)
    if exact:
        rounded = bits >> 16
    else:
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        if not widened:
            rounded = jnp.where(jnp.isnan(y), jnp.uint32(0x7FC0), rounded)
    return lax.bitcast_convert_type(rounded.astype(jnp.uint16), jnp.bfloat16)


@_bfloat16_by_bits.defjvp
def _bfloat16_by_bits_jvp(exact, widened, primals, tangents):
    return _bfloat16_by_bits(primals[0], exact, widened), tangents[0].astype(jnp.bfloat16)


@jax.custom_jvp
def _keep_bits(keep: jax.Array, x: jax.Array) -> jax.Array:
    bits = lax.bitcast_convert_type(x, jnp.uint16)
    return lax.bitcast_convert_type(jnp.where(keep, bits, jnp.uint16(0)), x.dtype)


@_keep_bits.defjvp
def _keep_bits_jvp(primals, tangents):
    keep, x = primals
    return _keep_bits(keep, x), jnp.where(keep, tangents[1], jnp.zeros_like(tangents[1]))


def _by_bits(x: jax.Array) -> bool:
    """Whether :func:`narrow` and :func:`keep_or_zero` work on the bits of bfloat16 ``x``.

    On the CPU backend, for leaves of at least ``SMALL_LEAF`` entries: the kernels that read
    the result then compute it themselves, which saves a write and a read of the leaf but
    adds to their code (every bfloat16 leaf by bits took the compile of
    ``chain(clip_by_global_norm, adam)`` over 999 small leaves from 7.8 s to 10.3 s). The
    values are the same either way, so the choice is made when tracing, by the default
    backend.
    """
    return x.size >= SMALL_LEAF and jax.default_backend() == "cpu"


def narrow(y: jax.Array, dtype: Any, *, exact: bool = False, widened: bool = False) -> jax.Array:
    """``y.astype(dtype)``, written so that XLA (CPU) can compute it inside its consumers.

    XLA's CPU compiler counts a float32 -> bfloat16 ``convert`` as expensive and never
    duplicates it into two kernels, so a scaled bfloat16 gradient read by both of Adam's
    moment kernels was written to memory and read back: ``chain(clip_by_global_norm, adam)``
    on the bfloat16 tree cost 1.32x ``adam`` against 1.20x when the rounding is integer
    arithmetic, which fuses into both (paired, 41 rounds, on a 2-core Intel Xeon VM). Which
    wins depends on the machine: on a 2-core AMD EPYC VM, rounding twice in Adam's two
    kernels costs more than the write and the read it saves (1.26-1.31x against
    1.16-1.22x, paired, four probes of 40-50 rounds). The integer path stays: it adds no
    kernel and no memory traffic to Adam's, which should matter more where each core has
    less memory bandwidth than on these VMs (a guess, not measured). The values are the
    conversion's (NaN payloads aside). ``exact=True`` promises that ``y`` holds values of
    ``dtype`` (a clamp or a select of them), which then only lose their low bits (a shift
    instead of the rounding). ``widened=True`` promises that every NaN of ``y`` is a value of
    ``dtype`` widened or the NaN of an invalid operation (``y`` computed from ``dtype``
    values and factors that are never NaN): its low 16 bits are then 0, the rounding keeps
    it a NaN, and the select that maps NaNs to one NaN is left out (two of the rounding's
    instructions, computed in every kernel that reads the result).
    """
    dtype = np.dtype(dtype)
    if y.dtype == dtype:
        return y
    if y.dtype == np.float32 and dtype == jnp.bfloat16 and _by_bits(y):
        return _bfloat16_by_bits(y, exact, widened)
    return y.astype(dtype)


def keep_or_zero(keep: jax.Array, x: jax.Array) -> jax.Array:
    """``where(keep, x, 0)``; on bfloat16 (see :func:`_by_bits`), a select of the bits,
    which XLA fuses into the kernels that read the result instead of widening to float32
    and converting back (see :func:`narrow`)."""
    if x.dtype == jnp.bfloat16 and _by_bits(x):
        return _keep_bits(keep, x)
    return jnp.where(keep, x, jnp.zeros_like(x))


def scale_leaf(x: jax.Array, p: jax.Array, q: jax.Array) -> jax.Array:
    """``x * p * q`` computed in float32 (float64) and cast back to ``x``'s dtype.

    Written ``q * (p * x)`` (the same values: a product does not depend on the order of
    its operands). XLA (CPU) shares one broadcast of a scalar among the leaves of one
    shape; fused as ``(x * p) * q``, the kernel of one leaf per shape took its operands in
    another order than the others, so it could not share their compiled code (at 99
    leaves, 48 distinct kernels against 34).
    """
    x = own_read(x)
    if jnp.iscomplexobj(x):
        wide = x.astype(np.complex128 if p.dtype == np.float64 else np.complex64)
        return (wide * p.astype(wide.dtype) * q.astype(wide.dtype)).astype(x.dtype)
    wide = np.float64 if np.float64 in (x.dtype, p.dtype) else np.float32
    # lax, not jnp: a jnp operation is a jit of its own, whose tracing cost is paid per leaf.
    to = lambda v: as_dtype(v, wide)
    # p and q are never NaN (clip_factors' are not), so every NaN of the product is x's,
    # widened, or an invalid operation's (inf * 0): see narrow's ``widened``.
    return narrow(lax.mul(to(q), lax.mul(to(p), to(x))), x.dtype, widened=True)


@functools.cache
def constant(value: float, dtype: np.dtype) -> np.ndarray:
    """``value`` as a constant of ``dtype``, one object per pair: a trace binds a constant
    once per object, so code run for every leaf binds it once, not once per leaf."""
    return np.array(value, dtype)


def as_dtype(x: jax.Array, dtype: Any) -> jax.Array:
    """``x.astype(dtype)`` with ``lax``: no operation where the dtype is already right, and
    no ``jnp`` call, which is a jit of its own, traced again for every leaf."""
    return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


# ---------------------------------------------------------------------------
# Public norms
# ---------------------------------------------------------------------------


def global_pair(
    tree: Any, ord: float = 2, *, axis_name: AxisName = None, partition_specs: Any = None
) -> Norm:
    """The global norm of ``tree`` as a pair (internal entry point for the clippers)."""
    raw = jax.tree.leaves(tree)

    def compute() -> Norm:
        reducer = Reducer.build(tree, axis_name, partition_specs)
        leaves = [jnp.asarray(x) for x in raw]
        dtype = accum_dtype(leaves)
        if not leaves:
            return Norm(jnp.ones((), dtype), jnp.zeros((), dtype))
        return _by_ord(ord, lambda o: _global_pair(leaves, o, reducer, dtype))

    return shared("global", raw, (ord, axis_name, partition_specs), compute)


def offer_global_pair(
    leaves: Sequence[Any],
    value: Norm,
    *,
    axis_name: AxisName = None,
    partition_specs: Any = None,
    beyond_scope: bool = True,
) -> None:
    """Offers ``value`` as :func:`global_pair` (ord 2) of ``leaves``, under the key it uses:
    to the transformations after this one (:func:`offer_output`, for an exact value), or,
    with ``beyond_scope=False``, only within the enclosing sharing scope (:func:`offer`)."""
    offer_to = offer_output if beyond_scope else offer
    offer_to("global", leaves, (2, axis_name, partition_specs), value)


def global_norm(
    tree: Any, ord: Any = 2, *, axis_name: AxisName = None, partition_specs: Any = None
) -> jax.Array:
    r"""The norm of all leaves of ``tree`` taken together, never overflowing or underflowing.

    .. math::
        \|g\|_2 = \Big(\sum_i \sum_j |g_{ij}|^2\Big)^{1/2},\quad
        \|g\|_1 = \sum_i \sum_j |g_{ij}|,\quad \|g\|_\infty = \max_{i,j} |g_{ij}|

    Accumulates in float32 (float64 when a leaf is float64); complex entries count by
    :math:`|z|^2`; ``None``, ``optax.MaskedNode``, empty trees and 0-size leaves count as 0.
    The ordinary path is one fused pass per leaf; only a sum that overflowed or fell below
    ``n * tiny / eps`` runs a second, rescaled pass (``lax.while_loop``), so float32 entries of
    ``1e30`` or ``1e-30`` give the right norm. A NaN entry gives NaN, an infinite one inf.
    A norm beyond the result dtype's range is reported as inf (the clippers still clip such
    updates correctly). ``jax.grad`` through it is finite at zero (the subgradient 0).

    Args:
      tree: a pytree of arrays.
      ord: 2 (default), 1 or inf (``"inf"`` and ``jnp.inf`` also work).
      axis_name: inside ``shard_map``/``pmap``, the mesh axis name (or tuple of names) that
        every leaf is sharded over; partial sums are added over it, one collective per norm.
      partition_specs: instead of ``axis_name``, a pytree of ``PartitionSpec`` matching
        ``tree`` (or a prefix of it), as passed to ``shard_map``: each leaf's partial sum is
        reduced over exactly the mesh axes its spec names (replicated leaves are not
        double-counted).

    Returns:
      A scalar: float32, or float64 when a leaf is float64.

    Raises:
      ValueError: for an ``ord`` other than 1, 2 or inf, or both ``axis_name`` and
        ``partition_specs``.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> oc.global_norm({"a": jnp.array([3.0]), "b": jnp.array([4.0])})
      Array(5., dtype=float32)
      >>> oc.global_norm([jnp.array([3e30, 4e30])])  # no overflow
      Array(5.e+30, dtype=float32)
      >>> oc.global_norm({"a": jnp.array([3.0, -4.0])}, ord=1)
      Array(7., dtype=float32)
    """
    ord = canonical_ord(ord)
    return global_pair(tree, ord, axis_name=axis_name, partition_specs=partition_specs).value


def leaf_norms(
    tree: Any, ord: Any = 2, *, axis_name: AxisName = None, partition_specs: Any = None
) -> Any:
    r"""The norm of each leaf of ``tree``, with the same robust numerics as :func:`global_norm`.

    .. math::
        \|g_i\| \text{ for every leaf } g_i

    Args:
      tree: a pytree of arrays.
      ord: 2 (default), 1 or inf.
      axis_name: inside ``shard_map``/``pmap``, the mesh axes every leaf is sharded over:
        each norm is then the whole (logical) tensor's, not the shard's.
      partition_specs: instead, a pytree of ``PartitionSpec`` (or a prefix) per leaf.

    Returns:
      A pytree of the same structure with a float32 (float64) scalar per leaf.

    Example:
      >>> import jax.numpy as jnp, optaxclip as oc
      >>> oc.leaf_norms({"a": jnp.array([3.0, 4.0]), "b": jnp.array([1e-30, 0.0])})
      {'a': Array(5., dtype=float32), 'b': Array(1.e-30, dtype=float32)}
    """
    ord = canonical_ord(ord)
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [jnp.asarray(x) for x in leaves]
    mesh = leaf_meshes(leaves, tree, axis_name, partition_specs)
    norms = unit_pairs(leaves, ord, [None] * len(leaves), mesh=mesh)
    dtype = accum_dtype(leaves)
    values = [n.value.reshape(()).astype(dtype) for n in norms]
    return jax.tree.unflatten(treedef, values)


def as_f32(x: Any) -> jax.Array:
    """``x`` as a float32 array (the dtype of every statistic in a state)."""
    return jnp.asarray(x).astype(np.float32)


def resolve(value: Any, count: jax.Array, dtype: np.dtype) -> jax.Array:
    """A threshold argument (number, array or schedule of the step count) as a ``dtype`` scalar."""
    if callable(value):
        value = value(count)
    return jnp.asarray(value).astype(dtype)
