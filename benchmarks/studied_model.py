"""The model a benchmark script studies: a bundle, or a training run's kept learning-curve point (``--snapshot``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from hideseek.bundle import load_bundle
from hideseek.classifier import LatentClassifier
from hideseek.errors import HideSeekError
from hideseek.network import DiffusionAutoencoder
from hideseek.pipeline import default_model_path
from hideseek.preprocessing import Preprocessing
from hideseek.sampler import DiffusionConfig
from hideseek.training import load_snapshot


@dataclass
class StudiedModel:
    dae: DiffusionAutoencoder
    diffusion: DiffusionConfig  # a snapshot's is the default schedule, which every training run uses
    preprocessing: Preprocessing
    classifier: LatentClassifier | None  # a snapshot has none: it was never exported
    name: str
    version: str


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="bundle (default: the bundled demo model)")
    parser.add_argument("--snapshot", nargs=2, metavar=("STATE", "STEP"),
                        help="study the EMA of a training state's kept learning-curve point instead of a bundle")


def load_studied(args: argparse.Namespace, parser: argparse.ArgumentParser) -> StudiedModel:
    """The model named by ``--model`` / ``--snapshot``; a bad name ends the script with the reason."""
    if not args.snapshot:
        try:
            bundle = load_bundle(args.model or default_model_path())
        except HideSeekError as err:
            parser.error(str(err))
        return StudiedModel(bundle.dae, bundle.diffusion, bundle.preprocessing, bundle.classifier, bundle.name,
                            bundle.version)
    state, step = args.snapshot
    if not step.isdigit():
        parser.error(f"--snapshot STATE STEP: the step is a whole number (e.g. 3000), not {step!r}")
    try:
        dae, preprocessing = load_snapshot(state, int(step))
    except HideSeekError as err:
        parser.error(str(err))
    return StudiedModel(dae, DiffusionConfig(), preprocessing, None, str(state), step)
