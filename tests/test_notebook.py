"""notebooks/tour.py runs top to bottom (its own asserts included), so the tour cannot rot."""

import os
import subprocess
import sys
from pathlib import Path

TOUR = Path(__file__).resolve().parents[1] / "notebooks" / "tour.py"


def test_tour_runs(tmp_path):
    env = {**os.environ, "GRADLAB_TOUR_OUT": str(tmp_path), "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(TOUR)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reloaded from" in done.stdout
    assert (tmp_path / "gradient_flow.png").stat().st_size > 10_000
