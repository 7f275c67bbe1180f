"""The DDIM schedule itself: respacing rule, determinism, progress/cancel, and exactness with an ideal denoiser."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hideseek.errors import Cancelled
from hideseek.sampler import DDIMSampler, DiffusionConfig, alphas_cumprod, respaced_timesteps


@pytest.mark.parametrize(
    ("steps", "first", "stride"), [(250, 0, 4), (100, 0, 10), (20, 0, 50), (5, 0, 200), (1000, 0, 1)]
)
def test_respacing_follows_the_published_ddimN_rule(steps, first, stride):
    ts = respaced_timesteps(1000, steps)
    assert len(ts) == steps
    assert ts[0] == first and ts[1 % steps] - ts[0] in (stride, 0)


def test_respacing_rejects_counts_no_stride_can_give():
    assert len(respaced_timesteps(1000, 1)) == 1
    with pytest.raises(ValueError, match="no stride"):
        respaced_timesteps(1000, 999)
    with pytest.raises(ValueError, match=r"1\.\.1000"):
        respaced_timesteps(1000, 0)


def test_linear_schedule_endpoints():
    ac = alphas_cumprod(DiffusionConfig())
    assert ac.shape == (1000,)
    assert ac[0] == pytest.approx(1 - 1e-4)
    assert np.all(np.diff(ac) < 0)


def _oracle(x0: torch.Tensor, sampler: DDIMSampler):
    """A perfect denoiser for a single known image: eps = (x_t - sqrt(a) x0) / sqrt(1 - a)."""
    ac = torch.tensor(alphas_cumprod(sampler.cfg), dtype=torch.float64)

    def eps(x, t, cond):
        a = ac[t].to(x.dtype)[:, None, None, None]
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    return eps


def test_decode_of_encode_returns_the_image_with_an_ideal_denoiser():
    torch.manual_seed(0)
    x0 = torch.rand(3, 1, 8, 8) * 0.8
    sampler = DDIMSampler(DiffusionConfig(), steps=10)
    eps = _oracle(x0, sampler)
    xT = sampler.encode(eps, x0, cond=torch.zeros(3, 4))
    recon = sampler.decode(eps, xT, cond=torch.zeros(3, 4))
    torch.testing.assert_close(recon, x0, atol=1e-5, rtol=0)


def test_callback_sees_every_step_and_can_cancel():
    x0 = torch.zeros(1, 1, 4, 4)
    sampler = DDIMSampler(DiffusionConfig(), steps=5)
    seen: list[tuple[int, int]] = []
    sampler.decode(_oracle(x0, sampler), x0, torch.zeros(1, 1), callback=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(1, 6)]

    def cancel(i, n):
        if i == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        sampler.encode(_oracle(x0, sampler), x0, torch.zeros(1, 1), callback=cancel)
