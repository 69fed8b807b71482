"""The notebooks in notebooks/ run top to bottom (SMALL sizes) and are saved without outputs."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = [
    "01_quickstart.ipynb",
    "02_exploding_gradients_rnn.ipynb",
    "03_adaptive_clipping.ipynb",
    "04_scaling_out.ipynb",
]
CELL_TIMEOUT = 300  # seconds, per cell


def _kernel_manager():
    """A manager for a "python3" kernel that runs on this interpreter (``sys.executable``).

    A kernelspec named python3 found on the Jupyter path (the user's, a system one) may point
    at another Python, without this package; the notebooks must run against the one under test.
    """
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    class ThisPython(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return KernelSpec(
                argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                display_name="Python 3 (this interpreter)",
                language="python",
                name=kernel_name,
            )

    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=ThisPython())


def test_notebook_list_is_complete():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_saved_without_outputs(name):
    nb = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    dirty = [
        i
        for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    assert not dirty, f"{name}: cells {dirty} have outputs or execution counts; clear them"
    first = nb["cells"][0]
    assert first["cell_type"] == "code" and "google.colab" in "".join(first["source"])


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # The user's IPython profile (startup scripts, history) stays out of the kernel.
    env = dict(os.environ, OPTAXCLIP_NOTEBOOK_SMALL="1", IPYTHONDIR=str(tmp_path / "ipython"))
    km = _kernel_manager()
    km.connection_file = str(tmp_path / "kernel.json")  # not in the user's runtime dir
    client = NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},  # the kernel's working directory
    )
    start = time.perf_counter()
    # Raises CellExecutionError (the cell and its traceback) on error. cleanup_kc: shut the
    # kernel down and close the client's sockets, which nbclient skips for a km passed in.
    client.execute(env=env, cleanup_kc=True)
    print(f"{name}: {time.perf_counter() - start:.1f} s")
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
    assert list(cwd.iterdir()) == [], "the notebook left files in its working directory"
