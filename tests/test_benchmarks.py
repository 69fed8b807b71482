"""The benchmark scripts run end to end (figures are read by people, never asserted on)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def test_benchmark_quick_run_writes_every_tree(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(SCRIPT, "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["trees"]) == {"transformer_f32", "small_leaves_f32", "transformer_bf16"}
    for tree in results["trees"].values():
        assert tree["clip_max_rel_diff_vs_optax"] < (1e-2 if tree["dtype"] == "bfloat16" else 1e-5)
        assert "optaxclip.clip_by_global_norm" in tree["contenders"]
    assert "| contender |" in proc.stdout


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
    "optax_clip_by_global_norm",
}


def test_bench_adaptive_quick_run_writes_every_method(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(ADAPTIVE_SCRIPT, "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["methods"]) == ADAPTIVE_METHODS
    assert set(results["groups"]) == {"update", "chain"}
    for name, group in results["groups"].items():
        contenders = group["contenders"]
        assert ADAPTIVE_METHODS <= set(contenders), name
        assert group["baseline_vs_optax_max_rel_diff"] < 1e-5
        for key in ADAPTIVE_METHODS:
            r = contenders[key]
            assert r["median_ms"] > 0 and r["compile_s"] > 0 and "paired_vs_baseline" in r
    assert "adam" in results["groups"]["chain"]["contenders"]
    spam = results["groups"]["update"]["contenders"]["spike_aware_clip"]
    assert spam["state_over_grad"] >= 1.0 and "temp_bytes" in spam
    assert "| program |" in proc.stdout


def test_bench_adaptive_rejects_bad_options():
    proc = _run(ADAPTIVE_SCRIPT, "--reps", "0")
    assert proc.returncode == 2 and "--reps: expected a positive integer, got 0" in proc.stderr
