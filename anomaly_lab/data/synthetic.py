"""A small seeded dataset in MVTec layout with exact masks, written once to disk and reused.

Three kinds. `texture` (a woven, fabric-like pattern) and `object` (a shaded disc on a plain
background, with slight position and colour jitter) carry painted defects, each a few % of the image
and plainly visible: `scratch` (thin bright or dark lines), `blob` (an elliptic stain), `color` (a spot
of a foreign hue). `hard` needs learning: a weave of two gratings whose pose (orientation, period,
phase), slow warp, lighting and tint vary from image to image, with defects that break its structure
inside a small disc (1-3 % of the image) at the weave's own intensity, contrast and colour: `shift`
(the main grating shifted by half a period), `fork` (a stripe ends, an edge dislocation), `twist` (the
stripes turned by 60-90 degrees). Each dataset lives in `root/<kind>-<key>`, the key a hash of every
generator parameter, so that two settings never share a folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from anomaly_lab.data.datamodule import AnomalyDataModule
from anomaly_lab.data.dataset import Sample
from anomaly_lab.data.mvtec import mvtec_samples
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


def _hard(rng: np.random.Generator, size: int, defect: str | None) -> tuple[np.ndarray, np.ndarray]:
    """A weave of two gratings with varied pose, phase, warp, lighting and tint; with a `defect` of
    HARD_DEFECT_TYPES written into the main grating's phase inside a small disc: (image, mask).
    Lengths are fractions of the image side, so that every size shows the same weave."""
    y, x = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    angle = np.deg2rad(30 + rng.normal(0, 2))
    frequencies = 2 * np.pi * rng.uniform(0.99, 1.01) * np.array([11.0, 7.0])  # periods 1/11 and 1/7 of the side
    phases = [
        frequencies[0] * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform(0, 2 * np.pi),
        frequencies[1] * (y * np.cos(angle) - x * np.sin(angle)) + rng.uniform(0, 2 * np.pi),
    ]
    phases = [phase + 0.15 * _smooth_noise(rng, size, 3) for phase in phases]  # a slow warp
    mask = np.zeros((size, size), bool)
    if defect is not None:
        centre, radius = rng.uniform(0.2, 0.8, 2), rng.uniform(0.06, 0.1)
        dx, dy = x - centre[0], y - centre[1]
        distance = np.hypot(dx, dy)
        mask = distance <= radius
        inside = np.clip((radius - distance) / 0.03 + 0.5, 0, 1)  # 1 inside, 0 outside, a soft edge
        sign = rng.choice([-1, 1])
        if defect == "shift":  # half a period
            change = np.pi
        elif defect == "fork":  # a stripe ends: an edge dislocation
            change = sign * np.arctan2(dy, dx)
        else:  # twist: the stripes turned by 60-90 degrees about the centre
            turn = angle + sign * np.deg2rad(rng.uniform(60, 90))
            change = frequencies[0] * (dx * (np.cos(turn) - np.cos(angle)) + dy * (np.sin(turn) - np.sin(angle)))
        phases[0] = phases[0] + inside * change
    weave = (np.cos(phases[0]) + 0.6 * np.cos(phases[1])) / 1.6
    slope = rng.uniform(-1, 1, 2)
    light = rng.uniform(0.97, 1.03) + 0.08 * (slope[0] * (x - 0.5) + slope[1] * (y - 0.5))
    colour = np.array([0.75, 0.7, 0.6]) * rng.uniform(0.97, 1.03, 3)
    image = (light * (0.55 + 0.18 * rng.uniform(0.95, 1.05) * weave))[..., None] * colour
    return image + 0.07 * rng.standard_normal((size, size, 1)), mask


PAINTED_DEFECTS: dict[str, Callable] = {"scratch": _scratch, "blob": _blob, "color": _color}
DEFECT_TYPES = tuple(PAINTED_DEFECTS)
HARD_DEFECT_TYPES = ("shift", "fork", "twist")


def _painted(make_normal: Callable) -> Callable:
    """A kind generator that paints one of DEFECT_TYPES onto the surface `make_normal` returns."""

    def make(rng: np.random.Generator, size: int, defect: str | None) -> tuple[np.ndarray, np.ndarray]:
        image, surface = make_normal(rng, size)
        mask = np.zeros((size, size), bool) if defect is None else _add_defect(rng, image, surface, defect)
        return image, mask

    return make


# kind -> (generator (rng, size, defect or None) -> (image, mask), its defect types)
KINDS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "texture": (_painted(_texture), DEFECT_TYPES),
    "object": (_painted(_object), DEFECT_TYPES),
    "hard": (_hard, HARD_DEFECT_TYPES),
}
SYNTHETIC_KINDS = tuple(KINDS)


def _add_defect(rng: np.random.Generator, image: np.ndarray, surface: np.ndarray, defect: str) -> np.ndarray:
    """Paint a `defect` centred on the surface, at least 12% of the image away from its edge; return its mask."""
    inner = cv2.erode(
        surface.astype(np.uint8), np.ones((3, 3)), iterations=round(0.12 * len(image)), borderValue=0
    )
    ys, xs = np.nonzero(inner)
    i = rng.integers(len(xs))
    shape, appearance = PAINTED_DEFECTS[defect](rng, image, np.array([xs[i], ys[i]]))
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
    make, defects = KINDS[params["kind"]]
    size = params["image_size"]
    for i in range(params["n_train"]):
        _write_png(folder / "train" / "good" / f"{i:03d}.png", make(rng, size, None)[0])
    for i in range(params["n_test_good"]):
        _write_png(folder / "test" / "good" / f"{i:03d}.png", make(rng, size, None)[0])
    for defect in defects:
        for i in range(params["n_test_per_defect"]):
            image, mask = make(rng, size, defect)
            _write_png(folder / "test" / defect / f"{i:03d}.png", image)
            _write_png(folder / "ground_truth" / defect / f"{i:03d}_mask.png", mask)


def _marker_params(folder: Path) -> dict | None:
    """The parameters in our marker file, or None if `folder` has no (readable) marker."""
    try:
        return json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def synthetic_params(
    kind: str,
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 60,
    n_test_good: int = 10,
    n_test_per_defect: int = 10,
) -> dict:
    """The checked generator parameters of one dataset, as its marker file records them."""
    if kind not in SYNTHETIC_KINDS:
        raise ConfigError(f"synthetic kind {kind!r} is unknown: choose one of {', '.join(SYNTHETIC_KINDS)}")
    if image_size < 32 or n_train < 2 or n_test_good < 0 or n_test_per_defect < 0:
        raise ConfigError(
            f"synthetic dataset needs image_size >= 32, n_train >= 2 and non-negative test counts; got "
            f"image_size={image_size}, n_train={n_train}, n_test_good={n_test_good}, n_test_per_defect={n_test_per_defect}"
        )
    return {
        "generator_version": GENERATOR_VERSION, "kind": kind, "seed": seed, "image_size": image_size,
        "n_train": n_train, "n_test_good": n_test_good, "n_test_per_defect": n_test_per_defect,
    }  # fmt: skip


def synthetic_folder(root: str | os.PathLike, params: dict) -> Path:
    """`root/<kind>-<key>`: the key, 10 hex digits of a hash of `params`, names one setting's folder."""
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return Path(root).expanduser() / f"{params['kind']}-{key}"


def generate_synthetic(root: str | os.PathLike, kind: str, **generator_args) -> Path:
    """Write the `kind` dataset (arguments of `synthetic_params`) to its folder under `root` unless it is
    there already; return the folder.

    A marker file records the parameters. The folder is our dataset of these parameters when its marker
    matches; an existing folder without the marker, or with other parameters, is never touched
    (DataError). The dataset is written to a temporary sibling folder and renamed into place, so
    concurrent processes never see a half-written dataset.
    """
    params = synthetic_params(kind, **generator_args)
    target = synthetic_folder(root, params)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _write_dataset(staging, params)
            (staging / MARKER_NAME).write_text(json.dumps(params, indent=2))
            try:
                staging.rename(target)
            except OSError:  # another process published first: its copy is checked below
                pass
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    found = _marker_params(target)
    if found != params:
        what = f"no {MARKER_NAME}" if found is None else f"its {MARKER_NAME} records other parameters"
        raise DataError(
            f"{target} exists but is not anomaly-lab's synthetic dataset of these parameters ({what}); "
            "it is left untouched: remove it or point data.root elsewhere"
        )
    return target


class SyntheticDataModule(AnomalyDataModule):
    """The built-in synthetic dataset (`category` = kind: texture, object or hard), generated on first use.

    Takes the arguments of :class:`AnomalyDataModule` plus the generator's: `data_seed` (the
    dataset's content; the split uses `seed`), `source_size` (pixels of the generated images),
    `n_train`, `n_test_good`, `n_test_per_defect`. The images lie in `folder`, `root/<kind>-<key>`.
    """

    dataset_name = "synthetic"
    has_masks = True

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
            seed=data_seed, image_size=source_size,
            n_train=n_train, n_test_good=n_test_good, n_test_per_defect=n_test_per_defect,
        )  # fmt: skip
        self.folder = synthetic_folder(self.root, synthetic_params(self.category, **self.generator_args))

    def prepare_data(self) -> None:
        generate_synthetic(self.root, self.category, **self.generator_args)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.prepare_data()  # a no-op once the dataset is on disk
        super().setup(stage)

    def find_samples(self) -> tuple[list[Sample], list[Sample]]:
        return mvtec_samples(self.folder)
