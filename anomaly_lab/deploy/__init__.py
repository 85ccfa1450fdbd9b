"""Using a trained model outside training: `predict` scores new images from a run's checkpoint and
writes maps, masks and a CSV; `onnx` exports the scoring path and runs it with onnxruntime."""
