"""benchmarks/profile_step.py: the interval arithmetic on hand-made traces, and one run."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import profile_step  # noqa: E402


def test_kernel_kind_drops_the_instance_number():
    assert profile_step.kernel_kind("add_convert_fusion.293") == "add_convert_fusion"
    assert profile_step.kernel_kind("ynn_fusion") == "ynn_fusion"
    assert profile_step.kernel_kind("cond.17.1") == "cond"
    assert profile_step.kernel_kind("wrapped_reduce-window") == "wrapped_reduce-window"


def test_exclusive_times_subtract_nested_kernels():
    # A loop [0, 10) holding kernels [1, 3) and [4, 8), the second holding [5, 6); then a
    # kernel [12, 15) after the loop.
    events = [(0, 10, "while"), (1, 2, "a"), (4, 4, "b"), (5, 1, "c"), (12, 3, "d")]
    assert profile_step.exclusive_times(events) == {"while": 4, "a": 2, "b": 3, "c": 1, "d": 3}


def test_exclusive_times_of_one_name_add_up():
    events = [(0, 5, "k"), (5, 5, "k"), (20, 1, "k")]
    assert profile_step.exclusive_times(events) == {"k": 11}


def test_busy_time_is_the_union_of_intervals():
    # [0, 10) with [2, 4) inside, [8, 12) overlapping its end, then [20, 21).
    events = [(0, 10, "x"), (2, 2, "y"), (8, 4, "z"), (20, 1, "w")]
    assert profile_step.busy_ns(events) == 13
    assert profile_step.busy_ns([]) == 0


def test_summarize_call_keeps_the_window_and_leaves_waits_out():
    threads = {
        "tf_XLA/1": [(0, 4, "fusion.1"), (4, 2, profile_step._WAIT), (6, 3, "fusion.2")],
        "tf_XLA/2": [(1, 5, "ynn_fusion.7"), (50, 5, "ynn_fusion.8")],  # the last: after
    }
    s = profile_step.summarize_call((0, 10), threads)
    assert s["wall_ms"] == pytest.approx(1e-5)
    assert s["threads_busy_ms"] == pytest.approx({"tf_XLA/1": 7e-6, "tf_XLA/2": 5e-6})
    assert s["wait_ms"] == pytest.approx(2e-6)
    assert list(s["kernels"]) == ["fusion", "ynn_fusion"]
    assert s["kernels"]["fusion"] == {"count": 2, "thread_ms": pytest.approx(7e-6)}
    assert s["kernels"]["ynn_fusion"]["count"] == 1


def test_median_summary_takes_each_figure_over_the_calls():
    def call(wall, busy, kernels):
        return {"wall_ms": wall, "threads_busy_ms": busy, "wait_ms": wall / 10, "kernels": kernels}

    summaries = [
        call(10.0, {"a": 4.0, "b": 6.0}, {"clamp": {"count": 3, "thread_ms": 9.0}}),
        call(30.0, {"a": 8.0}, {"clamp": {"count": 3, "thread_ms": 2.0}}),
        call(
            20.0,
            {"a": 5.0, "b": 1.0},
            {"clamp": {"count": 3, "thread_ms": 4.0}, "ynn": {"count": 2, "thread_ms": 7.0}},
        ),
    ]
    m = profile_step.median_summary(summaries)
    assert m["calls"] == 3 and m["wall_ms"] == 20.0 and m["wait_ms"] == 2.0
    assert m["walls_ms"] == [10.0, 30.0, 20.0]
    assert m["threads_busy_ms"] == {"a": 5.0, "b": 1.0}  # b: 6, 0 (absent), 1
    # clamp: 9, 2, 4 -> 4; ynn ran in one call of three: left out.
    assert m["kernels"] == {"clamp": {"count": 3, "thread_ms": 4.0}}
    summaries[0]["kernels"]["ynn"] = {"count": 1, "thread_ms": 9.0}
    m = profile_step.median_summary(summaries)  # ynn: 9, 0, 7 -> 7, ahead of clamp
    assert list(m["kernels"]) == ["ynn", "clamp"] and m["kernels"]["ynn"]["count"] == 1


@pytest.mark.slow
def test_quick_run_profiles_every_program(tmp_path):
    out = tmp_path / "profile.json"
    programs = ["optax.adam", "optaxclip.clip_by_value"]
    args = ["--quick", "--out", str(out), "--tree", "transformer_f32", "--calls", "3"]
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "profile_step.py"), *args, "--programs", *programs],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert set(record["programs"]) == set(programs)
    # The allocator is set as in bench_clip's timed sections.
    assert record["steady_allocator"] is (platform.libc_ver()[0] == "glibc")
    for name, p in record["programs"].items():
        assert len(p["walls_ms"]) == 3
        assert p["calls"] == 3 and p["wall_ms"] == pytest.approx(sorted(p["walls_ms"])[1], abs=1e-3)
        assert p["kernels"] and all(k["count"] > 0 for k in p["kernels"].values()), name
        assert sum(k["thread_ms"] for k in p["kernels"].values()) > 0
        assert f"## {name}" in proc.stdout


def test_unknown_program_is_refused_with_the_known_names():
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "profile_step.py"), "--quick", "--programs", "nope"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 2
    assert "unknown programs ['nope']" in proc.stderr and "optax.adam" in proc.stderr


def test_only_the_programs_asked_for_are_built(monkeypatch):
    import bench_clip
    import jax.numpy as jnp

    built, real = [], bench_clip.transform_contender
    monkeypatch.setattr(
        bench_clip, "transform_contender", lambda name, *a: built.append(name) or real(name, *a)
    )
    grads = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    factories = bench_clip.contender_factories(grads, grads, True)
    assert built == [] and "optax.adam" in factories
    contender = factories["optax.adam"]()
    assert built == ["optax.adam"] and contender.name == "optax.adam"
    assert [c.name for c in bench_clip.make_contenders(grads, grads, True)] == list(factories)
