"""Runs in a subprocess with 8 simulated CPU devices (see test_distributed.py).

Prints one JSON object: for each check, the sharded result and the unsharded reference.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import optaxclip as oc

jax.config.update("jax_numpy_dtype_promotion", "strict")
assert jax.device_count() == 8, jax.devices()


def tree(scale: float = 1.0):
    rng = np.random.default_rng(0)
    a = lambda *s: jnp.asarray(rng.standard_normal(s) * scale, jnp.float32)
    return {
        "sharded": a(16, 3),
        "rows": a(8, 5),
        "cols": a(4, 8),
        "replicated": a(5),
        "bias": a(2, 2),
    }


SPECS_2D = {
    "sharded": P(("x", "y")),
    "rows": P("x"),
    "cols": P(None, "y"),
    "replicated": P(),
    "bias": P(),
}


def count_collectives(fn, *args) -> int:
    text = str(jax.make_jaxpr(fn)(*args))
    # psum/pmax outside the rescue branch: cut the text at the first cond.
    head = text.split("cond[")[0]
    return head.count("psum") + head.count("pmax")


MESH = jax.make_mesh((4, 2), ("x", "y"))


def place(t, specs):
    """Puts each leaf on the mesh with its spec, as a sharded training state would be."""
    return jax.tree.map(lambda x, s: jax.device_put(x, jax.NamedSharding(MESH, s)), t, specs)


def shard_map(fn, **kwargs):
    """``jax.shard_map`` (``jax.experimental.shard_map`` before JAX 0.7), unchecked."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, check_vma=False, **kwargs)
    from jax.experimental.shard_map import shard_map as legacy

    return legacy(fn, check_rep=False, **kwargs)


def shard_map_2d(fn, specs, out_specs=None):
    out_specs = P() if out_specs is None else out_specs
    mapped = shard_map(fn, mesh=MESH, in_specs=(specs,), out_specs=out_specs)
    return lambda t: mapped(place(t, specs))


def main() -> None:
    out: dict[str, object] = {}
    for scale in (1.0, 1e30, 1e-30):
        t = tree(scale)
        ref = float(oc.global_norm(t))
        f = shard_map_2d(lambda u: oc.global_norm(u, partition_specs=SPECS_2D), SPECS_2D)
        out[f"partition_specs_norm_{scale:g}"] = [float(jax.jit(f)(t)), ref]
        all_x = {k: P(("x", "y")) for k in t if t[k].shape[0] % 8 == 0}
        sub = {k: t[k] for k in all_x}
        g = shard_map_2d(lambda u: oc.global_norm(u, axis_name=("x", "y")), all_x)
        out[f"axis_name_norm_{scale:g}"] = [float(jax.jit(g)(sub)), float(oc.global_norm(sub))]

    t = tree(1.0)
    f = shard_map_2d(lambda u: oc.global_norm(u, partition_specs=SPECS_2D), SPECS_2D)
    # Distinct axis sets among the specs: (x, y), (x,), (y,) -> 3 collectives (replicated: 0)
    # on the ordinary pass, and 3 more in the rescue loop (run on overflow/underflow only).
    out["collectives_partition_specs"] = [count_collectives(f, t), 2 * 3]
    all_x = {k: P(("x", "y")) for k in t if t[k].shape[0] % 8 == 0}
    sub = {k: t[k] for k in all_x}
    g = shard_map_2d(lambda u: oc.global_norm(u, axis_name=("x", "y")), all_x)
    out["collectives_axis_name"] = [count_collectives(g, sub), 2 * 1]

    # clip_by_global_norm inside shard_map: every shard clips by the whole model's norm.
    tx = oc.clip_by_global_norm(1.0, partition_specs=SPECS_2D)

    def clip(u):
        return tx.update(u, tx.init(u))[0]

    sharded = jax.jit(shard_map_2d(clip, SPECS_2D, out_specs=SPECS_2D))(t)
    ref_tx = oc.clip_by_global_norm(1.0)
    reference = ref_tx.update(t, ref_tx.init(t))[0]
    out["clip_max_abs_diff"] = [
        max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(reference))
        ),
        0.0,
    ]

    # leaf_norms: each leaf's logical norm, whatever its layout.
    f = shard_map_2d(lambda u: oc.leaf_norms(u, partition_specs=SPECS_2D), SPECS_2D, out_specs=P())
    sharded, reference = jax.jit(f)(t), oc.leaf_norms(t)
    out["leaf_norms_max_rel_diff"] = [
        max(float(abs(sharded[k] - reference[k]) / reference[k]) for k in t),
        0.0,
    ]

    # pmap with axis_name.
    x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 6)), jnp.float32)
    pm = jax.pmap(lambda v: oc.global_norm({"v": v}, axis_name="i"), axis_name="i")(x)
    out["pmap_norm"] = [float(pm[0]), float(oc.global_norm({"v": x}))]
    out["pmap_same_on_every_device"] = [float(jnp.max(pm) - jnp.min(pm)), 0.0]

    # skip_nonfinite: a NaN on one shard makes every shard skip.
    skip = oc.skip_nonfinite(axis_name="i")
    bad = x.at[3, 2].set(jnp.nan)
    skipped = jax.pmap(lambda v: skip.update({"v": v}, skip.init({"v": v}))[0]["v"], axis_name="i")(
        bad
    )
    out["skip_all_shards_zero"] = [float(jnp.max(jnp.abs(skipped))), 0.0]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
