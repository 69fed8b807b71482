"""Compile time, memory and dispatch of ``optax.chain(clipper, optax.adam)`` against Adam.

Run from the repository root (``benchmarks/run.py`` runs it with the other benchmarks)::

    python benchmarks/bench_perf.py                 # full run: about 4 minutes on 2 CPU cores
    python benchmarks/bench_perf.py --quick         # smoke run: small trees, well under a minute
    python benchmarks/bench_perf.py --sections compile,memory

Three sections:

* ``compile``: trace+lower and XLA compile time of the jitted update of
  ``optax.adam(1e-3)``, ``chain(oc.clip_by_global_norm(1.0), adam)`` and
  ``chain(optax.clip_by_global_norm(1.0), adam)`` on transformer-like trees of about 100,
  1,000 and 5,000 leaves (12 leaves per layer of d=32, plus embedding and final norm). Each
  round compiles Adam and our chain; the ratio is the median of the rounds' ratios (9
  rounds at 100 leaves, 3 at 1,000; at 5,000, the geometric mean of the two cores' pairs).
  At 100 and 1,000 leaves the first round compiles the reference programs (only there),
  then our chain, then Adam; later rounds shuffle the two. At 5,000 leaves one process per
  core compiles both, the two cores at once and in opposite orders (see
  ``bench_compile``). Each compilation starts from fresh transformations (nothing is
  cached; the persistent cache is off).
  optax's chain is skipped at 5,000 leaves: it takes about 17 minutes there. A reference
  program, ``chain(x * runtime scalar, adam)``, multiplies every leaf by a scalar held in
  the state before Adam: the compile time any clipper adds by scaling alone, with no norm
  (at 100 and 1,000 leaves).
* ``memory``: one fresh process per program (the three at once) runs 20 jitted training
  steps (update, then ``optax.apply_updates``) on bench_clip.py's 25M-parameter tree with
  the parameters and optimizer state donated. Reported: the peak resident memory of the
  steps (``VmHWM``, reset after compilation and one warm-up step, once the heap the compiler
  freed is handed back to the OS with glibc's ``malloc_trim``: otherwise the figure counts
  how much the compiler happened to leave behind), the peak of the whole process, and XLA's
  memory analysis of the step (temp buffer bytes).
* ``dispatch``: for each transformation, ``chain(it, adam)`` runs 100 steps in a Python loop
  without blocking, under ``jax.transfer_guard("disallow")`` (a device-to-host transfer
  would raise); reported: the time to dispatch the 100 steps, the time until the last one
  finished, and whether the last result was still pending when the loop returned (the
  loop ran ahead of the device: no step waited on the host). Also XLA's temp bytes of each
  donated step, against the largest leaf: no step keeps a copy of a leaf in memory, in any
  branch (the analysis counts every branch, taken or not).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_clip import (
    SCALE_CHAIN,
    Contender,
    _bytes,
    check_out_path,
    compile_contenders,
    load_average,
    machine_info,
    markdown_table,
    random_tree,
    report_machine,
    scale_by_runtime_scalar,
    transformer_shapes,
)

import optaxclip as oc

LEARNING_RATE = 1e-3
SEED = 0
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_perf.json"
SECTIONS = ("compile", "memory", "dispatch")

COMPILE_LEAVES = {"full": (100, 1000, 5000), "quick": (24, 40)}
COMPILE_REPS = {100: 9, 1000: 3, 24: 1}  # paired rounds (see bench_compile)
# Sizes where one process per core compiles Adam and our chain, both cores at once.
CONCURRENT = {5000, 40}
MEMORY_STEPS = 20
MEMORY_TREE = {"full": (320, 12, 32_000), "quick": (64, 2, 1024)}  # d, layers, vocab
DISPATCH_TREE = {"full": (256, 2, 2048), "quick": (256, 1, 2048)}
DISPATCH_QUICK = ("clip_by_value(1.0)", "clip_by_global_norm(1.0)", "zclip()", "zero_nonfinite()")
DISPATCH_STEPS = 100

TARGETS = {"compile": 1.3, "memory": 1.05}
NO_COPY = 0.25  # a step's XLA temp under this fraction of the largest leaf holds no leaf copy


def adam() -> optax.GradientTransformation:
    return optax.adam(LEARNING_RATE)


CHAIN_PROGRAMS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adam": adam,
    "chain(oc.clip_by_global_norm, adam)": lambda: optax.chain(oc.clip_by_global_norm(1.0), adam()),
    "chain(optax.clip_by_global_norm, adam)": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), adam()
    ),
}
OURS, OPTAX_CHAIN = "chain(oc.clip_by_global_norm, adam)", "chain(optax.clip_by_global_norm, adam)"
CHAIN_PROGRAMS[SCALE_CHAIN] = lambda: optax.chain(scale_by_runtime_scalar(), adam())
# Programs left out above a number of leaves: optax's chain compiles for ~17 minutes at
# 5,000 leaves; the scaling reference costs a minute there.
MAX_LEAVES = {OPTAX_CHAIN: 1000, SCALE_CHAIN: 1000}
SKIPPED_NOTE = {OPTAX_CHAIN: "not run (~17 min)", SCALE_CHAIN: "not run (~1 min)"}


def layered_shapes(leaves: int) -> dict[str, tuple[int, ...]]:
    """A transformer-like tree of about ``leaves`` leaves (12 per layer, plus 3), d=32."""
    return transformer_shapes(32, max(1, (leaves - 3) // 12), 512)


# ---------------------------------------------------------------------------
# Compile time
# ---------------------------------------------------------------------------


def compile_once(
    make: Callable[[], optax.GradientTransformation], tree: Any
) -> tuple[float, float]:
    """Seconds to trace+lower and to compile ``jit(tx.update)`` for a fresh ``tx``."""
    tx = make()
    state = tx.init(tree)
    t0 = time.perf_counter()
    lowered = jax.jit(tx.update).lower(tree, state, tree)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def compile_worker(names: Sequence[str], leaves: int, cpu: int | None) -> None:
    """One core's side of a crossed round (see :func:`bench_compile`), in its own process.

    Pinned to ``cpu``, it pays the process's first compilation untimed, prints ``ready``,
    waits for a line on stdin, then compiles each program of ``names`` in turn at
    ``leaves`` leaves (the heap the compiler freed handed back between them) and prints
    each one's two times as a line of JSON. Then it compiles the last program again and
    again, untimed, until the parent kills it: the other core's last program never has a
    core to itself while it finishes. It returns instead if its parent is gone.
    """
    parent = os.getppid()
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    jax.config.update("jax_enable_compilation_cache", False)
    compile_once(CHAIN_PROGRAMS["adam"], _zeros_tree(12))
    tree = _zeros_tree(leaves)
    print("ready", flush=True)
    if not sys.stdin.readline():
        return
    for name in names:
        _release_freed_heap()
        lower, comp = compile_once(CHAIN_PROGRAMS[name], tree)
        print(json.dumps({"name": name, "lower_s": lower, "compile_s": comp}), flush=True)
    while os.getppid() == parent:
        compile_once(CHAIN_PROGRAMS[names[-1]], tree)


def _zeros_tree(leaves: int) -> dict[str, jax.Array]:
    return {k: jnp.zeros(s, jnp.float32) for k, s in layered_shapes(leaves).items()}


def _crossed_round(orders: Sequence[Sequence[str]], leaves: int) -> list[dict[str, tuple]]:
    """Runs a :func:`compile_worker` per core at once, the one on core ``i`` compiling the
    programs of ``orders[i]`` in turn; returns, per core, each program's two times."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    procs, logs = [], []
    try:
        for i, names in enumerate(orders):
            logs.append(tempfile.TemporaryFile("w+"))
            cpu = ["--cpu", str(cpus[i % len(cpus)])] if cpus else []
            worker = [arg for name in names for arg in ("--compile-worker", name)]
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, *worker, "--leaves", str(leaves), *cpu],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=logs[i],
                    text=True,
                )
            )

        def line(i: int) -> str:
            text = procs[i].stdout.readline()
            if not text:
                procs[i].wait()
                logs[i].seek(0)
                raise RuntimeError(f"compile worker {orders[i]} failed:\n{logs[i].read()[-3000:]}")
            return text.strip()

        for i in range(len(procs)):
            if line(i) != "ready":
                raise RuntimeError(f"compile worker {orders[i]}: expected 'ready'")
        for proc in procs:  # start them together
            proc.stdin.write("go\n")
            proc.stdin.flush()
        out = []
        for i, names in enumerate(orders):
            times = {}
            for _ in names:
                r = json.loads(line(i))
                times[r["name"]] = (r["lower_s"], r["compile_s"])
            out.append(times)
        return out
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for log in logs:
            log.close()


def bench_compile(quick: bool) -> dict[str, Any]:
    """Compile times; the ratio to Adam is the median of paired rounds.

    Each round compiles Adam and our chain, and each round's ratio divides one by the
    other: the compile time of one program on this VM moved by up to 20% from one round to
    the next, and the two programs of a round move together (paired ratios of 5 rounds at
    999 leaves spread over 1.25-1.38x, single ratios up to 1.56x). At 100 and 1,000 leaves,
    the first round compiles the reference programs (only there), then our chain, then
    Adam; later rounds compile the two in a shuffled order. At 5,000 leaves, two processes
    pinned to one core each (XLA compiles a program on one thread) compile both programs at
    the same time, in opposite orders: core 0 Adam then our chain, core 1 our chain then
    Adam. Each core's ratio divides its two compiles, and the ratio is the geometric mean of
    the two cores' ratios (:func:`crossed_ratio`), so a program compiled first or second in
    its process, or on one core or the other, weighs the same on both sides. Both cores stay
    busy until the end (the process that finishes first compiles its last program again
    until the other is done), so no compile runs with a core to itself, and the section
    takes the sum of the two compiles (2-3 minutes on this VM) instead of twice the longer
    one, as in the two rounds of both at once, swapping cores, that it replaces (with one
    start of the two processes less, 20-40 s saved). On this VM Adam compiled about as fast
    at once as alone (999 leaves: 5.5 s against 5.4-5.6 s; 4,995: 66 s against 64-66 s); on
    an earlier VM both ran about 25% slower at once. One sample at 4,995 leaves is a poor
    one: four single rounds in a row, of one commit, read 1.29x, 1.39x, 1.14x and 1.09x,
    while Adam's own compile took 52-74 s (much of both compiles is spent in two XLA
    algorithms quadratic in the ~15,000 kernels, waiting on memory: see benchmarks/README.md).
    """
    out: dict[str, Any] = {}
    rng = np.random.default_rng(SEED)
    leaves = COMPILE_LEAVES["quick" if quick else "full"]
    # Untimed: the process's first compilation pays one-time costs that would land on
    # whichever program the shuffle puts first.
    compile_once(CHAIN_PROGRAMS["adam"], _zeros_tree(12))
    for n in leaves:
        shapes = layered_shapes(n)
        tree = _zeros_tree(n)
        concurrent = n in CONCURRENT
        names = [
            k
            for k in CHAIN_PROGRAMS
            if n <= MAX_LEAVES.get(k, n) and (not concurrent or k in ("adam", OURS))
        ]
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
        orders = []
        if concurrent:
            # One crossed round: each core compiles both programs, in opposite orders.
            gc.collect()
            orders = [names, names[::-1]]
            for cpu, times in enumerate(_crossed_round(orders, n)):
                for name in orders[cpu]:
                    runs[name].append(times[name])
                    lower, comp = times[name]
                    print(
                        f"  {len(shapes)} leaves, {name} (core {cpu}, the other core "
                        f"compiling too): lower {lower:.2f} s, compile {comp:.2f} s",
                        flush=True,
                    )
        for r in range(0 if concurrent else COMPILE_REPS.get(n, 1)):
            if r == 0:
                # The first compile at a size is slower (adam at 999 leaves: 4.9 s, then
                # 4.5 and 4.6): the references take it, else our chain; never Adam alone.
                order = [k for k in names if k not in ("adam", OURS)] + [OURS, "adam"]
            else:
                order = [["adam", OURS][i] for i in rng.permutation(2)]
            for name in order:
                gc.collect()
                runs[name].append(compile_once(CHAIN_PROGRAMS[name], tree))
                lower, comp = runs[name][-1]
                print(f"  {len(shapes)} leaves, {name}: lower {lower:.2f} s, compile {comp:.2f} s")
        res, totals = {}, {}
        for name, rs in runs.items():
            total = totals[name] = [a + b for a, b in rs]
            res[name] = {
                "lower_s": float(np.median([a for a, _ in rs])),
                "compile_s": float(np.median([b for _, b in rs])),
                "total_s": float(np.median(total)),
                "samples_total_s": [round(t, 3) for t in total],
            }
        for name in names:
            # Round by round (at once: core by core) against Adam's compile there.
            paired = [t / a for t, a in zip(totals[name], totals["adam"])]
            res[name]["paired_vs_adam"] = [round(x, 4) for x in paired]
            res[name]["vs_adam"] = crossed_ratio(paired) if concurrent else float(np.median(paired))
        out[str(len(shapes))] = {
            "leaves": len(shapes),
            "params": int(sum(np.prod(s) for s in shapes.values())),
            "reps": len(runs["adam"]),
            "concurrent": concurrent,
            "core_orders": orders,  # at once: per core, the programs in the order compiled
            "programs": res,
            "skipped": [k for k in CHAIN_PROGRAMS if k not in names],
            "target": TARGETS["compile"],
            "met": res[OURS]["vs_adam"] <= TARGETS["compile"],
        }
    return out


def crossed_ratio(paired: Sequence[float]) -> float:
    """The ratio of a crossed round: the geometric mean of the cores' ratios.

    A program compiled second in its process can take much less time than one compiled
    first (run 29, at 4,995 leaves: Adam 63 s first and 49 s second, our chain 86 s and
    67 s), and each core compiles one program first and the other second. If both speed
    up by one factor ``f``, the cores' ratios are the true ratio divided and multiplied by
    ``f`` (there 1.08x and 1.66x): their geometric mean is the true ratio, their median
    (for two, their mean) is too high by ``(f + 1/f) / 2``, 3% there.
    """
    return float(np.exp(np.mean(np.log(paired))))


def _rounds_note(size: dict[str, Any], name: str) -> str:
    """Each core's ratio, where the programs compiled at once (few samples, noisy)."""
    if not size["concurrent"] or name == "adam":
        return ""
    return " (" + ", ".join(f"{x:.2f}" for x in size["programs"][name]["paired_vs_adam"]) + ")"


def compile_table(section: dict[str, Any]) -> str:
    rows = []
    for _key, r in section.items():
        for name, p in r["programs"].items():
            rows.append(
                [
                    f"{r['leaves']:,}",
                    name,
                    f"{p['lower_s']:.2f}",
                    f"{p['compile_s']:.2f}",
                    f"{p['total_s']:.2f}",
                    f"{p['vs_adam']:.2f}" + _rounds_note(r, name),
                    ("yes" if r["met"] else "**no**") if name == OURS else "",
                ]
            )
        for name in r["skipped"]:
            note = SKIPPED_NOTE[name] if r["leaves"] > MAX_LEAVES[name] else "not run (at once)"
            rows.append([f"{r['leaves']:,}", name, "—", "—", note, "—", ""])
    headers = ["leaves", "program", "trace+lower s", "compile s", "total s", "× adam (paired)"]
    return markdown_table([*headers, f"≤ {TARGETS['compile']} × adam"], rows)


# ---------------------------------------------------------------------------
# Memory (one process per program)
# ---------------------------------------------------------------------------


def _release_freed_heap() -> None:
    """Returns the heap that compilation freed to the OS (glibc's ``malloc_trim``), so the
    peak of the steps that follow measures what they hold, not what the compiler left."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure includes the compiler's leftovers
        pass


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    """A memory figure of this process from ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_worker(name: str, quick: bool) -> dict[str, Any]:
    """Runs MEMORY_STEPS donated training steps of one program; its memory figures."""
    jax.config.update("jax_enable_compilation_cache", False)
    d, layers, vocab = MEMORY_TREE["quick" if quick else "full"]
    shapes = transformer_shapes(d, layers, vocab)
    grads = random_tree(shapes, jnp.float32, SEED)
    params = random_tree(shapes, jnp.float32, SEED + 1)
    tx = CHAIN_PROGRAMS[name]()
    state = tx.init(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    analysis = compiled.memory_analysis()
    params, state = compiled(params, state, grads)
    jax.block_until_ready((params, state))
    _release_freed_heap()
    before = _status_bytes("VmRSS")
    reset = _reset_peak_rss()
    for _ in range(MEMORY_STEPS):
        params, state = compiled(params, state, grads)
    jax.block_until_ready((params, state))
    grad_bytes = sum(x.nbytes for x in jax.tree.leaves(grads))
    return {
        "program": name,
        "steps_peak_rss_bytes": _status_bytes("VmHWM") if reset else None,
        "rss_before_steps_bytes": before,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "temp_bytes": None if analysis is None else int(analysis.temp_size_in_bytes),
        "grad_bytes": grad_bytes,
        "state_bytes": sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes")),
    }


def bench_memory(quick: bool) -> dict[str, Any]:
    # The three processes run at once: each measures its own peak (VmHWM), which the
    # others' work does not change (each holds about 1.5 GB at most).
    out: dict[str, Any] = {}
    procs = {
        name: subprocess.Popen(
            [sys.executable, __file__, "--memory-worker", name] + (["--quick"] if quick else []),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("adam", OURS, OPTAX_CHAIN)
    }
    for name, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker for {name} failed:\n{stderr[-3000:]}")
        out[name] = json.loads(stdout.strip().splitlines()[-1])
        peak = out[name]["steps_peak_rss_bytes"]
        print(f"  {name}: peak RSS of the steps {_bytes(peak or 0)}")
    base = out["adam"]
    for r in out.values():
        if r["steps_peak_rss_bytes"] and base["steps_peak_rss_bytes"]:
            r["steps_peak_vs_adam"] = r["steps_peak_rss_bytes"] / base["steps_peak_rss_bytes"]
        r["temp_over_grad"] = (r["temp_bytes"] or 0) / r["grad_bytes"]
    ours = out[OURS].get("steps_peak_vs_adam")
    return {
        "programs": out,
        "target": TARGETS["memory"],
        "met": None if ours is None else ours <= TARGETS["memory"],
    }


def memory_table(section: dict[str, Any]) -> str:
    rows = [
        [
            name,
            _bytes(r["steps_peak_rss_bytes"] or 0),
            f"{r.get('steps_peak_vs_adam', float('nan')):.3f}",
            _bytes(r["process_peak_rss_bytes"]),
            _bytes(r["temp_bytes"] or 0),
            f"{r['temp_over_grad']:.4f}",
        ]
        for name, r in section["programs"].items()
    ]
    headers = ["program", "peak RSS, 20 steps", "× adam", "peak RSS, process (incl. compile)"]
    return markdown_table([*headers, "XLA temp of the step", "temp / grad bytes"], rows)


# ---------------------------------------------------------------------------
# Dispatch ahead
# ---------------------------------------------------------------------------


def dispatch_transforms() -> dict[str, Callable[[], optax.GradientTransformation]]:
    """Every public transformation that takes a plain gradient tree, with its defaults."""
    return {
        "clip_by_value(1.0)": lambda: oc.clip_by_value(1.0),
        "clip_by_global_norm(1.0)": lambda: oc.clip_by_global_norm(1.0),
        "clip_by_leaf_norm(1.0)": lambda: oc.clip_by_leaf_norm(1.0),
        "clip_by_block_rms(1.0)": lambda: oc.clip_by_block_rms(1.0),
        "adaptive_grad_clip()": lambda: oc.adaptive_grad_clip(),
        "autoclip(10.0)": lambda: oc.autoclip(10.0),
        "zclip()": lambda: oc.zclip(),
        "quantile_clip()": lambda: oc.quantile_clip(),
        "adagc()": lambda: oc.adagc(),
        "spike_aware_clip()": lambda: oc.spike_aware_clip(),
        "skip_nonfinite()": lambda: oc.skip_nonfinite(),
        "skip_spikes()": lambda: oc.skip_spikes(),
        "monitor()": lambda: oc.monitor(),
        "zero_nonfinite()": lambda: oc.zero_nonfinite(),
    }


def bench_dispatch(quick: bool) -> dict[str, Any]:
    d, layers, vocab = DISPATCH_TREE["quick" if quick else "full"]
    shapes = transformer_shapes(d, layers, vocab)
    grads = random_tree(shapes, jnp.float32, SEED)
    out: dict[str, Any] = {}
    programs = {"adam alone": adam}
    programs.update(
        {
            f"chain({k}, adam)": (lambda m=m: optax.chain(m(), adam()))
            for k, m in dispatch_transforms().items()
            if not quick or k in DISPATCH_QUICK
        }
    )
    # Compiled first, two at a time (see bench_clip.compile_contenders); then each loop
    # runs alone.
    contenders = []
    for name, make in programs.items():
        tx = make()

        def step(params, state, grads, tx=tx):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        params = jax.tree.map(jnp.zeros_like, grads)
        contenders.append(Contender(name, step, (params, tx.init(params), grads)))
    largest = max(x.nbytes for x in jax.tree.leaves(grads))
    for c in compile_contenders(contenders, donate=(0, 1)):
        name, fn, (params, state, _) = c.contender.name, c.executable, c.contender.args
        analysis = fn.memory_analysis()
        temp = None if analysis is None else int(analysis.temp_size_in_bytes)
        params, state = jax.block_until_ready(fn(params, state, grads))  # warm up
        with jax.transfer_guard("disallow"):
            t0 = time.perf_counter()
            for _ in range(DISPATCH_STEPS):
                params, state = fn(params, state, grads)
            t1 = time.perf_counter()
            pending = not all(x.is_ready() for x in jax.tree.leaves(params))
            jax.block_until_ready((params, state))
            t2 = time.perf_counter()
        out[name] = {
            "dispatch_s": t1 - t0,
            "finish_s": t2 - t0,
            "dispatch_over_finish": (t1 - t0) / (t2 - t0),
            "pending_after_loop": pending,
            "temp_bytes": temp,
            "temp_over_largest_leaf": None if temp is None else temp / largest,
        }
    return {
        "tree_params": int(sum(np.prod(s) for s in shapes.values())),
        "largest_leaf_bytes": int(largest),
        "steps": DISPATCH_STEPS,
        "programs": out,
        "all_ran_ahead": all(r["pending_after_loop"] for r in out.values()),
        "no_leaf_copy_below": NO_COPY,
        "all_hold_no_leaf_copy": all(
            r["temp_over_largest_leaf"] is not None and r["temp_over_largest_leaf"] < NO_COPY
            for r in out.values()
        ),
    }


def dispatch_table(section: dict[str, Any]) -> str:
    def temp(r: dict[str, Any]) -> list[str]:
        if r.get("temp_bytes") is None:
            return ["—", "—"]
        return [_bytes(r["temp_bytes"]), f"{r['temp_over_largest_leaf']:.4f}"]

    rows = [
        [
            name,
            f"{1e3 * r['dispatch_s']:.1f}",
            f"{1e3 * r['finish_s']:.1f}",
            f"{r['dispatch_over_finish']:.3f}",
            "yes" if r["pending_after_loop"] else "**no**",
            *temp(r),
        ]
        for name, r in section["programs"].items()
    ]
    headers = ["program", "dispatch 100 steps, ms", "until done, ms", "ratio"]
    headers += ["last step pending after the loop", "XLA temp of the step", "temp / largest leaf"]
    return markdown_table(headers, rows)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compile time, memory and dispatch-ahead of chain(clipper, adam)."
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="small trees: a smoke run")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compile-worker", action="append", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--leaves", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad or not args.sections:
        parser.error(f"--sections: expected names from {','.join(SECTIONS)}, got {bad or '[]'}")
    check_out_path(parser, args.out)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_worker is not None:
        print(json.dumps(memory_worker(args.memory_worker, args.quick)))
        return 0
    if args.compile_worker is not None:
        compile_worker(args.compile_worker, args.leaves, args.cpu)
        return 0
    start = time.perf_counter()
    jax.config.update("jax_enable_compilation_cache", False)
    machine = {**machine_info(), "load_average_start": load_average()}
    print("# optaxclip compile time, memory and dispatch" + (" (--quick)" if args.quick else ""))
    print()
    print(report_machine(machine))
    record: dict[str, Any] = {"benchmark": "bench_perf", "quick": args.quick, "machine": machine}
    runners = {"compile": bench_compile, "memory": bench_memory, "dispatch": bench_dispatch}
    tables = {"compile": compile_table, "memory": memory_table, "dispatch": dispatch_table}
    for name in args.sections:
        print(f"\n## {name}\n", flush=True)
        record[name] = runners[name](args.quick)
        print()
        print(tables[name](record[name]), flush=True)
    record["wall_s"] = time.perf_counter() - start
    record["load_average_end"] = load_average()
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\ntotal wall time: {record['wall_s']:.1f} s; results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
