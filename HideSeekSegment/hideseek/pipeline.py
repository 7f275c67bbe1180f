"""Whole-CT pipeline: CT + vertebra labels -> lytic/blastic lesion masks in the CT's own geometry.

``segment_ct`` is the library API that the CLI, the batch runner and the Slicer module share: it names the
vertebrae, finds each vertebral body, samples its sagittal slices, runs Hide-and-Seek on them and maps the kept
lesions back onto the CT grid. ``write_outputs`` writes the files of ``docs/output-contract.md``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from . import __version__
from .attribution import LESION_TYPES, AttributionSettings, HideAndSeek, SliceResult, settings_for
from .bundle import ModelBundle, load_bundle
from .device import resolve_device
from .errors import Cancelled, InputError
from .io import read_ct
from .overview import OverviewPanel, most_informative
from .sampler import respaced_timesteps
from .vertebrae import Vertebra, VertebraLabels, load_vertebra_labels, parse_levels, vertebral_body
from .volume import MODES, VertebraSlices, extract_vertebra_slices, slices_to_volume

DEFAULT_MODEL_NAME = "hideseek-phantom-demo"
MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
"""The repository's ``models/`` folder (the bundled demonstration model lives there)."""
MIN_LESION_VOXELS = 3
"""Smallest lesion written, in CT voxels. A slice component of the least size the method scores (5 model
pixels) can land on one or two voxels of a coarse CT grid: a speck no reader would call a lesion."""

PipelineProgress = Callable[[dict], None]
"""Receives {stage, vertebra, vertebrae, level, done, total, percent, eta_s} events."""


def default_model_path() -> Path:
    """``$HIDESEEK_MODEL`` if set, else the bundled demonstration model."""
    env = os.environ.get("HIDESEEK_MODEL")
    return Path(env) if env else MODELS_DIR / DEFAULT_MODEL_NAME


@dataclass
class VertebraOutcome:
    """What happened to one vertebra: its slices and per-slice results (in our layout), or why it was skipped."""

    vertebra: Vertebra
    status: str = "ok"
    body_source: str = ""
    slices: VertebraSlices | None = None
    results: list[SliceResult] = field(default_factory=list)

    @property
    def p_malignant(self) -> float:
        return float(np.mean([r.p_malignant for r in self.results])) if self.results else float("nan")

    @property
    def p_healthy(self) -> float:
        return float(np.mean([r.p_healthy for r in self.results])) if self.results else float("nan")


@dataclass
class SegmentationResult:
    """The lesions in CT geometry and every record the report needs."""

    ct: sitk.Image
    lesions: sitk.Image  # uint8: 0 background, 1 lytic, 2 blastic
    outcomes: list[VertebraOutcome]
    lesion_records: list[dict]
    run: dict

    def vertebra_records(self) -> list[dict]:
        records = []
        for o in self.outcomes:
            mine = [r for r in self.lesion_records if r["label"] == o.vertebra.label]
            records.append({
                "label": o.vertebra.label, "level": o.vertebra.level, "status": o.status,
                "slices": len(o.results), "body": o.body_source,
                "p_malignant": _round(o.p_malignant), "p_healthy_edit": _round(o.p_healthy),
                "n_lytic": sum(r["type"] == "lytic" for r in mine),
                "n_blastic": sum(r["type"] == "blastic" for r in mine),
                "lytic_volume_mm3": round(sum(r["volume_mm3"] for r in mine if r["type"] == "lytic"), 2),
                "blastic_volume_mm3": round(sum(r["volume_mm3"] for r in mine if r["type"] == "blastic"), 2),
            })
        return records

    def report(self) -> dict:
        return self.run | {"vertebrae": self.vertebra_records(), "lesions": self.lesion_records}

    def overview_panels(self) -> list[OverviewPanel]:
        panels = []
        for o in self.outcomes:
            if o.results:
                i = most_informative(o.results)
                panels.append(OverviewPanel(o.vertebra.level, o.results[i].image, o.results[i]))
        return panels


def _round(value: float) -> float | None:
    return None if not np.isfinite(value) else float(f"{value:.6g}")


def resolve_settings(
    bundle: ModelBundle, preset: str | None, overrides: dict | None
) -> tuple[str, AttributionSettings]:
    """Preset (argument, else the bundle's default), then the bundle's tuning of it, then the user's overrides."""
    method = bundle.method or {}
    name = preset or method.get("default_preset", "fast")
    try:
        settings = settings_for(name, **method.get("presets", {}).get(name, {})).with_overrides(**(overrides or {}))
        for steps in set(settings.ddim_steps()):
            respaced_timesteps(bundle.diffusion.T, steps)  # refuse a count the schedule cannot give, before any work
        return name, settings
    except ValueError as exc:
        raise InputError(str(exc)) from exc


def segment_ct(
    ct: sitk.Image | str | os.PathLike,
    vertebrae: VertebraLabels | str | os.PathLike,
    *,
    body_mask: sitk.Image | str | os.PathLike | None = None,
    subregions: str | os.PathLike | None = None,
    label_format: str = "auto",
    label_table: str | os.PathLike | None = None,
    levels: str | None = None,
    mode: str = "mid",
    model: ModelBundle | str | os.PathLike | None = None,
    preset: str | None = None,
    overrides: dict | None = None,
    device: str = "auto",
    allow_non_hu: bool = False,
    min_lesion_voxels: int | None = None,
    progress: PipelineProgress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> SegmentationResult:
    """Find lytic and blastic metastases in the chosen vertebrae of a CT; inputs are never modified.

    Vertebrae cut by the image border or too small are skipped (with the reason in the report) when all levels
    are processed, and are an error when they were asked for by name in ``levels``. Lesions that cover fewer
    than ``min_lesion_voxels`` CT voxels (default ``MIN_LESION_VOXELS``) are dropped.
    """
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}: use {' or '.join(MODES)}")
    min_lesion_voxels = MIN_LESION_VOXELS if min_lesion_voxels is None else min_lesion_voxels
    if min_lesion_voxels < 1:
        raise InputError(f"min_lesion_voxels must be at least 1 (1 keeps every lesion), got {min_lesion_voxels}")
    started = time.monotonic()
    ct_path = str(ct) if not isinstance(ct, sitk.Image) else "<image>"
    ct_image = ct if isinstance(ct, sitk.Image) else read_ct(ct, require_hu=not allow_non_hu)
    labels = vertebrae if isinstance(vertebrae, VertebraLabels) else load_vertebra_labels(
        vertebrae, label_format, label_table, subregions, reference=ct_image)
    chosen = parse_levels(levels, labels.vertebrae) if levels else list(labels.vertebrae)
    body_image = body_mask if isinstance(body_mask, sitk.Image) or body_mask is None else _read_mask(body_mask)
    bundle = model if isinstance(model, ModelBundle) else load_bundle(model or default_model_path(),
                                                                       device=resolve_device(device))
    preset_name, settings = resolve_settings(bundle, preset, overrides)
    method = HideAndSeek(bundle.dae, bundle.diffusion, bundle.classifier, settings)
    tracker = _Tracker(progress, cancel, len(chosen), started)

    outcomes, lesion_volume, records = [], np.zeros(tuple(reversed(ct_image.GetSize())), np.uint8), []
    for i, vertebra in enumerate(chosen):
        tracker.vertebra(i, vertebra.level)
        outcome, body = _process_vertebra(ct_image, labels, vertebra, body_image, bundle, method, mode, tracker,
                                          strict=levels is not None)
        outcomes.append(outcome)
        if outcome.results:
            records += _map_back(outcome, body, ct_image, lesion_volume, first_id=len(records) + 1,
                                 min_voxels=min_lesion_voxels)
    lesions = sitk.GetImageFromArray(lesion_volume)
    lesions.CopyInformation(ct_image)
    run = {
        "hideseek_version": __version__,
        "model": bundle.identity(),
        "preset": preset_name, "settings": settings.to_dict(), "mode": mode, "min_lesion_voxels": min_lesion_voxels,
        "input": {"ct": ct_path, "vertebrae": labels.source, "label_format": labels.label_format},
        "timing_s": {"total": round(time.monotonic() - started, 2)},
    }
    tracker.emit("done", 1, 1)
    return SegmentationResult(ct_image, lesions, outcomes, records, run)


def _read_mask(path: str | os.PathLike) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"body mask {path}: cannot read it ({str(exc).splitlines()[0]})") from exc


def _process_vertebra(ct, labels, vertebra, body_image, bundle: ModelBundle, method: HideAndSeek, mode: str,
                      tracker: _Tracker, strict: bool) -> tuple[VertebraOutcome, sitk.Image | None]:
    try:
        body, source = vertebral_body(labels, vertebra, body_image)
        slices = extract_vertebra_slices(ct, body, bundle.preprocessing, mode, level=vertebra.level)
    except InputError as exc:
        if strict:
            raise
        return VertebraOutcome(vertebra, status=f"skipped: {exc}"), None
    prep = bundle.preprocessing
    images = prep.to_model_layout(prep.normalize(slices.images))
    bodies = prep.to_model_layout(slices.body & slices.inside)
    results = method.run(images, bodies, progress=tracker.attribution)
    ours = [_to_our_layout(r, img, prep.from_model_layout) for r, img in zip(results, images, strict=True)]
    return VertebraOutcome(vertebra, "ok", source, slices, ours), body


def _to_our_layout(result: SliceResult, image: np.ndarray, flip: Callable[[np.ndarray], np.ndarray]) -> SliceResult:
    candidates = [replace(c, mask=flip(c.mask)) for c in result.candidates]
    return replace(result, recon=flip(result.recon), edit=flip(result.edit),
                   candidate_mask=flip(result.candidate_mask), candidates=candidates, image=flip(image))


def _map_back(
    outcome: VertebraOutcome, body: sitk.Image, ct: sitk.Image, lesion_volume: np.ndarray, first_id: int,
    min_voxels: int,
) -> list[dict]:
    """Write this vertebra's lesions into ``lesion_volume`` and describe each 3-D lesion.

    Nearest-neighbour mapping can put a boundary pixel on a CT voxel just outside the body; lesions are
    kept inside the vertebral body, where the method looked for them. 3-D lesions smaller than ``min_voxels``
    are left out of both the volume and the records.
    """
    kept = [(s, lesion) for s, r in enumerate(outcome.results) for lesion in r.lesions]
    if not kept:
        return []
    index = np.zeros(outcome.slices.images.shape, np.int64)
    for k, (s, lesion) in enumerate(kept, start=1):
        index[s][lesion.mask] = k
    # slices_to_volume maps uint8 labels: carry the 16-bit lesion index as two bytes.
    high, low = (slices_to_volume(outcome.slices, part, ct).astype(np.int64) for part in divmod(index, 256))
    index_volume = (high * 256 + low) * (sitk.GetArrayViewFromImage(body) != 0)
    kinds = np.array([0] + [lesion.kind for _, lesion in kept], np.uint8)
    deltas = np.array([np.nan] + [lesion.delta for _, lesion in kept])
    typed = kinds[index_volume]

    spacing = np.array(ct.GetSpacing())
    records = []
    structure = ndimage.generate_binary_structure(3, 3)
    for kind, name in LESION_TYPES.items():
        parts, n = ndimage.label(typed == kind, structure=structure)
        for j in range(1, n + 1):
            zyx = np.argwhere(parts == j)
            if len(zyx) < min_voxels:
                typed[parts == j] = 0
                continue
            ijk = zyx[:, ::-1].mean(axis=0)
            lps = np.array(ct.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in ijk)))
            records.append({
                "id": first_id + len(records), "vertebra": outcome.vertebra.level, "label": outcome.vertebra.label,
                "type": name, "delta": round(float(np.nanmax(deltas[np.unique(index_volume[parts == j])])), 4),
                "voxels": len(zyx), "volume_mm3": round(len(zyx) * float(np.prod(spacing)), 2),
                "centroid_ras": [round(float(v), 2) for v in lps * np.array([-1, -1, 1])],
                "centroid_ijk": [round(float(v), 2) for v in ijk],
            })
    np.copyto(lesion_volume, typed, where=typed > 0)
    return records


class _Tracker:
    """Turns per-vertebra attribution progress into run-level events with an ETA, and checks for cancel."""

    def __init__(self, progress: PipelineProgress | None, cancel: Callable[[], bool] | None, n: int, t0: float):
        self.progress, self.cancel, self.n, self.t0 = progress, cancel, n, t0
        self.index, self.level = 0, ""

    def vertebra(self, index: int, level: str) -> None:
        self.index, self.level = index, level
        self.emit("vertebra", 0, 1)

    def attribution(self, stage: str, done: int, total: int) -> None:
        self.emit(stage, done, total)

    def emit(self, stage: str, done: int, total: int) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("cancelled by the user")
        if self.progress is None:
            return
        fraction = 1.0 if stage == "done" else (self.index + done / max(total, 1)) / max(self.n, 1)
        elapsed = time.monotonic() - self.t0
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else None
        self.progress({"stage": stage, "vertebra": self.index + 1, "vertebrae": self.n, "level": self.level,
                       "done": done, "total": total, "percent": round(100 * fraction, 1),
                       "eta_s": None if eta is None else round(eta, 1)})
