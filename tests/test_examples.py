"""The README's main command: the quickstart example runs and shows clipping at work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_runs_and_reports_stats():
    proc = subprocess.run(
        [sys.executable, str(QUICKSTART), "--steps", "30"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no clipping" in proc.stdout
    assert "clip_by_global_norm/num_clipped" in proc.stdout
