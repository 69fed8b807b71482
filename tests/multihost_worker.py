"""One process of a multi-process JAX job on CPU (see test_multihost.py).

    python multihost_worker.py --process-id I --num-processes N --port PORT --devices D --out F
    python multihost_worker.py --reference --out F

N processes with D simulated CPU devices each join, through ``jax.distributed`` and gloo
collectives, into one global mesh of N*D devices. A small MLP (weights sharded over the mesh,
biases replicated) trains for a few steps under ``jit`` with each clipper, on global data that
every process generates identically; one more run uses Explicit mesh axes, and one applies ``adagc``
with ``partition_specs`` inside ``jax.shard_map``. Process 0 writes the final params, the losses and
``oc.stats`` of each run with ``np.savez``. With ``--reference``, one process with one device
runs the same training on plain arrays and writes the same keys.

Nothing happens on import (pytest's doctest collection imports this file): JAX is imported in
``main`` after ``XLA_FLAGS`` is set.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os

import numpy as np

STEPS = 5
BATCH = 32
SIZES = (16, 32, 32, 8)  # an MLP 16 -> 32 -> 32 -> 8: 6 leaves
METHODS = ("clip_by_global_norm", "zclip", "adagc")
# Each run: (mesh axis types, method, inside shard_map).
RUNS = (
    *(("auto", m, False) for m in METHODS),
    ("explicit", "clip_by_global_norm", False),
    ("auto", "adagc", True),
)


def run_name(axis_types: str, method: str, manual: bool) -> str:
    return f"{'shard_map' if manual else axis_types}-{method}"


def make_method(method: str, **kwargs):
    import optaxclip as oc

    if method == "clip_by_global_norm":
        return oc.clip_by_global_norm(0.5, **kwargs)
    if method == "zclip":
        return oc.zclip(warmup_steps=2, **kwargs)  # default max_norm=1.0
    if method == "adagc":
        return oc.adagc(0.5, warmup_steps=2, **kwargs)
    raise ValueError(method)


def global_data() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The initial params and the batch, identical in every process (fixed seed)."""
    rng = np.random.default_rng(0)
    params = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(SIZES)):
        params[f"w{i}"] = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(
            np.float32
        )
        params[f"b{i}"] = (0.1 * rng.standard_normal(fan_out)).astype(np.float32)
    x = rng.standard_normal((BATCH, SIZES[0])).astype(np.float32)
    y = (3.0 * rng.standard_normal((BATCH, SIZES[-1]))).astype(np.float32)
    return params, x, y


def param_specs():
    """FSDP-style: the first dim of each weight over every device (or 2-D); biases replicated."""
    from jax.sharding import PartitionSpec as P

    return {
        "w0": P(("data", "model"), None),
        "b0": P(),
        "w1": P("data", "model"),
        "b1": P(),
        "w2": P(("data", "model"), None),
        "b2": P(),
    }


def loss_fn(params, x, y, gather):
    import jax.numpy as jnp

    h = x
    n = len(SIZES) - 1
    for i in range(n):
        h = h @ gather(params[f"w{i}"]) + params[f"b{i}"]
        if i < n - 1:
            h = jnp.tanh(h)
    return jnp.mean((h - y) ** 2)


def train(tx, params, x, y, *, gather=lambda w: w, update=None):
    """STEPS steps of ``tx`` under jit; returns (params, opt_state, losses)."""
    import jax
    import optax

    update = tx.update if update is None else update

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, gather)
        updates, opt_state = update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step)
    opt_state = jax.jit(tx.init)(params)
    losses = []
    for _ in range(STEPS):
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(loss)
    return params, opt_state, losses


def to_host(tree):
    """Every leaf of a tree of (possibly multi-process) arrays as one numpy array."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def record(out: dict, name: str, params, opt_state, losses) -> None:
    import jax.numpy as jnp

    import optaxclip as oc

    host = to_host({"params": params, "stats": oc.stats(opt_state), "loss": jnp.stack(losses)})
    for k, v in host["params"].items():
        out[f"{name}|param|{k}"] = v
    for k, v in host["stats"].items():
        out[f"{name}|stat|{k}"] = v
    out[f"{name}|loss"] = host["loss"]


def reference(out_path: str) -> None:
    import jax
    import jax.numpy as jnp
    import optax

    assert jax.device_count() == 1, jax.devices()
    params, x, y = global_data()
    params = {k: jnp.asarray(v) for k, v in params.items()}
    out: dict[str, np.ndarray] = {}
    for method in METHODS:
        tx = optax.chain(make_method(method), optax.adam(1e-2))
        result = {}
        record(result, method, *train(tx, params, jnp.asarray(x), jnp.asarray(y)))
        for run in RUNS:
            if run[1] == method:  # the same training, whatever the sharding
                name = run_name(*run)
                out.update({name + k[len(method) :]: v for k, v in result.items()})
    np.savez(out_path, **out)


def put(value: np.ndarray, sharding):
    """A global array from data every process has whole: each process fills its own shards."""
    import jax

    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def multi_process(args) -> None:
    import jax
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        coordinator_bind_address=f"127.0.0.1:{args.port}",  # not every interface
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=60,
    )
    n, d = args.num_processes, args.devices
    assert jax.process_count() == n and jax.local_device_count() == d, jax.devices()
    assert jax.device_count() == n * d
    specs = param_specs()
    np_params, x, y = global_data()
    out: dict[str, np.ndarray] = {}
    for axis_types, method, manual in RUNS:
        kind = AxisType.Explicit if axis_types == "explicit" else AxisType.Auto
        mesh = jax.make_mesh((n, d), ("data", "model"), axis_types=(kind,) * 2)

        # Global arrays: each process supplies the shards it holds, cut from the global data.
        params = {k: put(v, NamedSharding(mesh, specs[k])) for k, v in np_params.items()}
        # The batch, split over "data": from this process's rows only (as a data loader would).
        batch_sharding = NamedSharding(mesh, P("data"))
        rows = [i[0] for i in batch_sharding.addressable_devices_indices_map(x.shape).values()]
        lo = min(r.start or 0 for r in rows)
        hi = max(x.shape[0] if r.stop is None else r.stop for r in rows)
        assert hi - lo == x.shape[0] // n, (lo, hi)  # "data" runs across the processes
        gx = jax.make_array_from_process_local_data(batch_sharding, x[lo:hi], x.shape)
        gy = jax.make_array_from_process_local_data(batch_sharding, y[lo:hi], y.shape)

        # Explicit axes: all-gather each weight before use (FSDP), as sharding in types wants.
        explicit = kind == AxisType.Explicit
        gather = (lambda w: jax.sharding.reshard(w, P())) if explicit else (lambda w: w)
        if manual:
            tx = optax.chain(make_method(method, partition_specs=specs), optax.adam(1e-2))
            state_specs = optax.tree_map_params(
                tx,
                lambda _, spec: spec,
                jax.eval_shape(tx.init, params),
                specs,
                transform_non_params=lambda _: P(),
            )
            update = jax.shard_map(
                tx.update,
                mesh=mesh,
                in_specs=(specs, state_specs, specs),
                out_specs=(specs, state_specs),
                check_vma=False,
            )
        else:
            tx = optax.chain(make_method(method), optax.adam(1e-2))
            update = None
        # Explicit axes need the mesh in context (optax.adam's init under jit fails without).
        with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
            result = train(tx, params, gx, gy, gather=gather, update=update)
            record(out, run_name(axis_types, method, manual), *result)
    if jax.process_index() == 0:
        np.savez(args.out, **out)
    jax.distributed.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--reference", action="store_true")
    args = parser.parse_args()
    devices = 1 if args.reference else args.devices
    # Before JAX is imported: the number of simulated CPU devices of this process.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    )
    if args.reference:
        reference(args.out)
    else:
        multi_process(args)


if __name__ == "__main__":
    main()
