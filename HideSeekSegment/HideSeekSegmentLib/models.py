"""The model picker's list: bundle folders (``model.json`` + ``model.safetensors``) and their model cards.

Listing must work before torch is installed (the user should see the licence and intended use before agreeing to
download gigabytes), so this reads only the JSON; ``hideseek.bundle`` imports torch and is left to the worker,
which validates the whole bundle (checksum, architecture) when the run starts. The folder layout follows
docs/model-bundle.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hideseek.errors import BundleError

MANIFEST_NAME = "model.json"
WEIGHTS_NAME = "model.safetensors"
BUNDLE_FORMAT = "hideseek-bundle"
SEARCH_DEPTH = 2
"""Bundles are found in a chosen folder and up to this many levels below it."""
BUNDLED_MODELS = Path(__file__).resolve().parents[2] / "models"
"""The extension's own ``models`` folder: the repository's top level in a checkout, ``lib/Slicer-X.Y/models`` in
an installed extension (both sit beside the folder that holds the module file)."""


@dataclass(frozen=True)
class ModelCard:
    """What the GUI shows about a bundle before it is used."""

    path: Path
    name: str
    version: str
    summary: str
    licence: str
    intendedUse: str
    limitations: str
    deltaThresholds: dict[str, float] = field(default_factory=dict)
    """Per preset, the Δ threshold the model was tuned with (``method.presets``); absent where it was not."""
    gates: dict[str, float] = field(default_factory=dict)
    """Per preset, the P(malignant) below which the model leaves a slice unsearched; absent where it has none."""

    @property
    def title(self) -> str:
        return f"{self.name} {self.version}".strip()

    def describe(self) -> str:
        """Plain text for the model card box: licence and intended use first, as users must check them."""
        lines = [
            f"Licence: {self.licence or 'not stated'}",
            f"Intended use: {self.intendedUse or 'not stated'}",
        ]
        if self.summary:
            lines.append(self.summary)
        if self.limitations:
            lines.append(f"Limitations: {self.limitations}")
        lines += [f"Preset {preset}: only slices scored above P(malignant) {gate:g} are searched for lesions"
                  " (tick 'Search vertebrae the model scores as healthy' to search all)."
                  for preset, gate in sorted(self.gates.items())]
        lines.append(f"Folder: {self.path}")
        return "\n".join(lines)


def findModels(roots: Iterable[str | Path] = (BUNDLED_MODELS,)) -> list[ModelCard]:
    """Every readable bundle in or below the given folders, sorted by title; unreadable ones are left out."""
    cards = {}
    for folder in _bundleFolders(roots):
        try:
            cards[folder] = readModelCard(folder)
        except BundleError:
            continue
    return sorted(cards.values(), key=lambda card: (card.title.lower(), str(card.path)))


def readModelCard(folder: str | Path) -> ModelCard:
    """Read a bundle's card; BundleError names the folder and the fix when it is not a usable bundle."""
    folder = Path(folder)
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise BundleError(f"{folder} is not a model bundle: it needs {MANIFEST_NAME} and {WEIGHTS_NAME}")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{manifest}: cannot read it ({exc}); re-download or re-export the bundle") from exc
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{manifest}: not a {BUNDLE_FORMAT} manifest; re-download or re-export the bundle")
    card = data.get("card") if isinstance(data.get("card"), dict) else {}
    return ModelCard(
        path=folder.absolute(),
        name=str(data.get("name", folder.name)),
        version=str(data.get("version", "")),
        summary=str(card.get("summary", "")),
        licence=str(card.get("licence", "")),
        intendedUse=str(card.get("intended_use", "")),
        limitations=str(card.get("limitations", "")),
        deltaThresholds=_tuned(data.get("method"), "delta_threshold", lambda v: 0.0 <= v <= 1.0),
        gates=_tuned(data.get("method"), "gate_probability", lambda v: 0.0 < v < 1.0),
    )


def _tuned(method, setting: str, valid: Callable[[float], bool]) -> dict[str, float]:
    """Per preset, one numeric setting of ``method.presets``; missing, non-numeric or invalid values are left out."""
    presets = method.get("presets") if isinstance(method, dict) else None
    if not isinstance(presets, dict):
        return {}
    tuned = {}
    for preset, settings in presets.items():
        value = settings.get(setting) if isinstance(settings, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool) and valid(value):
            tuned[str(preset)] = float(value)
    return tuned


def _bundleFolders(roots: Iterable[str | Path]) -> set[Path]:
    found = set()
    for root in roots:
        pending = [(Path(root).absolute(), SEARCH_DEPTH)]
        while pending:
            folder, depth = pending.pop()
            if (folder / MANIFEST_NAME).is_file():
                found.add(folder)
            elif depth > 0 and folder.is_dir():
                children = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
                pending += [(child, depth - 1) for child in children]
    return found
