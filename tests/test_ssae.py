"""SSAE (Bauer 2022): Table 1 shapes, the corruption, objectives Eq. 1 and Eq. 3, training and detection."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn

from anomaly_lab.callbacks import EarlyStoppingOnBest
from anomaly_lab.errors import ConfigError
from anomaly_lab.hardware import fast_mixed_precision
from anomaly_lab.models import Ssae
from anomaly_lab.models.ssae.corruption import PatchCorruption, elastic_pixels, gaussian_blur, polygon_masks
from anomaly_lab.models.ssae.corruption_reference import ReferencePatchCorruption
from anomaly_lab.models.ssae.model import check_schedule, training_size
from anomaly_lab.models.ssae.network import SsaeNet, sdc_dilations
from anomaly_lab.models.ssae.objectives import objective_eq1, objective_eq3
from anomaly_lab.run import load_weights, train
from tests.helpers import compose_config

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


# --- Table 1 ------------------------------------------------------------------------------------

def test_table1_shapes_output_equals_input_and_sdc_blocks_give_320_channels():
    net = SsaeNet().eval()
    x = torch.rand(2, 3, 64, 48)
    encoded = net.encoder(x)
    assert encoded.shape == (2, 128, 8, 6)
    features = encoded
    for block in net.sdc:
        assert [b[0].dilation for b in block.branches] == [(d, d) for d in (1, 2, 4, 8, 16)]
        assert all(b[0].kernel_size == (5, 5) and b[0].out_channels == 64 for b in block.branches)
        features = block(features)
        assert features.shape == (2, 320, 8, 6)
    with torch.no_grad():
        out = net(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


def test_table1_layers_batch_norm_after_every_conv_but_the_last():
    net = SsaeNet()
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    # 6 encoder convs + 4 x 5 SDC branches + 1 + 3 x (transposed + 2) + the last 1x1
    assert len(convs) == 6 + 20 + 1 + 9 + 1 and len(norms) == len(convs) - 1
    last = net.decoder[-1]
    assert isinstance(last, nn.Conv2d) and last.kernel_size == (1, 1) and (last.in_channels, last.out_channels) == (32, 3)
    ups = [m for m in net.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(u.out_channels, u.stride) for u in ups] == [(256, (2, 2)), (128, (2, 2)), (64, (2, 2))]


def test_sdc_dilations_scale_with_the_image_so_small_maps_are_not_mostly_padding():
    assert sdc_dilations(512) == (1, 2, 4, 8, 16)  # Table 1
    assert sdc_dilations(256) == (1, 1, 2, 4, 8) and sdc_dilations(128) == (1, 1, 1, 2, 4)
    model = Ssae(sdc_dilations="auto", image_size=128)
    assert [b[0].dilation[0] for b in model.net.sdc[0].branches] == [1, 1, 1, 2, 4]
    # the largest 5x5 kernel spans 4 * 4 + 1 = 17 pixels of the 16 x 16 SDC map at 128 px
    assert Ssae(sdc_dilations=[1, 2, 4, 8, 16]).net.sdc[0].branches[-1][0].dilation == (16, 16)
    with pytest.raises(ConfigError, match="sdc_dilations"):
        Ssae(sdc_dilations=[1, 0])
    with pytest.raises(ConfigError, match="image_size"):
        Ssae(sdc_dilations="auto")


def test_input_size_must_be_a_multiple_of_8():
    with pytest.raises(ConfigError, match="multiples of 8"):
        SsaeNet()(torch.rand(1, 3, 20, 24))


# --- corruption (section 3.2) -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["texture", "flat"])
def test_corruption_changes_pixels_only_inside_the_mask_and_always_some(kind):
    images = torch.rand(6, 3, 40, 40) if kind == "texture" else torch.full((6, 3, 40, 40), 0.5)
    corruption = PatchCorruption(brightness=0.2, seed=3)
    for _ in range(3):
        corrupted, mask = corruption(images)
        assert mask.shape == (6, 1, 40, 40) and set(mask.unique().tolist()) <= {0.0, 1.0}
        changed = (corrupted != images).any(dim=1, keepdim=True)
        assert not (changed & (mask == 0)).any()
        assert ((corrupted - images).abs().flatten(1).sum(1) > 0).all()
        assert corrupted.min() >= 0 and corrupted.max() <= 1


def test_corruption_is_seeded():
    images = torch.rand(3, 3, 32, 32)
    first = PatchCorruption(seed=7)(images)
    second = PatchCorruption(seed=7)(images)
    other = PatchCorruption(seed=8)(images)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[1], other[1])


def coordinate_ramps(count: int, size: int) -> torch.Tensor:
    """Images whose first two channels are the pixel's x and y in [0, 1]: a pixel's change is its displacement."""
    y, x = torch.meshgrid(torch.arange(size) / (size - 1), torch.arange(size) / (size - 1), indexing="ij")
    return torch.stack([x, y, torch.full_like(x, 0.5)]).expand(count, -1, -1, -1).contiguous()


def corruption_statistics(corruption, size: int, count: int = 200) -> tuple[float, float]:
    """(corrupted fraction of the image, mean displacement of the corrupted pixels as a fraction of the side)."""
    images = coordinate_ramps(count, size)
    corrupted, mask = corruption(images)
    shift = (corrupted - images)[:, :2].abs()[mask.bool().expand(-1, 2, -1, -1)]
    return mask.mean().item(), shift.mean().item()


@pytest.mark.parametrize("size", [64, 128])
def test_tensor_corruption_has_the_statistics_of_the_numpy_reference(size):
    """The batched corruption against the per-image albumentations/OpenCV path with the same parameters in
    pixels, 200 images each on a fixed seed: the corrupted area within 10 %, the displacement within 5 %
    (measured: 0.0221 / 0.0209 and 0.893 / 0.899 px at 64 px; 0.0208 / 0.0201 and 1.62 / 1.58 px at 128)."""
    alpha_px, sigma_px = elastic_pixels(size, 0.2, 0.02)
    area, shift = corruption_statistics(PatchCorruption(elastic_alpha=0.2, elastic_sigma=0.02, seed=0), size)
    reference_area, reference_shift = corruption_statistics(
        ReferencePatchCorruption(elastic_alpha=alpha_px, elastic_sigma=sigma_px, seed=0), size)
    assert area == pytest.approx(reference_area, rel=0.1)
    assert shift == pytest.approx(reference_shift, rel=0.05)
    assert shift * (size - 1) > 0.5  # the patches do move


def test_corruption_in_fractions_of_the_side_is_the_same_at_every_size():
    """What progressive resizing relies on: at 64 and 128 px the same fraction of the image is corrupted and
    pixels move by the same fraction of the side."""
    corruption = PatchCorruption(elastic_alpha=0.2, elastic_sigma=0.02, seed=0)
    (small_area, small_shift), (large_area, large_shift) = (corruption_statistics(corruption, s) for s in (64, 128))
    assert small_area == pytest.approx(large_area, rel=0.15)
    assert small_shift == pytest.approx(large_shift, rel=0.15)


def test_gaussian_blur_equals_opencv_with_a_replicated_border():
    field = torch.randn(1, 1, 40, 50, generator=torch.Generator().manual_seed(0))
    expected = cv2.GaussianBlur(field[0, 0].numpy(), (0, 0), 2.3, borderType=cv2.BORDER_REPLICATE)
    np.testing.assert_allclose(gaussian_blur(field, 2.3)[0, 0].numpy(), expected, atol=1e-5)


def test_polygon_fill_matches_opencv_fill_poly():
    rng = np.random.default_rng(0)
    intersection = union = 0
    for _ in range(100):
        height, width = (int(v) for v in rng.integers(3, 50, 2))
        corners = int(rng.integers(3, 11))
        angles = (np.arange(corners) + rng.uniform(0, 1, corners)) * 2 * np.pi / corners
        radii = rng.uniform(0.5, 1, corners)
        cy, cx = (height - 1) / 2, (width - 1) / 2
        points = np.round(np.stack([cx + radii * cx * np.cos(angles), cy + radii * cy * np.sin(angles)], 1))
        expected = np.zeros((height, width), np.uint8)
        cv2.fillPoly(expected, [points.astype(np.int32)], 1)
        ys, xs = torch.arange(height).float().view(1, -1, 1), torch.arange(width).float().view(1, 1, -1)
        vertices = torch.from_numpy(points).float()
        ours = polygon_masks(ys, xs, vertices[None, :, 0], vertices[None, :, 1])[0].numpy()
        intersection += (ours & expected.astype(bool)).sum()
        union += (ours | expected.astype(bool)).sum()
    assert intersection / union > 0.98  # measured 0.993


def test_corruption_sizes_are_fractions_and_bad_values_raise():
    with pytest.raises(ConfigError, match="elastic_sigma"):
        PatchCorruption(elastic_sigma=10.0)  # a pixel value from before: must be a fraction of the side
    with pytest.raises(ConfigError, match="patch_size"):
        PatchCorruption(patch_size=(0.5, 0.2))


def test_brightness_variation_changes_the_patch_brightness():
    flat = torch.full((64, 3, 32, 32), 0.5)
    corrupted, mask = PatchCorruption(brightness=0.3, seed=0)(flat)
    inside = corrupted[mask.bool().expand(-1, 3, -1, -1)]
    assert inside.min() < 0.4 and inside.max() > 0.6  # factors across [0.7, 1.3]
    unchanged, mask = PatchCorruption(brightness=0.0, max_tries=1, seed=0)(flat)
    assert torch.allclose(unchanged[mask.bool().expand(-1, 3, -1, -1)], torch.tensor(0.6))  # only the fallback


# --- objectives Eq. 1 and Eq. 3 -----------------------------------------------------------------

def test_objectives_by_hand_on_a_2x2_image():
    target = torch.zeros(1, 1, 2, 2)
    output = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)  # residual F(X-hat) - X
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).reshape(1, 1, 2, 2)
    corrupted = torch.tensor([[0.5, 0.0], [0.0, 0.0]]).reshape(1, 1, 2, 2)
    normal_term = math.sqrt(2**2 + 3**2 + 4**2) / 3  # ||M-bar (.) r||_2 / ||M-bar||_1
    assert objective_eq1(output, target, mask, 0.5).item() == pytest.approx(0.5 * normal_term + 0.5 * 1.0)
    # ||0.5 * 1||_2 / ||0.5||_1 = 1
    assert objective_eq3(output, target, corrupted, mask, 0.5).item() == pytest.approx(0.5 * normal_term - 0.5 * 1.0)
    assert objective_eq1(output, target, mask, 1.0).item() == pytest.approx(normal_term)


def brute_force(output, target, weight_a, weight_b, lam, sign):
    """lam * ||A (.) r||_2 / ||A||_1 + sign * (1 - lam) * ||B (.) r||_2 / ||B||_1 per image, with loops."""
    losses = []
    for b in range(output.shape[0]):
        sums = [0.0, 0.0, 0.0, 0.0]  # squares A, squares B, |A|, |B|
        for c in range(output.shape[1]):
            for i in range(output.shape[2]):
                for j in range(output.shape[3]):
                    r = float(output[b, c, i, j] - target[b, c, i, j])
                    a, w = float(weight_a[b, c, i, j]), float(weight_b[b, c, i, j])
                    sums[0] += (a * r) ** 2
                    sums[1] += (w * r) ** 2
                    sums[2] += abs(a)
                    sums[3] += abs(w)
        losses.append(lam * math.sqrt(sums[0]) / sums[2] + sign * (1 - lam) * math.sqrt(sums[1]) / sums[3])
    return sum(losses) / len(losses)


def test_objectives_equal_a_brute_force_reference():
    generator = torch.Generator().manual_seed(0)
    output, target = torch.rand(2, 3, 5, 4, generator=generator), torch.rand(2, 3, 5, 4, generator=generator)
    mask = (torch.rand(2, 1, 5, 4, generator=generator) > 0.6).float()
    mask[:, :, 0, 0], mask[:, :, 1, 1] = 1.0, 0.0
    corrupted = torch.where(mask.bool(), torch.rand(2, 3, 5, 4, generator=generator), target)
    full = mask.expand(-1, 3, -1, -1)
    assert objective_eq1(output, target, mask, 0.3).item() == pytest.approx(
        brute_force(output, target, 1 - full, full, 0.3, +1), rel=1e-5)
    assert objective_eq3(output, target, corrupted, mask, 0.5).item() == pytest.approx(
        brute_force(output, target, 1 - full, (corrupted - target).abs(), 0.5, -1), rel=1e-5)


# --- training -----------------------------------------------------------------------------------

def test_schedule_scales_the_training_size():
    schedule = check_schedule([[0, 0.25], [2, 0.5], [4, 1.0]])
    assert [training_size(schedule, e, (64, 64)) for e in (0, 1, 2, 4, 9)] == [(16, 16), (16, 16), (32, 32), (64, 64), (64, 64)]
    assert training_size(check_schedule(None), 3, (40, 48)) == (40, 48)
    with pytest.raises(ConfigError, match="progressive_resizing"):
        check_schedule([[1, 0.5]])


def test_bad_options_raise_config_errors():
    with pytest.raises(ConfigError, match="objective"):
        Ssae(objective=2)
    with pytest.raises(ConfigError, match="image_score"):
        Ssae(image_score="median")


@pytest.mark.parametrize("objective", [1, 3])
def test_a_few_steps_lower_the_loss(objective):
    torch.manual_seed(0)
    model = Ssae(objective=objective, lr=1e-3, seed=0)
    images = torch.rand(2, 3, 1, 1).expand(-1, -1, 16, 16) * 0.6 + 0.2 + 0.1 * torch.rand(2, 3, 16, 16)
    optimizer = model.configure_optimizers()

    def fixed_loss() -> float:
        model.reseed_training(123)
        with torch.no_grad():
            return model.loss(images).item()

    before = fixed_loss()
    for _ in range(20):
        optimizer.zero_grad()
        model.loss(images).backward()
        optimizer.step()
    assert fixed_loss() < before - 0.1 * abs(before)


def test_config_composes_with_objective_3_and_unnormalised_images(tmp_path):
    cfg = compose_config("train", ["model=ssae", "model.objective=3"], output_dir=tmp_path)
    assert list(cfg.data.mean) == [0, 0, 0] and list(cfg.data.std) == [1, 1, 1]
    assert cfg.data.image_size == 128 and cfg.trainer.precision == fast_mixed_precision("cpu")
    assert "defect_area" in cfg.callbacks
    model = instantiate(cfg.model)
    assert isinstance(model, Ssae) and model.hparams.objective == 3 and model.hparams.lam == 0.5
    assert [b[0].dilation[0] for b in model.net.sdc[0].branches] == [1, 1, 1, 2, 4]  # auto at 128 px


def test_paper_experiment_keeps_table_1_at_512_px(tmp_path):
    cfg = compose_config("train", ["experiment=ssae_mvtec", "data=mvtec/bottle"], output_dir=tmp_path)
    assert cfg.data.image_size == 512 and cfg.trainer.max_epochs == 100
    model = instantiate(cfg.model)
    assert [b[0].dilation[0] for b in model.net.sdc[0].branches] == [1, 2, 4, 8, 16]


def test_scores_are_float32_under_bf16_autocast():
    model = Ssae().eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.score(images).anomaly_map
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scored = model.score(images).anomaly_map
    assert scored.dtype == torch.float32
    torch.testing.assert_close(scored, expected)


class ScriptedValidation(pl.LightningModule):
    """One weight that each training epoch sets to the epoch's number; validation reports `values[epoch]`."""

    def __init__(self, values):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.values = values

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            self.weight.fill_(float(self.current_epoch))
        return self.weight * 0.0

    def validation_step(self, batch, batch_idx):
        self.log("val/objective", float(self.values[self.current_epoch]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_early_stopping_ends_on_the_best_epochs_weights():
    loader = torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=2)
    model = ScriptedValidation([3.0, 1.0, 2.0, 4.0, 0.5, 0.1, 0.1, 0.1])
    stopping = EarlyStoppingOnBest("val/objective", patience=2)
    trainer = pl.Trainer(max_epochs=8, callbacks=[stopping], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader, loader)
    assert trainer.current_epoch == 4  # epochs 0-3: no better value in epochs 2 and 3 than epoch 1's
    assert stopping.best_epoch == 1 and model.weight.item() == 1.0  # epoch 1's weights, not epoch 3's
    restored = EarlyStoppingOnBest("val/objective", patience=2)
    restored.load_state_dict(stopping.state_dict())  # a resumed run ends on the same weights
    assert restored.best_epoch == 1 and restored.best_weights["weight"].item() == 1.0


def test_early_stopping_watches_from_the_last_resizing_stage_on():
    loader = torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=2)
    model = ScriptedValidation([0.1, 3.0, 2.0, 4.0, 5.0, 6.0, 7.0, 8.0])  # epoch 0's low value is not watched
    stopping = EarlyStoppingOnBest("val/objective", patience=2, start_epoch=1)
    trainer = pl.Trainer(max_epochs=8, callbacks=[stopping], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader, loader)
    assert stopping.best_epoch == 2 and trainer.current_epoch == 5 and model.weight.item() == 2.0
    ssae = Ssae(progressive_resizing=[[0, 0.5], [10, 1.0]], early_stopping_patience=5, sdc_dilations=[1, 1, 1, 1, 1])
    (callback,) = ssae.configure_callbacks()
    assert (callback.start_epoch, callback.patience) == (10, 5)


def test_early_stopping_needs_held_out_normals(tmp_path):
    cfg = compose_config("train", ["model=ssae", "data.val_ratio=0", "data.image_size=32", "data.n_train=8",
                                   "trainer.max_epochs=1", "callbacks=none", f"paths.data_root={tmp_path}", *QUIET],
                         output_dir=tmp_path)
    with pytest.raises(ConfigError, match="val_ratio"):
        train(cfg)


def test_normalised_data_stops_the_fit(tmp_path):
    cfg = compose_config("train", ["model=ssae", "data.mean=[0.485,0.456,0.406]", "data.image_size=32",
                                   "trainer.max_epochs=1", "callbacks=none", f"paths.data_root={tmp_path}", *QUIET],
                         output_dir=tmp_path)
    with pytest.raises(ConfigError, match="data.mean"):
        train(cfg)


# synthetic/hard (structure defects at normal intensity and colour: an untrained SSAE scores 0.435 image
# AUROC in its calibration) at 64 px, 30 epochs at the full size, in float32 on every machine (bf16 is
# emulated on AVX2-only CPUs, 8x slower): about 170 s on 2 cores.
HARD = ["model=ssae", "data=synthetic/hard", "data.image_size=64", "trainer.max_epochs=30", "trainer.precision=32-true",
        "model.progressive_resizing=null", "model.map_blur_sigma=2", "model.early_stopping_patience=null", *QUIET]


def held_out_repair_loss(cfg, checkpoint) -> float:
    """The objective on the run's held-out normals (eval mode), each corrupted the same way for every model."""
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    model = load_weights(instantiate(cfg.model), checkpoint).eval()
    model.validation_corruption.reseed(7)
    with torch.no_grad():
        losses = [model.loss(batch.image[batch.label == 0], model.validation_corruption)
                  for batch in datamodule.val_dataloader()]
    return torch.stack(losses).mean().item()


def test_training_beats_the_same_network_untrained_on_synthetic_hard(tmp_path):
    """Untrained: the same seed's initial weights (`trainer.max_epochs=0`). Measured untrained / trained:
    image AUROC 0.385 / 0.458, AUPRO 0.119 / 0.146, repair loss on the held-out normals 0.0058 / 0.0028.
    With the loss turned off (`model.lr=0` for the same 30 epochs: only BatchNorm's statistics move)
    the trained side scored 0.485, AUPRO 0.125, repair loss 0.0074: the AUPRO and repair bars fail (the
    image AUROC bar alone does not tell learning from BatchNorm's drift)."""
    data = f"paths.data_root={tmp_path / 'data'}"
    configs = {name: compose_config("train", [*HARD, data, *extra], output_dir=tmp_path / name)
               for name, extra in (("untrained", ["trainer.max_epochs=0"]), ("trained", []))}
    metrics = {name: train(cfg) for name, cfg in configs.items()}
    repair = {name: held_out_repair_loss(cfg, tmp_path / name / "checkpoints" / "last.ckpt")
              for name, cfg in configs.items()}
    untrained, trained = metrics["untrained"], metrics["trained"]
    assert trained["pixel_aupro"] - untrained["pixel_aupro"] >= 0.015
    assert trained["image_auroc"] - untrained["image_auroc"] >= 0.05
    assert repair["trained"] <= 0.7 * repair["untrained"]


def test_a_short_run_on_texture_points_its_maps_at_the_defects_and_reports_the_paper_metrics(tmp_path):
    """A pipeline check, not a learning test: an untrained SSAE also reaches pixel AUROC 0.998 here (the
    residual of foreign-hue defects); learning is tested on synthetic/hard above."""
    cfg = compose_config("train", [
        "model=ssae", f"paths.data_root={tmp_path / 'data'}", "data.image_size=32", "data.batch_size=8",
        "data.n_train=24", "data.n_test_good=6", "data.n_test_per_defect=4", "trainer.max_epochs=2",
        "model.progressive_resizing=[[0,0.5],[1,1.0]]", "model.map_blur_sigma=1",
        "callbacks=none", *QUIET], output_dir=tmp_path / "run")
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert metrics["pixel_auroc"] >= 0.9
    assert {"defect_area_tpr_tnr_mean", "defect_area_image_f1", "defect_area_pixel_f1"} <= set(metrics)
