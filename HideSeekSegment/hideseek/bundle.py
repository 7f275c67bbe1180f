"""Model bundles: one folder = ``model.safetensors`` (weights) + ``model.json`` (everything else).

A bundle is all a run needs, offline: the weights are loaded without pickle, and the JSON records how to
rebuild the network, sample, preprocess and classify, plus a model card a GUI can show before loading.

``model.json`` (format_version 1)::

    {
      "format": "hideseek-bundle",
      "format_version": 1,
      "name": "hideseek-published",            # short identifier shown in model pickers
      "version": "1.0",                        # the model's own version (free text)
      "created_by": "hideseek 0.1.0",          # the writer; informational
      "architecture": {...},                   # DAEConfig.to_dict(); unknown keys are an error
      "diffusion": {...},                      # DiffusionConfig.to_dict()
      "preprocessing": {...},                  # Preprocessing.to_dict()
      "classifier": {"coef": [...], "intercept": x, "mean": [...], "scale": [...],
                     "fit": {...}},            # LatentClassifier.to_dict(); "fit" (optional) = how it was fitted;
                                               # "edit_direction" or "kind_directions" (optional): see the class
      "method": {...},                         # default attribution settings (free dict, e.g. "default_preset")
      "card": {"summary": str, "intended_use": str, "licence": str, "provenance": {...},
               "training": {...}, "metrics": {...}, "limitations": str},
      "weights": {"file": "model.safetensors", "sha256": "<64 hex>", "dtype": "float32",
                  "num_parameters": N}
    }

Weights are stored in float32 with the network's own key names (no prefix). Bundles are written to a hidden
temporary folder beside the target and renamed into place, so an interrupted export leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .classifier import LatentClassifier
from .device import resolve_device
from .errors import BundleError, InputError
from .io import atomic_output_dir
from .network import DAEConfig, DiffusionAutoencoder
from .preprocessing import Preprocessing
from .sampler import DiffusionConfig

FORMAT = "hideseek-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "model.json"
WEIGHTS_NAME = "model.safetensors"
REQUIRED_KEYS = (
    "format", "format_version", "name", "version", "architecture", "diffusion", "preprocessing",
    "classifier", "method", "card", "weights",
)
CARD_FIELDS: dict[str, type] = {
    "summary": str, "intended_use": str, "licence": str, "provenance": dict, "training": dict,
    "metrics": dict, "limitations": str,
}
_FIX = "re-download or re-export the bundle"


@dataclass(frozen=True, eq=False)
class ModelBundle:
    """A loaded bundle: the network (eval mode, on its device) and everything needed to use it."""

    path: Path
    manifest: dict
    dae: DiffusionAutoencoder
    diffusion: DiffusionConfig
    preprocessing: Preprocessing
    classifier: LatentClassifier
    method: dict
    card: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def identity(self) -> dict:
        """What a report records of the model: the checksum names the weights wherever the folder was."""
        return {"name": self.name, "version": self.version, "path": str(self.path),
                "weights_sha256": self.manifest["weights"]["sha256"]}


@dataclass(frozen=True)
class _Sections:
    architecture: DAEConfig
    diffusion: DiffusionConfig
    preprocessing: Preprocessing
    classifier: LatentClassifier


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str | None:
    """One line listing missing keys, unexpected keys and shape mismatches, or None when they agree."""

    def listing(label: str, items: list[str]) -> str:
        more = f" and {len(items) - 5} more" if len(items) > 5 else ""
        return f"{len(items)} {label} ({', '.join(items[:5])}{more})"

    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [
        f"{key}: {tuple(given[key].shape)} instead of {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(given))
        if tuple(given[key].shape) != tuple(expected[key].shape)
    ]
    parts = [
        listing(label, items)
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if items
    ]
    return "; ".join(parts) or None


def build_dae(cfg: DAEConfig, state_dict: Mapping[str, torch.Tensor]) -> DiffusionAutoencoder:
    """The network for ``cfg`` holding exactly these tensors (float32), strictly checked.

    It is built on the meta device and adopts the tensors, so no random initialisation runs and the weights
    are not held twice (the published DAE has 90 M parameters). Raises ValueError naming any mismatch.
    """
    with torch.device("meta"):
        model = DiffusionAutoencoder(cfg)
    problem = describe_mismatch(model.state_dict(), state_dict)
    if problem:
        raise ValueError(problem)
    tensors = {
        key: (value.float() if value.is_floating_point() else value).contiguous()
        for key, value in state_dict.items()
    }
    model.load_state_dict(tensors, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ValueError("the network has tensors outside its state_dict; they cannot be restored from weights")
    return model


def _check_card(card: object) -> dict:
    """The card with every field present (missing ones empty); unknown fields are refused, to catch typos."""
    if not isinstance(card, dict):
        raise InputError(f"card must be a dict with the fields {', '.join(CARD_FIELDS)}")
    unknown = sorted(set(card) - set(CARD_FIELDS))
    if unknown:
        raise InputError(f"unknown card fields {', '.join(unknown)}: use {', '.join(CARD_FIELDS)}")
    full = {key: card.get(key, kind()) for key, kind in CARD_FIELDS.items()}
    for key, kind in CARD_FIELDS.items():
        if not isinstance(full[key], kind):
            raise InputError(f"card field {key!r} must be a {kind.__name__}, got {type(full[key]).__name__}")
    return full


def _check_compatible(cfg: DAEConfig, preprocessing: Preprocessing, classifier: LatentClassifier) -> None:
    if classifier.dim != cfg.enc_out_channels:
        raise ValueError(
            f"the classifier has {classifier.dim} inputs but the DAE's semantic code has {cfg.enc_out_channels}"
        )
    if preprocessing.image_size != cfg.image_size:
        raise ValueError(
            f"preprocessing makes {preprocessing.image_size}-px slices but the DAE takes {cfg.image_size} px"
        )


def save_bundle(
    out_dir: str | Path,
    model: DiffusionAutoencoder,
    diffusion: DiffusionConfig,
    preprocessing: Preprocessing,
    classifier: LatentClassifier,
    *,
    name: str,
    version: str,
    method: dict | None = None,
    card: dict | None = None,
    fit_info: dict | None = None,
    overwrite: bool = False,
    extra: Callable[[Path, dict], None] | None = None,
) -> Path:
    """Write a bundle folder atomically and return its path.

    ``overwrite=True`` replaces an existing bundle (never a folder that is not one). ``fit_info`` (e.g. the
    dict from ``fit_latent_classifier``) is stored as ``classifier.fit``. ``extra(folder, manifest)`` may add
    files derived from the manifest (e.g. a Markdown model card); they land with the bundle or not at all.
    """
    out = Path(out_dir).absolute()
    for label, value in (("name", name), ("version", version)):
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"bundle {label} must be a non-empty string, got {value!r}")
    if not isinstance(model, DiffusionAutoencoder):
        raise InputError(f"model must be a DiffusionAutoencoder, got {type(model).__name__}")
    if method is not None and not isinstance(method, dict):
        raise InputError(f"method must be a dict of default settings, got {type(method).__name__}")
    try:
        _check_compatible(model.config, preprocessing, classifier)
    except ValueError as exc:
        raise InputError(f"cannot bundle these parts together: {exc}") from exc
    classifier_json = classifier.to_dict()
    if fit_info is not None:
        classifier_json["fit"] = fit_info
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "created_by": f"hideseek {__version__}",
        "architecture": model.config.to_dict(),
        "diffusion": diffusion.to_dict(),
        "preprocessing": preprocessing.to_dict(),
        "classifier": classifier_json,
        "method": dict(method or {}),
        "card": _check_card(card or {}),
        "weights": {"file": WEIGHTS_NAME, "sha256": "", "dtype": "float32", "num_parameters": model.num_parameters()},
    }
    try:  # fail before touching the disk if anything is not JSON-able
        json.dumps(manifest, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"bundle metadata (method, card or fit info) is not plain JSON: {exc}") from exc

    state = model.state_dict()

    check_replaceable(out, overwrite)
    with atomic_output_dir(out, overwrite) as folder:
        tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in state.items()}
        # one metadata key only: safetensors writes several in a random order, so identical weights would
        # get another sha256 (and a new git blob) at every export; name and version are in model.json
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        manifest["weights"]["sha256"] = file_sha256(folder / WEIGHTS_NAME)
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        read_bundle_manifest(folder)  # what we wrote must read back
        if extra is not None:
            extra(folder, manifest)
    return out


def check_replaceable(out: str | Path, overwrite: bool) -> None:
    """Refuse to replace anything but a model bundle (or an empty folder), and anything without ``overwrite``.
    Commands that work for minutes before they write a bundle call it first, so they fail before the work."""
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise InputError(f"{out} already exists: choose another folder, or allow overwriting it")
        if not out.is_dir() or not ((out / MANIFEST_NAME).is_file() or not any(out.iterdir())):
            raise InputError(f"refusing to overwrite {out}: it is not a model bundle; choose another folder")


def _locate(path: str | Path) -> tuple[Path, Path]:
    """(bundle folder, model.json) from either of them."""
    p = Path(path)
    folder = p.parent if p.name == MANIFEST_NAME and p.is_file() else p
    if not folder.is_dir():
        raise BundleError(f"model bundle {folder} does not exist; check the path or add the model folder again")
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{folder} is not a model bundle: {MANIFEST_NAME} is missing; {_FIX}")
    return folder, manifest_path


def _parse_sections(manifest: dict, where: Path) -> _Sections:
    """Check every section of a manifest and build its config objects (BundleError naming the section)."""
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{where} is not a hideseek model bundle (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        hint = "update hideseek to read it" if isinstance(version, int) and version > FORMAT_VERSION else _FIX
        raise BundleError(f"{where} has format_version {version!r}; this hideseek reads {FORMAT_VERSION}: {hint}")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise BundleError(f"{where} lacks the keys {', '.join(missing)}; {_FIX}")

    def section(key: str, parse: Callable[[object], object]) -> object:
        try:
            return parse(manifest[key])
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{where}: invalid {key!r} entry: {exc}; {_FIX}") from exc

    section("name", _nonempty_string)
    section("version", _nonempty_string)
    section("method", _json_object)
    section("card", _check_card_entry)
    section("weights", _check_weights_entry)
    parsed = _Sections(
        architecture=section("architecture", DAEConfig.from_dict),
        diffusion=section("diffusion", DiffusionConfig.from_dict),
        preprocessing=section("preprocessing", Preprocessing.from_dict),
        classifier=section("classifier", _classifier_entry),
    )
    try:
        _check_compatible(parsed.architecture, parsed.preprocessing, parsed.classifier)
    except ValueError as exc:
        raise BundleError(f"{where}: {exc}; {_FIX}") from exc
    return parsed


def _nonempty_string(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def _json_object(value: object) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object, got {type(value).__name__}")
    return value


def _check_card_entry(card: object) -> None:
    missing = [key for key in CARD_FIELDS if key not in _json_object(card)]
    if missing:
        raise ValueError(f"lacks the fields {', '.join(missing)}")


def _classifier_entry(value: object) -> LatentClassifier:
    return LatentClassifier.from_dict({k: v for k, v in _json_object(value).items() if k != "fit"})


def _check_weights_entry(value: object) -> None:
    weights = _json_object(value)
    file = weights.get("file")
    if not isinstance(file, str) or not file or Path(file).name != file or file in (".", ".."):
        raise ValueError(f"file must be a plain file name inside the bundle, got {file!r}")
    if not re.fullmatch(r"[0-9a-f]{64}", str(weights.get("sha256"))):
        raise ValueError("sha256 must be 64 lowercase hex digits")
    if weights.get("dtype") != "float32":
        raise ValueError(f"dtype must be float32, got {weights.get('dtype')!r}")
    if not isinstance(weights.get("num_parameters"), int):
        raise ValueError("num_parameters must be an integer")


def _read_manifest(path: str | Path) -> tuple[Path, Path, dict, _Sections]:
    folder, manifest_path = _locate(path)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path} is not valid JSON (line {exc.lineno}: {exc.msg}); {_FIX}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot read {manifest_path}: {exc}; {_FIX}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path} must hold a JSON object; {_FIX}")
    return folder, manifest_path, manifest, _parse_sections(manifest, manifest_path)


def read_bundle_manifest(path: str | Path) -> dict:
    """The checked ``model.json`` of a bundle (folder or file), without touching the weights: for model lists."""
    return _read_manifest(path)[2]


def load_bundle(path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> ModelBundle:
    """Load a bundle: checked manifest, checksum-verified safetensors weights, strict state_dict, eval mode."""
    folder, manifest_path, manifest, sections = _read_manifest(path)
    weights_path = folder / manifest["weights"]["file"]
    if not weights_path.is_file():
        raise BundleError(f"{folder}: the weights file {weights_path.name} is missing; {_FIX}")
    if verify and file_sha256(weights_path) != manifest["weights"]["sha256"]:
        raise BundleError(f"{weights_path}: checksum mismatch: the weights were changed or corrupted; {_FIX}")
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"{weights_path} is not a readable safetensors file ({exc}); {_FIX}") from exc
    try:
        dae = build_dae(sections.architecture, tensors)
    except ValueError as exc:
        raise BundleError(f"{weights_path} does not fit the architecture in {manifest_path}: {exc}; {_FIX}") from exc
    del tensors
    if dae.num_parameters() != manifest["weights"]["num_parameters"]:
        raise BundleError(
            f"{manifest_path}: num_parameters says {manifest['weights']['num_parameters']} but the weights "
            f"hold {dae.num_parameters()}; {_FIX}"
        )
    target = resolve_device(device) if isinstance(device, str) else torch.device(device)
    dae = dae.to(target).eval()
    return ModelBundle(
        path=folder.absolute(),
        manifest=manifest,
        dae=dae,
        diffusion=sections.diffusion,
        preprocessing=sections.preprocessing,
        classifier=sections.classifier,
        method=manifest["method"],
        card=manifest["card"],
    )


def find_bundles(*roots: str | Path, max_depth: int = 2) -> list[Path]:
    """Bundle folders (those holding a model.json) in or up to ``max_depth`` levels below each root.

    Missing roots are skipped, as are hidden folders (unfinished exports); nothing is validated here, so a
    model picker can list a broken bundle and show ``read_bundle_manifest``'s error for it.
    """
    found: set[Path] = set()
    for root in roots:
        folder = Path(root)
        if folder.is_dir():
            found.update(_walk(folder.absolute(), max_depth))
    return sorted(found)


def _walk(folder: Path, depth: int) -> Iterator[Path]:
    if (folder / MANIFEST_NAME).is_file():
        yield folder
        return
    if depth <= 0:
        return
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return
    for child in children:
        yield from _walk(child, depth - 1)
