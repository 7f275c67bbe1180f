"""One-time conversion of the authors' published Hide-and-Seek files into a model bundle.

Inputs: the PyTorch Lightning checkpoint ``last.ckpt`` (Hugging Face ``matanatad/dae_verts``) and the two
joblib pickles ``classifier_lr.pkl`` / ``scaler.pkl`` (github.com/matanat/hide_and_seek, ``checkpoints/``).
The checkpoint is read with ``torch.load(weights_only=True)``, which cannot run code; the scikit-learn pickles
can, so they are read only here, after a warning, and the bundle keeps nothing but their numbers.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .bundle import build_dae, file_sha256, save_bundle
from .classifier import LatentClassifier
from .errors import InputError
from .network import DAEConfig, DiffusionAutoencoder
from .preprocessing import PUBLISHED_PREPROCESSING
from .sampler import DiffusionConfig

EMA_PREFIX = "ema_model."
"""The published weights to use are the exponential moving average, stored under this state_dict prefix."""

PUBLISHED_ARCHITECTURE = DAEConfig(
    image_size=64,
    in_channels=1,
    out_channels=1,
    model_channels=64,
    channel_mult=(1, 2, 4, 8),
    num_res_blocks=2,
    attention_resolutions=(16,),
    num_heads=1,
    embed_channels=512,
    enc_out_channels=512,
    enc_channel_mult=(1, 2, 4, 8, 8),
    enc_num_res_block=2,
    enc_pool="adaptivenonzero",
    resblock_updown=True,
    resnet_two_cond=True,
    dropout=0.1,
    dims=2,
)
"""The authors' 'fxclass64' DAE: 90,835,777 parameters."""

PUBLISHED_DIFFUSION = DiffusionConfig(T=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_x0=True)

SOURCES = {
    "paper": "arXiv:2512.06849",
    "code": "https://github.com/matanat/hide_and_seek",
    "weights": "https://huggingface.co/matanatad/dae_verts",
}
_DOWNLOAD_HINT = {
    "checkpoint": "download last.ckpt from Hugging Face matanatad/dae_verts",
    "classifier": "download checkpoints/classifier_lr.pkl from github.com/matanat/hide_and_seek",
    "scaler": "download checkpoints/scaler.pkl from github.com/matanat/hide_and_seek",
}


def _existing_file(path: str | Path, role: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{role} file {p} not found: {_DOWNLOAD_HINT[role]}")
    return p


def _load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike for unreadable files
        raise InputError(
            f"{path} cannot be read as a safe PyTorch checkpoint ({type(exc).__name__}: {exc}); "
            f"{_DOWNLOAD_HINT['checkpoint']}"
        ) from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        found = sorted(map(str, ckpt))[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise InputError(
            f"{path} is not a PyTorch Lightning checkpoint: it has no 'state_dict' (found {found}); "
            f"{_DOWNLOAD_HINT['checkpoint']}"
        )
    return ckpt


def _ema_weights(ckpt: dict, path: Path) -> dict[str, torch.Tensor]:
    """The ``ema_model.*`` tensors with the prefix stripped."""
    state = ckpt["state_dict"]
    ema = {key[len(EMA_PREFIX) :]: value for key, value in state.items() if key.startswith(EMA_PREFIX)}
    if not ema:
        prefixes = sorted({key.split(".", 1)[0] for key in state})[:6]
        raise InputError(
            f"{path} holds no '{EMA_PREFIX}*' weights (its state_dict prefixes: {prefixes}): it is not the "
            f"published Hide-and-Seek DAE; {_DOWNLOAD_HINT['checkpoint']}"
        )
    if not all(isinstance(value, torch.Tensor) for value in ema.values()):
        raise InputError(f"{path}: some '{EMA_PREFIX}*' entries are not tensors; {_DOWNLOAD_HINT['checkpoint']}")
    return ema


def _published_dae(ema: dict[str, torch.Tensor], path: Path) -> DiffusionAutoencoder:
    try:
        return build_dae(PUBLISHED_ARCHITECTURE, ema)
    except ValueError as exc:
        raise InputError(
            f"{path} does not match the published DAE architecture: {exc}; {_DOWNLOAD_HINT['checkpoint']}"
        ) from exc


def _training_record(ckpt: dict) -> dict:
    """Epoch, step and the plain scalar hyper-parameters of the checkpoint, for the model card."""
    record: dict = {}
    for key in ("epoch", "global_step"):
        value = ckpt.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            record[key] = value
    hparams = ckpt.get("hyper_parameters")
    if isinstance(hparams, dict):
        record["hyper_parameters"] = {
            str(k): v
            for k, v in hparams.items()
            if isinstance(v, (str, int, bool)) or (isinstance(v, float) and np.isfinite(v))
        }
    return record


def _unpickle(path: Path, role: str) -> object:
    try:
        import joblib
        from sklearn.exceptions import InconsistentVersionWarning
    except ImportError as exc:
        raise InputError(
            "reading the published classifier needs scikit-learn and joblib: pip install hideseek[import]"
        ) from exc
    try:
        with warnings.catch_warnings():
            # Only the fitted arrays are kept (and checked below), so a newer scikit-learn does no harm here.
            warnings.simplefilter("ignore", InconsistentVersionWarning)
            return joblib.load(path)
    except Exception as exc:  # unpickling can fail in many ways; all mean the same for the user
        raise InputError(f"{path} cannot be read as a joblib pickle ({type(exc).__name__}: {exc}); "
                         f"{_DOWNLOAD_HINT[role]}") from exc


def _vector_attr(obj: object, attr: str, path: Path, role: str, dim: int) -> np.ndarray:
    value = getattr(obj, attr, None)
    arr = None if value is None else np.asarray(value, dtype=np.float64).ravel()
    if arr is None or arr.shape != (dim,):
        shape = None if arr is None else arr.shape
        raise InputError(
            f"{path}: {type(obj).__name__}.{attr} should hold {dim} values, found {shape}; "
            f"check that --classifier and --scaler are not swapped ({_DOWNLOAD_HINT[role]})"
        )
    return arr


def _published_classifier(classifier_path: Path, scaler_path: Path) -> tuple[LatentClassifier, dict]:
    """Numbers of the scikit-learn LogisticRegression and StandardScaler, and a short record of the fit."""
    print(
        f"hideseek: warning: unpickling {classifier_path} and {scaler_path} can execute arbitrary code; "
        "convert only files you trust (from github.com/matanat/hide_and_seek)",
        file=sys.stderr,
    )
    clf = _unpickle(classifier_path, "classifier")
    scaler = _unpickle(scaler_path, "scaler")
    dim = PUBLISHED_ARCHITECTURE.enc_out_channels
    classes = np.asarray(getattr(clf, "classes_", []))
    if classes.size != 2:
        raise InputError(
            f"{classifier_path} is not a fitted binary classifier (classes {classes.tolist()}); "
            f"check that --classifier and --scaler are not swapped ({_DOWNLOAD_HINT['classifier']})"
        )
    coef = _vector_attr(clf, "coef_", classifier_path, "classifier", dim)
    intercept = _vector_attr(clf, "intercept_", classifier_path, "classifier", 1)
    mean = _vector_attr(scaler, "mean_", scaler_path, "scaler", dim)
    scale = _vector_attr(scaler, "scale_", scaler_path, "scaler", dim)
    try:
        classifier = LatentClassifier(coef=coef, intercept=float(intercept[0]), mean=mean, scale=scale)
    except ValueError as exc:
        raise InputError(f"{classifier_path} / {scaler_path}: unusable classifier: {exc}") from exc
    n_seen = getattr(scaler, "n_samples_seen_", None)
    fit = {
        "source": "scikit-learn LogisticRegression + StandardScaler (published pickles)",
        "C": float(clf.C) if isinstance(getattr(clf, "C", None), (int, float)) else None,
        "penalty": str(getattr(clf, "penalty", "")),
        "solver": str(getattr(clf, "solver", "")),
        "classes": [str(c) for c in classes],
        "n_samples": int(n_seen) if n_seen is not None and np.ndim(n_seen) == 0 else None,
    }
    return classifier, fit


def import_published(
    checkpoint: str | Path, classifier_pkl: str | Path, scaler_pkl: str | Path, out_dir: str | Path
) -> Path:
    """Convert the published checkpoint and classifier pickles into a new bundle folder ``out_dir``."""
    paths = {
        "checkpoint": _existing_file(checkpoint, "checkpoint"),
        "classifier": _existing_file(classifier_pkl, "classifier"),
        "scaler": _existing_file(scaler_pkl, "scaler"),
    }
    out = Path(out_dir)
    if out.exists():
        raise InputError(f"{out} already exists: choose a new folder for the bundle")

    ckpt = _load_checkpoint(paths["checkpoint"])
    ema = _ema_weights(ckpt, paths["checkpoint"])
    training = _training_record(ckpt)
    del ckpt  # drops the raw model copy and optimizer state (about 1 GB) before the network is built
    dae = _published_dae(ema, paths["checkpoint"])
    del ema

    classifier, fit = _published_classifier(paths["classifier"], paths["scaler"])
    n_samples = f"{fit['n_samples']} " if fit["n_samples"] is not None else ""
    card = {
        "summary": "The published Hide-and-Seek diffusion autoencoder (EMA weights) and latent classifier "
        "for vertebral metastases in CT, converted from the authors' release.",
        "intended_use": "research; not for clinical use",
        "licence": "MIT (authors' release)",
        "provenance": {
            **SOURCES,
            "source_files": {
                role: {"file": path.name, "sha256": file_sha256(path)} for role, path in paths.items()
            },
            "converted_by": f"hideseek {__version__} import-published",
        },
        "training": training,
        "metrics": {},
        "limitations": f"The classifier was fitted on {n_samples}vertebrae of the authors' data; 64x64 "
        "sagittal slices with per-slice percentile normalisation. Behaviour on other scanners, protocols "
        "and populations is unknown.",
    }
    return save_bundle(
        out,
        dae,
        PUBLISHED_DIFFUSION,
        PUBLISHED_PREPROCESSING,
        classifier,
        name="hideseek-published",
        version="1.0",
        method={"default_preset": "published"},
        card=card,
        fit_info=fit,
    )
