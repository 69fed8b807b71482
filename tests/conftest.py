"""Test configuration: strict dtype promotion, warnings as errors (see pyproject), fixtures."""

import jax
import pytest

# Every implicit dtype promotion is an error: transforms must cast explicitly, so a bfloat16
# leaf never silently becomes float32 (or a float32 leaf float64) in an output or a state.
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(params=["eager", "jit"])
def maybe_jit(request):
    """Runs a function eagerly or under ``jax.jit``."""
    return (lambda f: f) if request.param == "eager" else jax.jit
