"""Every method, sharded five ways, against the unsharded run (8 simulated CPU devices).

Run as ``python dist_methods_worker.py MODE [MODE ...]`` (see test_distributed_methods.py);
prints one JSON object ``{"<method>/<mode>": {...}}`` with, per pair, the largest relative
difference of the updates and of the statistics over a stream of steps (with a spike and a
NaN confined to one device's shard), whether every shard reported the same statistics, and
whether the outputs kept their input sharding.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip as oc

jax.config.update("jax_numpy_dtype_promotion", "strict")
assert jax.device_count() == 8, jax.devices()

AXES = ("x", "y")
ALL = ("x", "y")  # axis_name for leaves sharded over every device along their first dimension

# A tree mixing row-, column- and fully-sharded leaves with replicated ones.
SPECS = {
    "kernel": P("x", "y"),
    "rows": P("x"),
    "cols": P(None, "y"),
    "flat": P(ALL),
    "bias": P(),
    "scale": P(),
}
SHAPES = {
    "kernel": (16, 6),
    "rows": (8, 5),
    "cols": (4, 8),
    "flat": (16,),
    "bias": (5,),
    "scale": (2, 2),
}
# Every leaf sharded along its first dimension over all 8 devices (axis_name and pmap).
SHAPES_ALL = {"kernel": (16, 6), "rows": (8, 5), "flat": (16,), "deep": (8, 2, 3)}

STEPS = 6
SPIKE, NAN = 3, 4


def stream(shapes, *, nan: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for t in range(STEPS):
        scale = 30.0 if t == SPIKE else 1.0 + 0.2 * t
        g = {
            k: jnp.asarray(rng.standard_normal(s) * scale * (1 + i), jnp.float32)
            for i, (k, s) in enumerate(shapes.items())
        }
        if nan and t == NAN:  # one entry, on one device's shard
            g["kernel"] = g["kernel"].at[13, 5].set(jnp.nan)
        out.append(g)
    return out


def params_of(shapes):
    rng = np.random.default_rng(99)
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


# name -> (factory taking the sharding kwargs, needs params, stream has a NaN step)
METHODS = {
    "clip_by_value": (lambda **kw: oc.clip_by_value(0.5, **kw), False, True),
    "clip_by_global_norm": (lambda **kw: oc.clip_by_global_norm(3.0, **kw), False, True),
    "clip_by_leaf_norm": (lambda **kw: oc.clip_by_leaf_norm(2.0, **kw), False, True),
    "clip_by_block_rms": (lambda **kw: oc.clip_by_block_rms(0.8, **kw), False, True),
    "adaptive_grad_clip": (lambda **kw: oc.adaptive_grad_clip(0.3, **kw), True, True),
    "autoclip": (lambda **kw: oc.autoclip(10.0, **kw), False, True),
    "autoclip_window": (lambda **kw: oc.autoclip(10.0, window=4, **kw), False, True),
    "zclip": (lambda **kw: oc.zclip(warmup_steps=2, max_norm=None, **kw), False, True),
    "quantile_clip": (lambda **kw: oc.quantile_clip(2.0, **kw), False, True),
    "adagc": (lambda **kw: oc.adagc(3.0, warmup_steps=2, **kw), False, True),
    "spike_aware_clip": (
        lambda **kw: oc.spike_aware_clip(4.0, b2=0.9, warmup_steps=2, **kw),
        False,
        True,
    ),
    "skip_nonfinite": (lambda **kw: oc.skip_nonfinite(**kw), False, True),
    "zero_nonfinite": (lambda **kw: oc.zero_nonfinite(**kw), False, True),
    "error_if_nonfinite": (lambda **kw: oc.error_if_nonfinite(**kw), False, False),
    "skip_spikes": (lambda **kw: oc.skip_spikes(window=4, warmup_steps=3, **kw), False, True),
    "clip_by_group_norm": (
        lambda **kw: oc.clip_by_group_norm(
            lambda path: "a" if path in ("kernel", "rows", "deep") else "b",
            {"a": 3.0, "b": 1.0},
            **kw,
        ),
        False,
        True,
    ),
    "monitor": (lambda **kw: oc.monitor(per_leaf=True, **kw), False, True),
}


def shard_map(fn, **kwargs):
    return jax.shard_map(fn, check_vma=False, **kwargs)


def mesh_of(axis_type=AxisType.Auto):
    return jax.make_mesh((4, 2), AXES, axis_types=(axis_type,) * 2)


def place(tree, specs, mesh):
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)


def state_specs(state, update_specs):
    """Scalars (and AdaGC's per-leaf vector) replicated; P-sized state sharded like the updates."""
    specs = jax.tree.map(lambda _: P(), state)
    if isinstance(state, oc.SpikeAwareClipState):
        specs = specs._replace(nu=update_specs)
    return specs


def device_rows(stats) -> tuple[dict, bool]:
    """Statistics gathered with one row per device, and whether every device agrees."""
    rows = {k: np.asarray(v) for k, v in stats.items()}
    agree = all(
        np.array_equal(r, np.broadcast_to(r[:1], r.shape), equal_nan=True) for r in rows.values()
    )
    return rows, agree


def nan_aware_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.array_equal(np.isnan(a), np.isnan(b)):
        return float("inf")
    ok = ~np.isnan(a)
    if not ok.any():
        return 0.0
    if not np.array_equal(np.isinf(a[ok]), np.isinf(b[ok])):
        return float("inf")
    fin = ok & ~np.isinf(a)
    return float(np.max(np.abs(a[fin] - b[fin]) / (1 + np.abs(b[fin])), initial=0.0))


def tree_diff(a, b) -> float:
    return max([nan_aware_diff(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))] + [0])


_REFERENCE: dict = {}


def reference_run(make, shapes, needs_params, nan):
    """The unsharded run (jitted, as the sharded ones are), computed once per tree."""
    key = (make, tuple(shapes.items()))
    if key not in _REFERENCE:
        _REFERENCE[key] = _reference_run(make, shapes, needs_params, nan)
    return _REFERENCE[key]


def _reference_run(make, shapes, needs_params, nan):
    tx = make()
    params = params_of(shapes)
    state = tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p if needs_params else None))
    outs, stats = [], []
    for g in stream(shapes, nan=nan):
        u, state = update(g, state, params)
        outs.append(u)
        stats.append(oc.stats(state))
    return outs, stats


def compare(outs, stats, ref_outs, ref_stats, every_shard=None, kept=None) -> dict:
    last = ref_stats[-1]
    result = {
        "diff": max(tree_diff(a, b) for a, b in zip(outs, ref_outs)),
        "stat_diff": max(nan_aware_diff(s[k], r[k]) for s, r in zip(stats, ref_stats) for k in r),
        "num_clipped": max([int(v) for k, v in last.items() if k.endswith("/num_clipped")] + [0]),
        "num_nonfinite": max(
            [int(v) for k, v in last.items() if k.endswith("/num_nonfinite")] + [0]
        ),
    }
    if every_shard is not None:
        result["same_on_every_shard"] = every_shard
    if kept is not None:
        result["kept_sharding"] = kept
    return result


def run_shard_map(name, how):
    make, needs_params, nan = METHODS[name]
    mesh = mesh_of()
    if how == "partition_specs":
        shapes, specs, kw = SHAPES, SPECS, {"partition_specs": SPECS}
    else:
        shapes = SHAPES_ALL
        specs, kw = {k: P(ALL) for k in shapes}, {"axis_name": ALL}
    tx = make(**kw)
    params = params_of(shapes)
    state = tx.init(params)
    s_specs = state_specs(state, specs)

    def step(g, state, params):
        u, state = tx.update(g, state, params if needs_params else None)
        stats = oc.stats(state)
        stacked = jax.tree.map(lambda v: v[None], stats)  # one row per device
        return u, state, stacked

    stat_spec = jax.tree.map(lambda _: P(ALL), oc.stats(state))
    fn = jax.jit(
        shard_map(
            step,
            mesh=mesh,
            in_specs=(specs, s_specs, specs),
            out_specs=(specs, s_specs, stat_spec),
        )
    )
    params = place(params, specs, mesh)
    state = place(state, s_specs, mesh)
    outs, stats, same = [], [], True
    for g in stream(shapes, nan=nan):
        u, state, stacked = fn(place(g, specs, mesh), state, params)
        rows, agree = device_rows(stacked)
        same &= agree
        outs.append(u)
        stats.append({k: r[0] for k, r in rows.items()})
    ref_outs, ref_stats = reference_run(make, shapes, needs_params, nan)
    return compare(outs, stats, ref_outs, ref_stats, every_shard=bool(same))


def run_pmap(name):
    make, needs_params, nan = METHODS[name]
    shapes = SHAPES_ALL
    tx = make(axis_name="i")
    blocks = lambda t: jax.tree.map(lambda x: x.reshape((8, x.shape[0] // 8, *x.shape[1:])), t)
    whole = lambda t: jax.tree.map(lambda x: x.reshape((-1, *x.shape[2:])), t)
    params = params_of(shapes)
    state = jax.pmap(tx.init)(blocks(params))

    def step(g, state, params):
        u, state = tx.update(g, state, params if needs_params else None)
        return u, state, oc.stats(state)

    fn = jax.pmap(step, axis_name="i")
    outs, stats, same = [], [], True
    for g in stream(shapes, nan=nan):
        u, state, st = fn(blocks(g), state, blocks(params))
        rows, agree = device_rows(st)
        same &= agree
        outs.append(whole(u))
        stats.append({k: r[0] for k, r in rows.items()})
    ref_outs, ref_stats = reference_run(make, shapes, needs_params, nan)
    return compare(outs, stats, ref_outs, ref_stats, every_shard=bool(same))


def run_gspmd(name, axis_type):
    make, needs_params, nan = METHODS[name]
    mesh = mesh_of(axis_type)
    tx = make()
    params = place(params_of(SHAPES), SPECS, mesh)
    state = tx.init(params)  # eager init keeps the parameters' sharding (zeros_like)
    context = jax.set_mesh(mesh)
    with context:
        fn = jax.jit(lambda g, s, p: tx.update(g, s, p if needs_params else None))
        outs, stats, kept = [], [], True
        for g in stream(SHAPES, nan=nan):
            placed = place(g, SPECS, mesh)
            u, state = fn(placed, state, params)
            for x, y in zip(jax.tree.leaves(placed), jax.tree.leaves(u)):
                kept &= y.sharding.is_equivalent_to(x.sharding, x.ndim)
            scalars = state
            if isinstance(state, oc.SpikeAwareClipState):
                for x, y in zip(jax.tree.leaves(placed), jax.tree.leaves(state.nu)):
                    kept &= y.sharding.is_equivalent_to(x.sharding, x.ndim)
                scalars = state._replace(nu=None)
            # statistics, counters, AdaGC's per-leaf vector: replicated on every device
            kept &= all(v.sharding.is_fully_replicated for v in jax.tree.leaves(scalars))
            outs.append(u)
            stats.append(oc.stats(state))
    ref_outs, ref_stats = reference_run(make, SHAPES, needs_params, nan)
    return compare(outs, stats, ref_outs, ref_stats, kept=bool(kept))


# ---------------------------------------------------------------------------
# per_example_clip: batch axis sharded (and, with partition_specs, parameters too)
# ---------------------------------------------------------------------------

BATCH = 16
PE_SHAPES = {"w": (6, 4), "b": (4,), "v": (8,)}
# batch over x; "w" sharded over y on its last dimension (tensor-parallel), "b" replicated
PE_SPECS = {"w": P("x", None, "y"), "b": P("x"), "v": P("x", "y")}


def pe_stream(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for t in range(STEPS):
        scales = np.exp(rng.normal(0, 1.0, BATCH)) * (30.0 if t == SPIKE else 1.0)
        g = {
            k: jnp.asarray(
                rng.standard_normal((BATCH, *s)) * scales.reshape((BATCH,) + (1,) * len(s)),
                jnp.float32,
            )
            for k, s in PE_SHAPES.items()
        }
        if t == NAN:
            g["w"] = g["w"].at[5, 1, 3].set(jnp.nan)
        out.append(g)
    return out


def pe_make(**kw):
    return oc.per_example_clip(2.0, target_quantile=0.5, **kw)


def pe_reference():
    if "per_example" not in _REFERENCE:
        _REFERENCE["per_example"] = _pe_reference()
    return _REFERENCE["per_example"]


def _pe_reference():
    tx = pe_make()
    state = tx.init(None)
    update = jax.jit(tx.update)
    outs, stats = [], []
    for g in pe_stream():
        u, state = update(g, state)
        outs.append(u)
        stats.append(oc.stats(state))
    return outs, stats


def run_per_example(mode):
    ref_outs, ref_stats = pe_reference()
    outs, stats, same, kept = [], [], True, None
    if mode in ("partition_specs", "axis_name"):
        mesh = mesh_of()
        if mode == "partition_specs":
            specs, kw = PE_SPECS, {"partition_specs": PE_SPECS}
        else:
            specs, kw = {k: P(ALL) for k in PE_SHAPES}, {"axis_name": ALL}
        out_specs = jax.tree.map(lambda s: P(*s[1:]), specs, is_leaf=lambda s: isinstance(s, P))
        tx = pe_make(**kw)
        state = tx.init(None)

        def step(g, state):
            u, state = tx.update(g, state)
            return u, state, jax.tree.map(lambda v: v[None], oc.stats(state))

        s_specs = jax.tree.map(lambda _: P(), state)
        st_specs = jax.tree.map(lambda _: P(ALL), oc.stats(state))
        fn = jax.jit(
            shard_map(
                step,
                mesh=mesh,
                in_specs=(specs, s_specs),
                out_specs=(out_specs, s_specs, st_specs),
            )
        )
        for g in pe_stream():
            u, state, st = fn(place(g, specs, mesh), state)
            rows, agree = device_rows(st)
            same &= agree
            outs.append(u)
            stats.append({k: r[0] for k, r in rows.items()})
    elif mode == "pmap":
        tx = pe_make(axis_name="i")
        state = jax.pmap(lambda _: tx.init(None))(jnp.zeros(8))
        fn = jax.pmap(lambda g, s: (lambda u, s: (u, s, oc.stats(s)))(*tx.update(g, s)), "i")
        for g in pe_stream():
            blocks = jax.tree.map(lambda x: x.reshape((8, BATCH // 8, *x.shape[1:])), g)
            u, state, st = fn(blocks, state)
            rows, agree = device_rows(st)
            same &= agree
            outs.append(jax.tree.map(lambda x: x[0], u))
            stats.append({k: r[0] for k, r in rows.items()})
    else:  # GSPMD: batch sharded over x, parameters' dimensions as in PE_SPECS
        mesh = mesh_of(AxisType.Auto if mode == "gspmd_auto" else AxisType.Explicit)
        tx = pe_make()
        state = tx.init(None)
        with jax.set_mesh(mesh):
            fn = jax.jit(tx.update)
            for g in pe_stream():
                u, state = fn(place(g, PE_SPECS, mesh), state)
                outs.append(u)
                stats.append(oc.stats(state))
        same = None
    return compare(outs, stats, ref_outs, ref_stats, every_shard=same, kept=kept)


# ---------------------------------------------------------------------------
# Collectives on the ordinary path of a 100-leaf tree
# ---------------------------------------------------------------------------

COLLECTIVES = {"psum", "pmax", "pmin", "all_gather", "all_to_all", "ppermute", "psum_scatter"}
# 100 leaves over three distinct axis sets, and replicated ones
KINDS = [((8, 3), P("x")), ((4, 6), P(None, "y")), ((16, 2), P(ALL)), ((3,), P())]


def count_collectives(jaxpr, counts: dict[str, int]) -> dict[str, int]:
    """Collective primitives in ``jaxpr``, outside ``cond`` branches (rescue, non-finite).

    Counted in the jaxpr, where each collective the code issues is one equation (XLA's
    all-reduce combiner would merge one-per-leaf collectives in the compiled HLO).
    """
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in COLLECTIVES:
            counts[name] = counts.get(name, 0) + 1
        if name == "cond":
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count_collectives(inner, counts)
    return counts


def collectives(name: str) -> dict:
    make, needs_params, _ = METHODS[name]
    rng = np.random.default_rng(0)
    tree, specs = {}, {}
    for i in range(100):
        shape, spec = KINDS[i % len(KINDS)]
        tree[f"leaf{i:03d}"] = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        specs[f"leaf{i:03d}"] = spec
    tx = make(partition_specs=specs)
    state = tx.init(tree)
    s_specs = state_specs(state, specs)
    fn = shard_map(
        lambda g, s, p: tx.update(g, s, p if needs_params else None),
        mesh=mesh_of(),
        in_specs=(specs, s_specs, specs),
        out_specs=(specs, s_specs),
    )
    counts = count_collectives(jax.make_jaxpr(fn)(tree, state, tree).jaxpr, {})
    if name != "clip_by_global_norm":  # (the others' results: the five-mode runs above)
        return {"counts": counts, "diff": 0.0}
    # The result is right too: the sharded update equals the unsharded one.
    mesh = mesh_of()
    sharded, _ = jax.jit(fn)(place(tree, specs, mesh), place(state, s_specs, mesh), tree)
    reference, _ = jax.jit(lambda g, s: tx_ref.update(g, s, g if needs_params else None))(
        tree, (tx_ref := make()).init(tree)
    )
    return {"counts": counts, "diff": tree_diff(sharded, reference)}


MODES = {
    "partition_specs": lambda name: run_shard_map(name, "partition_specs"),
    "axis_name": lambda name: run_shard_map(name, "axis_name"),
    "pmap": run_pmap,
    "gspmd_auto": lambda name: run_gspmd(name, AxisType.Auto),
    "gspmd_explicit": lambda name: run_gspmd(name, AxisType.Explicit),
}


def main(modes: list[str]) -> None:
    out: dict[str, object] = {}
    if "collectives" in modes:
        modes = [m for m in modes if m != "collectives"]
        for name in METHODS:
            try:
                out[f"{name}/collectives"] = collectives(name)
            except Exception:
                out[f"{name}/collectives"] = {"error": traceback.format_exc()[-3000:]}
    for mode in modes:
        for name in METHODS:
            try:
                out[f"{name}/{mode}"] = MODES[mode](name)
            except Exception:  # reported to the test, which fails with the traceback
                out[f"{name}/{mode}"] = {"error": traceback.format_exc()[-3000:]}
        try:
            out[f"per_example_clip/{mode}"] = run_per_example(mode)
        except Exception:
            out[f"per_example_clip/{mode}"] = {"error": traceback.format_exc()[-3000:]}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    with jax.numpy_dtype_promotion("standard"):
        main(sys.argv[1:] or list(MODES))
