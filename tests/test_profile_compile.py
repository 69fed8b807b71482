"""benchmarks/profile_compile.py: thread times and difference tables on hand-made traces,
and one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import profile_compile  # noqa: E402


def test_thread_kind_and_event_name():
    assert profile_compile.thread_kind("tf_xla-cpu-codegen/-5329813957224434623") == "codegen"
    assert profile_compile.thread_kind("tf_PjRtCompilerThreadPool/2058") == "compiler"
    assert profile_compile.thread_kind("python") == "main"
    assert profile_compile.thread_kind("tf_XLAEigen/7") is None
    # The thread that lowers, or waits for the compile, is the main one by any name.
    assert profile_compile.thread_kind("MainThread", {"lower_sharding_computation"}) == "main"
    assert profile_compile.thread_kind("MainThread", {"backend_compile_and_load"}) == "main"
    assert profile_compile.thread_kind("MainThread", {"fusion.1"}) is None
    name = "HLO passes after layout assignment (jit_update_fn)"
    assert profile_compile.event_name(name) == "HLO passes after layout assignment"
    assert profile_compile.event_name("copy-insertion") == "copy-insertion"


def test_thread_times_are_exclusive_summed_per_kind_without_the_wait():
    lines = [
        # main: lowering [0, 4), then the wait for the compile [4, 20) with a nested [5, 6).
        (
            "python",
            [
                (0, 4_000_000, "lower_sharding_computation"),
                (4_000_000, 16_000_000, "backend_compile_and_load"),
                (5_000_000, 1_000_000, "PjitFunction(add)"),
            ],
        ),
        # compiler: a pipeline [0, 10) holding a pass [2, 8).
        (
            "tf_PjRtCompilerThreadPool/1",
            [(0, 10_000_000, "HLO passes (jit_f)"), (2_000_000, 6_000_000, "copy-insertion")],
        ),
        # two codegen threads: their times add up under one name.
        ("tf_xla-cpu-codegen/1", [(0, 3_000_000, "FusionCompiler::Compile")]),
        ("tf_xla-cpu-codegen/2", [(1_000_000, 2_000_000, "FusionCompiler::Compile")]),
        ("tf_XLAEigen/3", [(0, 9_000_000, "fusion.1")]),  # not a compiling thread
    ]
    assert profile_compile.thread_times(lines) == pytest.approx(
        {
            "main: lower_sharding_computation": 4.0,
            "main: PjitFunction(add)": 1.0,
            "compiler: HLO passes": 4.0,
            "compiler: copy-insertion": 6.0,
            "codegen: FusionCompiler::Compile": 5.0,
        }
    )


def test_median_times_count_an_absent_event_as_zero():
    rounds = [{"a": 1.0, "b": 5.0}, {"a": 3.0}, {"a": 2.0, "b": 4.0}]
    assert profile_compile.median_times(rounds) == {"a": 2.0, "b": 4.0}


def test_difference_rows_add_up_to_the_total():
    base = {"x": 10.0, "y": 5.0, "z": 1.0, "w": 2.0}
    other = {"x": 16.0, "y": 4.0, "z": 3.0, "v": 1.0}
    rows = profile_compile.difference_rows(base, other, top=2)
    # Differences: x +6, z +2, v +1, y -1, w -2; in all +6 (18 -> 24).
    assert rows == [
        ["x", "10.0", "16.0", "+6.0", "100%"],
        ["z", "1.0", "3.0", "+2.0", "33%"],
        ["all other events (3)", "7.0", "5.0", "-2.0", "-33%"],
        ["total thread time", "18.0", "24.0", "+6.0", "100%"],
    ]
    # No difference at all: shares are left blank rather than divided by zero.
    same = profile_compile.difference_rows(base, base, top=10)
    assert [r[4] for r in same] == ["—"] * len(same)


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / "profile_compile.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.slow
def test_quick_run_profiles_both_programs(tmp_path):
    out = tmp_path / "compile.json"
    programs = ["adam", "chain(oc.clip_by_global_norm, adam)"]
    proc = _script("--quick", "--out", str(out), "--programs", *programs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["quick"] is True and record["rounds"] == 1 and record["leaves"] == 15
    assert list(record["programs"]) == programs
    assert record["programs"]["adam"]["paired_ratio"] == 1.0
    for name, p in record["programs"].items():
        assert p["compile_s"] > 0 and p["lower_s"] > 0, name
        # The compiler's threads; the main thread's events too, unless the profiler missed
        # them (once, in a CI run under load, for Adam's 30 ms of lowering).
        kinds = {k.split(":")[0] for k in p["thread_ms"]}
        assert {"compiler", "codegen"} <= kinds <= {"main", "compiler", "codegen"}, (name, kinds)
        assert any("copy-insertion" in k for k in p["thread_ms"]), name
        compiler = sum(v for k, v in p["thread_ms"].items() if k.startswith("compiler:"))
        assert 0 < compiler <= 1e3 * p["compile_s"], name
    assert "### chain(oc.clip_by_global_norm, adam): thread time against adam" in proc.stdout


def test_unknown_or_repeated_programs_are_refused():
    proc = _script("--quick", "--programs", "adam", "nope")
    assert proc.returncode == 2
    assert "unknown programs ['nope']" in proc.stderr
    assert "chain(oc.clip_by_global_norm, adam)" in proc.stderr
    proc = _script("--quick", "--programs", "adam", "adam")
    assert proc.returncode == 2 and "a program named twice" in proc.stderr
