"""The `hideseek` command line. Each subcommand parses its arguments here and calls the engine's library API.

Heavy modules are imported inside the handlers so that `hideseek --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__
from .errors import Cancelled, HideSeekError


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
    """Options shared by every command that runs the model."""
    p.add_argument("--model", help="model bundle folder (default: $HIDESEEK_MODEL or the bundled demo model)")
    p.add_argument("--preset", choices=["fast", "published"], help="method preset (default: the model's own)")
    p.add_argument("--delta-threshold", type=float, help="keep candidates whose Δ score is above this (0..1)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda (default: auto)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--progress", choices=["bar", "json", "none"], default="bar",
                   help="progress on stderr as a bar, as JSON lines on stdout (for scripts), or none")
    p.add_argument("--quiet", action="store_true", help="print only errors (same as --progress none, no summary)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


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
    from .io import check_output_dir, read_ct
    from .outputs import write_outputs
    from .pipeline import segment_ct

    check_output_dir(args.out, args.overwrite)  # fail before the long computation, not after
    _apply_threads(args)
    ct = read_ct(args.ct, series_uid=args.series, require_hu=not args.allow_non_hu)
    overrides = {} if args.delta_threshold is None else {"delta_threshold": args.delta_threshold}
    printer = _ProgressPrinter("none" if args.quiet else args.progress)
    try:
        result = segment_ct(
            ct, args.vertebrae, body_mask=args.body_mask, subregions=args.subregions, label_format=args.label_format,
            label_table=args.label_table, levels=args.levels, mode=args.mode, model=args.model, preset=args.preset,
            overrides=overrides, device=args.device, progress=printer,
        )
    finally:
        printer.close()
    result.run["input"]["ct"] = str(args.ct)
    out = write_outputs(result, args.out, overwrite=args.overwrite)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hideseek",
        description="Hide-and-Seek Attribution: lytic and blastic vertebral metastases in CT, from a model "
        "trained only on vertebra-level labels.",
    )
    parser.add_argument("--version", action="version", version=f"hideseek {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in (_add_import_published, _add_segment):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
