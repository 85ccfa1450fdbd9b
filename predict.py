"""Score new images with a trained model; export its scoring path to ONNX.

    python predict.py ckpt_path=logs/train/runs/<time>/checkpoints/last.ckpt input=<image or folder>
    python predict.py ckpt_path=... export=onnx                 # writes <predict run>/model.onnx
    python predict.py ckpt_path=... input=<folder> engine=onnx  # scores with onnxruntime
"""

import os
from pathlib import Path

os.environ.setdefault("ANOMALY_LAB_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402

from anomaly_lab.deploy.predict import predict  # noqa: E402
from anomaly_lab.run import entry_point  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg):
    return entry_point(predict)(cfg)


if __name__ == "__main__":
    main()
