"""Every method sharded five ways equals the unsharded run (8 simulated CPU devices).

Modes: ``shard_map`` with ``partition_specs`` (a tree mixing row-, column- and fully-sharded
leaves with replicated ones), ``shard_map`` with ``axis_name``, ``pmap``, and ``jax.jit`` with
``NamedSharding`` inputs on meshes with ``AxisType.Auto`` and ``AxisType.Explicit`` axes. Each
stream has a spike and a NaN confined to one device's shard. The work runs in two
subprocesses (dist_methods_worker.py), so this process keeps its single device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import once_per_session, run_json_workers

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("dist_methods_worker.py")
SHARD_MAP_MODES = ["partition_specs", "axis_name", "pmap"]
# Collective counts per method on a 100-leaf tree over 3 distinct axis sets (+ replicated).
AXIS_SETS = 3
GSPMD_MODES = ["gspmd_auto", "gspmd_explicit"]
METHODS = [
    "clip_by_value",
    "clip_by_global_norm",
    "clip_by_leaf_norm",
    "clip_by_block_rms",
    "adaptive_grad_clip",
    "autoclip",
    "autoclip_window",
    "zclip",
    "quantile_clip",
    "adagc",
    "spike_aware_clip",
    "skip_nonfinite",
    "zero_nonfinite",
    "error_if_nonfinite",
    "skip_spikes",
    "clip_by_group_norm",
    "monitor",
    "per_example_clip",
]


@pytest.fixture(scope="session")
def results(tmp_path_factory) -> dict:
    return once_per_session(tmp_path_factory, "distributed_methods", _run_workers)


def _run_workers(directory) -> dict:
    del directory
    # Grouped by tree, so that each process computes each method's unsharded reference once:
    # SHAPES (partition_specs, GSPMD) and SHAPES_ALL (axis_name, pmap).
    modes = [["partition_specs", *GSPMD_MODES], ["axis_name", "pmap", "collectives"]]
    return run_json_workers(WORKER, modes)


def _result(results, method, mode) -> dict:
    r = results[f"{method}/{mode}"]
    assert "error" not in r, r.get("error")
    return r


@pytest.mark.parametrize("mode", SHARD_MAP_MODES + GSPMD_MODES)
@pytest.mark.parametrize("method", METHODS)
def test_sharded_equals_unsharded(results, method, mode):
    r = _result(results, method, mode)
    assert r["diff"] <= 1e-6, r  # updates, NaN where the reference has NaN
    assert r["stat_diff"] <= 1e-6, r  # every ClipStats field, every step
    if method not in ("error_if_nonfinite", "monitor"):  # finite stream / clips nothing
        assert r["num_clipped"] > 0  # the stream does clip, so equality means something
        assert r["num_nonfinite"] == 1  # the NaN on one shard was seen


@pytest.mark.parametrize("mode", SHARD_MAP_MODES)
@pytest.mark.parametrize("method", METHODS)
def test_every_shard_takes_the_same_decision(results, method, mode):
    # ClipStats gathered from all 8 devices after every step: identical rows.
    assert _result(results, method, mode)["same_on_every_shard"]


@pytest.mark.parametrize("mode", GSPMD_MODES)
@pytest.mark.parametrize("method", [m for m in METHODS if m != "per_example_clip"])
def test_outputs_keep_the_input_sharding(results, method, mode):
    # Updates (and spike_aware_clip's P-sized state) keep each leaf's NamedSharding; the
    # scalar state (and AdaGC's per-leaf vector) is replicated.
    assert _result(results, method, mode)["kept_sharding"]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "per_example_clip"])
def test_one_collective_per_distinct_axis_set(results, method):
    r = _result(results, method, "collectives")
    assert r["diff"] <= 1e-6  # clip_by_global_norm's 100-leaf sharded update is right
    counts = r["counts"]
    # Counted in the jaxpr (cond branches left out: spike_aware_clip's statistics, taken
    # past its gate): every norm's ordinary pass issues one psum per axis set, and its
    # rescue loop, which runs on overflow/underflow steps alone, one more.
    if method == "clip_by_value":
        # plus the largest magnitude (pmax); its count runs in a branch, only when some
        # entry is above the bound
        assert counts == {"psum": 2 * AXIS_SETS, "pmax": AXIS_SETS}
    elif method == "adaptive_grad_clip":
        # unit norms: one psum per axis set sharding a reduced dimension ("x" and ("x", "y")
        # here: columns are the units); units of column-sharded leaves differ over "y", so
        # the rescue decision (pmax, taken once, on the ordinary trip) and the statistics
        # over them are shared over "y": the unit sums (psum) on the ordinary trip and again
        # in the rescue loop, the norm (pmax + psum), the clipped count (psum), the smallest
        # scale (pmin)
        assert counts == {"psum": 2 + 2 + 2, "pmax": 1 + 1, "pmin": 1}
    else:
        assert counts == {"psum": 2 * AXIS_SETS}
