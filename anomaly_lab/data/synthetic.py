"""A small seeded dataset in MVTec layout with exact masks, written once to disk and reused.

Two kinds: `texture` (a woven, fabric-like pattern) and `object` (a shaded disc on a plain
background, with slight position and colour jitter). Three defect types, each a few % of the image:
`scratch` (thin bright or dark lines), `blob` (an elliptic stain), `color` (a spot of a foreign hue).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from anomaly_lab.data.mvtec import MVTecDataModule
from anomaly_lab.errors import ConfigError, DataError

MARKER_NAME = ".anomaly_lab_synthetic.json"
GENERATOR_VERSION = 1  # bump when the images change, so that cached datasets are regenerated


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean noise, smooth at the scale of size / cells: [size, size] float32."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _texture(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A woven pattern with a random phase and slow shading: (image, surface = the whole image)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) * (2 * np.pi / 8)
    phase_x, phase_y = rng.uniform(0, 2 * np.pi, 2)
    weave = np.sin(x + phase_x) * np.sin(y + phase_y)
    noise = 0.05 * _smooth_noise(rng, size, 6) + 0.02 * rng.standard_normal((size, size))
    colour = np.array([0.85, 0.75, 0.55]) * rng.uniform(0.97, 1.03, 3)
    image = (0.55 + 0.12 * weave + noise)[..., None] * colour
    return image, np.ones((size, size), bool)


def _object(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A shaded, slightly textured disc near the centre on a dark background: (image, surface = the disc)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = size / 2 + rng.uniform(-0.025, 0.025, 2) * size
    distance = np.hypot(x - centre[0], y - centre[1]) / (size * rng.uniform(0.34, 0.36))
    disc = distance <= 1
    background = 0.2 + 0.01 * rng.standard_normal((size, size))
    shade = 0.75 - 0.25 * distance**2 + 0.03 * _smooth_noise(rng, size, 10)
    colour = np.array([0.35, 0.65, 0.7]) * rng.uniform(0.97, 1.03, 3)
    image = np.where(disc[..., None], shade[..., None] * colour, background[..., None])
    return image, disc


def _scratch(
    rng: np.random.Generator, image: np.ndarray, centre: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A thin line bent once at `centre`, bright or dark: (shape, defect appearance)."""
    size = image.shape[0]
    angle = rng.uniform(0, 2 * np.pi)
    ends = []
    for turn in (0, np.pi + rng.uniform(-0.6, 0.6)):
        direction = np.array([np.cos(angle + turn), np.sin(angle + turn)])
        ends.append(centre + rng.uniform(0.15, 0.25) * size * direction)
    points = np.clip(np.round([ends[0], centre, ends[1]]), 0, size - 1).astype(np.int32)
    shape = cv2.polylines(np.zeros((size, size), np.uint8), [points], False, 1, max(2, round(size / 40)))
    return shape, np.full_like(image, 0.95 if rng.random() < 0.5 else 0.05)


def _blob(rng: np.random.Generator, image: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A filled ellipse where the surface is darkened and its texture smoothed away."""
    size = image.shape[0]
    axes = np.round(rng.uniform(0.07, 0.12, 2) * size).astype(int)
    shape = np.zeros((size, size), np.uint8)
    cv2.ellipse(shape, centre.tolist(), axes.tolist(), rng.uniform(0, 180), 0, 360, 1, -1)
    return shape, cv2.GaussianBlur(image, (0, 0), size / 32) * 0.45


def _color(rng: np.random.Generator, image: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A round spot of a saturated hue absent from the normal images."""
    size = image.shape[0]
    shape = cv2.circle(
        np.zeros((size, size), np.uint8), centre.tolist(), round(rng.uniform(0.07, 0.1) * size), 1, -1
    )
    hue = np.array([0.9, 0.1, 0.35]) if rng.random() < 0.5 else np.array([0.2, 0.25, 0.95])
    return shape, 0.2 * image + 0.8 * hue


KIND_GENERATORS: dict[str, Callable] = {"texture": _texture, "object": _object}
DEFECT_GENERATORS: dict[str, Callable] = {"scratch": _scratch, "blob": _blob, "color": _color}
SYNTHETIC_KINDS = tuple(KIND_GENERATORS)
DEFECT_TYPES = tuple(DEFECT_GENERATORS)


def _add_defect(rng: np.random.Generator, image: np.ndarray, surface: np.ndarray, defect: str) -> np.ndarray:
    """Paint a `defect` centred on the surface, at least 12% of the image away from its edge; return its mask."""
    inner = cv2.erode(
        surface.astype(np.uint8), np.ones((3, 3)), iterations=round(0.12 * len(image)), borderValue=0
    )
    ys, xs = np.nonzero(inner)
    i = rng.integers(len(xs))
    shape, appearance = DEFECT_GENERATORS[defect](rng, image, np.array([xs[i], ys[i]]))
    mask = (shape > 0) & surface
    image[mask] = appearance[mask]
    return mask


def _write_png(path: Path, image: np.ndarray) -> None:
    """Write an RGB float image in [0, 1] or a boolean mask as an 8-bit PNG."""
    if image.dtype == bool:
        pixels = image.astype(np.uint8) * 255
    else:
        pixels = cv2.cvtColor((np.clip(image, 0, 1) * 255).round().astype(np.uint8), cv2.COLOR_RGB2BGR)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), pixels):
        raise DataError(f"cannot write {path}")


def _write_dataset(folder: Path, params: dict) -> None:
    """All images and masks of one dataset, in MVTec layout, under `folder`."""
    rng = np.random.default_rng([params["seed"], SYNTHETIC_KINDS.index(params["kind"])])
    make_normal = KIND_GENERATORS[params["kind"]]
    size = params["image_size"]
    for i in range(params["n_train"]):
        _write_png(folder / "train" / "good" / f"{i:03d}.png", make_normal(rng, size)[0])
    for i in range(params["n_test_good"]):
        _write_png(folder / "test" / "good" / f"{i:03d}.png", make_normal(rng, size)[0])
    for defect in DEFECT_TYPES:
        for i in range(params["n_test_per_defect"]):
            image, surface = make_normal(rng, size)
            mask = _add_defect(rng, image, surface, defect)
            _write_png(folder / "test" / defect / f"{i:03d}.png", image)
            _write_png(folder / "ground_truth" / defect / f"{i:03d}_mask.png", mask)


def _marker_params(folder: Path) -> dict | None:
    """The parameters in our marker file, or None if `folder` has no (readable) marker."""
    try:
        return json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def generate_synthetic(
    root: str | os.PathLike,
    kind: str,
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 60,
    n_test_good: int = 10,
    n_test_per_defect: int = 10,
) -> Path:
    """Write the `kind` dataset to `root/kind` unless it is already there with these parameters.

    A marker file records the parameters: a matching marker skips generation, a different one
    (our own dataset, other parameters) regenerates it, and an existing folder without the marker is
    never touched (DataError). The dataset is written to a temporary sibling folder and renamed into
    place, so concurrent processes never see a half-written dataset. Returns `root/kind`.
    """
    if kind not in SYNTHETIC_KINDS:
        raise ConfigError(f"synthetic kind {kind!r} is unknown: choose one of {', '.join(SYNTHETIC_KINDS)}")
    if image_size < 32 or n_train < 2 or n_test_good < 0 or n_test_per_defect < 0:
        raise ConfigError(
            f"synthetic dataset needs image_size >= 32, n_train >= 2 and non-negative test counts; got "
            f"image_size={image_size}, n_train={n_train}, n_test_good={n_test_good}, n_test_per_defect={n_test_per_defect}"
        )
    params = {
        "generator_version": GENERATOR_VERSION, "kind": kind, "seed": seed, "image_size": image_size,
        "n_train": n_train, "n_test_good": n_test_good, "n_test_per_defect": n_test_per_defect,
    }  # fmt: skip
    target = Path(root).expanduser() / kind
    if target.exists():
        found = _marker_params(target)
        if found == params:
            return target
        if found is None:
            raise DataError(
                f"{target} exists but was not written by anomaly-lab's synthetic generator (no {MARKER_NAME}); "
                "it is left untouched: remove it or point data.root elsewhere"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{kind}.tmp-", dir=target.parent))
    try:
        _write_dataset(staging, params)
        (staging / MARKER_NAME).write_text(json.dumps(params, indent=2))
        _publish(staging, target, params)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _publish(staging: Path, target: Path, params: dict) -> None:
    """Rename `staging` to `target`, replacing a stale dataset of ours; another process may win the race."""
    if target.exists() and _marker_params(target) != params:
        stale = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex}")
        try:
            target.rename(stale)
        except FileNotFoundError:  # another process moved it away first
            pass
        shutil.rmtree(stale, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:  # another process published first: keep its copy if it is the same dataset
        if _marker_params(target) != params:
            raise DataError(
                f"could not write the synthetic dataset to {target}: another process changed it"
            ) from None


class SyntheticDataModule(MVTecDataModule):
    """The built-in synthetic dataset (`category` = kind: texture or object), generated on first use.

    Takes the arguments of :class:`AnomalyDataModule` plus the generator's: `data_seed` (the
    dataset's content; the split uses `seed`), `source_size` (pixels of the generated images),
    `n_train`, `n_test_good`, `n_test_per_defect`.
    """

    dataset_name = "synthetic"

    def __init__(
        self,
        root: str,
        category: str = "texture",
        image_size: int = 128,
        *,
        data_seed: int = 0,
        source_size: int = 128,
        n_train: int = 60,
        n_test_good: int = 10,
        n_test_per_defect: int = 10,
        **kwargs,
    ):
        super().__init__(root, category, image_size, **kwargs)
        self.generator_args = dict(
            kind=self.category, seed=data_seed, image_size=source_size,
            n_train=n_train, n_test_good=n_test_good, n_test_per_defect=n_test_per_defect,
        )  # fmt: skip

    def prepare_data(self) -> None:
        generate_synthetic(self.root, **self.generator_args)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.prepare_data()  # a no-op once the dataset is on disk
        super().setup(stage)
