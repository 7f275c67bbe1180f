"""How good the healthy edit could be: the model's edit against edits made with the healthy twin's code.

A phantom's *healthy twin* (``generate_case(..., paint_lesions=False)``) is the same CT without its metastases:
the image a perfect healthy edit would give. For slices with lesions this decodes, from each lesioned slice's own
DDIM noise code x_T (20/20 steps), four semantic codes and measures each result against the slice's
reconstruction as the model card's edit efficacy does (change inside lesions ÷ lesion contrast, and the change
in the lesion-free body beside it):

- ``classifier``: the model's healthy edit (its latent classifier's normal, to P = target, step × 1; or its two
  edits, one per lesion type, merged as the method merges them);
- ``twin code``: the twin's own code z(twin), an oracle: the best a move of z alone can do for this slice;
- ``twin direction``: the mean z(twin) − z(lesioned) of the *other* half of the vertebrae, one global direction;
- ``twin reconstruction``: the twin through the DAE with its own x_T (not an edit: what the model draws for it);

and ``truth``, the twin image itself (measured against the lesioned image, not a reconstruction). If the twin
code removes lesions and nothing else, a better direction in z is what the edit lacks; if it redraws the body
too, the decoder does, and only training can change that.

    python benchmarks/edit_oracle.py --pairs edit-pairs --out benchmarks/results/edit-oracle

generates the pairs (``--cases`` cases from ``--seed``, every vertebra malignant) into ``--pairs`` when they are
not there, then writes ``oracle.json``, ``oracle.md`` and ``examples.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from studied_model import StudiedModel, add_model_arguments, load_studied

from hideseek.attribution import LESION_TYPES, edited_latents, merge_kind_edits, settings_for
from hideseek.dataset import SliceSet, cached_slice_set
from hideseek.errors import HideSeekError
from hideseek.metrics import edit_efficacy
from hideseek.phantom import write_phantom_set
from hideseek.sampler import DDIMSampler
from hideseek.training import encode_latents

STEPS = 20
EDITS = ("classifier", "twin code", "twin direction", "twin reconstruction", "truth")


def pair_sets(pairs: Path, cases: int, seed: int, preprocessing) -> tuple[SliceSet, SliceSet]:
    """Slices of the lesioned cases and of their twins, in the same order (generated first when missing)."""
    sets = []
    for name, paint in (("lesioned", True), ("twins", False)):
        manifest = pairs / name / "manifest.csv"
        if not manifest.is_file():
            print(f"generating {cases} {name} cases into {manifest.parent}", flush=True)
            write_phantom_set(manifest.parent, cases, seed, lesion_rate=1.0, paint_lesions=paint)
        sets.append(cached_slice_set(manifest, preprocessing, pairs / f"slices-{name}.npz"))
    lesioned, twins = sets
    if not (np.array_equal(lesioned.vertebra, twins.vertebra) and np.array_equal(lesioned.lesions, twins.lesions)):
        raise SystemExit(f"{pairs}: the lesioned and twin sets do not hold the same slices; delete the folder")
    return lesioned, twins


@torch.inference_mode()
def decode(studied: StudiedModel, xT: torch.Tensor, z: torch.Tensor) -> np.ndarray:
    return DDIMSampler(studied.diffusion, STEPS).decode(studied.dae, xT[:, None], z)[:, 0].numpy()


@torch.inference_mode()
def invert(studied: StudiedModel, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """z, x_T and the reconstruction of (N, H, W) slices."""
    z = encode_latents(studied.dae, images)
    xT = DDIMSampler(studied.diffusion, STEPS).encode(studied.dae, torch.from_numpy(images)[:, None], z)[:, 0]
    return z, xT, decode(studied, xT, z)


def half_direction(z: torch.Tensor, z_twin: torch.Tensor, vertebra: np.ndarray) -> torch.Tensor:
    """Per slice, the mean twin-minus-lesioned code of the vertebrae in the other half (even/odd vertebra index)."""
    half = vertebra % 2
    move = z_twin - z
    other = [move[torch.from_numpy(half != h)].mean(0) for h in (0, 1)]
    return torch.stack([other[h] for h in half])


def cosine_to_normal(studied: StudiedModel, z: torch.Tensor, z_edit: torch.Tensor) -> float:
    """Mean cosine, in the classifier's standardized space, between each move of z and the healthy direction."""
    clf = studied.classifier
    move = clf.standardize(z_edit) - clf.standardize(z)
    healthy = -torch.tensor(clf.coef)
    return float(torch.nn.functional.cosine_similarity(move, healthy[None], dim=1).mean())


def measure(studied: StudiedModel, lesioned: SliceSet, twins: SliceSet, max_slices: int) -> tuple[dict, dict]:
    picked = lesioned.lesion_sample(max_slices)
    les, twin = lesioned.subset(picked), twins.subset(picked)
    z, xT, recon = invert(studied, les.images)
    z_twin, _, recon_twin = invert(studied, twin.images)
    target = settings_for("fast").target_probability
    model_edits = edited_latents(studied.classifier, z.double(), target, 1.0)
    codes = {"twin code": z_twin, "twin direction": z + half_direction(z, z_twin, les.vertebra)}
    if None in model_edits:  # one code; a model that edits per lesion type has two, merged as the method does
        codes = {"classifier": model_edits[None].float()} | codes
    images = {name: decode(studied, xT, code) for name, code in codes.items()}
    if None not in model_edits:
        decoded = {kind: torch.from_numpy(decode(studied, xT, code.float())) for kind, code in model_edits.items()}
        images["classifier"] = merge_kind_edits(torch.from_numpy(recon), decoded).numpy()
    images |= {"twin reconstruction": recon_twin, "truth": twin.images}
    clf = studied.classifier
    rows = {}
    for name in EDITS:
        reference = les.images if name == "truth" else recon  # the truth is an image, not a decoding
        row = edit_efficacy(les.images, reference, images[name], les.lesions, les.bodies, LESION_TYPES)
        z_after = encode_latents(studied.dae, images[name].astype(np.float32))
        row["p_reencoded"] = float(clf.probability(z_after.double()).mean())
        if name in codes:
            row["p_code"] = float(clf.probability(codes[name].double()).mean())
            row["cosine_to_normal"] = cosine_to_normal(studied, z, codes[name])
        rows[name] = row
    rows["input"] = {"p_code": float(clf.probability(z.double()).mean()), "slices": len(picked),
                     "vertebrae": len(np.unique(les.vertebra))}
    shown = {"image": les.images, "truth": twin.images, "recon": recon} | {
        k: images[k] for k in ("classifier", "twin code", "twin direction")}
    return rows, {"shown": shown, "lesions": les.lesions, "recon": recon}


def table(rows: dict) -> str:
    cols = ("efficacy", "efficacy lytic", "efficacy blastic", "outside_ratio", "p_code", "p_reencoded",
            "cosine_to_normal")
    lines = ["| edit | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    for name in EDITS:
        cells = [f"{rows[name][c]:.3f}" if c in rows[name] else "–" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(panels: dict, path: Path, n: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown, recon = panels["shown"], panels["recon"]
    order = np.argsort(-(panels["lesions"] > 0).sum(axis=(1, 2)))[:n]
    diffs = {f"{k} − recon": shown[k] - recon for k in ("truth", "classifier", "twin code", "twin direction")}
    cols = ["image", "recon", "truth", "classifier", "twin code", *diffs]
    fig, axes = plt.subplots(len(order), len(cols), figsize=(1.6 * len(cols), 1.7 * len(order)), squeeze=False)
    for r, i in enumerate(order):
        for c, name in enumerate(cols):
            ax = axes[r, c]
            if name in diffs:
                ax.imshow(diffs[name][i], cmap="RdBu_r", vmin=-0.5, vmax=0.5)
            else:
                ax.imshow(shown[name][i], cmap="gray", vmin=-1, vmax=1)
            if c == 0:
                ax.contour(panels["lesions"][i], levels=[0.5, 1.5], colors=["tab:blue", "tab:red"], linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=7)
    fig.suptitle("lesioned slice (lytic blue, blastic red outline), its healthy twin, and edits; "
                 "difference maps: red = brighter than recon", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    """The pairs and the model: the arguments every twin study takes."""
    parser.add_argument("--pairs", required=True, help="folder of the lesioned/twin phantom pairs (made if missing)")
    parser.add_argument("--cases", type=int, default=30, help="cases to generate (default 30, ~150 vertebrae)")
    parser.add_argument("--seed", type=int, default=4242, help="seed of the pairs (not a training or test seed)")
    parser.add_argument("--slices", type=int, default=96, help="slices with lesions to edit (default 96)")
    add_model_arguments(parser)


def load_pairs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[StudiedModel, SliceSet, SliceSet]:
    """The model (with its classifier) and the pairs' slices in its layout; a bad input ends with the reason."""
    studied = load_studied(args, parser)
    if studied.classifier is None:
        parser.error("the twin studies need a bundle's classifier; --snapshot has none (export it first)")
    try:
        return studied, *pair_sets(Path(args.pairs), args.cases, args.seed, studied.preprocessing)
    except HideSeekError as err:
        parser.error(str(err))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pair_arguments(parser)
    parser.add_argument("--out", required=True, help="folder for oracle.json, oracle.md and examples.png")
    args = parser.parse_args()
    studied, lesioned, twins = load_pairs(args, parser)
    rows, panels = measure(studied, lesioned, twins, args.slices)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"model": studied.name, "version": studied.version, "pairs": str(args.pairs), "cases": args.cases,
              "seed": args.seed, "ddim_steps": STEPS, "rows": rows}
    (out / "oracle.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    text = table(rows)
    (out / "oracle.md").write_text(text, encoding="utf-8")
    figure(panels, out / "examples.png")
    print(f"{studied.name} v{studied.version}: {rows['input']['slices']} slices of {rows['input']['vertebrae']} "
          f"vertebrae, P(malignant) of their codes {rows['input']['p_code']:.3f}")
    print(text)


if __name__ == "__main__":
    main()
