"""Shared test material: the tree zoo, the tolerance table and the TRANSFORMS registry."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]

# Relative tolerance of an output computed in float32 and rounded once to the leaf dtype.
RTOL = {
    np.dtype(jnp.float32): 1e-5,
    np.dtype(jnp.bfloat16): 1e-2,
    np.dtype(jnp.float16): 2e-3,
    np.dtype(np.float64): 1e-12,
}


def rtol(dtype) -> float:
    return RTOL[np.dtype(dtype)]


def tree_rtol(tree) -> float:
    return max([rtol(x.dtype) for x in jax.tree.leaves(tree)], default=1e-5)


def _arr(rng, shape, dtype, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale).astype(dtype)


def make_tree(kind: str, dtype, seed: int = 0, scale: float = 1.0):
    """A member of the tree zoo, with standard-normal entries times ``scale``."""
    rng = np.random.default_rng(seed)
    a = lambda *shape: _arr(rng, shape, dtype, scale)
    if kind == "single":
        return a(4, 3)
    if kind == "nested_dict":
        return {"layer": {"kernel": a(3, 4), "bias": a(4)}, "head": {"w": a(4, 2)}}
    if kind == "tuple_none":
        return (a(5), None, a(2, 3))
    if kind == "empty":
        return {}
    if kind == "zero_size":
        return {"empty": a(0, 3), "w": a(3)}
    if kind == "scalar":
        return {"s": a(), "v": a(2)}
    if kind == "mixed":
        return {
            "bf16": _arr(rng, (4, 3), jnp.bfloat16, scale),
            "f32": _arr(rng, (3,), jnp.float32, scale),
        }
    if kind == "conv":
        return {"conv2d": a(3, 3, 2, 4), "conv3d": a(2, 2, 2, 2, 3)}
    raise ValueError(kind)


TREES = ["single", "nested_dict", "tuple_none", "empty", "zero_size", "scalar", "mixed", "conv"]


def params_like(tree, seed: int = 1):
    """Parameters with the updates' structure (for AGC): normal entries, float32."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape)).astype(x.dtype), tree)


@dataclasses.dataclass(frozen=True)
class Entry:
    """How the contract suite builds and drives one public transform."""

    make: Callable[[], optax.GradientTransformation]  # typical arguments: clips the zoo
    make_loose: Callable[[], optax.GradientTransformation]  # never changes a finite update
    stats_key: str | None  # prefix of its keys in oc.stats (None: records no ClipStats)
    needs_params: bool = False
    threshold_arg: str | None = None  # argument name usable with inject_hyperparams
    threshold_in_stats: bool = True  # ClipStats.threshold is that argument (when injected)
    zero_threshold_ok: bool = True  # the threshold argument may be 0
    clip_stats: bool = True  # records a whole ClipStats (monitor: its norm and count only)


TRANSFORMS: dict[str, Entry] = {
    "clip_by_value": Entry(
        lambda: oc.clip_by_value(0.5),
        lambda: oc.clip_by_value(1e30),
        "clip_by_value",
        threshold_arg="max_value",
    ),
    "clip_by_global_norm": Entry(
        lambda: oc.clip_by_global_norm(1.0),
        lambda: oc.clip_by_global_norm(1e30),
        "clip_by_global_norm",
        threshold_arg="max_norm",
    ),
    "clip_by_leaf_norm": Entry(
        lambda: oc.clip_by_leaf_norm(1.0),
        lambda: oc.clip_by_leaf_norm(1e30),
        "clip_by_leaf_norm",
        threshold_arg="max_norm",
    ),
    "clip_by_block_rms": Entry(
        lambda: oc.clip_by_block_rms(0.5),
        lambda: oc.clip_by_block_rms(1e30),
        "clip_by_block_rms",
        threshold_arg="max_rms",
    ),
    "adaptive_grad_clip": Entry(
        lambda: oc.adaptive_grad_clip(0.1),
        lambda: oc.adaptive_grad_clip(1e30),
        "adaptive_grad_clip",
        needs_params=True,
        threshold_arg="clipping",
        threshold_in_stats=False,
    ),
    "autoclip": Entry(
        lambda: oc.autoclip(10.0, window=4),
        lambda: oc.autoclip(100.0),
        "autoclip",
        threshold_arg="percentile",
        threshold_in_stats=False,
    ),
    "zclip": Entry(
        lambda: oc.zclip(warmup_steps=2),
        lambda: oc.zclip(z_thresh=1e30, max_norm=None, warmup_steps=2),
        "zclip",
        threshold_arg="max_norm",
    ),
    "adagc": Entry(
        lambda: oc.adagc(1.0, warmup_steps=1),
        lambda: oc.adagc(1e30, clip_ratio=1e30, warmup_steps=1),
        "adagc",
        threshold_arg="max_norm",
    ),
    "spike_aware_clip": Entry(
        lambda: oc.spike_aware_clip(4.0, b2=0.9, warmup_steps=2),
        lambda: oc.spike_aware_clip(1e30, warmup_steps=1000),
        "spike_aware_clip",
        threshold_arg="threshold",
        threshold_in_stats=False,
    ),
    "quantile_clip": Entry(
        lambda: oc.quantile_clip(0.5),
        lambda: oc.quantile_clip(1e30),
        "quantile_clip",
        threshold_arg="initial_norm",
        threshold_in_stats=False,
        zero_threshold_ok=False,
    ),
    "skip_nonfinite": Entry(oc.skip_nonfinite, oc.skip_nonfinite, "skip_nonfinite"),
    "zero_nonfinite": Entry(oc.zero_nonfinite, oc.zero_nonfinite, "zero_nonfinite"),
    "error_if_nonfinite": Entry(oc.error_if_nonfinite, oc.error_if_nonfinite, "error_if_nonfinite"),
    "skip_spikes": Entry(
        lambda: oc.skip_spikes(window=4, warmup_steps=3),
        lambda: oc.skip_spikes(window=4, sigmas=1e30, warmup_steps=3),
        "skip_spikes",
    ),
    "clip_by_group_norm": Entry(
        lambda: oc.clip_by_group_norm(lambda path: path.split("/")[0], {"layer": 1.0, "head": 0.5}),
        lambda: oc.clip_by_group_norm(lambda path: path.split("/")[0], {"layer": 1e30}),
        "clip_by_group_norm",
    ),
    "monitor": Entry(
        lambda: oc.monitor(per_leaf=True),
        lambda: oc.monitor(),
        "monitor",
        clip_stats=False,
    ),
    "per_layer": Entry(
        lambda: oc.per_layer({r".*": oc.clip_by_leaf_norm(1.0)}),
        lambda: oc.per_layer({r".*": oc.clip_by_leaf_norm(1e30)}),
        "clip_by_leaf_norm",
    ),
}

# Public names that are not transformation factories.
NOT_TRANSFORMS = {"global_norm", "leaf_norms", "stats"}

# Transforms whose updates carry a leading batch axis (tested in test_per_example.py and the
# distributed worker, not by the contract suite, whose updates have the parameters' shapes).
BATCHED = {"per_example_clip"}


def run_update(tx, updates, state, params=None, wrap=lambda f: f, **extra):
    """One ``tx.update`` call, optionally wrapped (jit)."""
    return wrap(lambda u, s, p: tx.update(u, s, p, **extra))(updates, state, params)


def enable_x64():
    """A context manager turning on float64 (``jax.enable_x64`` in newer JAX)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64 as legacy  # JAX < 0.7

    return legacy(True)


def session_temp(tmp_path_factory) -> Path:
    """This test session's base temp directory, shared by its pytest-xdist workers (each
    worker's own base temp is a subdirectory of it)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def once_per_session(tmp_path_factory, name: str, compute: Callable[[Path], object]):
    """``compute(directory)``'s JSON-able result, computed once per test session.

    Every pytest-xdist worker that asks gets the same stored result: the first one computes
    it (the others wait on a file lock), so an expensive subprocess run (8 simulated devices,
    several processes) is paid once, whichever workers its tests land on. A failure stores
    nothing, so a worker asking later computes (and reports) it again.
    """
    directory = session_temp(tmp_path_factory) / f"shared-{name}"
    directory.mkdir(exist_ok=True)
    result = directory / "result.json"
    with open(directory / "lock", "w") as lock:
        try:
            import fcntl
        except ImportError:  # no POSIX locks (Windows): each worker computes its own
            fcntl = None
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if result.exists():
            return json.loads(result.read_text())
        value = compute(directory)
        result.write_text(json.dumps(value))
        return value


def run_json_workers(script: Path, arg_lists: list[list[str]], timeout: int = 600) -> dict:
    """Runs ``script`` once per argument list, concurrently, each printing a JSON object.

    Each runs without this process's ``XLA_FLAGS`` (the script sets its own device count);
    the objects are merged. Every process is killed and reaped at the end, whatever happens.
    """
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for args in arg_lists
    ]
    out: dict = {}
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, stderr[-4000:]
            out.update(json.loads(stdout))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    return out


def all_eqns(jaxpr) -> list:
    """Every equation of ``jaxpr`` (a Jaxpr or ClosedJaxpr), and of every jaxpr in its
    equations' parameters (calls, loop bodies, branches, custom rules), depth first."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    eqns = []
    for eqn in jaxpr.eqns:
        eqns.append(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
                    eqns.extend(all_eqns(sub))
    return eqns
