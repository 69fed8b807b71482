"""benchmarks/probe_rescue.py: the variants compute the plain per-leaf clip, and one run."""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import probe_rescue  # noqa: E402


def test_groups_are_consecutive_leaves_of_at_least_the_size():
    assert probe_rescue._groups([4, 4, 10, 1, 1, 1], 8) == [[0, 1], [2], [3, 4, 5]]
    assert probe_rescue._groups([100], 8) == [[0]]
    assert probe_rescue._groups([1, 1, 1], 8) == [[0, 1, 2]]


def test_every_variant_computes_the_plain_per_leaf_clip():
    # Leaf norms 5 (3-4-5: clipped to norm 1), 0.5 (kept) and 13 (5-12-13, clipped); the
    # groups of 8 bytes put the first two leaves in one group and the third in another.
    leaves = [
        jnp.array([3.0, 4.0]),
        jnp.array([0.3, 0.4]),
        jnp.array([[5.0], [12.0]]),
    ]
    expected = [np.array([0.6, 0.8]), np.array([0.3, 0.4]), np.array([[5 / 13], [12 / 13]])]
    names = list(probe_rescue.variants(group_bytes=8))
    assert names[0] == probe_rescue.PLAIN and len(names) == 6
    for name, fn in probe_rescue.variants(group_bytes=8).items():
        out, _ = jax.jit(fn)(leaves)
        for got, want in zip(out, expected):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, err_msg=name)


def test_the_extra_outputs_are_the_statistics_and_the_untouched_factors():
    leaves = [jnp.array([3.0, 4.0]), jnp.array([0.3, 0.4])]
    fns = probe_rescue.variants(group_bytes=8)
    smallest, fraction = jax.jit(fns["statistics beside"])(leaves)[1]
    assert float(smallest) == pytest.approx(0.2) and float(fraction) == pytest.approx(0.5)
    factors = jax.jit(fns["rescue loop beside"])(leaves)[1]
    np.testing.assert_allclose(np.asarray(factors), [0.2, 1.0], rtol=1e-6)


@pytest.mark.slow
def test_quick_run_times_every_variant_against_plain(tmp_path):
    out = tmp_path / "probe.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "probe_rescue.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    names = [*probe_rescue.variants(record["group_bytes"]), probe_rescue.OURS]
    assert list(record["variants"]) == names
    assert record["reps"] == 5
    # The allocator is set as in bench_clip's timed sections.
    assert record["machine"]["steady_allocator"] is (platform.libc_ver()[0] == "glibc")
    for name, r in record["variants"].items():
        assert r["max_rel_diff_vs_plain"] <= 1e-6, name
        assert len(r["samples_ms"]) >= record["reps"]
        if name == probe_rescue.PLAIN:
            assert "vs_plain" not in r
        else:
            ratio = r["vs_plain"]
            assert math.isfinite(ratio["median"]) and ratio["median"] > 0
            assert ratio["q25"] <= ratio["median"] <= ratio["q75"]
        assert f"| {name} |" in proc.stdout
