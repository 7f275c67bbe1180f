"""Conformance with the authors' implementation: key layout of the published DAE, golden outputs of the tiny one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hideseek.network import DAEConfig, DiffusionAutoencoder, timestep_embedding
from hideseek.sampler import DDIMSampler, DiffusionConfig


@pytest.fixture(scope="module")
def golden_json(reference_dir):
    return json.loads((reference_dir / "dae_tiny_golden.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tiny(reference_dir, golden_json):
    model = DiffusionAutoencoder(DAEConfig.from_dict(golden_json["config"])).eval()
    model.load_state_dict(load_file(reference_dir / "dae_tiny_weights.safetensors"), strict=True)
    return model


@pytest.fixture(scope="module")
def golden(reference_dir):
    return load_file(reference_dir / "dae_tiny_golden.safetensors")


def test_published_architecture_has_exactly_the_checkpoint_keys(reference_dir, golden_json):
    manifest = json.loads((reference_dir / "dae_fxclass64_keys.json").read_text(encoding="utf-8"))
    prefix = manifest["checkpoint_prefix"]
    expected = {k.removeprefix(prefix): v for k, v in manifest["keys"].items()}
    with torch.device("meta"):
        model = DiffusionAutoencoder(DAEConfig.from_dict(golden_json["full_config"]))
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert len(got) == 506
    assert got == expected
    assert model.num_parameters() == manifest["num_parameters"]


def test_semantic_encoding_matches_golden(tiny, golden):
    with torch.no_grad():
        cond = tiny.encode(golden["x0"])
    torch.testing.assert_close(cond, golden["cond"], atol=1e-4, rtol=0)


def test_noise_prediction_matches_golden(tiny, golden):
    with torch.no_grad():
        eps = tiny(golden["xt"], golden["t"], golden["cond"])
    torch.testing.assert_close(eps, golden["eps"], atol=1e-4, rtol=0)


def test_ddim5_encoding_and_decoding_match_golden(tiny, golden):
    sampler = DDIMSampler(DiffusionConfig(), steps=5)
    assert sampler.timesteps == [0, 200, 400, 600, 800]
    with torch.no_grad():
        cond = tiny.encode(golden["x0"])
        xT = sampler.encode(tiny, golden["x0"], cond)
        recon = sampler.decode(tiny, golden["xT_ddim5"], cond)
    torch.testing.assert_close(xT, golden["xT_ddim5"], atol=1e-3, rtol=0)
    torch.testing.assert_close(recon, golden["recon_ddim5"], atol=1e-3, rtol=0)


def test_config_round_trips_and_rejects_unknown_keys(golden_json):
    cfg = DAEConfig.from_dict(golden_json["full_config"])
    assert DAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown DAE config keys: colour"):
        DAEConfig.from_dict({**golden_json["config"], "colour": 1})


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0, 10]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.isclose(emb[1, 0], torch.cos(torch.tensor(10.0)))
