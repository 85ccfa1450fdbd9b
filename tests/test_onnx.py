"""ONNX export: for every model config, `predict.py export=onnx` writes a graph that gives PyTorch's
image scores and maps within 1e-4 on onnxruntime, and `engine=onnx` scores images with it."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest
import torch
from hydra.utils import instantiate

from anomaly_lab.data.dataset import read_image
from anomaly_lab.deploy.onnx import OnnxEngine, inverse_small, pad_ellipsis_ranks
from anomaly_lab.deploy.predict import Preprocessing, predict
from anomaly_lab.errors import ConfigError
from anomaly_lab.run import load_weights, with_run_config
from tests.helpers import CONF, compose_config, synthetic_dir

MODELS = sorted(path.stem for path in (CONF / "model").glob("*.yaml"))
TOLERANCE = 1e-4


def export(ckpt: Path, output_dir: Path) -> list:
    return predict(compose_config("predict", [f"ckpt_path={ckpt}", "export=onnx"], output_dir=output_dir))


@pytest.mark.parametrize("model_name", MODELS)
def test_onnx_scores_and_maps_equal_pytorch(model_name, tiny_runs, tmp_path):
    ckpt = tiny_runs.checkpoint(model_name)

    # Export alone (no input): the file, with every statistic inside, and nothing overwritten after.
    onnx_file = tmp_path / "export" / "model.onnx"
    assert export(ckpt, onnx_file.parent) == []
    onnx.checker.check_model(str(onnx_file))
    assert [i.name for i in onnx.load(str(onnx_file)).graph.input] == ["image"]
    written = onnx_file.read_bytes()
    with pytest.raises(ConfigError, match="model.onnx exists"):
        export(ckpt, onnx_file.parent)
    assert onnx_file.read_bytes() == written

    # The same inputs through PyTorch and onnxruntime, in batches of another size than the export's example.
    folder = shutil.copytree(synthetic_dir(tiny_runs.data_root) / "test", tmp_path / "images")
    paths = sorted(folder.rglob("*.png"))
    run_cfg = with_run_config(compose_config("predict", [f"ckpt_path={ckpt}"]))
    model = load_weights(instantiate(run_cfg.model), ckpt).eval()
    transform = Preprocessing.from_data_config(run_cfg.data).transform()
    images = torch.stack([transform(image=read_image(p))["image"] for p in paths])
    engine = OnnxEngine(onnx_file)
    assert engine.metadata["model"] == model_name
    assert engine.metadata["image_threshold"] == pytest.approx(float(model.image_threshold))
    for batch in (images[:3], images):
        with torch.no_grad():
            expected = model(batch)
        got = engine(batch)
        torch.testing.assert_close(got.image_score, expected.image_score, atol=TOLERANCE, rtol=0)
        assert (got.anomaly_map is None) == (expected.anomaly_map is None)
        if expected.anomaly_map is not None:
            torch.testing.assert_close(got.anomaly_map, expected.anomaly_map, atol=TOLERANCE, rtol=0)

    # predict.py engine=onnx onnx_path=<file> writes the onnxruntime scores.
    predictions = predict(compose_config("predict", [f"ckpt_path={ckpt}", f"input={folder}", "engine=onnx",
                                                     f"onnx_path={onnx_file}"], output_dir=tmp_path / "predict"))
    assert [Path(p.path) for p in predictions] == paths
    torch.testing.assert_close(torch.tensor([p.image_score for p in predictions]), expected.image_score,
                               atol=TOLERANCE, rtol=0)
    assert (tmp_path / "predict" / "predictions.csv").is_file()


def test_closed_form_inverse_matches_linalg_inv():
    generator = torch.Generator().manual_seed(0)
    for size in (2, 3):
        matrices = torch.randn(5, size, size, generator=generator, dtype=torch.float64) + 3 * torch.eye(size)
        torch.testing.assert_close(inverse_small(matrices), torch.linalg.inv(matrices))


def test_einsum_operands_get_one_ellipsis_rank_and_the_same_result():
    generator = torch.Generator().manual_seed(0)
    predictions = torch.randn(2, 3, 4, 5, generator=generator)  # k...e with ... = [3, 4]
    negatives = torch.randn(4, 6, 5, generator=generator)  # ...ne with ... = [4]
    equation = "k...e,...ne->k...n"
    padded = pad_ellipsis_ranks(equation, [predictions, negatives])
    assert padded[1].shape == (1, 4, 6, 5)
    torch.testing.assert_close(torch.einsum(equation, *padded), torch.einsum(equation, predictions, negatives))
