"""The corruption of SSAE's training inputs (Bauer 2022, section 3.2 and Fig. 5), batched on tensors.

For each image X of a batch, on the batch's device: draw the size and location of a patch, deform the
patch elastically, optionally change its brightness, cut it with a random polygon and paste the masked
deformed content back. Returns X-hat and the binary mask M of the pasted shape; pixels outside M are
never changed.

The deformation is albumentations' ElasticTransform (2.x, the default Gaussian noise) applied to the
patch alone: noise N(0, 1) over the patch, divided by its largest absolute value, blurred with a
Gaussian of std sigma (border: replicate), times alpha, is each pixel's displacement; the patch is
resampled bilinearly at the displaced positions, reflected (101) into the patch. Here it runs on all
patches of a batch at once, in a box the size of the batch's largest patch: a smaller patch's noise is
extended by replicating its last row and column, which is what the replicate border gives inside the
patch, and the displaced positions are reflected into each image's own patch. The polygon is filled as
OpenCV's fillPoly fills it (centres inside, and the pixels its edges pass through). `ReferencePatchCorruption` (corruption_reference.py) is the per-image NumPy
version; a test checks that both give the same statistics.

Sizes are fractions of the image side, so that progressive resizing and other image sizes keep the
same corruption: the patch's height and width (`patch_size`, of the image's height and width), the
blur `elastic_sigma` (sigma_px = elastic_sigma * side) and the strength `elastic_alpha`
(alpha_px = elastic_alpha * side * sigma_px: the displacement of blurred noise scales as
alpha_px / sigma_px, so it stays the same fraction of the side, about elastic_alpha / (2 sqrt(pi) m)
with m the noise's largest absolute value, 3.5-4.5 for patches of 1,000-50,000 pixels), where side is
the image's shorter side. The paper gives none of these values.

Section 3.1 requires ||X-hat - X||_1 > 0 (Eq. 3 divides by it): an image whose draw left the shape
unchanged (a deformation of a flat region; changed: by more than `MIN_CHANGE` at some pixel) draws again, up to `max_tries` times; if still unchanged,
the shape's pixels are shifted in brightness by `fallback_shift` (up where that stays <= 1, else down).
Every draw comes from a torch generator on the images' device, seeded with `seed`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from anomaly_lab.errors import ConfigError

# A pixel counts as changed when it moved by more than half an 8-bit grey level: resampling a flat region
# changes it only by rounding.
MIN_CHANGE = 1 / 512


def elastic_pixels(side: int, alpha: float, sigma: float) -> tuple[float, float]:
    """(alpha_px, sigma_px) of the fractions `alpha` and `sigma` for an image whose shorter side is `side`."""
    sigma_px = sigma * side
    return alpha * side * sigma_px, sigma_px


def blur_matrix(length: int, kernel: Tensor) -> Tensor:
    """[length, length]: row i holds the 1-D kernel centred on i, taps beyond the ends moved to the end
    (the replicate border), so that blurring a signal is one matrix product."""
    radius = (len(kernel) - 1) // 2
    rows = torch.arange(length, device=kernel.device).view(-1, 1)
    taps = (rows + torch.arange(-radius, radius + 1, device=kernel.device)).clamp(0, length - 1)
    matrix = torch.zeros(length, length, device=kernel.device, dtype=kernel.dtype)
    return matrix.scatter_add_(1, taps, kernel.expand(length, -1).contiguous())


def gaussian_blur(fields: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of [N, C, H, W] with std `sigma` px, radius round(4 sigma) (OpenCV's automatic
    kernel for float images), replicate border; as two matrix products (faster than convolutions with long
    1-D kernels on CPUs)."""
    radius = max(1, round(4 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=fields.device, dtype=fields.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    rows, cols = blur_matrix(fields.shape[-2], kernel), blur_matrix(fields.shape[-1], kernel)
    return rows @ fields @ cols.T


def reflect101(position: Tensor, length: Tensor) -> Tensor:
    """Continuous positions reflected into [0, length - 1] without repeating the edge (OpenCV's BORDER_REFLECT_101)."""
    period = 2 * (length - 1)
    position = torch.remainder(position, period)
    return torch.where(position > length - 1, period - position, position)


def polygon_masks(ys: Tensor, xs: Tensor, px: Tensor, py: Tensor) -> Tensor:
    """Pixels of filled closed polygons, as OpenCV's fillPoly draws them: inside (even-odd rule at the pixel
    centre) or on an edge (the edge passes within half a pixel of the centre along its minor axis, the
    pixels a line rasteriser sets). ys [N, H, 1], xs [N, 1, W] pixel positions, px and py [N, K] vertices (a
    polygon with fewer corners repeats its first one: zero-length edges add nothing) -> [N, H, W]."""
    x1, y1 = px[:, :, None, None], py[:, :, None, None]
    x2, y2 = px.roll(-1, dims=1)[:, :, None, None], py.roll(-1, dims=1)[:, :, None, None]
    ys, xs = ys[:, None], xs[:, None]
    straddles = (y1 > ys) != (y2 > ys)
    crossing_x = x1 + (x2 - x1) * (ys - y1) / torch.where(y2 == y1, torch.ones_like(y1), y2 - y1)
    inside = (straddles & (xs < crossing_x)).sum(dim=1) % 2 == 1
    dx, dy = x2 - x1, y2 - y1
    steep = dy.abs() > dx.abs()  # y is the major axis
    major = torch.where(steep, dy, dx)
    t = torch.where(steep, ys - y1, xs - x1) / torch.where(major == 0, torch.ones_like(major), major)
    minor_offset = torch.where(steep, xs - (x1 + t * dx), ys - (y1 + t * dy))
    on_edge = (major != 0) & (t >= 0) & (t <= 1) & (minor_offset.abs() <= 0.5)
    corner = (xs == x1) & (ys == y1)
    return inside | (on_edge | corner).any(dim=1)


class PatchCorruption:
    """images [B, C, H, W] in [0, 1] -> (X-hat [B, C, H, W], M [B, 1, H, W] in {0, 1}), on the images' device.

    patch_size: (min, max) side of the patch as a fraction of the image's height and width (drawn
    independently). elastic_alpha, elastic_sigma: the deformation's strength and smoothness as fractions
    (module docstring). brightness: the patch is multiplied by a factor drawn from
    [1 - brightness, 1 + brightness] (0 = off). shape_vertices: corner count range of the polygon.
    """

    def __init__(
        self,
        patch_size: tuple[float, float] = (0.1, 0.4),
        elastic_alpha: float = 0.2,
        elastic_sigma: float = 0.02,
        brightness: float = 0.0,
        shape_vertices: tuple[int, int] = (3, 10),
        max_tries: int = 10,
        fallback_shift: float = 0.1,
        seed: int = 0,
    ):
        low, high = (float(v) for v in patch_size)
        if not 0 < low <= high <= 1:
            raise ConfigError(f"model.patch_size={list(patch_size)} must be [min, max] with 0 < min <= max <= 1")
        if not elastic_alpha >= 0 or not 0 < elastic_sigma <= 1:
            raise ConfigError(f"model.elastic_alpha={elastic_alpha} must be >= 0 and model.elastic_sigma="
                              f"{elastic_sigma} in (0, 1]: fractions of the image side")
        if not 0 <= brightness < 1:
            raise ConfigError(f"model.brightness={brightness} must be in [0, 1)")
        if not 3 <= shape_vertices[0] <= shape_vertices[1]:
            raise ConfigError(f"model.shape_vertices={list(shape_vertices)} must be [min, max] with 3 <= min <= max")
        if max_tries < 1 or not 0 < fallback_shift <= 0.5:
            raise ConfigError(
                f"model.max_tries={max_tries} must be >= 1 and model.fallback_shift={fallback_shift} in (0, 0.5]"
            )
        self.patch_size = (low, high)
        self.elastic_alpha, self.elastic_sigma = float(elastic_alpha), float(elastic_sigma)
        self.brightness = brightness
        self.shape_vertices = tuple(int(v) for v in shape_vertices)
        self.max_tries = max_tries
        self.fallback_shift = fallback_shift
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        self.seed, self._generator = seed, None

    def generator(self, device: torch.device) -> torch.Generator:
        """The seeded generator on `device` (made on first use there)."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        images = images.detach()
        corrupted, masks = images.clone(), images.new_zeros(images.shape[0], 1, *images.shape[2:])
        pending = torch.arange(images.shape[0], device=images.device)
        for attempt in range(self.max_tries):
            content, shape, corner = self.draw(images[pending])
            original = crop(images[pending], corner, shape.shape[-2:])
            if attempt == self.max_tries - 1:  # the last try: shift the brightness of those still unchanged
                unchanged = ~changes(content, original, shape)
                shifted = torch.where(original + self.fallback_shift <= 1, original + self.fallback_shift,
                                      original - self.fallback_shift)
                content = torch.where(unchanged.view(-1, 1, 1, 1), shifted, content)
            changed = changes(content, original, shape)
            paste(corrupted, masks, pending[changed], content[changed], shape[changed], corner[changed])
            pending = pending[~changed]
            if len(pending) == 0:
                break
        return corrupted, masks

    def draw(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One draw for each image [N, C, H, W], in a box as large as the batch's largest patch, from each
        patch's top-left corner: (the deformed content [N, C, h, w], the shape mask [N, h, w] (bool, inside
        the patch), the corners [N, 2] (top, left))."""
        count, _, height, width = images.shape
        device, generator = images.device, self.generator(images.device)
        uniform = lambda *size: torch.rand(*size, generator=generator, device=device)  # noqa: E731
        low, high = self.patch_size
        sides = torch.tensor([height, width], device=device)
        patch = (low + (high - low) * uniform(count, 2)) * sides
        patch = patch.round().clamp(min=2).minimum(sides).long()  # [N, 2]: height, width
        corner = (uniform(count, 2) * (sides - patch + 1)).floor().long()  # top, left
        box = patch.amax(dim=0).tolist()
        ys = torch.arange(box[0], device=device).view(1, -1, 1)  # patch coordinates
        xs = torch.arange(box[1], device=device).view(1, 1, -1)
        shape = self.shape(ys, xs, patch, uniform)
        content = self.deform(images, ys, xs, patch, corner, generator)
        if self.brightness > 0:
            factor = 1 - self.brightness + 2 * self.brightness * uniform(count)
            content = content * factor.view(-1, 1, 1, 1)
        return content.clamp(0, 1), shape, corner

    def shape(self, ys: Tensor, xs: Tensor, patch: Tensor, uniform) -> Tensor:
        """The random polygon of each patch [N, h, w]: `shape_vertices` corners (inclusive range), one at a random
        angle in each of as many equal sectors, each at 50-100 % of the half-size from the patch centre, rounded
        to pixels as OpenCV's fillPoly takes them; the centre pixel always belongs to it."""
        count, most = patch.shape[0], self.shape_vertices[1]
        fewest = self.shape_vertices[0]
        corners = fewest + (uniform(count) * (most - fewest + 1)).floor().long().clamp(max=most - fewest)
        index = torch.arange(most, device=patch.device)
        angles = (index + uniform(count, most)) * 2 * math.pi / corners.view(-1, 1)
        radii = 0.5 + 0.5 * uniform(count, most)
        centre_y, centre_x = ((patch - 1) / 2).unbind(dim=1)
        px = (centre_x.view(-1, 1) * (1 + radii * torch.cos(angles))).round()
        py = (centre_y.view(-1, 1) * (1 + radii * torch.sin(angles))).round()
        unused = index.view(1, -1) >= corners.view(-1, 1)
        px, py = torch.where(unused, px[:, :1], px), torch.where(unused, py[:, :1], py)
        inside = polygon_masks(ys.float(), xs.float(), px, py)
        centre = (ys == (patch[:, 0] // 2).view(-1, 1, 1)) & (xs == (patch[:, 1] // 2).view(-1, 1, 1))
        in_patch = (ys < patch[:, 0].view(-1, 1, 1)) & (xs < patch[:, 1].view(-1, 1, 1))
        return (inside | centre) & in_patch

    def deform(self, images: Tensor, ys: Tensor, xs: Tensor, patch: Tensor, corner: Tensor,
               generator: torch.Generator) -> Tensor:
        """Each image's patch deformed elastically [N, C, h, w] (the box beyond a smaller patch: don't care)."""
        count, _, height, width = images.shape
        alpha, sigma = elastic_pixels(min(height, width), self.elastic_alpha, self.elastic_sigma)
        noise = torch.randn(count, 2, ys.shape[1], xs.shape[2], generator=generator, device=images.device)
        # beyond a smaller patch, its last row and column replicated: the blur then sees the replicate border
        rows = ys.minimum(patch[:, 0].view(-1, 1, 1) - 1)  # [N, h, 1]
        cols = xs.minimum(patch[:, 1].view(-1, 1, 1) - 1)  # [N, 1, w]
        noise = noise.gather(2, rows.unsqueeze(1).expand(-1, 2, -1, noise.shape[3]))
        noise = noise.gather(3, cols.unsqueeze(1).expand(-1, 2, noise.shape[2], -1))
        noise = noise / noise.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        shift = gaussian_blur(noise, sigma) * alpha  # [N, 2, h, w]: x, y displacement in pixels
        source_x = reflect101(xs + shift[:, 0], patch[:, 1].view(-1, 1, 1)) + corner[:, 1].view(-1, 1, 1)
        source_y = reflect101(ys + shift[:, 1], patch[:, 0].view(-1, 1, 1)) + corner[:, 0].view(-1, 1, 1)
        grid = torch.stack([source_x / max(width - 1, 1), source_y / max(height - 1, 1)], dim=-1) * 2 - 1
        return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def changes(content: Tensor, original: Tensor, shape: Tensor) -> Tensor:
    """[N] bool: the content differs from the original by more than MIN_CHANGE at some pixel of the shape."""
    return (((content - original).abs() > MIN_CHANGE) & shape.unsqueeze(1)).flatten(1).any(dim=1)


def crop(images: Tensor, corner: Tensor, box: tuple[int, int]) -> Tensor:
    """[N, C, h, w]: each image's box from its corner (rows and columns beyond the image: its last ones)."""
    rows = (corner[:, 0].view(-1, 1) + torch.arange(box[0], device=images.device)).clamp(max=images.shape[2] - 1)
    cols = (corner[:, 1].view(-1, 1) + torch.arange(box[1], device=images.device)).clamp(max=images.shape[3] - 1)
    index = torch.arange(len(images), device=images.device).view(-1, 1, 1)
    return images[index, :, rows.unsqueeze(2), cols.unsqueeze(1)].permute(0, 3, 1, 2)


def paste(corrupted: Tensor, masks: Tensor, which: Tensor, content: Tensor, shape: Tensor, corner: Tensor) -> None:
    """Write each box's content into images `which` of `corrupted` where its shape is set, and the shape into `masks`."""
    image, y, x = shape.nonzero(as_tuple=True)
    rows, cols = corner[image, 0] + y, corner[image, 1] + x
    corrupted[which[image], :, rows, cols] = content[image, :, y, x]
    masks[which[image], 0, rows, cols] = 1
