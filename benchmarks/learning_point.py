"""One learning-curve point of a model on any training set's validation vertebrae.

``hideseek train`` measures its learning curve on the validation split of the data it trains on, so a run on
other data (fresh vertebrae, a curriculum of easier lesions) is measured on other vertebrae and cannot be laid
beside the first run's curve. This measures a bundle or a kept snapshot exactly as a learning-curve point would
(validation AUC of a classifier refitted on the training split's codes, edit efficacy per lesion type on 32
validation slices drawn by type and vertebra, 20/20 DDIM steps, step × 1) on the split of the manifest given:

    python benchmarks/learning_point.py --manifest phantoms/train/manifest.csv --cache slices-curve.npz \
        --snapshot STATE 12000 --json benchmarks/results/RUN/point-12000.json

The split is ``hideseek train``'s (10 % of the vertebrae of each class, ``--seed`` 0 as training's default); the
model's intensity mapping must match the cache's (a cache made otherwise is refused). The classifier is fitted on
the same manifest's training split, unless ``--fit-manifest`` (and ``--fit-cache``) name another: the edit of a
model trained with the label loss depends on which codes its classifier was fitted on (BENCHMARKS.md section 3),
so ``--fit-manifest`` set to the model's own training data measures it as its bundle would be exported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from studied_model import StudiedModel, add_model_arguments, load_studied

from hideseek.dataset import SliceSet, cached_slice_set
from hideseek.errors import HideSeekError
from hideseek.training import learning_point, split_by_vertebra

SHOWN = ("val_auc", "efficacy", "efficacy lytic", "efficacy blastic", "outside_ratio", "p_reencoded_edit")


def split_manifest(manifest: str, cache: str | None, studied: StudiedModel, seed: int) -> tuple[SliceSet, SliceSet]:
    """A manifest's training and validation slices, split as ``hideseek train`` splits them."""
    data = cached_slice_set(manifest, studied.preprocessing, cache)
    held = split_by_vertebra(data.vertebra, data.malignant, 0.1, seed)
    return data.subset(~held), data.subset(held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="the training manifest whose validation split is used")
    parser.add_argument("--cache", help="slice cache (.npz) of that manifest, read when it exists, else written")
    add_model_arguments(parser)
    parser.add_argument("--fit-manifest", help="fit the classifier on this manifest's training split instead")
    parser.add_argument("--fit-cache", help="slice cache (.npz) of --fit-manifest")
    parser.add_argument("--C", type=float, default=0.01, help="classifier L2 strength (default 0.01, as training)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split (training's --seed)")
    parser.add_argument("--json", help="write the point here")
    args = parser.parse_args()

    if args.fit_cache and not args.fit_manifest:
        parser.error("--fit-cache is the slice cache of --fit-manifest, which is missing")
    studied = load_studied(args, parser)
    try:
        train, val = split_manifest(args.manifest, args.cache, studied, args.seed)
        if args.fit_manifest:
            train, _ = split_manifest(args.fit_manifest, args.fit_cache, studied, args.seed)
    except HideSeekError as err:  # e.g. a cache made with another intensity mapping
        parser.error(str(err))
    point = {"model": studied.name, "version": studied.version, "manifest": str(args.manifest),
             "fit_manifest": str(args.fit_manifest or args.manifest), "val_set": val.vertebra_fingerprint()}
    point |= learning_point(studied.dae, studied.diffusion, train, val, C=args.C, seed=args.seed)
    print(f"{studied.name} v{studied.version} on {args.manifest} (validation vertebrae {point['val_set']}; "
          f"classifier fitted on {point['fit_manifest']})")
    print("| " + " | ".join(SHOWN) + " |")
    print("|" + " --- |" * len(SHOWN))
    print("| " + " | ".join(f"{point[k]:.3f}" if k in point else "–" for k in SHOWN) + " |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(point, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
