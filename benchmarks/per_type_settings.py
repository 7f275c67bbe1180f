"""Would candidate settings of their own for each lesion type help? The export's grid scored per type and split.

The export tunes one set of candidate settings (body margin, change floor, quantile, Δ threshold, P gate) for
both lesion types, for the best *mean* lesion F1. Lytic edits are weaker than blastic ones, so a lytic floor or
margin of its own looked like an easy gain. Lytic and blastic candidates never interact (each comes from its own
sign of the difference map, and encoder-only Δ scores each candidate alone), so per-type settings can be read off
one pass over the grid: this runs the model's edit once per mid slice of a manifest with lesion truth (no gate),
scores every grid point per type on a validation and a test split of the vertebrae (``hideseek evaluate``'s
split), and reports the test F1 of the model's own settings, of the grid point best on validation for both types
at once, of the best per type on validation, and the per-type ceiling: the best test F1 of any grid point, chosen
on the test split itself (what no tuning can beat).

    python benchmarks/per_type_settings.py --manifest heldout/manifest.csv --slices slices-heldout-curve.npz \
        --out benchmarks/results/per-type-settings
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from hideseek.attribution import LESION_TYPES, HideAndSeek
from hideseek.bundle import load_bundle
from hideseek.calibration import candidate_grid_maps
from hideseek.dataset import cached_slice_set
from hideseek.errors import HideSeekError
from hideseek.evaluation import MIN_LESION_PX, split_validation
from hideseek.metrics import lesion_counts, pooled_f1
from hideseek.pipeline import default_model_path, resolve_settings

SPLITS = ("validation", "test")
SETTINGS = ("body_margin_px", "min_change", "candidate_quantile", "delta_threshold", "gate_probability")


def score_grid(method: HideAndSeek, images: np.ndarray, bodies: np.ndarray, lesions: np.ndarray,
               splits: dict[str, np.ndarray]) -> list[dict]:
    """One row per grid point: its settings and, per lesion type and split, [F1, TP, FP, FN] (IoU >= 0.1).
    ``method`` runs without a gate: the grid's gates are applied to its edits."""
    edits = method.edit(images)
    rows = []
    for setting, maps in candidate_grid_maps(method, edits, bodies, progress=_progress):
        row = dict(setting)
        for kind, name in LESION_TYPES.items():
            typed = np.where(maps == kind, kind, 0)
            for split, idx in splits.items():
                per = lesion_counts(typed[idx], lesions[idx], kind, iou=0.1, min_px=MIN_LESION_PX)
                row[f"{name} {split}"] = [round(pooled_f1(per), 4), *(int(v) for v in per.sum(axis=0))]
        rows.append(row)
    return rows


def _progress(done: int, total: int) -> None:
    print(f"\rgrid setting {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)


def choices(rows: list[dict], own: dict) -> dict:
    """Test scores of the settings each rule picks: the first of equals in grid order (the export's tuning
    breaks ties by the mimics flagged; this study does not score mimics)."""
    types = list(LESION_TYPES.values())

    def best(score) -> dict:
        return max(rows, key=score)  # max keeps the first of equals

    def f1(row: dict, name: str, split: str) -> float:
        return row[f"{name} {split}"][0]

    own_row = next((r for r in rows if all(r[k] == own[k] for k in SETTINGS)), None)
    picks = {
        "the model's own settings": {name: own_row for name in types} if own_row else None,
        "one setting for both, best mean F1 on validation": dict.fromkeys(
            types, best(lambda r: sum(f1(r, n, "validation") for n in types))),
        "a setting per type, best on validation": {n: best(lambda r, n=n: f1(r, n, "validation")) for n in types},
        "a setting per type, best on test (ceiling)": {n: best(lambda r, n=n: f1(r, n, "test")) for n in types},
    }
    out = {}
    for rule, picked in picks.items():
        if picked is None:  # the model's settings are off the grid
            continue
        out[rule] = {n: {"settings": {k: picked[n][k] for k in SETTINGS}, **{
            split: dict(zip(("f1", "tp", "fp", "fn"), picked[n][f"{n} {split}"], strict=True)) for split in SPLITS}}
            for n in types}
        out[rule]["mean test f1"] = round(float(np.mean([out[rule][n]["test"]["f1"] for n in types])), 4)
    return out


def markdown(picked: dict, slices: dict[str, int]) -> str:
    types = list(LESION_TYPES.values())
    lines = [f"Validation {slices['validation']} / test {slices['test']} slices. Test F1 (TP / FP / FN); the "
             "settings are margin px, change floor, quantile, Δ threshold, gate.", "",
             "| rule | " + " | ".join(f"{n} test F1 | {n} settings" for n in types) + " | mean test F1 |",
             "| --- |" + " --- | --- |" * len(types) + " --- |"]
    for rule, row in picked.items():
        cells = []
        for n in types:
            t = row[n]["test"]
            cells += [f"{t['f1']:.3f} ({t['tp']} / {t['fp']} / {t['fn']})",
                      ", ".join("none" if v is None else f"{v:g}" for v in row[n]["settings"].values())]
        lines.append(f"| {rule} | " + " | ".join(cells) + f" | {row['mean test f1']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="manifest with lesion truth (e.g. the held-out set)")
    parser.add_argument("--slices", help="cache of its mid slices (.npz), as 'hideseek evaluate --slices'")
    parser.add_argument("--model", help="model bundle (default: the bundled model)")
    parser.add_argument("--val-fraction", type=float, default=0.25, help="vertebrae of the validation split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (as 'hideseek evaluate')")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--out", required=True,
                        help="folder for per_type.json (choices), per_type_grid.jsonl (every grid row), per_type.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        bundle = load_bundle(args.model or default_model_path())
        _, settings = resolve_settings(bundle, None, {})
        data = cached_slice_set(args.manifest, bundle.preprocessing, args.slices, mode="mid")
    except (HideSeekError, OSError) as error:
        sys.exit(f"per_type_settings: {error}")
    val, test = split_validation(data, args.val_fraction, args.seed)
    method = HideAndSeek(bundle.dae, bundle.diffusion, bundle.classifier,
                         settings.with_overrides(gate_probability=None))
    rows = score_grid(method, data.images, data.bodies, data.lesions, {"validation": val, "test": test})
    picked = choices(rows, settings.to_dict())
    slices = {"validation": len(val), "test": len(test)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": bundle.identity(), "manifest": args.manifest, "slices": slices, "choices": picked}
    (out / "per_type.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "per_type_grid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    table = markdown(picked, slices)
    (out / "per_type.md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
