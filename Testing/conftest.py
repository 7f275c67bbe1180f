"""Shared fixtures: the conformance and real data live in ../shared beside the checkout; skip cleanly without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HIDESEEK_SHARED", REPO.parent / "shared"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared material not found at {path} (set HIDESEEK_SHARED)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _need(SHARED / "reference")


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    return _need(SHARED / "data" / "real")


@pytest.fixture(scope="session")
def slicer_core():
    """3D Slicer's MRML libraries (pip package slicer-core), headless; skip when not installed.

    Reading and writing .seg.nrrd through vtkMRMLSegmentationStorageNode needs no setup, but creating segments
    (AddEmptySegment, SetBinaryLabelmapToSegment) fails with "Unable to construct empty representation type
    'Binary labelmap'" until the conversion rules are registered, which the Slicer application does at start.
    """
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
    return slicer


TOY_ARCHITECTURE = {"image_size": 32, "model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                    "attention_resolutions": [16], "embed_channels": 32, "enc_out_channels": 16,
                    "enc_channel_mult": [1, 2], "enc_num_res_block": 1, "dropout": 0.0, "norm_groups": 8}
"""A random, tiny DAE at 32 px: exercises every code path of the pipeline in a fraction of a second."""


@pytest.fixture(scope="session")
def toy_bundle(tmp_path_factory) -> Path:
    """A model bundle with random weights whose classifier calls every vertebra malignant (so lesions appear)."""
    import numpy as np
    import torch

    from hideseek.bundle import save_bundle
    from hideseek.classifier import LatentClassifier
    from hideseek.network import DAEConfig, DiffusionAutoencoder
    from hideseek.preprocessing import Preprocessing
    from hideseek.sampler import DiffusionConfig

    torch.manual_seed(0)
    model = DiffusionAutoencoder(DAEConfig.from_dict(TOY_ARCHITECTURE)).eval()
    with torch.no_grad():  # zero-initialised output layers would make every edit empty: randomise them
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    rng = np.random.default_rng(0)
    dim = TOY_ARCHITECTURE["enc_out_channels"]
    classifier = LatentClassifier(coef=rng.standard_normal(dim), intercept=60.0, mean=np.zeros(dim),
                                  scale=np.ones(dim))
    preprocessing = Preprocessing(image_size=32, intensity="hu_window", lower=-200.0, upper=1200.0)
    out = tmp_path_factory.mktemp("bundles") / "toy"
    return save_bundle(out, model, DiffusionConfig(), preprocessing, classifier, name="toy", version="0",
                       method={"default_preset": "fast", "presets": {"fast": {"encode_steps": 5, "decode_steps": 5,
                                                                                 "autocast_bf16": False}}},
                       card={"summary": "random weights for tests", "intended_use": "tests only",
                             "licence": "MIT"})
