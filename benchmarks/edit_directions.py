"""Which direction in z should the healthy edit move along? Unpaired directions measured against healthy twins.

The model's edit moves z along its latent classifier's normal (L2 logistic regression on standardized z, C chosen
at export). A stronger penalty turns that normal towards the plain difference of the class means (the limit
C -> 0), which needs no covariance and so cannot fit the training vertebrae's own codes. This fits classifiers
with several C on the model's training split (vertebra labels only) and takes the class-mean difference, then
moves each test slice's code along each direction until the *model's* classifier says P(malignant) = target,
times a step scale, so that only the direction differs. Every edit is measured on the healthy-twin pairs of
``edit_oracle.py``: efficacy and outside ratio as in the model card, and the cosine of the move with the slice's
oracle move z(twin) − z. Each classifier's AUC is measured on the fit manifest's validation split.

    python benchmarks/edit_directions.py --pairs edit-pairs --fit-manifest phantoms/lytic-easy/manifest.csv \
        --fit-cache slices-lytic-easy-curve.npz --out benchmarks/results/edit-directions
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from edit_oracle import add_pair_arguments, decode, invert, load_pairs
from learning_point import split_manifest

from hideseek.attribution import LESION_TYPES, settings_for
from hideseek.calibration import CLASS_MEANS
from hideseek.classifier import LatentClassifier, class_mean_direction, fit_latent_classifier, roc_auc
from hideseek.errors import HideSeekError
from hideseek.metrics import edit_efficacy
from hideseek.training import encode_latents

CS = (1e-2, 1e-3, 1e-4, 1e-5)
SCALES = (0.5, 1.0, 2.0)



def raw_direction(clf: LatentClassifier) -> torch.Tensor:
    """The classifier's unit normal (standardized space) as a move of raw z, pointing to malignant."""
    return torch.tensor(clf.scale * clf.coef / np.linalg.norm(clf.coef))


def directions(z_train: np.ndarray, malignant: np.ndarray, seed: int) -> tuple[dict, dict]:
    """Raw-z directions towards malignant, and the fitted classifiers (for their AUC), by name."""
    fitted = {f"C = {c:g}": fit_latent_classifier(z_train, malignant, C=c, class_weight="balanced", seed=seed)[0]
              for c in CS}
    dirs = {name: raw_direction(clf) for name, clf in fitted.items()}
    dirs[CLASS_MEANS] = torch.tensor(class_mean_direction(z_train, malignant))
    return dirs, fitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pair_arguments(parser)
    parser.add_argument("--fit-manifest", required=True, help="manifest whose training split the directions use")
    parser.add_argument("--fit-cache", help="slice cache (.npz) of --fit-manifest")
    parser.add_argument("--split-seed", type=int, default=0, help="training's --seed (its validation split)")
    parser.add_argument("--out", required=True, help="folder for directions.json, directions.md, directions.png")
    args = parser.parse_args()
    studied, lesioned, twins = load_pairs(args, parser)  # the model's classifier sets each edit's length
    try:
        train, val = split_manifest(args.fit_manifest, args.fit_cache, studied, args.split_seed)
    except HideSeekError as err:
        parser.error(str(err))
    print(f"encoding {len(train)} training and {len(val)} validation slices", flush=True)
    z_train = encode_latents(studied.dae, train.images).double().numpy()
    dirs, fitted = directions(z_train, train.malignant.astype(int), args.split_seed)
    z_val = encode_latents(studied.dae, val.images).double()
    auc = {name: roc_auc(val.malignant, clf.probability(z_val).numpy()) for name, clf in fitted.items()}
    auc[CLASS_MEANS] = roc_auc(val.malignant, (z_val @ dirs[CLASS_MEANS]).numpy())

    picked = lesioned.lesion_sample(args.slices)
    les, twin = lesioned.subset(picked), twins.subset(picked)
    z, xT, recon = invert(studied, les.images)
    oracle_move = encode_latents(studied.dae, twin.images).double() - z.double()
    target = settings_for("fast").target_probability
    rows, skipped = [], []
    for name, d in dirs.items():
        if studied.classifier.slope(d.numpy()) <= 0:  # cannot reach the target: the score falls along it
            skipped.append(name)
            continue
        cosine = float(torch.nn.functional.cosine_similarity(oracle_move, -d[None], dim=1).mean())
        # The model's classifier sets the length (whichever way the model itself edits).
        along = replace(studied.classifier, edit_direction=d.numpy(), kind_directions=None)
        for scale in SCALES:
            print(f"{name}, step × {scale:g}", flush=True)
            z_edit = along.edit(z, target, step_scale=scale)
            edit = decode(studied, xT, z_edit)
            row = edit_efficacy(les.images, recon, edit, les.lesions, les.bodies, LESION_TYPES)
            rows.append({"direction": name, "step_scale": scale, "val_auc": auc[name], "cosine_to_twin": cosine,
                         "move_norm": float((z_edit.double() - z.double()).norm(dim=1).mean()), **row})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"model": studied.name, "version": studied.version, "pairs": str(args.pairs), "slices": len(picked),
              "fit_manifest": str(args.fit_manifest), "fit_slices": len(train), "target_probability": target,
              "rows": rows, "skipped (the model's classifier does not rise along them)": skipped}
    (out / "directions.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    text = table(rows)
    (out / "directions.md").write_text(text, encoding="utf-8")
    plot(rows, out / "directions.png", f"{studied.name} v{studied.version}, {len(picked)} twin-pair slices")
    print(text + (f"skipped (the model's classifier does not rise along them): {', '.join(skipped)}\n"
                  if skipped else ""))


def table(rows: list[dict]) -> str:
    cols = ("val_auc", "cosine_to_twin", "step_scale", "move_norm", "efficacy", "efficacy lytic", "efficacy blastic",
            "outside_ratio")
    lines = ["| direction | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    for row in rows:
        lines.append(f"| {row['direction']} | " + " | ".join(f"{row[c]:.3g}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name in dict.fromkeys(r["direction"] for r in rows):
        own = [r for r in rows if r["direction"] == name]
        ax.plot([r["outside_ratio"] for r in own], [r["efficacy"] for r in own], "o-", label=name)
        for r in own:
            ax.annotate(f"×{r['step_scale']:g}", (r["outside_ratio"], r["efficacy"]), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("outside ratio (change outside lesions ÷ inside; lower is better)")
    ax.set_ylabel("edit efficacy (higher is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
