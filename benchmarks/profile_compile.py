"""Where compile time goes: XLA's passes and code generation, from jax's profiler.

Run from the repository root::

    python benchmarks/profile_compile.py                        # 999 leaves, 3 rounds
    python benchmarks/profile_compile.py --leaves 99 --rounds 9 \\
        --programs adam "chain(x * runtime scalar, adam)"
    python benchmarks/profile_compile.py --quick                # 15 leaves, a smoke run

The programs are ``bench_perf.py``'s compile-time programs (Adam, our chain, optax's chain,
and the scaling reference ``chain(x * runtime scalar, adam)``) over its transformer-like
trees of zeros (12 leaves per layer of d=32). Each round traces, lowers and compiles every
program once, in a shuffled order, under ``jax.profiler.trace`` (host events only, no
Python tracer), after an untimed compile of Adam on 12 leaves (a process's first compile
pays for itself). From each trace the script takes the thread time of every event name on
the three kinds of thread that compile (jax 0.10's CPU client): the ``main`` thread
(tracing, lowering, waiting for the compile), the ``compiler`` thread (XLA's HLO passes,
then code generation, which it hands out) and the ``codegen`` threads (each fusion's
kernel compiled from MLIR to LLVM to machine code). Thread time is exclusive, as in
``profile_step.py``: an HLO pass pipeline counts only the time none of its passes
accounts for, and the main thread's wait for the compile is left out. The figures are
medians over the rounds (an event missing from a round counts 0 there: the profiler now and
then records none of a thread's events, seen once for the main thread of a 15-leaf compile
in a CI run under load).

For each program after the first, a table lists the events whose thread time differs most
from the first program's (by default Adam), each with its share of the whole difference,
and a last row for all other events, so that the rows add up to the difference in thread
time. The compile's wall time is less than the sum of its threads' times: the codegen
threads work in parallel. The wall-time ratios to quote are ``bench_perf.py``'s (paired
rounds without the profiler, which costs a few percent); this script says where they go.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_clip
import bench_perf
from bench_clip import markdown_table
from profile_step import exclusive_times, load_trace

DEFAULT_PROGRAMS = ("adam", bench_perf.OURS)
THREAD_KINDS = {
    "python": "main",
    "tf_PjRtCompilerThreadPool": "compiler",
    "tf_xla-cpu-codegen": "codegen",
}
# The main thread's event around the compile: it waits there for the compiler thread.
WAIT = "backend_compile_and_load"
MAIN_EVENTS = frozenset({WAIT, "lower_sharding_computation"})


def thread_kind(line_name: str, event_names: Collection[str] = ()) -> str | None:
    """``tf_xla-cpu-codegen/-5329813957224434623`` -> ``codegen``; None for other lines. A
    line that lowers or waits for the compile is the main thread whatever its name (the
    profiler names a thread by what the system calls it)."""
    kind = THREAD_KINDS.get(line_name.split("/")[0])
    if kind is None and not MAIN_EVENTS.isdisjoint(event_names):
        return "main"
    return kind


def event_name(name: str) -> str:
    """An event's name without the module's name, which differs between programs:
    ``HLO passes after layout assignment (jit_update_fn)`` -> ``HLO passes after layout
    assignment``."""
    return re.sub(r"\s*\(jit_[^)]*\)$", "", name)


def thread_times(lines: Sequence[tuple[str, list[tuple[int, int, str]]]]) -> dict[str, float]:
    """Exclusive thread time (ms) per ``"<thread kind>: <event>"``, summed over the lines
    of a kind, from ``(line name, [(start ns, duration ns, event name)])`` pairs. The main
    thread's wait for the compile (:data:`WAIT`) is left out."""
    out: dict[str, float] = defaultdict(float)
    for line, events in lines:
        kind = thread_kind(line, {name for _, _, name in events})
        if kind is None:
            continue
        for name, ns in exclusive_times(events).items():
            if not (kind == "main" and name == WAIT):
                out[f"{kind}: {event_name(name)}"] += ns / 1e6
    return dict(out)


def read_lines(trace_dir: Path) -> list[tuple[str, list[tuple[int, int, str]]]]:
    """Every line of the trace as ``(line name, [(start ns, duration ns, event name)])``."""
    data = load_trace(trace_dir)
    return [
        (line.name, [(e.start_ns, e.duration_ns, e.name) for e in line.events])
        for plane in data.planes
        for line in plane.lines
    ]


def profile_compile(name: str, tree: Any, trace_dir: Path) -> dict[str, Any]:
    """One traced trace+lower+compile of ``name``: its wall times and thread times."""
    tx = bench_perf.CHAIN_PROGRAMS[name]()
    state = tx.init(tree)
    options = jax.profiler.ProfileOptions()
    options.host_tracer_level = 3
    options.python_tracer_level = 0
    with jax.profiler.trace(str(trace_dir), profiler_options=options):
        t0 = time.perf_counter()
        lowered = jax.jit(tx.update).lower(tree, state, tree)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
    return {
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "thread_ms": thread_times(read_lines(trace_dir)),
    }


def median_times(rounds: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per event, the median over the rounds (an event absent from a round counts 0)."""
    keys = set().union(*rounds)
    return {k: statistics.median(r.get(k, 0.0) for r in rounds) for k in keys}


def difference_rows(base: dict[str, float], other: dict[str, float], top: int) -> list[list]:
    """The ``top`` events by ``other - base``, largest first, then one row for the rest
    and one for the total: [event, base ms, other ms, difference ms, share]."""
    keys = set(base) | set(other)
    diff = {k: other.get(k, 0.0) - base.get(k, 0.0) for k in keys}
    total = sum(diff.values())
    order = sorted(keys, key=lambda k: (-diff[k], k))
    shown, rest = order[:top], order[top:]

    def share(d: float) -> str:
        return f"{d / total:.0%}" if total else "—"

    rows = [
        [
            k,
            f"{base.get(k, 0.0):.1f}",
            f"{other.get(k, 0.0):.1f}",
            f"{diff[k]:+.1f}",
            share(diff[k]),
        ]
        for k in shown
    ]
    if rest:
        b, o = sum(base.get(k, 0.0) for k in rest), sum(other.get(k, 0.0) for k in rest)
        rows.append(
            [
                f"all other events ({len(rest)})",
                f"{b:.1f}",
                f"{o:.1f}",
                f"{o - b:+.1f}",
                share(o - b),
            ]
        )
    b, o = sum(base.values()), sum(other.values())
    rows.append(["total thread time", f"{b:.1f}", f"{o:.1f}", f"{o - b:+.1f}", share(o - b)])
    return rows


def run(programs: Sequence[str], leaves: int, rounds: int, seed: int) -> dict[str, Any]:
    jax.config.update("jax_enable_compilation_cache", False)
    bench_perf.compile_once(bench_perf.CHAIN_PROGRAMS["adam"], bench_perf._zeros_tree(12))
    tree = bench_perf._zeros_tree(leaves)
    rng = random.Random(seed)
    samples: dict[str, list[dict[str, Any]]] = {p: [] for p in programs}
    for _ in range(rounds):
        for name in rng.sample(list(programs), len(programs)):
            with tempfile.TemporaryDirectory() as tmp:
                samples[name].append(profile_compile(name, tree, Path(tmp)))
    base = programs[0]
    totals = {p: [s["lower_s"] + s["compile_s"] for s in samples[p]] for p in programs}
    return {
        "leaves": len(jax.tree.leaves(tree)),
        "rounds": rounds,
        "programs": {
            p: {
                "lower_s": statistics.median(s["lower_s"] for s in samples[p]),
                "compile_s": statistics.median(s["compile_s"] for s in samples[p]),
                "paired_ratio": statistics.median(
                    t / b for t, b in zip(totals[p], totals[base], strict=True)
                ),
                "thread_ms": median_times([s["thread_ms"] for s in samples[p]]),
            }
            for p in programs
        },
    }


def report(record: dict[str, Any], top: int) -> str:
    programs = record["programs"]
    base, *others = list(programs)
    kinds = ("main", "compiler", "codegen")
    rows = [
        [
            p,
            f"{r['lower_s']:.2f}",
            f"{r['compile_s']:.2f}",
            f"{r['paired_ratio']:.2f}",
            *[
                f"{sum(v for k, v in r['thread_ms'].items() if k.startswith(kind + ':')) / 1e3:.2f}"
                for kind in kinds
            ],
        ]
        for p, r in programs.items()
    ]
    head = [
        "program",
        "trace+lower s",
        "compile s",
        f"× {base} (paired)",
        *[f"{kind} thread{'s' if kind == 'codegen' else ''} s" for kind in kinds],
    ]
    parts = [
        f"## {record['leaves']:,} leaves, medians of {record['rounds']} round"
        + ("s\n" if record["rounds"] > 1 else "\n"),
        markdown_table(head, rows),
    ]
    for p in others:
        parts.append(f"\n### {p}: thread time against {base} (ms, exclusive)\n")
        parts.append(
            markdown_table(
                ["thread: event", base, p, "difference", "share"],
                difference_rows(programs[base]["thread_ms"], programs[p]["thread_ms"], top),
            )
        )
    return "\n".join(parts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leaves", type=bench_clip._positive_int, default=1000)
    parser.add_argument(
        "--programs",
        nargs="+",
        default=list(DEFAULT_PROGRAMS),
        help="bench_perf's compile-time programs; the first is the baseline",
    )
    parser.add_argument("--rounds", type=bench_clip._positive_int, default=3)
    parser.add_argument("--top", type=bench_clip._positive_int, default=12, help="rows per table")
    parser.add_argument("--seed", type=int, default=0, help="the rounds' shuffles")
    parser.add_argument(
        "--quick", action="store_true", help="one round at bench_perf's quick size (15 leaves)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    unknown = [p for p in args.programs if p not in bench_perf.CHAIN_PROGRAMS]
    if unknown or len(set(args.programs)) != len(args.programs):
        known = "\n  ".join(bench_perf.CHAIN_PROGRAMS)
        what = f"unknown programs {unknown}" if unknown else "a program named twice"
        print(f"{what}; bench_perf's are:\n  {known}", file=sys.stderr)
        return 2
    leaves, rounds = (24, 1) if args.quick else (args.leaves, args.rounds)
    record = run(args.programs, leaves, rounds, args.seed)
    print(report(record, args.top))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"quick": args.quick, **record}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
