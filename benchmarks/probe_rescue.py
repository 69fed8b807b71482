"""What a rescue decision costs a per-leaf clip, measured without optaxclip.

Run from the repository root::

    python benchmarks/probe_rescue.py            # the 25M-parameter float32 tree, 60 rounds
    python benchmarks/probe_rescue.py --quick    # tiny tree, a smoke run

The per-leaf targets of ``bench_clip.py`` compare ``clip_by_leaf_norm``,
``clip_by_block_rms`` and AGC with optax's per-leaf clips, which scale each leaf by a factor
from its own norm and turn gradients of ``1e20`` into zeros. Ours rescue such norms, and
the decision to rescue reads every leaf's norm. This script times, in plain jnp, the same
per-leaf clip with its factors taken from different places, so that the cost of where the
factors come from can be told apart from the cost of our code:

- ``plain``: ``x * min(1, rsqrt(sum(x * x)))``, each leaf's factor from its own norm
  (optax's computation, no statistics, no rescue). Every ratio is against it.
- ``statistics beside``: the same outputs, plus the smallest factor and the fraction of
  leaves clipped, reduced over all leaves (extra outputs that no leaf's scaling reads).
- ``rescue loop beside``: the same outputs, plus a one-trip ``while_loop`` over the vector
  of all norms, as an extra output.
- ``data barrier``: every factor taken from the vector of all norms, plus
  ``where(any(isinf(norms)), 1, 0)``: a decision that reads every norm, without control flow.
- ``rescue loop``: every factor taken from that vector after a one-trip ``while_loop`` (the
  shape of our design; the loop never runs here).
- ``data barrier per group``: as ``data barrier``, per group of consecutive leaves of
  about ``GROUP_MIB`` MiB.
- ``optaxclip.clip_by_leaf_norm``: ours, for reference.

Each round calls every variant paired with ``plain``, back to back in a random order, after
an untimed call of its own (``bench_clip.time_round_robin``), with glibc's malloc set as in
the timed benchmarks (``bench_clip.steady_allocator``). Each ratio is the median over the
rounds of the paired ratios. Every variant's output is checked against ``plain``'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_clip
from bench_clip import Contender, markdown_table

import optaxclip as oc

PLAIN = "plain"
GROUP_MIB = 4
OURS = "optaxclip.clip_by_leaf_norm"


def _factor(s: jax.Array) -> jax.Array:
    return jnp.minimum(1.0, lax.rsqrt(s))


def _data_barrier(f: jax.Array, bad: jax.Array) -> jax.Array:
    """``f`` plus a term that reads ``bad`` (zero here): a decision without control flow."""
    return f + jnp.where(bad, 1.0, 0.0)


def _one_trip(f: jax.Array, bad: jax.Array) -> jax.Array:
    """``f`` through a ``while_loop`` that halves it once when ``bad`` (never, here)."""
    body = lambda st: (st[0] * 0.5, st[1] & False)
    return lax.while_loop(lambda st: st[1], body, (f, bad))[0]


def _groups(sizes: Sequence[int], group_bytes: int) -> list[list[int]]:
    """Consecutive leaves in groups of at least ``group_bytes`` (the last may be smaller)."""
    groups: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if total >= group_bytes:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def _size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n / 2**10:g} KiB"


def variants(group_bytes: int) -> dict[str, Callable[[list[jax.Array]], Any]]:
    """Each variant: a list of float32 leaves -> (clipped leaves, extra outputs)."""

    def plain(leaves):
        return [x * _factor(jnp.sum(x * x)) for x in leaves], ()

    def sums(leaves):
        return jnp.stack([jnp.sum(x * x) for x in leaves])

    def beside(extra):
        def fn(leaves):
            return plain(leaves)[0], extra(sums(leaves))

        return fn

    def from_vector(decide):
        def fn(leaves):
            s = sums(leaves)
            f = decide(_factor(s), jnp.any(jnp.isinf(s)))
            return [x * f[i] for i, x in enumerate(leaves)], ()

        return fn

    barrier = from_vector(_data_barrier)

    def per_group(leaves):
        out: list[Any] = [None] * len(leaves)
        for idx in _groups([x.nbytes for x in leaves], group_bytes):
            for i, y in zip(idx, barrier([leaves[i] for i in idx])[0]):
                out[i] = y
        return out, ()

    return {
        PLAIN: plain,
        "statistics beside": beside(lambda s: (jnp.min(_factor(s)), jnp.mean(s > 1.0))),
        "rescue loop beside": beside(lambda s: _one_trip(_factor(s), jnp.any(jnp.isinf(s)))),
        "data barrier": barrier,
        "rescue loop": from_vector(_one_trip),
        f"data barrier per {_size(group_bytes)} group": per_group,
    }


def probe(leaves: list[jax.Array], reps: int, warmup: int, group_bytes: int) -> dict[str, Any]:
    """Every variant and ours compiled, checked against ``plain`` and timed in pairs."""
    tx = oc.clip_by_leaf_norm(1.0)
    contenders = [Contender(name, fn, (leaves,)) for name, fn in variants(group_bytes).items()]
    contenders.append(Contender(OURS, tx.update, (leaves, tx.init(leaves))))
    compiled = bench_clip.compile_contenders(contenders)
    outputs = {c.contender.name: c.call()[0] for c in compiled}
    differences = {
        name: bench_clip.max_relative_difference(out, outputs[PLAIN])
        for name, out in outputs.items()
    }
    pairs = {c.contender.name: PLAIN for c in compiled if c.contender.name != PLAIN}
    times = bench_clip.time_round_robin(compiled, reps, warmup, pairs=pairs)
    results = {}
    for c in compiled:
        name = c.contender.name
        record = bench_clip.summarize(times.calls[name])
        record["max_rel_diff_vs_plain"] = differences[name]
        if name in pairs:
            q25, median, q75 = np.percentile(times.per_round(name, PLAIN), [25, 50, 75])
            record["vs_plain"] = {"median": float(median), "q25": float(q25), "q75": float(q75)}
        results[name] = record
    return results


def report(results: dict[str, Any]) -> str:
    rows = []
    for name, r in results.items():
        ratio = r.get("vs_plain")
        if ratio is None:
            paired = "1"
        else:
            paired = f"{ratio['median']:.3f} ({ratio['q25']:.3f}-{ratio['q75']:.3f})"
        rows.append([name, f"{r['median_ms']:.2f}", paired, f"{r['max_rel_diff_vs_plain']:.1e}"])
    headers = ["variant", "median ms", "paired ratio to plain (quartiles)", "max rel diff"]
    return markdown_table(headers, rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny tree, few rounds")
    parser.add_argument("--reps", type=bench_clip._positive_int, default=None, help="rounds")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    machine = bench_clip.timing_machine()
    sizes = bench_clip.QUICK if args.quick else bench_clip.FULL
    reps = args.reps or (5 if args.quick else 60)
    shapes = bench_clip.transformer_shapes(sizes.d_model, sizes.layers, sizes.vocab)
    leaves = jax.tree.leaves(bench_clip.random_tree(shapes, jnp.float32, bench_clip.SEED))
    # The quick tree is 0.1 MiB: its groups are scaled down with it.
    group_bytes = GROUP_MIB * 2**20 if not args.quick else 2**14
    print(bench_clip.report_machine(machine))
    print(f"# {len(leaves)} float32 leaves, {sum(x.size for x in leaves):,} entries\n")
    results = probe(leaves, reps, sizes.warmup, group_bytes)
    print("\n" + report(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "quick": args.quick,
            "reps": reps,
            "group_bytes": group_bytes,
            "machine": machine,
            "variants": results,
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
