"""Vertebra slices for training and evaluation, extracted from a manifest of CTs with vertebra-level labels.

A manifest is a CSV with one row per vertebra: ``ct``, ``vertebrae`` (labelmap), ``label`` (its value there),
``malignant`` (0/1) and optionally ``body`` (body mask), ``lesions`` (0/1/2 truth, evaluation only), ``mimics``
(benign look-alike instances, evaluation only), ``case`` and ``level``. Paths are relative to the CSV.
Real datasets and ``hideseek phantom`` output use the same format. Slices are cached as one ``.npz``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .io import atomic_file, read_ct
from .preprocessing import Preprocessing
from .vertebrae import Vertebra, VertebraLabels, load_vertebra_labels, vertebral_body
from .volume import extract_vertebra_slices, sample_labels

REQUIRED_COLUMNS = ("ct", "vertebrae", "label", "malignant")
PATH_COLUMNS = ("ct", "vertebrae", "body", "lesions", "mimics")  # relative to the manifest's folder
MADE_WITH = "made_with"  # key of a cached set's record of the preprocessing and mode it was extracted with


@dataclass
class SliceSet:
    """Slices in a model's layout and intensity range, with per-slice vertebra labels and optional truth."""

    images: np.ndarray  # (N, S, S) float32
    bodies: np.ndarray  # (N, S, S) bool
    lesions: np.ndarray  # (N, S, S) uint8: 0 none, 1 lytic, 2 blastic (all 0 without truth)
    mimics: np.ndarray  # (N, S, S) uint16 mimic instance ids (all 0 without truth)
    malignant: np.ndarray  # (N,) int8, the vertebra's label
    vertebra: np.ndarray  # (N,) int32 index into ``names``
    names: np.ndarray  # (V,) str "case/level"

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, keep: np.ndarray) -> SliceSet:
        return SliceSet(
            **{f.name: getattr(self, f.name)[keep] if f.name != "names" else self.names for f in fields(self)}
        )

    def vertebra_fingerprint(self) -> str:
        """A short digest of which vertebrae the set holds: two sets with the same one hold the same vertebrae."""
        names = sorted(str(n) for n in self.names[np.unique(self.vertebra)])
        return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()[:12]

    def vertebra_has(self, kind: int) -> np.ndarray:
        """Per slice, whether its vertebra holds lesion type ``kind`` in any of its slices of this set (a
        vertebra-level label, read from the lesion truth)."""
        return np.isin(self.vertebra, np.unique(self.vertebra[(self.lesions == kind).any(axis=(1, 2))]))

    def middle_slices(self) -> np.ndarray:
        """Index of the middle slice of each vertebra (in set order): the nearest to the paper's ``mid`` mode."""
        per_vertebra = [np.flatnonzero(self.vertebra == v) for v in np.unique(self.vertebra)]
        return np.array([ix[len(ix) // 2] for ix in per_vertebra], dtype=int)

    def lesion_sample(self, max_slices: int) -> np.ndarray:
        """Up to ``max_slices`` slices with lesions (indices in set order), alternating lesion types and spread over
        vertebrae: each vertebra's slice with the most lesion of a type first, then its second, and so on.

        The first slices with lesions in set order came from a handful of vertebrae (6 lytic slices of one vertebra
        among the first 32 of the demo model's validation set), which made a per-type efficacy one vertebra's."""
        keys = []  # (rank within its vertebra, place among the vertebrae of that rank, type, slice)
        for kind_index, kind in enumerate(np.unique(self.lesions[self.lesions > 0])):
            area = (self.lesions == kind).sum(axis=(1, 2))
            rows = np.flatnonzero(area)
            rows = rows[np.lexsort((-area[rows], self.vertebra[rows]))]  # by vertebra, most lesion first
            _, first, count = np.unique(self.vertebra[rows], return_index=True, return_counts=True)
            rank = np.arange(rows.size) - np.repeat(first, count)  # 0 for a vertebra's best slice of this type
            place = np.zeros(rows.size, int)
            for r in np.unique(rank):
                place[rank == r] = np.arange((rank == r).sum())
            keys += zip(rank.tolist(), place.tolist(), [kind_index] * rows.size, rows.tolist(), strict=True)
        picked = list(dict.fromkeys(row for *_, row in sorted(keys)))[:max_slices]
        return np.array(sorted(picked), dtype=int)

    def save(self, path: str | Path, made_with: str | None = None) -> Path:
        """Write the set as one ``.npz``; ``made_with`` records how it was extracted (see ``cached_slice_set``).

        Written through ``atomic_file``: a run stopped while writing must leave no truncated cache behind."""
        path = Path(path)
        stamp = {} if made_with is None else {MADE_WITH: np.array(made_with)}
        with atomic_file(path) as tmp, open(tmp, "wb") as out:
            np.savez_compressed(out, **{f.name: getattr(self, f.name) for f in fields(self)}, **stamp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SliceSet:
        with np.load(path, allow_pickle=False) as data:
            return cls(**{f.name: data[f.name] for f in fields(cls)})


def read_manifest(path: str | Path) -> list[dict]:
    """Rows with paths made absolute; a clear error for missing columns or bad labels."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path}: file not found")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise InputError(f"manifest {path}: no rows")
    missing = [c for c in REQUIRED_COLUMNS if c not in rows[0]]
    if missing:
        need = ", ".join(REQUIRED_COLUMNS)
        raise InputError(f"manifest {path}: missing column(s) {', '.join(missing)} (need {need})")
    for n, row in enumerate(rows, start=2):
        if row["malignant"] not in ("0", "1"):
            raise InputError(f"manifest {path} line {n}: malignant must be 0 or 1, got {row['malignant']!r}")
        for key in PATH_COLUMNS:
            if row.get(key):
                row[key] = str((path.parent / row[key]).resolve())
    return rows


def build_slice_set(
    manifest: str | Path,
    preprocessing: Preprocessing,
    *,
    central_fraction: float = 0.5,
    mode: str = "3d",
    progress: Callable[[int, int], None] | None = None,
) -> SliceSet:
    """Every sagittal slice through the central ``central_fraction`` of each body's left-right width
    (``mode="3d"``, for training), or the one mid-sagittal slice the method uses (``mode="mid"``, for evaluation).

    Lateral slices of a malignant vertebra often miss its lesions; keeping the central part keeps the
    vertebra-level label true for most slices.
    """
    rows = read_manifest(manifest)
    parts: dict[str, list] = {k: [] for k in ("images", "bodies", "lesions", "mimics", "malignant", "vertebra")}
    names: list[str] = []
    cache: dict[str, tuple[sitk.Image, VertebraLabels]] = {}
    for i, row in enumerate(rows):
        if row["ct"] not in cache:
            cache.clear()  # rows of one case are consecutive: keep one case in memory
            ct = read_ct(row["ct"])
            cache[row["ct"]] = (ct, load_vertebra_labels(row["vertebrae"], reference=ct))
        ct, labels = cache[row["ct"]]
        vertebra = next((v for v in labels.vertebrae if v.label == int(row["label"])), None)
        if vertebra is None:
            raise InputError(f"manifest row {i + 2}: label {row['label']} is not in {row['vertebrae']}")
        _add_vertebra(parts, ct, labels, vertebra, row, preprocessing, central_fraction, mode, len(names))
        names.append(f"{row.get('case', Path(row['ct']).name)}/{row.get('level', vertebra.level)}")
        if progress is not None:
            progress(i + 1, len(rows))
    stacked = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in parts.items()}
    return SliceSet(names=np.array(names), **stacked)


def _add_vertebra(
    parts, ct, labels, vertebra: Vertebra, row, prep: Preprocessing, central: float, mode: str, vid: int
) -> None:
    body_mask = sitk.ReadImage(row["body"]) if row.get("body") else None
    body, _ = vertebral_body(labels, vertebra, body_mask)
    slices = extract_vertebra_slices(ct, body, prep, mode, level=vertebra.level)
    n = len(slices.images)
    drop = round(n * (1 - central) / 2)
    keep = slice(drop, max(drop + 1, n - drop))

    own = sample_labels(slices, labels.labelmap == vertebra.label)[keep] > 0  # not the neighbours' lesions

    def truth(key: str, dtype) -> np.ndarray:
        if not row.get(key):
            return np.zeros(own.shape, dtype)
        return prep.to_model_layout(sample_labels(slices, sitk.ReadImage(row[key]))[keep].astype(dtype) * own)

    images = prep.normalize(slices.images[keep])
    parts["images"].append(prep.to_model_layout(images).astype(np.float32))
    parts["bodies"].append(prep.to_model_layout(slices.body[keep] & slices.inside[keep]))
    parts["lesions"].append(truth("lesions", np.uint8))
    parts["mimics"].append(truth("mimics", np.uint16))
    count = len(images)
    parts["malignant"].append(np.full(count, int(row["malignant"]), np.int8))
    parts["vertebra"].append(np.full(count, vid, np.int32))


def cached_slice_set(
    manifest: str | Path,
    preprocessing: Preprocessing,
    cache: str | Path | None,
    *,
    mode: str = "3d",
    progress: Callable[[int, int], None] | None = None,
) -> SliceSet:
    """The slices of ``manifest``: read from ``cache`` when that file exists, else extracted and written there.

    Extraction reads every CT of the manifest (minutes for a training set); the cache makes repeated runs start
    at once. The cache records the preprocessing and mode it was made with, and a cache made otherwise (another
    model's intensity window, 3-D slices where mid slices are needed) is refused rather than silently used.
    """
    cache = Path(cache) if cache else None
    stamp = json.dumps({"preprocessing": preprocessing.to_dict(), "mode": mode}, sort_keys=True)
    if cache is not None and cache.is_file():
        _check_cache_stamp(cache, stamp)
        return SliceSet.load(cache)
    data = build_slice_set(manifest, preprocessing, mode=mode, progress=progress)
    if cache is not None:
        data.save(cache, made_with=stamp)
    return data


def _check_cache_stamp(cache: Path, stamp: str) -> None:
    fix = "delete it (it is made again from the manifest) or give another cache file"
    try:
        with np.load(cache, allow_pickle=False) as data:
            made_with = str(data[MADE_WITH]) if MADE_WITH in data.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"slice cache {cache} is not a readable .npz file ({e}); {fix}") from e
    if made_with == stamp:
        return
    if made_with is None:
        raise InputError(f"slice cache {cache}: it does not record the preprocessing it was made with; {fix}")
    made, needed = json.loads(made_with), json.loads(stamp)
    differs = [f"{key}: {made['preprocessing'].get(key)!r}, this run needs {value!r}"
               for key, value in needed["preprocessing"].items() if made["preprocessing"].get(key) != value]
    if made["mode"] != needed["mode"]:
        differs.append(f"mode: {made['mode']!r}, this run needs {needed['mode']!r}")
    raise InputError(f"slice cache {cache} was made with other settings ({'; '.join(differs)}); {fix}")
