"""Cross-device norms (axis_name, partition_specs) on 8 simulated CPU devices (every method,
five ways: test_distributed_methods.py).

The checks run in a subprocess (dist_worker.py) so the device count of this process, and of
every other test, stays as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import once_per_session, run_json_workers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def results(tmp_path_factory) -> dict:
    return once_per_session(tmp_path_factory, "distributed", _run_worker)


def _run_worker(directory) -> dict:
    del directory
    return run_json_workers(Path(__file__).with_name("dist_worker.py"), [[]])


@pytest.mark.parametrize("scale", ["1", "1e+30", "1e-30"])
@pytest.mark.parametrize("how", ["partition_specs", "axis_name"])
def test_sharded_global_norm_equals_unsharded(results, how, scale):
    sharded, reference = results[f"{how}_norm_{scale}"]
    np.testing.assert_allclose(sharded, reference, rtol=1e-6)


@pytest.mark.parametrize("how", ["partition_specs", "axis_name"])
def test_one_collective_per_distinct_axis_set(results, how):
    found, expected = results[f"collectives_{how}"]
    assert found == expected


def test_clip_inside_shard_map_uses_the_whole_model_norm(results):
    diff, _ = results["clip_max_abs_diff"]
    assert diff <= 1e-6


def test_leaf_norms_are_the_logical_tensors(results):
    assert results["leaf_norms_max_rel_diff"][0] <= 1e-6


def test_pmap_norm_equals_unsharded_on_every_device(results):
    np.testing.assert_allclose(*results["pmap_norm"], rtol=1e-6)
    assert results["pmap_same_on_every_device"][0] == 0.0


def test_nan_on_one_shard_skips_on_every_shard(results):
    assert results["skip_all_shards_zero"][0] == 0.0
