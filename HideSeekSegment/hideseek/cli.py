"""The `hideseek` command line. Each subcommand parses its arguments here and calls the engine's library API.

Heavy modules are imported inside the handlers so that `hideseek --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import Cancelled, HideSeekError, InputError


def _add_import_published(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-published",
        help="convert the authors' published checkpoint and classifier pickles into a model bundle",
        description="Explicit, one-time conversion of the published Hide-and-Seek files (last.ckpt from Hugging "
        "Face matanatad/dae_verts, classifier_lr.pkl + scaler.pkl from github.com/matanat/hide_and_seek) into a "
        "safetensors + JSON bundle. The checkpoint is read with torch.load(weights_only=True); the two "
        "scikit-learn pickles can execute code when unpickled: convert only files you trust.",
    )
    p.add_argument("--checkpoint", required=True, help="Lightning checkpoint last.ckpt")
    p.add_argument("--classifier", required=True, help="classifier_lr.pkl (joblib)")
    p.add_argument("--scaler", required=True, help="scaler.pkl (joblib)")
    p.add_argument("--out", required=True, help="bundle folder to create (must not exist)")
    p.set_defaults(handler=_run_import_published)


def _run_import_published(args: argparse.Namespace) -> int:
    from .importer import import_published

    bundle_dir = import_published(args.checkpoint, args.classifier, args.scaler, args.out)
    print(f"wrote model bundle {bundle_dir}")
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that segments CTs: the model's, then how progress is shown."""
    _add_model_options(p)
    p.add_argument("--progress", choices=["bar", "json", "none"], default="bar",
                   help="progress on stderr as a bar, as JSON lines on stdout (for scripts), or none")
    p.add_argument("--quiet", action="store_true", help="print only errors (same as --progress none, no summary)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs the model."""
    p.add_argument("--model", help="model bundle folder (default: $HIDESEEK_MODEL or the bundled demo model)")
    p.add_argument("--preset", choices=["fast", "published"], help="method preset (default: the model's own)")
    p.add_argument("--delta-threshold", type=float, help="keep candidates whose Δ score is above this (0..1)")
    p.add_argument("--body-margin", type=int, metavar="PX",
                   help="candidates stay this many slice pixels inside the body outline (default: the model's)")
    p.add_argument("--min-change", type=float,
                   help="candidates need |edit - recon| above this, in model intensity units (default: the model's)")
    p.add_argument("--gate", type=float, metavar="P",
                   help="search only slices the classifier scores above this P(malignant); 0 searches every slice "
                   "(default: the model's)")
    p.add_argument("--ddim-steps", type=int, metavar="N",
                   help="DDIM steps for inversion and generation (default: the preset's, 20 fast / 250+100 "
                   "published); more is slower and closer to the published result, see BENCHMARKS.md")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda (default: auto)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-bf16", action="store_true",
                   help="run the network in float32 where the fast preset would use bf16 autocast (native bf16 "
                   "only: faster, but a few lesions of a cohort differ; see BENCHMARKS.md section 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _setting_overrides(args: argparse.Namespace) -> dict:
    """The method settings given on the command line (the rest come from the preset and the model)."""
    given = {"delta_threshold": args.delta_threshold, "body_margin_px": args.body_margin,
             "min_change": args.min_change, "gate_probability": args.gate, "encode_steps": args.ddim_steps,
             "decode_steps": args.ddim_steps, "autocast_bf16": False if args.no_bf16 else None}
    return {name: value for name, value in given.items() if value is not None}


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="find lytic and blastic metastases in a CT's vertebrae",
        description="Reads a CT (NIfTI/NRRD/MHA file or DICOM folder) and its vertebra labels (TotalSegmentator, "
        "SPINEPS or a plain labelmap with a label table) and writes lesions.nii.gz, lesions.seg.nrrd, "
        "report.json, report.csv and overview.png into --out (see docs/output-contract.md).",
    )
    p.add_argument("--ct", required=True, help="CT file or DICOM series folder")
    p.add_argument("--series", help="SeriesInstanceUID, when the DICOM folder holds several series")
    p.add_argument("--vertebrae", required=True,
                   help="vertebra labelmap, TotalSegmentator output (file or folder) or SPINEPS vert mask")
    p.add_argument("--subregions", help="SPINEPS subregion mask (49 + 50 = vertebral body)")
    p.add_argument("--body-mask", help="explicit vertebral-body mask on the CT grid")
    p.add_argument("--label-format", default="auto", choices=["auto", "totalsegmentator", "spineps", "plain"])
    p.add_argument("--label-table", help="value,name table for a plain labelmap (CSV/TSV or Slicer .ctbl)")
    p.add_argument("--levels", help="vertebrae to process, e.g. T10,L1 or T11-L2 (default: all present)")
    p.add_argument("--mode", default="mid", choices=["mid", "3d"],
                   help="mid: the central sagittal slice (as the paper); 3d: every sagittal slice of the body")
    p.add_argument("--allow-non-hu", action="store_true",
                   help="accept a CT whose intensities are not Hounsfield units (e.g. already normalised)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--min-lesion-voxels", type=int, metavar="N",
                   help="leave out lesions smaller than N CT voxels (default 3; 1 keeps every lesion)")
    p.add_argument("--dicom-seg", action="store_true",
                   help="also write lesions.dcm, a DICOM Segmentation referencing the input series (DICOM input only)")
    _add_run_options(p)
    p.set_defaults(handler=_run_segment)


class _ProgressPrinter:
    """Progress as a bar on stderr (one line per vertebra when stderr is not a terminal) or JSON lines on stdout."""

    def __init__(self, mode: str) -> None:
        self.mode, self.open_line, self.last_vertebra = mode, False, None

    def __call__(self, event: dict) -> None:
        if self.mode == "json":
            print(json.dumps(event), flush=True)
        elif self.mode == "bar" and event["stage"] != "done":
            if sys.stderr.isatty():
                self._bar(event)
            elif event["vertebra"] != self.last_vertebra:
                self.last_vertebra = event["vertebra"]
                print(f"vertebra {event['vertebra']}/{event['vertebrae']} {event['level']}", file=sys.stderr)

    def _bar(self, event: dict) -> None:
        eta_s = event["eta_s"]
        eta = "" if eta_s is None else f" ETA {int(eta_s) // 60}:{int(eta_s) % 60:02d}"
        filled = int(event["percent"] / 5)
        print(f"\r[{'#' * filled}{'.' * (20 - filled)}] {event['percent']:5.1f}%  vertebra {event['vertebra']}/"
              f"{event['vertebrae']} {event['level']:<4} {event['stage']:<15}{eta}   ", end="", file=sys.stderr,
              flush=True)
        self.open_line = True

    def close(self) -> None:
        """End the bar's line, so that a summary or an error starts on a line of its own."""
        if self.open_line:
            print(file=sys.stderr, flush=True)
            self.open_line = False


def _apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _run_segment(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .io import check_output_dir, dicom_series_files, read_ct
    from .outputs import write_outputs
    from .pipeline import segment_ct

    check_output_dir(args.out, args.overwrite)  # fail before the long computation, not after
    _apply_threads(args)
    ct = read_ct(args.ct, series_uid=args.series, require_hu=not args.allow_non_hu)
    series_files = dicom_series_files(ct)
    if args.dicom_seg and series_files is None:
        raise InputError(f"--dicom-seg needs a DICOM series as --ct (a DICOM SEG references its source images), "
                         f"but {args.ct} is a {Path(args.ct).suffix or 'non-DICOM'} file: omit --dicom-seg")
    if args.dicom_seg:
        from .dicomseg import check_referencable, write_dicom_seg

        check_referencable(series_files, args.ct)
    overrides = _setting_overrides(args)
    printer = _ProgressPrinter("none" if args.quiet else args.progress)
    try:
        result = segment_ct(
            ct, args.vertebrae, body_mask=args.body_mask, subregions=args.subregions, label_format=args.label_format,
            label_table=args.label_table, levels=args.levels, mode=args.mode, model=args.model, preset=args.preset,
            overrides=overrides, device=args.device, min_lesion_voxels=args.min_lesion_voxels, progress=printer,
        )
    finally:
        printer.close()
    result.run["input"]["ct"] = str(args.ct)
    extra = None
    if args.dicom_seg:

        def extra(folder):
            write_dicom_seg(result.lesions, series_files, folder / "lesions.dcm")

    out = write_outputs(result, args.out, overwrite=args.overwrite, extra=extra)
    if args.progress == "json":
        print(json.dumps({"stage": "done", "out": str(out)}), flush=True)
    elif not args.quiet:
        _print_summary(result.report(), out)
    return 0


def _print_summary(report: dict, out) -> None:
    for v in report["vertebrae"]:
        if v["status"] != "ok":
            print(f"  {v['level']:<4} {v['status']}")
            continue
        print(f"  {v['level']:<4} P(malignant) {v['p_malignant']:.2f}   lytic {v['n_lytic']} "
              f"({v['lytic_volume_mm3']:.0f} mm³)   blastic {v['n_blastic']} ({v['blastic_volume_mm3']:.0f} mm³)")
    print(f"wrote {out}/: lesions.nii.gz, lesions.seg.nrrd, report.json, report.csv, overview.png")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a diffusion autoencoder + latent classifier from vertebra-level labels into a model bundle",
        description="Trains on the sagittal slices of every vertebra in a manifest CSV (columns ct, vertebrae, "
        "label, malignant; optional body, lesions, mimics — see hideseek/dataset.py). Resumable: run the same "
        "command again to continue from --state. A GPU is used when present (--device auto).",
    )
    p.add_argument("--manifest", required=True, help="manifest CSV (e.g. from 'hideseek phantom')")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--state", required=True, help="folder for the resumable training state")
    p.add_argument("--slices", help="cache of extracted slices (.npz): read when it exists, else written")
    p.add_argument("--steps", type=int, default=20000, help="total training steps of the run (default 20000)")
    p.add_argument("--time-budget", type=float, help="stop after this many minutes (state is saved; resume later)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lr-decay-from", type=int, metavar="STEP",
                   help="from this step, decay the learning rate (cosine) to --lr-final at --steps (default: constant)")
    p.add_argument("--lr-final", type=float, default=2e-6, help="learning rate at the last step of a decay")
    p.add_argument("--high-noise-fraction", type=float, default=0.5,
                   help="share of each batch trained at t >= T/2, where only z can carry the image (default 0.5)")
    p.add_argument("--classifier-c", type=float, default=0.01,
                   help="L2 strength of the latent classifier (sklearn's C; default 0.01 as published; 0 = by CV)")
    p.add_argument("--edit-direction", choices=("normal", "class-means", "per-kind"),
                   help="calibrate the healthy edit along this direction only: the classifier's normal, the "
                   "difference of the class means, or one difference per lesion type (needs lesion truth; default: "
                   "every direction the data allows competes on validation F1)")
    p.add_argument("--x0-weight-max", type=float, default=1.0,
                   help="weight samples by min(1/SNR(t), this): >1 pushes the decoder to use z (default 1: plain)")
    p.add_argument("--label-weight", type=float, default=0.0,
                   help="weight of a logistic loss on z against the vertebra labels, so that z must carry what makes "
                   "a vertebra malignant (default 0: the published, label-free DAE objective)")
    p.add_argument("--label-dropout", type=float, default=0.0,
                   help="share of z's channels hidden from the label head at each step (0 <= rate < 1; default 0), "
                   "so that the head cannot memorise the slices through a few channels")
    p.add_argument("--body-weight", type=float, default=1.0,
                   help="weight of the denoising error inside the vertebral body against a pixel outside it "
                   "(>= 1; default 1: every pixel alike), so that z spends more of itself on the bone")
    p.add_argument("--eval-every", type=int, default=1000,
                   help="steps between learning-curve points (the step a run stops at gets one too)")
    p.add_argument("--keep-snapshots", action="store_true",
                   help="also keep the EMA weights of every learning-curve point in STATE/snapshots/ (one weights "
                   "file each, not needed to resume), so the best point can be exported later")
    p.add_argument("--export-snapshot", type=int, metavar="STEP",
                   help="write the bundle from the snapshot of this learning-curve point instead of training "
                   "(the state is left as it is)")
    p.add_argument("--intensity", default="hu_window", choices=["hu_window", "hu_curve", "percentile"],
                   help="how HU become model intensities: hu_window (-200..1200 HU on a straight line, default), "
                   "hu_curve (the same span with 0..400 HU stretched, for more lytic contrast), or percentile "
                   "(per slice, as the published model)")
    p.add_argument("--name", default="hideseek-model", help="model name recorded in the bundle")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-bf16", action="store_true",
                   help="train and export in float32 (default: bf16 autocast where the CPU or GPU runs it natively)")
    p.add_argument("--card", help="JSON file with the model card's prose: summary, intended_use, licence, limitations, "
                   "and data_commands (the command lines that made the training data)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    p.set_defaults(handler=_run_train)


def _extracting(what: str) -> Callable[[int, int], None]:
    """Slice-extraction progress on one stderr line, ended when the last vertebra is done."""
    return lambda i, n: print(f"\rextracting {what}: vertebra {i}/{n}", end="\n" if i == n else "",
                              file=sys.stderr, flush=True)


def _run_train(args: argparse.Namespace) -> int:
    from .bundle import check_replaceable
    from .calibration import CLASS_MEANS, KIND_MEANS, NORMAL
    from .dataset import cached_slice_set
    from .device import resolve_device
    from .preprocessing import PHANTOM_CURVE, PHANTOM_WINDOW, Preprocessing
    from .training import TrainConfig, check_resume_preprocessing, train_bundle

    if args.lr_decay_from is not None and not 0 <= args.lr_decay_from < args.steps:
        raise InputError(f"--lr-decay-from {args.lr_decay_from} must be a step before --steps {args.steps}")
    if not 0 < args.lr_final <= args.lr:
        raise InputError(f"--lr-final {args.lr_final} must be positive and at most --lr {args.lr}")
    if not (math.isfinite(args.label_weight) and args.label_weight >= 0):
        raise InputError(f"--label-weight {args.label_weight} must be 0 or a positive number")
    if not 0 <= args.label_dropout < 1:
        raise InputError(f"--label-dropout {args.label_dropout} must be at least 0 and below 1")
    if not (math.isfinite(args.body_weight) and args.body_weight >= 1):
        raise InputError(f"--body-weight {args.body_weight} must be a number of at least 1")
    _apply_threads(args)
    card_text = _read_card_text(args.card) if args.card else None
    prep = {"hu_window": PHANTOM_WINDOW, "hu_curve": PHANTOM_CURVE}.get(args.intensity, Preprocessing())
    check_resume_preprocessing(args.state, prep)  # before minutes of slice extraction
    check_replaceable(args.out, args.overwrite)
    slices = cached_slice_set(args.manifest, prep, args.slices, progress=_extracting("slices"))
    print(f"{len(slices)} slices of {len(slices.names)} vertebrae ({slices.malignant.mean():.0%} malignant)",
          file=sys.stderr)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      high_noise_fraction=args.high_noise_fraction, x0_weight_max=args.x0_weight_max,
                      lr_decay_from=args.lr_decay_from, lr_final=args.lr_final, label_weight=args.label_weight,
                      label_dropout=args.label_dropout, body_weight=args.body_weight, bf16=not args.no_bf16)

    out = train_bundle(
        slices, args.out, args.state, cfg, prep, device=resolve_device(args.device),
        time_budget_s=None if args.time_budget is None else 60 * args.time_budget,
        classifier_C=args.classifier_c or None, eval_every=args.eval_every, name=args.name,
        provenance={"manifest": str(args.manifest), "command": args.command_line},
        progress=_print_training, overwrite=args.overwrite, card_text=card_text,
        keep_snapshots=args.keep_snapshots, from_snapshot=args.export_snapshot,
        edit_direction=args.edit_direction and {"normal": NORMAL, "class-means": CLASS_MEANS,
                                                "per-kind": KIND_MEANS}[args.edit_direction],
    )
    print(f"\nwrote model bundle {out}", file=sys.stderr)
    return 0


def _print_training(record: dict) -> None:
    """One progress record of `hideseek train`: steps and export progress redraw their line, the rest add one."""
    def eta() -> str:
        if record["eta_s"] is None:  # not measured yet
            return ""
        return f"ETA {int(record['eta_s']) // 3600}:{int(record['eta_s']) % 3600 // 60:02d}h  "

    if "eval" in record:
        print(f"\n  eval {json.dumps(record['eval'])}", file=sys.stderr, flush=True)
    elif "done" in record:
        print(f"\r  candidate settings {record['done']}/{record['total']}  {eta()}", end="", file=sys.stderr,
              flush=True)
    elif "export" in record:
        print(f"\nexport: {record['export']}", file=sys.stderr, flush=True)
    else:
        label = f"label loss {record['label_loss']:.3f}  " if "label_loss" in record else ""
        print(f"\rstep {record['step']}/{record['steps']}  loss {record['loss']:.4f}  {label}{eta()}",
              end="", file=sys.stderr, flush=True)


def _read_card_text(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            text = json.load(fh)
    except (OSError, ValueError) as exc:
        raise InputError(f"--card {path}: cannot read it as JSON ({exc})") from exc
    allowed = {"summary", "intended_use", "licence", "limitations"}
    commands = text.pop("data_commands", []) if isinstance(text, dict) else []
    if not isinstance(text, dict) or not set(text) <= allowed or not all(isinstance(v, str) for v in text.values()):
        raise InputError(f"--card {path}: must be a JSON object with text fields among {', '.join(sorted(allowed))}"
                         " (and an optional list 'data_commands')")
    if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
        raise InputError(f"--card {path}: 'data_commands' must be a list of command lines")
    return text | ({"provenance": {"commands": commands}} if commands else {})


def _add_phantom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "phantom",
        help="generate synthetic spine CTs with vertebral metastases, benign mimics and exact lesion masks",
        description="Writes <case>_ct/_vertebrae/_body/_lesions/_mimics.nii.gz (+ _mimics.json) per case and a "
        "manifest.csv with one row per vertebra (the format 'hideseek train' reads). Deterministic for a seed; "
        "see docs/phantom.md for what is simulated.",
    )
    p.add_argument("--out", required=True, help="folder to create (refused when it exists and is not empty)")
    p.add_argument("--cases", type=int, required=True, help="number of cases")
    p.add_argument("--seed", type=int, required=True, help="seed of the whole set (per-case seeds go in the manifest)")
    p.add_argument("--levels", default="T11,T12,L1,L2,L3", help="contiguous levels, comma-separated (T1..L5)")
    p.add_argument("--lesion-rate", type=float, default=0.5, help="probability that a vertebra is malignant")
    p.add_argument("--mimic-rate", type=float, default=0.33, help="probability that a vertebra carries benign mimics")
    p.add_argument("--lytic-hu", default="20,60", metavar="LOW,HIGH",
                   help="HU range of lytic lesions (default 20,60: soft tissue); darker for a training curriculum "
                        "(a negative LOW needs the = form: --lytic-hu=-40,0)")
    p.add_argument("--lytic-min-mm", type=float, default=3.0, metavar="MM",
                   help="smallest lytic lesion diameter (default 3; at most 20), larger for a training curriculum")
    p.add_argument("--lesion-kinds", choices=("both", "lytic", "blastic"), default="both",
                   help="lesion kinds of a malignant vertebra (default both: lytic, blastic or mixed); one kind "
                        "only for a training curriculum")
    p.add_argument("--overwrite", action="store_true", help="replace an existing phantom set in --out")
    p.set_defaults(handler=_run_phantom)


def _run_phantom(args: argparse.Namespace) -> int:
    from .phantom import write_phantom_set

    levels = tuple(name.strip().upper() for name in args.levels.split(",") if name.strip())
    try:
        lytic_hu = tuple(float(v) for v in args.lytic_hu.split(","))
    except ValueError:
        raise InputError(f"--lytic-hu {args.lytic_hu!r} must be two numbers, e.g. 0,20") from None
    manifest = write_phantom_set(
        args.out, args.cases, args.seed, overwrite=args.overwrite, report=print, levels=levels,
        lesion_rate=args.lesion_rate, mimic_rate=args.mimic_rate, lytic_hu=lytic_hu, lytic_min_mm=args.lytic_min_mm,
        lesion_kinds=args.lesion_kinds,
    )
    print(f"wrote manifest {manifest}")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score Hide-and-Seek and three baselines against lesion truth (e.g. a held-out phantom set)",
        description="Runs the model on the mid-sagittal slice of every vertebra of a manifest with a 'lesions' "
        "column, tunes the baselines' thresholds on a validation split of the vertebrae, and scores every method on "
        "the rest: lesion F1, Dice, mimic false positives, classifier AUC, 95 % bootstrap intervals. Writes "
        "metrics.json, table.md and examples.png to --out.",
    )
    p.add_argument("--manifest", required=True, help="manifest CSV with lesions (and mimics) columns")
    p.add_argument("--out", required=True, help="folder to write (refused when it exists, unless --overwrite)")
    p.add_argument("--val-fraction", type=float, default=0.25, help="vertebrae used to tune the baselines")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split and the bootstrap")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--slices", help="cache of the extracted mid slices (.npz): read when it exists, else written")
    _add_model_options(p)
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .attribution import HideAndSeek
    from .bundle import load_bundle
    from .dataset import cached_slice_set
    from .device import resolve_device
    from .evaluation import evaluate, examples_figure, markdown_table
    from .io import atomic_output_dir, check_output_dir
    from .pipeline import default_model_path, resolve_settings

    _apply_threads(args)
    check_output_dir(args.out, args.overwrite)
    bundle = load_bundle(args.model or default_model_path(), device=resolve_device(args.device))
    overrides = _setting_overrides(args)
    preset, settings = resolve_settings(bundle, args.preset, overrides)
    data = cached_slice_set(args.manifest, bundle.preprocessing, args.slices, mode="mid",
                            progress=_extracting("mid slices"))
    if not data.lesions.any():
        raise InputError(f"{args.manifest}: no lesion truth (a 'lesions' column with non-empty masks) to score")
    method = HideAndSeek(bundle.dae, bundle.diffusion, bundle.classifier, settings)
    result = evaluate(bundle, data, method, val_fraction=args.val_fraction, seed=args.seed, reps=args.bootstrap,
                      progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    report = {"model": bundle.identity(),
              "preset": preset, "settings": settings.to_dict(), "manifest": str(args.manifest),
              "command": args.command_line, **result.report}
    table = markdown_table(result.report)
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        (tmp / "table.md").write_text(table, encoding="utf-8")
        examples_figure(result, data, tmp / "examples.png")
    print(table)
    ranking = result.report["delta ranking (test candidates)"]
    auc = "n/a" if ranking["delta auc"] is None else f"{ranking['delta auc']:.3f}"
    print(f"classifier AUC {result.report['classifier auc']:.3f}; Δ ranks candidates on true lesions with AUC {auc} "
          f"({ranking['on a true lesion']} of {ranking['candidates']}); wrote {args.out}/: metrics.json, table.md, "
          "examples.png")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="segment a built-in synthetic CT with the bundled model and compare with its known lesions",
        description="Generates a phantom CT (T12-L3 with lytic, blastic and mixed metastases and benign mimics), "
        "runs 'segment' on it and writes the usual outputs plus input/ (the CT, its vertebra labels and the lesion "
        "truth, to open in 3D Slicer) and demo.json (truth beside findings).",
    )
    p.add_argument("--out", default="hideseek-demo", help="output folder (default: ./hideseek-demo)")
    _add_run_options(p)
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _apply_threads(args)
    overrides = _setting_overrides(args)
    printer = _ProgressPrinter("none" if args.quiet else args.progress)
    try:
        result, comparison = run_demo(args.out, overwrite=args.overwrite, model=args.model, preset=args.preset,
                                      overrides=overrides, device=args.device, progress=printer)
    finally:
        printer.close()
    if args.quiet:
        return 0
    print(f"model {result.run['model']['name']} ({result.run['model']['path']}), preset {result.run['preset']}, "
          f"{result.run['timing_s']['total']:.0f} s")
    print("vertebra  truth (lytic/blastic, mimics)            found (lytic/blastic)   P(malignant)")
    for row in comparison["vertebrae"]:
        truth = f"{row['truth_lytic']}/{row['truth_blastic']}  {', '.join(row['mimics']) or '-'}"
        p = "-" if row["p_malignant"] is None else f"{row['p_malignant']:.2f}"
        print(f"  {row['level']:<6}  {truth:<40} {row['found_lytic']}/{row['found_blastic']:<20}  {p}")
    print(f"wrote {args.out}/: overview.png (look here first), lesions.seg.nrrd (open with input/ct.nii.gz in 3D "
          "Slicer), lesions.nii.gz, report.json, report.csv, demo.json, input/")
    return 0


def _add_batch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch",
        help="segment a cohort listed in a CSV (resumable; local processes or a Dask cluster)",
        description="One output folder per case in --out, a log per case in --out/logs and --out/summary.csv. "
        "Finished cases (with report.json) are skipped, so run the same command again to resume or to retry "
        "failed cases. Manifest columns: ct, vertebrae [, case, subregions, body_mask, label_format, levels].",
    )
    p.add_argument("manifest", help="CSV with one row per case (or per vertebra: rows of one case are merged)")
    p.add_argument("--out", required=True, help="output folder (created; existing results are kept and skipped)")
    p.add_argument("--mode", default="mid", choices=["mid", "3d"], help="as in 'hideseek segment'")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument("--scheduler", help="address of a Dask distributed scheduler (tcp://host:8786) instead of "
                   "local processes; workers need hideseek installed and the files at the same paths")
    _add_model_options(p)
    p.set_defaults(handler=_run_batch)


def _run_batch(args: argparse.Namespace) -> int:
    from .batch import RunOptions, run_batch

    options = RunOptions(model=args.model, preset=args.preset, overrides=_setting_overrides(args),
                         mode=args.mode, device=args.device, threads=args.threads)
    counts: dict[str, int] = {}

    def report(row: dict) -> None:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        detail = row.get("error") or (f"{row.get('n_lytic', 0)} lytic, {row.get('n_blastic', 0)} blastic in "
                                      f"{row.get('seconds')} s" if row["status"] == "done" else "")
        print(f"{row['case']}: {row['status']}{' - ' + detail if detail else ''}", flush=True)

    summary = run_batch(args.manifest, args.out, options, workers=args.workers, scheduler=args.scheduler,
                        report=report)
    print(f"{', '.join(f'{n} {s}' for s, n in counts.items()) or 'nothing to do'}; summary: {summary}")
    return 1 if counts.get("failed") else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hideseek",
        description="Hide-and-Seek Attribution: lytic and blastic vertebral metastases in CT, from a model "
        "trained only on vertebra-level labels.",
    )
    parser.add_argument("--version", action="version", version=f"hideseek {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in (_add_demo, _add_segment, _add_batch, _add_phantom, _add_train, _add_evaluate, _add_import_published):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a terminal without UTF-8 must not crash on "mm³" or "Δ"
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = "hideseek " + shlex.join(argv)  # recorded in bundles and reports: how to reproduce them
    try:
        return int(args.handler(args) or 0)
    except HideSeekError as exc:
        print(f"hideseek: error: {exc}", file=sys.stderr)
        return 2
    except Cancelled:
        print("hideseek: cancelled; nothing was written", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("hideseek: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
