"""The benchmark script runs end to end (figures are read by people, never asserted on)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_clip.py"


def test_benchmark_quick_run_writes_every_tree(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["trees"]) == {"transformer_f32", "small_leaves_f32", "transformer_bf16"}
    for tree in results["trees"].values():
        assert tree["clip_max_rel_diff_vs_optax"] < (1e-2 if tree["dtype"] == "bfloat16" else 1e-5)
        assert "optaxclip.clip_by_global_norm" in tree["contenders"]
    assert "| contender |" in proc.stdout


def test_benchmark_rejects_bad_options():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--reps", "0"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2 and "--reps: expected a positive integer, got 0" in proc.stderr
