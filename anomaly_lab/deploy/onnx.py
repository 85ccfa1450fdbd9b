"""ONNX export of a model's scoring path, and an onnxruntime engine that runs it.

The exported graph is `AnomalyModel.forward`: images [B, C, H, W] (normalised as the run's eval
transform does) in; `image_score` [B] and, for models with maps, `anomaly_map` [B, 1, H, W] (at the
input size and smoothed) out. Height and width are those of the example; the batch size is free unless
the graph depends on it (then it is one image).
Every statistic of normal data (Gaussians, negative banks, memories) is a buffer of the model and
becomes an initialiser of the graph; models larger than protobuf's 2 GB put their initialisers in an
external data file beside the `.onnx` file.

The exporter is `torch.onnx.export(dynamo=True)` (torch.export + onnxscript). Three operations of the
scoring paths do not translate to portable ONNX as written; during export (and only then) they are
rewritten, with the same values:
- random draws from an explicit, seeded `generator` (CPC-AD's test negatives, a function of the seed
  and the input size only) become constants: the values the eager pass on the example drew;
- `torch.linalg.inv` of 2x2 or 3x3 matrices (FYD's inverse of the ICA/FCA warp) becomes the
  closed-form adjugate / determinant;
- `torch.einsum` whose operands give `...` different ranks (broadcasting) gets the shorter ones
  unsqueezed in front, as ONNX Einsum wants one rank per ellipsis.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from anomaly_lab.errors import ConfigError
from anomaly_lab.models.base import AnomalyModel, ScoreOutput

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = ("image_score", "anomaly_map")
BATCH_DIM = "batch"
SEEDED_DRAWS = {torch.randint, torch.randperm, torch.rand, torch.randn, torch.normal, torch.multinomial,
                torch.bernoulli, torch.poisson}


class ScoringPath(nn.Module):
    """`model.forward` as a tuple: (image_score,) or (image_score, anomaly_map)."""

    def __init__(self, model: AnomalyModel):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.model(images)
        return (out.image_score,) if out.anomaly_map is None else (out.image_score, out.anomaly_map)


def inverse_small(matrices: Tensor) -> Tensor:
    """Inverse of [..., n, n] matrices, n = 2 or 3, by the adjugate over the determinant."""
    m = matrices
    if m.shape[-1] == 2:
        a, b, c, d = m[..., 0, 0], m[..., 0, 1], m[..., 1, 0], m[..., 1, 1]
        adjugate = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2)
        return adjugate / (a * d - b * c)[..., None, None]
    rows = [m[..., i, :] for i in range(3)]
    # The adjugate's columns are the cross products of the other two rows.
    columns = [torch.linalg.cross(rows[1], rows[2]), torch.linalg.cross(rows[2], rows[0]),
               torch.linalg.cross(rows[0], rows[1])]
    determinant = (rows[0] * columns[0]).sum(-1)
    return torch.stack(columns, -1) / determinant[..., None, None]


def pad_ellipsis_ranks(equation: str, operands: list[Tensor]) -> list[Tensor]:
    """The operands, those whose `...` spans fewer dimensions unsqueezed in front (numpy broadcasting)."""
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    spans = [op.dim() - len(term.replace("...", "")) if "..." in term else None
             for term, op in zip(inputs, operands, strict=True)]
    widest = max((s for s in spans if s is not None), default=0)
    padded = []
    for term, op, span in zip(inputs, operands, spans, strict=True):
        if span is not None and span < widest:
            at = term.index("...")  # new dimensions go where the ellipsis starts
            op = op.reshape(*op.shape[:at], *([1] * (widest - span)), *op.shape[at:])
        padded.append(op)
    return padded


class PortableOps(TorchFunctionMode):
    """The export-time rewrites of the module docstring. `draws=None` records the seeded draws of an
    eager pass (in `self.draws`); a list replays them, in order, as constants."""

    def __init__(self, draws: list[Tensor] | None = None):
        super().__init__()
        self.replay = draws is not None
        self.draws = list(draws) if draws is not None else []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SEEDED_DRAWS and kwargs.get("generator") is not None:
            if not self.replay:
                self.draws.append(func(*args, **kwargs))
                return self.draws[-1]
            if not self.draws:
                raise RuntimeError("the export pass drew more seeded random numbers than the eager pass")
            return self.draws.pop(0)
        if self.replay and func is torch.linalg.inv and args[0].shape[-1] in (2, 3):
            return inverse_small(args[0])
        if self.replay and func is torch.einsum and isinstance(args[0], str):
            operands = list(args[1]) if len(args) == 2 and isinstance(args[1], list | tuple) else list(args[1:])
            return func(args[0], *pad_ellipsis_ranks(args[0], operands), **kwargs)
        return func(*args, **kwargs)


def export_onnx(model: AnomalyModel, example: Tensor, path: Path, metadata: dict | None = None) -> Path:
    """Write the scoring path of `model` (in eval mode) for inputs shaped like `example` [B, C, H, W] to
    `path`; `metadata` (JSON-able values) goes into the model's metadata_props. Returns `path`.

    The batch size is dynamic; a model whose graph depends on it (e.g. CPC-AD cuts a batch's
    sub-patches into chunks of `encoder_chunk`) is exported for batches of one image instead."""
    model.eval()
    scoring = ScoringPath(model)
    with _quiet_exporter():
        program = _export_program(model, scoring, example)
    for key, value in (metadata or {}).items():
        program.model.metadata_props[key] = json.dumps(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    return path


def _export_program(model: AnomalyModel, scoring: ScoringPath, example: Tensor) -> torch.onnx.ONNXProgram:
    try:
        try:
            exported = _trace(scoring, example, dynamic_batch=True)
        except Exception as error:
            if not re.search(rf"\b{BATCH_DIM}\b", str(error)):  # torch.export names the dimension at fault
                raise
            log.info(f"{model.name}: the graph depends on the batch size; exported for one image at a time")
            exported = _trace(scoring, example[:1], dynamic_batch=False)
        return torch.onnx.export(exported, dynamo=True, input_names=[INPUT_NAME],
                                 output_names=list(OUTPUT_NAMES), verbose=False)
    except Exception as error:  # the exporter's errors are many and deep: name the model and the cause
        raise ConfigError(f"{model.name} cannot be exported to ONNX: {_summary(error)}") from error


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's progress lines and INFO logs (one per optimisation pass) silenced, restored after."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(None):
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _trace(scoring: ScoringPath, example: Tensor, dynamic_batch: bool) -> torch.export.ExportedProgram:
    """torch.export of the scoring path under `PortableOps`, replaying the seeded draws of an eager pass.
    With `dynamic_batch`, the batch size is a free dimension: export fails if the graph depends on it."""
    with torch.no_grad(), PortableOps() as recorder:
        scoring(example)
    shapes = ({0: torch.export.Dim(BATCH_DIM, min=1)},) if dynamic_batch else None
    with torch.no_grad(), PortableOps(recorder.draws):
        return torch.export.export(scoring, (example,), dynamic_shapes=shapes, strict=False)


def _summary(error: Exception) -> str:
    """What failed, in one line: the error's 'Exception summary' line (else its first line), and the line of
    anomaly_lab code that the exporter blames, when it names one."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if line.startswith("<class")]
    summary = (causes[0] if causes else lines[0] if lines else type(error).__name__)[:300]
    blamed = [(line, code) for line, code in zip(lines, lines[1:], strict=False)
              if re.match(r'File ".*anomaly_lab/.*", line \d+', line) and "anomaly_lab/deploy/onnx.py" not in line]
    if blamed:
        location = re.search(r'anomaly_lab/[^"]*", line \d+', blamed[-1][0]).group(0).replace('"', "")
        summary += f" [{location}: {blamed[-1][1]}]"
    return summary


class OnnxEngine:
    """Scores images with an exported model on onnxruntime: `engine(images) -> ScoreOutput`, like a model."""

    def __init__(self, path: Path, providers: list[str] | None = None):
        if not Path(path).is_file():
            raise ConfigError(f"onnx_path={path}: no such ONNX file")
        self.session = onnxruntime.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        self.metadata = {k: _json_or_text(v) for k, v in self.session.get_modelmeta().custom_metadata_map.items()}
        batch = self.session.get_inputs()[0].shape[0]
        self.batch_size = batch if isinstance(batch, int) else None  # None: any batch size

    def __call__(self, images: Tensor) -> ScoreOutput:
        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        step = self.batch_size or len(array)
        parts = [self.session.run(None, {INPUT_NAME: array[i : i + step]}) for i in range(0, len(array), step)]
        outputs = [torch.from_numpy(np.concatenate(column)) for column in zip(*parts, strict=True)]
        return ScoreOutput(outputs[0], outputs[1] if len(outputs) > 1 else None)


def _json_or_text(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
