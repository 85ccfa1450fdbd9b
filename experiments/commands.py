"""What the experiment scripts share: running train.py / eval.py as a user would, one at a time."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def run(script: str, overrides: list[str], run_dir: Path, data_root: Path) -> float:
    """Run train.py or eval.py with its folder at run_dir and its log beside it (<run_dir>.log), the
    cache beside the runs (never in the data folder); return the wall time in seconds."""
    command = [sys.executable, script, *QUIET, *overrides, f"paths.data_root={data_root}",
               f"paths.cache_dir={run_dir.parent / 'cache'}", f"hydra.run.dir={run_dir}"]
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(command[1:])}", flush=True)
    started = time.time()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.with_suffix(".log"), "w") as log:
        subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.time() - started
