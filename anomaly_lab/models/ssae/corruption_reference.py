"""The per-image reference of SSAE's corruption (Bauer 2022, section 3.2 and Fig. 5): NumPy, OpenCV
and albumentations' ElasticTransform, one image at a time on the CPU. Training uses the batched tensor
version in `corruption.py`; this one is what its test (equal statistics) and its benchmark
(experiments/benchmarks/ssae_corruption.py) compare it with. Its elastic parameters are in pixels.

For each image X: sample the size and location of a patch, deform the patch elastically
(albumentations' ElasticTransform), optionally change its brightness, cut it with a random shape
mask and paste the masked deformed content back. The result is the modified image X-hat and the
binary mask M of the pasted shape; pixels outside M are never changed.

Section 3.1 requires ||X-hat - X||_1 > 0 (Eq. 3 divides by it). A deformation of a flat region can
leave the patch unchanged (by more than `MIN_CHANGE`), so the draw is repeated up to `max_tries` times; if it is still
unchanged, the shape's pixels are shifted in brightness by `fallback_shift` (up where that stays
<= 1, else down), which changes every one of them.

The paper gives no values for the patch sizes, the deformation strength or the shapes: they are
the constructor's arguments. All draws come from a numpy generator seeded with `seed`.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch
from torch import Tensor

from anomaly_lab.errors import ConfigError
from anomaly_lab.models.ssae.corruption import MIN_CHANGE


def random_shape(height: int, width: int, rng: np.random.Generator, vertices: tuple[int, int] = (3, 10)) -> np.ndarray:
    """A random filled polygon (bool [height, width]) around the patch centre: `vertices` corners
    (inclusive range), one at a random angle in each of as many equal sectors, each at 50-100 % of
    the half-size from the centre."""
    count = int(rng.integers(vertices[0], vertices[1] + 1))
    angles = (np.arange(count) + rng.uniform(0, 1, count)) * 2 * np.pi / count
    radii = rng.uniform(0.5, 1.0, count)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    points = np.stack([cx + radii * cx * np.cos(angles), cy + radii * cy * np.sin(angles)], axis=1)
    shape = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(shape, [np.round(points).astype(np.int32)], 1)
    shape[height // 2, width // 2] = 1  # never empty, however small the patch
    return shape.astype(bool)


class ReferencePatchCorruption:
    """images [B, C, H, W] in [0, 1] -> (X-hat [B, C, H, W], M [B, 1, H, W] in {0, 1}).

    patch_size: (min, max) side of the patch as a fraction of the image side (height and width are
    drawn independently). elastic_alpha, elastic_sigma: ElasticTransform's displacement scale and
    smoothing, in pixels. brightness: the patch is multiplied by a factor drawn from
    [1 - brightness, 1 + brightness] (0 = off). shape_vertices: corner count range of the shape.
    """

    def __init__(
        self,
        patch_size: tuple[float, float] = (0.1, 0.4),
        elastic_alpha: float = 1000.0,
        elastic_sigma: float = 10.0,
        brightness: float = 0.0,
        shape_vertices: tuple[int, int] = (3, 10),
        max_tries: int = 10,
        fallback_shift: float = 0.1,
        seed: int = 0,
    ):
        low, high = (float(v) for v in patch_size)
        if not 0 < low <= high <= 1:
            raise ConfigError(f"model.patch_size={list(patch_size)} must be [min, max] with 0 < min <= max <= 1")
        if not 0 <= brightness < 1:
            raise ConfigError(f"model.brightness={brightness} must be in [0, 1)")
        if not 3 <= shape_vertices[0] <= shape_vertices[1]:
            raise ConfigError(f"model.shape_vertices={list(shape_vertices)} must be [min, max] with 3 <= min <= max")
        if max_tries < 1 or not 0 < fallback_shift <= 0.5:
            raise ConfigError(
                f"model.max_tries={max_tries} must be >= 1 and model.fallback_shift={fallback_shift} in (0, 0.5]"
            )
        self.patch_size = (low, high)
        self.brightness = brightness
        self.shape_vertices = tuple(int(v) for v in shape_vertices)
        self.max_tries = max_tries
        self.fallback_shift = fallback_shift
        self.elastic = A.ElasticTransform(alpha=elastic_alpha, sigma=elastic_sigma,
                                          border_mode=cv2.BORDER_REFLECT_101, p=1.0)
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        array = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()  # [B, H, W, C]
        corrupted, masks = array.copy(), np.zeros(array.shape[:3], dtype=np.float32)
        for image, out, mask in zip(array, corrupted, masks, strict=True):
            top, left, content, shape = self._draw(image)
            height, width = shape.shape
            out[top:top + height, left:left + width][shape] = content[shape]
            mask[top:top + height, left:left + width] = shape
        to_tensor = lambda a: torch.from_numpy(a).to(device=images.device, dtype=images.dtype)  # noqa: E731
        return to_tensor(corrupted).permute(0, 3, 1, 2).contiguous(), to_tensor(masks).unsqueeze(1)

    def _draw(self, image: np.ndarray) -> tuple[int, int, np.ndarray, np.ndarray]:
        """(top, left, new patch content, shape mask) for one image [H, W, C]; the content differs
        from the image at one pixel of the shape at least."""
        for _ in range(self.max_tries):
            top, left, patch, shape = self._patch(image)
            self.elastic.set_random_seed(int(self.rng.integers(2**31)))
            content = self.elastic(image=np.ascontiguousarray(patch))["image"]
            if self.brightness > 0:
                content = content * self.rng.uniform(1 - self.brightness, 1 + self.brightness)
            content = np.clip(content, 0.0, 1.0)
            if (np.abs(content[shape] - patch[shape]) > MIN_CHANGE).any():
                return top, left, content, shape
        shifted = np.where(patch + self.fallback_shift <= 1.0, patch + self.fallback_shift, patch - self.fallback_shift)
        return top, left, shifted, shape

    def _patch(self, image: np.ndarray) -> tuple[int, int, np.ndarray, np.ndarray]:
        size = image.shape[:2]
        height, width = (
            int(np.clip(round(self.rng.uniform(*self.patch_size) * side), 2, side)) for side in size
        )
        top = int(self.rng.integers(0, size[0] - height + 1))
        left = int(self.rng.integers(0, size[1] - width + 1))
        shape = random_shape(height, width, self.rng, self.shape_vertices)
        return top, left, image[top:top + height, left:left + width], shape
