"""optaxclip quickstart: clip a model whose gradients explode, and read what the clipper did.

Trains a small tanh RNN (plain JAX, no other dependency) on a task with long-range
structure, where gradients through 100 steps of recurrence explode at a high learning rate.
It runs the same training with no clipping and with three optaxclip clippers, and prints
the losses and ``oc.stats`` (pre-clip norm, threshold, steps clipped) of the last one.

    python examples/quickstart.py [--steps 400] [--lr 0.1]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import optaxclip as oc

HIDDEN, SEQ_LEN, BATCH = 32, 100, 64


def init_params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w_in": jax.random.normal(k1, (2, HIDDEN)) * 1.2,
        # A recurrent matrix with spectral radius > 1: gradients explode through time.
        "w_rec": jax.random.orthogonal(k2, HIDDEN) * 1.2,
        "b": jnp.zeros(HIDDEN),
        "w_out": jax.random.normal(k3, (HIDDEN, 1)) * 1.2,
    }


def adding_batch(key):
    """Pascanu et al.'s adding problem: sum the two marked numbers of a long sequence."""
    k1, k2, k3 = jax.random.split(key, 3)
    values = jax.random.uniform(k1, (BATCH, SEQ_LEN))
    first = jax.random.randint(k2, (BATCH,), 0, SEQ_LEN // 2)
    second = jax.random.randint(k3, (BATCH,), SEQ_LEN // 2, SEQ_LEN)
    marks = jax.nn.one_hot(first, SEQ_LEN) + jax.nn.one_hot(second, SEQ_LEN)
    x = jnp.stack([values, marks], axis=-1)
    return x, jnp.sum(values * marks, axis=1, keepdims=True)


def loss_fn(params, x, y):
    def step(h, x_t):
        h = jnp.tanh(x_t @ params["w_in"] + h @ params["w_rec"] + params["b"])
        return h, None

    h, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], HIDDEN)), jnp.swapaxes(x, 0, 1))
    return jnp.mean((h @ params["w_out"] - y) ** 2)


def train(tx, steps, seed=0):
    params = init_params(jax.random.PRNGKey(seed))
    state = tx.init(params)

    @jax.jit
    def train_step(params, state, key):
        x, y = adding_batch(key)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    key = jax.random.PRNGKey(seed + 1)
    losses = []
    for _ in range(steps):
        key, sub = jax.random.split(key)
        params, state, loss = train_step(params, state, sub)
        losses.append(loss)
    return jnp.stack(losses), state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args(argv)

    runs = {
        "no clipping": optax.sgd(args.lr),
        "oc.clip_by_value(0.1)": optax.chain(oc.clip_by_value(0.1), optax.sgd(args.lr)),
        "oc.clip_by_leaf_norm(0.5)": optax.chain(oc.clip_by_leaf_norm(0.5), optax.sgd(args.lr)),
        "oc.clip_by_global_norm(1)": optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(args.lr)),
    }
    print(f"Adding problem, T={SEQ_LEN}, tanh RNN with {HIDDEN} units, SGD lr={args.lr}")
    print(f"{'method':32s} {'final loss':>10s} {'max loss':>10s}   seconds")
    for name, tx in runs.items():
        start = time.perf_counter()
        losses, state = train(tx, args.steps)
        tail = jnp.mean(losses[-20:])
        peak = jnp.max(losses)
        print(
            f"{name:32s} {float(tail):10.4f} {float(peak):10.4g}"
            f"   {time.perf_counter() - start:.1f}"
        )
    print("\nWhat optaxclip's clipper did on its last step (oc.stats(state)):")
    for key, value in oc.stats(state).items():
        print(f"  {key:36s} {float(value):.6g}")


if __name__ == "__main__":
    main()
