"""Test configuration: strict dtype promotion, warnings as errors (see pyproject), fixtures."""

import jax
import pytest

# A script run in a subprocess with 8 simulated devices (test_distributed.py); importing it
# here (doctest collection) would configure this process's JAX instead.
collect_ignore = ["dist_worker.py", "dist_methods_worker.py"]


@pytest.fixture(autouse=True)
def strict_dtype_promotion():
    """Every implicit dtype promotion is an error inside the tests.

    Transforms must cast explicitly, so a bfloat16 leaf never silently becomes float32 (or a
    float32 leaf float64) in an output or a state. The setting is restored after each test;
    doctests (README, docstrings) run with JAX's default, as users do.
    """
    with jax.numpy_dtype_promotion("strict"):
        yield


@pytest.fixture(params=["eager", "jit"])
def maybe_jit(request):
    """Runs a function eagerly or under ``jax.jit``."""
    return (lambda f: f) if request.param == "eager" else jax.jit
