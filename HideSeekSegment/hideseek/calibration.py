"""Choosing the latent classifier's L2 strength and the edit step on validation slices with true lesions.

A weakly trained decoder responds little to z, and the classifier's normal decides which z directions the edit
moves along (a strong L2 penalty spreads it over directions the decoder uses; see
``../shared/notes/cpu-dae-prototype.md``). So the healthy edit is calibrated, not guessed: for each
(C, step scale) the edit of validation slices is measured — efficacy inside true lesions, change outside them,
P(malignant) of the re-encoded edit — and the most effective setting whose outside change stays below a
bound is kept. One DDIM inversion per slice serves every setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .classifier import LatentClassifier
from .metrics import edit_efficacy
from .network import DiffusionAutoencoder
from .sampler import DDIMSampler, DiffusionConfig

MAX_OUTSIDE_RATIO = 0.5
"""A setting qualifies when the change outside lesions is at most this fraction of the change inside them."""


@dataclass(frozen=True)
class Calibration:
    C: float
    step_scale: float
    table: list[dict]  # every setting tried, with its measurements


@torch.inference_mode()
def calibrate_edit(
    model: DiffusionAutoencoder,
    diffusion: DiffusionConfig,
    classifiers: dict[float, LatentClassifier],
    images: np.ndarray,
    lesions: np.ndarray,
    bodies: np.ndarray,
    *,
    scales: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0),
    target_probability: float = 1e-5,
    steps: int = 20,
    max_slices: int = 32,
) -> Calibration:
    """Measure every (C, scale) on up to ``max_slices`` slices with lesions and pick one (see module doc)."""
    has = np.flatnonzero((lesions > 0).any(axis=(1, 2)))[:max_slices]
    if has.size == 0:
        raise ValueError("calibration needs validation slices with true lesions")
    device = next(model.parameters()).device
    x = torch.from_numpy(np.asarray(images[has], np.float32))[:, None].to(device)
    sampler = DDIMSampler(diffusion, steps)
    z = model.encode(x)
    xT = sampler.encode(model, x, z)
    recon = sampler.decode(model, xT, z)[:, 0].cpu().numpy()
    table = []
    for C, clf in classifiers.items():
        for scale in scales:
            z_edit = clf.edit(z.double(), target_probability, step_scale=scale).to(z.dtype)
            edit_t = sampler.decode(model, xT, z_edit)
            edit = edit_t[:, 0].cpu().numpy()
            row = edit_efficacy(images[has], recon, edit, lesions[has], bodies[has])
            row["p_reencoded_edit"] = float(clf.probability(model.encode(edit_t)).mean())
            table.append({"C": C, "step_scale": scale, **{k: round(float(v), 5) for k, v in row.items()}})
    ok = [r for r in table if np.isfinite(r["efficacy"]) and r["outside_ratio"] <= MAX_OUTSIDE_RATIO]
    best = max(ok, key=lambda r: r["efficacy"]) if ok else min(table, key=lambda r: r["outside_ratio"])
    return Calibration(best["C"], best["step_scale"], table)
