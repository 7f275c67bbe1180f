"""Cost and quality of the `published` preset against cheaper ones, with the same weights on the same slices.

Counts network passes (images x DDIM steps, the unit that dominates the cost) and wall time, and scores each
preset's lesions against the truth (lesion F1 at IoU >= 0.1, Dice) with hideseek.evaluation. Prints a Markdown
table for BENCHMARKS.md and writes the numbers as JSON.

    python benchmarks/speed.py --manifest heldout/manifest.csv --slices 4 --json benchmarks/results/speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from hideseek.attribution import HideAndSeek
from hideseek.bundle import load_bundle
from hideseek.dataset import SliceSet, cached_slice_set
from hideseek.evaluation import score_method
from hideseek.pipeline import default_model_path, resolve_settings

VARIANTS = {
    "published": {},
    "fast 50/50": {"encode_steps": 50, "decode_steps": 50},
    "fast 20/20": {"encode_steps": 20, "decode_steps": 20},
    "fast 10/10": {"encode_steps": 10, "decode_steps": 10},
    "fast 8/8": {"encode_steps": 8, "decode_steps": 8},
}
"""Preset name -> overrides: ``published`` as the authors ran it, the others encoder-only scoring (``fast``)."""


def pick_slices(data: SliceSet, n: int) -> np.ndarray:
    """Mostly slices with lesions (where cost and quality differ), one healthy in four."""
    with_lesions = np.flatnonzero(data.lesions.any(axis=(1, 2)))
    healthy = np.flatnonzero(~data.lesions.any(axis=(1, 2)))
    n_healthy = min(len(healthy), n // 4)
    return np.sort(np.concatenate([with_lesions[: n - n_healthy], healthy[:n_healthy]]))


def run_variant(bundle, name: str, overrides: dict, data: SliceSet) -> dict:
    base = "published" if name == "published" else "fast"
    _, settings = resolve_settings(bundle, base, overrides)  # the model's tuning of the preset, then the variant
    passes = {"total": 0}

    def count(_stage: str, done: int, _total: int) -> None:
        passes["total"] = done

    method = HideAndSeek(bundle.dae, bundle.diffusion, bundle.classifier, settings)
    start = time.perf_counter()
    results = method.run(data.images, data.bodies, progress=count)
    seconds = time.perf_counter() - start
    scores = score_method(np.stack([r.label_map() for r in results]), data, reps=200)
    return {
        "settings": settings.to_dict(),
        "unet_passes": passes["total"],
        "unet_passes_per_slice": passes["total"] / len(data),
        "seconds": round(seconds, 2),
        "seconds_per_slice": round(seconds / len(data), 3),
        "candidates": sum(len(r.candidates) for r in results),
        **{f"{kind} {metric}": scores[kind][metric] for kind in ("lytic", "blastic")
           for metric in ("f1 IoU>=0.1", "dice")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="phantom manifest with lesion truth")
    parser.add_argument("--model", help="bundle (default: the bundled demo model)")
    parser.add_argument("--slices", type=int, default=4, help="number of mid-sagittal slices (default 4)")
    parser.add_argument("--cache", help="mid-slice cache (.npz), read when it exists, else written")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()

    bundle = load_bundle(args.model or default_model_path())
    data = cached_slice_set(args.manifest, bundle.preprocessing, args.cache, mode="mid")
    keep = pick_slices(data, args.slices)
    data = data.subset(np.isin(np.arange(len(data)), keep))
    rows = {name: run_variant(bundle, name, VARIANTS[name], data) for name in args.variants.split(",")}
    ref = rows.get("published")
    print(f"{len(data)} slices, {bundle.name} v{bundle.version}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| preset | UNet passes / slice | s / slice | × cheaper than published | lytic F1 | lytic Dice | "
          "blastic F1 | blastic Dice |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        ratio = f"{ref['unet_passes'] / r['unet_passes']:.0f}×" if ref and r["unet_passes"] else "–"
        print(f"| {name} | {r['unet_passes_per_slice']:.0f} | {r['seconds_per_slice']:.2f} | {ratio} | "
              f"{r['lytic f1 IoU>=0.1']:.2f} | {r['lytic dice']:.2f} | {r['blastic f1 IoU>=0.1']:.2f} | "
              f"{r['blastic dice']:.2f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": bundle.name, "version": bundle.version,
                                               "slices": [str(data.names[v]) for v in data.vertebra],
                                               "variants": rows}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
