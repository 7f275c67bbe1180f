"""The training loop: the loss falls on a toy set, state resumes exactly where it stopped, budgets are honoured."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hideseek.sampler import DiffusionConfig
from hideseek.training import DEMO_ARCHITECTURE, TrainConfig, Trainer

TOY_ARCH = {"image_size": 16, "model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
            "attention_resolutions": [8], "embed_channels": 32, "enc_out_channels": 16,
            "enc_channel_mult": [1, 2], "enc_num_res_block": 1, "dropout": 0.0, "norm_groups": 8}


def _toy_images(n=64, seed=0):
    """Blobs on a dark background: easy to denoise, so a few steps must lower the loss."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:16, :16]
    cy, cx = rng.uniform(4, 12, (2, n, 1, 1))
    return (np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)).astype(np.float32)


def _cfg(**kw):
    base = {"architecture": TOY_ARCH, "steps": 60, "batch_size": 8, "lr": 2e-3, "warmup_steps": 5,
            "log_every": 10, "checkpoint_every": 20, "bf16": False}
    return TrainConfig(**(base | kw))


def test_loss_falls_on_toy_images():
    trainer = Trainer(_cfg(), DiffusionConfig(), torch.device("cpu"))
    logs = []
    trainer.run(_toy_images(), progress=logs.append)
    assert [r["step"] for r in logs] == [10, 20, 30, 40, 50, 60]
    assert logs[-1]["loss"] < 0.6 * logs[0]["loss"]
    assert logs[-1]["eta_s"] == 0


def test_state_resumes_where_it_stopped(tmp_path):
    trainer = Trainer(_cfg(steps=20), DiffusionConfig(), torch.device("cpu"))
    trainer.run(_toy_images(), state_dir=tmp_path)
    meta = json.loads((tmp_path / "state.json").read_text())
    assert meta["step"] == 20 and len(meta["history"]) == 2

    resumed = Trainer.resume(tmp_path, torch.device("cpu"), steps=40)
    for a, b in zip(trainer.ema.parameters(), resumed.ema.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(trainer.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert len(resumed.opt.state) == len(list(resumed.model.parameters()))
    resumed.run(_toy_images(), state_dir=tmp_path)
    assert resumed.step == 40
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 40
    with pytest.raises(ValueError, match="architecture"):
        Trainer.resume(tmp_path, torch.device("cpu"), architecture={**TOY_ARCH, "model_channels": 8})


def test_time_budget_stops_early():
    trainer = Trainer(_cfg(steps=10_000), DiffusionConfig(), torch.device("cpu"))
    trainer.run(_toy_images(), time_budget_s=0.5)
    assert 0 < trainer.step < 10_000


def test_high_noise_fraction_shifts_the_timesteps():
    trainer = Trainer(_cfg(high_noise_fraction=1.0, high_noise_from=0.7), DiffusionConfig(), torch.device("cpu"))
    assert trainer._timesteps(2000).min() >= 700
    uniform = Trainer(_cfg(high_noise_fraction=0.0), DiffusionConfig(), torch.device("cpu"))
    assert uniform._timesteps(2000).float().mean() == pytest.approx(500, abs=40)


def test_wrong_slice_size_is_rejected():
    trainer = Trainer(_cfg(), DiffusionConfig(), torch.device("cpu"))
    with pytest.raises(ValueError, match="expects 16 px"):
        trainer.run(np.zeros((4, 32, 32), np.float32))


def test_demo_architecture_is_compact():
    from hideseek.network import DiffusionAutoencoder

    with torch.device("meta"):
        n = DiffusionAutoencoder(DEMO_ARCHITECTURE).num_parameters()
    assert 3e6 < n < 8e6  # bundle weights stay well under the 50 MB limit
