"""The `hideseek` command line. Each subcommand parses its arguments here and calls the engine's library API.

Heavy modules are imported inside the handlers so that `hideseek --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .errors import HideSeekError


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hideseek",
        description="Hide-and-Seek Attribution: lytic and blastic vertebral metastases in CT, from a model "
        "trained only on vertebra-level labels.",
    )
    parser.add_argument("--version", action="version", version=f"hideseek {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in (_add_import_published,):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except HideSeekError as exc:
        print(f"hideseek: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hideseek: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
