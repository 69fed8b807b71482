"""Benchmark the adaptive clippers against ``optaxclip.clip_by_global_norm``.

Run from the repository root::

    python benchmarks/bench_adaptive.py             # full run: a few minutes on 2 CPU cores
    python benchmarks/bench_adaptive.py --quick     # smoke run: a tiny tree, well under a minute
    python benchmarks/bench_adaptive.py --out PATH  # JSON somewhere else
    python benchmarks/bench_adaptive.py --reps 50   # more timed calls per program

The gradient tree is bench_clip.py's ``transformer_f32``: a ~25M-parameter transformer-like
tree (12 layers of d=320, a 32,000-token embedding, 147 float32 leaves; ``--quick`` uses
bench_clip.py's tiny version). Its helpers (tree, compilation, round-robin timing, summary
statistics, memory analysis, machine information, markdown) are imported, not copied.

Two groups of programs are timed, each round-robin within the group (rep 1 of every
program, then rep 2, ...; so drift in the machine's load hits all of them alike), blocking
on every output:

* ``update``: the jitted ``tx.update(grads, state, params)`` of each method:
  ``clip_by_global_norm(1.0)`` (the baseline), ``autoclip(10.0)`` (whole-history sketch),
  ``autoclip(10.0, window=1000)``, ``zclip()``, ``quantile_clip()``, ``adagc()`` (still in
  its 100-step warm-up: global clipping), ``adagc(warmup_steps=10)`` (past it: per-tensor
  thresholds), ``spike_aware_clip()``, and ``optax.clip_by_global_norm(1.0)`` for reference;
* ``chain``: ``optax.chain(method, optax.adam(1e-3))`` for each method, against
  ``chain(clip_by_global_norm(1.0), adam)``, plus ``optax.adam`` alone for reference.

Every state is a real mid-run state: each method first runs ``WARMUP_STEPS`` (30) updates
on gradients scaled by a log-normal factor per step (so the norm history varies), which
ends ZClip's 25-step and SPAM's 20-step warm-ups and ``adagc(warmup_steps=10)``'s; the
phase each state reached is checked. The chains start from their method's warmed state
(Adam's moments start at zero: their values do not change the work). The state and params
are arguments, never closed-over constants, and nothing is donated. Tracing+lowering and
XLA compilation are timed separately, with the persistent compilation cache off (two
compilations at once: see bench_clip.compile_contenders).

Reported per program: median and IQR of the per-call times; the ratio of medians to the
baseline of its group and the paired ratio (the median, with quartiles, of each round's
time over its reference's: timed back to back with it where the program has a target, in
the same round otherwise), printed next to the target (autoclip,
zclip, quantile_clip <= 1.05x; adagc <= 1.1x; spike_aware_clip and the references have
none); compile times; the bytes of the optimizer state against the gradient bytes; XLA's
temp buffer size and the kernels of the compiled entry computation. Tables are printed in
markdown and every figure is written to JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# bench_clip.py's helpers are imported, not copied: make this folder importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_clip import (
    FULL,
    QUICK,
    Compiled,
    Contender,
    Sizes,
    Timings,
    _bytes,
    _ms,
    _positive_int,
    check_out_path,
    compile_contenders,
    inspect_compiled,
    load_average,
    markdown_table,
    max_relative_difference,
    random_tree,
    report_machine,
    summarize,
    time_round_robin,
    timing_machine,
    transformer_shapes,
)

import optaxclip as oc

MAX_NORM = 1.0
LEARNING_RATE = 1e-3
SEED = 0
WARMUP_STEPS = 30  # updates run before timing, so every state is a mid-run one
WARMUP_SCALE_SIGMA = 0.2  # log-normal spread of the gradients' scale during those updates
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_adaptive.json"

BASELINE = "clip_by_global_norm"
OPTAX_CLIP = "optax_clip_by_global_norm"
ADAM = "adam"
GROUPS = ("update", "chain")


@dataclass(frozen=True)
class Method:
    """A clipper to benchmark: a JSON key, a label, its factory and its target ratio."""

    key: str
    label: str
    make: Callable[[], optax.GradientTransformation]
    target: float | None  # max ratio to its reference; None: reported, no target
    phase: str  # what its state looks like after WARMUP_STEPS updates
    ref: str = "clip_by_global_norm"  # the program it is compared with (its group's twin)


METHODS = (
    Method(
        BASELINE,
        "oc.clip_by_global_norm(1.0)",
        lambda: oc.clip_by_global_norm(MAX_NORM),
        None,
        "baseline",
    ),
    Method(
        "autoclip",
        "oc.autoclip(10.0)",
        lambda: oc.autoclip(10.0),
        1.05,
        "whole-history sketch",
    ),
    Method(
        "autoclip_window",
        "oc.autoclip(10.0, window=1000)",
        lambda: oc.autoclip(10.0, window=1000),
        1.05,
        "ring of 1000 norms",
    ),
    Method("zclip", "oc.zclip()", lambda: oc.zclip(), 1.05, "past its 25-step warm-up"),
    Method("quantile_clip", "oc.quantile_clip()", lambda: oc.quantile_clip(), 1.05, "tracking"),
    Method(
        "adagc_warmup",
        "oc.adagc()",
        lambda: oc.adagc(),
        1.1,
        "in its 100-step warm-up (global clipping)",
    ),
    Method(
        "adagc",
        "oc.adagc(warmup_steps=10)",
        lambda: oc.adagc(warmup_steps=10),
        1.1,
        "past its warm-up (per-tensor thresholds)",
    ),
    Method(
        "spike_aware_clip",
        "oc.spike_aware_clip()",
        lambda: oc.spike_aware_clip(),
        None,
        "past its 20-step warm-up",
    ),
    Method(
        "skip_spikes",
        "oc.skip_spikes()",
        lambda: oc.skip_spikes(),
        1.05,
        "spike guard alone (norm ring filling)",
    ),
    Method(
        "skip_spikes_zclip",
        "oc.skip_spikes(oc.zclip())",
        lambda: oc.skip_spikes(oc.zclip()),
        1.05,
        "guard around zclip: one norm shared",
        ref="zclip",
    ),
    Method(
        "chain_skip_spikes_zclip",
        "optax.chain(oc.skip_spikes(), oc.zclip())",
        lambda: optax.chain(oc.skip_spikes(), oc.zclip()),
        1.05,
        "guard, then zclip, as two chained transforms",
        ref="zclip",
    ),
    Method(
        OPTAX_CLIP,
        "optax.clip_by_global_norm(1.0)",
        lambda: optax.clip_by_global_norm(MAX_NORM),
        None,
        "reference",
    ),
)
METHOD_KEYS = tuple(m.key for m in METHODS)
BY_KEY = {m.key: m for m in METHODS}
# Every program with a target and its reference, timed back to back in each round (see
# bench_clip.time_round_robin).
TIMED_PAIRS = {m.key: m.ref for m in METHODS if m.target is not None}


def adam() -> optax.GradientTransformation:
    """The optimizer every chain ends with."""
    return optax.adam(LEARNING_RATE)


def transforms(group: str) -> dict[str, tuple[str, optax.GradientTransformation]]:
    """Key -> (label, transformation) of every program of a group, baseline first."""
    if group == "update":
        return {m.key: (m.label, m.make()) for m in METHODS}
    progs = {m.key: (f"chain({m.label}, adam)", optax.chain(m.make(), adam())) for m in METHODS}
    progs[ADAM] = ("optax.adam(1e-3)", adam())
    return progs


# ---------------------------------------------------------------------------
# Mid-run states
# ---------------------------------------------------------------------------


def tree_bytes(tree: Any) -> int:
    """Bytes of every array leaf of a pytree (an optimizer state)."""
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def warm_up_states(compiled: Sequence[Compiled], grads: Any, steps: int) -> None:
    """Runs ``steps`` updates of every program, replacing its state argument by the result.

    Step t's gradients are ``grads`` times a log-normal factor (the same for every program),
    so norm statistics see a varying stream; one scaled tree exists at a time.
    """
    rng = np.random.default_rng(SEED + 1)
    scales = np.exp(rng.normal(0.0, WARMUP_SCALE_SIGMA, size=steps)).astype(np.float32)
    scale_tree = jax.jit(lambda g, s: jax.tree.map(lambda x: x * s, g))
    for s in scales:
        g = jax.block_until_ready(scale_tree(grads, jnp.float32(s)))
        for c in compiled:
            _, old_state, params = c.contender.args
            _, state = c.executable(g, old_state, params)
            c.contender.args = (grads, jax.block_until_ready(state), params)
            del old_state
        del g


def _find(state: Any, cls: type) -> Any:
    """The first sub-state of type ``cls`` in an optimizer state (a chain's is a tuple)."""
    found = jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, cls))
    return next(s for s in found if isinstance(s, cls))


def state_phase(key: str, state: Any) -> dict[str, Any]:
    """What the warm-up left in the adaptive state: counters, thresholds, the phase reached.

    Raises if a state is not in the phase the benchmark means to time.
    """
    info: dict[str, Any] = {}
    if key in ("autoclip", "autoclip_window"):
        s = _find(state, oc.AutoClipState)
        info = {"norms_seen": int(s.size), "threshold": float(s.stats.threshold)}
    elif key == "zclip":
        s = _find(state, oc.ZClipState)
        info = {"warmup_count": int(s.count), "mean": float(s.mean), "std": float(s.var) ** 0.5}
        if int(s.count) < 25:
            raise RuntimeError(f"zclip still in warm-up after {WARMUP_STEPS} steps: {info}")
    elif key == "quantile_clip":
        s = _find(state, oc.QuantileClipState)
        info = {"threshold": float(s.max_norm)}
    elif key in ("adagc", "adagc_warmup"):
        s = _find(state, oc.AdaGCState)
        warmup_steps = 100 if key == "adagc_warmup" else 10
        info = {"step": int(s.step), "warming": int(s.step) + 1 <= warmup_steps}
        if info["warming"] != (key == "adagc_warmup"):
            raise RuntimeError(
                f"{key}: state in the wrong phase after {WARMUP_STEPS} steps: {info}"
            )
    elif key == "spike_aware_clip":
        s = _find(state, oc.SpikeAwareClipState)
        info = {"step": int(s.step), "active": int(s.step) + 1 >= 20}
        if not info["active"]:
            raise RuntimeError(f"spike_aware_clip still gated after {WARMUP_STEPS} steps")
    return info


# ---------------------------------------------------------------------------
# One group
# ---------------------------------------------------------------------------


def paired(times: Timings, name: str, ref: str) -> dict[str, float]:
    """Quartiles of the per-round ratio of ``name``'s time to ``ref``'s
    (:meth:`Timings.per_round`)."""
    q25, median, q75 = np.percentile(times.per_round(name, ref), [25, 50, 75])
    return {"median": float(median), "q25": float(q25), "q75": float(q75)}


def verdict(target: float | None, ratio: float) -> str:
    """The verdict on a paired median ratio to the baseline: within, OVER, or — (no target)."""
    if target is None:
        return "—"
    return "within" if ratio <= target else "OVER"


def bench_group(
    group: str, grads: Any, params: Any, sizes: Sizes, warmed: dict[str, Any]
) -> dict[str, Any]:
    """Compiles, warms up, checks and times one group's programs; inspects them.

    The update group records each method's warmed state in ``warmed``; the chain group
    starts each chain from it instead of running the warm-up again.
    """
    leaves = jax.tree.leaves(grads)
    grad_bytes = sum(x.nbytes for x in leaves)
    largest_leaf = max(x.nbytes for x in leaves)
    programs = transforms(group)
    labels = {key: label for key, (label, _) in programs.items()}
    contenders = [
        Contender(key, tx.update, (grads, tx.init(params), params))
        for key, (_, tx) in programs.items()
    ]
    compiled = compile_contenders(contenders, labels.get)
    if group == "update":
        t0 = time.perf_counter()
        warm_up_states(compiled, grads, WARMUP_STEPS)
        print(f"  ran {WARMUP_STEPS} warm-up updates of each in {time.perf_counter() - t0:.1f} s")
        warmed.update({c.contender.name: c.contender.args[1] for c in compiled})
    else:
        for c in compiled:
            if c.contender.name in warmed:  # chain(method, adam): (method's, adam's) state
                g, (_, adam_state), p = c.contender.args
                c.contender.args = (g, (warmed[c.contender.name], adam_state), p)
    by_key = {c.contender.name: c for c in compiled}
    phases = {key: state_phase(key, c.contender.args[1]) for key, c in by_key.items()}
    base_out = by_key[BASELINE].call()[0]
    check = max_relative_difference(base_out, by_key[OPTAX_CLIP].call()[0])
    del base_out

    pairs = {key: ref for key, ref in TIMED_PAIRS.items() if key in by_key}
    # Every pair's two programs write and free alike (an update, or a chain's update and
    # state): one untimed call before each pair is enough.
    times = time_round_robin(compiled, sizes.reps, sizes.warmup, settle="unit", pairs=pairs)
    results: dict[str, Any] = {}
    base_median = float(np.median(times.calls[BASELINE]))
    for c in compiled:
        key = c.contender.name
        method = BY_KEY.get(key)
        target = method.target if method else None
        state = c.contender.args[1]
        r = {
            "label": labels[key],
            "phase": method.phase if method else "reference",
            "state": phases[key],
            **summarize(times.calls[key]),
            "lower_s": c.lower_s,
            "compile_s": c.compile_s,
            "state_bytes": tree_bytes(state),
            "state_over_grad": tree_bytes(state) / grad_bytes,
            **inspect_compiled(c, grad_bytes, largest_leaf),
        }
        ref = method.ref if method else BASELINE
        r["reference"] = ref
        r["vs_baseline"] = float(np.median(times.calls[key])) / base_median
        r["paired_vs_baseline"] = paired(times, key, ref)
        if ADAM in times.calls:
            r["paired_vs_adam"] = paired(times, key, ADAM)
        r["target"] = target
        r["verdict"] = verdict(target, r["paired_vs_baseline"]["median"])
        results[key] = r
    return {
        "baseline": BASELINE,
        "reps": sizes.reps,
        "warmup_calls": sizes.warmup,
        "baseline_vs_optax_max_rel_diff": check,
        "contenders": results,
    }


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------


def _p(p: dict[str, float]) -> str:
    return f"{p['median']:.3f} ({p['q25']:.2f}–{p['q75']:.2f})"


def timing_table(group: dict[str, Any]) -> str:
    """Times, ratios to the baseline with the targets, and compile times (× adam in chains)."""
    with_adam = any("paired_vs_adam" in r for r in group["contenders"].values())
    headers = ["program", "median ms", "IQR ms", "× baseline (medians)"]
    headers += ["reference", "× reference paired (IQR)", "target", "verdict"]
    headers += ["× adam paired"] if with_adam else []
    headers += ["trace+lower s", "compile s"]
    rows = []
    for r in group["contenders"].values():
        row = [r["label"], _ms(r["median_ms"]), _ms(r["iqr_ms"]), f"{r['vs_baseline']:.3f}"]
        row += [
            r["reference"],
            _p(r["paired_vs_baseline"]),
            "—" if r["target"] is None else f"≤ {r['target']:.2f}",
            r["verdict"],
        ]
        row += [f"{r['paired_vs_adam']['median']:.3f}"] if with_adam else []
        row += [f"{r['lower_s']:.2f}", f"{r['compile_s']:.2f}"]
        rows.append(row)
    return markdown_table(headers, rows)


def memory_table(group: dict[str, Any]) -> str:
    """State bytes, XLA's temp size, bytes the kernels write, and kernel counts."""
    headers = [
        "program",
        "state",
        "state / grad bytes",
        "XLA temp",
        "temp / grad bytes",
        "kernel writes / grad bytes",
        "entry kernels",
        "fusions",
    ]
    rows = [
        [
            r["label"],
            _bytes(r["state_bytes"]),
            f"{r['state_over_grad']:.4f}",
            _bytes(r.get("temp_bytes", math.nan)),
            f"{r.get('temp_over_grad', math.nan):.4f}",
            f"{r['kernel_written_over_grad']:.2f}",
            str(r["entry_kernels"]),
            str(r["entry_ops"].get("fusion", 0)),
        ]
        for r in group["contenders"].values()
    ]
    return markdown_table(headers, rows)


def phase_lines(group: dict[str, Any]) -> list[str]:
    """One line per adaptive state: the phase it is in and what the warm-up left in it."""
    return [
        f"- {r['label']}: {r['phase']}; {json.dumps(r['state'])}"
        for r in group["contenders"].values()
        if r["state"]
    ]


def spike_aware_summary(groups: dict[str, Any], grad_bytes: int) -> str:
    """spike_aware_clip has no target: its own figures, state memory and XLA temp bytes."""
    u = groups["update"]["contenders"]["spike_aware_clip"]
    c = groups["chain"]["contenders"]["spike_aware_clip"]
    a = groups["chain"]["contenders"][ADAM]
    return (
        f"spike_aware_clip: update {_ms(u['median_ms'])} ms = "
        f"{u['paired_vs_baseline']['median']:.2f} × clip_by_global_norm (paired); chain "
        f"{_ms(c['median_ms'])} ms = {c['paired_vs_baseline']['median']:.2f} × the baseline "
        f"chain. State {_bytes(u['state_bytes'])} = {u['state_over_grad']:.3f} × gradient "
        f"bytes ({_bytes(grad_bytes)}); in the chain {_bytes(c['state_bytes'])} = "
        f"{c['state_over_grad']:.3f} × (adam alone {a['state_over_grad']:.3f} ×). XLA temp: "
        f"update {_bytes(u.get('temp_bytes', math.nan))} = {u.get('temp_over_grad', math.nan):.3f}"
        f" × gradient bytes; chain {_bytes(c.get('temp_bytes', math.nan))} = "
        f"{c.get('temp_over_grad', math.nan):.3f} ×."
    )


def over_target(groups: dict[str, Any]) -> list[str]:
    """One line per program whose paired ratio to the baseline exceeds its target."""
    out = []
    for gname, group in groups.items():
        for r in group["contenders"].values():
            if r["verdict"] == "OVER":
                p = r["paired_vs_baseline"]
                out.append(
                    f"- {gname}: {r['label']} {p['median']:.3f} × (IQR {p['q25']:.2f}–"
                    f"{p['q75']:.2f}) > target {r['target']:.2f}"
                )
    return out


LEGEND = f"""
Baseline: oc.clip_by_global_norm({MAX_NORM}) alone, and chain(it, adam). Every state is
taken after {WARMUP_STEPS} updates on log-normally rescaled gradients (σ = {WARMUP_SCALE_SIGMA}).
"× reference paired" is the median (and quartiles) of per-round ratios (each round runs
every program in a shuffled order, a program with a target back to back with its
reference), robust to drift in the machine's load; the verdict compares it with the
target."""


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses and checks the options; exits with status 2 and a message on bad ones."""
    parser = argparse.ArgumentParser(
        description="Time optaxclip's adaptive clippers (alone and chained with adam) "
        "against clip_by_global_norm; print markdown tables and write JSON.",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON output path (default: {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tiny tree and few repetitions: a smoke run"
    )
    parser.add_argument(
        "--reps",
        type=_positive_int,
        default=None,
        help=f"timed calls per program (default {FULL.reps}, {QUICK.reps} with --quick)",
    )
    args = parser.parse_args(argv)
    check_out_path(parser, args.out)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    base = QUICK if args.quick else FULL
    sizes = replace(base, reps=base.reps if args.reps is None else args.reps)
    # Compile times must be real compilations, not persistent-cache hits.
    jax.config.update("jax_enable_compilation_cache", False)

    machine = timing_machine()
    shapes = transformer_shapes(sizes.d_model, sizes.layers, sizes.vocab)
    grads = random_tree(shapes, jnp.float32, SEED)
    params = jax.tree.map(jnp.zeros_like, grads)
    leaves = jax.tree.leaves(grads)
    grad_bytes = sum(x.nbytes for x in leaves)
    tree = {
        "title": f"transformer-like, layers={sizes.layers}, d={sizes.d_model}, "
        f"vocab={sizes.vocab}, float32",
        "leaves": len(leaves),
        "params": sum(x.size for x in leaves),
        "grad_bytes": grad_bytes,
        "largest_leaf_bytes": max(x.nbytes for x in leaves),
    }
    print("# optaxclip adaptive clippers benchmark" + (" (--quick)" if args.quick else ""))
    print()
    print(report_machine(machine))
    print(
        f"tree: {tree['title']}; {tree['leaves']} leaves, {tree['params']:,} parameters, "
        f"{_bytes(grad_bytes)} of gradients"
    )
    print(LEGEND)

    groups, warmed = {}, {}
    for group in GROUPS:
        title = "update alone" if group == "update" else "chain(method, adam)"
        print(f"\n## {group}: {title}\n", flush=True)
        groups[group] = bench_group(group, grads, params, sizes, warmed)
        g = groups[group]
        print(
            f"\ntiming: median over {g['reps']} calls per program (after {g['warmup_calls']} "
            f"untimed), round-robin; baseline vs optax clip: max rel. diff "
            f"{g['baseline_vs_optax_max_rel_diff']:.1e}\n"
        )
        print(timing_table(g))
        print("\nState and XLA memory analysis of each compiled program:\n")
        print(memory_table(g))
        print("\nStates timed:\n")
        print("\n".join(phase_lines(g)), flush=True)

    print("\n## Summary\n")
    print(spike_aware_summary(groups, grad_bytes))
    over = over_target(groups)
    print("\nOver target:" if over else "\nEvery method with a target is within it.")
    if over:
        print("\n".join(over))

    wall = time.perf_counter() - start
    record = {
        "benchmark": "bench_adaptive",
        "quick": args.quick,
        "sizes": asdict(sizes),
        "max_norm": MAX_NORM,
        "learning_rate": LEARNING_RATE,
        "seed": SEED,
        "warmup_steps": WARMUP_STEPS,
        "methods": list(METHOD_KEYS),
        "targets": {m.key: m.target for m in METHODS},
        "machine": machine,
        "tree": tree,
        "groups": groups,
        "over_target": over,
        "wall_s": wall,
        "load_average_end": load_average(),
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\ntotal wall time: {wall:.1f} s; load average at end: {record['load_average_end']}")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
