"""Re-evaluate a checkpoint with the model and data of its training run.

    python eval.py ckpt_path=logs/train/runs/<time>/checkpoints/last.ckpt
"""

import os
from pathlib import Path

os.environ.setdefault("ANOMALY_LAB_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402

from anomaly_lab.run import entry_point, evaluate  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg):
    return entry_point(evaluate)(cfg)


if __name__ == "__main__":
    main()
