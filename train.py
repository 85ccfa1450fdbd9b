"""Train and test an anomaly detector.

    python train.py                                   # PaDiM on the synthetic dataset, CPU
    python train.py model=padim data=mvtec/bottle paths.data_root=/datasets
    python train.py -m data=mvtec/bottle,mvtec/screw  # one job per class
"""

import os
from pathlib import Path

os.environ.setdefault("ANOMALY_LAB_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402

from anomaly_lab.run import entry_point, train  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg):
    return entry_point(train)(cfg)


if __name__ == "__main__":
    main()
