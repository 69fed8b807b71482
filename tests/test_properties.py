"""Property tests (hypothesis) of the fixed clippers' invariants over random small pytrees.

Trees have 1-4 leaves (0-d included), float32, bfloat16, float16 or mixed leaves, entries whose
magnitudes span 1e-30..1e30 (float16: its whole finite range) with exact zeros, and thresholds
of 0, straddling a norm, or log-uniform around it. Everything is checked against the float64
numpy oracle (``oracle.py``), which rescales by the largest entry and cannot overflow either.

Compiling dominates the cost: one jitted function runs every clipper at once (thresholds are
traced arguments), and trees come from a few fixed templates, so each (template, dtypes) pair
compiles once per session. Eager runs, which retrace on every call (~0.3 s), are kept to the
jit == eager test and the eager at-its-own-norm test, with few examples.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from helpers import rtol
from hypothesis import example, given, settings
from hypothesis import strategies as st

import optaxclip as oc

# ---------------------------------------------------------------------------
# The clippers under test, and what each one bounds
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    """A clipper and the invariant it keeps: ``norm(unit, ord) <= threshold * weight(unit)``."""

    make: Callable  # (threshold, eps) -> GradientTransformation
    unit: str  # "tree", "leaf", "agc" (AGC's unit slices) or "element"
    ord: float
    stats_key: str
    stats_ord: float = 2  # the norm reported as ClipStats.norm
    weight: str = "one"  # "one", "rms" (sqrt of the unit's size) or "agc" (max(param norm, eps))


METHODS: dict[str, Method] = {
    "global_norm_ord2": Method(
        lambda t, e: oc.clip_by_global_norm(t), "tree", 2, "clip_by_global_norm"
    ),
    "global_norm_ord1": Method(
        lambda t, e: oc.clip_by_global_norm(t, ord=1), "tree", 1, "clip_by_global_norm", 1
    ),
    "global_norm_ordinf": Method(
        lambda t, e: oc.clip_by_global_norm(t, ord="inf"),
        "tree",
        math.inf,
        "clip_by_global_norm",
        math.inf,
    ),
    "leaf_norm": Method(lambda t, e: oc.clip_by_leaf_norm(t), "leaf", 2, "clip_by_leaf_norm"),
    "block_rms": Method(
        lambda t, e: oc.clip_by_block_rms(t), "leaf", 2, "clip_by_block_rms", weight="rms"
    ),
    "adaptive_grad_clip": Method(
        lambda t, e: oc.adaptive_grad_clip(t, eps=e), "agc", 2, "adaptive_grad_clip", weight="agc"
    ),
    "value": Method(lambda t, e: oc.clip_by_value(t), "element", math.inf, "clip_by_value"),
}
NAMES = list(METHODS)
NORM_NAMES = [n for n in NAMES if n != "value"]
PER_UNIT_NAMES = [n for n in NAMES if METHODS[n].unit != "tree"]
DEFAULT_EPS = 1e-3


def _apply(name, updates, threshold, params, eps):
    """One update of ``name`` from a fresh state: the output and ``oc.stats`` of the state."""
    tx = METHODS[name].make(threshold, eps)
    out, state = tx.update(updates, tx.init(updates), params)
    return out, oc.stats(state)


ORDS = (2, 1, math.inf)


@jax.jit
def _apply_all(updates, thresholds, params, eps):
    """Every clipper on the same tree, and the tree's global norms (one program per structure)."""
    results = {name: _apply(name, updates, thresholds[name], params, eps) for name in NAMES}
    return results, [oc.global_norm(updates, ord) for ord in ORDS]


def _thresholds(name, threshold):
    return {n: jnp.float32(1.0) for n in NAMES} | {name: jnp.float32(threshold)}


def run_jit(name, updates, threshold, params, eps=DEFAULT_EPS):
    """``_apply`` under jit; every clipper shares one compiled program per tree structure."""
    return _apply_all(updates, _thresholds(name, threshold), params, jnp.float32(eps))[0][name]


def global_norm_jit(updates, params, ord):
    """``oc.global_norm(updates, ord)`` under jit (from the same cached program)."""
    thresholds = _thresholds(NAMES[0], 1.0)
    return _apply_all(updates, thresholds, params, jnp.float32(DEFAULT_EPS))[1][ORDS.index(ord)]


def run_eager(name, updates, threshold, params, eps=DEFAULT_EPS):
    return _apply(name, updates, jnp.float32(threshold), params, jnp.float32(eps))


# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

# Leaf shapes of a tree (AGC units: (3, 2) has 2 columns of 3, (2, 1, 3) 3 slices of 2,
# (1, 4) is one unit). Three templates keep compilation (~2 s per structure) affordable.
TEMPLATES = (
    ((),),
    ((3, 2), (4,)),
    ((2, 3), (1, 4), (), (2, 1, 3)),
)
SMALL_TEMPLATES = TEMPLATES[:2]  # for eager runs, whose cost grows with the number of leaves
# Leaf i of a tree gets dtypes[i % len(dtypes)].
DTYPE_MODES = {
    "float32": (jnp.float32,),
    "bfloat16": (jnp.bfloat16,),
    "float16": (jnp.float16,),
    "mixed": (jnp.float32, jnp.bfloat16, jnp.float16),
}
# log10 of the magnitudes drawn: 1e-30..1e30, and float16's finite range (subnormals included).
LOG10_RANGE = {
    np.dtype(jnp.float32): (-30.0, 30.0),
    np.dtype(jnp.bfloat16): (-30.0, 30.0),
    np.dtype(jnp.float16): (-7.2, 4.8),
}
# Absolute error of one output entry beyond its relative rounding: float32 (and bfloat16,
# computed in float32) results below float32's tiny may be flushed to zero on CPU; float16
# results round to its subnormal grid.
ATOL = {
    np.dtype(jnp.float32): float(jnp.finfo(jnp.float32).tiny),
    np.dtype(jnp.bfloat16): float(jnp.finfo(jnp.float32).tiny),
    np.dtype(jnp.float16): float(jnp.finfo(jnp.float16).smallest_subnormal),
}


@st.composite
def leaves(draw, shape, dtype):
    """An array of ``shape``: signed powers of ten around a random centre, some exact zeros."""
    lo, hi = LOG10_RANGE[np.dtype(dtype)]
    size = math.prod(shape)
    centre = draw(st.floats(lo, hi))
    spread = draw(st.sampled_from([0.0, 1.0, hi - lo]))
    offsets = draw(st.lists(st.floats(-1.0, 1.0), min_size=size, max_size=size))
    signs = draw(st.lists(st.integers(-3, 3), min_size=size, max_size=size))  # 0: exact zero
    exponents = np.clip(centre + spread * np.asarray(offsets, np.float64), lo, hi)
    values = np.sign(np.asarray(signs, np.float64)) * 10.0**exponents
    return jnp.asarray(values.reshape(shape).astype(np.float32)).astype(dtype)


@st.composite
def trees(draw, templates=TEMPLATES):
    """``(updates, params)``: two dicts of the same shapes and dtypes (params for AGC)."""
    shapes = draw(st.sampled_from(templates))
    # Mixed dtypes only in the largest template: each (template, dtypes) pair compiles once.
    modes = [m for m in sorted(DTYPE_MODES) if m != "mixed" or shapes == TEMPLATES[-1]]
    dtypes = DTYPE_MODES[draw(st.sampled_from(modes))]
    kinds = [dtypes[i % len(dtypes)] for i in range(len(shapes))]
    updates = {f"leaf{i}": draw(leaves(s, d)) for i, (s, d) in enumerate(zip(shapes, kinds))}
    params = {f"leaf{i}": draw(leaves(s, d)) for i, (s, d) in enumerate(zip(shapes, kinds))}
    return updates, params


# Thresholds are drawn as a multiple of a unit's norm: 0, just below / at / just above it,
# or log-uniform within three decades of it.
FACTORS = st.one_of(
    st.just(0.0),
    st.sampled_from([1.0 - 2.0**-20, 1.0, 1.0 + 2.0**-20]),
    st.floats(-3.0, 3.0).map(lambda e: 10.0**e),
)
# At least a margin above the norm, far beyond float32 accumulation error (<= 17 entries).
ABOVE = st.floats(0.0, 3.0).map(lambda e: (1.0 + 1e-4) * 10.0**e)
EPS = st.sampled_from([DEFAULT_EPS, 0.0])
UNIT_INDEX = st.integers(0, 63)  # which unit's norm the threshold straddles (modulo count)

SETTINGS = settings(max_examples=30, deadline=None)  # deadline: the first example compiles
EAGER_SETTINGS = settings(max_examples=5, deadline=None)  # eager calls retrace: ~0.3 s each

# ---------------------------------------------------------------------------
# The float64 oracle
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Unit:
    """One clipping unit of a tree: which entries, in float64, with per-entry tolerances."""

    where: str  # for messages: "leaf1", "leaf0[entries [0 3]]" or "tree"
    values: np.ndarray
    rtol: np.ndarray
    atol: np.ndarray


def _agc_columns(shape) -> list[np.ndarray]:
    """Flat indices of each AGC unit: the whole leaf, or (rank 2, 3) each slice along axis 0."""
    idx = np.arange(math.prod(shape)).reshape(shape)
    if sum(d != 1 for d in shape) <= 1:
        return [idx.ravel()]
    return list(idx.reshape(shape[0], -1).T)


def units(unit: str, tree) -> list[Unit]:
    """The units ``unit`` splits ``tree`` into (the whole tree is one unit for "tree")."""
    out = []
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        flat = oracle.as_f64(leaf).ravel()
        if unit in ("tree", "leaf"):
            groups = [np.arange(flat.size)]
        elif unit == "agc":
            groups = _agc_columns(leaf.shape)
        else:  # element
            groups = [np.array([j]) for j in range(flat.size)]
        tol, atol = rtol(leaf.dtype), ATOL[np.dtype(leaf.dtype)]
        for g in groups:
            where = f"leaf{i}" if g.size == flat.size else f"leaf{i}[entries {g}]"
            out.append(Unit(where, flat[g], np.full(g.size, tol), np.full(g.size, atol)))
    if unit == "tree":
        cat = lambda field: np.concatenate([getattr(u, field) for u in out])
        return [Unit("tree", cat("values"), cat("rtol"), cat("atol"))]
    return out


def weights(name: str, updates, params, eps: float) -> list[float]:
    """Per unit, the factor of the threshold that bounds it (the unit's limit is threshold * it)."""
    method = METHODS[name]
    if method.weight == "rms":
        return [math.sqrt(u.values.size) for u in units(method.unit, updates)]
    if method.weight == "agc":
        return [max(oracle.leaf_norm(u.values, 2), eps) for u in units("agc", params)]
    return [1.0] * len(units(method.unit, updates))


def ratios(name: str, updates, params, eps: float) -> list[float]:
    """Per unit, norm / weight: the smallest threshold that leaves the unit unclipped."""
    method = METHODS[name]
    out = []
    for u, w in zip(units(method.unit, updates), weights(name, updates, params, eps)):
        n = oracle.leaf_norm(u.values, method.ord)
        out.append(n / w if w > 0 else (0.0 if n == 0 else math.inf))
    return out


def as_threshold(x: float) -> float:
    """A float32 threshold (the clippers resolve thresholds in float32): 0 or normal, finite.

    XLA on CPU flushes float32 subnormals to zero, so a threshold below float32's tiny (AGC
    ratios reach 1e-38) would act as 0; such thresholds are raised to tiny.
    """
    info = jnp.finfo(jnp.float32)
    return float(np.float32(min(max(x, float(info.tiny)), float(info.max)) if x > 0 else 0.0))


def straddling_threshold(name, updates, params, eps, factor, pick) -> float:
    finite = [r for r in ratios(name, updates, params, eps) if math.isfinite(r)] or [0.0]
    return as_threshold(finite[pick % len(finite)] * factor)


def ulp_distance(a, b) -> np.ndarray:
    """How many representable values of their (shared) float dtype lie between a and b."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    bits = {2: np.int16, 4: np.int32}[a.dtype.itemsize]

    def ordered(x):
        i = x.view(bits).astype(np.int64)
        return np.where(i < 0, np.iinfo(bits).min - i, i)  # sign-magnitude to monotone

    both_nan = np.isnan(a.astype(np.float64)) & np.isnan(b.astype(np.float64))
    return np.where(both_nan, 0, np.abs(ordered(a) - ordered(b)))


# ---------------------------------------------------------------------------
# Output norm <= threshold
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(case=trees(), factor=FACTORS, pick=UNIT_INDEX, eps=EPS)
def test_output_norm_within_threshold_for_random_trees(name, case, factor, pick, eps):
    updates, params = case
    method = METHODS[name]
    threshold = straddling_threshold(name, updates, params, eps, factor, pick)
    out, _ = run_jit(name, updates, threshold, params, eps)
    limits = [threshold * w for w in weights(name, updates, params, eps)]
    for u, limit in zip(units(method.unit, out), limits):
        got = oracle.leaf_norm(u.values, method.ord)
        if name == "value":  # the bound is rounded down in the leaf dtype: never exceeded
            assert got <= threshold, (u.where, got, threshold)
        else:
            bound = limit * (1 + u.rtol.max()) + u.atol.sum()
            assert got <= bound, (u.where, got, limit)


# ---------------------------------------------------------------------------
# Direction kept
# ---------------------------------------------------------------------------


def _assert_nonnegative_multiple(out: Unit, inp: Unit) -> None:
    """``out == c * inp`` for one ``0 <= c <= 1``, each entry up to rounding in its leaf dtype.

    Each nonzero input entry ``x_j`` confines ``c`` to ``(y_j +- tol_j) / x_j``; the output is a
    scaled copy iff these intervals (and ``[0, 1]``) intersect. Zeros must stay exact zeros.
    """
    x, y = inp.values, out.values
    np.testing.assert_array_equal(y[x == 0], 0.0)
    nz = x != 0
    if not nz.any():
        return
    tol = out.rtol[nz] * np.abs(y[nz]) + 2 * out.atol[nz]
    centre, half = y[nz] / x[nz], tol / np.abs(x[nz])  # ratios: no overflow in float64
    lo = max(float(np.max(centre - half)), 0.0)
    hi = min(float(np.min(centre + half)), 1.0 + float(out.rtol.max()))
    assert lo <= hi, (x, y, centre, half)


def _assert_same_direction(out: Unit, inp: Unit) -> None:
    """``out`` is ``c * inp`` for one ``0 <= c <= 1`` up to rounding, measured in norm.

    ``c`` is the least-squares factor; the residual ``out - c * inp`` must be within the
    leaf dtypes' rounding of ``out``'s norm (entries far below that norm may be lost).
    """
    x, y = inp.values, out.values
    m = float(np.max(np.abs(x), initial=0.0))
    if m == 0.0:
        np.testing.assert_array_equal(y, 0.0)
        return
    xs, ys = x / m, y / m  # rescaled, so nothing overflows
    c = float(np.dot(xs, ys) / np.dot(xs, xs))
    assert 0.0 <= c <= 1.0 + float(out.rtol.max()), c
    residual = float(np.linalg.norm(ys - c * xs))
    bound = float(out.rtol.max()) * float(np.linalg.norm(ys)) + 2 * float(out.atol.sum()) / m
    assert residual <= bound, (c, x, y, residual, bound)


@pytest.mark.parametrize("name", NORM_NAMES)
@SETTINGS
@given(case=trees(), factor=FACTORS, pick=UNIT_INDEX, eps=EPS)
def test_clipped_unit_keeps_direction_in_norm(name, case, factor, pick, eps):
    updates, params = case
    method = METHODS[name]
    threshold = straddling_threshold(name, updates, params, eps, factor, pick)
    out, _ = run_jit(name, updates, threshold, params, eps)
    for u_out, u_in in zip(units(method.unit, out), units(method.unit, updates)):
        _assert_same_direction(u_out, u_in)


# Entries of 1e30 beside 1e-30: the scale is split only where it is itself subnormal, so the
# small entry keeps its exact scaled value (5e-31, a normal float32).
@pytest.mark.parametrize("name", NORM_NAMES)
@SETTINGS
@given(case=trees(), factor=FACTORS, pick=UNIT_INDEX, eps=EPS)
@example(
    case=({"leaf0": jnp.array([1e30, 1e-30], jnp.float32)}, {"leaf0": jnp.zeros(2, jnp.float32)}),
    factor=0.5,
    pick=0,
    eps=DEFAULT_EPS,
)
def test_clipped_unit_is_entrywise_nonnegative_multiple_of_input(name, case, factor, pick, eps):
    updates, params = case
    method = METHODS[name]
    threshold = straddling_threshold(name, updates, params, eps, factor, pick)
    out, _ = run_jit(name, updates, threshold, params, eps)
    for u_out, u_in in zip(units(method.unit, out), units(method.unit, updates)):
        _assert_nonnegative_multiple(u_out, u_in)


# ---------------------------------------------------------------------------
# Identity at or below the threshold
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(case=trees(), above=ABOVE)
def test_update_unchanged_when_norm_below_threshold(name, case, above):
    updates, params = case
    threshold = as_threshold(max(ratios(name, updates, params, DEFAULT_EPS)) * above)
    out, s = run_jit(name, updates, threshold, params)
    chex.assert_trees_all_equal(out, updates)
    assert int(s[f"{METHODS[name].stats_key}/num_clipped"]) == 0


@pytest.mark.parametrize("name", PER_UNIT_NAMES)
@SETTINGS
@given(case=trees(), factor=FACTORS, pick=UNIT_INDEX, eps=EPS)
def test_unit_below_threshold_unchanged_when_others_clipped(name, case, factor, pick, eps):
    updates, params = case
    method = METHODS[name]
    threshold = straddling_threshold(name, updates, params, eps, factor, pick)
    out, _ = run_jit(name, updates, threshold, params, eps)
    r = ratios(name, updates, params, eps)
    for u_out, u_in, ratio in zip(units(method.unit, out), units(method.unit, updates), r):
        if ratio * (1 + 1e-4) <= threshold:
            np.testing.assert_array_equal(u_out.values, u_in.values, err_msg=u_in.where)


ORD_IDS = {2: "ord2", 1: "ord1", math.inf: "ordinf"}
AT_OWN_NORM = ({"leaf0": jnp.array([3e-30, 3e-30], jnp.float32)},) * 2


@pytest.mark.parametrize("ord", ORDS, ids=ORD_IDS.get)
@SETTINGS
@given(case=trees())
@example(case=AT_OWN_NORM)
def test_global_norm_clip_under_jit_unchanged_at_its_own_norm(ord, case):
    updates, params = case
    threshold = global_norm_jit(updates, params, ord)
    out, s = run_jit(f"global_norm_{ORD_IDS[ord]}", updates, threshold, params)
    chex.assert_trees_all_equal(out, updates)
    assert int(s["clip_by_global_norm/num_clipped"]) == 0


# Eagerly too, a rescaled norm (entries below ~1e-19 or above ~1e19) at the threshold is kept.
@EAGER_SETTINGS
@given(case=trees())
@example(case=AT_OWN_NORM)
def test_global_norm_clip_eager_unchanged_at_its_own_norm(case):
    updates, _ = case
    tx = oc.clip_by_global_norm(oc.global_norm(updates))
    out, state = tx.update(updates, tx.init(updates))
    chex.assert_trees_all_equal(out, updates)
    assert int(oc.stats(state)["clip_by_global_norm/num_clipped"]) == 0


# ---------------------------------------------------------------------------
# jit == eager
# ---------------------------------------------------------------------------


# jit and eager may round differently: XLA reorders the sum of squares and turns the division
# into a multiplication by a reciprocal, so the float32 scale can differ by a rounding or two
# and a float32 output by up to 3 ulps (optax.clip_by_global_norm differs by 2 ulps on N(0, 1)
# inputs). A bfloat16 or float16 output rounds that float32 value once: at most 1 of its ulps.
MAX_ULPS = {np.dtype(jnp.float32): 4, np.dtype(jnp.bfloat16): 1, np.dtype(jnp.float16): 1}


# Stats that record a clip-or-not decision; at a threshold within rounding of a unit's norm the
# two roundings of that norm may decide differently (the outputs then differ by a scale of 1
# against 1 - 2**-24: within the ulps above).
DECISIONS = ("clipped", "num_clipped")


def _near_a_unit_norm(name, updates, params, eps, threshold) -> bool:
    return any(
        abs(r - threshold) <= 1e-5 * max(r, threshold)
        for r in ratios(name, updates, params, eps)
        if math.isfinite(r) and max(r, threshold) > 0
    )


@pytest.mark.parametrize("name", NAMES)
@EAGER_SETTINGS
@given(case=trees(SMALL_TEMPLATES), factor=FACTORS, pick=UNIT_INDEX, eps=EPS)
def test_jit_matches_eager_to_rounding(name, case, factor, pick, eps):
    updates, params = case
    threshold = straddling_threshold(name, updates, params, eps, factor, pick)
    out_jit, stats_jit = run_jit(name, updates, threshold, params, eps)
    out_eager, stats_eager = run_eager(name, updates, threshold, params, eps)
    for leaf in updates:  # a flat dict
        a, b = out_jit[leaf], out_eager[leaf]
        assert np.max(ulp_distance(a, b), initial=0) <= MAX_ULPS[a.dtype], (leaf, a, b)
    near = _near_a_unit_norm(name, updates, params, eps, threshold)
    for key in stats_jit:
        if near and key.split("/")[1] in DECISIONS:
            continue
        a, b = np.asarray(stats_jit[key]), np.asarray(stats_eager[key])
        if a.dtype == np.int32:
            assert a == b, (key, a, b)
        else:
            assert ulp_distance(a, b) <= MAX_ULPS[a.dtype], (key, a, b)


# ---------------------------------------------------------------------------
# Reported norm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(case=trees(), factor=FACTORS, pick=UNIT_INDEX, eps=EPS)
def test_stats_norm_matches_float64_oracle(name, case, factor, pick, eps):
    updates, params = case
    method = METHODS[name]
    threshold = straddling_threshold(name, updates, params, eps, factor, pick)
    _, s = run_jit(name, updates, threshold, params, eps)
    expected = oracle.global_norm(updates, method.stats_ord)
    np.testing.assert_allclose(float(s[f"{method.stats_key}/norm"]), expected, rtol=1e-5, atol=0)
