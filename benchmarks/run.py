"""Every optaxclip benchmark in one command, and one table of the performance targets.

Run from the repository root::

    python benchmarks/run.py            # full run: 6-9 minutes on 2 CPU cores
    python benchmarks/run.py --quick    # smoke run: small trees, about a minute

It runs, in order, ``bench_perf.py`` (compile time at 100/1,000/5,000 leaves, peak memory of
donated training steps, dispatch-ahead of 100 steps), ``bench_clip.py`` (every fixed-threshold
clipper against its optax equivalent on three trees, the bandwidth floors, the chain with
Adam, the cost of the overflow rescue; Adam and the chains on the 2,000-leaf tree are left
out, a minute of compilation: ``bench_clip.py --small-tree-chains`` times them) and
``bench_adaptive.py`` (the adaptive methods and
the guards against ``clip_by_global_norm``); each prints its own markdown tables and writes
its JSON under ``benchmarks/results/``. This script then prints every target with the
measured figure and writes them all to ``benchmarks/results/run.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_adaptive
import bench_clip
import bench_perf
from bench_clip import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
REPS = 20  # timed calls per program in the runtime benchmarks (their own default is 30)


def targets(perf: dict[str, Any], clip: dict[str, Any], adaptive: dict[str, Any]) -> list[dict]:
    """One row per target: what, measured, target, met."""
    rows = []
    for key, tree in clip["trees"].items():
        for what, t in tree["targets"].items():
            rows.append({"where": key, "what": what, **t})
    for gname, group in adaptive["groups"].items():
        for r in group["contenders"].values():
            if r["target"] is not None:
                rows.append(
                    {
                        "where": f"adaptive, {gname}",
                        "what": f"{r['label']} / {r['reference']}",
                        "ratio": r["paired_vs_baseline"]["median"],
                        "target": r["target"],
                        "met": r["verdict"] == "within",
                    }
                )
    for c in perf.get("compile", {}).values():
        ours = c["programs"][bench_perf.OURS]
        rows.append(
            {
                "where": f"compile, {c['leaves']:,} leaves",
                "what": "chain(oc.clip_by_global_norm, adam) / adam, trace+lower+compile",
                "ratio": ours["vs_adam"],
                "target": c["target"],
                "met": c["met"],
            }
        )
    if "memory" in perf:
        ours = perf["memory"]["programs"][bench_perf.OURS]
        rows.append(
            {
                "where": "memory, 20 donated steps",
                "what": "peak RSS of chain(oc.clip_by_global_norm, adam) / adam's",
                "ratio": ours.get("steps_peak_vs_adam", float("nan")),
                "target": perf["memory"]["target"],
                "met": bool(perf["memory"]["met"]),
            }
        )
    if "dispatch" in perf:
        d = perf["dispatch"]
        pending = sum(r["pending_after_loop"] for r in d["programs"].values())
        rows.append(
            {
                "where": "dispatch, 100 steps",
                "what": "programs whose last step was still pending when the loop returned",
                "ratio": pending / len(d["programs"]),
                "target": 1.0,
                "met": d["all_ran_ahead"],
            }
        )
        temps = [r.get("temp_over_largest_leaf") for r in d["programs"].values()]
        if all(t is not None for t in temps):
            no_copy = sum(t < d["no_leaf_copy_below"] for t in temps)
            rows.append(
                {
                    "where": "memory, every chain's step",
                    "what": "programs whose XLA temp is under 1/4 of the largest leaf",
                    "ratio": no_copy / len(temps),
                    "target": 1.0,
                    "met": d["all_hold_no_leaf_copy"],
                }
            )
    return rows


def references(clip: dict[str, Any]) -> list[dict]:
    """Ratios reported beside the targets because they bear on one
    (``bench_clip.tree_references``)."""
    return [
        {"where": key, "what": what, "ratio": ratio}
        for key, tree in clip["trees"].items()
        for what, ratio in tree.get("references", {}).items()
    ]


def targets_table(rows: list[dict]) -> str:
    return markdown_table(
        ["where", "what", "measured", "target", "met"],
        [
            [
                r["where"],
                r["what"],
                f"{r['ratio']:.3f}"
                + ("" if "ci95" not in r else " ({:.3f}–{:.3f})".format(*r["ci95"])),
                f"{'=' if r['target'] == 1.0 and r['what'].startswith('programs') else '≤'} "
                f"{r['target']:.2f}" + ("" if "ci95" not in r else " within the 95% interval"),
                "yes" if r["met"] else "**no**",
            ]
            for r in rows
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run every optaxclip benchmark.")
    parser.add_argument("--quick", action="store_true", help="small trees: a smoke run")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    quick = ["--quick"] if args.quick else []
    start = time.perf_counter()
    paths = {name: args.out_dir / f"{name}.json" for name in ("bench_perf", "bench_clip")}
    paths["bench_adaptive"] = args.out_dir / "bench_adaptive.json"
    walls = {}
    for name, module, extra in (
        ("bench_perf", bench_perf, []),
        ("bench_clip", bench_clip, ["--reps", str(REPS), "--no-small-tree-chains"]),
        ("bench_adaptive", bench_adaptive, ["--reps", str(REPS)]),
    ):
        t0 = time.perf_counter()
        status = module.main([*quick, *extra, "--out", str(paths[name])])
        walls[name] = time.perf_counter() - t0
        if status:
            return status
        print(f"\n[{name}: {walls[name]:.0f} s]\n", flush=True)
    perf, clip, adaptive = (json.loads(paths[n].read_text()) for n in paths)
    rows = targets(perf, clip, adaptive)
    wall = time.perf_counter() - start
    print("\n# Targets\n")
    print(targets_table(rows))
    met = sum(r["met"] for r in rows)
    print(f"\n{met} of {len(rows)} targets met; total wall time {wall:.0f} s")
    refs = references(clip)
    if refs:
        print("\nReferences, not targets (paired medians):\n")
        print(
            markdown_table(
                ["where", "what", "measured"],
                [[r["where"], r["what"], f"{r['ratio']:.3f}"] for r in refs],
            )
        )
    record = {
        "quick": args.quick,
        "machine": perf["machine"],
        "wall_s": wall,
        "section_wall_s": walls,
        "targets": rows,
        "references": refs,
        "results": {n: str(p) for n, p in paths.items()},
    }
    (args.out_dir / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"results written to {args.out_dir / 'run.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
