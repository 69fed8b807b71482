"""Benchmark ``optaxclip.clip_by_global_norm`` against optax, Adam and the memory floor.

Run from the repository root::

    python benchmarks/bench_clip.py                 # full run: about 4 minutes on 2 CPU cores
    python benchmarks/bench_clip.py --quick         # smoke run: tiny trees, about 15 s
    python benchmarks/bench_clip.py --out PATH      # JSON somewhere else
    python benchmarks/bench_clip.py --trees transformer_f32 --reps 50   # one tree, more calls

Three gradient trees are measured:

* ``transformer_f32``: a ~25M-parameter transformer-like tree (12 layers of d=320, a
  32,000-token embedding, 147 float32 leaves);
* ``small_leaves_f32``: 2,000 small float32 leaves, alternately (64,) and (16, 16);
* ``transformer_bf16``: the first tree cast to bfloat16.

Gradients are standard normal, so a threshold of 1.0 always clips. Each contender is
``jax.jit``-compiled once (tracing+lowering and XLA compilation are timed separately, with
the persistent compilation cache off; two XLA compilations run at once, so these times are
not the compile-time benchmark's, see bench_perf.py), warmed up, then timed round-robin with
the other contenders of its tree (so drift in the machine's state hits all of them alike),
blocking on every output, with Python's garbage collector paused. The two programs of a
target (a clipper and its optax equivalent, the chain and Adam) run back to back in each
round, and the target is read from those pairs. Nothing is donated; the optimizer state
and params are arguments, never closed-over constants. The floors are the cheapest programs
that touch every gradient byte: one read (a float32 sum of squares of every leaf) and one
read plus one write (``x * s`` with a runtime scalar ``s``).

Compiling over 2,000 leaves is slow on CPU (optax's chain takes about 30 s there), so
``--no-small-tree-chains`` times only the floors and the two clippers on that tree.

A clipper has to read the gradients twice (norm, then scale) and write them once, so
an ideal unfused one costs about the read floor plus the read+write floor; fused into
Adam, the scaling is free and the chain should cost about Adam plus the read floor.

Two references are printed beside the targets, on the trees with the chains: Adam after
a scaling by a runtime scalar (no norm) against Adam alone, and ``oc.clip_by_value``
against ``optax.clip`` with the statistics ``oc.clip_by_value`` records computed by hand in
jnp (the norm, the largest entry, the fraction clipped): what those statistics cost
written the obvious way, where ``optax.clip`` computes none.

The script prints a markdown table per tree, the memory analysis of every compiled
program (XLA's temp buffer size against the gradient bytes: a clipper that fuses into
Adam needs no gradient-sized temporary), and writes every figure to JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc
from optaxclip import _numerics as num
from optaxclip._cli import non_negative_int as _non_negative_int
from optaxclip._cli import positive_int as _positive_int
from optaxclip._fixed import clip_to_norm

MAX_NORM = 1.0
LEARNING_RATE = 1e-3
SEED = 0
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_clip.json"

# Contender names, used as table rows and JSON keys.
FLOOR_READ = "floor: read (sum of squares)"
FLOOR_RW = "floor: read+write (x * s)"
OC_CLIP = "optaxclip.clip_by_global_norm"
OX_CLIP = "optax.clip_by_global_norm"
ADAM = "optax.adam"
OC_CHAIN = "chain(optaxclip clip, adam)"
OX_CHAIN = "chain(optax clip, adam)"
# Adam after a multiplication by a runtime scalar, no norm: what a plain scaling costs
# Adam (a reference printed beside the chain target, not a target).
SCALE_CHAIN = "chain(x * runtime scalar, adam)"

# The other fixed-threshold clippers and their optax equivalents.
OC_VALUE = "optaxclip.clip_by_value"
OX_VALUE = "optax.clip"
OC_BLOCK = "optaxclip.clip_by_block_rms"
OX_BLOCK = "optax.clip_by_block_rms"
OC_LEAF = "optaxclip.clip_by_leaf_norm"
OX_LEAF = "optax: per-leaf norm clip (tree_map)"
OC_AGC = "optaxclip.adaptive_grad_clip"
OX_AGC = "optax.adaptive_grad_clip"
# optax.clip plus the statistics oc.clip_by_value records (norm, largest entry, fraction
# clipped), written in jnp as a user would: what the ClipStats cost by hand (a reference
# printed beside clip_by_value's target, on the trees with the chains; not a target).
OX_VALUE_STATS = "optax.clip + the same statistics (jnp)"
# clip_by_global_norm without its overflow/underflow rescue: what the rescue costs untaken.
OC_NO_RESCUE = "clip_by_global_norm, rescue removed"

# Each optaxclip contender and the optax program computing the same thing.
OPTAX_EQUIVALENT = {
    OC_CLIP: OX_CLIP,
    OC_CHAIN: OX_CHAIN,
    OC_VALUE: OX_VALUE,
    OC_BLOCK: OX_BLOCK,
    OC_LEAF: OX_LEAF,
    OC_AGC: OX_AGC,
}
CHAINS = (OC_CHAIN, OX_CHAIN)
# Each target's two programs, timed back to back in every round (see time_round_robin);
# the reference of Adam after a plain scaling too, which the chain's target is read beside.
TIMED_PAIRS = {
    **{name: ref for name, ref in OPTAX_EQUIVALENT.items() if name not in CHAINS},
    OC_CHAIN: ADAM,
    SCALE_CHAIN: ADAM,
}
VALUE_LIMIT = 2.0  # clip_by_value's threshold: about 5% of standard-normal entries clip
BLOCK_RMS = 0.5  # below the RMS (1.0) of standard-normal leaves: every leaf clips
AGC_CLIPPING = 0.01  # against parameters of norm ~ the gradients': every unit clips


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """Tree sizes and repetition counts of one run."""

    d_model: int
    layers: int
    vocab: int
    small_leaves: int
    reps: int
    warmup: int
    rescue_reps: int  # paired rounds of the rescue's own target (see rescue_cost)


FULL = Sizes(
    d_model=320, layers=12, vocab=32_000, small_leaves=2_000, reps=30, warmup=3, rescue_reps=120
)
QUICK = Sizes(d_model=32, layers=1, vocab=256, small_leaves=16, reps=5, warmup=1, rescue_reps=10)


@dataclass(frozen=True)
class TreeSpec:
    """A gradient tree to benchmark: leaf shapes, dtype, and whether to time the chains."""

    key: str
    title: str
    shapes: dict[str, tuple[int, ...]]
    dtype: Any
    with_chains: bool


def transformer_shapes(d: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Leaf shapes of a GPT-like model: embedding, ``layers`` blocks, final layer norm.

    Each block has 12 leaves (qkv, attention output and two MLP matrices with their biases,
    two layer norms with scale and bias), so the tree has ``12 * layers + 3`` leaves.
    """
    shapes: dict[str, tuple[int, ...]] = {"embed": (vocab, d)}
    for i in range(layers):
        block = {
            "attn/qkv/w": (d, 3 * d),
            "attn/qkv/b": (3 * d,),
            "attn/out/w": (d, d),
            "attn/out/b": (d,),
            "mlp/up/w": (d, 4 * d),
            "mlp/up/b": (4 * d,),
            "mlp/down/w": (4 * d, d),
            "mlp/down/b": (d,),
            "ln1/scale": (d,),
            "ln1/bias": (d,),
            "ln2/scale": (d,),
            "ln2/bias": (d,),
        }
        shapes.update({f"layer{i:02d}/{name}": shape for name, shape in block.items()})
    shapes["final_ln/scale"] = (d,)
    shapes["final_ln/bias"] = (d,)
    return shapes


def small_leaf_shapes(n: int) -> dict[str, tuple[int, ...]]:
    """``n`` small leaves, alternately (64,) and (16, 16)."""
    return {f"leaf{i:04d}": (64,) if i % 2 == 0 else (16, 16) for i in range(n)}


TREE_KEYS = ("transformer_f32", "small_leaves_f32", "transformer_bf16")


def tree_specs(sizes: Sizes, small_tree_chains: bool) -> list[TreeSpec]:
    """The three trees of the benchmark, in the order they are run and printed."""
    big = transformer_shapes(sizes.d_model, sizes.layers, sizes.vocab)
    big_title = f"transformer-like, layers={sizes.layers}, d={sizes.d_model}, vocab={sizes.vocab}"
    specs = [
        TreeSpec("transformer_f32", big_title + ", float32", big, jnp.float32, True),
        TreeSpec(
            "small_leaves_f32",
            f"{sizes.small_leaves} small leaves ((64,) and (16, 16)), float32",
            small_leaf_shapes(sizes.small_leaves),
            jnp.float32,
            small_tree_chains,
        ),
        TreeSpec("transformer_bf16", big_title + ", bfloat16", big, jnp.bfloat16, True),
    ]
    assert tuple(s.key for s in specs) == TREE_KEYS
    return specs


def random_tree(shapes: dict[str, tuple[int, ...]], dtype: Any, seed: int) -> dict[str, jax.Array]:
    """Standard-normal leaves, drawn in float32 then cast (same values for every dtype)."""
    rng = np.random.default_rng(seed)
    tree = {
        name: jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
        for name, shape in shapes.items()
    }
    return jax.block_until_ready(tree)


# ---------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------


def floor_read(grads: Any) -> jax.Array:
    """One read pass over every gradient byte: the float32 sum of squares of all leaves."""
    sums = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(grads)]
    # Stacks of the per-leaf sums, each through an identity sort (never fused), then one sum:
    # a Python chain of scalar adds takes XLA's CPU fusion pass quadratic time, and one stack
    # of 2,000 sums 16-26 s to compile; stacks of 512 take 2 s, at the same runtime.
    stacks = [
        num._through_sort([jnp.stack(sums[i : i + 512])])[0] for i in range(0, len(sums), 512)
    ]
    return jnp.sum(jnp.concatenate(stacks))


def floor_read_write(grads: Any, s: jax.Array) -> Any:
    """One read and one write pass: every leaf times a runtime scalar, in its own dtype."""
    return jax.tree.map(lambda x: (x.astype(jnp.float32) * s).astype(x.dtype), grads)


@dataclass
class Contender:
    """A function to jit and the arguments to call it with."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]


def transform_contender(name: str, tx: optax.GradientTransformation, grads, params) -> Contender:
    """``tx.update(grads, state, params)`` with a freshly initialised state as an argument."""
    return Contender(name, tx.update, (grads, tx.init(params), params))


def optax_leaf_norm_clip(max_norm: float) -> optax.GradientTransformation:
    """Per-leaf norm clipping written with optax's pieces (optax has no such transform)."""

    def clip(g):
        norm = optax.tree.norm(g)
        return (g * jnp.where(norm > max_norm, max_norm / norm, 1.0).astype(g.dtype)).astype(
            g.dtype
        )

    return optax.stateless(lambda updates, params: jax.tree.map(clip, updates))


def optax_clip_with_stats(max_value: float) -> optax.GradientTransformation:
    """``optax.clip`` and the statistics ``oc.clip_by_value`` keeps in its ``ClipStats``,
    written in jnp as a user would: the global norm before clipping (``optax.tree.norm``),
    the scale ``max_value / max |g|`` when anything clips, and the fraction of entries
    above ``max_value``. Held in the state, so XLA computes them."""
    clip = optax.clip(max_value)

    def init(params):
        del params
        return {k: jnp.zeros((), jnp.float32) for k in ("norm", "scale", "clipped")}

    def update(updates, state, params=None):
        del state, params
        leaves = jax.tree.leaves(updates)
        largest = jnp.max(jnp.stack([jnp.max(jnp.abs(x)).astype(jnp.float32) for x in leaves]))
        over = sum(jnp.sum(jnp.abs(x) > max_value) for x in leaves)
        stats = {
            "norm": optax.tree.norm(updates).astype(jnp.float32),
            "scale": jnp.where(largest > max_value, max_value / largest, 1.0),
            "clipped": over / sum(x.size for x in leaves),
        }
        return clip.update(updates, optax.EmptyState())[0], stats

    return optax.GradientTransformation(init, update)


def scale_by_runtime_scalar() -> optax.GradientTransformation:
    """Every leaf times one float32 scalar held in the state (so not a constant XLA could
    fold), in float32 and cast back to the leaf's dtype, as a user would write it: what a
    scaling adds to Adam with no norm computed at all. (On bfloat16 leaves XLA writes the
    scaled gradient to memory once; ``oc.clip_by_global_norm`` rounds it inside Adam's
    kernels instead, see ``_numerics.narrow``.)"""

    def scale(x, s):
        return (x * s).astype(x.dtype)

    return optax.GradientTransformation(
        lambda params: jnp.ones((), jnp.float32),
        lambda updates, s, params=None: (jax.tree.map(lambda x: scale(x, s), updates), s),
    )


def without_rescue(max_norm: float) -> optax.GradientTransformation:
    """``oc.clip_by_global_norm`` minus its rescue: the same chunked reductions, and the
    same factors, scaling and statistics (``clip_to_norm``), with the sum of squares taken
    as is (no while loop, no second trip). Until run 31 it also left the statistics out,
    and with them a kernel: ours read 1.005x against it, and 1.0003x against the rescue
    alone (300 paired rounds, 25M float32 tree)."""
    reference = oc.clip_by_global_norm(max_norm)

    def update(updates, state, params=None):
        del params
        leaves = [jnp.asarray(x) for x in jax.tree.leaves(updates)]
        chunks, reducer = num.Reducer.build(updates).chunks(leaves)
        dtype = num.accum_dtype(leaves)
        s = reducer.sum([jnp.sum(num._magnitude(c, 2, dtype)) for c in chunks])
        norm = num.Norm(jnp.ones((), dtype), jnp.sqrt(s))
        limit = num.resolve(max_norm, state.stats.count, dtype)
        out, stats = clip_to_norm(updates, state.stats, norm, limit)
        return out, state._replace(stats=stats)

    return optax.GradientTransformation(reference.init, update)


def contender_factories(grads: Any, params: Any, with_chains: bool) -> dict[str, Callable]:
    """The floors and clippers, plus Adam and both chains when ``with_chains``, by name: each
    value builds its contender (a transformation's state is initialised only then)."""
    # AGC compares gradients with the parameters: give it parameters like the gradients.
    transforms = {
        OC_CLIP: (lambda: oc.clip_by_global_norm(MAX_NORM), params),
        OX_CLIP: (lambda: optax.clip_by_global_norm(MAX_NORM), params),
        OC_NO_RESCUE: (lambda: without_rescue(MAX_NORM), params),
        OC_VALUE: (lambda: oc.clip_by_value(VALUE_LIMIT), params),
        OX_VALUE: (lambda: optax.clip(VALUE_LIMIT), params),
        OC_BLOCK: (lambda: oc.clip_by_block_rms(BLOCK_RMS), params),
        OX_BLOCK: (lambda: optax.clip_by_block_rms(BLOCK_RMS), params),
        OC_LEAF: (lambda: oc.clip_by_leaf_norm(MAX_NORM), params),
        OX_LEAF: (lambda: optax_leaf_norm_clip(MAX_NORM), params),
        OC_AGC: (lambda: oc.adaptive_grad_clip(AGC_CLIPPING), grads),
        OX_AGC: (lambda: optax.adaptive_grad_clip(AGC_CLIPPING), grads),
    }
    if with_chains:
        adam = lambda: optax.adam(LEARNING_RATE)
        transforms |= {
            ADAM: (adam, params),
            OC_CHAIN: (lambda: optax.chain(oc.clip_by_global_norm(MAX_NORM), adam()), params),
            OX_CHAIN: (lambda: optax.chain(optax.clip_by_global_norm(MAX_NORM), adam()), params),
            SCALE_CHAIN: (lambda: optax.chain(scale_by_runtime_scalar(), adam()), params),
            OX_VALUE_STATS: (lambda: optax_clip_with_stats(VALUE_LIMIT), params),
        }
    factories = {
        FLOOR_READ: lambda: Contender(FLOOR_READ, floor_read, (grads,)),
        FLOOR_RW: lambda: Contender(FLOOR_RW, floor_read_write, (grads, jnp.float32(0.5))),
    }
    for name, (make, p) in transforms.items():
        factories[name] = lambda name=name, make=make, p=p: transform_contender(
            name, make(), grads, p
        )
    return factories


def make_contenders(grads: Any, params: Any, with_chains: bool) -> list[Contender]:
    """Every contender of :func:`contender_factories`, built, in its order."""
    return [make() for make in contender_factories(grads, params, with_chains).values()]


# ---------------------------------------------------------------------------
# Compiling, inspecting, timing
# ---------------------------------------------------------------------------


@dataclass
class Compiled:
    """A contender compiled, with how long that took."""

    contender: Contender
    executable: Any
    lower_s: float
    compile_s: float

    def call(self) -> Any:
        return self.executable(*self.contender.args)


COMPILE_THREADS = 2  # XLA compilations run at once in the runtime benchmarks


def compile_contenders(
    contenders: Sequence[Contender],
    label: Callable[[str], str] = str,
    donate: tuple[int, ...] = (),
) -> list[Compiled]:
    """Every contender traced and lowered here, then compiled by XLA in a pool of
    ``COMPILE_THREADS`` threads (``donate``: the arguments the programs donate); returns
    them in order, and prints each one's times (under ``label(name)``).

    An XLA compilation runs on one thread and releases the GIL, so on 2 cores two of them
    run at once while this thread lowers the next program: the runtime benchmarks spend
    most of their wall time compiling (2,000 leaves: 2-25 s per program). The compile times
    recorded are each program's own, measured while another may compile beside it (the
    compile-time targets are measured alone, in bench_perf.py).
    """

    def compile_one(contender: Contender, lowered: Any, lower_s: float) -> Compiled:
        t0 = time.perf_counter()
        executable = lowered.compile()
        return Compiled(contender, executable, lower_s, time.perf_counter() - t0)

    with ThreadPoolExecutor(COMPILE_THREADS) as pool:
        futures = []
        for contender in contenders:
            t0 = time.perf_counter()
            jitted = jax.jit(contender.fn, donate_argnums=donate)
            lowered = jitted.lower(*contender.args)
            lower_s = time.perf_counter() - t0
            futures.append(pool.submit(compile_one, contender, lowered, lower_s))
        compiled = []
        for future in futures:
            c = future.result()
            name, lower_s, compile_s = label(c.contender.name), c.lower_s, c.compile_s
            print(
                f"  compiled {name}: trace+lower {lower_s:.2f} s, compile {compile_s:.2f} s",
                flush=True,
            )
            compiled.append(c)
    return compiled


# Entry instructions that run no kernel and write no data.
_TRIVIAL_OPS = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast"})
# Control flow: the output tuple of a loop or branch holds its operands passed through (a
# norm's rescue loop carries every leaf); the kernels in its body do the writing.
_CONTROL_OPS = frozenset({"while", "conditional", "call", "opt-barrier"})
_ARRAY_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_DTYPE_BYTES.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8})


def _matching_paren(text: str) -> int:
    """The index of the parenthesis closing the one that opens ``text``."""
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return i
    raise ValueError(f"unbalanced parentheses in {text[:80]!r}")


def _shape_and_opcode(rhs: str) -> tuple[str, str]:
    """Splits the text after ``=`` of an HLO instruction into its shape and its opcode."""
    rhs = rhs.lstrip()
    if rhs.startswith("("):  # a tuple shape
        end = _matching_paren(rhs) + 1
        shape, rest = rhs[:end], rhs[end:]
    else:
        shape, _, rest = rhs.partition(" ")
    return shape, rest.lstrip().split("(", 1)[0]


def _shape_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape (a tuple's elements added up)."""
    total = 0
    for dtype, dims in _ARRAY_SHAPE.findall(shape):
        total += _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
    return total


def entry_ops(hlo_text: str) -> tuple[dict[str, int], int]:
    """Opcode counts of the compiled module's entry computation, and the bytes its
    kernels write (every non-trivial instruction's output, whichever buffer it lands in;
    control-flow ops and the kernels inside them are not counted).
    """
    counts: Counter[str] = Counter()
    written = 0
    in_entry = False
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY "):
            in_entry = True
        elif in_entry and line.startswith("}"):
            break
        elif in_entry and " = " in line:
            shape, op = _shape_and_opcode(line.split(" = ", 1)[1])
            counts[op] += 1
            if op not in _TRIVIAL_OPS | _CONTROL_OPS:
                written += _shape_bytes(shape)
    return dict(counts.most_common()), written


def inspect_compiled(compiled: Compiled, grad_bytes: int, largest_leaf: int) -> dict[str, Any]:
    """XLA's memory analysis and the entry computation's ops, relative to the gradients."""
    info: dict[str, Any] = {}
    analysis = compiled.executable.memory_analysis()
    if analysis is not None:
        temp = int(analysis.temp_size_in_bytes)
        info.update(
            temp_bytes=temp,
            argument_bytes=int(analysis.argument_size_in_bytes),
            output_bytes=int(analysis.output_size_in_bytes),
            alias_bytes=int(analysis.alias_size_in_bytes),
            temp_over_grad=temp / grad_bytes,
            temp_over_largest_leaf=temp / largest_leaf,
            output_over_grad=int(analysis.output_size_in_bytes) / grad_bytes,
        )
    ops, written = entry_ops(compiled.executable.as_text())
    info["entry_ops"] = ops
    info["entry_kernels"] = sum(n for op, n in ops.items() if op not in _TRIVIAL_OPS)
    info["kernel_written_bytes"] = written
    info["kernel_written_over_grad"] = written / grad_bytes
    return info


@contextlib.contextmanager
def gc_paused():
    """Python's garbage collector off, after a full collection, as ``timeit`` times.

    A collection landing in a timed call is counted as the call's: after ``bench_clip``
    in one process, ``bench_adaptive``'s timed section ran 8 full collections of 0.1-0.54 s
    each (2.7 s in all) and 117 of the middle generation (up to 14 ms) among calls of
    11-30 ms.
    """
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class Timings:
    """Seconds per call, from :func:`time_round_robin`.

    ``calls``: every timed call of each program. ``rounds``: each round's median call of
    each program (a program is called more than once in a round when it is the reference
    of more than one pair). ``adjacent``: per round, the time of a paired program over its
    reference's, the two timed back to back.
    """

    calls: dict[str, list[float]]
    rounds: dict[str, list[float]]
    adjacent: dict[str, list[float]]
    pairs: dict[str, str]

    def per_round(self, name: str, ref: str) -> np.ndarray:
        """Each round's ratio of ``name``'s time to ``ref``'s: of the two calls timed back
        to back where they are a pair, else of the two programs' calls in the round."""
        if self.pairs.get(name) == ref:
            return np.asarray(self.adjacent[name])
        return np.asarray(self.rounds[name]) / np.asarray(self.rounds[ref])


def time_round_robin(
    compiled: Sequence[Compiled],
    reps: int,
    warmup: int,
    settle: str = "each",
    pairs: dict[str, str] | None = None,
) -> Timings:
    """Seconds per call of each program, interleaved: round 1 of all, then round 2, ...

    Each round runs the programs in a new (seeded) random order. A call pays for the one
    before it: in a fixed order, ``skip_spikes()`` measured 1.09-1.12x
    ``clip_by_global_norm`` right after ``spike_aware_clip`` (which frees two
    gradient-sized arrays per call), and 1.01x in shuffled rounds, where the neighbours'
    cost spread the paired ratios' quartiles to +-25%. So with ``settle="each"`` every
    timed call follows an untimed call of its own program, which takes that cost.

    ``pairs`` maps a program to its reference: the two run back to back in each round, in
    a random order, and their ratio is that round's ``adjacent`` ratio. The VM's speed
    changes within a round (Adam alone on the 25M-parameter tree took about 20 ms or about
    28 ms, in two clusters, in one probe, and 26-29 ms in the next), so the quartiles of
    the same-round ratios of two chains with Adam, up to 13 programs apart, lay 0.75-1.28
    in one run. Programs that allocate and free the same buffers pay alike for each other:
    ``settle="unit"`` makes one untimed call before each pair (of its first program) or
    single program, ``settle="none"`` none, in fewer calls. Where one program of a pair
    frees more than the other, each needs its own: with one untimed call before the pair,
    ``clip_by_global_norm`` on bfloat16 timed after optax's, which frees a float32 copy of
    the gradients, took 7.1 ms (IQR 3.3 ms) against 5.4 ms (IQR 1.0 ms).
    """
    if settle not in ("each", "unit", "none"):
        raise ValueError(f"settle must be 'each', 'unit' or 'none', got {settle!r}")
    pairs = pairs or {}
    by_name = {c.contender.name: c for c in compiled}
    paired = set(pairs) | set(pairs.values())
    units = [(name, ref) for name, ref in pairs.items()]
    units += [(c.contender.name,) for c in compiled if c.contender.name not in paired]
    calls: dict[str, list[float]] = {name: [] for name in by_name}
    rounds: dict[str, list[float]] = {name: [] for name in by_name}
    adjacent: dict[str, list[float]] = {name: [] for name in pairs}
    rng = np.random.default_rng(0)

    def timed(name: str) -> float:
        t0 = time.perf_counter()
        out = by_name[name].call()
        jax.block_until_ready(out)
        seconds = time.perf_counter() - t0
        del out
        calls[name].append(seconds)
        this_round[name].append(seconds)
        return seconds

    with gc_paused():
        for _ in range(warmup):
            for c in compiled:
                jax.block_until_ready(c.call())
        for _ in range(reps):
            this_round: dict[str, list[float]] = {name: [] for name in by_name}
            for i in rng.permutation(len(units)):
                seconds = {}
                for k, j in enumerate(rng.permutation(len(units[i]))):
                    name = units[i][j]
                    if settle == "each" or (settle == "unit" and k == 0):
                        jax.block_until_ready(by_name[name].call())
                    seconds[name] = timed(name)
                if len(units[i]) == 2:
                    name = units[i][0]
                    adjacent[name].append(seconds[name] / seconds[pairs[name]])
            for name, ts in this_round.items():
                rounds[name].append(float(np.median(ts)))
    return Timings(calls, rounds, adjacent, dict(pairs))


def summarize(seconds: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, IQR, min and mean in milliseconds, and the raw samples."""
    ms = np.asarray(seconds) * 1e3
    q25, median, q75 = np.percentile(ms, [25, 50, 75])
    return {
        "median_ms": float(median),
        "q25_ms": float(q25),
        "q75_ms": float(q75),
        "iqr_ms": float(q75 - q25),
        "min_ms": float(ms.min()),
        "mean_ms": float(ms.mean()),
        "samples_ms": [round(float(v), 4) for v in ms],
    }


def references(name: str) -> dict[str, str]:
    """What a contender is compared with: its optax equivalent, Adam alone, the floors."""
    refs = {"vs_floor_read": FLOOR_READ, "vs_floor_rw": FLOOR_RW}
    if name == OC_CLIP:
        refs["vs_no_rescue"] = OC_NO_RESCUE
    if name in OPTAX_EQUIVALENT:
        refs["vs_optax"] = OPTAX_EQUIVALENT[name]
    if name in CHAINS or name == SCALE_CHAIN:
        refs["vs_adam"] = ADAM
    if name == OC_VALUE:
        refs["vs_stats_by_hand"] = OX_VALUE_STATS
    return refs


def add_ratios(results: dict[str, dict[str, Any]], times: Timings) -> None:
    """Ratios of medians to each reference, and paired ratios.

    A paired ratio divides a program's time by the reference's: timed back to back where
    the two are a pair of :func:`time_round_robin` (``TIMED_PAIRS``), else in the same
    round (each round runs every program, shuffled). Slow drift in the machine's load
    cancels; the median and quartiles say whether a difference is larger than the noise.
    """
    for name, r in results.items():
        refs = {k: ref for k, ref in references(name).items() if ref in results}
        r["ratios"] = {k: r["median_ms"] / results[ref]["median_ms"] for k, ref in refs.items()}
        r["paired_ratios"] = {}
        for k, ref in refs.items():
            q25, median, q75 = np.percentile(times.per_round(name, ref), [25, 50, 75])
            r["paired_ratios"][k] = {"median": float(median), "q25": float(q25), "q75": float(q75)}


def max_relative_difference(a: Any, b: Any) -> float:
    """max |a - b| / max |b| over all leaves, in float32 (a sanity check, not a metric)."""
    diff = max(
        float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )
    scale = max(float(jnp.max(jnp.abs(y.astype(jnp.float32)))) for y in jax.tree.leaves(b))
    return diff / scale if scale else diff


def stats_by_hand_difference(ours: Any, by_hand: Any) -> float:
    """The largest relative difference between ``oc.clip_by_value``'s output and
    statistics (``ours``: updates and state) and :func:`optax_clip_with_stats`'s."""
    (out, state), (ref_out, ref) = ours, by_hand
    diffs = [max_relative_difference(out, ref_out)]
    for field in ("norm", "scale", "clipped"):
        a, b = float(getattr(state.stats, field)), float(ref[field])
        diffs.append(abs(a - b) / abs(b) if b else abs(a))
    return max(diffs)


def bench_tree(spec: TreeSpec, sizes: Sizes) -> dict[str, Any]:
    """Builds the tree, compiles and times every contender, and inspects the programs."""
    grads = random_tree(spec.shapes, spec.dtype, SEED)
    params = jax.tree.map(jnp.zeros_like, grads)
    leaves = jax.tree.leaves(grads)
    grad_bytes = sum(x.nbytes for x in leaves)
    largest_leaf = max(x.nbytes for x in leaves)

    compiled = compile_contenders(make_contenders(grads, params, spec.with_chains))
    by_name = {c.contender.name: c for c in compiled}

    norm = math.sqrt(float(by_name[FLOOR_READ].call()))
    if not norm > MAX_NORM:
        raise RuntimeError(f"{spec.key}: global norm {norm} does not exceed {MAX_NORM}")
    clip_diff = max_relative_difference(by_name[OC_CLIP].call()[0], by_name[OX_CLIP].call()[0])
    # Every optaxclip clipper against its optax equivalent, and the rescue-free variant.
    pairs = {n: e for n, e in OPTAX_EQUIVALENT.items() if n not in CHAINS and n in by_name}
    pairs[OC_NO_RESCUE] = OC_CLIP
    pair_diffs = {
        name: max_relative_difference(by_name[name].call()[0], by_name[ref].call()[0])
        for name, ref in pairs.items()
    }

    stats_diff = None
    if OX_VALUE_STATS in by_name:
        stats_diff = stats_by_hand_difference(
            by_name[OC_VALUE].call(), by_name[OX_VALUE_STATS].call()
        )

    timed_pairs = {n: r for n, r in TIMED_PAIRS.items() if n in by_name and r in by_name}
    times = time_round_robin(compiled, sizes.reps, sizes.warmup, pairs=timed_pairs)
    results = {}
    for c in compiled:
        name = c.contender.name
        results[name] = {
            **summarize(times.calls[name]),
            "lower_s": c.lower_s,
            "compile_s": c.compile_s,
            **inspect_compiled(c, grad_bytes, largest_leaf),
        }
    add_ratios(results, times)
    rescue = rescue_cost(by_name[OC_CLIP], by_name[OC_NO_RESCUE], sizes.rescue_reps)
    skipped = [] if spec.with_chains else [ADAM, OC_CHAIN, OX_CHAIN, SCALE_CHAIN, OX_VALUE_STATS]
    return {
        "title": spec.title,
        "dtype": str(jnp.dtype(spec.dtype)),
        "leaves": len(leaves),
        "params": sum(x.size for x in leaves),
        "grad_bytes": grad_bytes,
        "largest_leaf_bytes": largest_leaf,
        "global_norm": norm,
        "max_norm": MAX_NORM,
        "clip_max_rel_diff_vs_optax": clip_diff,
        "pair_max_rel_diff": pair_diffs,
        "value_stats_by_hand_max_rel_diff": stats_diff,
        "targets": tree_targets(results, rescue),
        "references": tree_references(results),
        "reps": sizes.reps,
        "warmup": sizes.warmup,
        "rescue_cost": rescue,
        "skipped": skipped,
        "contenders": results,
        "temp_check": temp_check(results, grad_bytes, largest_leaf),
    }


def paired_median_ci(ratios: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """The median of per-round ratios and a bootstrap interval for it (2,000 resamples,
    seeded): the range of medians a rerun of as many rounds would give."""
    ratios = np.asarray(ratios, np.float64)
    rng = np.random.default_rng(0)
    medians = np.median(rng.choice(ratios, (2000, ratios.size)), axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(medians, [tail, 100 - tail])
    return float(np.median(ratios)), float(lo), float(hi)


def rescue_cost(ours: Compiled, without: Compiled, reps: int) -> dict[str, Any]:
    """What the untaken rescue costs: ``clip_by_global_norm`` against the same clipper
    without its rescue (:func:`without_rescue`), in ``reps`` paired rounds of the two alone.

    The rescue adds a few scalar kernels and a while thunk whose loop does not run: too
    little to measure in 300 paired rounds in one process (1.0001x on the 25M float32
    tree, 95% interval 0.996-1.0035), while the quartiles of the paired ratios lie 3-5%
    apart on this VM, and over the 30 rounds of all programs the median read 0.97-1.04x
    from run to run. So it gets rounds of its own (120 in a full run, about 3 s on the 25M
    tree; the two programs free the same buffers, so no untimed call precedes each timed
    one), and its target is met when the 95% interval of the paired median reaches 1.00:
    no cost that the rounds can tell from none. The interval covers one run's rounds, not
    the spread between runs, which is wider (runs 32 and 33 on 2,000 small leaves: 0.989x,
    0.977-0.997, and 1.022x, 1.000-1.038).
    """
    pair = {ours.contender.name: without.contender.name}
    times = time_round_robin([ours, without], reps, 1, settle="none", pairs=pair)
    median, lo, hi = paired_median_ci(times.adjacent[ours.contender.name])
    return {"reps": reps, "median": median, "ci95": [lo, hi]}


def tree_targets(results: dict[str, Any], rescue: dict[str, Any]) -> dict[str, Any]:
    """The issue's runtime targets on this tree, from paired medians (the ratio of each
    round's time to the reference's, the two timed back to back); the rescue's from its own
    rounds (:func:`rescue_cost`)."""
    paired = lambda name, key: results[name]["paired_ratios"][key]["median"]
    out: dict[str, Any] = {}
    for name, ref in OPTAX_EQUIVALENT.items():
        if name in results and ref in results and name not in CHAINS:
            out[f"{name} / {ref}"] = {"ratio": paired(name, "vs_optax"), "target": 1.0}
    floor = results[FLOOR_READ]["median_ms"] + results[FLOOR_RW]["median_ms"]
    out["clip_by_global_norm / (read + read-write floors)"] = {
        "ratio": results[OC_CLIP]["median_ms"] / floor,
        "target": 1.2,
    }
    if OC_CHAIN in results:
        out["chain(clip_by_global_norm, adam) / adam"] = {
            "ratio": paired(OC_CHAIN, "vs_adam"),
            "target": 1.15,
        }
    for v in out.values():
        v["met"] = bool(v["ratio"] <= v["target"])
    lo, hi = rescue["ci95"]
    out["clip_by_global_norm / rescue removed"] = {
        "ratio": rescue["median"],
        "ci95": [lo, hi],
        "rounds": rescue["reps"],
        "target": 1.0,
        "met": bool(lo <= 1.0),  # no cost the rounds can tell from none
    }
    return out


def tree_references(results: dict[str, Any]) -> dict[str, float]:
    """Paired ratios that are not targets but bear on one: Adam after a scaling by a
    runtime scalar (no norm) against Adam alone, beside the chain's target; and
    ``clip_by_value`` against ``optax.clip`` with the same statistics computed by hand,
    beside its target (what the statistics cost written another way)."""
    out = {}
    if SCALE_CHAIN in results:
        out[f"{SCALE_CHAIN} / adam"] = results[SCALE_CHAIN]["paired_ratios"]["vs_adam"]["median"]
    if OX_VALUE_STATS in results:
        ratio = results[OC_VALUE]["paired_ratios"]["vs_stats_by_hand"]["median"]
        out[f"{OC_VALUE} / ({OX_VALUE_STATS})"] = ratio
    return out


def temp_check(results: dict[str, Any], grad_bytes: int, largest_leaf: int) -> dict[str, Any]:
    """Which programs hold a gradient-sized (or leaf-sized) temporary buffer?

    "Gradient-sized" means at least half the gradient bytes (say, a materialised clipped
    copy of the gradients); "leaf-sized" means at least the largest leaf. The question is
    asked of our chain(clip, adam); optax's chain and Adam alone are the references.

    XLA may place an intermediate in an output buffer before the output is written there,
    so a small temp size does not prove that nothing gradient-sized was materialised; the
    bytes written by the kernels, beyond Adam's own, do.
    """
    names = [n for n in (OC_CHAIN, OX_CHAIN, ADAM, OC_CLIP, OX_CLIP) if n in results]
    if OC_CHAIN not in names or "temp_bytes" not in results[OC_CHAIN]:
        return {}
    temp = {name: results[name]["temp_bytes"] for name in names}
    return {
        "temp_bytes": temp,
        "gradient_sized": {name: t >= grad_bytes / 2 for name, t in temp.items()},
        "leaf_sized": {name: t >= largest_leaf for name, t in temp.items()},
        "ours_extra_temp_vs_adam_bytes": temp[OC_CHAIN] - temp[ADAM],
        "extra_kernel_writes_vs_adam_over_grad": {
            name: (results[name]["kernel_written_bytes"] - results[ADAM]["kernel_written_bytes"])
            / grad_bytes
            for name in CHAINS
        },
    }


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def steady_allocator() -> bool:
    """Makes glibc's malloc keep the memory it frees and serve every allocation from it.

    An update jitted without donated buffers allocates its outputs on every call (100 MB on
    the float32 tree). glibc maps allocations above its mmap threshold (at most 32 MB)
    afresh each time and gives freed heap memory back to the OS, so a call paid the page
    faults of its outputs in some rounds and not others: step times fell in two groups
    (about 11 and 18 ms for an update, 46 and 54 ms in a chain with Adam) and paired ratios
    of one run swung up to 1.67x (``adagc``; optax's own clip 1.61x against ours). With no
    mmap and no trimming, the same run's ratios were 0.99-1.03x and a chain's step 34 ms
    instead of 52. Every program allocates the same outputs, and a training loop with
    donated buffers reuses them; the peak-memory benchmark runs in processes of its own,
    untouched. Returns whether glibc took both settings (False elsewhere).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    no_mmap = mallopt(_M_MMAP_MAX, 0) == 1
    no_trim = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return no_mmap and no_trim


def timing_machine() -> dict[str, Any]:
    """:func:`machine_info` and the load average at start, for a timed benchmark, after
    :func:`steady_allocator` (whether glibc took it is recorded)."""
    return {
        **machine_info(),
        "load_average_start": load_average(),
        "steady_allocator": steady_allocator(),
    }


def machine_info() -> dict[str, Any]:
    """Processor, core count, library versions and the JAX device."""
    device = jax.devices()[0]
    return {
        "processor": platform.processor() or _cpu_model_name(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "optax": optax.__version__,
        "optaxclip": oc.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "device": str(device),
        "device_kind": device.device_kind,
    }


def _cpu_model_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), where ``platform.processor()`` is empty."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table with right-aligned numeric columns (all but the first)."""
    align = ["---"] + ["---:"] * (len(headers) - 1)
    lines = [headers, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _ms(x: float) -> str:
    return f"{x:.2f}" if x >= 10 else f"{x:.3f}"


def _ratio(ratios: dict[str, float], key: str) -> str:
    return f"{ratios[key]:.2f}" if key in ratios else "—"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _paired(paired: dict[str, dict[str, float]], key: str) -> str:
    if key not in paired:
        return "—"
    p = paired[key]
    return f"{p['median']:.2f} ({p['q25']:.2f}–{p['q75']:.2f})"


def timing_table(results: dict[str, Any]) -> str:
    """Times, ratios of medians (paired ratio to optax with its IQR too) and compile times."""
    headers = [
        "contender",
        "median ms",
        "IQR ms",
        "× optax",
        "× optax paired (IQR)",
        "× adam",
        "× read floor",
        "× r+w floor",
        "trace+lower s",
        "compile s",
    ]
    rows = [
        [
            name,
            _ms(r["median_ms"]),
            _ms(r["iqr_ms"]),
            _ratio(r["ratios"], "vs_optax"),
            _paired(r["paired_ratios"], "vs_optax"),
            _ratio(r["ratios"], "vs_adam"),
            _ratio(r["ratios"], "vs_floor_read"),
            _ratio(r["ratios"], "vs_floor_rw"),
            f"{r['lower_s']:.2f}",
            f"{r['compile_s']:.2f}",
        ]
        for name, r in results.items()
    ]
    return markdown_table(headers, rows)


def targets_table(tree: dict[str, Any]) -> str:
    """Each runtime target on this tree: the measured ratio, the target, met or not."""
    diffs = tree.get("pair_max_rel_diff", {})
    rows = []
    for name, t in tree["targets"].items():
        diff = diffs.get(name.split(" / ")[0])
        ci = t.get("ci95")
        rows.append(
            [
                name,
                f"{t['ratio']:.3f}" + ("" if ci is None else f" ({ci[0]:.3f}–{ci[1]:.3f})"),
                f"≤ {t['target']:.2f}" + ("" if ci is None else " within the 95% interval"),
                "yes" if t["met"] else "**no**",
                "—" if diff is None else f"{diff:.1e}",
            ]
        )
    return markdown_table(["ratio", "measured", "target", "met", "max rel. diff of outputs"], rows)


def memory_table(results: dict[str, Any]) -> str:
    """XLA's temp and output sizes, and what the entry computation's kernels write."""
    headers = [
        "program",
        "temp",
        "temp / grad bytes",
        "temp / largest leaf",
        "output / grad bytes",
        "kernel writes / grad bytes",
        "entry kernels",
    ]
    rows = [
        [
            name,
            _bytes(r.get("temp_bytes", math.nan)),
            f"{r.get('temp_over_grad', math.nan):.4f}",
            f"{r.get('temp_over_largest_leaf', math.nan):.3f}",
            f"{r.get('output_over_grad', math.nan):.2f}",
            f"{r['kernel_written_over_grad']:.2f}",
            str(r["entry_kernels"]),
        ]
        for name, r in results.items()
    ]
    return markdown_table(headers, rows)


def report_tree(tree: dict[str, Any]) -> str:
    """The markdown section of one tree: header, timing table, memory table, findings."""
    lines = [
        f"leaves: {tree['leaves']:,}; parameters: {tree['params']:,}; "
        f"gradient bytes: {_bytes(tree['grad_bytes'])}; largest leaf: "
        f"{_bytes(tree['largest_leaf_bytes'])}",
        f"global norm {tree['global_norm']:.1f} > max_norm {tree['max_norm']} (every step "
        f"clips); optaxclip vs optax clipped updates: max rel. diff "
        f"{tree['clip_max_rel_diff_vs_optax']:.2e}",
        f"timing: median and IQR over {tree['reps']} calls per program (after "
        f"{tree['warmup']} warm-up), round-robin; ratios are of medians",
        "",
        timing_table(tree["contenders"]),
        "",
    ]
    if tree["skipped"]:
        lines += [
            "Not timed on this tree: " + ", ".join(tree["skipped"]) + ".",
            "",
        ]
    lines += ["Targets (paired medians; floors: ratio of medians):", "", targets_table(tree), ""]
    for name, ratio in tree.get("references", {}).items():
        lines += [f"Reference, not a target: {name} = {ratio:.3f} (paired median).", ""]
    lines += ["XLA memory analysis of each compiled program:", "", memory_table(tree["contenders"])]
    if tree["temp_check"]:
        lines += ["", temp_verdict(tree["temp_check"], tree["grad_bytes"])]
    return "\n".join(lines)


def temp_verdict(check: dict[str, Any], grad_bytes: int) -> str:
    """One sentence: does our chain hold a gradient-sized temporary, and do the references?"""
    temp = check["temp_bytes"]
    extra = check["extra_kernel_writes_vs_adam_over_grad"]
    yes_no = lambda name: "yes" if check["gradient_sized"][name] else "no"
    if check["gradient_sized"][OC_CHAIN]:
        same = temp[OC_CHAIN] <= 1.01 * temp[OX_CHAIN]
        ours = "**yes**" + (", no larger than optax's chain's" if same else "")
    elif check["leaf_sized"][OC_CHAIN]:
        ours = "**no**, but one at least as large as the largest leaf"
    else:
        ours = "**no**, not even one as large as the largest leaf"
    of_grads = lambda name: f"{_bytes(temp[name])} = {temp[name] / grad_bytes:.4f} × gradient bytes"
    return (
        f"Gradient-sized temporary in {OC_CHAIN}: {ours}: temp "
        f"{of_grads(OC_CHAIN)}; {OX_CHAIN}: {yes_no(OX_CHAIN)}, {of_grads(OX_CHAIN)}; "
        f"{ADAM} alone: {of_grads(ADAM)}; ours minus adam alone: "
        f"{_bytes(check['ours_extra_temp_vs_adam_bytes'])}. Kernel writes beyond adam "
        f"alone's: ours {extra[OC_CHAIN]:.2f} × gradient bytes, optax's chain "
        f"{extra[OX_CHAIN]:.2f} × (about 1.0 is a materialised clipped copy of the "
        f"gradients, wherever XLA puts it)."
    )


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other work on the machine skews the timings)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


LEGEND = f"""
Threshold {MAX_NORM} on standard-normal gradients: every call clips. Floors: one read of
every gradient byte (float32 sum of squares) and one read + one write (x * s). A clipper
reads twice and writes once (ideal: read floor + r+w floor); in a chain the scaling can
fuse into Adam (ideal: adam + read floor). "× optax paired" is the median of per-round
ratios (each round runs every program in a shuffled order, a clipper back to back with its
optax equivalent and a chain with Adam), robust to drift in the machine's load."""


def report_machine(machine: dict[str, Any]) -> str:
    return (
        f"machine: {machine['processor']} ({machine['machine']}), {machine['cpu_count']} CPUs "
        f"({machine['usable_cpus']} usable), {machine['platform']}\n"
        f"jax {machine['jax']} (jaxlib {machine['jaxlib']}), optax {machine['optax']}, "
        f"optaxclip {machine['optaxclip']}, numpy {machine['numpy']}, python "
        f"{machine['python']}; device: {machine['device']} ({machine['backend']}, "
        f"{machine['device_kind']}); load average at start: {machine['load_average_start']}"
        + (
            "; glibc malloc: no mmap, no trim (steady_allocator)"
            if machine.get("steady_allocator")
            else ""
        )
    )


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def check_out_path(parser: argparse.ArgumentParser, out: Path) -> None:
    """Exits through ``parser.error`` unless ``out`` is a writable file path."""
    if out.exists() and out.is_dir():
        parser.error(f"--out {out} is a directory; give a file path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out: cannot create directory {out.parent}: {e}")
    if not os.access(out.parent, os.W_OK):
        parser.error(f"--out: directory {out.parent} is not writable")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses and checks the options; exits with status 2 and a message on bad ones."""
    parser = argparse.ArgumentParser(
        description="Time optaxclip.clip_by_global_norm against optax, adam and the "
        "memory floor on three gradient trees; print markdown tables and write JSON.",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON output path (default: {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small trees and few repetitions: a smoke run of a few seconds",
    )
    parser.add_argument(
        "--reps",
        type=_positive_int,
        default=None,
        help=f"timed calls per program (default {FULL.reps}, {QUICK.reps} with --quick)",
    )
    parser.add_argument(
        "--warmup",
        type=_non_negative_int,
        default=None,
        help=f"untimed calls per program first (default {FULL.warmup}, "
        f"{QUICK.warmup} with --quick)",
    )
    parser.add_argument(
        "--trees",
        nargs="+",
        choices=TREE_KEYS,
        default=list(TREE_KEYS),
        metavar="TREE",
        help=f"the trees to run, among {', '.join(TREE_KEYS)} (default: all)",
    )
    parser.add_argument(
        "--small-tree-chains",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time adam and both chains on the small-leaf tree too (default; about a minute "
        "of compilation on CPU)",
    )
    args = parser.parse_args(argv)
    check_out_path(parser, args.out)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    base = QUICK if args.quick else FULL
    sizes = replace(
        base,
        reps=base.reps if args.reps is None else args.reps,
        warmup=base.warmup if args.warmup is None else args.warmup,
    )
    # Compile times must be real compilations, not persistent-cache hits.
    jax.config.update("jax_enable_compilation_cache", False)

    machine = timing_machine()
    print("# optaxclip.clip_by_global_norm benchmark" + (" (--quick)" if args.quick else ""))
    print()
    print(report_machine(machine))
    print(LEGEND)
    trees = {}
    for spec in tree_specs(sizes, args.small_tree_chains):
        if spec.key not in args.trees:
            continue
        print(f"\n## {spec.key}: {spec.title}\n", flush=True)
        trees[spec.key] = bench_tree(spec, sizes)
        print()
        print(report_tree(trees[spec.key]), flush=True)

    wall = time.perf_counter() - start
    record = {
        "benchmark": "bench_clip",
        "quick": args.quick,
        "small_tree_chains": args.small_tree_chains,
        "sizes": asdict(sizes),
        "max_norm": MAX_NORM,
        "learning_rate": LEARNING_RATE,
        "seed": SEED,
        "machine": machine,
        "trees": trees,
        "wall_s": wall,
        "load_average_end": load_average(),
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\ntotal wall time: {wall:.1f} s; load average at end: {record['load_average_end']}")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
