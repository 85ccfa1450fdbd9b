"""SSAE (Bauer 2022): Table 1 shapes, the corruption, objectives Eq. 1 and Eq. 3, training and detection."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from anomaly_lab.errors import ConfigError
from anomaly_lab.models import Ssae
from anomaly_lab.models.ssae.corruption import PatchCorruption
from anomaly_lab.models.ssae.model import check_schedule, training_size
from anomaly_lab.models.ssae.network import SsaeNet
from anomaly_lab.models.ssae.objectives import objective_eq1, objective_eq3
from anomaly_lab.run import train
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
    for _ in range(6):
        optimizer.zero_grad()
        model.loss(images).backward()
        optimizer.step()
    assert fixed_loss() < before - 0.1 * abs(before)


def test_config_composes_with_objective_3_and_unnormalised_images(tmp_path):
    cfg = compose_config("train", ["model=ssae", "model.objective=3"], output_dir=tmp_path)
    assert list(cfg.data.mean) == [0, 0, 0] and list(cfg.data.std) == [1, 1, 1]
    assert cfg.data.image_size == 512 and "defect_area" in cfg.callbacks
    model = instantiate(cfg.model)
    assert isinstance(model, Ssae) and model.hparams.objective == 3 and model.hparams.lam == 0.5


def test_normalised_data_stops_the_fit(tmp_path):
    cfg = compose_config("train", ["model=ssae", "data.mean=[0.485,0.456,0.406]", "data.image_size=32",
                                   "trainer.max_epochs=1", "callbacks=none", f"paths.data_root={tmp_path}", *QUIET],
                         output_dir=tmp_path)
    with pytest.raises(ConfigError, match="data.mean"):
        train(cfg)


def test_detects_synthetic_texture_defects(tmp_path):
    cfg = compose_config("train", [
        "model=ssae", f"paths.data_root={tmp_path / 'data'}", "data.image_size=32", "data.batch_size=8",
        "data.n_train=24", "data.n_test_good=6", "data.n_test_per_defect=4", "trainer.max_epochs=2",
        "model.progressive_resizing=[[0,0.5],[1,1.0]]", "model.map_blur_sigma=1",
        "callbacks=none", *QUIET], output_dir=tmp_path / "run")
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert metrics["pixel_auroc"] >= 0.9
    assert {"defect_area_tpr_tnr_mean", "defect_area_image_f1", "defect_area_pixel_f1"} <= set(metrics)
