"""Independent float64 numpy oracles (no optaxclip code), robust to overflow themselves."""

from __future__ import annotations

import math

import jax
import numpy as np


def as_f64(x) -> np.ndarray:
    x = np.asarray(x)
    if np.iscomplexobj(x):
        return x.astype(np.complex128)
    return np.asarray(x.astype(np.float32) if x.dtype.itemsize < 4 else x, dtype=np.float64)


def global_norm(tree, ord=2) -> float:
    """The norm of all leaves together, scaled by the largest entry so it cannot overflow."""
    leaves = [as_f64(x).ravel() for x in jax.tree.leaves(tree)]
    flat = np.concatenate(leaves) if leaves else np.zeros(0)
    mags = np.abs(flat)
    if mags.size == 0:
        return 0.0
    if np.isnan(mags).any():
        return math.nan
    m = mags.max()
    if m == 0 or np.isinf(m):
        return float(m)
    if ord == 2:
        return float(m * np.sqrt(np.sum((mags / m) ** 2)))
    if ord == 1:
        return float(m * np.sum(mags / m))
    return float(m)


def leaf_norm(x, ord=2) -> float:
    return global_norm([x], ord)
