"""Lesion-level evaluation of Hide-and-Seek against three baselines on slices with known lesions (phantoms).

Every method turns one mid-sagittal slice per vertebra into a 0/1/2 label map inside the body:

- ``hide-and-seek``: the bundle's method with its frozen Δ threshold;
- ``difference map``: the same model's healthy edit minus reconstruction, above its median (as the method's
  candidates, in the same body region) and above an absolute change tuned on the validation split — no
  hide-and-seek;
- ``occlusion``: how much P(malignant) drops when a patch is replaced by the body's median intensity (latent
  classifier through the encoder), thresholded; type from the pixel's brightness against the body median;
- ``HU threshold``: bright (blastic) / dark (lytic) pixels inside the body, both thresholds tuned.

Baseline thresholds are tuned on a validation split of the vertebrae and frozen for the test split. Scores follow
BENCHMARKS.md: lesion F1 (IoU >= 0.1, also any overlap and IoU >= 0.5), Dice, pooled Dice, mimic false
positives, the classifier's AUC, and 95 % bootstrap intervals over test vertebrae. ``delta_ranking`` asks
whether the hide-and-seek step itself adds anything: does Δ rank the candidates on true lesions first?
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .attribution import BLASTIC, LYTIC, HideAndSeek, SliceResult, candidate_maps, search_region
from .bundle import ModelBundle
from .classifier import roc_auc
from .dataset import SliceSet
from .metrics import (
    bootstrap_ci,
    components,
    dice,
    flagged_per_slice,
    iou_of,
    lesion_counts,
    mean_lesion_f1,
    mimic_fp_rate,
    pooled_dice,
    pooled_f1,
    selection_key,
)

KINDS = {"lytic": LYTIC, "blastic": BLASTIC}
IOU_LEVELS = {"any overlap": 0.0, "IoU>=0.1": 0.1, "IoU>=0.5": 0.5}
MIN_LESION_PX = 5


@dataclass
class MethodOutput:
    """Label maps of one method on all slices, and how it was tuned."""

    name: str
    label_maps: np.ndarray  # (N, H, W) uint8
    tuned: dict


# -- the baselines ------------------------------------------------------------------------------------------


def difference_maps(
    results: list[SliceResult], bodies: np.ndarray, min_change: float, margin_px: int = 0
) -> np.ndarray:
    """The method's candidate maps (median of the signed difference, in the same search region) with a tuned
    absolute floor on |edit - recon|, every candidate kept."""
    out = np.zeros(bodies.shape, dtype=np.uint8)
    for i, r in enumerate(results):
        region = search_region(bodies[i], r.recon, r.edit, margin_px, min_change)
        lytic, blastic = candidate_maps(r.recon, r.edit, region, 0.5)
        out[i][lytic] = LYTIC
        out[i][blastic] = BLASTIC
    return _drop_small(out)


@torch.inference_mode()
def occlusion_maps(
    bundle: ModelBundle, images: np.ndarray, bodies: np.ndarray, patch: int = 8, stride: int = 4, batch: int = 128
) -> np.ndarray:
    """Mean drop of P(malignant) over the patches covering each pixel (patches that touch the body only)."""
    device = next(bundle.dae.parameters()).device
    n, h, w = images.shape
    out = np.zeros(images.shape, dtype=np.float32)
    corners = [(y, x) for y in range(0, h - patch + 1, stride) for x in range(0, w - patch + 1, stride)]
    for i in range(n):
        fill = float(np.median(images[i][bodies[i]])) if bodies[i].any() else float(np.median(images[i]))
        mine = [(y, x) for y, x in corners if bodies[i][y : y + patch, x : x + patch].any()]
        if not mine:
            continue
        stack = np.repeat(images[i][None], len(mine) + 1, axis=0)  # the unoccluded image goes last
        for k, (y, x) in enumerate(mine):
            stack[k, y : y + patch, x : x + patch] = fill
        probs = []
        for s in range(0, len(stack), batch):
            z = bundle.dae.encode(torch.from_numpy(stack[s : s + batch])[:, None].to(device))
            probs.append(bundle.classifier.probability(z).cpu().numpy())
        p = np.concatenate(probs)
        drop, base = np.clip(p[-1] - p[:-1], 0, None), np.zeros((h, w), np.float32)
        cover = np.zeros((h, w), np.float32)
        for (y, x), d in zip(mine, drop, strict=True):
            base[y : y + patch, x : x + patch] += d
            cover[y : y + patch, x : x + patch] += 1
        out[i] = np.where(cover > 0, base / np.maximum(cover, 1), 0)
    return out


def typed_by_brightness(score: np.ndarray, images: np.ndarray, bodies: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels with ``score > threshold`` in the body: lytic where darker than the body median, else blastic."""
    out = np.zeros(images.shape, dtype=np.uint8)
    for i in range(len(images)):
        if not bodies[i].any():
            continue
        on = (score[i] > threshold) & bodies[i]
        dark = images[i] < np.median(images[i][bodies[i]])
        out[i][on & dark] = LYTIC
        out[i][on & ~dark] = BLASTIC
    return _drop_small(out)


def threshold_maps(images: np.ndarray, bodies: np.ndarray, lytic_below: float, blastic_above: float) -> np.ndarray:
    out = np.zeros(images.shape, dtype=np.uint8)
    out[(images < lytic_below) & bodies] = LYTIC
    out[(images > blastic_above) & bodies] = BLASTIC
    return _drop_small(out)


def _drop_small(label_maps: np.ndarray) -> np.ndarray:
    """Remove components below the lesion size of the metrics (they could only count as false positives)."""
    out = np.zeros_like(label_maps)
    for i, lm in enumerate(label_maps):
        for kind in KINDS.values():
            for comp in components(lm == kind, MIN_LESION_PX):
                out[i][comp] = kind
    return out


# -- scores -------------------------------------------------------------------------------------------------


def mean_f1(label_maps: np.ndarray, truth: np.ndarray) -> float:
    """The tuning objective: lesion F1 (IoU >= 0.1) averaged over the two lesion types."""
    return mean_lesion_f1(label_maps, truth, list(KINDS.values()), iou=0.1, min_px=MIN_LESION_PX)


def score_method(label_maps: np.ndarray, data: SliceSet, *, reps: int = 1000, seed: int = 0) -> dict:
    """Every score of one method on ``data`` (its label maps in the same order), with bootstrap intervals."""
    truth, bodies = data.lesions, data.bodies
    out: dict = {}
    for name, kind in KINDS.items():
        row: dict = {}
        for label, iou in IOU_LEVELS.items():
            per = lesion_counts(label_maps, truth, kind, iou=iou, min_px=MIN_LESION_PX)
            tp, fp, fn = (int(v) for v in per.sum(axis=0))
            row[f"f1 {label}"] = pooled_f1(per)
            if iou == 0.1:
                row |= {
                    "tp": tp,
                    "fp": fp,
                    "fn": fn,
                    "f1 ci": bootstrap_ci(len(per), lambda ix, per=per: pooled_f1(per[ix]), reps=reps, seed=seed),
                }
        pred_k = (label_maps == kind) & bodies
        true_k = (truth == kind) & bodies
        has = np.flatnonzero(true_k.any(axis=(1, 2)))
        per_dice = np.array([dice(pred_k[i], true_k[i]) for i in has])
        row["dice"] = float(np.mean(per_dice)) if len(per_dice) else float("nan")
        row["dice ci"] = bootstrap_ci(len(per_dice), lambda ix, d=per_dice: float(np.mean(d[ix])), reps=reps, seed=seed)
        row["pooled dice"] = pooled_dice(list(pred_k), list(true_k))
        row["pooled dice ci"] = bootstrap_ci(
            len(truth), lambda ix, p=pred_k, t=true_k: pooled_dice(list(p[ix]), list(t[ix])), reps=reps, seed=seed
        )
        row["vertebrae with this type"] = len(has)
        out[name] = row
    flagged = flagged_per_slice(label_maps, data.mimics)
    touched, total = (int(v) for v in flagged.sum(axis=0))
    out["mimics"] = {
        "flagged": touched,
        "instances": total,
        "fp rate": mimic_fp_rate(flagged),
        "fp rate ci": bootstrap_ci(len(flagged), lambda ix: mimic_fp_rate(flagged[ix]), reps=reps, seed=seed),
    }
    return out


# -- the whole evaluation ---------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    report: dict  # JSON-ready scores
    outputs: list[MethodOutput]  # label maps of every method on every slice
    results: list[SliceResult]  # Hide-and-Seek's own per-slice results
    test: np.ndarray  # indices of the test slices


def split_validation(data: SliceSet, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the validation and test slices: whole vertebrae, stratified by label, seeded."""
    rng = np.random.default_rng(seed)
    val = []
    for label in (0, 1):
        ids = np.unique(data.vertebra[data.malignant == label])
        val += list(rng.choice(ids, size=round(len(ids) * fraction), replace=False)) if len(ids) else []
    is_val = np.isin(data.vertebra, val)
    return np.flatnonzero(is_val), np.flatnonzero(~is_val)


def _tune(make: Callable[..., np.ndarray], grid: list[dict], truth: np.ndarray, mimics: np.ndarray) -> dict:
    """The grid point with the best mean lesion F1, ties going to the fewest mimics flagged (as the model's own
    candidate tuning, ``calibration.tune_candidates``)."""
    label_maps = (make(**g) for g in grid)
    scores = [(mean_f1(m, truth), mimic_fp_rate(flagged_per_slice(m, mimics))) for m in label_maps]
    best = min(range(len(grid)), key=lambda i: selection_key(*scores[i]))  # first of equals: grid order
    return {**grid[best], "validation mean f1": round(scores[best][0], 4)}


def evaluate(
    bundle: ModelBundle,
    data: SliceSet,
    method: HideAndSeek,
    *,
    val_fraction: float = 0.25,
    seed: int = 0,
    reps: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> Evaluation:
    """Run every method on ``data``, tune the baselines on the validation split, score all on the test split."""
    say = progress or (lambda _msg: None)
    val, test = split_validation(data, val_fraction, seed)
    start = time.monotonic()
    say(f"hide-and-seek on {len(data)} slices")
    results = method.run(data.images, data.bodies)
    seconds = time.monotonic() - start
    hs = np.stack([r.label_map() for r in results])
    say("occlusion maps of the latent classifier")
    occ = occlusion_maps(bundle, data.images, data.bodies)
    bodies, images = data.bodies, data.images
    frozen = {k: getattr(method.settings, k) for k in ("delta_threshold", "body_margin_px", "min_change",
                                                       "candidate_quantile", "gate_probability")}
    outputs = [MethodOutput("hide-and-seek", hs, {"frozen from the model": frozen})]
    res_val = [results[i] for i in val]
    margin = method.settings.body_margin_px
    tuned = _tune(
        lambda min_change: difference_maps(res_val, bodies[val], min_change, margin),
        [{"min_change": c} for c in (0.0, 0.01, 0.02, 0.04, 0.06, 0.1, 0.15)],
        data.lesions[val],
        data.mimics[val],
    )
    outputs.append(
        MethodOutput("difference map", difference_maps(results, bodies, tuned["min_change"], margin),
                     {**tuned, "body margin px (the method's)": margin,
                      "P(malignant) gate (the method's)": method.settings.gate_probability})
    )
    top = float(np.quantile(occ[bodies], 0.999)) if bodies.any() else 1.0
    tuned = _tune(
        lambda threshold: typed_by_brightness(occ[val], images[val], bodies[val], threshold),
        [{"threshold": top * f} for f in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)],
        data.lesions[val],
        data.mimics[val],
    )
    outputs.append(MethodOutput("occlusion", typed_by_brightness(occ, images, bodies, tuned["threshold"]), tuned))
    inside = images[bodies]
    lows = np.quantile(inside, [0.01, 0.02, 0.05, 0.1, 0.15]) if inside.size else [0.0]
    highs = np.quantile(inside, [0.85, 0.9, 0.95, 0.98, 0.99]) if inside.size else [1.0]
    tuned = _tune(
        lambda lytic_below, blastic_above: threshold_maps(images[val], bodies[val], lytic_below, blastic_above),
        [{"lytic_below": float(lo), "blastic_above": float(hi)} for lo in lows for hi in highs],
        data.lesions[val],
        data.mimics[val],
    )
    outputs.append(
        MethodOutput(
            "HU threshold", threshold_maps(images, bodies, tuned["lytic_below"], tuned["blastic_above"]), tuned
        )
    )
    test_data = data.subset(np.isin(np.arange(len(data)), test))
    p = np.array([r.p_malignant for r in results])
    report = {
        "slices": {"validation": len(val), "test": len(test)},
        "test vertebrae": {
            "malignant": int(test_data.malignant.sum()),
            "healthy": int((test_data.malignant == 0).sum()),
            "with mimics": int((test_data.mimics > 0).any(axis=(1, 2)).sum()),
        },
        "classifier auc": roc_auc(data.malignant[test], p[test]),
        "hide-and-seek seconds per slice": round(seconds / max(1, len(data)), 3),
        "delta ranking (test candidates)": delta_ranking([results[i] for i in test], data.lesions[test]),
        "methods": {},
    }
    report["classifier auc ci"] = bootstrap_ci(
        len(test), lambda ix: _auc_or_nan(data.malignant[test][ix], p[test][ix]), reps=reps, seed=seed
    )
    for out in outputs:
        say(f"scoring {out.name}")
        report["methods"][out.name] = {
            "tuned": out.tuned,
            **score_method(out.label_maps[test], test_data, reps=reps, seed=seed),
        }
    return Evaluation(report, outputs, results, test)


def delta_ranking(results: Sequence[SliceResult], truth: np.ndarray, *, iou: float = 0.1) -> dict:
    """How well Δ separates the candidates that lie on a true lesion of their type (IoU >= ``iou``, the hit rule
    of lesion F1) from the others, over every scored candidate: ROC AUC of Δ (0.5: Δ ranks no better than chance,
    so thresholding it can only drop true and false candidates alike; None without both kinds)."""
    hits, deltas = [], []
    for result, lesions in zip(results, truth, strict=True):
        true = {kind: components(lesions == kind, MIN_LESION_PX) for kind in {c.kind for c in result.candidates}}
        for cand in result.candidates:
            hits.append(any(iou_of(cand.mask, t) >= iou for t in true[cand.kind]))
            deltas.append(cand.delta)
    n_hit = int(sum(hits))
    auc = roc_auc(np.array(hits, int), np.array(deltas)) if 0 < n_hit < len(hits) else None
    return {"candidates": len(hits), "on a true lesion": n_hit, "delta auc": None if auc is None else round(auc, 3)}


def _auc_or_nan(labels: np.ndarray, scores: np.ndarray) -> float:
    return roc_auc(labels, scores) if 0 < labels.sum() < len(labels) else float("nan")


def markdown_table(report: dict) -> str:
    """The results table of BENCHMARKS.md."""
    lines = [
        "| method | type | F1 (IoU≥0.1) [95 % CI] | F1 any overlap | F1 IoU≥0.5 | Dice [95 % CI] | pooled Dice | "
        "mimic FP rate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in report["methods"].items():
        for kind in KINDS:
            r = m[kind]
            lines.append(
                f"| {name} | {kind} | {r['f1 IoU>=0.1']:.2f} [{_ci(r['f1 ci'])}] | {r['f1 any overlap']:.2f} | "
                f"{r['f1 IoU>=0.5']:.2f} | {r['dice']:.2f} [{_ci(r['dice ci'])}] | {r['pooled dice']:.2f} | "
                + (
                    f"{m['mimics']['fp rate']:.2f} ({m['mimics']['flagged']}/{m['mimics']['instances']}) |"
                    if kind == "lytic"
                    else "″ |"
                )
            )
    return "\n".join(lines) + "\n"


def _ci(ci) -> str:
    lo, hi = ci
    return "–" if not (np.isfinite(lo) and np.isfinite(hi)) else f"{lo:.2f}–{hi:.2f}"


def examples_figure(evaluation: Evaluation, data: SliceSet, path, n: int = 6) -> None:
    """Test slices with lesions or mimics: image with truth, then every method's label map (red lytic, gold blastic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = evaluation.test
    interesting = [i for i in test if data.lesions[i].any()][: n - 1] + [i for i in test if data.mimics[i].any()
                                                                          and not data.lesions[i].any()][:1]
    cols = ["image + truth", *[o.name for o in evaluation.outputs]]
    fig, axes = plt.subplots(len(interesting), len(cols), figsize=(2.2 * len(cols), 2.3 * len(interesting)),
                             squeeze=False)
    for r, i in enumerate(interesting):
        maps = [data.lesions[i], *[o.label_maps[i] for o in evaluation.outputs]]
        for c, (title, lm) in enumerate(zip(cols, maps, strict=True)):
            ax = axes[r, c]
            ax.imshow(data.images[i], cmap="gray", vmin=0, vmax=1)
            for kind, color in ((LYTIC, "red"), (BLASTIC, "gold")):
                if (lm == kind).any():
                    ax.contour(lm == kind, levels=[0.5], colors=[color], linewidths=0.9)
            if c == 0 and data.mimics[i].any():
                ax.contour(data.mimics[i] > 0, levels=[0.5], colors=["cyan"], linewidths=0.9)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
        axes[r, 0].set_ylabel(str(data.names[data.vertebra[i]]), fontsize=8)
    fig.suptitle("held-out phantom slices: truth (cyan = benign mimic) and each method's lytic (red) / blastic (gold)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
