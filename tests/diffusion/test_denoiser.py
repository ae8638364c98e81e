import pytest
import torch
from torch import nn

from sdstudio.diffusion.denoiser import Denoiser
from sdstudio.diffusion.schedule import DiscreteSchedule
from sdstudio.models.configs import PRESETS


class Zero(nn.Module):
    """A 'UNet' that predicts 0: the loss is then the target's mean square, known in closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, context):
        return x * self.w


def _denoiser(prediction):
    return Denoiser(Zero(), DiscreteSchedule.from_config(PRESETS["tiny"].schedule), prediction)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_min_snr_weights_each_sample_by_its_snr(prediction):
    d = _denoiser(prediction)
    sigma = torch.tensor([0.05, 0.3, 1.0, 4.0, 14.0])
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    plain = d.loss(x0, noise, sigma, torch.zeros(5, 3, 8))
    weighted = d.loss(x0, noise, sigma, torch.zeros(5, 3, 8), snr_gamma=5.0)
    snr = sigma.pow(-2)
    expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if prediction == "v" else snr)
    torch.testing.assert_close(weighted / plain, expected)
    if prediction == "epsilon":  # noisy steps (SNR < gamma) keep weight 1, clean ones get gamma * sigma^2
        assert weighted[3:].equal(plain[3:]) and (weighted[:2] < 0.5 * plain[:2]).all()


def test_snr_gamma_zero_is_the_plain_objective():
    d = _denoiser("epsilon")
    x0, noise, sigma = torch.ones(2, 4, 8, 8), torch.ones(2, 4, 8, 8), torch.tensor([0.1, 2.0])
    assert d.loss(x0, noise, sigma, torch.zeros(2, 3, 8), snr_gamma=0.0).equal(d.loss(x0, noise, sigma, torch.zeros(2, 3, 8)))
