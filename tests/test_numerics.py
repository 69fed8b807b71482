"""The norm core: float64 oracles, hostile inputs, gradients, and the one-pass ordinary path."""

from __future__ import annotations

import contextlib
import math

import hlo
import jax
import jax.numpy as jnp
import numpy as np
import optax
import oracle
import pytest
from helpers import DTYPES, TREES, enable_x64, make_tree
from jax.test_util import check_grads

import optaxclip as oc
from optaxclip import _numerics as num

ORDS = [1, 2, math.inf]


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("tree_kind", TREES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_global_norm_matches_float64_oracle(dtype, tree_kind, ord, maybe_jit):
    tree = make_tree(tree_kind, dtype, scale=3.0)
    got = maybe_jit(lambda t: oc.global_norm(t, ord))(tree)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, oracle.global_norm(tree, ord), rtol=2e-6)


@pytest.mark.parametrize("ord", [2, "inf", jnp.inf, float("inf"), 1.0])
def test_global_norm_accepts_ord_spellings(ord):
    tree = {"a": jnp.array([3.0, -4.0])}
    expected = {2: 5.0, 1.0: 7.0}.get(ord, 4.0)
    assert float(oc.global_norm(tree, ord)) == expected


@pytest.mark.parametrize("ord", [3, 0, -1, "fro", None, True])
def test_global_norm_rejects_other_ords(ord):
    with pytest.raises(ValueError, match=r"`ord` must be 1, 2 or inf .* got"):
        oc.global_norm({"a": jnp.ones(2)}, ord)


@pytest.mark.parametrize(
    "tree",
    [{}, [], None, (None, optax.MaskedNode()), {"a": jnp.zeros((0, 3))}],
    ids=["dict", "list", "None", "masked", "zero_size"],
)
def test_global_norm_of_empty_trees_is_zero(tree, maybe_jit):
    assert float(maybe_jit(oc.global_norm)(tree)) == 0.0


# ---------------------------------------------------------------------------
# Hostile inputs: the answers optax gets wrong
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1e30, 3e20, 1e-30, 1e-20, 3e38])
@pytest.mark.parametrize("ord", ORDS)
def test_global_norm_float32_extremes_match_oracle(value, ord, maybe_jit):
    tree = {"a": jnp.array([value, -value / 2], jnp.float32), "b": jnp.full((5,), value / 3)}
    expected = oracle.global_norm(tree, ord)
    got = maybe_jit(lambda t: oc.global_norm(t, ord))(tree)
    if expected > float(jnp.finfo(jnp.float32).max):  # the value itself is out of range
        assert got == jnp.inf
    else:
        np.testing.assert_allclose(got, expected, rtol=2e-6)


def test_global_norm_partial_underflow_is_accurate(maybe_jit):
    # 10^5 entries of 1e-20 whose squares flush to zero next to one entry of 1e-18.
    tree = {"big": jnp.array([1e-18], jnp.float32), "small": jnp.full((100_000,), 1e-20)}
    got = maybe_jit(oc.global_norm)(tree)
    np.testing.assert_allclose(got, oracle.global_norm(tree), rtol=1e-6)


def test_global_norm_float16_ones_does_not_overflow(maybe_jit):
    tree = [jnp.ones((10**6,), jnp.float16)]
    np.testing.assert_allclose(maybe_jit(oc.global_norm)(tree), 1000.0, rtol=1e-6)


def test_global_norm_float16_entry_whose_square_overflows_float16(maybe_jit):
    assert float(maybe_jit(oc.global_norm)([jnp.array([300.0], jnp.float16)])) == 300.0


def test_global_norm_bfloat16_many_scalar_leaves_does_not_saturate(maybe_jit):
    tree = [jnp.ones((), jnp.bfloat16) for _ in range(1000)]
    np.testing.assert_allclose(maybe_jit(oc.global_norm)(tree), math.sqrt(1000), rtol=1e-6)


@pytest.mark.parametrize(
    ("bad", "expected"), [(jnp.nan, math.nan), (jnp.inf, math.inf), (-jnp.inf, math.inf)]
)
@pytest.mark.parametrize("ord", ORDS)
def test_global_norm_propagates_nan_and_inf(bad, expected, ord, maybe_jit):
    tree = {"a": jnp.array([1.0, bad]), "b": jnp.array([1e30])}
    got = float(maybe_jit(lambda t: oc.global_norm(t, ord))(tree))
    assert (math.isnan(got) and math.isnan(expected)) or got == expected


@pytest.mark.parametrize("ord", ORDS)
def test_global_norm_complex_counts_modulus(ord, maybe_jit):
    tree = {"z": jnp.array([3 + 4j, 0 - 12j], jnp.complex64), "r": jnp.array([5.0])}
    np.testing.assert_allclose(
        maybe_jit(lambda t: oc.global_norm(t, ord))(tree), oracle.global_norm(tree, ord), rtol=1e-6
    )


@pytest.fixture
def x64():
    with enable_x64():
        yield


@pytest.mark.parametrize("value", [1.0, 1e200, 1e-200, 1e300])
@pytest.mark.parametrize("ord", ORDS)
def test_global_norm_float64_is_float64_and_exact(x64, value, ord, maybe_jit):
    rng = np.random.default_rng(0)
    tree = {"a": jnp.asarray(rng.standard_normal((7, 3)) * value), "b": jnp.asarray([value])}
    got = maybe_jit(lambda t: oc.global_norm(t, ord))(tree)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, oracle.global_norm(tree, ord), rtol=1e-13)


def test_global_norm_mixed_float64_and_float32_accumulates_in_float64(x64):
    tree = {"a": jnp.array([1e200], jnp.float64), "b": jnp.array([1.0], jnp.float32)}
    got = oc.global_norm(tree)
    assert got.dtype == jnp.float64 and float(got) == 1e200


# ---------------------------------------------------------------------------
# leaf_norms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("tree_kind", ["nested_dict", "tuple_none", "zero_size", "mixed", "conv"])
def test_leaf_norms_match_oracle_and_keep_structure(tree_kind, ord, maybe_jit):
    tree = make_tree(tree_kind, jnp.float32, scale=2.0)
    got = maybe_jit(lambda t: oc.leaf_norms(t, ord))(tree)
    assert jax.tree.structure(got) == jax.tree.structure(tree)
    for norm, leaf in zip(jax.tree.leaves(got), jax.tree.leaves(tree)):
        assert norm.shape == () and norm.dtype == jnp.float32
        np.testing.assert_allclose(norm, oracle.leaf_norm(leaf, ord), rtol=2e-6)


@pytest.mark.parametrize("value", [1e30, 1e-30, 0.0])
def test_leaf_norms_extremes_match_oracle(value, maybe_jit):
    tree = {"a": jnp.full((3,), value, jnp.float32), "b": jnp.array([1.0, 2.0])}
    got = maybe_jit(oc.leaf_norms)(tree)
    np.testing.assert_allclose(got["a"], oracle.leaf_norm(tree["a"]), rtol=2e-6)
    np.testing.assert_allclose(got["b"], math.sqrt(5), rtol=1e-6)


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ord", [1, 2])
@pytest.mark.parametrize("value", [1.0, 1e30, 1e-30])
def test_grad_of_global_norm_is_the_unit_direction(ord, value):
    x = jnp.array([3.0, -4.0], jnp.float32) * value
    g = jax.grad(lambda x: oc.global_norm([x], ord))(x)
    expected = np.array([0.6, -0.8]) if ord == 2 else np.array([1.0, -1.0])
    np.testing.assert_allclose(g, expected, rtol=1e-6)


@pytest.mark.parametrize("ord", ORDS)
def test_grad_of_norms_is_finite_at_zero(ord):
    zeros = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    for fn in (
        lambda t: oc.global_norm(t, ord),
        lambda t: sum(jax.tree.leaves(oc.leaf_norms(t, ord))),
    ):
        g = jax.grad(fn)(zeros)
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g))


def test_grad_of_global_norm_matches_finite_differences():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal(6), jnp.float32)
    check_grads(lambda x: oc.global_norm([x]), (x,), order=1, modes=["fwd", "rev"], atol=1e-2)


# ---------------------------------------------------------------------------
# Structure of the computation: one fused pass on the ordinary path
# ---------------------------------------------------------------------------


def _top_level_eqns(jaxpr) -> list:
    """Equations of ``jaxpr``, descending into pjit/custom_jvp calls but not into the
    rescue (a while loop or cond, which ordinary inputs do not enter)."""
    eqns = []
    for eqn in jaxpr.eqns:
        eqns.append(eqn)
        if eqn.primitive.name in ("cond", "switch", "while"):
            continue
        for param in eqn.params.values():
            sub = getattr(param, "jaxpr", None)
            if sub is not None and hasattr(sub, "eqns"):
                eqns.extend(_top_level_eqns(sub))
            elif hasattr(param, "eqns"):
                eqns.extend(_top_level_eqns(param))
    return eqns


def _top_level_primitives(jaxpr) -> list[str]:
    return [eqn.primitive.name for eqn in _top_level_eqns(jaxpr)]


def _big_and_small_tree():
    """Three leaves above SMALL_LEAF entries, and five small ones of two dtypes."""
    big = [jnp.ones((96, 96)), jnp.ones((8192,)), jnp.ones((2, 64, 64), jnp.bfloat16)]
    small = [
        jnp.ones((3,)),
        jnp.ones((8, 8)),
        jnp.ones(()),
        jnp.ones((5,), jnp.bfloat16),
        jnp.ones((7,)),
    ]
    return {"big": big, "small": small}


def _reductions(names):
    return [n for n in names if n.startswith("reduce_")]


@pytest.mark.parametrize("ord", [1, 2])
def test_ordinary_path_is_one_reduction_per_leaf_small_leaves_batched(ord):
    # Each large leaf is reduced once; small leaves are concatenated per dtype and reduced
    # once per dtype. The rescaled pass is in a while loop that ordinary inputs skip.
    names = _top_level_primitives(
        jax.make_jaxpr(lambda t: oc.global_norm(t, ord))(_big_and_small_tree()).jaxpr
    )
    # ... plus one reduction over the stacked per-chunk partial sums
    assert len(_reductions(names)) == 3 + 2 + 1
    assert names.count("while") == 1 and "cond" not in names


def test_clip_by_global_norm_ordinary_path_is_one_reduction_per_leaf():
    tree = _big_and_small_tree()
    tx = oc.clip_by_global_norm(1.0)
    names = _top_level_primitives(
        jax.make_jaxpr(lambda t, s: tx.update(t, s))(tree, tx.init(tree)).jaxpr
    )
    assert len(_reductions(names)) == 3 + 2 + 1  # and one over the stacked partials


def test_many_small_leaves_compile_to_few_reductions():
    tree = [jnp.ones((16,)) for _ in range(200)]
    names = _top_level_primitives(jax.make_jaxpr(oc.global_norm)(tree).jaxpr)
    assert len(_reductions(names)) == 1


def test_small_leaves_are_concatenated_in_groups_and_the_norm_stays_exact(monkeypatch):
    # At most _CONCAT_GROUP leaves to a concatenation (LLVM compiles one concatenate in time
    # superlinear in its operands): 11 leaves in groups of 4 are three reductions, whose
    # partials are summed like any others.
    monkeypatch.setattr(num, "_CONCAT_GROUP", 4)
    rng = np.random.default_rng(5)
    tree = [jnp.asarray(rng.standard_normal((k % 3 + 2, 5)), jnp.float32) for k in range(11)]
    eqns = _top_level_eqns(jax.make_jaxpr(oc.global_norm)(tree).jaxpr)
    assert len(_reductions([e.primitive.name for e in eqns])) == 3 + 1  # groups, partials
    leaf_concats = [  # not the stacks of per-chunk scalars, whose operands are (1,)
        e for e in eqns if e.primitive.name == "concatenate" and e.invars[0].aval.size > 1
    ]
    assert sorted(len(e.invars) for e in leaf_concats) == [3, 4, 4]
    np.testing.assert_allclose(oc.global_norm(tree), oracle.global_norm(tree), rtol=1e-6)
    tx = oc.clip_by_global_norm(1.0)
    out, _ = tx.update(tree, tx.init(tree))
    scale = 1.0 / oracle.global_norm(tree)
    for got, x in zip(out, tree):
        np.testing.assert_allclose(got, np.asarray(x, np.float64) * scale, rtol=2e-6)


def test_unit_rows_are_stacked_in_groups_and_per_leaf_results_stay_exact(monkeypatch):
    # The unit norms stack small leaves of one width at most _CONCAT_GROUP to a matrix (the
    # fusion that pads and stacks 1,250 leaves took over 11 minutes to compile): 11 leaves,
    # 4 of width 8 and 7 of width 16, in groups of 4, each get their own norm and clip.
    monkeypatch.setattr(num, "_CONCAT_GROUP", 4)
    rng = np.random.default_rng(6)
    tree = [jnp.asarray(rng.standard_normal((k % 3 + 2, 4)), jnp.float32) for k in range(11)]
    units = num._FlatUnits(tree, [tuple(range(x.ndim)) for x in tree])
    assert [len(idx) for _, idx in units.groups] == [4, 4, 3]
    norms = oc.leaf_norms(tree)
    for got, x in zip(norms, tree):
        np.testing.assert_allclose(got, oracle.leaf_norm(x), rtol=2e-6)
    tx = oc.clip_by_leaf_norm(1.0)
    out, _ = tx.update(tree, tx.init(tree))
    for got, x in zip(out, tree):
        expected = np.asarray(x, np.float64) * min(1.0, 1.0 / oracle.leaf_norm(x))
        np.testing.assert_allclose(got, expected, rtol=2e-6)


def test_medium_leaves_below_small_leaf_are_stacked_and_the_norm_stays_exact():
    # Leaves of 4,096 entries (a (32, 128) kernel) are stacked: one reduction in the
    # ordinary pass, where reducing each on its own cost a kernel each to compile. Leaves
    # of SMALL_LEAF entries keep their own reduction.
    rng = np.random.default_rng(11)
    medium = [jnp.asarray(rng.standard_normal((32, 128)), jnp.float32) for _ in range(6)]
    big = [jnp.asarray(rng.standard_normal(num.SMALL_LEAF), jnp.float32) for _ in range(2)]
    names = _top_level_primitives(jax.make_jaxpr(oc.global_norm)(medium + big).jaxpr)
    assert len(_reductions(names)) == 1 + 2 + 1  # stacked, two big, the partials
    np.testing.assert_allclose(
        oc.global_norm(medium + big), oracle.global_norm(medium + big), rtol=1e-6
    )


def test_separate_copies_keep_values_and_dtypes_and_are_not_merged():
    values = [jnp.float32(2.0), jnp.float32(2.0), jnp.bfloat16(0.5), jnp.float32(-3.0)]

    def fn(anchor):
        return num.separate(values, anchor)

    out = jax.jit(fn)(jnp.float32(0.0))
    assert [x.dtype for x in out] == [x.dtype for x in values]
    assert [float(x) for x in out] == [float(x) for x in values]
    # Batched (per-example norms): one copy per value, each still a vector.
    batched = jax.vmap(lambda a: num.separate([a, a], a * 0))(jnp.arange(3.0))
    np.testing.assert_array_equal(batched[0], batched[1])


@pytest.mark.parametrize("scale", [1e18, 1e19, 3e19, 1e20])
def test_rescaled_and_ordinary_paths_agree_at_their_border(scale):
    # Sums of squares just below and just above float32's overflow give the same accuracy.
    tree = jax.tree.map(lambda x: x * scale, make_tree("nested_dict", jnp.float32))
    np.testing.assert_allclose(oc.global_norm(tree), oracle.global_norm(tree), rtol=2e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, "float64"])
def test_zero_pair_is_the_global_pair_of_zeros(dtype):
    # A guard offers it as the norm of the zeros it returns on a skipped step, in place of
    # the pair the clipper after it would compute: the two must be the same pair.
    with enable_x64() if dtype == "float64" else contextlib.nullcontext():
        tree = {"a": jnp.zeros((3, 5), dtype), "b": jnp.zeros((9000,), dtype)}
        got = num.global_pair(tree, 2)
        expected = num.zero_pair(got.m.dtype)
        assert got.m.dtype == expected.m.dtype
        assert float(got.m) == float(expected.m) and float(got.r) == float(expected.r) == 0.0


def _float32_patterns() -> np.ndarray:
    """Every bfloat16 (all 2**16 top halves) with the low halves that decide its rounding
    (zero, the smallest, just below the tie, the tie, just above it, the largest), and a
    million random float32 bit patterns."""
    top = np.arange(1 << 16, dtype=np.uint32) << 16
    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    rng = np.random.default_rng(0)
    random = rng.integers(0, 1 << 32, 1_000_000, dtype=np.uint32)
    return np.concatenate([(top[:, None] | low).ravel(), random]).view(np.float32)


def test_narrow_to_bfloat16_rounds_to_nearest_even_like_the_conversion():
    y = _float32_patterns()
    got = np.asarray(jax.jit(lambda v: num.narrow(v, jnp.bfloat16))(y))
    with np.errstate(invalid="ignore"):  # signalling NaNs among the patterns
        expected = y.astype(jnp.bfloat16)  # ml_dtypes' numpy cast: an independent rounding
        nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    # bit for bit (infinities, signed zeros, subnormals, ties) off the NaNs
    np.testing.assert_array_equal(got[~nan].view(np.uint16), expected[~nan].view(np.uint16))
    assert got.dtype == jnp.bfloat16


def test_narrow_exact_drops_the_low_bits_of_bfloat16_values():
    values = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)
    quiet_nans = np.array([0x7FC00001, 0xFFC0FFFF, 0x7FFFFFFF], np.uint32).view(np.float32)
    y = np.concatenate([values, quiet_nans])
    got = np.asarray(jax.jit(lambda v: num.narrow(v, jnp.bfloat16, exact=True))(y))
    with np.errstate(invalid="ignore"):  # signalling NaNs among the patterns
        nan = np.isnan(y)
        np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint16), (y[~nan].view(np.uint32) >> 16))


@pytest.mark.parametrize("factor", [1.0, 0.3, 7.5, 2.0**-140, 0.0, np.inf])
def test_narrow_widened_rounds_products_of_bfloat16_values_like_the_conversion(factor):
    # widened=True leaves out the select that maps NaNs to one NaN: every NaN of a product
    # of widened bfloat16 values by a factor that is not NaN (a widened payload, or inf * 0)
    # has low bits 0, which the rounding keeps a NaN. Every bfloat16, NaN payloads included.
    x = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)
    y = np.asarray(jax.jit(lambda v, f: v * f)(x, np.float32(factor)))
    got = np.asarray(jax.jit(lambda v: num.narrow(v, jnp.bfloat16, widened=True))(y))
    with np.errstate(invalid="ignore"):  # signalling NaNs among the patterns
        expected = y.astype(jnp.bfloat16)
        nan = np.isnan(expected)
    assert nan.sum() >= 2 * (2**7 - 1)  # the NaN patterns of bfloat16, at least
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint16), expected[~nan].view(np.uint16))


@pytest.mark.parametrize("copies", [1, num.SMALL_LEAF], ids=["small", "large"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_keep_or_zero_keeps_bits_and_writes_positive_zeros(dtype, copies):
    # A large bfloat16 leaf takes the select of bits (on CPU), a small one jnp.where.
    x = jnp.tile(jnp.array([1.5, -0.0, jnp.nan, -jnp.inf, 3e-39, -2.0], dtype), copies)
    keep = jnp.tile(jnp.array([True, True, True, True, True, False]), copies)
    got = np.asarray(jax.jit(num.keep_or_zero)(keep, x)).reshape(copies, 6)
    bits = lambda a: np.asarray(a).view(f"u{a.dtype.itemsize}")
    np.testing.assert_array_equal(bits(got[:, :5]), bits(np.asarray(x).reshape(copies, 6)[:, :5]))
    assert (got[:, 5] == 0).all() and not np.signbit(got[:, 5].astype(np.float32)).any()
    assert got.dtype == dtype


def _scalar_patterns(dtype):
    """Scalars whose bits a pass-through must keep: signed zeros, a subnormal (which an
    addition would flush on CPU), infinities, NaNs with payloads, ordinary values."""
    dtype = np.dtype(dtype)
    u = f"u{dtype.itemsize}"
    largest = float(jnp.finfo(dtype).max)
    values = np.array([0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, largest], dtype)
    smallest_subnormal = np.array(1, u).view(dtype)
    top = 1 << (8 * dtype.itemsize - 1)  # the sign bit
    exponent = int(np.array(np.inf, dtype).view(u))
    nans = np.array([exponent | 1, exponent | 5, top | exponent | 3], u).view(dtype)
    return np.concatenate([values, [smallest_subnormal, -smallest_subnormal], nans])


def _nan_and_sign(a):
    """Which entries of float array ``a`` are NaN and which have the sign bit, read from the
    bits (a cast would signal on the signalling NaNs)."""
    u = np.dtype(f"u{a.dtype.itemsize}")
    bits = a.view(u).astype(np.uint64)
    top = np.uint64(1 << (8 * a.dtype.itemsize - 1))
    inf = np.uint64(np.array(np.inf, a.dtype).view(u))
    return (bits & ~top) > inf, (bits & top) != 0


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_one_kernel_keeps_every_scalar_bit_for_bit(dtype):
    context = enable_x64() if dtype == "float64" else contextlib.nullcontext()
    with context:
        dtype = jnp.dtype(dtype)
        patterns = _scalar_patterns(dtype)
        ints = np.array([0, -1, 7, np.iinfo(np.int32).min], np.int32)
        bools = np.array([True, False])
        fn = jax.jit(lambda f, i, b: num.one_kernel({"f": list(f), "i": tuple(i), "b": [*b]}))
        out = fn(jnp.asarray(patterns), jnp.asarray(ints), jnp.asarray(bools))
        got = np.array([np.asarray(v) for v in out["f"]], dtype)
        u = f"u{dtype.itemsize}"
        nan, sign = _nan_and_sign(patterns)
        # XLA computes bfloat16 selects in float32: a NaN stays a NaN of its sign, its
        # payload may change. Every other value, and every other dtype, bit for bit.
        exact = ~nan if dtype == jnp.bfloat16 else np.ones_like(nan)
        np.testing.assert_array_equal(got.view(u)[exact], patterns.view(u)[exact])
        np.testing.assert_array_equal(_nan_and_sign(got)[0], nan)
        np.testing.assert_array_equal(_nan_and_sign(got)[1], sign)
        assert [int(v) for v in out["i"]] == ints.tolist()
        assert [bool(v) for v in out["b"]] == bools.tolist()
        assert all(v.dtype == dtype for v in out["f"]) and out["i"][0].dtype == np.int32


def test_one_kernel_is_one_kernel():
    # Eight scalar chains (a root and a division each) that several outputs read: as
    # separate kernels, one each; through one_kernel, one fused reduction in all.
    def chains(s):
        return [jnp.sqrt(s + i) / (s * i + 1) for i in range(8)]

    def kernels(fn):
        text = jax.jit(fn).lower(jnp.float32(2.0)).compile().as_text()
        entry = text[text.index("\nENTRY") :].split("\n}\n")[0]
        return entry.count(" fusion(")

    assert kernels(lambda s: num.one_kernel(chains(s))) == 1
    assert kernels(chains) > 1  # the reference: XLA splits them without one_kernel
    np.testing.assert_array_equal(
        jax.jit(lambda s: num.one_kernel(chains(s)))(jnp.float32(2.0)),
        jax.jit(chains)(jnp.float32(2.0)),
    )


def test_one_kernel_differentiates_and_batches_as_the_identity():
    f = lambda s: num.one_kernel((s * s, s > 0, (s * 3).astype(jnp.int32)))
    assert jax.grad(lambda s: f(s)[0])(3.0) == 6.0
    _, tangent = jax.jvp(lambda s: f(s)[0], (2.0,), (1.0,))
    assert tangent == 4.0
    batched = jax.vmap(f)(jnp.array([-1.0, 0.5, 2.0]))
    np.testing.assert_array_equal(batched[0], [1.0, 0.25, 4.0])
    np.testing.assert_array_equal(batched[1], [False, True, True])
    np.testing.assert_array_equal(batched[2], [-3, 1, 6])
    # Arrays (not scalars) and complex values are returned as they are.
    x = jnp.arange(3.0)
    assert num.one_kernel((x,))[0] is x
    z = jnp.complex64(1 + 2j)
    assert num.one_kernel((z,))[0] is z


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_materialize_keeps_vectors_and_predicates_bit_for_bit(dtype):
    patterns = jnp.asarray(_scalar_patterns(dtype))
    flags = jnp.asarray(np.arange(patterns.size) % 3 == 0)

    def fn(v, b):
        return num.materialize(v, v[::-1], b)

    a, r, b = jax.jit(fn)(patterns, flags)
    u = f"u{np.dtype(dtype).itemsize}"
    finite = ~_nan_and_sign(np.asarray(patterns))[0]
    keep = finite if dtype == "bfloat16" else np.ones_like(finite)
    np.testing.assert_array_equal(np.asarray(a).view(u)[keep], np.asarray(patterns).view(u)[keep])
    np.testing.assert_array_equal(_nan_and_sign(np.asarray(r))[0], ~finite[::-1])
    np.testing.assert_array_equal(b, flags)
    assert jax.grad(lambda s: num.materialize(s * 2)[0])(1.0) == 2.0


def test_clip_by_global_norm_computes_its_scalars_in_two_kernels():
    # Everything between the partial sums and the scaling is a few scalar operations. As
    # kernels of their own, each cost about 5 ms of compile time: clip_by_global_norm's
    # step had 9 (the rescue decision, the root, the factors, each statistic). With
    # one_kernel: one before the rescue loop, one for the statistics.
    tree = {"w": jnp.ones((64, 32)), "b": jnp.ones((32,)), "e": jnp.ones((128, 80))}
    tx = oc.clip_by_global_norm(1.0)
    text = hlo.update_hlo(tx, tree)
    assert len(hlo.scalar_kernels(text)) <= 2, hlo.scalar_kernels(text)


def test_clip_by_global_norm_leaves_the_kernels_of_same_shaped_leaves_identical():
    # Fused into Adam, the scaling reads two scalars. XLA shares one broadcast of each among
    # the leaves of one shape; written (x * p) * q, the kernel of one such leaf took its
    # operands in another order than the others and was compiled separately (at 99
    # leaves, 48 distinct kernels against 34). Each leaf shape here is in three layers.
    tree = {f"layer{i}": {"w": jnp.ones((16, 24)), "b": jnp.ones((24,))} for i in range(3)}

    def kernels(tx):
        # optax.adam raises a float to an int32 power: not strict-promotion clean.
        with jax.numpy_dtype_promotion("standard"):
            text = hlo.update_hlo(tx, tree, tree)
        return [hlo.distinct_kernels(text, s) for s in ("f32[16,24]", "f32[24]")]

    adam = kernels(optax.adam(1e-3))
    assert min(adam) > 0
    assert kernels(optax.chain(oc.clip_by_global_norm(1.0), optax.adam(1e-3))) == adam


@pytest.mark.parametrize(
    "x",
    [
        np.array([[1.0, np.nan, -np.inf], [np.inf, 2.0, np.nan]], np.float32),
        np.array([np.nan, 1.0, np.inf, -np.inf], jnp.bfloat16),
        np.array([1 + 1j, complex(np.nan, 0), complex(0, np.inf)], np.complex64),
        np.arange(6, dtype=np.int32).reshape(2, 3),
        np.zeros((0, 3), np.float32),
        np.float32(np.inf),
    ],
    ids=["float32", "bfloat16", "complex64", "int32", "empty", "scalar"],
)
def test_nonfinite_count_counts_nan_and_infinite_entries(x, maybe_jit):
    got = maybe_jit(num.nonfinite_count)(jnp.asarray(x))
    expected = int(np.sum(~np.isfinite(np.asarray(x).astype(np.complex128))))
    assert got.dtype == jnp.int32
    assert int(got) == expected


def test_fused_reduce_reduces_each_operand_with_its_own_op():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5)), jnp.float32)
    largest, total = num.fused_reduce((jnp.abs(x), x), (0, 0), (jax.lax.max, jax.lax.add))
    np.testing.assert_allclose(largest, np.max(np.abs(np.asarray(x, np.float64))), rtol=1e-7)
    np.testing.assert_allclose(total, np.sum(np.asarray(x, np.float64)), rtol=1e-5, atol=1e-6)
    # statistics only: no derivative flows through, and differentiating does not fail
    grad = jax.grad(lambda x: sum(num.fused_reduce((x, x * x), (0, 0), (jax.lax.add,) * 2)))(x)
    np.testing.assert_array_equal(grad, np.zeros(x.shape, np.float32))
    with pytest.raises(ValueError, match="two or more operands"):
        num.fused_reduce((x,), (0,), (jax.lax.add,))


def test_nonfinite_count_writes_no_mask_to_memory():
    # A one-operand reduction of a compare writes the compare's mask to memory on CPU.
    x = jnp.zeros((512, 256), jnp.float32)
    compiled = jax.jit(num.nonfinite_count).lower(x).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    assert analysis.temp_size_in_bytes < 0.05 * x.nbytes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.complex64])
@pytest.mark.parametrize("bad", [None, np.inf, -np.inf, np.nan])
def test_all_finite_matches_isfinite(dtype, bad, maybe_jit):
    x = np.linspace(-3e4, 6e4, 9000).reshape(90, 100)
    if bad is not None:
        x[89, 99] = bad
    x = jnp.asarray(x, dtype)  # float16: 6e4 stays finite, 65520 and above would not
    expect = bool(np.all(np.isfinite(np.asarray(x.astype(jnp.complex64)))))
    assert bool(maybe_jit(num.all_finite)(x)) is expect
    assert bool(maybe_jit(num.all_finite)(jnp.arange(5))) is True
