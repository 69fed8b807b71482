"""Independent float64 numpy models of the adaptive clippers, and seeded test streams.

Each model follows the published rule and its reference code step by step (ALGORITHMS.md
sections 4-8: AutoClip's Python list and ``np.percentile``, ZClip's warm-up buffer with
``np.mean``/``np.var``, AdaGC's per-tensor dict, SPAM's element-wise mask, the quantile
estimator's geometric update), with the deliberate deviations of the optaxclip spec:

* the update is scaled by ``threshold / n`` iff ``n > threshold`` (no epsilon);
* a step with a NaN or infinite entry passes through unchanged and leaves every statistic,
  history, warm-up counter and step counter untouched;
* AdaGC's adaptive threshold of a leaf is ``clip_ratio * max(gamma, eps)``.

No JAX and no optaxclip code here: a model takes a list of leaves (numpy arrays) and
returns the clipped leaves (float64) and a :class:`StepInfo`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a model did on one step (the fields of ``ClipStats`` it pins down)."""

    norm: float  # global L2 norm of the incoming update
    threshold: float  # threshold applied (NaN: per-unit method; inf: none)
    scale: float  # smallest factor applied to any unit (1: nothing clipped)
    clipped: float  # fraction of units clipped
    nonfinite: bool  # the step had a NaN or infinite entry (passed through)

    @property
    def any_clipped(self) -> bool:
        return self.clipped > 0


def global_norm(leaves: list[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(x))) for x in leaves))


def leaf_norm(x: np.ndarray) -> float:
    return math.sqrt(float(np.sum(np.square(x))))


def clip_global(leaves: list[np.ndarray], n: float, threshold: float):
    """Scales every leaf by ``threshold / n`` iff ``n > threshold``."""
    if n > threshold:
        factor = threshold / n
        return [x * factor for x in leaves], StepInfo(n, threshold, factor, 1.0, False)
    return list(leaves), StepInfo(n, threshold, 1.0, 0.0, False)


class Model:
    """A step: float64 copies; non-finite steps pass through without touching the state."""

    def step(self, leaves: list[np.ndarray]) -> tuple[list[np.ndarray], StepInfo]:
        g = [np.array(x, dtype=np.float64) for x in leaves]
        if not all(np.isfinite(x).all() for x in g):
            return g, StepInfo(global_norm(g), self.nonfinite_threshold(), 1.0, 0.0, True)
        return self.finite_step(g, global_norm(g))

    def nonfinite_threshold(self) -> float:
        return math.nan  # not pinned down by the spec (except AutoClip)

    def finite_step(self, g: list[np.ndarray], n: float) -> tuple[list[np.ndarray], StepInfo]:
        raise NotImplementedError


# ---------------------------------------------------------------------------
# The five methods
# ---------------------------------------------------------------------------


class AutoClip(Model):
    """Seetharaman et al. 2020, ``pseeth/autoclip``: percentile of the history of norms."""

    def __init__(self, percentile: float = 10.0, *, window: int | None = None):
        self.percentile = percentile
        self.window = window
        self.history: list[float] = []

    def nonfinite_threshold(self) -> float:
        if not self.history:
            return math.inf
        return float(np.percentile(self.history, self.percentile))

    def finite_step(self, g, n):
        self.history.append(n)  # the current norm is part of the history
        if self.window is not None:
            del self.history[: -self.window]
        threshold = float(np.percentile(self.history, self.percentile))
        return clip_global(g, n, threshold)


class ZClip(Model):
    """Kumar et al. 2025, ``bluorion-com/ZClip`` (``ZClip.step``), in its order of operations."""

    def __init__(
        self,
        *,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        warmup_steps: int = 25,
        max_norm: float | None = 1.0,
        eps: float = 1e-6,
        skip_update_on_spike: bool = False,
    ):
        self.alpha = alpha
        self.z_thresh = z_thresh
        self.mode = mode.lower()
        self.clip_option = clip_option.lower()
        self.clip_factor = clip_factor
        self.warmup_steps = warmup_steps
        self.max_norm = max_norm
        self.eps = eps
        self.skip_update_on_spike = skip_update_on_spike
        self.buffer: list[float] = []
        self.mean = 0.0
        self.var = 0.0
        self.initialized = False

    def finite_step(self, g, n):
        if not self.initialized:
            self.buffer.append(n)
            if len(self.buffer) >= max(self.warmup_steps, 1):
                self.mean = float(np.mean(self.buffer))
                self.var = float(np.var(self.buffer))  # population variance (ddof=0)
                self.initialized = True
                self.buffer = []
            if self.max_norm is None:
                return list(g), StepInfo(n, math.inf, 1.0, 0.0, False)
            return clip_global(g, n, self.max_norm)  # fixed clip only, never a z-clip

        std = math.sqrt(self.var)
        clip_val = None
        if self.mode == "percentile":
            thr = self.mean + self.z_thresh * std
            detection = thr
            if n > thr:
                clip_val = thr
        else:
            detection = self.mean + self.z_thresh * (std + self.eps)  # z > z_thresh beyond it
            z = (n - self.mean) / (std + self.eps)
            if z > self.z_thresh:
                if self.clip_option == "adaptive_scaling":
                    clip_val = self.clip_factor * (
                        self.mean + self.z_thresh * std / (z / self.z_thresh)
                    )
                else:
                    clip_val = self.mean

        adaptive = clip_val if clip_val is not None else n
        eff = min(adaptive, self.max_norm) if self.max_norm is not None else adaptive
        out, info = clip_global(g, n, eff)
        if clip_val is None:  # reported: the level where clipping of any kind would start
            if self.max_norm is not None:
                detection = min(detection, self.max_norm)
            info = dataclasses.replace(info, threshold=detection)

        if not (clip_val is not None and self.skip_update_on_spike):
            x = clip_val if clip_val is not None else n  # not capped by max_norm
            self.mean = self.alpha * self.mean + (1 - self.alpha) * x
            self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return out, info


class AdaGC(Model):
    """Wang et al. 2025, ``lishuai-97/AdaGC`` (``AdaGC.clip_by_norm``), with the eps floor."""

    def __init__(
        self,
        max_norm: float = 1.0,
        *,
        clip_ratio: float = 1.04,
        beta: float = 0.99,
        warmup_steps: int = 100,
        eps: float = 1e-6,
    ):
        self.max_norm = max_norm
        self.clip_ratio = clip_ratio
        self.beta = beta
        self.warmup_steps = warmup_steps
        self.eps = eps
        self.steps = 0
        self.gamma: dict[int, float] = {}

    def finite_step(self, g, n):
        self.steps += 1
        if self.steps <= self.warmup_steps:  # GlobalGC, gamma = running min of clipped norms
            out, info = clip_global(g, n, self.max_norm)
            for i, x in enumerate(out):
                nu = leaf_norm(x)
                self.gamma[i] = nu if i not in self.gamma else min(self.gamma[i], nu)
            return out, info

        out, factors = [], []
        for i, x in enumerate(g):
            nu = leaf_norm(x)
            if i not in self.gamma:
                self.gamma[i] = nu
            thr = self.clip_ratio * max(self.gamma[i], self.eps)
            factor = 1.0
            if nu > thr:
                factor = thr / nu
                x = x * factor
                nu = thr
            self.gamma[i] = self.beta * self.gamma[i] + (1 - self.beta) * nu
            out.append(x)
            factors.append(factor)
        num = sum(f != 1.0 for f in factors)
        return out, StepInfo(n, math.nan, min(factors), num / len(factors), False)


class SpikeAwareClip(Model):
    """SPAM (Huang et al. 2025) element-wise spike clipping on an EMA ``v`` of squared grads."""

    def __init__(self, threshold: float = 5000.0, *, b2: float = 0.999, warmup_steps: int = 20):
        self.threshold = threshold
        self.b2 = b2
        self.warmup_steps = warmup_steps
        self.step_count = 0
        self.v: list[np.ndarray] | None = None

    def finite_step(self, g, n):
        if self.v is None:
            self.v = [np.zeros_like(x) for x in g]
        current_step = self.step_count + 1
        active = current_step >= self.warmup_steps
        out, num, total, scale = [], 0, 0, 1.0
        for i, x in enumerate(g):
            v = self.v[i]  # the value before this step
            limit = np.sqrt(self.threshold * v)
            mask = np.square(x) > self.threshold * v
            if not active:
                mask = np.zeros_like(mask)
            y = np.where(mask, np.sign(x) * limit, x)
            if mask.any():
                scale = min(scale, float(np.min(limit[mask] / np.abs(x[mask]))))
            self.v[i] = self.b2 * v + (1 - self.b2) * np.square(y)
            out.append(y)
            num += int(mask.sum())
            total += x.size
        self.step_count += 1
        return out, StepInfo(n, math.nan, scale, num / max(total, 1), False)


class QuantileClip(Model):
    """Andrew et al. 2021, geometric update of C towards a target unclipped quantile."""

    def __init__(
        self,
        initial_norm: float = 0.1,
        *,
        target_quantile: float = 0.5,
        learning_rate: float = 0.2,
    ):
        self.c = initial_norm
        self.target_quantile = target_quantile
        self.learning_rate = learning_rate

    def finite_step(self, g, n):
        b = 1.0 if n <= self.c else 0.0  # <=: a norm equal to C counts as unclipped
        out, info = clip_global(g, n, self.c)  # this step uses the old C
        self.c = self.c * math.exp(-self.learning_rate * (b - self.target_quantile))
        return out, info


MODELS = {
    "autoclip": AutoClip,
    "zclip": ZClip,
    "adagc": AdaGC,
    "spike_aware_clip": SpikeAwareClip,
    "quantile_clip": QuantileClip,
}

# ---------------------------------------------------------------------------
# Streams: lists of steps, a step is a list of float32 leaves in LEAF_SHAPES order
# ---------------------------------------------------------------------------

# Sorted names, so jax.tree.leaves of the dict gives the leaves in this order.
LEAF_SHAPES = {"bias": (4,), "kernel": (3, 4), "scale": (2, 2)}
SPIKE = 50.0
BASE = 0.1  # entries ~ N(0, 0.1^2): global norm around 0.45

STREAMS = ["ordinary", "drift", "spikes", "burst", "nonfinite", "zero_leaf"]


def _noise(rng, scales) -> list[list[np.ndarray]]:
    return [
        [(rng.standard_normal(shape) * s).astype(np.float32) for shape in LEAF_SHAPES.values()]
        for s in scales
    ]


def _times(step: list[np.ndarray], factor: float, leaves=None) -> list[np.ndarray]:
    idx = range(len(step)) if leaves is None else leaves
    return [(x * np.float32(factor)) if i in idx else x for i, x in enumerate(step)]


def make_stream(kind: str, seed: int = 0) -> list[list[np.ndarray]]:
    """A seeded stream of float32 updates (finite steps have global norm >= 0.05).

    * ``ordinary``: 120 steps, per-step scale ``BASE * lognormal(0, 0.3)``;
    * ``drift``: 150 steps, the norm grows 1% a step (and 5% noise);
    * ``spikes``: ordinary with isolated x50 steps at 10, 30, 60, 90, 110 (0-based);
    * ``burst``: ordinary with three x50 steps in a row at 40-42 (all leaves) and 100-102
      (the ``kernel`` leaf only);
    * ``nonfinite``: ordinary with a NaN entry at 3 and 40, +inf at 60, -inf at 61, spikes
      at 30 and 80;
    * ``zero_leaf``: 120 ordinary steps whose ``scale`` leaf is zero for the first 8 steps.
    """
    rng = np.random.default_rng([seed, STREAMS.index(kind)])
    lengths = {"drift": 150}
    length = lengths.get(kind, 120)
    scales = BASE * np.exp(0.3 * rng.standard_normal(length))
    if kind == "drift":
        scales = BASE * 1.01 ** np.arange(length) * np.exp(0.05 * rng.standard_normal(length))
    stream = _noise(rng, scales)
    if kind == "spikes":
        for t in (10, 30, 60, 90, 110):
            stream[t] = _times(stream[t], SPIKE)
    elif kind == "burst":
        for t in (40, 41, 42):
            stream[t] = _times(stream[t], SPIKE)
        for t in (100, 101, 102):
            stream[t] = _times(stream[t], SPIKE, leaves=[1])
    elif kind == "nonfinite":
        for t, (leaf, pos, value) in {
            3: (0, 1, np.nan),
            40: (1, (2, 3), np.nan),
            60: (2, (0, 1), np.inf),
            61: (1, (0, 0), -np.inf),
        }.items():
            stream[t][leaf][pos] = value
        for t in (30, 80):
            stream[t] = _times(stream[t], SPIKE)
    elif kind == "zero_leaf":
        for t in range(8):
            stream[t][2][...] = 0.0
    for step in stream:
        norm = global_norm([x.astype(np.float64) for x in step])
        assert not math.isfinite(norm) or norm >= 0.05, norm
    return stream


def boundary_stream(length: int, *, nan_at=None, spike_at=None, spike_leaves=None, seed=0):
    """Ordinary steps (1-based ``nan_at``/``spike_at``) for the warm-up boundary tests."""
    rng = np.random.default_rng([seed, 99])
    stream = _noise(rng, BASE * np.exp(0.3 * rng.standard_normal(length)))
    if nan_at is not None:
        stream[nan_at - 1][0][0] = np.nan
    if spike_at is not None:
        stream[spike_at - 1] = _times(stream[spike_at - 1], SPIKE, spike_leaves)
    return stream
