"""Choosing the latent classifier's L2 strength, the edit step and the candidate settings on validation truth.

A weakly trained decoder responds little to z, and the classifier's normal decides which z directions the edit
moves along (a strong L2 penalty spreads it over directions the decoder uses; see
``../shared/notes/cpu-dae-prototype.md``; the class-mean difference, the limit C -> 0, changed the rest of the
body least on the demo model). So the healthy edit is calibrated, not guessed: for each (C, direction, step
scale) the edit of validation slices is measured — efficacy inside true lesions, change outside them,
P(malignant) of the re-encoded edit — and the settings whose change inside lesions exceeds the change outside
by the most are shortlisted; candidate tuning then keeps the one with the best lesion F1. (The earlier rule,
"most effective with outside change ≤ half the inside", fell back to the weakest edit whenever no setting met
the bound, as for v14490.) One DDIM inversion per slice serves every setting.

An imperfect edit also changes normal bone (the cortical shell above all), so which changes become candidates
matters as much: ``tune_candidates`` picks the body margin, the absolute change floor, the quantile, the Δ
threshold and the P(malignant) gate with the best lesion F1 on validation slices, from one edit per slice;
among equal F1 the setting that flags the fewest benign mimics wins. Both need lesion truth (phantoms); a model
trained on vertebra labels alone keeps the published defaults.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .attribution import (
    BLASTIC,
    LESION_TYPES,
    LYTIC,
    Edits,
    HideAndSeek,
    Inversion,
    edited_latents,
    merge_kind_edits,
)
from .classifier import LatentClassifier
from .dataset import SliceSet
from .metrics import (
    edit_efficacy,
    flagged_per_slice,
    json_measurements,
    mean_lesion_f1,
    mimic_fp_rate,
    selection_key,
)
from .network import DiffusionAutoencoder
from .sampler import DDIMSampler, DiffusionConfig

NORMAL, CLASS_MEANS, KIND_MEANS = "normal", "class means", "class means per kind"
"""Edit directions: the classifier's normal, the class-mean difference (``classifier.class_mean_direction``), or
one class-mean difference per lesion type (vertebrae with lytic lesions only, and with blastic lesions only,
against healthy ones; ``classifier.kind_directions``)."""

EditKey = tuple[float, str]
"""(C, direction) of an edit's classifier; with the step scale, (C, direction, scale) names a calibrated edit."""

SHORTLIST = 3
"""Edits along the normal handed to candidate tuning (with the best along each other direction): each costs one
tuning (an edit of the tuning slices and the grid)."""

CANDIDATE_GRID: dict[str, tuple] = {
    "body_margin_px": (0, 2, 3, 4, 6),
    "min_change": (0.0, 0.03, 0.06, 0.1, 0.15, 0.2),
    "candidate_quantile": (0.5, 0.75, 0.9),
}
"""Candidate settings tried by ``tune_candidates``; the published defaults come first and win ties.

v8000's choice sat on the edge of the first grid (4 px, floor 0.1), and the difference-map baseline, tuned on
its own, preferred a floor of 0.15: the grid reaches past both."""

DELTA_THRESHOLDS = (0.5, 0.3, 0.1, 0.0, 0.7, 0.9)
"""Δ thresholds tried, the published 0.5 first. Above 0.5 too: with encoder-only scoring Δ is normalised by the
latent scores (the edited latent's is ~0), so a candidate whose reveal restores nothing still scores about
P(composite) / P(input) — for v10280, whose re-encoded edit keeps P ≈ 0.36 against ~0.5, about 0.7."""

GATE_PROBABILITIES: tuple[float | None, ...] = (None, 0.3, 0.5, 0.7)
"""``gate_probability`` values tried, no gate first. Every candidate of a healthy vertebra is a false positive,
and the classifier (AUC ~0.7-0.8 on validation) already says which vertebrae look healthy; a gated slice is
simply left unsearched, so the gates are scored on the ungated run without another network pass."""


@dataclass(frozen=True)
class Calibration:
    shortlist: list[tuple[float, str, float]]  # (C, direction, step scale), the most lesion-specific edit first
    table: list[dict]  # every setting tried, with its measurements


@torch.inference_mode()
def calibrate_edit(
    model: DiffusionAutoencoder,
    diffusion: DiffusionConfig,
    classifiers: dict[EditKey, LatentClassifier],
    val: SliceSet,
    *,
    scales: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0),
    target_probability: float = 1e-5,
    steps: int = 20,
    max_slices: int = 32,
) -> Calibration:
    """Measure every (C, direction, scale) on up to ``max_slices`` slices with lesions, drawn by lesion type and
    vertebra (``SliceSet.lesion_sample``), and shortlist them (see module doc)."""
    has = val.lesion_sample(max_slices)
    if has.size == 0:
        raise ValueError("calibration needs validation slices with true lesions")
    images, lesions, bodies = val.images, val.lesions, val.bodies
    device = next(model.parameters()).device
    x = torch.from_numpy(np.asarray(images[has], np.float32))[:, None].to(device)
    sampler = DDIMSampler(diffusion, steps)
    z = model.encode(x)
    xT = sampler.encode(model, x, z)
    recon_t = sampler.decode(model, xT, z)
    recon = recon_t[:, 0].cpu().numpy()
    table = []
    for (C, direction), clf in classifiers.items():
        for scale in scales:
            z_edits = edited_latents(clf, z.double(), target_probability, scale)
            edit_t = merge_kind_edits(recon_t, {kind: sampler.decode(model, xT, z_edit.to(z.dtype))
                                                for kind, z_edit in z_edits.items()})
            edit = edit_t[:, 0].cpu().numpy()
            row = edit_efficacy(images[has], recon, edit, lesions[has], bodies[has], LESION_TYPES)
            row["p_reencoded_edit"] = float(clf.probability(model.encode(edit_t)).mean())
            table.append({"C": C, "direction": direction, "step_scale": scale, **json_measurements(row)})
    return Calibration(shortlist(table), table)


def shortlist(table: list[dict], size: int = SHORTLIST) -> list[tuple[float, str, float]]:
    """The ``size`` edits along the classifier's normal whose mean change inside lesions exceeds the change
    outside them by the most (an edit that changes lesion and normal bone alike only makes false candidates), then
    the most lesion-specific edit along each other direction: a new direction competes with the normal's
    shortlist, it never pushes one of them out. Rows without a direction (tables from before there was a choice)
    moved along the normal."""
    def margin(row: dict) -> float:  # an undefined change (not in the row) ranks last
        return row["outside"] - row["inside"] if "inside" in row and "outside" in row else np.inf

    ranked = sorted(table, key=margin)  # stable: table order breaks ties
    keys = [(r["C"], r.get("direction", NORMAL), r["step_scale"]) for r in ranked]
    others = list(dict.fromkeys(d for _, d, _ in keys if d != NORMAL))
    return [k for k in keys if k[1] == NORMAL][:size] + [next(k for k in keys if k[1] == d) for d in others]


@dataclass(frozen=True)
class CandidateTuning:
    settings: dict  # the chosen candidate settings and Δ threshold (attribution setting names)
    f1: float  # their mean lesion F1 on the tuning slices
    default_f1: float  # the published defaults' on the same slices
    slices: int
    table: list[dict]  # every combination tried, best first; "mimic_fp" where mimic truth was given


SCORES = ("f1", "mimic_fp")
"""Table columns that are measurements, not settings."""


def tune_candidates(
    method: HideAndSeek,
    images: np.ndarray | Inversion,
    bodies: np.ndarray,
    lesions: np.ndarray,
    mimics: np.ndarray | None = None,
    *,
    grid: dict[str, tuple] = CANDIDATE_GRID,
    thresholds: tuple[float, ...] = DELTA_THRESHOLDS,
    gates: tuple[float | None, ...] = GATE_PROBABILITIES,
    min_lesion_px: int = 5,
    progress: Callable[[int, int], None] | None = None,
) -> CandidateTuning:
    """Best mean lesion F1 (IoU >= 0.1) over ``grid`` × ``thresholds`` × ``gates`` on slices with truth, ties going
    to the lowest share of ``mimics`` instances flagged (see module doc). The method's own gate must be off.
    ``images`` may be their ``HideAndSeek.invert`` output, shared by the tunings of several edits.
    ``progress(done, total)`` follows the grid settings, each one hide-and-seek pass over the slices: the tuning
    is the longest phase of an export."""
    if method.settings.gate_probability is not None:
        raise ValueError("candidate tuning chooses the gate itself: run it with gate_probability None")
    if not (lesions > 0).any():
        raise ValueError("candidate tuning needs slices with true lesions")
    with_mimics = mimics is not None and bool((mimics > 0).any())
    edits = method.edit(images)
    table = []
    for setting, maps in candidate_grid_maps(method, edits, bodies, grid=grid, thresholds=thresholds, gates=gates,
                                             progress=progress):
        row = {**setting, "f1": round(mean_lesion_f1(maps, lesions, (LYTIC, BLASTIC), min_px=min_lesion_px), 4)}
        if with_mimics:
            row["mimic_fp"] = round(mimic_fp_rate(flagged_per_slice(maps, mimics)), 4)
        table.append(row)
    default = table[0]
    ranked = sorted(table, key=lambda r: selection_key(r["f1"], r.get("mimic_fp", np.nan)))  # stable: grid order
    best = ranked[0]
    return CandidateTuning({k: v for k, v in best.items() if k not in SCORES}, best["f1"], default["f1"],
                           len(edits.images), ranked)


def candidate_grid_maps(
    method: HideAndSeek,
    edits: Edits,
    bodies: np.ndarray,
    *,
    grid: dict[str, tuple] = CANDIDATE_GRID,
    thresholds: tuple[float, ...] = DELTA_THRESHOLDS,
    gates: tuple[float | None, ...] = GATE_PROBABILITIES,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[dict, np.ndarray]]:
    """(settings, label maps of every slice) for every point of ``grid`` × ``thresholds`` × ``gates``, from one
    edit per slice (``method.edit``, made without a gate). A grid setting costs one hide-and-seek pass; the Δ
    thresholds and gates reuse it. ``progress(done, total)`` follows the grid settings."""
    # As HideAndSeek.edit: a slice at or below the gate is not edited, so it has no candidates.
    searched = {gate: (edits.p_malignant > (gate or 0.0))[:, None, None] for gate in gates}
    settings = list(itertools.product(*grid.values()))
    for done, values in enumerate(settings, 1):
        overrides = dict(zip(grid, values, strict=True))
        seeker = HideAndSeek(method.dae, method.diffusion, method.classifier,
                             method.settings.with_overrides(**overrides))
        results = seeker.seek(edits, bodies)
        for threshold in thresholds:
            ungated = np.stack([r.label_map(threshold) for r in results])
            for gate in gates:
                yield {**overrides, "delta_threshold": threshold, "gate_probability": gate}, ungated * searched[gate]
        if progress is not None:
            progress(done, len(settings))
