"""Lesion-level and pixel-level scores for predicted lytic/blastic label maps (pure numpy, no model).

Conventions (see BENCHMARKS.md): lesions are 8-connected components of at least ``min_px`` pixels; predicted
and true lesions of the same type are matched one-to-one by IoU (Hungarian assignment), a match needs
IoU >= ``iou`` (``iou=0`` means any overlap); a predicted lesion of the wrong type is a false positive.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

_EIGHT = ndimage.generate_binary_structure(2, 2)


@dataclass(frozen=True)
class MatchCounts:
    tp: int
    fp: int
    fn: int

    def __add__(self, other: MatchCounts) -> MatchCounts:
        return MatchCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def f1(self) -> float:
        denom = 2 * self.tp + self.fp + self.fn
        return 1.0 if denom == 0 else 2 * self.tp / denom


def components(mask: np.ndarray, min_px: int = 5) -> list[np.ndarray]:
    """8-connected components with at least ``min_px`` pixels (2-D or 3-D with 26-connectivity)."""
    structure = _EIGHT if mask.ndim == 2 else ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labels, n = ndimage.label(mask, structure=structure)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    return [labels == i for i in range(1, n + 1) if sizes[i] >= min_px]


def match_lesions(pred: np.ndarray, truth: np.ndarray, kind: int, *, iou: float = 0.1, min_px: int = 5) -> MatchCounts:
    """One-to-one matching of the ``kind`` lesions of two label maps."""
    p, t = components(pred == kind, min_px), components(truth == kind, min_px)
    if not p or not t:
        return MatchCounts(0, len(p), len(t))
    ious = np.array([[iou_of(a, b) for b in t] for a in p])
    rows, cols = linear_sum_assignment(-ious)
    hits = int(sum(ious[r, c] >= iou and ious[r, c] > 0 for r, c in zip(rows, cols, strict=True)))
    return MatchCounts(hits, len(p) - hits, len(t) - hits)


def lesion_counts(label_maps: np.ndarray, truth: np.ndarray, kind: int, *, iou: float, min_px: int = 5) -> np.ndarray:
    """(N, 3) true positives, false positives and misses of ``kind`` per slice of (N, H, W) label maps."""
    counts = [match_lesions(p, t, kind, iou=iou, min_px=min_px) for p, t in zip(label_maps, truth, strict=True)]
    return np.array([[c.tp, c.fp, c.fn] for c in counts], dtype=int).reshape(-1, 3)


def pooled_f1(counts: np.ndarray) -> float:
    """Lesion F1 of per-slice counts from ``lesion_counts``, pooled over the slices."""
    tp, fp, fn = (int(v) for v in counts.sum(axis=0)) if len(counts) else (0, 0, 0)
    return MatchCounts(tp, fp, fn).f1


def mean_lesion_f1(label_maps: np.ndarray, truth: np.ndarray, kinds: Sequence[int], *, iou: float = 0.1,
                   min_px: int = 5) -> float:
    """Pooled lesion F1 averaged over lesion types: the one number thresholds are tuned on."""
    return float(np.mean([pooled_f1(lesion_counts(label_maps, truth, k, iou=iou, min_px=min_px)) for k in kinds]))


def iou_of(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when they do not touch)."""
    inter = np.logical_and(a, b).sum()
    return float(inter / np.logical_or(a, b).sum()) if inter else 0.0


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty (such cases are not averaged)."""
    denom = pred.sum() + truth.sum()
    return float("nan") if denom == 0 else float(2 * np.logical_and(pred, truth).sum() / denom)


def pooled_dice(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> float:
    inter = sum(int(np.logical_and(p, t).sum()) for p, t in zip(preds, truths, strict=True))
    total = sum(int(p.sum() + t.sum()) for p, t in zip(preds, truths, strict=True))
    return float("nan") if total == 0 else 2 * inter / total


def flagged_mimics(pred_lesions: np.ndarray, mimic_instances: np.ndarray) -> tuple[int, int]:
    """(mimic instances touched by any predicted lesion, all mimic instances)."""
    ids = [i for i in np.unique(mimic_instances) if i != 0]
    touched = sum(bool(np.any(pred_lesions[mimic_instances == i])) for i in ids)
    return touched, len(ids)


def flagged_per_slice(label_maps: np.ndarray, mimics: np.ndarray) -> np.ndarray:
    """(N, 2): per slice, mimic instances touched by any predicted lesion and all mimic instances."""
    return np.array([flagged_mimics(lm > 0, m) for lm, m in zip(label_maps, mimics, strict=True)],
                    dtype=int).reshape(-1, 2)


def mimic_fp_rate(flagged: np.ndarray) -> float:
    """Share of mimic instances flagged, from ``flagged_per_slice`` rows; NaN without mimics."""
    total = flagged[:, 1].sum()
    return float(flagged[:, 0].sum() / total) if total else float("nan")


def json_measurements(values: Mapping[str, object], digits: int = 5) -> dict:
    """Measurements ready for a model card: floats rounded, undefined ones (NaN: e.g. the outside ratio of an edit
    that changed nothing inside lesions) left out, since JSON has no NaN and the card reads a gap as unknown."""
    out = {}
    for key, value in values.items():
        if isinstance(value, float | np.floating):
            if not np.isfinite(value):
                continue
            value = round(float(value), digits)
        out[key] = value
    return out


def selection_key(f1: float, mimic_fp: float) -> tuple[float, float]:
    """Order in which tuned settings are chosen (smallest first): the best mean lesion F1 to 4 decimals, then the
    fewest mimics flagged (NaN, no mimic truth, counts as none). The model's tuning and the baselines' share it."""
    return -round(f1, 4), 0.0 if np.isnan(mimic_fp) else mimic_fp


def bootstrap_ci(
    n_items: int, statistic: Callable[[np.ndarray], float], *, reps: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile interval of ``statistic(indices)`` over items resampled with replacement."""
    if n_items == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n_items, n_items)) for _ in range(reps)], dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def edit_efficacy(
    images: np.ndarray,
    recon: np.ndarray,
    edit: np.ndarray,
    lesions: np.ndarray,
    bodies: np.ndarray,
    kinds: Mapping[int, str] | None = None,
) -> dict[str, float]:
    """How much the healthy edit changes true lesions, relative to their contrast, and how little elsewhere.

    contrast = mean |image - median of the lesion-free body| over lesion pixels (per slice);
    efficacy = mean |edit - recon| inside lesions / mean contrast; ``outside`` = mean |edit - recon| in the
    lesion-free body, also reported relative to the in-lesion change (``outside_ratio``; target <= 0.1).
    ``kinds`` (label value -> name) adds ``efficacy <name>`` per lesion type: one type can be edited away while
    another is left untouched, which the pooled number hides.
    """
    change = np.abs(edit - recon)
    codes = {"": None, **{f" {name}": code for code, name in (kinds or {}).items()}}
    inside, contrast = {key: [] for key in codes}, {key: [] for key in codes}
    outside = []
    for img, ch, les, body in zip(images, change, lesions, bodies, strict=True):
        healthy = body & (les == 0)
        if not healthy.any():
            continue
        outside.append(ch[healthy])
        for key, code in codes.items():
            mask = les > 0 if code is None else les == code
            if mask.any():
                inside[key].append(ch[mask])
                contrast[key].append(np.abs(img[mask] - np.median(img[healthy])))
    outside_mean = float(np.mean(np.concatenate(outside))) if outside else float("nan")
    out = {"efficacy": float("nan"), "inside": float("nan"), "outside": outside_mean, "outside_ratio": float("nan"),
           "contrast": float("nan")}
    for key in codes:
        if inside[key]:
            out[f"efficacy{key}"] = float(np.mean(np.concatenate(inside[key])) / np.mean(np.concatenate(contrast[key])))
    if inside[""]:
        inside_mean = float(np.mean(np.concatenate(inside[""])))
        out |= {"inside": inside_mean, "outside_ratio": outside_mean / inside_mean if inside_mean else float("nan"),
                "contrast": float(np.mean(np.concatenate(contrast[""])))}
    return out
