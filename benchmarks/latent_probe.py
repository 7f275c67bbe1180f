"""Does the semantic code z carry each lesion type? A linear probe of a model's encoder on slices with truth.

The healthy edit moves z along the latent classifier's normal, and Δ re-reads z: a lesion type the code does not
separate from healthy bone can be neither edited away nor scored. For each group of slices (lytic only, blastic
only, both, malignant vertebra but no lesion in the slice) against healthy ones this prints the ROC AUC of the
model's own classifier and of a logistic probe fitted for that group alone (out-of-fold, stratified k-fold).

    python benchmarks/latent_probe.py --manifest heldout/manifest.csv --cache slices-heldout.npz \
        --json benchmarks/results/latent_probe.json

``--snapshot STATE STEP`` probes a training run mid-way instead (a learning-curve point kept by
``hideseek train --keep-snapshots``), without exporting a bundle; it has no classifier of its own, so only the
probe column is filled.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from studied_model import add_model_arguments, load_studied

from hideseek.classifier import fit_latent_classifier, roc_auc, stratified_folds
from hideseek.dataset import SliceSet, cached_slice_set
from hideseek.training import encode_latents


def slice_groups(data: SliceSet) -> dict[str, np.ndarray]:
    """Malignant slices by what they show; every group is compared with the healthy slices."""
    lytic = (data.lesions == 1).any(axis=(1, 2))
    blastic = (data.lesions == 2).any(axis=(1, 2))
    malignant = data.malignant == 1
    return {"lytic only": lytic & ~blastic, "blastic only": blastic & ~lytic, "lytic and blastic": lytic & blastic,
            "malignant, no lesion in the slice": malignant & ~lytic & ~blastic}


def probe_auc(z: np.ndarray, labels: np.ndarray, C: float, folds: int, seed: int) -> float:
    """Out-of-fold AUC of a logistic regression on z (scores of each fold from a fit on the others)."""
    score = np.empty(len(labels))
    for held in stratified_folds(labels, folds, seed):
        train = np.setdiff1d(np.arange(len(labels)), held)
        clf, _ = fit_latent_classifier(z[train], labels[train], C=C, class_weight="balanced")
        score[held] = clf.probability(torch.from_numpy(z[held])).numpy()
    return roc_auc(labels, score)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="manifest with lesion truth (e.g. a phantom set)")
    parser.add_argument("--cache", help="mid-slice cache (.npz), read when it exists, else written")
    add_model_arguments(parser)
    parser.add_argument("--C", type=float, default=0.01, help="probe L2 strength (default 0.01, as training)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()

    studied = load_studied(args, parser)
    dae, classifier, model, version = studied.dae, studied.classifier, studied.name, studied.version
    data = cached_slice_set(args.manifest, studied.preprocessing, args.cache, mode="mid")
    z = encode_latents(dae, data.images).double().numpy()
    p_model = None if classifier is None else classifier.probability(torch.from_numpy(z)).numpy()
    healthy = data.malignant == 0
    rows = {}
    for name, group in slice_groups(data).items():
        keep = group | healthy
        labels = group[keep].astype(int)
        enough = min(labels.sum(), (1 - labels).sum()) >= args.folds
        rows[name] = {
            "slices": int(group.sum()),
            "model classifier auc": round(roc_auc(labels, p_model[keep]), 3)
            if labels.any() and p_model is not None else None,
            "probe auc": round(probe_auc(z[keep], labels, args.C, args.folds, args.seed), 3) if enough else None,
        }
    print(f"{model} v{version}: {len(data)} slices, {int(healthy.sum())} healthy; "
          f"probe C = {args.C:g}, {args.folds}-fold")
    print("| slices showing | n | AUC, model's classifier | AUC, probe for this group |")
    print("| --- | --- | --- | --- |")
    for name, r in rows.items():
        cells = [f"{r[k]:.2f}" if r[k] is not None else "–" for k in ("model classifier auc", "probe auc")]
        print(f"| {name} | {r['slices']} | {cells[0]} | {cells[1]} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": model, "version": version, "C": args.C,
                                               "folds": args.folds, "groups": rows}, indent=1) + "\n",
                                   encoding="utf-8")


if __name__ == "__main__":
    main()
