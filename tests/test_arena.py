"""The clipping arena: its tasks, its metrics, its Python API and its command line."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import BATCHED, NOT_TRANSFORMS

import optaxclip as oc
from optaxclip import arena

# ---------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("length", [2, 7, 50])
def test_adding_target_is_sum_of_the_two_marked_values(length):
    x, y = arena._adding_batch(jax.random.key(0), 64, length)
    values, marks = np.asarray(x[..., 0]), np.asarray(x[..., 1])
    assert x.shape == (64, length, 2) and y.shape == (64,)
    np.testing.assert_array_equal(marks.sum(axis=1), 2)
    half = length // 2
    np.testing.assert_array_equal(marks[:, :half].sum(axis=1), 1)  # one marker per half
    np.testing.assert_allclose(y, (values * marks).sum(axis=1), rtol=1e-6)
    assert values.min() >= 0 and values.max() <= 1


@pytest.mark.parametrize("length", [10, 60])
def test_temporal_order_class_encodes_the_two_relevant_symbols_in_order(length):
    x, y = arena._temporal_order_batch(jax.random.key(1), 128, length)
    symbols = np.argmax(np.asarray(x), axis=-1)
    for row, label in zip(symbols, np.asarray(y)):
        positions = np.flatnonzero(row >= 4)
        assert len(positions) == 2
        t1, t2 = positions
        assert int(0.1 * length) <= t1 < max(int(0.2 * length), int(0.1 * length) + 1)
        assert int(0.5 * length) <= t2 < max(int(0.6 * length), int(0.5 * length) + 1)
        assert label == 2 * (row[t1] - 4) + (row[t2] - 4)


def test_lm_batch_second_half_repeats_the_first():
    x, y = arena._lm_batch(jax.random.key(2), 8, 32)
    full = np.concatenate([np.asarray(x), np.asarray(y)[:, -1:]], axis=1)
    np.testing.assert_array_equal(full[:, :16], full[:, 16:])
    np.testing.assert_array_equal(np.asarray(x)[:, 1:], np.asarray(y)[:, :-1])


def test_spikes_count_losses_above_twice_the_running_median():
    loss = np.ones((2, 40))
    loss[0, [25, 30]] = 2.5  # two spikes
    loss[1, 30] = 1.9  # below twice the median
    np.testing.assert_array_equal(arena._spikes(loss, window=20), [2, 0])


def test_methods_cover_every_clipper_in_the_package():
    guards_and_routing = {
        "skip_nonfinite",
        "zero_nonfinite",
        "error_if_nonfinite",
        "skip_spikes",
        "per_layer",
        "monitor",  # records, clips nothing
        "clip_by_group_norm",  # needs the model's parameter groups
    }
    factories = {
        name
        for name in oc.__all__
        if callable(getattr(oc, name))
        and name[0].islower()
        and name not in NOT_TRANSFORMS | BATCHED | guards_and_routing
    }
    assert factories <= set(arena.METHODS)
    assert arena.METHODS["none"]() is None
    for name in set(arena.METHODS) - {"none"}:
        assert callable(arena.METHODS[name]().update)


# ---------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def adding_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("arena")
    result = arena.run(
        "adding",
        methods=["none", "clip_by_global_norm", "zclip"],
        seeds=2,
        steps=50,  # one 50-step chunk: one program to compile
        lr=0.5,
        seq_len=[5, 8],
        out=out,
        progress=False,
    )
    return result, out


def test_run_returns_a_row_per_method_and_length(adding_result):
    result, _ = adding_result
    keys = [(r["method"], r["seq_len"]) for r in result.rows]
    assert keys == [(m, n) for n in (5, 8) for m in ("none", "clip_by_global_norm", "zclip")]
    for r in result.rows:
        assert 0 <= r["success_rate"] <= 1 and 0 <= r["clipped_fraction"] <= 1
        assert 0 <= r["diverged"] <= r["seeds"] == 2


def test_run_curves_have_one_value_per_seed_and_step(adding_result):
    result, _ = adding_result
    for (method, _), c in result.curves.items():
        assert c["loss"].shape == c["norm"].shape == c["threshold"].shape == (2, 50)
        if method == "none":
            assert np.isnan(c["threshold"]).all()
        if method == "clip_by_global_norm":
            np.testing.assert_array_equal(c["threshold"], 1.0)


def test_run_records_clipping_where_the_norm_exceeds_the_threshold(adding_result):
    result, _ = adding_result
    c = result.curves[("clip_by_global_norm", 8)]
    row = next(r for r in result.rows if r["method"] == "clip_by_global_norm" and r["seq_len"] == 8)
    assert row["clipped_fraction"] == pytest.approx(np.mean(c["norm"] > 1.0))
    none = next(r for r in result.rows if r["method"] == "none")
    assert none["clipped_fraction"] == 0


def test_run_writes_json_csv_and_png(adding_result):
    result, out = adding_result
    record = json.loads((out / "results.json").read_text())
    assert record["task"] == "adding" and len(record["rows"]) == len(result.rows)
    assert set(record["curves"]) == {f"{m}@{n}" for m, n in result.curves}
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == [r["method"] for r in result.rows]
    assert (out / "arena.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_has_a_line_per_row(adding_result):
    result, _ = adding_result
    table = result.table()
    assert table.count("\n") == len(result.rows) + 1
    assert "| method | seq_len | success |" in table


@pytest.mark.parametrize("task", ["temporal-order", "spiky-lm"])
def test_run_other_tasks(task):
    result = arena.run(
        task,
        methods=["none", "clip_by_global_norm"],
        seeds=2,
        steps=10,
        seq_len=8,
        progress=False,
    )
    assert len(result.rows) == 2
    assert (result.rows[0]["success_rate"] is None) == (task == "spiky-lm")
    assert all(np.isfinite(r["final_loss"]) for r in result.rows)


def test_run_accepts_custom_clipper_factories(tmp_path):
    result = arena.run(
        "adding",
        methods={"tight": lambda: oc.clip_by_global_norm(0.01)},
        seeds=2,
        steps=5,
        seq_len=4,
        out=tmp_path,
        progress=False,
    )
    (row,) = result.rows
    assert row["method"] == "tight" and row["clipped_fraction"] == 1.0
    np.testing.assert_array_equal(result.curves[("tight", 4)]["threshold"], np.float32(0.01))
    assert result.curves[("tight", 4)]["clipped"].all()
    assert json.loads((tmp_path / "results.json").read_text())["curves"]["tight@4"]["clipped"]


def test_seeds_are_independent_runs():
    result = arena.run(
        "adding", methods=["none"], seeds=3, steps=5, seq_len=4, lr=0.01, progress=False
    )
    loss = result.curves[("none", 4)]["loss"]
    assert not np.allclose(loss[0], loss[1]) and not np.allclose(loss[1], loss[2])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"methods": ["nope"]}, r"unknown method\(s\) 'nope'; choose from none,"),
        ({"methods": {}}, r"unknown method\(s\) \(none given\)"),
        ({"seeds": 0}, r"seeds and steps must be >= 1"),
        ({"lr": -1.0}, r"lr must be a positive number"),
        ({"seq_len": [1]}, r"seq_len must be integers >= 2"),
    ],
)
def test_run_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        arena.run("adding", progress=False, **kwargs)


def test_run_rejects_unknown_task():
    with pytest.raises(ValueError, match=r"unknown task 'mnist'; choose one of adding,"):
        arena.run("mnist", progress=False)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "optaxclip.arena", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        check=False,
    )


@pytest.mark.slow
def test_cli_runs_and_writes_the_three_files(tmp_path):
    proc = _cli(
        "--task=temporal-order",
        "--methods=none,autoclip",
        "--seeds=2",
        "--steps=20",
        "--seq-len=6",
        "--no-progress",
        "--out",
        str(tmp_path / "out"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| autoclip | 6 |" in proc.stdout
    for name in ("results.json", "results.csv", "arena.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "wrote " in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods=none,bogus"], "--methods: unknown bogus; choose from none,"),
        (["--steps=0"], "--steps: expected a positive integer, got 0"),
        (["--seq-len=a,b"], "--seq-len: expected integers separated by commas"),
        (["--task=mnist"], "argument --task: invalid choice: 'mnist'"),
        (["--lr=-0.1"], "--lr: expected a positive number, got -0.1"),
    ],
)
def test_cli_rejects_bad_options_with_a_message(args, message):
    proc = _cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_cli_refuses_an_out_path_that_is_a_file(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    proc = _cli("--out", str(target))
    assert proc.returncode == 2 and "exists and is not a directory" in proc.stderr
