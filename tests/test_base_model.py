"""AnomalyModel: normal statistics fitted once the weights are final, maps at input size."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from anomaly_lab.data import Batch
from anomaly_lab.models import AnomalyModel, ScoreOutput
from anomaly_lab.nn.blur import resize_and_blur


def batches(n: int = 4) -> list[dict]:
    return [{"image": torch.full((3, 16, 16), float(i)), "label": i % 2, "path": f"img{i}.png",
             "mask": torch.zeros(1, 16, 16)} for i in range(n)]


class TinyData(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.normal_calls: list[tuple[int, int]] = []

    def _loader(self):
        return DataLoader(batches(), batch_size=2, collate_fn=Batch.collate)

    train_dataloader = val_dataloader = test_dataloader = _loader

    def normal_dataloader(self, rank: int = 0, world_size: int = 1):
        self.normal_calls.append((rank, world_size))
        return self._loader()


class CountingModel(AnomalyModel):
    """Learns a scalar; its 'normal statistic' is the mean image value at fit time."""

    name = "counting"

    def __init__(self):
        super().__init__(map_blur_sigma=0.0)
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.fits = 0
        self.register_buffer("center", torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return (self.weight * batch.image.mean()).pow(2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def fit_normal(self, dataloader):
        self.fits += 1
        self.center = torch.stack([b.image.mean() for b in dataloader]).mean()

    def score(self, images):
        return ScoreOutput(None, (images[:, :1, ::4, ::4] - self.center).abs())


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)


def test_normal_statistics_are_fitted_once_after_training_and_again_after_more_training():
    model, data = CountingModel(), TinyData()
    fit_trainer = trainer(max_epochs=1, limit_val_batches=0)
    fit_trainer.fit(model, datamodule=data)
    assert model.fits == 0  # not while the weights still change
    fit_trainer.validate(model, datamodule=data)
    fit_trainer.test(model, datamodule=data)
    assert model.fits == 1 and data.normal_calls == [(0, 1)]
    assert bool(model.normal_fitted)
    trainer(max_epochs=2, limit_val_batches=0).fit(model, datamodule=data)
    assert not bool(model.normal_fitted)
    trainer().test(model, datamodule=data)
    assert model.fits == 2


def test_maps_are_brought_to_input_size_and_image_score_is_their_maximum():
    model = CountingModel()
    images = torch.rand(2, 3, 16, 16)
    out = model(images)
    assert out.anomaly_map.shape == (2, 1, 16, 16)
    torch.testing.assert_close(out.image_score, out.anomaly_map.flatten(1).amax(1))


def test_blur_smooths_and_keeps_the_mass():
    spike = torch.zeros(1, 1, 33, 33)
    spike[..., 16, 16] = 1.0
    smooth = resize_and_blur(spike, (33, 33), sigma=2.0)
    assert smooth.shape == spike.shape and smooth.max() < 0.1
    assert smooth.sum().item() == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(resize_and_blur(spike, (33, 33), 0.0), spike)


@pytest.mark.parametrize("size", [(40, 52), (160, 208)])
def test_resizing_and_blur_equal_bilinear_interpolation_then_the_two_dimensional_gaussian(size):
    from torchvision.transforms.v2.functional import gaussian_blur

    maps = torch.rand(2, 1, 40, 52, generator=torch.Generator().manual_seed(0))
    sigma = 4.0
    kernel = 2 * 16 + 1  # truncated at 4 sigma, as resize_and_blur does
    resized = torch.nn.functional.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    expected = gaussian_blur(resized, kernel_size=[kernel, kernel], sigma=[sigma, sigma])
    torch.testing.assert_close(resize_and_blur(maps, size, sigma), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resizing_and_blur_run_in_float32_under_bf16_autocast(dtype):
    # Under autocast the two matrix products would return bf16 maps: 3 significant digits, close
    # pixels tied, and the order of ties left to each device's rounding (issue #22, a DDP refit of SSAE).
    maps = torch.rand(2, 1, 40, 52, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = resize_and_blur(maps.float(), (160, 208), 4.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        blurred = resize_and_blur(maps, (160, 208), 4.0)
    assert blurred.dtype == torch.float32
    torch.testing.assert_close(blurred, expected, atol=0, rtol=1e-6)


class ConvModel(CountingModel):
    """CountingModel whose map goes through a convolution."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def score(self, images):
        return ScoreOutput(None, self.conv(images).abs().mean(1, keepdim=True))


def test_runs_keep_convolution_weights_channels_last_and_score_as_in_the_default_layout():
    model, data = ConvModel(), TinyData()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = model(images).anomaly_map
    trainer().validate(model, datamodule=data)  # Lightning calls setup(), as in every run
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.conv.weight.is_contiguous()
    torch.testing.assert_close(model(images).anomaly_map, expected, atol=1e-5, rtol=1e-5)
