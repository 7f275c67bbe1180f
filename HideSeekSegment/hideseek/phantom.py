"""Synthetic thoraco-lumbar CT phantoms with vertebral metastases, benign mimics and exact lesion masks.

No public CT carries voxel-level masks of vertebral metastases, so the product trains and is evaluated on
phantoms. Every structure is an implicit shape (an approximate signed distance in mm) in a patient frame
(x to the patient's left, y posterior, z superior: ITK's LPS), rendered with analytic partial volume on the
output grid, then blurred by a Gaussian PSF and given correlated noise. A case is a pure function of its seed.
docs/phantom.md lists what is simulated and the literature numbers behind each range.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError
from .io import atomic_output_dir, check_output_dir

LEVEL_NAMES = ("T1", "T2", "T3", "T4", "T5", "T6", "T7", "T8", "T9", "T10", "T11", "T12",
               "L1", "L2", "L3", "L4", "L5")  # fmt: skip
"""Thoraco-lumbar levels, superior to inferior."""

TS_LABELS = {name: 43 - i for i, name in enumerate(LEVEL_NAMES)}
"""TotalSegmentator v2 `total` label ids: T1 = 43 ... T12 = 32, L1 = 31 ... L5 = 27."""

ORIENTATIONS = ("RAS", "LPS", "LAS", "RPI", "PIR", "ASL")
"""Axis codes drawn when no orientation is given (SimpleITK convention: the direction each index axis points to)."""

LYTIC, BLASTIC = 1, 2
"""Values in the lesion label map."""

LYTIC_HU = (20.0, 60.0)
"""Lytic lesions replace bone with soft tissue (HU range drawn from; a curriculum may darken it)."""

LESION_PATTERNS = {"both": [0.4, 0.4, 0.2], "lytic": [1.0, 0.0, 0.0], "blastic": [0.0, 1.0, 0.0]}
"""Chance that a malignant vertebra's lesions are all lytic, all blastic or mixed; one-kind sets are a training
curriculum (evaluate on 'both')."""

MIMIC_KINDS = ("bone_island", "haemangioma", "schmorl_node", "endplate_sclerosis", "osteophyte", "focal_fat")
_MIMIC_WEIGHTS = np.array([0.2, 0.2, 0.2, 0.15, 0.15, 0.1])

# Tissue classes of PhantomCase.tissue (the class that dominates each voxel), used by tests and evaluation.
AIR, FAT, SOFT, LUNG, BLOOD, CANAL, DISC, CANCELLOUS, CORTEX, POSTERIOR, RIB, LYTIC_T, BLASTIC_T, MIMIC_T, TABLE = (
    range(15)
)

# Per-level anatomy anchors (mm, degrees), interpolated over the level index; literature-scale averages
# (lumbar bodies 20-30 mm high, 30-35 deep, 40-50 wide; thoracic smaller; lumbar discs ~10 mm, thoracic ~5 mm).
_ANCHOR = {
    "height": {"T1": 15, "T6": 18.5, "T12": 24, "L3": 27, "L5": 27},
    "depth": {"T1": 16, "T6": 24, "T12": 31, "L3": 34, "L5": 35},
    "width": {"T1": 28, "T6": 28, "T12": 40, "L3": 47, "L5": 50},
    "disc": {"T1": 4, "T6": 4.5, "T12": 7, "L1": 8.5, "L3": 10, "L4": 11, "L5": 11},
    "canal_w": {"T1": 19, "T6": 16, "T12": 19, "L3": 23, "L5": 25},
    "canal_d": {"T1": 15, "T6": 15, "T12": 16, "L3": 16, "L5": 17},
    "pedicle_r": {"T1": 3.2, "T6": 2.8, "T12": 3.8, "L3": 4.5, "L5": 5.0},
    "spinous_len": {"T1": 35, "T6": 38, "T12": 28, "L3": 30, "L5": 24},
    "spinous_drop": {"T1": 0.6, "T6": 1.4, "T10": 1.0, "T12": 0.4, "L3": 0.25, "L5": 0.2},
    "transverse_len": {"T1": 22, "T6": 20, "T12": 10, "L1": 18, "L3": 28, "L5": 22},
    "tilt": {"T1": 20, "T4": 11, "T7": 0, "T10": -10, "T12": -12, "L1": -10, "L2": -5, "L3": 3, "L4": 12, "L5": 20},
    "psoas": {"T12": 0, "L1": 9, "L3": 20, "L5": 24},
}


def _anatomy(name: str, index: float) -> float:
    """Interpolate one anatomy anchor at a (fractional) level index."""
    anchors = _ANCHOR[name]
    xs = [LEVEL_NAMES.index(k) for k in anchors]
    return float(np.interp(index, xs, list(anchors.values())))


# ----------------------------------------------------------------------------------------------------------
# Records


@dataclass
class LesionRecord:
    """One metastasis: kind 'lytic'/'blastic', centre in world mm (LPS), drawn diameter and HU, final voxels."""

    kind: str
    centre_mm: tuple[float, float, float]
    diameter_mm: float
    hu: float
    ill_defined: bool
    breach: bool = False
    n_voxels: int = 0


@dataclass
class MimicRecord:
    """One benign mimic instance (id in the mimics map), its kind, drawn HU and final voxel count."""

    instance: int
    kind: str
    hu: float
    n_voxels: int = 0


@dataclass
class VertebraRecord:
    """One rendered vertebra. Partial neighbours (in_levels False) are labelled but healthy and not in manifests."""

    level: str
    label: int
    in_levels: bool
    height_mm: float
    depth_mm: float
    width_mm: float
    cancellous_hu: float
    cortex_hu: float
    cortex_mm: float
    lesions: list[LesionRecord] = field(default_factory=list)
    mimics: list[MimicRecord] = field(default_factory=list)

    @property
    def malignant(self) -> bool:
        return any(lesion.n_voxels > 0 for lesion in self.lesions)

    @property
    def n_lytic(self) -> int:
        return sum(1 for lesion in self.lesions if lesion.kind == "lytic" and lesion.n_voxels > 0)

    @property
    def n_blastic(self) -> int:
        return sum(1 for lesion in self.lesions if lesion.kind == "blastic" and lesion.n_voxels > 0)

    @property
    def mimic_kinds(self) -> list[str]:
        return [m.kind for m in self.mimics if m.n_voxels > 0]


@dataclass
class PhantomCase:
    """A generated case: arrays in numpy (k, j, i) order of the written image, plus its ITK geometry."""

    ct: np.ndarray  # int16 HU
    vertebrae: np.ndarray  # uint8 TotalSegmentator labels
    body: np.ndarray  # uint8 vertebral-body mask
    lesions: np.ndarray  # uint8: 0 none, 1 lytic, 2 blastic
    mimics: np.ndarray  # uint8 mimic instance ids
    tissue: np.ndarray  # uint8 dominant tissue class (AIR ... TABLE)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    orientation: str
    records: list[VertebraRecord]
    seed: int | None
    age: float
    noise_sigma: float
    psf_fwhm_mm: float
    disc_hu: float
    fat_hu: float
    muscle_hu: float

    def image(self, array: np.ndarray) -> sitk.Image:
        """Wrap one of this case's arrays in a SimpleITK image carrying the case geometry."""
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    def mimic_table(self) -> dict[int, dict]:
        """Mimic instance id -> kind, level and vertebra label (the JSON sidecar)."""
        return {
            m.instance: {"kind": m.kind, "level": r.level, "label": r.label, "hu": round(m.hu, 1)}
            for r in self.records
            for m in r.mimics
            if m.n_voxels > 0
        }


# ----------------------------------------------------------------------------------------------------------
# Grid, frames and implicit shapes


@dataclass(frozen=True)
class _Grid:
    """The canonical render grid: numpy order (z, y, x), anatomical spacing (sx, sy, sz), frame origin (mm)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def axis(self, a: int) -> np.ndarray:
        n = self.shape[2 - a]
        return (self.origin[a] + self.spacing[a] * np.arange(n)).astype(np.float32)

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Numpy slices of the voxels whose centres lie in the world box [lo, hi] (x, y, z); None if empty."""
        out = []
        for a in (2, 1, 0):
            n = self.shape[2 - a]
            i0 = max(0, math.ceil((lo[a] - self.origin[a]) / self.spacing[a]))
            i1 = min(n, math.floor((hi[a] - self.origin[a]) / self.spacing[a]) + 1)
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable x (1,1,nx), y (1,ny,1), z (nz,1,1) coordinates of a box."""
        x = self.axis(0)[box[2]][None, None, :]
        y = self.axis(1)[box[1]][None, :, None]
        z = self.axis(2)[box[0]][:, None, None]
        return x, y, z


@dataclass(frozen=True)
class _Frame:
    """A vertebra's local frame: u lateral (left +), v posterior, w along its superior axis (tilted by phi)."""

    centre: tuple[float, float, float]
    phi: float  # radians; positive tilts the superior axis anteriorly

    def local(self, x: np.ndarray, y: np.ndarray, z: np.ndarray):
        c, s = math.cos(self.phi), math.sin(self.phi)
        dy, dz = y - self.centre[1], z - self.centre[2]
        return x - self.centre[0], dy * c + dz * s, -dy * s + dz * c

    def world(self, u: float, v: float, w: float) -> np.ndarray:
        c, s = math.cos(self.phi), math.sin(self.phi)
        return np.array([self.centre[0] + u, self.centre[1] + v * c - w * s, self.centre[2] + v * s + w * c])

    def world_box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        corners = np.array(
            [self.world(u, v, w) for u in (lo[0], hi[0]) for v in (lo[1], hi[1]) for w in (lo[2], hi[2])]
        )
        return corners.min(axis=0), corners.max(axis=0)


def _occupancy(d: np.ndarray, h: np.ndarray | float) -> np.ndarray:
    """Fraction of a voxel of width h (along the surface normal) inside the surface at signed distance d."""
    return np.clip(0.5 - d / h, 0.0, 1.0).astype(np.float32, copy=False)


def _as_distance(g: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """First-order signed distance g/|grad g| and the voxel width along the normal, for partial volume.

    The implicit functions are only roughly metric; normalising by the numerical gradient makes shell
    thicknesses (cortex, rims) come out in millimetres, and the normal gives the partial-volume width.
    """
    sx, sy, sz = spacing
    g = np.asarray(g, dtype=np.float32)
    if g.ndim != 3 or min(g.shape) < 2:  # too thin for a gradient: treat g as metric
        return g, np.float32(max(spacing))
    gz, gy, gx = np.gradient(g, sz, sy, sx)
    norm = np.sqrt(gx * gx + gy * gy + gz * gz) + np.float32(1e-6)
    h = (np.abs(gx) * sx + np.abs(gy) * sy + np.abs(gz) * sz) / norm
    return g / norm, np.maximum(h, np.float32(min(spacing)))


def _capsule(u, v, w, a: Sequence[float], b: Sequence[float], r: float, w_scale: float = 1.0) -> np.ndarray:
    """Distance-like field of a capsule from a to b (local coords); w_scale < 1 makes it taller than wide."""
    a3 = np.array([a[0], a[1], a[2] * w_scale], dtype=np.float32)
    ab = np.array([b[0], b[1], b[2] * w_scale], dtype=np.float32) - a3
    pu, pv, pw = u - a3[0], v - a3[1], w * w_scale - a3[2]
    t = np.clip((pu * ab[0] + pv * ab[1] + pw * ab[2]) / max(float(ab @ ab), 1e-6), 0.0, 1.0)
    du, dv, dw = pu - t * ab[0], pv - t * ab[1], pw - t * ab[2]
    return np.sqrt(du * du + dv * dv + dw * dw) - np.float32(r)


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma_vox: Sequence[float]) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered noise; large kernels are drawn on a coarser grid and upsampled."""
    shape = tuple(int(n) for n in shape)
    f = max(1, int(min(sigma_vox)))
    coarse = tuple(math.ceil(n / f) + 1 for n in shape)
    n = rng.standard_normal(coarse, dtype=np.float32)
    n = ndimage.gaussian_filter(n, [s / f for s in sigma_vox], mode="wrap")
    for axis, k in enumerate(shape):
        n = _upsample_axis(n, axis, f, k)
    n -= n.mean()
    n /= n.std() + np.float32(1e-6)
    return n


def _upsample_axis(a: np.ndarray, axis: int, f: int, n: int) -> np.ndarray:
    """Linear interpolation by an integer factor along one axis (first n samples); cheaper than ndimage.zoom."""
    if f == 1:
        return a[(slice(None),) * axis + (slice(0, n),)]
    pos = np.arange(n, dtype=np.float32) / f
    i0 = pos.astype(np.int64)
    t = (pos - i0).reshape((-1,) + (1,) * (a.ndim - axis - 1))
    return np.take(a, i0, axis=axis) * (1 - t) + np.take(a, i0 + 1, axis=axis) * t


def _paint(hu: np.ndarray, tissue: np.ndarray, box, alpha: np.ndarray, value, code: int) -> None:
    """Composite a structure of occupancy alpha and value over the current HU (painter's order)."""
    region = hu[box]
    region += alpha * (value - region)
    tissue[box][np.broadcast_to(alpha >= 0.5, region.shape)] = code


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Case-level draws and spine layout


@dataclass
class _Vertebra:
    """Geometry and drawn parameters of one vertebra while rendering."""

    level: str
    index: int
    in_levels: bool
    frame: _Frame
    height: float
    depth: float
    width: float
    disc_below: float
    record: VertebraRecord
    concavity: float = 1.2
    waist: float = 0.06
    malignant: bool = False
    n_mimics: int = 0

    def dim(self, name: str) -> float:
        scale = self.depth / _anatomy("depth", self.index)
        return _anatomy(name, self.index) * (scale if name not in ("tilt", "spinous_drop") else 1.0)


@dataclass
class _Case:
    """Per-case draws shared by all renderers."""

    rng: np.random.Generator
    grid: _Grid
    verts: list[_Vertebra]
    age: float
    fat_hu: float
    muscle_hu: float
    disc_hu: float
    blood_hu: float
    skin_y: float  # world y of the back skin where it lies flat on the table (supine)
    fat_thickness: float
    lesion_rate: float
    mimic_rate: float
    min_lesion_mm: float
    lytic_hu: tuple[float, float]
    lytic_min_mm: float
    lesion_kinds: str
    paint_lesions: bool
    lesion_id: np.ndarray = field(default=None)  # type: ignore[assignment]
    lesion_list: list[tuple[_Vertebra, LesionRecord]] = field(default_factory=list)


def _parse_levels(levels: Sequence[str]) -> list[int]:
    if isinstance(levels, str) or not levels:
        raise InputError(f"levels must be a non-empty list of names like ('L1', 'L2'), got {levels!r}")
    bad = [lv for lv in levels if lv not in LEVEL_NAMES]
    if bad:
        raise InputError(f"unknown vertebra level(s) {bad}: use names from {LEVEL_NAMES[0]} to {LEVEL_NAMES[-1]}")
    idx = sorted({LEVEL_NAMES.index(lv) for lv in levels})
    if idx != list(range(idx[0], idx[-1] + 1)) or len(idx) != len(levels):
        raise InputError(
            f"levels {list(levels)} must be distinct and contiguous (e.g. T11,T12,L1): the spine is stacked"
        )
    return idx


def _layout_spine(rng: np.random.Generator, idx: list[int], curvature: float, scale: float) -> list[_Vertebra]:
    """Stack bodies bottom-up along the tilted axis, discs between them; one partial neighbour at each end."""
    rendered = list(range(max(0, idx[0] - 1), min(len(LEVEL_NAMES), idx[-1] + 2)))
    verts: list[_Vertebra] = []
    centre = np.zeros(3)
    for k in reversed(rendered):  # inferior first
        jitter = float(np.clip(rng.normal(1.0, 0.02), 0.95, 1.05))
        h = _anatomy("height", k) * scale * jitter
        d, wd = _anatomy("depth", k) * scale * jitter, _anatomy("width", k) * scale * jitter
        phi = math.radians(_anatomy("tilt", k) * curvature + rng.normal(0, 1.5))
        disc = _anatomy("disc", k) * scale * float(rng.uniform(0.85, 1.1))
        if verts:
            below = verts[-1]
            step = below.height / 2 + disc + h / 2
            mid = (below.frame.phi + phi) / 2
            centre = np.array(below.frame.centre) + step * np.array([0.0, -math.sin(mid), math.cos(mid)])
            centre[0] += rng.normal(0, 0.8)
        name = LEVEL_NAMES[k]
        rec = VertebraRecord(name, TS_LABELS[name], k in idx, round(h, 2), round(d, 2), round(wd, 2), 0, 0, 0)
        verts.append(_Vertebra(name, k, k in idx, _Frame(tuple(centre), phi), h, d, wd, disc, rec))
        verts[-1].concavity = float(rng.uniform(0.8, 1.8))
    return verts[::-1]  # superior first


def _draw_spacing(rng: np.random.Generator, spacing) -> tuple[float, float, float]:
    drawn = (float(rng.uniform(0.5, 1.5)), float(rng.uniform(1.0, 3.0)))
    if spacing is None:
        return (round(drawn[0], 3), round(drawn[0], 3), round(drawn[1], 3))
    values = (float(spacing),) * 3 if np.isscalar(spacing) else tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(0.2 <= s <= 5.0 for s in values):
        raise InputError(f"spacing {spacing!r} must be one number or three (x, y, z of the image) in 0.2-5 mm")
    return values  # type: ignore[return-value]


def _check_orientation(code: str) -> str:
    code = str(code).upper()
    axis_of = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}
    if len(code) != 3 or not set(code) <= set(axis_of) or sorted(axis_of[c] for c in code) != [0, 1, 2]:
        raise InputError(f"orientation {code!r} must name each of L/R, P/A, S/I once, e.g. RAS, LPS or PIR")
    return code


def _axes(code: str) -> list[tuple[int, bool]]:
    """For each image axis: (anatomical axis 0=x L/R, 1=y P/A, 2=z S/I, flipped relative to LPS)."""
    return [({"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}[c], c in "RAI") for c in code]


def _build_grid(verts: list[_Vertebra], spacing_lps, size: tuple[float, float], skin_y: float) -> _Grid:
    """Field of view: size[0] x size[1] mm in-plane ending just behind the back skin; in z the stack, cut
    through the middle of the partial neighbours (or 12 mm beyond the outer endplates without one)."""
    top, bottom = verts[0], verts[-1]
    z_hi = top.frame.centre[2] + (0.1 * top.height if not top.in_levels else top.height / 2 + 12)
    z_lo = bottom.frame.centre[2] - (0.1 * bottom.height if not bottom.in_levels else bottom.height / 2 + 12)
    x_mid = float(np.mean([v.frame.centre[0] for v in verts]))
    lo = (x_mid - size[0] / 2, skin_y - size[1], z_lo)
    hi = (x_mid + size[0] / 2, skin_y, z_hi)
    n = [max(8, round((h - low) / s) + 1) for low, h, s in zip(lo, hi, spacing_lps, strict=True)]
    return _Grid((n[2], n[1], n[0]), tuple(spacing_lps), lo)


# ----------------------------------------------------------------------------------------------------------
# Soft tissue


def _spine_profile(case: _Case, z: np.ndarray) -> dict:
    """Per-slice spine centre and sizes (interpolated between vertebra centres), shaped (nz, 1, 1)."""
    order = case.verts[::-1]  # inferior first: z ascending
    vz = np.array([v.frame.centre[2] for v in order])
    vidx = np.array([v.index for v in order], dtype=float)
    index = np.interp(z, vz, vidx)
    scale = case.verts[0].depth / _anatomy("depth", case.verts[0].index)
    prof = {
        "x": np.interp(z, vz, [v.frame.centre[0] for v in order]),
        "y": np.interp(z, vz, [v.frame.centre[1] for v in order]),
        "index": index,
    }
    for name in ("depth", "width", "canal_w", "canal_d", "psoas", "transverse_len", "pedicle_r"):
        prof[name] = np.array([_anatomy(name, i) for i in index]) * scale
    out = {k: v.astype(np.float32)[:, None, None] for k, v in prof.items()}
    t12 = LEVEL_NAMES.index("T12")
    if vidx.min() <= t12 <= vidx.max():
        out["z_t12"] = float(np.interp(t12, vidx[::-1], vz[::-1]))
    else:  # extrapolate along the stack (about one body plus a disc per level)
        slope, icpt = np.polyfit(vidx, vz, 1) if len(vz) > 1 else (-35.0, vz[0] + 35.0 * vidx[0])
        out["z_t12"] = float(slope * t12 + icpt)
    return out


def _ellipse(x, y, cx, cy, a, b, power: float = 2.0) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipse (a rounded rectangle for power > 2)."""
    if power == 2.0:
        r = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    else:
        r = (np.abs((x - cx) / a) ** power + np.abs((y - cy) / b) ** power) ** (1 / power)
    return (r - 1.0) * np.minimum(a, b)


_ALL = (slice(None),) * 3


def _paint_ellipse(case: _Case, hu, tissue, xr, yr, centre, axes, value, code: int, active=None, power=2.0) -> None:
    """Paint an axial ellipse whose centre and axes vary per slice, computed only in its bounding box."""
    (cx, cy), (a, b) = centre, axes
    h = case.grid.spacing[0]
    zs = np.ones(hu.shape[0], dtype=bool) if active is None else np.broadcast_to(active, (hu.shape[0], 1, 1))[:, 0, 0]
    inx = np.nonzero(((np.abs(xr - cx) <= a + 2 * h) & zs[:, None, None]).any(axis=(0, 1)))[0]
    iny = np.nonzero(((np.abs(yr - cy) <= b + 2 * h) & zs[:, None, None]).any(axis=(0, 2)))[0]
    inz = np.nonzero(zs)[0]
    if not (len(inx) and len(iny) and len(inz)):
        return
    box = (slice(inz[0], inz[-1] + 1), slice(iny[0], iny[-1] + 1), slice(inx[0], inx[-1] + 1))

    def cut(arr):
        arr = np.asarray(arr)
        if arr.ndim < 3:
            return arr
        return arr[tuple(sl if n > 1 else slice(None) for sl, n in zip(box, arr.shape, strict=True))]

    d = _ellipse(cut(xr), cut(yr), cut(cx), cut(cy), cut(a), cut(b), power)
    alpha = _occupancy(d, h)
    if active is not None:
        alpha = alpha * cut(np.broadcast_to(active, (hu.shape[0], 1, 1)))
    _paint(hu, tissue, box, alpha, cut(value), code)


def _render_soft_tissue(case: _Case, hu: np.ndarray, tissue: np.ndarray) -> None:
    """Fat, organs, muscles, vessels, lungs, canal contents, skin, air and table, in painter's order."""
    g = case.grid
    x, y, z = g.coords(_ALL)
    col = _spine_profile(case, z[:, 0, 0])
    xr, yr = x - col["x"], y - col["y"]
    hu[:] = case.fat_hu + 6 * _smooth_noise(case.rng, hu.shape, [3 / s for s in g.spacing[::-1]])
    tissue[:] = FAT
    _render_organs(case, hu, tissue, xr, yr, z, col)
    _render_muscles(case, hu, tissue, xr, yr, col)
    _render_vessels(case, hu, tissue, xr, yr, z, col)
    _render_lungs(case, hu, tissue, xr, yr, z, col)
    _render_canal(case, hu, tissue, xr, yr, col)
    _render_skin_and_table(case, hu, tissue, xr, yr, col["y"])


def _render_muscles(case: _Case, hu, tissue, xr, yr, col) -> None:
    """Erector spinae/multifidus behind the arch, psoas beside lumbar bodies, quadratus lumborum laterally."""
    half_d, half_w = col["depth"] / 2, col["width"] / 2
    front = half_d + col["canal_d"] * 0.55  # transverse processes / laminae
    back_inner = case.skin_y - col["y"] - case.fat_thickness
    m_b = np.clip((back_inner - front) / 2, 5, 40)
    lumbar = np.clip(col["index"] - LEVEL_NAMES.index("T10"), 0, 4) / 4
    m_a = 18 + 6 * lumbar
    age_fat = float(np.clip((case.age - 40) / 45, 0, 1)) * 0.35  # fatty infiltration of muscle with age
    streaks = np.clip(_smooth_noise(case.rng, hu.shape, [1.5 / s for s in case.grid.spacing[::-1]]) - 1.2, 0, 1)
    muscle = case.muscle_hu + streaks * (age_fat * (case.fat_hu - case.muscle_hu))
    psoas = np.maximum(col["psoas"], 0.1)
    ql = np.clip(col["psoas"] - 6, 0, None) + 0.1
    for side in (-1, 1):
        ctr = (side * (m_a + 2.5), back_inner - m_b)
        _paint_ellipse(case, hu, tissue, xr, yr, ctr, (m_a, m_b), muscle, SOFT, power=3.0)
        ctr = (side * (half_w + 0.7 * psoas), -half_d * 0.2)
        _paint_ellipse(case, hu, tissue, xr, yr, ctr, (psoas, 0.85 * psoas), muscle + 3, SOFT, col["psoas"] > 2)
        ctr = (side * (half_w + col["transverse_len"] + 18), half_d + 8)
        _paint_ellipse(case, hu, tissue, xr, yr, ctr, (ql, 0.6 * ql), muscle, SOFT, ql > 2)


def _render_organs(case: _Case, hu, tissue, xr, yr, z, col) -> None:
    """Anterior/lateral content: bowel and fat texture (with gas), liver on the right, kidneys at L1-L2."""
    g = case.grid
    sx = g.spacing[0]
    half_d, half_w = col["depth"] / 2, col["width"] / 2
    contrast = case.blood_hu > 100
    texture = _smooth_noise(case.rng, hu.shape, [5 / s for s in g.spacing[::-1]])
    near_spine = _ellipse(xr, yr, 0, -half_d * 0.3, half_w + 22, half_d + 28)
    region = _occupancy(-near_spine, sx) * _occupancy(yr - half_d * 0.3, sx)
    organ = region * np.clip(0.5 + 0.9 * texture, 0, 1)
    _paint(hu, tissue, _ALL, organ, 38 + 8 * texture + (25 if contrast else 0), SOFT)
    gas = np.clip((texture - 2.2) * 4, 0, 1) * region * (z < col["z_t12"] - 40)
    _paint(hu, tissue, _ALL, gas, -950.0, AIR)
    z_rel = z - col["z_t12"]
    liver_on = (z_rel < 40) & (z_rel > -95)
    _paint_ellipse(case, hu, tissue, xr, yr, (-(half_w + 70), -half_d), (62, 60),
                   58 + (45 if contrast else 0) + 4 * texture, SOFT, liver_on)  # fmt: skip
    for side, drop in ((1, 0.0), (-1, 15.0)):  # right kidney a little lower
        t = np.clip(1 - ((z_rel + 60 + drop) / 50) ** 2, 0, 1)
        ctr = (side * (half_w + 48), half_d * 0.4)
        axes = (28 * np.sqrt(t) + 0.1, 22 * np.sqrt(t) + 0.1)
        _paint_ellipse(case, hu, tissue, xr, yr, ctr, axes, (150 if contrast else 32) + 5 * texture, SOFT, t > 0.02)


def _render_vessels(case: _Case, hu, tissue, xr, yr, z, col) -> None:
    """Aorta (left-anterior of the spine, down to L4) with wall calcifications in older patients; IVC (right)."""
    g, rng = case.grid, case.rng
    sx = g.spacing[0]
    half_d, half_w = col["depth"] / 2, col["width"] / 2
    r_ao = float(rng.uniform(10, 13))
    thoracic = np.clip((LEVEL_NAMES.index("T12") - col["index"]) / 4, 0, 1)  # descending aorta sits more to the left
    ax, ay = half_w * 0.5 + 5 + 8 * thoracic, -half_d - r_ao - 1.5 + 6 * thoracic
    above_l4 = col["index"] < LEVEL_NAMES.index("L4") + 0.5
    _paint_ellipse(case, hu, tissue, xr, yr, (ax, ay), (r_ao, r_ao), case.blood_hu, BLOOD, above_l4)
    ivc = (-(half_w * 0.55 + 6), -half_d - 14)
    _paint_ellipse(case, hu, tissue, xr, yr, ivc, (12, 8.5), case.blood_hu * 0.9, BLOOD, z < col["z_t12"] + 20)
    zs = g.axis(2)
    for _ in range(rng.poisson(max(0.0, (case.age - 50) / 8))):
        k = int(rng.integers(0, len(zs)))
        ang = rng.uniform(-0.5 * np.pi, 0.6 * np.pi)  # posterior and lateral wall
        c = (
            col["x"][k, 0, 0] + ax[k, 0, 0] + r_ao * math.sin(ang),
            col["y"][k, 0, 0] + ay[k, 0, 0] + r_ao * math.cos(ang),
            zs[k],
        )
        pbox = g.box(np.subtract(c, (4, 4, 5)), np.add(c, (4, 4, 5)))
        if pbox is None or not above_l4[k, 0, 0]:
            continue
        px, py, pz = g.coords(pbox)
        r = np.sqrt((px - c[0]) ** 2 + (py - c[1]) ** 2 + ((pz - c[2]) / 2.5) ** 2)
        _paint(hu, tissue, pbox, _occupancy(r - rng.uniform(0.8, 1.8), sx), float(rng.uniform(300, 900)), SOFT)


def _render_lungs(case: _Case, hu, tissue, xr, yr, z, col) -> None:
    """Lungs beside and in front of the thoracic spine, inside the ribs, around the mediastinum, above a
    diaphragm that is lowest posteriorly (the costophrenic recesses reach T12)."""
    g = case.grid
    half_d, half_w = col["depth"] / 2, col["width"] / 2
    dome = 0.45 * np.clip(30 - yr, 0, None) + 0.004 * (np.abs(xr) - 80) ** 2  # recesses lowest posterolaterally
    d = col["z_t12"] + 4 + dome - z  # negative above the diaphragm
    xt = col["canal_w"] / 2 + col["pedicle_r"] + col["transverse_len"]
    tip = half_d + 0.55 * col["canal_d"] + 12  # behind the transverse process tips, as the ribs in _rib_parts
    ax = np.abs(xr)
    wall = np.where(
        ax < xt, tip - 8, np.where(ax < xt + 35, tip - 8 - (ax - xt) * 10 / 35, tip - 18 - (ax - xt - 35) * 43 / 55)
    )
    d = np.maximum(d, yr - wall)
    d = np.maximum(d, -_ellipse(xr, yr, 0, 0, half_w + 5, half_d + 4))  # paravertebral soft tissue
    d = np.maximum(d, -_ellipse(xr, yr, 6, -half_d - 40, 32, 42))  # mediastinum
    thoracic = np.clip((LEVEL_NAMES.index("T12") - col["index"]) / 4, 0, 1)
    d = np.maximum(d, -_ellipse(xr, yr, half_w * 0.5 + 5 + 8 * thoracic, -half_d - 7, 16, 16))  # around the aorta
    lung_hu = -860 + 25 * _smooth_noise(case.rng, hu.shape, [2 / s for s in g.spacing[::-1]])
    _paint(hu, tissue, _ALL, _occupancy(d, g.spacing[0]), lung_hu, LUNG)


def _render_canal(case: _Case, hu, tissue, xr, yr, col) -> None:
    """Spinal canal: epidural fat, thecal sac (CSF) and, above L2, the cord; bone is painted over later."""
    cy = col["depth"] / 2 + col["canal_d"] / 2 - 1.5
    a, b = col["canal_w"] / 2, col["canal_d"] / 2
    _paint_ellipse(case, hu, tissue, xr, yr, (0, cy), (a, b), case.fat_hu + 10, FAT)
    _paint_ellipse(case, hu, tissue, xr, yr, (0, cy), (a - 2.5, b - 2.5), 8.0, CANAL)
    cord = col["index"] < LEVEL_NAMES.index("L2")
    _paint_ellipse(case, hu, tissue, xr, yr, (0, cy - 1), (4.5, 3.8), 35.0, SOFT, cord)


def _render_skin_and_table(case: _Case, hu, tissue, xr, yr, col_y) -> None:
    """Back skin flattened on the table (with the midline groove); air behind it; the table's shell and core."""
    rng = case.rng
    sy = case.grid.spacing[1]
    flat = float(rng.uniform(40, 80))
    groove = float(rng.uniform(1, 5)) * np.exp(-((xr / 12) ** 2))
    skin = (case.skin_y - col_y) - np.clip(np.abs(xr) - flat, 0, None) ** 2 / 300 - groove
    _paint(hu, tissue, _ALL, _occupancy(skin - 2.5 - yr, sy) * _occupancy(yr - skin, sy), 35.0, SOFT)
    _paint(hu, tissue, _ALL, _occupancy(skin - yr, sy), -1000.0, AIR)
    table = (case.skin_y - col_y) + float(rng.uniform(0.5, 3))
    _paint(hu, tissue, _ALL, _occupancy(np.abs(yr - table - 1.5) - 1.5, sy), float(rng.uniform(100, 300)), TABLE)
    _paint(hu, tissue, _ALL, _occupancy(table + 3 - yr, sy), -850.0, TABLE)


# ----------------------------------------------------------------------------------------------------------
# Discs, ribs and vertebrae


def _body_field(vt: _Vertebra, u, v, w) -> np.ndarray:
    """Vertebral body: superelliptic kidney-bean cross-section, waisted sides, concave endplates."""
    frac = np.clip((2 * w / vt.height) ** 2, 0, 1)
    waist = 1 - vt.waist * (1 - frac)
    a, b = vt.width / 2 * waist, vt.depth / 2 * waist
    p = 2.4
    rad = (np.abs(u / a) ** p + np.abs(v / b) ** p) ** (1 / p)
    rho = np.sqrt(u * u + v * v)
    g_cross = (rad - 1) * rho / np.maximum(rad, 1e-3)
    rc = 0.28 * vt.width
    vc = vt.depth / 2 + rc - 0.08 * vt.depth
    g_cross = np.maximum(g_cross, rc - np.sqrt(u * u + (v - vc) ** 2))
    g_vert = np.abs(w) - (vt.height / 2 - vt.concavity * (1 - np.minimum(rad, 1) ** 2))
    return np.maximum(g_cross, g_vert)


def _posterior_parts(vt: _Vertebra) -> list[tuple[tuple, tuple, float, float]]:
    """Pedicles, laminae, spinous, transverse and articular processes as capsules (a, b, radius, w_scale)."""
    hd, h = vt.depth / 2, vt.height
    cw, cd, pr = vt.dim("canal_w"), vt.dim("canal_d"), vt.dim("pedicle_r")
    up = cw / 2 + pr
    lam = (0.0, hd + cd + 0.5, -0.05 * h)
    thoracic = vt.index < LEVEL_NAMES.index("L1")
    sp_end = (0.0, lam[1] + vt.dim("spinous_len"), -vt.dim("spinous_drop") * h)
    tp = vt.dim("transverse_len")
    parts = [(lam, sp_end, 3.0 if thoracic else 2.6, 0.6 if thoracic else 0.35)]
    for s in (-1, 1):
        root, arch = (s * up, hd - 5, 0.15 * h), (s * up, hd + 0.55 * cd, 0.1 * h)
        tp_end = (s * (up + tp), arch[1] + (12 if thoracic else 2), 0.1 * h)
        parts += [
            (root, arch, pr, 0.6),
            (arch, lam, 2.8, 0.5),
            (arch, tp_end, 3.2 if thoracic else 3.5, 0.7),
            ((s * (up + 3.5), hd + 0.6 * cd, 0.1 * h), (s * (up + 3.5), hd + 0.75 * cd, h / 2 + 4), 3.0, 1.0),
            ((s * (up - 3.5), hd + 0.8 * cd, -0.1 * h), (s * (up - 3.5), hd + 0.95 * cd, -h / 2 - 4), 2.8, 1.0),
        ]
    return parts


def _rib_parts(vt: _Vertebra) -> list[tuple[tuple, tuple, float, float]]:
    """A thoracic rib each side: head at the upper body, neck to the transverse process, then lateral-anterior."""
    hd, h = vt.depth / 2, vt.height
    xt = vt.dim("canal_w") / 2 + vt.dim("pedicle_r") + vt.dim("transverse_len")
    vt_tip = hd + 0.55 * vt.dim("canal_d") + 12
    parts = []
    for s in (-1, 1):
        pts = [(s * (vt.width / 2 + 1), hd * 0.4, 0.4 * h), (s * (xt - 2), vt_tip - 4, 0.05 * h),
               (s * (xt + 35), vt_tip - 12, -0.3 * h - 8), (s * (xt + 90), vt_tip - 55, -0.6 * h - 25)]  # fmt: skip
        parts += [(pts[i], pts[i + 1], 3.0 if i else 3.5, 0.5) for i in range(3)]
    return parts


_CAP = 4.0
"""Capsule unions are clipped at this distance (mm) so that the field is continuous where sub-boxes end."""


def _capsule_union(case: _Case, vt: _Vertebra, box, parts) -> np.ndarray:
    """Union (min) of capsules, each evaluated only in its own sub-box of `box`, clipped at _CAP."""
    g = case.grid
    shape = tuple(s.stop - s.start for s in box)
    out = np.full(shape, _CAP, dtype=np.float32)
    for a, b, r, ws in parts:
        ext = (r + _CAP) / ws + 1.0
        lo, hi = vt.frame.world_box(np.minimum(a, b) - ext, np.maximum(a, b) + ext)
        sub = g.box(lo, hi)
        if sub is None:
            continue
        sub = tuple(slice(max(s.start, o.start), min(s.stop, o.stop)) for s, o in zip(sub, box, strict=True))
        if any(s.stop <= s.start for s in sub):
            continue
        u, v, w = vt.frame.local(*g.coords(sub))
        rel = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(sub, box, strict=True))
        np.minimum(out[rel], _capsule(u, v, w, a, b, r, ws), out=out[rel])
    return out


def _render_disc(case: _Case, upper: _Vertebra, lower: _Vertebra, hu, tissue) -> None:
    """Disc between two endplates (wedge-shaped when the tilts differ); annulus a little denser than nucleus."""
    g = case.grid
    mid = _Frame(
        tuple((np.array(upper.frame.centre) + np.array(lower.frame.centre)) / 2),
        (upper.frame.phi + lower.frame.phi) / 2,
    )
    half = (upper.height + lower.height) / 4 + lower.disc_below
    a, b = max(upper.width, lower.width) / 2 + 1.5, max(upper.depth, lower.depth) / 2 + 1.5
    lo, hi = mid.world_box((-a - 2, -b - 2, -half), (a + 2, b + 2, half))
    box = g.box(lo, hi)
    if box is None:
        return
    x, y, z = g.coords(box)
    u, v, _ = mid.local(x, y, z)
    w_width = (upper.width + lower.width) / 4 + 1.0
    w_depth = (upper.depth + lower.depth) / 4 + 1.0
    rad = np.sqrt((u / w_width) ** 2 + ((v + 0.04 * w_depth) / w_depth) ** 2)
    g_disc = (rad - 1) * min(w_width, w_depth)
    _, _, wu = upper.frame.local(x, y, z)
    _, _, wl = lower.frame.local(x, y, z)
    g_disc = np.maximum(g_disc, wu + upper.height / 2 - 0.3)  # below the upper body's inferior endplate
    g_disc = np.maximum(g_disc, lower.height / 2 - 0.3 - wl)  # above the lower body's superior endplate
    d, h = _as_distance(g_disc, g.spacing)
    value = case.disc_hu + np.where(rad > 0.7, 5.0, -4.0)
    _paint(hu, tissue, box, _occupancy(d, h), value, DISC)


def _render_ribs(case: _Case, vt: _Vertebra, hu, tissue) -> None:
    g = case.grid
    parts = _rib_parts(vt)
    pts = np.array([p for a, b, _, _ in parts for p in (a, b)])
    lo, hi = vt.frame.world_box(pts.min(axis=0) - 8, pts.max(axis=0) + 8)
    box = g.box(lo, hi)
    if box is None:
        return
    d, h = _as_distance(_capsule_union(case, vt, box, parts), g.spacing)
    outer, inner = _occupancy(d, h), _occupancy(d + 1.0, h)
    region = hu[box]
    region *= 1 - outer
    region += (outer - inner) * vt.record.cortex_hu + inner * (vt.record.cancellous_hu + 40)
    tissue[box][outer >= 0.5] = RIB


def _spinous_tip_y(vt: _Vertebra) -> float:
    """World y of the spinous process tip: the back skin must lie behind every tip."""
    tip = _posterior_parts(vt)[0][1]
    return float(vt.frame.world(*tip)[1]) + 3.0


def _vertebra_box(case: _Case, vt: _Vertebra):
    tp = vt.dim("transverse_len") + vt.dim("canal_w") / 2 + 12
    back = vt.depth / 2 + vt.dim("canal_d") + vt.dim("spinous_len") + 10
    drop = vt.dim("spinous_drop") * vt.height + 8
    lo, hi = vt.frame.world_box((-tp, -vt.depth / 2 - 12, -vt.height / 2 - drop), (tp, back, vt.height / 2 + 9))
    return case.grid.box(lo, hi)


@dataclass
class _VertebraFields:
    """The fields of one vertebra inside its box, mutated by mimics and lesions before compositing."""

    box: tuple[slice, slice, slice]
    u: np.ndarray
    v: np.ndarray
    w: np.ndarray
    d_body: np.ndarray
    d_union: np.ndarray
    outer: np.ndarray  # occupancy of the whole vertebra
    inner: np.ndarray  # occupancy of its interior (inside the cortex)
    body_side: np.ndarray  # 1 where the body (not the posterior elements) is nearer
    interior_hu: np.ndarray
    cortex_hu: np.ndarray
    tissue_code: np.ndarray
    extra: list = field(default_factory=list)  # structures outside the vertebra: (alpha, value, code)


def _vertebra_fields(case: _Case, vt: _Vertebra, box) -> _VertebraFields:
    g, rng = case.grid, case.rng
    x, y, z = g.coords(box)
    u, v, w = vt.frame.local(x, y, z)
    d_body, h_body = _as_distance(_body_field(vt, u, v, w), g.spacing)
    d_post, h_post = _as_distance(_capsule_union(case, vt, box, _posterior_parts(vt)), g.spacing)
    body_side = d_body <= d_post
    d_union = np.where(body_side, d_body, d_post)
    h = np.where(body_side, h_body, h_post)
    t = vt.record.cortex_mm
    outer, inner = _occupancy(d_union, h), _occupancy(d_union + t, h)
    rec = vt.record
    shape = d_union.shape
    # trabecular texture: fine, vertically elongated; coarser and more anisotropic with age
    sig = np.array([1.6, 0.7, 0.7]) * (1 + 0.4 * (case.age - 30) / 55)
    texture = _smooth_noise(rng, shape, sig / np.array(g.spacing[::-1]))
    texture += 0.5 * _smooth_noise(rng, shape, 4.0 / np.array(g.spacing[::-1]))
    ap = np.clip(v / (vt.depth / 2), -1, 1)  # anterior part of the body lower than posterior
    endplate = np.clip(1 - (vt.height / 2 - np.abs(w)) / 3, 0, 1) * 0.1
    canc = rec.cancellous_hu * (1 + 0.08 * ap + endplate) + (20 + 0.1 * rec.cancellous_hu) * texture
    post_hu = min(rec.cancellous_hu + 120, 420) + 30 * texture
    interior = np.where(body_side, canc, post_hu).astype(np.float32)
    cortex = (rec.cortex_hu + 40 * texture).astype(np.float32)
    code = np.where(inner >= 0.5, np.where(body_side, CANCELLOUS, POSTERIOR), CORTEX).astype(np.uint8)
    return _VertebraFields(box, u, v, w, d_body, d_union, outer, inner, body_side, interior, cortex, code)


def _composite_vertebra(case: _Case, vt: _Vertebra, f: _VertebraFields, hu, tissue, label_d, labels, body) -> None:
    region = hu[f.box]
    region *= 1 - f.outer
    region += (f.outer - f.inner) * f.cortex_hu + f.inner * f.interior_hu
    inside = f.outer >= 0.5
    tissue[f.box][inside] = f.tissue_code[inside]
    for alpha, value, code in f.extra:
        region *= 1 - alpha
        region += alpha * value
        tissue[f.box][alpha >= 0.5] = code
    own = (f.d_union <= 0) & (f.d_union < label_d[f.box])
    label_d[f.box][own] = f.d_union[own]
    labels[f.box][own] = vt.record.label
    body[f.box][f.d_body <= 0] = 1


def _draw_vertebra_params(case: _Case, vt: _Vertebra, base_hu: float) -> None:
    rng, rec = case.rng, vt.record
    offset = (LEVEL_NAMES.index("L1") - vt.index) * 2.0  # thoracic bodies a little denser than lumbar
    rec.cancellous_hu = round(float(np.clip(base_hu + offset + rng.normal(0, 6), 100, 260)), 1)
    rec.cortex_hu = round(float(rng.uniform(500, 950)), 1)
    rec.cortex_mm = round(float(rng.uniform(0.7, 1.5)), 2)


# ----------------------------------------------------------------------------------------------------------
# Lesions


def _point_in_body(rng: np.random.Generator, vt: _Vertebra, posterior_bias: float = 0.7) -> np.ndarray:
    """A random local point well inside the body; posterior half preferred, as metastases seed there."""
    for _ in range(100):
        v = rng.uniform(0, 0.4) if rng.random() < posterior_bias else rng.uniform(-0.4, 0)
        p = np.array([rng.uniform(-0.38, 0.38) * vt.width, v * vt.depth, rng.uniform(-0.36, 0.36) * vt.height])
        if (abs(p[0]) / (vt.width / 2)) ** 2.4 + (abs(p[1]) / (vt.depth / 2)) ** 2.4 < 0.75:
            return p
    return np.zeros(3)


def _blob(case: _Case, vt: _Vertebra, f: _VertebraFields, centre, radii, lobulation: float, edge_mm: float):
    """Soft occupancy of an irregular, lobulated ellipsoid (thresholded smoothed noise) in the vertebra box.

    Returns (sub-box relative to f.box, alpha) or None when it falls outside the image.
    """
    g, rng = case.grid, case.rng
    rot = _random_rotation(rng)
    ext = float(max(radii)) * 1.5 + 2 * edge_mm
    lo, hi = vt.frame.world_box(np.asarray(centre) - ext, np.asarray(centre) + ext)
    sub = g.box(lo, hi)
    if sub is None:
        return None
    sub = tuple(slice(max(s.start, o.start), min(s.stop, o.stop)) for s, o in zip(sub, f.box, strict=True))
    if any(s.stop <= s.start for s in sub):
        return None
    rel = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(sub, f.box, strict=True))
    x, y, z = g.coords(sub)
    u, v, w = vt.frame.local(x, y, z)
    du, dv, dw = u - centre[0], v - centre[1], w - centre[2]
    q2 = sum(((rot[i, 0] * du + rot[i, 1] * dv + rot[i, 2] * dw) / radii[i]) ** 2 for i in range(3))
    shape = np.broadcast_shapes(np.shape(q2), (1, 1, 1))
    noise = _smooth_noise(rng, shape, [float(min(radii)) * 0.45 / s for s in g.spacing[::-1]]) if lobulation else 0
    field_ = (1 - np.sqrt(q2)) + lobulation * noise
    r_mean = float(np.mean(radii))
    edge = max(edge_mm, min(g.spacing))
    return rel, np.clip(field_ * r_mean / edge + 0.5, 0, 1).astype(np.float32)


def _add_lesion(case: _Case, vt: _Vertebra, f: _VertebraFields, kind: str) -> None:
    rng = case.rng
    smallest = max(case.min_lesion_mm, case.lytic_min_mm) if kind == "lytic" else case.min_lesion_mm
    diameter = float(np.exp(rng.uniform(np.log(smallest), np.log(20.0))))
    in_pedicle = rng.random() < 0.12
    if in_pedicle:
        centre = np.array(
            [rng.choice([-1, 1]) * (vt.dim("canal_w") / 2 + vt.dim("pedicle_r")), vt.depth / 2 + 2, 0.12 * vt.height]
        )
    else:
        centre = _point_in_body(rng, vt)
    ill_defined = bool(rng.random() < (0.5 if kind == "blastic" else 0.7))
    edge = float(rng.uniform(2.0, 4.0)) if ill_defined else float(rng.uniform(0.4, 1.0))
    radii = diameter / 2 * rng.uniform(0.75, 1.25, 3)
    blob = _blob(case, vt, f, centre, radii, float(rng.uniform(0.2, 0.45)), edge)
    # blastic: Ulano 2016, mean 654 +- 176 HU (max 787); lytic: soft-tissue density
    hu = float(np.clip(rng.normal(654, 176), 350, 790)) if kind == "blastic" else float(rng.uniform(*case.lytic_hu))
    world = vt.frame.world(*centre)
    rec = LesionRecord(kind, tuple(round(float(c), 2) for c in world), round(diameter, 2), round(hu, 1), ill_defined)
    vt.record.lesions.append(rec)
    case.lesion_list.append((vt, rec))
    if blob is None:
        return
    rel, alpha = blob
    lesion_id = len(case.lesion_list)
    breach = kind == "lytic" and rng.random() < 0.5
    texture = 1 + (0.1 if kind == "blastic" else 0.0) * _smooth_noise(rng, alpha.shape, [1.5, 1.5, 1.5])
    value = hu * texture
    paint = alpha if case.paint_lesions else np.zeros_like(alpha)  # a healthy twin keeps the draws, not the HU
    interior = f.interior_hu[rel]
    interior[...] = interior * (1 - paint) + paint * value
    changed = alpha * (np.broadcast_to(f.outer[rel], alpha.shape) if breach else f.inner[rel])
    if breach:
        cortex = f.cortex_hu[rel]
        cortex[...] = cortex * (1 - paint) + paint * value
        through = (alpha >= 0.5) & (f.inner[rel] < 0.5) & (f.outer[rel] > 0.3)
        rec.breach = bool(through.any())
        if case.paint_lesions:
            outside = np.zeros(f.outer.shape, dtype=np.float32)
            outside[rel] = alpha * (1 - f.outer[rel]) * (f.d_union[rel] < 6)
            f.extra.append((outside, hu, LYTIC_T))
    mask = changed >= 0.5
    if case.paint_lesions:
        f.tissue_code[rel][mask] = LYTIC_T if kind == "lytic" else BLASTIC_T
    ids = case.lesion_id[f.box][rel]
    ids[mask] = lesion_id


def _add_lesions(case: _Case, vt: _Vertebra, f: _VertebraFields) -> None:
    rng = case.rng
    n = int(rng.integers(1, 5))
    pattern = rng.choice(["lytic", "blastic", "mixed"], p=LESION_PATTERNS[case.lesion_kinds])
    if pattern == "mixed":
        n = max(n, 2)
        kinds = ["lytic", "blastic", *rng.choice(["lytic", "blastic"], n - 2)]
    else:
        kinds = [str(pattern)] * n
    for kind in kinds:
        _add_lesion(case, vt, f, str(kind))


# ----------------------------------------------------------------------------------------------------------
# Benign mimics


def _local_coords(case: _Case, vt: _Vertebra, f: _VertebraFields, rel: tuple[slice, slice, slice]):
    """Vertebra-frame coordinates (u, v, w) of a sub-box given relative to the vertebra box."""
    box = tuple(slice(o.start + s.start, o.start + s.stop) for s, o in zip(rel, f.box, strict=True))
    return vt.frame.local(*case.grid.coords(box))


def _mimic_bone_island(case, vt, f):
    rng = case.rng
    centre = _point_in_body(rng, vt, 0.5)
    r = float(rng.uniform(1.5, 4.0))  # 3-8 mm core: enostoses are < 1 cm
    hu = float(np.clip(rng.normal(1190, 120), 1000, 1450))  # Ulano 2016: 1190 +- 239 HU
    blob = _blob(case, vt, f, centre, np.array([r, r, r]) * rng.uniform(0.8, 1.2, 3), 0.15, 0.3)
    if blob is None:
        return None
    rel, alpha = blob
    u, v, w = _local_coords(case, vt, f, rel)
    spikes = np.full(alpha.shape, 1e3, dtype=np.float32)
    for _ in range(int(rng.integers(6, 13))):  # spiculated "brush" border
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        tip = centre + direction * (r + rng.uniform(1.0, 3.0))
        np.minimum(spikes, _capsule(u, v, w, centre, tip, float(rng.uniform(0.35, 0.6))), out=spikes)
    thin = min(1.0, 1.0 / min(case.grid.spacing))
    alpha = np.maximum(alpha, _occupancy(spikes, min(case.grid.spacing)) * thin * 0.8)
    return rel, alpha, hu, "interior"


def _mimic_haemangioma(case, vt, f):
    rng = case.rng
    centre = _point_in_body(rng, vt, 0.5) * 0.5
    radii = np.array(
        [rng.uniform(0.2, 0.42) * vt.width, rng.uniform(0.2, 0.42) * vt.depth, rng.uniform(0.25, 0.45) * vt.height]
    )
    blob = _blob(case, vt, f, centre, radii, 0.1, 1.5)
    if blob is None:
        return None
    rel, alpha = blob
    u, v, _ = _local_coords(case, vt, f, rel)
    step = float(rng.uniform(3.0, 4.5))
    cols = np.full(np.broadcast_shapes(u.shape, v.shape), 1e3, dtype=np.float32)
    for cu in np.arange(centre[0] - radii[0], centre[0] + radii[0] + step, step):
        for cv in np.arange(centre[1] - radii[1], centre[1] + radii[1] + step, step):
            jitter = rng.uniform(-0.3, 0.3, 2) * step
            np.minimum(
                cols, np.sqrt((u - cu - jitter[0]) ** 2 + (v - cv - jitter[1]) ** 2) - rng.uniform(0.6, 1.0), out=cols
            )
    fatty = float(rng.uniform(-40, 20))
    trabecula = float(rng.uniform(350, 600))  # thick vertical trabeculae: "corduroy" / "polka dot"
    col_alpha = _occupancy(cols, min(case.grid.spacing[:2]))
    value = fatty * (1 - col_alpha) + trabecula * col_alpha
    return rel, alpha, np.broadcast_to(value, alpha.shape), "interior"


def _mimic_schmorl(case, vt, f):
    rng = case.rng
    side = rng.choice([-1.0, 1.0])
    r = float(rng.uniform(2.5, 6.0))
    p = np.array([rng.uniform(-0.25, 0.25) * vt.width, rng.uniform(-0.2, 0.3) * vt.depth, 0.0])
    rad2 = (abs(p[0]) / (vt.width / 2)) ** 2 + (abs(p[1]) / (vt.depth / 2)) ** 2
    p[2] = side * (vt.height / 2 - vt.concavity * (1 - rad2) + 0.3 * r)
    rim = float(rng.uniform(1.0, 2.5))
    blob = _blob(case, vt, f, p, np.array([r, r, r * 0.9]), 0.0, 0.3)
    if blob is None:
        return None
    rel, _ = blob
    u, v, w = _local_coords(case, vt, f, rel)
    d, h = _as_distance(np.sqrt((u - p[0]) ** 2 + (v - p[1]) ** 2 + ((w - p[2]) / 0.9) ** 2) - r, case.grid.spacing)
    defect, shell = _occupancy(d, h), _occupancy(d - rim, h)
    sclerotic = float(rng.uniform(450, 800))  # corticated, sclerotic rim; disc material inside
    value = (defect * case.disc_hu + (shell - defect) * sclerotic) / np.maximum(shell, 1e-3)
    return rel, shell, value, "whole"


def _mimic_endplate_sclerosis(case, vt, f):
    rng = case.rng
    side = rng.choice([-1.0, 1.0])
    thick = float(rng.uniform(2.0, 6.0))
    hu = float(rng.uniform(400, 700))
    rad2 = np.clip((f.u / (vt.width / 2)) ** 2 + (f.v / (vt.depth / 2)) ** 2, 0, 1)
    depth_below = (vt.height / 2 - vt.concavity * (1 - rad2)) - side * f.w  # mm under the chosen endplate
    ragged = 1.2 * _smooth_noise(rng, f.d_body.shape, [3 / s for s in case.grid.spacing[::-1]])
    anterior = float(rng.uniform(-0.6, 0.3))  # degenerative bands often favour the anterior half
    g_band = np.maximum(depth_below - thick - ragged, (f.v / (vt.depth / 2) - anterior - 0.7) * 8)
    alpha = _occupancy(g_band, 1.5) * (f.body_side & (side * f.w > 0))
    rel = (slice(None),) * 3
    return rel, alpha.astype(np.float32), hu, "interior"


def _mimic_osteophyte(case, vt, f):
    rng = case.rng
    side = rng.choice([-1.0, 1.0])
    ang = (
        float(rng.uniform(-0.5, 0.5) * np.pi)
        if rng.random() < 0.6
        else float(rng.choice([-1, 1]) * rng.uniform(0.45, 0.6) * np.pi)
    )
    out = np.array([math.sin(ang), -math.cos(ang), 0.0])  # anterior (v < 0) or lateral
    a, b = vt.width / 2, vt.depth / 2
    rim = np.array([out[0] * a * 0.97, out[1] * b * 0.97, side * (vt.height / 2 - 0.6)])
    length = float(rng.uniform(3.0, 8.0))
    vertical = min(0.4 * vt.disc_below, 0.5 * length)
    p1 = rim + out * length * 0.6 + np.array([0, 0, side * vertical * 0.4])
    p2 = p1 + out * length * 0.4 + np.array([0, 0, side * vertical * 0.6])
    hu = float(rng.uniform(450, 800))
    g = case.grid
    d = np.minimum(_capsule(f.u, f.v, f.w, rim - out * 2, p1, 2.2), _capsule(f.u, f.v, f.w, p1, p2, 1.2))
    d, h = _as_distance(d, g.spacing)
    return (slice(None),) * 3, _occupancy(d, h), hu, "outside", d


def _mimic_focal_fat(case, vt, f):
    rng = case.rng
    centre = _point_in_body(rng, vt, 0.5)
    r = float(rng.uniform(3.0, 8.0))
    blob = _blob(case, vt, f, centre, r * rng.uniform(0.7, 1.3, 3), 0.3, 1.0)
    if blob is None:
        return None
    rel, alpha = blob
    return rel, alpha, float(rng.uniform(-100, -50)), "interior"


_MIMICS: dict[str, Callable] = {
    "bone_island": _mimic_bone_island,
    "haemangioma": _mimic_haemangioma,
    "schmorl_node": _mimic_schmorl,
    "endplate_sclerosis": _mimic_endplate_sclerosis,
    "osteophyte": _mimic_osteophyte,
    "focal_fat": _mimic_focal_fat,
}


def _add_mimics(case: _Case, vt: _Vertebra, f: _VertebraFields, mimic_ids: np.ndarray, next_id: int) -> int:
    """Paint 1-2 benign mimics into the vertebra fields; returns the next free instance id."""
    rng = case.rng
    n = 1 if rng.random() < 0.7 else 2
    kinds = rng.choice(MIMIC_KINDS, size=n, replace=False, p=_MIMIC_WEIGHTS / _MIMIC_WEIGHTS.sum())
    for kind in kinds:
        made = _MIMICS[str(kind)](case, vt, f)
        if made is None:
            continue
        rel, alpha, value, where = made[:4]
        rec = MimicRecord(next_id, str(kind), float(np.mean(value)))
        vt.record.mimics.append(rec)
        if where == "outside":  # osteophyte: bone beyond the body, part of the vertebra label
            d_ost = made[4]
            outside = alpha * (1 - f.outer)
            f.extra.append((outside, value, MIMIC_T))
            f.d_union = np.minimum(f.d_union, d_ost)
            mask = outside >= 0.5
        else:
            interior = f.interior_hu[rel]
            interior[...] = interior * (1 - alpha) + alpha * value
            if where == "whole":
                cortex = f.cortex_hu[rel]
                cortex[...] = cortex * (1 - alpha) + alpha * value
            mask = alpha * (f.outer[rel] if where == "whole" else f.inner[rel]) >= 0.5
        f.tissue_code[rel][mask] = MIMIC_T
        mimic_ids[f.box][rel][mask] = next_id
        next_id += 1
    return next_id


# ----------------------------------------------------------------------------------------------------------
# Scanner, orientation, assembly


def _scanner(rng: np.random.Generator, hu: np.ndarray, spacing, psf_fwhm: float, sigma: float) -> np.ndarray:
    """Gaussian PSF blur, then correlated (smoothed white) noise of standard deviation sigma HU."""
    psf_sigma = psf_fwhm / 2.3548
    blurred = ndimage.gaussian_filter(hu, [psf_sigma / s for s in spacing[::-1]], truncate=3.0)
    noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32), 0.6, truncate=3.0)
    noise *= np.float32(sigma / (noise.std() + 1e-6))
    return blurred + noise


def _reorient(array: np.ndarray, code: str) -> np.ndarray:
    """Canonical LPS (z, y, x) array -> numpy array of an image whose axes point as `code` says."""
    axes = _axes(code)
    perm = [0, 0, 0]
    for n, (a, _) in enumerate(axes):
        perm[2 - n] = 2 - a
    out = np.transpose(array, perm)
    flips = tuple(2 - n for n, (_, f) in enumerate(axes) if f)
    return np.ascontiguousarray(np.flip(out, flips) if flips else out)


def to_canonical(array: np.ndarray, code: str) -> np.ndarray:
    """Inverse of the phantom's reorientation: image array with axes `code` -> LPS array in (z, y, x) order."""
    axes = _axes(code)
    flips = tuple(2 - n for n, (_, f) in enumerate(axes) if f)
    a = np.flip(array, flips) if flips else array
    perm = [0, 0, 0]
    for n, (ax, _) in enumerate(axes):
        perm[2 - ax] = 2 - n
    return np.transpose(a, perm)


def _geometry(grid: _Grid, code: str, offset: np.ndarray):
    """Spacing, origin and direction of the reoriented image (world = LPS frame + table offset)."""
    axes = _axes(code)
    spacing = tuple(grid.spacing[a] for a, _ in axes)
    direction = np.zeros((3, 3))
    origin = np.array(grid.origin, dtype=float) + offset
    for n, (a, flip) in enumerate(axes):
        direction[a, n] = -1.0 if flip else 1.0
        if flip:
            origin[a] += grid.spacing[a] * (grid.shape[2 - a] - 1)
    return spacing, tuple(float(o) for o in origin), tuple(float(d) for d in direction.ravel())


def generate_case(
    rng_or_seed: int | np.random.Generator,
    *,
    levels: Sequence[str] = ("T11", "T12", "L1", "L2", "L3"),
    spacing: float | Sequence[float] | None = None,
    orientation: str | None = None,
    lesion_rate: float = 0.5,
    mimic_rate: float = 0.33,
    size: tuple[float, float] = (150.0, 170.0),
    lytic_hu: tuple[float, float] = LYTIC_HU,
    lytic_min_mm: float = 3.0,
    lesion_kinds: str = "both",
    paint_lesions: bool = True,
) -> PhantomCase:
    """Generate one synthetic CT case.

    spacing: image-axis spacing in mm (x, y, z of the written image, or one number); None draws 0.5-1.5 mm
    in-plane and 1-3 mm between slices. orientation: axis code such as RAS, LPS or PIR; None draws one of
    ORIENTATIONS. size: in-plane field of view (left-right, anterior-posterior) in mm. A requested level is
    malignant with probability lesion_rate and carries 1-2 benign mimics with probability mimic_rate.
    lytic_hu (low, high) and lytic_min_mm (smallest lytic diameter) can make lytic lesions easier to see than
    the literature's, for a training curriculum, and lesion_kinds 'lytic' or 'blastic' gives every malignant
    vertebra lesions of that kind only (at the defaults a seed gives the same case as before these existed).
    paint_lesions=False gives the case's *healthy twin*: every random draw, label map and lesion record is the
    same, but no lesion changes the HU, so the CT is what a perfect healthy edit of the lesioned case would show.
    The anatomy depends only on the seed and the levels, never on spacing-independent choices such as orientation.
    """
    for name, rate in (("lesion_rate", lesion_rate), ("mimic_rate", mimic_rate)):
        if not 0.0 <= float(rate) <= 1.0:
            raise InputError(f"{name} must lie in [0, 1], got {rate}")
    if len(size) != 2 or not all(60 <= float(s) <= 500 for s in size):
        raise InputError(f"size {size!r} must be two lengths (left-right, anterior-posterior) in 60-500 mm")
    if len(lytic_hu) != 2 or not -40 <= float(lytic_hu[0]) <= float(lytic_hu[1]) <= 100:
        raise InputError(f"lytic_hu {lytic_hu!r} must be two HU values, low <= high, in -40..100 (soft tissue; "
                         "below -40 is fat, which the phantoms use for benign focal fat)")
    if not 3.0 <= float(lytic_min_mm) <= 20.0:
        raise InputError(f"lytic_min_mm {lytic_min_mm} must lie in 3-20 mm (lesions are at most 20 mm)")
    if lesion_kinds not in LESION_PATTERNS:
        raise InputError(f"lesion_kinds {lesion_kinds!r} must be one of {', '.join(LESION_PATTERNS)}")
    idx = _parse_levels(levels)
    seed = int(rng_or_seed) if isinstance(rng_or_seed, (int, np.integer)) else None
    root = np.random.default_rng(rng_or_seed) if seed is not None else rng_or_seed
    acq_rng, anat_rng, scan_rng = root.spawn(3)
    drawn_code = ORIENTATIONS[int(acq_rng.integers(len(ORIENTATIONS)))]
    code = _check_orientation(orientation) if orientation is not None else drawn_code
    img_spacing = _draw_spacing(acq_rng, spacing)
    psf = float(acq_rng.uniform(0.6, 1.0))
    sigma = float(acq_rng.uniform(10, 25))
    offset = acq_rng.uniform(-60, 60, 3)
    spacing_lps = [0.0, 0.0, 0.0]
    for s, (a, _) in zip(img_spacing, _axes(code), strict=True):
        spacing_lps[a] = s

    rng = anat_rng
    age = float(rng.uniform(30, 85))
    verts = _layout_spine(rng, idx, float(rng.uniform(0.5, 1.2)), float(np.clip(rng.normal(1.0, 0.05), 0.88, 1.12)))
    skin_y = max(_spinous_tip_y(v) for v in verts) + float(rng.uniform(12, 30))
    grid = _build_grid(verts, spacing_lps, (float(size[0]), float(size[1])), skin_y + float(rng.uniform(6, 18)))
    blood = float(rng.uniform(130, 220)) if rng.random() < 0.6 else float(rng.uniform(35, 50))
    case = _Case(
        rng, grid, verts, age,
        fat_hu=float(rng.uniform(-100, -80)),
        muscle_hu=float(np.clip(50 - 0.25 * (age - 30) + rng.normal(0, 3), 30, 55)),
        disc_hu=float(rng.uniform(64, 76)),
        blood_hu=blood, skin_y=skin_y, fat_thickness=float(rng.uniform(6, 25)),
        lesion_rate=float(lesion_rate), mimic_rate=float(mimic_rate),
        min_lesion_mm=max(3.0, 2.0 * max(img_spacing)),
        lytic_hu=(float(lytic_hu[0]), float(lytic_hu[1])), lytic_min_mm=float(lytic_min_mm),
        lesion_kinds=lesion_kinds, paint_lesions=bool(paint_lesions),
    )  # fmt: skip
    # Jang et al. 2019: L1 trabecular attenuation falls ~2.5 HU/year from ~226 HU (< 30 y)
    base_hu = float(np.clip(226 - 2.5 * (age - 27) + rng.normal(0, 20), 105, 255))
    for vt in verts:
        _draw_vertebra_params(case, vt, base_hu)
    hu, tissue, labels, body, mimic_ids = _render(case)
    ct = _scanner(scan_rng, hu, grid.spacing, psf, sigma)
    ct = np.clip(np.rint(ct), -1024, 3071).astype(np.int16)
    lesion_map = np.zeros(case.lesion_id.shape, dtype=np.uint8)
    for i, (vt, rec) in enumerate(case.lesion_list, start=1):  # a mask counts only inside its own vertebra
        hit = (case.lesion_id == i) & (labels == vt.record.label)
        rec.n_voxels = int(hit.sum())
        lesion_map[hit] = LYTIC if rec.kind == "lytic" else BLASTIC
    mimic_ids[lesion_map > 0] = 0  # a lesion painted over a mimic owns those voxels
    for vt in verts:
        for m in vt.record.mimics:
            hit = mimic_ids == m.instance
            mimic_ids[hit & (labels != vt.record.label)] = 0
            m.n_voxels = int((hit & (labels == vt.record.label)).sum())
    spacing_img, origin, direction = _geometry(grid, code, offset)
    return PhantomCase(
        ct=_reorient(ct, code), vertebrae=_reorient(labels, code), body=_reorient(body, code),
        lesions=_reorient(lesion_map, code), mimics=_reorient(mimic_ids, code), tissue=_reorient(tissue, code),
        spacing=spacing_img, origin=origin, direction=direction, orientation=code,
        records=[vt.record for vt in verts], seed=seed, age=round(age, 1), noise_sigma=round(sigma, 2),
        psf_fwhm_mm=round(psf, 3), disc_hu=round(case.disc_hu, 1), fat_hu=round(case.fat_hu, 1),
        muscle_hu=round(case.muscle_hu, 1),
    )  # fmt: skip


def _render(case: _Case):
    """Noise-free HU, tissue classes and label maps on the canonical grid."""
    shape = case.grid.shape
    hu = np.empty(shape, dtype=np.float32)
    tissue = np.empty(shape, dtype=np.uint8)
    _render_soft_tissue(case, hu, tissue)
    for upper, lower in zip(case.verts[:-1], case.verts[1:], strict=True):
        _render_disc(case, upper, lower, hu, tissue)
    for vt in case.verts:
        if vt.index < LEVEL_NAMES.index("L1"):
            _render_ribs(case, vt, hu, tissue)
    labels = np.zeros(shape, dtype=np.uint8)
    body = np.zeros(shape, dtype=np.uint8)
    mimic_ids = np.zeros(shape, dtype=np.uint8)
    case.lesion_id = np.zeros(shape, dtype=np.uint16)
    label_d = np.full(shape, 1e3, dtype=np.float32)
    next_id = 1
    for vt in case.verts:
        box = _vertebra_box(case, vt)
        if box is None:
            continue
        f = _vertebra_fields(case, vt, box)
        if vt.in_levels:
            malignant = case.rng.random() < case.lesion_rate
            has_mimic = case.rng.random() < case.mimic_rate
            if has_mimic and next_id < 250:
                next_id = _add_mimics(case, vt, f, mimic_ids, next_id)
            if malignant:
                _add_lesions(case, vt, f)
        _composite_vertebra(case, vt, f, hu, tissue, label_d, labels, body)
    return hu, tissue, labels, body, mimic_ids


# ----------------------------------------------------------------------------------------------------------
# Writing


def write_case(case: PhantomCase, out_dir: str | Path, name: str) -> dict[str, Path]:
    """Write the five NIfTI files (shared geometry) and the mimic JSON sidecar; returns the paths by kind."""
    out = Path(out_dir)
    paths = {kind: out / f"{name}_{kind}.nii.gz" for kind in ("ct", "vertebrae", "body", "lesions", "mimics")}
    for kind, path in paths.items():
        sitk.WriteImage(case.image(getattr(case, kind)), str(path), useCompression=True)
    paths["mimics_json"] = out / f"{name}_mimics.json"
    table = {str(k): v for k, v in case.mimic_table().items()}
    paths["mimics_json"].write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    return paths


MANIFEST_COLUMNS = ("case", "ct", "vertebrae", "body", "lesions", "mimics", "label", "level", "malignant",
                    "n_lytic", "n_blastic", "mimic_kinds", "seed")  # fmt: skip


def _check_replaceable(out_dir: Path, overwrite: bool) -> None:
    """Refuse before any case is generated; even with ``overwrite``, replace only a phantom set."""
    check_output_dir(out_dir, overwrite)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "manifest.csv").is_file():
        raise InputError(
            f"{out_dir} is not empty and holds no manifest.csv (not a phantom set): refusing to replace it"
        )


def write_phantom_set(
    out_dir: str | Path,
    n_cases: int,
    seed: int,
    *,
    overwrite: bool = False,
    report: Callable[[str], None] | None = None,
    **kwargs,
) -> Path:
    """Generate n_cases cases into out_dir (written in a temporary folder, moved into place at the end).

    Case i is generate_case(seed_i, **kwargs) with seed_i from SeedSequence(seed); seed_i is in the manifest,
    so one case can be regenerated alone. Returns the path of manifest.csv.
    """
    out = Path(out_dir).expanduser().resolve()
    if int(n_cases) < 1:
        raise InputError(f"the number of cases must be at least 1, got {n_cases}")
    _check_replaceable(out, overwrite)
    case_seeds = np.random.SeedSequence(int(seed)).generate_state(int(n_cases))
    with atomic_output_dir(out, overwrite) as tmp:
        rows = []
        for i, case_seed in enumerate(case_seeds):
            name = f"case_{i:04d}"
            case = generate_case(int(case_seed), **kwargs)
            paths = write_case(case, tmp, name)
            rows += _manifest_rows(case, name, paths)
            if report is not None:
                report(_summary(case, name))
        with (tmp / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    return out / "manifest.csv"


def _manifest_rows(case: PhantomCase, name: str, paths: dict[str, Path]) -> list[dict]:
    files = {kind: paths[kind].name for kind in ("ct", "vertebrae", "body", "lesions", "mimics")}
    return [
        {"case": name, **files, "label": r.label, "level": r.level, "malignant": int(r.malignant),
         "n_lytic": r.n_lytic, "n_blastic": r.n_blastic, "mimic_kinds": ";".join(r.mimic_kinds), "seed": case.seed}
        for r in case.records
        if r.in_levels
    ]  # fmt: skip


def _summary(case: PhantomCase, name: str) -> str:
    recs = [r for r in case.records if r.in_levels]
    mal = [f"{r.level}({r.n_lytic}L/{r.n_blastic}B)" for r in recs if r.malignant]
    mimics = sum(len(r.mimic_kinds) for r in recs)
    spacing = "x".join(f"{s:.2f}" for s in case.spacing)
    return (f"{name}: {case.orientation} {spacing} mm, {len(recs)} vertebrae, malignant: {', '.join(mal) or 'none'}; "
            f"{mimics} mimics; age {case.age:.0f}")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Overview figure


_VIEW_WINDOW = (-200.0, 1000.0)
"""HU shown black..white in the overview: bone detail with lytic lesions still distinguishable from marrow."""


def render_phantom_overview(case: PhantomCase, path: str | Path) -> Path:
    """PNG for eyeballing realism and masks: the mid-sagittal slice with lesion/mimic outlines and level names,
    the sagittal and axial slices through the most lesion (else mimic) voxels. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ct, les, mim, lab, body = (
        to_canonical(a, case.orientation) for a in (case.ct, case.lesions, case.mimics, case.vertebrae, case.body)
    )
    sp = [0.0, 0.0, 0.0]
    for s, (a, _) in zip(case.spacing, _axes(case.orientation), strict=True):
        sp[a] = s
    xs = np.nonzero(body.any(axis=(0, 1)))[0]
    x_mid = int(np.median(xs)) if len(xs) else ct.shape[2] // 2
    focus = les > 0 if (les > 0).any() else (mim > 0 if (mim > 0).any() else body > 0)
    x_focus = int(np.argmax(focus.sum(axis=(0, 1))))
    k_focus = int(np.argmax(focus.sum(axis=(1, 2))))
    fig, panels = plt.subplots(1, 3, figsize=(17, 7))
    for ax, x, name in ((panels[0], x_mid, "mid-sagittal"), (panels[1], x_focus, "sagittal through findings")):
        _show(ax, ct[::-1, :, x], les[::-1, :, x], mim[::-1, :, x], sp[2] / sp[1])
        _level_tags(ax, case, lab[::-1, :, x])
        ax.set_title(f"{name} (x index {x}); red lytic, yellow blastic, cyan mimic", fontsize=9)
    _show(panels[2], ct[k_focus], les[k_focus], mim[k_focus], sp[1] / sp[0])
    panels[2].set_title(f"axial (z index {k_focus}); patient's right on the left, anterior up", fontsize=9)
    kinds = sorted({m for r in case.records for m in r.mimic_kinds})
    spacing = " x ".join(f"{s:.2f}" for s in case.spacing)
    title = f"phantom seed {case.seed}: {case.orientation}, spacing {spacing} mm, age {case.age:.0f}, "
    fig.suptitle(title + f"noise {case.noise_sigma:.0f} HU; mimics: {', '.join(kinds) or 'none'}", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _show(ax, ct: np.ndarray, les: np.ndarray, mim: np.ndarray, aspect: float) -> None:
    ax.imshow(ct, cmap="gray", vmin=_VIEW_WINDOW[0], vmax=_VIEW_WINDOW[1], aspect=aspect, interpolation="nearest")
    _outline(ax, les == LYTIC, "tab:red")
    _outline(ax, les == BLASTIC, "gold")
    _outline(ax, mim > 0, "cyan")
    ax.set_xticks([])
    ax.set_yticks([])


def _level_tags(ax, case: PhantomCase, lab: np.ndarray) -> None:
    for r in case.records:
        rows = np.nonzero((lab == r.label).any(axis=1))[0]
        if len(rows):
            tag = r.level + (" M" if r.malignant else "") + ("" if r.in_levels else " (partial)")
            ax.text(2, float(np.median(rows)), tag, color="yellow" if r.malignant else "white", fontsize=8, va="center")


def _outline(ax, mask: np.ndarray, color: str) -> None:
    if mask.any():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[color], linewidths=0.8)
