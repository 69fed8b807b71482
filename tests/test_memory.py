"""No gradient-sized temporary: a clipper's compiled update holds no copy of a leaf.

XLA (CPU) writes an intermediate to memory whenever it cannot fuse it into the kernels
that read it: a float32 copy of a bfloat16 leaf shared by two kernels, a convert hoisted out
of the rescue loop, a broadcast scalar feeding several reductions. Each costs a pass over
the gradients and memory of their size; the compiled memory analysis shows it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import TRANSFORMS
from hlo import entry_fusion_operands, update_hlo

import optaxclip as oc


def _tree(dtype):
    """Three leaves of one shape above SMALL_LEAF entries (reduced one by one) and a bias."""
    shape = (256, 80)
    return {
        "a": jnp.ones(shape, dtype),
        "b": jnp.full(shape, 2.0, dtype),
        "c": jnp.full(shape, 3.0, dtype),
        "bias": jnp.ones((80,), dtype),
    }


def _temp_fraction(tx, dtype) -> float:
    grads = _tree(dtype)
    with jax.numpy_dtype_promotion("standard"):
        compiled = jax.jit(tx.update).lower(grads, tx.init(grads), grads).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    largest = max(x.nbytes for x in jax.tree.leaves(grads))
    return analysis.temp_size_in_bytes / largest


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_update_holds_no_copy_of_a_leaf(name, dtype):
    # A quarter of the largest leaf leaves room for per-unit vectors (AGC: 7 KB of them).
    # The analysis counts every branch: the statistics only a non-finite step needs (NaN
    # entries left out of clip_by_value's, zero_nonfinite's count) hold no mask either.
    assert _temp_fraction(TRANSFORMS[name].make(), dtype) < 0.25


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_chain_with_adam_holds_no_copy_of_a_leaf(name, dtype):
    # Adam reads the update in two kernels: a clipper's output, or a leaf its statistics
    # read too, must not be written to memory for them (chain(clip_by_value, adam) held two
    # copies of the largest leaf; monitor's norm, beside Adam, a float32 copy of a bfloat16
    # leaf).
    tx = optax.chain(TRANSFORMS[name].make(), optax.adam(1e-3))
    assert _temp_fraction(tx, dtype) < 0.25


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_donated_training_step_holds_no_copy_of_a_leaf(name, dtype):
    # With parameters and state donated, outputs take the inputs' buffers and no longer
    # hide a temporary: monitor()'s norm, beside Adam, shared Adam's g * g and kept the
    # squares of every leaf in memory; spike_aware_clip's update, computed in Adam's
    # kernels from the old v while the new v took v's buffer, kept a copy of v.
    tx = optax.chain(TRANSFORMS[name].make(), optax.adam(1e-3))
    grads = _tree(dtype)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    with jax.numpy_dtype_promotion("standard"):
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(grads, tx.init(grads), grads)
    analysis = lowered.compile().memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    largest = max(x.nbytes for x in jax.tree.leaves(grads))
    assert analysis.temp_size_in_bytes < 0.25 * largest


NORMS = {
    "global_norm": oc.global_norm,
    "global_norm_ord_1": lambda g: oc.global_norm(g, ord=1),
    "global_norm_ord_inf": lambda g: oc.global_norm(g, ord=jnp.inf),
    "leaf_norms": oc.leaf_norms,
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(NORMS))
def test_norm_logged_beside_adam_holds_no_copy_of_a_leaf(name, dtype):
    # A norm computed for logging next to the optimizer's step reads the leaves Adam reads:
    # XLA (CPU) merged the two kernels' float32 converts of a bfloat16 leaf into one copy
    # in memory (and the step ran 1.8x Adam's time on a 25M-parameter tree).
    adam = optax.adam(1e-3)
    norm = NORMS[name]

    def step(grads, state, params):
        updates, state = adam.update(grads, state, params)
        return updates, state, norm(grads)

    grads = _tree(dtype)
    with jax.numpy_dtype_promotion("standard"):
        compiled = jax.jit(step).lower(grads, adam.init(grads), grads).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    largest = max(x.nbytes for x in jax.tree.leaves(grads))
    assert analysis.temp_size_in_bytes < 0.25 * largest


def test_donated_training_step_over_repeated_blocks_holds_no_copy_of_a_leaf():
    # Two blocks of a transformer-like model: each kernel shape occurs twice, and the rescue
    # loop's scale, broadcast once per shape, was kept in memory (3x the largest leaf) until
    # each chunk's reduction read a copy of its own.
    d = 128
    block = {"qkv": (d, 3 * d), "out": (d, d), "up": (d, 4 * d), "down": (4 * d, d)}
    shapes = {f"{i}/{k}": s for i in range(2) for k, s in block.items()} | {"embed": (512, d)}
    params = {k: jnp.ones(s) for k, s in shapes.items()}
    tx = optax.chain(oc.clip_by_global_norm(1.0), optax.adam(1e-3))

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
    compiled = lowered.compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    largest = max(x.nbytes for x in jax.tree.leaves(params))
    assert analysis.temp_size_in_bytes < 0.25 * largest


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_value_clip_ordinary_path_holds_no_copy_of_a_leaf(dtype):
    # clip_by_value's statistics on finite steps: with the NaN branch's mask left out (the
    # analysis counts every branch), its temporaries are the per-chunk scalars.
    tx = oc.clip_by_value(1.5)
    grads = _tree(dtype)
    compiled = jax.jit(tx.update).lower(grads, tx.init(grads), grads).compile()
    entry = compiled.as_text().split("ENTRY", 1)[1]
    shape = "{}[256,80]".format("f32" if dtype == jnp.float32 else "bf16")
    wide = "f32[256,80]"
    kernels = [
        line
        for line in entry.splitlines()
        if (shape in line.split("=", 1)[-1][:40] or wide in line.split("=", 1)[-1][:40])
        and " fusion(" in line
    ]
    # the three clipped leaves are the only full-size arrays written at the top level
    assert len(kernels) == 3, kernels


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_bfloat16_update_fuses_into_adams_kernels(name):
    # Adam reads the gradient in two kernels (first and second moment). The clipped
    # bfloat16 update must be computed inside both rather than written to memory and read
    # back: XLA (CPU) never duplicates a float32 -> bfloat16 convert, and a bfloat16 select
    # or clamp is computed in float32 and converted back.
    grads = {"layer": {k: jnp.full((256, 80), v, jnp.bfloat16) for k, v in [("a", 1), ("b", 2)]}}
    grads["head"] = {"bias": jnp.ones((80,), jnp.bfloat16)}

    def kernels(tx):
        with jax.numpy_dtype_promotion("standard"):
            text = update_hlo(tx, grads, grads)
        return len(entry_fusion_operands(text, "bf16[256,80]"))

    chained = kernels(optax.chain(TRANSFORMS[name].make(), optax.adam(1e-3)))
    assert chained == kernels(optax.adam(1e-3))
