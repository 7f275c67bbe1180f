"""Vertebra labelmaps from TotalSegmentator, SPINEPS or a plain labelmap with a label table, and vertebral bodies.

Label conventions (value -> level):

- TotalSegmentator v2 ``total`` task: 26 S1, 27 L5, 28 L4, 29 L3, 30 L2, 31 L1, 32 T12 ... 43 T1, 44 C7 ... 50 C1
  (25 is the sacrum, not a vertebra here); either one multilabel file or the per-structure output folder
  (``vertebrae_L1.nii.gz`` ...). TotalSegmentator v1 numbered differently and is not supported.
- SPINEPS instance mask (``*_seg-vert_msk``): 1-7 C1-C7, 8-19 T1-T12, 28 T13, 20-25 L1-L6, 26 S1; its discs
  (100 + level) and endplates (200 + level) are ignored. The SPINEPS subregion mask (``*_seg-subreg_msk``) gives
  the vertebral body exactly: 49 (corpus border) + 50 (corpus).
- plain: any integer labelmap plus a table naming its values (CSV/TSV ``value,name`` or a 3D Slicer colour table
  ``value name r g b a``); a name counts as a vertebra when it contains exactly one level such as ``L1``,
  ``Th12`` or ``vertebrae_T10`` and does not mention a disc, endplate, canal or cord.

Without a body mask the body is derived from the whole-vertebra label by ``derive_body`` (see there for the rule
and its measured agreement with SPINEPS).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError
from .io import check_same_grid
from .volume import direction_matrix, same_grid

FORMATS = ("totalsegmentator", "spineps", "plain")
LEVEL_COUNTS = {"C": 7, "T": 13, "L": 6, "S": 1}
"""Levels we name: C1-C7, T1-T13 (T13 is a rare extra thoracic vertebra), L1-L6 (L6: lumbarised S1), S1."""
_REGION_START = {"C": 0, "T": 7, "L": 20, "S": 26}

TOTALSEGMENTATOR_LEVELS: dict[int, str] = {
    26: "S1",
    **{27 + i: f"L{5 - i}" for i in range(5)},
    **{32 + i: f"T{12 - i}" for i in range(12)},
    **{44 + i: f"C{7 - i}" for i in range(7)},
}
TOTALSEGMENTATOR_SACRUM = 25
SPINEPS_LEVELS: dict[int, str] = {
    **{i: f"C{i}" for i in range(1, 8)},
    **{7 + i: f"T{i}" for i in range(1, 13)},
    28: "T13",
    **{19 + i: f"L{i}" for i in range(1, 7)},
    26: "S1",
}
SPINEPS_BODY_SUBREGIONS = (49, 50)
_SPINEPS_SUBREGION_VALUES = frozenset(range(41, 51)) | frozenset(range(60, 64))
_SPINEPS_EXTRA = frozenset(range(101, 129)) | frozenset(range(201, 229))

_LEVEL_IN_NAME = re.compile(r"(?<![A-Za-z0-9])(TH|C|T|L|S)(\d{1,2})(?!\d)", re.IGNORECASE)
_NOT_A_VERTEBRA = re.compile(r"disc|ivd|endplate|canal|cord|foramen|rib", re.IGNORECASE)

BODY_OPENING_FRACTION = 0.6
"""Opening radius of ``derive_body`` as a fraction of the vertebra's largest inscribed-sphere radius."""


def normalise_level(token: str) -> str | None:
    """``"th12"`` -> ``"T12"``; None when the token is not a level we know (e.g. ``"T14"``, ``"S2"``)."""
    match = re.fullmatch(r"(TH|C|T|L|S)(\d{1,2})", token.strip().upper())
    if not match:
        return None
    region = match.group(1)[0]
    number = int(match.group(2))
    return f"{region}{number}" if 1 <= number <= LEVEL_COUNTS[region] else None


def level_rank(level: str) -> int:
    """Sort key, superior to inferior: C1 = 1 ... C7, T1 ... T13, L1 ... L6, S1 = 27."""
    return _REGION_START[level[0]] + int(level[1:])


@dataclass(frozen=True, order=True)
class Vertebra:
    """One vertebra present in a labelmap: its level name and label value; sorts superior to inferior."""

    rank: int = field(init=False, repr=False)
    level: str
    label: int = field(compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank", level_rank(self.level))


def level_from_name(name: str) -> str | None:
    """The level a label-table name denotes, or None for anything that is not one vertebra."""
    if _NOT_A_VERTEBRA.search(name):
        return None
    found = {normalise_level(m.group(1) + m.group(2)) for m in _LEVEL_IN_NAME.finditer(name)}
    found.discard(None)
    return found.pop() if len(found) == 1 else None


def read_label_table(path: str | Path) -> dict[int, str]:
    """Read ``value,name`` rows (CSV, TSV, ``;``) or a Slicer colour table (``value name r g b a``, ``#`` comments).

    Lines whose first field is not an integer (headers) are skipped.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"label table {path}: cannot read it ({exc})") from exc
    table: dict[int, str] = {}
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        delimiter = next((d for d in ",\t;" if d in text), None)
        fields = next(csv.reader([text], delimiter=delimiter)) if delimiter else text.split()
        fields = [f.strip() for f in fields]
        if len(fields) < 2 or not re.fullmatch(r"-?\d+", fields[0]):
            continue
        table[int(fields[0])] = fields[1]
    if not table:
        raise InputError(f"label table {path}: no 'value,name' rows found; write one label per line, e.g. '31,L1'")
    return table


def levels_from_table(table: dict[int, str], where: str) -> dict[int, str]:
    """Label value -> level for the table entries that name a vertebra; one value per level."""
    levels: dict[int, str] = {}
    for value, name in table.items():
        level = level_from_name(name)
        if level is None:
            continue
        if level in levels.values():
            raise InputError(f"label table {where}: level {level} is named twice; keep one label per vertebra")
        levels[value] = level
    if not levels:
        raise InputError(
            f"label table {where}: no entry names a vertebra level (expected names like 'L1' or 'vertebrae_T12')"
        )
    return levels


def _hinted_format(path: str | Path | None) -> str | None:
    name = Path(path).name.lower() if path else ""
    if "seg-vert" in name or "spineps" in name:
        return "spineps"
    if "totalseg" in name or "vertebrae" in name:
        return "totalsegmentator"
    return None


def detect_label_format(values: Iterable[int], path: str | Path | None = None, has_table: bool = False) -> str:
    """Guess the label convention (``--label-format auto``) from the values present and the file name.

    The rule, in order: a folder -> totalsegmentator (per-structure output); a label table -> plain; a value in
    29-99 -> totalsegmentator (SPINEPS instance masks never use 29-99), unless every value is a SPINEPS
    subregion value including 49 and 50 (that is a subregion mask: refused); a disc or endplate value
    (101-128, 201-228) -> spineps; all values in 1-28 with one below 25 -> spineps (a TotalSegmentator labelmap
    that reaches the spine also holds ribs, hips or muscles above 28). Values only in 25-28 fit both, and are
    settled by the file name (``seg-vert``/``spineps`` or ``totalseg``/``vertebrae``) or refused.
    """
    where = str(path) if path else "labelmap"
    if path is not None and Path(path).is_dir():
        return "totalsegmentator"
    if has_table:
        return "plain"
    present = {int(v) for v in values} - {0}
    if not present:
        raise InputError(f"{where}: the labelmap is empty (no non-zero labels)")
    ask = "; pass --label-format totalsegmentator|spineps|plain"
    hint = _hinted_format(path)
    if present <= _SPINEPS_SUBREGION_VALUES and {49, 50} <= present and hint != "totalsegmentator":
        raise InputError(
            f"{where}: this looks like a SPINEPS subregion mask (values 41-50); give the instance "
            f"mask (*_seg-vert_msk) as labels and this file as the subregion mask{ask}"
        )
    if any(29 <= v <= 99 for v in present):
        return "totalsegmentator"
    if present & _SPINEPS_EXTRA:
        return "spineps"
    if present <= set(range(1, 29)):
        if min(present) < 25:
            return "spineps"
        if hint:
            return hint
        raise InputError(
            f"{where}: values {sorted(present)} fit both TotalSegmentator (sacrum, S1, L5, L4) and "
            f"SPINEPS (L6, S1, T13){ask}"
        )
    raise InputError(
        f"{where}: values {sorted(present)[:12]} match no known vertebra labelling{ask} (plain needs --label-table)"
    )


@dataclass
class VertebraLabels:
    """A vertebra labelmap on the CT grid, its convention, and the vertebrae present (superior to inferior)."""

    labelmap: sitk.Image
    label_format: str
    vertebrae: tuple[Vertebra, ...]
    source: str
    subregions: sitk.Image | None = None

    @property
    def levels(self) -> list[str]:
        return [v.level for v in self.vertebrae]


def _as_labels(image: sitk.Image, where: str) -> sitk.Image:
    """Integer labelmap; float files (common in NIfTI) are accepted when every value is a whole number."""
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise InputError(f"{where}: need a 3-D single-component labelmap")
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        array = sitk.GetArrayViewFromImage(image)
        if not np.all(np.mod(array, 1) == 0):
            raise InputError(f"{where}: the labelmap holds fractional values; it must hold integer labels")
        return sitk.Cast(image, sitk.sitkInt32)
    return image


def _read(path: Path, what: str) -> sitk.Image:
    if not path.is_file():
        raise InputError(f"{what} {path}: file not found")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{what} {path}: cannot read it as an image ({str(exc).splitlines()[0]})") from exc


def _on_grid(image: sitk.Image, reference: sitk.Image | None, where: str) -> sitk.Image:
    """Labels must lie on the reference (CT) grid: resampling them silently could shift a level by a voxel."""
    if reference is not None:
        check_same_grid(image, reference, Path(where), "labelmap")
    return image


def read_totalsegmentator_folder(folder: str | Path) -> sitk.Image:
    """Merge TotalSegmentator's per-structure files (``vertebrae_L1.nii.gz`` ...) into one v2-valued labelmap."""
    folder = Path(folder)
    values = {f"vertebrae_{level}": value for value, level in TOTALSEGMENTATOR_LEVELS.items()}
    values["sacrum"] = TOTALSEGMENTATOR_SACRUM
    merged: np.ndarray | None = None
    reference: sitk.Image | None = None
    for stem, value in sorted(values.items(), key=lambda item: item[1]):
        path = next(
            (folder / f"{stem}{ext}" for ext in (".nii.gz", ".nii") if (folder / f"{stem}{ext}").is_file()), None
        )
        if path is None:
            continue
        image = _read(path, "TotalSegmentator mask")
        if reference is None:
            reference = image
            merged = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
        elif not same_grid(image, reference):
            raise InputError(f"TotalSegmentator mask {path}: not on the same grid as the other masks in {folder}")
        merged[(sitk.GetArrayViewFromImage(image) != 0) & (merged == 0)] = value
    if reference is None or merged is None:
        raise InputError(f"{folder}: no TotalSegmentator vertebra masks (vertebrae_*.nii.gz) in this folder")
    out = sitk.GetImageFromArray(merged)
    out.CopyInformation(reference)
    return out


def _spineps_subregion_sibling(path: Path) -> Path | None:
    """SPINEPS writes ``*_seg-subreg_msk*`` beside ``*_seg-vert_msk*``; use it when it is there."""
    if "seg-vert" not in path.name:
        return None
    sibling = path.with_name(path.name.replace("seg-vert", "seg-subreg"))
    return sibling if sibling.is_file() else None


def load_vertebra_labels(
    path: str | Path,
    label_format: str = "auto",
    table: str | Path | None = None,
    subregions: str | Path | None = None,
    reference: sitk.Image | None = None,
) -> VertebraLabels:
    """Read a vertebra labelmap (file or TotalSegmentator folder), name its vertebrae and put it on ``reference``.

    For SPINEPS the subregion mask is taken from ``subregions`` or, when omitted, from the sibling
    ``*_seg-subreg_*`` file SPINEPS writes next to the instance mask.
    """
    path = Path(path)
    if label_format not in ("auto", *FORMATS):
        raise InputError(f"unknown label format {label_format!r}: use auto, {', '.join(FORMATS)}")
    read = read_totalsegmentator_folder(path) if path.is_dir() else _as_labels(_read(path, "labelmap"), str(path))
    labelmap = _on_grid(read, reference, str(path))
    values = np.unique(sitk.GetArrayViewFromImage(labelmap))
    fmt = label_format
    if fmt == "auto":
        fmt = detect_label_format(values, path, has_table=table is not None)
    if fmt == "plain":
        if table is None:
            raise InputError(f"{path}: a plain labelmap needs a label table (--label-table values.csv)")
        levels = levels_from_table(read_label_table(table), str(table))
    else:
        levels = TOTALSEGMENTATOR_LEVELS if fmt == "totalsegmentator" else SPINEPS_LEVELS
    present = tuple(sorted(Vertebra(level=levels[int(v)], label=int(v)) for v in values if int(v) in levels))
    if not present:
        raise InputError(f"{path}: no vertebra labels of the {fmt} convention in this labelmap")
    sub_image = None
    if fmt == "spineps":
        sub_path = Path(subregions) if subregions is not None else _spineps_subregion_sibling(path)
        if sub_path is not None:
            sub_image = _on_grid(_as_labels(_read(sub_path, "subregion mask"), str(sub_path)), labelmap, str(sub_path))
    elif subregions is not None:
        raise InputError(f"subregion mask {subregions}: only used with SPINEPS labels, these are {fmt}")
    return VertebraLabels(labelmap, fmt, present, str(path), sub_image)


def parse_levels(text: str, present: Sequence[Vertebra]) -> list[Vertebra]:
    """``"T10,L1"``, ``"T11-L2"`` (inclusive range of present levels) or ``"all"`` -> the vertebrae, sorted."""
    by_level = {v.level: v for v in present}
    available = ", ".join(v.level for v in sorted(present)) or "none"
    tokens = [t for t in re.split(r"[,\s]+", text.strip()) if t]
    if not tokens:
        raise InputError(f"no vertebra levels given; choose from: {available}")
    if [t.lower() for t in tokens] == ["all"]:
        return sorted(present)

    def known(token: str) -> str:
        level = normalise_level(token)
        if level is None:
            raise InputError(
                f"unknown vertebra level {token!r}: use names like C7, T10, L1 or S1 (present: {available})"
            )
        return level

    chosen: set[Vertebra] = set()
    for token in tokens:
        ends = re.split(r"[-:]", token)
        if len(ends) == 2:
            a, b = sorted((known(ends[0]), known(ends[1])), key=level_rank)
            span = [v for v in present if level_rank(a) <= v.rank <= level_rank(b)]
            if not span:
                raise InputError(f"no vertebra between {a} and {b} in the labels (present: {available})")
            chosen.update(span)
            continue
        level = known(token)
        if level not in by_level:
            raise InputError(f"vertebra {level} is not in the labels (present: {available})")
        chosen.add(by_level[level])
    return sorted(chosen)


def derive_body(vertebra: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """The vertebral body inside a whole-vertebra mask (numpy z, y, x on ``grid``), by a geometric rule.

    1. The body is the thickest part of a vertebra: take the deepest voxel (largest distance to the mask
       border, in mm) and open the mask with a ball of radius ``BODY_OPENING_FRACTION`` x that depth, keeping the
       part connected to the deepest voxel: pedicles, laminae and processes are thinner and fall away, but the
       body loses its rims.
    2. Local axes: the opened body's shortest principal axis is the vertebra's own S-I axis (used when within
       45 degrees of the patient's, else the patient's); the local A-P axis is the patient's A-P made
       perpendicular to it, which follows lordosis and kyphosis.
    3. Grow the opened body back inside the mask (by 1.5 radii, to regain the rims) but never posterior to its
       posterior wall (the plane, perpendicular to local A-P, through its most posterior voxel): the pedicles
       start there. Keep the part connected to the deepest voxel.

    Measured on the SPINEPS sample (tptbox_sample_ct, 1.5 mm; truth = subregions 49 + 50 of the same label),
    Dice 0.999 L2, 0.996 L3, 0.990 L4 (L2 and L4 are cut by the crop); L3 rotated 15/25/35 degrees in the
    sagittal plane: 0.995/0.995/0.972. The body was 57-66 % of each SPINEPS vertebra (derived: 58-66 %). On the
    TotalSegmentator example (3 mm, coarse posterior elements) the derived T12 and L1 bodies are 74 % and 73 % of
    their vertebra and stop at the posterior wall on visual check (axial and sagittal).
    """
    mask = np.asarray(vertebra, bool)
    if not mask.any():
        raise InputError("cannot derive a vertebral body from an empty vertebra mask")
    hits = np.nonzero(mask)
    lo = [max(int(h.min()) - 2, 0) for h in hits]
    hi = [min(int(h.max()) + 3, n) for h, n in zip(hits, mask.shape, strict=True)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    body = _body_in_box(mask[box], grid)
    out = np.zeros_like(mask)
    out[box] = body
    return out


def _body_in_box(mask: np.ndarray, grid: sitk.Image) -> np.ndarray:
    sampling = np.array(grid.GetSpacing(), float)[::-1]  # array axes z, y, x
    depth = ndimage.distance_transform_edt(mask, sampling=sampling)
    deepest = np.unravel_index(int(np.argmax(depth)), depth.shape)
    radius = BODY_OPENING_FRACTION * float(depth[deepest])
    cores, _ = ndimage.label(depth >= radius)
    core = cores == cores[deepest]
    opened = (ndimage.distance_transform_edt(~core, sampling=sampling) <= radius) & mask

    # physical (LPS) offset of every voxel: array index (z, y, x) -> image index (x, y, z) -> mm
    to_lps = direction_matrix(grid) * np.array(grid.GetSpacing(), float)
    index_zyx = np.indices(mask.shape).reshape(3, -1).T
    points = (index_zyx[:, ::-1] @ to_lps.T).reshape((*mask.shape, 3))
    inferior, posterior = np.array([0.0, 0.0, -1.0]), np.array([0.0, 1.0, 0.0])
    axis_si = inferior
    if opened.sum() > 3:
        _, vectors = np.linalg.eigh(np.cov(points[opened].T))
        shortest = vectors[:, 0]
        if abs(shortest @ inferior) > np.cos(np.radians(45.0)):
            axis_si = shortest * np.sign(shortest @ inferior)
    axis_ap = posterior - (posterior @ axis_si) * axis_si
    axis_ap /= np.linalg.norm(axis_ap)
    along_ap = points @ axis_ap
    wall = along_ap[opened].max()
    grown = (ndimage.distance_transform_edt(~opened, sampling=sampling) <= 1.5 * radius) & mask & (along_ap <= wall)
    parts, _ = ndimage.label(grown)
    return parts == parts[deepest]


def vertebral_body(
    labels: VertebraLabels, vertebra: Vertebra, body: sitk.Image | None = None
) -> tuple[sitk.Image, str]:
    """The body of one vertebra as a binary image on the labels' grid, and how it was obtained.

    Sources, best first: an explicit body mask (``body``, non-zero = body, intersected with the vertebra's
    label) -> "explicit"; SPINEPS subregions 49 + 50 -> "spineps-subregions"; else ``derive_body`` -> "derived".
    """
    vert = sitk.GetArrayViewFromImage(labels.labelmap) == vertebra.label
    if body is not None:
        body = _on_grid(body, labels.labelmap, "body mask")
        mask, source = vert & (sitk.GetArrayViewFromImage(body) != 0), "explicit"
    elif labels.subregions is not None:
        sub = sitk.GetArrayViewFromImage(labels.subregions)
        mask, source = vert & np.isin(sub, SPINEPS_BODY_SUBREGIONS), "spineps-subregions"
    else:
        if vertebra.level == "C1":
            raise InputError("vertebra C1 (the atlas) has no vertebral body; leave it out or give a body mask")
        mask, source = derive_body(vert, labels.labelmap), "derived"
    if not mask.any():
        raise InputError(f"vertebra {vertebra.level}: the {source} body mask does not overlap its label")
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(labels.labelmap)
    return image, source
