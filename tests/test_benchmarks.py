"""The benchmark scripts run end to end (figures are read by people, never asserted on)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "bench_clip.py"
ADAPTIVE_SCRIPT = BENCHMARKS / "bench_adaptive.py"


def _run(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_benchmark_rejects_bad_options():
    proc = _run(SCRIPT, "--reps", "0")
    assert proc.returncode == 2 and "--reps: expected a positive integer, got 0" in proc.stderr


ADAPTIVE_METHODS = {
    "clip_by_global_norm",
    "autoclip",
    "autoclip_window",
    "zclip",
    "quantile_clip",
    "adagc_warmup",
    "adagc",
    "spike_aware_clip",
    "skip_spikes",
    "skip_spikes_zclip",
    "chain_skip_spikes_zclip",
    "optax_clip_by_global_norm",
}


RUN_SCRIPT = BENCHMARKS / "run.py"
FIXED_PAIRS = {
    "optaxclip.clip_by_global_norm",
    "optaxclip.clip_by_value",
    "optaxclip.clip_by_block_rms",
    "optaxclip.clip_by_leaf_norm",
    "optaxclip.adaptive_grad_clip",
    "clip_by_global_norm, rescue removed",
}


def test_run_quick_writes_every_section(tmp_path):
    # One command runs bench_perf, bench_clip and bench_adaptive, then tabulates the targets.
    proc = _run(RUN_SCRIPT, "--quick", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((tmp_path / "run.json").read_text())
    assert {"bench_perf", "bench_clip", "bench_adaptive"} == set(run["section_wall_s"])
    wheres = {t["where"] for t in run["targets"]}
    assert {"transformer_f32", "small_leaves_f32", "transformer_bf16"} <= wheres
    memory_and_dispatch = {"memory, 20 donated steps", "memory, every chain's step"}
    assert memory_and_dispatch | {"dispatch, 100 steps"} <= wheres
    assert any(w.startswith("compile, ") for w in wheres)
    assert all(isinstance(t["met"], bool) and t["ratio"] > 0 for t in run["targets"])
    # The rescue's target comes from paired rounds of its own, with an interval.
    rescue = [t for t in run["targets"] if t["what"] == "clip_by_global_norm / rescue removed"]
    assert len(rescue) == 3
    for t in rescue:
        lo, hi = t["ci95"]
        assert lo <= t["ratio"] <= hi and t["rounds"] == 10 and t["met"] == (lo <= 1.0)
    assert "# Targets" in proc.stdout and "| where |" in proc.stdout
    # Adam after a runtime scalar, beside the chain target of every tree with the chains.
    refs = {(r["where"], r["what"]) for r in run["references"] if r["ratio"] > 0}
    scale = "chain(x * runtime scalar, adam) / adam"
    # And clip_by_value against optax.clip with the same statistics computed by hand.
    by_hand = "optaxclip.clip_by_value / (optax.clip + the same statistics (jnp))"
    trees = ("transformer_f32", "transformer_bf16")
    assert refs == {(t, r) for t in trees for r in (scale, by_hand)}

    clip = json.loads((tmp_path / "bench_clip.json").read_text())
    for key, tree in clip["trees"].items():
        assert tree["clip_max_rel_diff_vs_optax"] < (1e-2 if tree["dtype"] == "bfloat16" else 1e-5)
        agc = set() if tree["leaves"] <= 500 else {"optaxclip.adaptive_grad_clip"}
        assert set(tree["pair_max_rel_diff"]) == FIXED_PAIRS - agc
        tol = 2e-2 if tree["dtype"] == "bfloat16" else 1e-5
        assert max(tree["pair_max_rel_diff"].values()) < tol, tree["pair_max_rel_diff"]
        # The by-hand statistics are ours (bfloat16: optax's norm sums in bfloat16).
        by_hand_diff = tree["value_stats_by_hand_max_rel_diff"]
        if key == "small_leaves_f32":  # run.py times no chains there, nor this reference
            assert by_hand_diff is None
        else:
            assert by_hand_diff < tol, by_hand_diff

    adaptive = json.loads((tmp_path / "bench_adaptive.json").read_text())
    assert set(adaptive["methods"]) == ADAPTIVE_METHODS
    for group in adaptive["groups"].values():
        assert group["baseline_vs_optax_max_rel_diff"] < 1e-5
        for key in ADAPTIVE_METHODS:
            r = group["contenders"][key]
            assert r["median_ms"] > 0 and r["compile_s"] > 0 and "paired_vs_baseline" in r
    assert adaptive["groups"]["chain"]["contenders"]["skip_spikes_zclip"]["reference"] == "zclip"

    # The timed sections keep freed memory in glibc's heap (see bench_clip.steady_allocator).
    glibc = platform.libc_ver()[0] == "glibc"
    assert clip["machine"]["steady_allocator"] is glibc
    assert adaptive["machine"]["steady_allocator"] is glibc

    perf = json.loads((tmp_path / "bench_perf.json").read_text())
    assert perf["dispatch"]["all_ran_ahead"]
    dispatch = perf["dispatch"]
    assert "chain(clip_by_value(1.0), adam)" in dispatch["programs"]
    assert dispatch["all_hold_no_leaf_copy"] and 0 < dispatch["no_leaf_copy_below"] <= 0.25
    for name, program in dispatch["programs"].items():
        assert 0 <= program["temp_over_largest_leaf"] < dispatch["no_leaf_copy_below"], name
    for program in perf["memory"]["programs"].values():
        assert program["steps_peak_rss_bytes"] > program["grad_bytes"]
    # Programs compiled at once: each core compiles both, in the other core's reverse order,
    # and the ratio is the geometric mean of the cores' ratios.
    at_once = [s for s in perf["compile"].values() if s["concurrent"]]
    assert at_once and all(s["reps"] == len(s["core_orders"]) == 2 for s in at_once)
    for size in at_once:
        first, second = size["core_orders"]
        assert sorted(first) == ["adam", "chain(oc.clip_by_global_norm, adam)"]
        assert second == first[::-1]
        ours = size["programs"]["chain(oc.clip_by_global_norm, adam)"]
        assert len(ours["paired_vs_adam"]) == size["reps"]
        r0, r1 = ours["paired_vs_adam"]
        assert ours["vs_adam"] == pytest.approx((r0 * r1) ** 0.5, rel=1e-3)


def test_crossed_ratio_cancels_a_factor_shared_by_the_second_compiles():
    sys.path.insert(0, str(BENCHMARKS))
    import bench_perf

    # True ratio 1.25; each process compiles its second program 1.3x faster.
    true, f = 1.25, 1.3
    paired = [true / f, true * f]  # core 0: Adam first; core 1: our chain first
    assert bench_perf.crossed_ratio(paired) == pytest.approx(true)
    assert sorted(paired)[0] < true < float(sum(paired) / 2)  # the mean would be too high
    assert bench_perf.crossed_ratio([1.2]) == pytest.approx(1.2)


def test_clip_with_stats_by_hand_records_what_clip_by_value_records():
    sys.path.insert(0, str(BENCHMARKS))
    import bench_clip
    import jax.numpy as jnp

    import optaxclip as oc

    # Hand-computed: norm sqrt(9 + 0.25 + 16 + 1), largest 4 (scale 2/4), 2 of 4 entries clip.
    g = {"a": jnp.array([-3.0, 0.5]), "b": jnp.array([4.0, 1.0])}
    tx = bench_clip.optax_clip_with_stats(2.0)
    out, stats = tx.update(g, tx.init(g))
    np.testing.assert_array_equal(out["a"], [-2.0, 0.5])
    np.testing.assert_array_equal(out["b"], [2.0, 1.0])
    assert float(stats["norm"]) == pytest.approx(26.25**0.5, rel=1e-6)
    assert float(stats["scale"]) == 0.5 and float(stats["clipped"]) == 0.5
    ours = oc.clip_by_value(2.0)
    assert bench_clip.stats_by_hand_difference(ours.update(g, ours.init(g)), (out, stats)) < 1e-6
    # Nothing above the bound: scale 1, nothing clipped.
    loose = bench_clip.optax_clip_with_stats(5.0)
    _, stats = loose.update(g, loose.init(g))
    assert float(stats["scale"]) == 1.0 and float(stats["clipped"]) == 0.0


def test_bench_perf_rejects_bad_sections():
    proc = _run(BENCHMARKS / "bench_perf.py", "--sections", "compile,speed")
    assert proc.returncode == 2 and "--sections" in proc.stderr and "speed" in proc.stderr


def test_bench_adaptive_rejects_bad_options():
    proc = _run(ADAPTIVE_SCRIPT, "--reps", "0")
    assert proc.returncode == 2 and "--reps: expected a positive integer, got 0" in proc.stderr


def test_paired_median_interval_tells_a_one_percent_cost_from_none():
    sys.path.insert(0, str(BENCHMARKS))
    import bench_clip

    # 200 rounds with the spread of this VM's paired ratios (3% standard deviation).
    noise = np.random.default_rng(1).normal(0.0, 0.03, 200)
    median, lo, hi = bench_clip.paired_median_ci(1.0 + noise)
    assert lo <= median <= hi and lo <= 1.0 <= hi and hi - lo < 0.02
    median, lo, hi = bench_clip.paired_median_ci(1.01 + noise)
    assert lo > 1.0
    assert bench_clip.paired_median_ci([1.5] * 20) == (1.5, 1.5, 1.5)


@pytest.mark.parametrize("settle", ["each", "unit"])
def test_round_robin_times_each_pair_back_to_back(settle):
    sys.path.insert(0, str(BENCHMARKS))
    import gc

    import bench_clip

    log: list[str] = []

    def program(name: str) -> bench_clip.Compiled:
        run = lambda: log.append(name) or np.zeros(())
        return bench_clip.Compiled(bench_clip.Contender(name, run, ()), run, 0.0, 0.0)

    names = ["base", "a", "b", "c"]
    pairs = {"a": "base", "b": "base"}
    programs = [program(n) for n in names]
    times = bench_clip.time_round_robin(programs, 5, 1, settle=settle, pairs=pairs)
    assert gc.isenabled()
    assert {n: len(t) for n, t in times.calls.items()} == {"base": 10, "a": 5, "b": 5, "c": 5}
    assert all(len(times.rounds[n]) == 5 for n in names)
    assert set(times.adjacent) == {"a", "b"} and all(len(v) == 5 for v in times.adjacent.values())
    np.testing.assert_array_equal(times.per_round("a", "base"), times.adjacent["a"])
    same_round = np.asarray(times.rounds["c"]) / np.asarray(times.rounds["base"])
    np.testing.assert_array_equal(times.per_round("c", "base"), same_round)
    # After the warm-up (one call each), every unit is its programs back to back, each
    # timed call after an untimed one of its own ("each") or the pair after one untimed
    # call of its first program ("unit"): a pair in either order, or a single program.
    rest, orders = log[len(names) :], set()
    while rest:
        if rest[0] == "c":
            assert rest[:2] == ["c", "c"]
            rest = rest[2:]
            continue
        if settle == "each":
            first, again, second, twice = rest[:4]
            assert second == twice
            rest = rest[4:]
        else:
            first, again, second = rest[:3]
            rest = rest[3:]
        assert first == again and {first, second} in ({"a", "base"}, {"b", "base"})
        orders.add((first, second))
    assert ("base", "a") in orders and ("a", "base") in orders  # both orders occur
    with pytest.raises(ValueError, match="settle must be"):
        bench_clip.time_round_robin(programs, 1, 0, settle=True)
