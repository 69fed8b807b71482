"""The clipping arena: which clipper saves a training run that explodes or spikes?

Trains small Flax (nnx) models on tasks known for exploding gradients and loss spikes, with
each clipping method of optaxclip and several seeds at once (all seeds of a method train in
one jitted, vmapped step), and reports success rate, final loss, loss spikes, diverged runs,
the fraction of steps clipped and the time per step, as a table, JSON, CSV and a figure.

Tasks:

* ``adding`` and ``temporal-order``: the synthetic long-range problems of Pascanu, Mikolov &
  Bengio 2013 (section 5; after Hochreiter & Schmidhuber 1997), learned by a tanh RNN of 50
  units with plain SGD, sequence length ``seq_len`` (a list sweeps lengths). A run succeeds
  when its test error is under the criterion (adding: mean squared error < 0.04, where
  predicting the mean scores 1/6; temporal order: < 1% of test sequences misclassified).
* ``spiky-lm``: a small decoder-only transformer trained with Adam at a high learning rate
  and no warm-up on a synthetic sequence task generated on the fly (no downloads); it counts
  loss spikes (a loss above twice its running median) and diverged runs.

Command line: ``optaxclip-arena`` or ``python -m optaxclip.arena`` (``--help``). Needs the
``examples`` extra (flax, tqdm, matplotlib): ``pip install "optaxclip[examples]"``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc
from optaxclip._cli import positive_float, positive_int

# ---------------------------------------------------------------------------
# Methods: the clipper placed in front of the task's optimizer
# ---------------------------------------------------------------------------

#: Each method's clipper with its defaults, or the arena setting given here (None: no clipping).
METHODS: dict[str, Callable[[], optax.GradientTransformation | None]] = {
    "none": lambda: None,
    "clip_by_value": lambda: oc.clip_by_value(0.1),
    "clip_by_global_norm": lambda: oc.clip_by_global_norm(1.0),
    "clip_by_leaf_norm": lambda: oc.clip_by_leaf_norm(1.0),
    "clip_by_block_rms": lambda: oc.clip_by_block_rms(0.1),
    "adaptive_grad_clip": lambda: oc.adaptive_grad_clip(0.01),
    "autoclip": lambda: oc.autoclip(10.0),
    "zclip": lambda: oc.zclip(),
    "adagc": lambda: oc.adagc(),
    "spike_aware_clip": lambda: oc.spike_aware_clip(),
    "quantile_clip": lambda: oc.quantile_clip(),
}

#: Where a method's arena setting is not the factory's default, and why.
METHOD_NOTES = {
    "clip_by_value": "max_value=0.1 (no default in the API)",
    "clip_by_global_norm": "max_norm=1.0",
    "clip_by_leaf_norm": "max_norm=1.0",
    "clip_by_block_rms": "max_rms=0.1",
    "adaptive_grad_clip": "clipping=0.01 (NFNets)",
    "autoclip": "percentile=10 (the paper's recommendation)",
}

TASKS = ("adding", "temporal-order", "spiky-lm")

# ---------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
    """What the arena needs to know about a task."""

    name: str
    steps: int
    lr: float
    seq_len: tuple[int, ...]
    batch: int
    methods: tuple[str, ...]  # the default comparison
    optimizer: Callable[[float], optax.GradientTransformation]
    success_metric: str | None  # "mse" / "error" (RNN tasks) or None


_RNN_METHODS = ("none", "clip_by_value", "clip_by_global_norm", "zclip", "autoclip", "adagc")
_LM_METHODS = ("none", "clip_by_global_norm", "zclip", "autoclip", "adagc", "spike_aware_clip")

TASK_SETTINGS = {
    "adding": Task("adding", 1500, 0.1, (10, 25, 50), 20, _RNN_METHODS, optax.sgd, "mse"),
    "temporal-order": Task(
        "temporal-order", 1500, 0.1, (10, 25, 50), 20, _RNN_METHODS, optax.sgd, "error"
    ),
    "spiky-lm": Task("spiky-lm", 300, 1e-2, (32,), 16, _LM_METHODS, optax.adam, None),
}

HIDDEN = 50
_SYMBOLS = 6  # temporal order: four distractors a-d, then X and Y
SUCCESS_MSE, SUCCESS_ERROR = 0.04, 0.01


def _adding_batch(key, batch: int, length: int):
    """Values in U(0, 1) and two markers, one in each half; the target is their sum."""
    k1, k2, k3 = jax.random.split(key, 3)
    values = jax.random.uniform(k1, (batch, length))
    half = max(length // 2, 1)
    first = jax.random.randint(k2, (batch,), 0, half)
    second = jax.random.randint(k3, (batch,), half, max(length, half + 1))
    marks = jax.nn.one_hot(first, length) + jax.nn.one_hot(second, length)
    x = jnp.stack([values, marks], axis=-1)
    return x, jnp.sum(values * marks, axis=1)


def _temporal_order_batch(key, batch: int, length: int):
    """Distractors a-d, with X or Y at one step in [10%, 20%) and one in [50%, 60%) of the
    sequence; the class (0-3) is which of XX, XY, YX, YY appeared, in order."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    symbols = jax.random.randint(k1, (batch, length), 0, 4)
    lo1, hi1 = int(0.1 * length), max(int(0.2 * length), int(0.1 * length) + 1)
    lo2, hi2 = int(0.5 * length), max(int(0.6 * length), int(0.5 * length) + 1)
    t1 = jax.random.randint(k2, (batch,), lo1, hi1)
    t2 = jax.random.randint(k3, (batch,), lo2, hi2)
    which = jax.random.randint(k4, (batch, 2), 0, 2)  # 0: X, 1: Y
    rows = jnp.arange(batch)
    symbols = symbols.at[rows, t1].set(4 + which[:, 0]).at[rows, t2].set(4 + which[:, 1])
    return jax.nn.one_hot(symbols, _SYMBOLS), 2 * which[:, 0] + which[:, 1]


def _lm_batch(key, batch: int, length: int, vocab: int = 16):
    """Sequences ``p, p, ...``: a random prefix of ``length // 2`` tokens repeated; the model
    predicts each next token (the second half is learnable by copying)."""
    prefix = jax.random.randint(key, (batch, length // 2), 1, vocab)
    seq = jnp.concatenate([prefix, prefix], axis=1)
    return seq[:, :-1], seq[:, 1:]


def _models():
    """The Flax nnx models (imported lazily: flax is only needed to run the arena)."""
    from flax import nnx

    class TanhRNN(nnx.Module):
        """h_t = tanh(x_t W_in + h_{t-1} W_rec + b); the output reads the last state."""

        def __init__(self, n_in: int, n_out: int, *, rngs: nnx.Rngs):
            k1, k2, k3 = (rngs.params() for _ in range(3))
            self.w_in = nnx.Param(jax.random.normal(k1, (n_in, HIDDEN)) * 0.5)
            # Spectral radius above 1 (Pascanu et al.'s exploding regime).
            self.w_rec = nnx.Param(jax.random.orthogonal(k2, HIDDEN) * 1.1)
            self.b = nnx.Param(jnp.zeros(HIDDEN))
            self.w_out = nnx.Param(jax.random.normal(k3, (HIDDEN, n_out)) / math.sqrt(HIDDEN))
            self.b_out = nnx.Param(jnp.zeros(n_out))

        def __call__(self, x):
            def step(h, x_t):
                return jnp.tanh(x_t @ self.w_in + h @ self.w_rec + self.b), None

            h0 = jnp.zeros((x.shape[0], HIDDEN))
            h, _ = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
            return h @ self.w_out + self.b_out

    class Block(nnx.Module):
        def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
            self.norm1 = nnx.LayerNorm(d, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(
                num_heads=heads, in_features=d, decode=False, rngs=rngs
            )
            self.norm2 = nnx.LayerNorm(d, rngs=rngs)
            self.up = nnx.Linear(d, 4 * d, rngs=rngs)
            self.down = nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, x, mask):
            x = x + self.attn(self.norm1(x), mask=mask)
            return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))

    class TinyLM(nnx.Module):
        """A decoder-only transformer: embeddings, 2 pre-norm blocks, a tied-free head."""

        def __init__(self, vocab: int, length: int, *, rngs: nnx.Rngs, d: int = 64):
            self.embed = nnx.Embed(vocab, d, rngs=rngs)
            self.pos = nnx.Param(jax.random.normal(rngs.params(), (length, d)) * 0.02)
            self.blocks = nnx.List([Block(d, 4, rngs=rngs) for _ in range(2)])
            self.norm = nnx.LayerNorm(d, rngs=rngs)
            self.head = nnx.Linear(d, vocab, rngs=rngs)

        def __call__(self, tokens):
            length = tokens.shape[1]
            x = self.embed(tokens) + self.pos[:length]
            mask = nnx.make_causal_mask(tokens)
            for block in self.blocks:
                x = block(x, mask)
            return self.head(self.norm(x))

    return nnx, TanhRNN, TinyLM


# ---------------------------------------------------------------------------
# Training: every seed of one method (and one sequence length) in one jitted step
# ---------------------------------------------------------------------------

_TEST_SIZE = 512
_CHUNK = 50  # steps per jitted call (a scan); the progress bar moves once per chunk


def _problem(task: Task, length: int):
    """(make_model(key) -> model, batch(key) -> (x, y), loss(model, x, y), test metric)."""
    nnx, TanhRNN, TinyLM = _models()
    if task.name == "spiky-lm":
        vocab = 16

        def make(key):
            return TinyLM(vocab, length, rngs=nnx.Rngs(key))

        def batch(key):
            return _lm_batch(key, task.batch, length, vocab)

        def loss(model, x, y):
            half = length // 2  # the first half is random: only the copy is learnable
            ce = optax.softmax_cross_entropy_with_integer_labels(model(x)[:, half:], y[:, half:])
            return jnp.mean(ce)

        return make, batch, loss, None
    if task.name == "adding":

        def make(key):
            return TanhRNN(2, 1, rngs=nnx.Rngs(key))

        def batch(key):
            return _adding_batch(key, task.batch, length)

        def loss(model, x, y):
            return jnp.mean((model(x)[:, 0] - y) ** 2)

        def metric(model, x, y):
            return loss(model, x, y)

        test = _adding_batch(jax.random.key(12345), _TEST_SIZE, length)
        return make, batch, loss, (metric, test)

    def make(key):
        return TanhRNN(_SYMBOLS, 4, rngs=nnx.Rngs(key))

    def batch(key):
        return _temporal_order_batch(key, task.batch, length)

    def loss(model, x, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model(x), y))

    def metric(model, x, y):
        return jnp.mean(jnp.argmax(model(x), axis=-1) != y)

    test = _temporal_order_batch(jax.random.key(12345), _TEST_SIZE, length)
    return make, batch, loss, (metric, test)


def _run_one(task: Task, factory, length: int, seeds: int, steps: int, lr: float, bar):
    """Trains ``seeds`` runs with ``factory()``'s clipper; returns per-step curves and the
    test metric."""
    from flax import nnx

    make, batch, loss_fn, test = _problem(task, length)
    clipper = factory()
    tx = task.optimizer(lr) if clipper is None else optax.chain(clipper, task.optimizer(lr))

    graphdef, _ = nnx.split(make(jax.random.key(0)))

    def init(key):
        params = nnx.split(make(key))[1]
        return params, tx.init(params)

    def train_step(carry, key):
        params, opt_state = carry

        def objective(p):
            return loss_fn(nnx.merge(graphdef, p), *batch(key))

        loss, grads = jax.value_and_grad(objective)(params)
        norm = oc.global_norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        s = oc.stats(opt_state)  # the clipper's ClipStats (the optimizer records none)
        name = next((k.split("/")[0] for k in s if k.endswith("/threshold")), None)
        threshold = s[f"{name}/threshold"] if name else jnp.float32(jnp.nan)
        clipped = (s[f"{name}/clipped"] > 0) if name else jnp.bool_(False)
        return (params, opt_state), (loss, norm, threshold, clipped)

    def chunk(params, opt_state, keys):
        (params, opt_state), out = jax.lax.scan(train_step, (params, opt_state), keys)
        return params, opt_state, out

    run_chunk = jax.jit(jax.vmap(chunk))
    seed_keys = jax.random.split(jax.random.key(2013), seeds)
    params, opt_state = jax.jit(jax.vmap(init))(seed_keys)
    step_keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, 1), steps))(seed_keys)

    curves: list[Any] = []
    start, compiled_at = time.perf_counter(), None
    for first in range(0, steps, _CHUNK):
        keys = step_keys[:, first : first + _CHUNK]
        params, opt_state, out = run_chunk(params, opt_state, keys)
        jax.block_until_ready(out)
        if compiled_at is None:
            compiled_at = time.perf_counter()
        curves.append(out)
        if bar is not None:
            bar.update(keys.shape[1])
    elapsed = time.perf_counter() - (compiled_at or start)
    timed_steps = max(steps - min(_CHUNK, steps), 1)
    loss, norm, threshold, clipped = (
        np.concatenate([np.asarray(c[i]) for c in curves], axis=1) for i in range(4)
    )
    metric = None
    if test is not None:
        metric_fn, (x, y) = test
        metric = np.asarray(
            jax.jit(jax.vmap(lambda p: metric_fn(nnx.merge(graphdef, p), x, y)))(params)
        )
    return {
        "loss": loss,
        "norm": norm,
        "threshold": threshold,
        "clipped": clipped,
        "metric": metric,
        "ms_per_step": 1e3 * elapsed / timed_steps if steps > _CHUNK else math.nan,
    }


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


def _spikes(loss: np.ndarray, window: int = 20) -> np.ndarray:
    """Per seed: steps whose loss exceeds twice the median of the previous ``window`` losses."""
    counts = np.zeros(loss.shape[0], int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows (diverged runs)
        for t in range(window, loss.shape[1]):
            median = np.nanmedian(loss[:, t - window : t], axis=1)
            counts += loss[:, t] > 2 * median
    return counts


@dataclasses.dataclass
class ArenaResult:
    """What :func:`run` measured: ``rows`` (one dict per method and length) and ``curves``."""

    task: str
    rows: list[dict[str, Any]]
    curves: dict[tuple[str, int], dict[str, np.ndarray]]
    settings: dict[str, Any]

    def table(self) -> str:
        """The results as a markdown table."""
        rnn = self.rows and self.rows[0]["success_rate"] is not None
        head = ["method", "seq_len"] + (["success"] if rnn else [])
        head += ["final loss", "spikes", "diverged", "steps clipped", "ms/step"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [r["method"], str(r["seq_len"])]
            if rnn:
                cells.append(f"{r['success_rate']:.0%}")
            cells += [
                f"{r['final_loss']:.4g}",
                f"{r['spikes']:.1f}",
                f"{r['diverged']}/{r['seeds']}",
                f"{r['clipped_fraction']:.0%}",
                f"{r['ms_per_step']:.2f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_json(self, path: str | Path) -> None:
        curves = {
            f"{m}@{n}": {k: np.where(np.isfinite(v), v, None).tolist() for k, v in c.items()}
            for (m, n), c in self.curves.items()
        }
        record = {"task": self.task, "settings": self.settings, "rows": self.rows}
        record["curves"] = curves
        Path(path).write_text(json.dumps(record, default=_json_default) + "\n")

    def to_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)

    def _focus_length(self) -> int:
        """The length whose methods disagree most (success, else final loss): the one to draw."""
        lengths = sorted({n for _, n in self.curves})

        def spread(n):
            rows = [r for r in self.rows if r["seq_len"] == n]
            key = "success_rate" if rows[0]["success_rate"] is not None else "final_loss"
            values = [r[key] for r in rows if math.isfinite(r[key])]
            return (max(values) - min(values)) if values else 0.0

        return max(lengths, key=lambda n: (spread(n), n))

    def plot(self, path: str | Path) -> None:
        """Three panels: success rate against sequence length (final loss per method for
        spiky-lm); training loss; the global norm against each method's threshold (both at
        the length where the methods differ most, medians over seeds, smoothed)."""
        from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

        length = self._focus_length()
        methods = [m for m, n in self.curves if n == length]
        fig = Figure(figsize=(16, 4.6))
        ax_summary, ax_loss, ax_norm = fig.subplots(1, 3)
        colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
        rnn = self.rows[0]["success_rate"] is not None
        if rnn:
            for method in methods:
                rows = [r for r in self.rows if r["method"] == method]
                lengths = [r["seq_len"] for r in rows]
                success = [100 * r["success_rate"] for r in rows]
                ax_summary.plot(lengths, success, "o-", color=colors[method], label=method)
            ax_summary.set(xlabel="sequence length T", ylabel="successful runs (%)", ylim=(-5, 105))
            ax_summary.set_title(f"{self.task}: success against T")
        else:
            rows = [r for r in self.rows if r["seq_len"] == length]
            finals = [r["final_loss"] if math.isfinite(r["final_loss"]) else np.nan for r in rows]
            ax_summary.bar(range(len(rows)), finals, color=[colors[r["method"]] for r in rows])
            ax_summary.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=30)
            ax_summary.set(ylabel="final loss (median over seeds)")
            ax_summary.set_title(f"{self.task}: final loss")
        for method in methods:
            c = self.curves[(method, length)]
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN steps (diverged)
                loss = np.nanmedian(np.where(np.isfinite(c["loss"]), c["loss"], np.nan), axis=0)
                norm = np.nanmedian(np.where(np.isfinite(c["norm"]), c["norm"], np.nan), axis=0)
                thr = np.nanmedian(c["threshold"], axis=0)
            steps = np.arange(1, loss.shape[0] + 1)
            color = colors[method]
            ax_loss.plot(steps, _smooth(loss), color=color, label=method, lw=1.2)
            ax_norm.plot(steps, _smooth(norm), color=color, lw=1.0, alpha=0.85)
            if np.isfinite(thr).any():
                ax_norm.plot(steps, _smooth(thr), color=color, lw=1.0, ls="--")
        ax_loss.set(yscale="log", xlabel="step", ylabel="training loss (median over seeds)")
        ax_loss.set_title(f"seq_len={length}: loss")
        ax_norm.set(yscale="log", xlabel="step", ylabel="global gradient norm, pre-clip")
        ax_norm.set_title(f"seq_len={length}: norm (solid), threshold (dashed)")
        ax_loss.legend(fontsize=8)
        if rnn:
            ax_summary.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)

    def save(self, out: str | Path) -> dict[str, Path]:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files = {
            "json": out / "results.json",
            "csv": out / "results.csv",
            "png": out / "arena.png",
        }
        self.to_json(files["json"])
        self.to_csv(files["csv"])
        self.plot(files["png"])
        return files


def _smooth(x: np.ndarray, window: int = 25) -> np.ndarray:
    """A trailing moving average that skips NaN (for readable curves)."""
    finite = np.isfinite(x)
    csum = np.cumsum(np.where(finite, x, 0.0))
    ccount = np.cumsum(finite)
    lo = np.maximum(np.arange(x.shape[0]) - window, -1)
    total = csum - np.where(lo >= 0, csum[np.maximum(lo, 0)], 0.0)
    count = ccount - np.where(lo >= 0, ccount[np.maximum(lo, 0)], 0)
    with np.errstate(all="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        v = x.item()
        return v if not isinstance(v, float) or math.isfinite(v) else None
    raise TypeError(type(x))


def _row(task: Task, method: str, length: int, seeds: int, c: dict[str, Any]) -> dict[str, Any]:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # diverged runs: inf and NaN losses
        return _summarize(task, method, length, seeds, c)


def _summarize(task, method, length, seeds, c) -> dict[str, Any]:
    loss = c["loss"]
    finite = np.isfinite(loss).all(axis=1)
    tail = loss[:, -max(loss.shape[1] // 20, 1) :]
    final = np.where(finite, np.mean(tail, axis=1), np.inf)
    diverged = ~finite | (final > 1e3)
    success = None
    if c["metric"] is not None:
        limit = SUCCESS_MSE if task.success_metric == "mse" else SUCCESS_ERROR
        ok = np.isfinite(c["metric"]) & (c["metric"] < limit)
        success = float(np.mean(ok))
    return {
        "task": task.name,
        "method": method,
        "seq_len": length,
        "seeds": seeds,
        "success_rate": success,
        "test_metric": float(np.nanmedian(c["metric"])) if c["metric"] is not None else None,
        "final_loss": float(np.median(final)),
        "spikes": float(np.mean(_spikes(loss))),
        "diverged": int(np.sum(diverged)),
        "clipped_fraction": float(np.mean(c["clipped"])),
        "ms_per_step": float(c["ms_per_step"]),
    }


def run(
    task: str = "adding",
    *,
    methods: Sequence[str] | Mapping[str, Callable[[], Any]] | None = None,
    seeds: int = 4,
    steps: int | None = None,
    lr: float | None = None,
    seq_len: int | Sequence[int] | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> ArenaResult:
    """Trains every method on ``task`` with ``seeds`` seeds; see the module docstring.

    Args:
      task: one of :data:`TASKS`.
      methods: names from :data:`METHODS`, or a dict from names to zero-argument factories
        of clippers (custom settings, e.g. ``{"zclip-nocap": lambda: oc.zclip(max_norm=None)}``);
        None means the task's default comparison.
      seeds: runs per method (trained together, vmapped).
      steps, lr, seq_len: None means the task's default; ``seq_len`` may be a list.
      out: a directory to write ``results.json``, ``results.csv`` and ``arena.png`` to.
      progress: show a tqdm progress bar over methods and steps.

    Returns:
      An :class:`ArenaResult`.
    """
    if task not in TASK_SETTINGS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    spec = TASK_SETTINGS[task]
    factories = dict(METHODS)
    if isinstance(methods, Mapping):  # custom settings: {name: factory of the clipper}
        factories.update(methods)
    methods = list(spec.methods if methods is None else methods)
    unknown = [m for m in methods if m not in factories]
    if unknown or not methods:
        raise ValueError(
            f"unknown method(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose from {', '.join(METHODS)}, or pass a dict of clipper factories"
        )
    if seeds < 1 or (steps is not None and steps < 1):
        raise ValueError(f"seeds and steps must be >= 1; got seeds={seeds}, steps={steps}")
    steps = spec.steps if steps is None else steps
    lr = spec.lr if lr is None else lr
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number; got {lr}")
    lengths = list(spec.seq_len if seq_len is None else np.atleast_1d(seq_len).tolist())
    minimum = 4 if task == "spiky-lm" else 2
    if any(int(n) != n or n < minimum for n in lengths):
        raise ValueError(f"seq_len must be integers >= {minimum}; got {lengths}")
    lengths = [int(n) for n in lengths]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(methods) * len(lengths) * steps, unit="step", desc=task)
    rows, curves = [], {}
    # optax's own optimizers mix float and int32 (Adam's bias correction): train with JAX's
    # standard promotion whatever the caller's setting.
    try:
        for length in lengths:
            for method in methods:
                if bar is not None:
                    bar.set_postfix_str(f"{method}, seq_len={length}")
                with jax.numpy_dtype_promotion("standard"):
                    c = _run_one(spec, factories[method], length, seeds, steps, lr, bar)
                curves[(method, length)] = {
                    k: c[k] for k in ("loss", "norm", "threshold", "clipped")
                }
                rows.append(_row(spec, method, length, seeds, c))
    finally:
        if bar is not None:
            bar.close()
    settings = {"seeds": seeds, "steps": steps, "lr": lr, "seq_len": lengths, "methods": methods}
    settings["notes"] = {m: METHOD_NOTES[m] for m in methods if m in METHOD_NOTES}
    result = ArenaResult(task, rows, curves, settings)
    if out is not None:
        result.save(out)
    return result


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    """The ``optaxclip-arena`` command."""
    parser = argparse.ArgumentParser(
        prog="optaxclip-arena",
        description="Train small Flax models that explode or spike with each optaxclip "
        "clipper, several seeds at once, and report which method trains best.",
    )
    parser.add_argument("--task", choices=TASKS, default="temporal-order")
    parser.add_argument(
        "--methods",
        type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
        default=None,
        help=f"comma list from: {', '.join(METHODS)} (default: the task's comparison)",
    )
    parser.add_argument("--seeds", type=positive_int, default=4)
    parser.add_argument("--steps", type=positive_int, default=None)
    parser.add_argument("--lr", type=positive_float, default=None)
    parser.add_argument("--seq-len", type=_int_list, default=None, help="e.g. 10,25,50")
    parser.add_argument("--out", type=Path, default=Path("arena-out"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.methods is not None:
        unknown = [m for m in args.methods if m not in METHODS]
        if unknown or not args.methods:
            parser.error(
                f"--methods: unknown {', '.join(unknown) or '(empty)'}; "
                f"choose from {', '.join(METHODS)}"
            )
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")
    try:
        result = run(
            args.task,
            methods=args.methods,
            seeds=args.seeds,
            steps=args.steps,
            lr=args.lr,
            seq_len=args.seq_len,
            progress=not args.no_progress,
        )
    except ValueError as e:
        parser.error(str(e))
    s = result.settings
    print(
        f"\n{args.task}: {s['seeds']} seeds, {s['steps']} steps, lr {s['lr']}, "
        f"seq_len {','.join(map(str, s['seq_len']))}\n"
    )
    print(result.table())
    files = result.save(args.out)
    print("\nwrote " + ", ".join(str(p) for p in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
