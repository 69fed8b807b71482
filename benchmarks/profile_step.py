"""Where a jitted step's time goes: each XLA kernel's thread time, from jax's profiler.

Run from the repository root::

    python benchmarks/profile_step.py                       # bfloat16 tree: Adam, the chains
    python benchmarks/profile_step.py --tree transformer_f32 \\
        --programs optaxclip.clip_by_value optax.clip        # any of bench_clip's programs
    python benchmarks/profile_step.py --quick                # tiny tree, a smoke run

The programs are bench_clip.py's contenders (same trees, same arguments, nothing donated,
glibc's malloc set as in its timed sections: ``bench_clip.steady_allocator``, else a call
pays the page faults of its fresh outputs in some calls and not others), compiled and
warmed up, then called ``--calls`` times under ``jax.profiler.trace``. The script prints
each kind of kernel (its HLO name without the number: ``add_convert_fusion``,
``ynn_fusion``, ``cond``) with its count and its thread time, and how busy each of XLA's
worker threads was, each the median over the calls (one call is a poor sample). Thread
time is exclusive: a kernel that runs inside a ``while`` or a ``cond`` counts for itself,
not again for the loop. It is the time from a kernel's start to its end, so it includes
any time its thread waited for a core: XLA may run more worker threads than the machine has
cores (three on the 2-core VM), and their busy times can then add up to more than the cores
could give. The wall
time includes the profiler's own cost (a few percent), so the timings to quote are
bench_clip.py's; this script says where they go.

The event names are XLA's CPU runtime's (jax 0.10): the worker threads' lines are named
``tf_XLA...`` and their bookkeeping events (``ThunkExecutor::Execute``, ``Threadpool...``,
``end: ...``) are left out.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_clip
from bench_clip import FULL, QUICK, markdown_table

DEFAULT_TREE = "transformer_bf16"
DEFAULT_PROGRAMS = (bench_clip.ADAM, bench_clip.SCALE_CHAIN, bench_clip.OC_CHAIN)
# Events on a worker thread that are not kernels: the executor's wrapper around a kernel,
# the thread pool's markers, and the ends of kernels the runtime marks separately.
_BOOKKEEPING = re.compile(r"^(ThunkExecutor::|ThreadpoolListener::|end: )")
_WAIT = "SlinkyThreadPool::Await"
_CALL = "profile_step call {}"


def kernel_kind(name: str) -> str:
    """``add_convert_fusion.293`` -> ``add_convert_fusion``."""
    return re.sub(r"(\.\d+)+$", "", name)


def exclusive_times(events: list[tuple[int, int, str]]) -> dict[str, float]:
    """Per event name, its duration (ns) minus that of the events nested inside it, for the
    events of one thread given as (start, duration, name)."""
    out: dict[str, float] = defaultdict(float)
    stack: list[list] = []  # [end, name, time of its children]
    for start, dur, name in sorted(events, key=lambda e: (e[0], -e[1])):
        while stack and stack[-1][0] <= start:
            _, parent, children = stack.pop()
            out[parent] -= children
        if stack:
            stack[-1][2] += dur
        out[name] += dur
        stack.append([start + dur, name, 0])
    for _, parent, children in stack:
        out[parent] -= children
    return out


def busy_ns(events: list[tuple[int, int, str]]) -> int:
    """The time (ns) one thread spent in any of ``events`` (the union of their intervals)."""
    total, reach = 0, None
    for start, dur, _ in sorted(events):
        end = start + dur
        if reach is None or start >= reach:
            total += dur
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def load_trace(trace_dir: Path) -> Any:
    """The ``jax.profiler.ProfileData`` of the trace written under ``trace_dir``."""
    paths = sorted(trace_dir.glob("**/*.xplane.pb"))
    if not paths:
        raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
    return jax.profiler.ProfileData.from_file(str(paths[-1]))


def read_trace(trace_dir: Path) -> tuple[dict[int, tuple[int, int]], dict[str, list]]:
    """The annotated calls' windows (call index -> (start, end) ns) and every worker
    thread's events (line name -> [(start, duration, name)])."""
    data = load_trace(trace_dir)
    calls: dict[int, tuple[int, int]] = {}
    threads: dict[str, list] = defaultdict(list)
    pattern = re.compile(re.escape(_CALL).replace(r"\{\}", r"(\d+)") + "$")
    for plane in data.planes:
        for line in plane.lines:
            for e in line.events:
                match = pattern.match(e.name)
                if match:
                    calls[int(match.group(1))] = (e.start_ns, e.start_ns + e.duration_ns)
                elif line.name.startswith("tf_XLA") and not _BOOKKEEPING.match(e.name):
                    threads[line.name].append((e.start_ns, e.duration_ns, e.name))
    return calls, threads


def summarize_call(window: tuple[int, int], threads: dict[str, list]) -> dict[str, Any]:
    """Kernel kinds, thread time and per-thread busy time of the events inside ``window``."""
    start, end = window
    kinds: dict[str, dict[str, float]] = defaultdict(lambda: {"count": 0, "thread_ms": 0.0})
    busy, waits = {}, 0.0
    for line, events in threads.items():
        inside = [e for e in events if start <= e[0] < end]
        if not inside:
            continue
        work = [e for e in inside if e[2] != _WAIT]
        busy[line] = busy_ns(work) / 1e6
        waits += sum(e[1] for e in inside if e[2] == _WAIT) / 1e6
        for name, ns in exclusive_times(work).items():
            kinds[kernel_kind(name)]["thread_ms"] += ns / 1e6
        for _, _, name in work:
            kinds[kernel_kind(name)]["count"] += 1
    ordered = dict(sorted(kinds.items(), key=lambda kv: -kv[1]["thread_ms"]))
    return {
        "wall_ms": (end - start) / 1e6,
        "threads_busy_ms": dict(sorted(busy.items(), key=lambda kv: -kv[1])),
        "wait_ms": waits,
        "kernels": ordered,
    }


def profile(compiled: bench_clip.Compiled, calls: int, trace_dir: Path) -> dict[str, Any]:
    """Traces ``calls`` calls of one compiled program; the medians of their summaries."""
    for _ in range(3):
        jax.block_until_ready(compiled.call())
    with jax.profiler.trace(str(trace_dir)):
        for i in range(calls):
            with jax.profiler.TraceAnnotation(_CALL.format(i)):
                jax.block_until_ready(compiled.call())
    windows, threads = read_trace(trace_dir)
    if len(windows) != calls:
        raise RuntimeError(f"found {len(windows)} annotated calls in the trace, expected {calls}")
    summaries = [summarize_call(windows[i], threads) for i in sorted(windows)]
    if not any(s["kernels"] for s in summaries):
        raise RuntimeError(
            f"no kernel events on XLA's worker threads in the trace (lines: "
            f"{sorted(threads) or 'none named tf_XLA...'}); this jax may name them otherwise"
        )
    return median_summary(summaries)


def median_summary(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every figure of :func:`summarize_call` as its median over the calls (a kernel kind
    or a thread missing from a call counts 0 there; a kind that ran in fewer than half of
    the calls is left out), with each call's wall time.

    One call is a poor sample on a 2-core VM: ``optax.clip``'s calls on the float32 tree
    took 8-22 ms within one trace, and the thread time of one kind of kernel moved with
    them.
    """

    def median_of(get: Any, keys: Any) -> dict[str, float]:
        return {k: statistics.median(get(s, k) for s in summaries) for k in keys}

    kinds = {k for s in summaries for k in s["kernels"]}
    lines = {k for s in summaries for k in s["threads_busy_ms"]}
    kernel = lambda field: lambda s, k: s["kernels"].get(k, {}).get(field, 0)
    thread_ms = median_of(kernel("thread_ms"), kinds)
    counts = median_of(kernel("count"), kinds)
    busy = median_of(lambda s, k: s["threads_busy_ms"].get(k, 0.0), lines)
    return {
        "calls": len(summaries),
        "wall_ms": statistics.median(s["wall_ms"] for s in summaries),
        "threads_busy_ms": dict(sorted(busy.items(), key=lambda kv: -kv[1])),
        "wait_ms": statistics.median(s["wait_ms"] for s in summaries),
        "kernels": {
            k: {"count": counts[k], "thread_ms": thread_ms[k]}
            for k in sorted(kinds, key=lambda k: -thread_ms[k])
            if counts[k] > 0
        },
        "walls_ms": [round(s["wall_ms"], 3) for s in summaries],
    }


def report(name: str, p: dict[str, Any], top: int) -> str:
    busy = ", ".join(f"{ms:.2f}" for ms in p["threads_busy_ms"].values())
    total = sum(k["thread_ms"] for k in p["kernels"].values())
    rows = [
        [kind, f"{k['count']:g}", f"{k['thread_ms']:.2f}", f"{k['thread_ms'] / total:.0%}"]
        for kind, k in list(p["kernels"].items())[:top]
    ]
    return "\n".join(
        [
            f"## {name}",
            "",
            f"medians of {p['calls']} calls: {p['wall_ms']:.2f} ms wall (calls: "
            f"{', '.join(f'{w:.1f}' for w in p['walls_ms'])}); worker threads busy "
            f"{busy} ms; waiting on the pool {p['wait_ms']:.2f} ms; kernels' thread time "
            f"{total:.2f} ms",
            "",
            markdown_table(["kernel kind", "count", "thread ms", "share"], rows),
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", choices=bench_clip.TREE_KEYS, default=DEFAULT_TREE)
    parser.add_argument(
        "--programs", nargs="+", default=list(DEFAULT_PROGRAMS), help="bench_clip contender names"
    )
    parser.add_argument("--calls", type=bench_clip._positive_int, default=5)
    parser.add_argument("--top", type=bench_clip._positive_int, default=8, help="rows per table")
    parser.add_argument("--quick", action="store_true", help="bench_clip's tiny trees")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    steady = bench_clip.steady_allocator()
    sizes = QUICK if args.quick else FULL
    spec = next(s for s in bench_clip.tree_specs(sizes, True) if s.key == args.tree)
    grads = bench_clip.random_tree(spec.shapes, spec.dtype, bench_clip.SEED)
    params = jax.tree.map(jax.numpy.zeros_like, grads)
    # Only the programs asked for are built (each state is as large as the gradients).
    factories = bench_clip.contender_factories(grads, params, True)
    unknown = [n for n in args.programs if n not in factories]
    if unknown:
        known = "\n  ".join(factories)
        print(f"unknown programs {unknown}; bench_clip's are:\n  {known}", file=sys.stderr)
        return 2
    compiled = bench_clip.compile_contenders([factories[n]() for n in args.programs])
    results = {}
    print(f"# {spec.title}\n")
    for c in compiled:
        with tempfile.TemporaryDirectory() as tmp:
            results[c.contender.name] = profile(c, args.calls, Path(tmp))
        print(report(c.contender.name, results[c.contender.name], args.top) + "\n", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "tree": args.tree,
            "quick": args.quick,
            "steady_allocator": steady,
            "programs": results,
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
