"""Test configuration: strict dtype promotion, warnings as errors (see pyproject), fixtures,
and one compilation cache per test session."""

import jax
import pytest
from helpers import session_temp

# A script run in a subprocess with 8 simulated devices (test_distributed.py); importing it
# here (doctest collection) would configure this process's JAX instead.
collect_ignore = ["dist_worker.py", "dist_methods_worker.py"]


@pytest.hookimpl(trylast=True)  # after the tmpdir plugin has configured the base temp
def pytest_configure(config):
    """Every program compiled in this session is compiled once, whichever test asks.

    Many tests compile the same program (a transform on the same small tree, in several
    test functions, on either xdist worker); compiling dominates the suite's time on CPU.
    JAX's persistent compilation cache, in a fresh directory of this session's base temp
    (shared by the xdist workers), serves the second and later requests: the same
    executable XLA would build again, keyed on the program and the compile options. Only
    this process's compilations use it: subprocesses (examples, notebooks, benchmarks,
    simulated devices) compile their own, and the benchmarks turn caching off. A cache
    file read while another worker writes it is an error JAX warns of and recompiles
    (pyproject's filterwarnings shows it rather than failing the test).
    """
    factory = getattr(config, "_tmp_path_factory", None)  # None with -p no:tmpdir
    if factory is None:
        return
    cache = session_temp(factory) / "jax-compilation-cache"
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
