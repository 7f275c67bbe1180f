"""Exact, invertible geometry between a CT volume and the model's 2-D sagittal vertebra slices.

Every vertebra gets its own *model grid*: a 3-D grid of ``S x N x N`` points with axes [slice, row, column] where
the slice axis runs from the patient's right to left, rows from superior to inferior and columns from anterior to
posterior (``preprocessing.SLICE_CONVENTION``). Its axes are the CT's own image axes closest to L-R, S-I and A-P,
permuted and flipped, never rotated: the slice planes are therefore exactly CT planes (no interpolation across
them), and mapping a slice mask back by nearest neighbour is the exact inverse. In-plane the grid is a square
field of view around the body's S-I x A-P bounding box, widened by ``crop_margin`` on each side, sampled with
square pixels: N x N, whatever the CT spacing, so a vertebra keeps its aspect ratio.

``mid`` mode takes the single CT sagittal plane nearest the body's L-R centre; ``3d`` mode takes every CT sagittal
plane that cuts the body.

The published model's slices are laid out differently (``preprocessing.PUBLISHED_SLICE_LAYOUT``): its demo
reads plane 32 along the third axis of a 64-cube crop, rows = first axis, columns = second axis. In the published
sample that second axis is S-I (discs and neighbouring endplates lie at both of its ends) and the first is A-P with the
rounded anterior wall at index 0 and the flat posterior wall, pedicle roots and paravertebral lung at the high
end, i.e. a TPTBox P-I-R crop whose header was replaced by a placeholder: our slice transposed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .preprocessing import Preprocessing

MODES = ("mid", "3d")
MIN_BODY_VOXELS = 50
"""A body with fewer voxels is a segmentation fragment, not a vertebra worth a slice."""
MIN_BODY_EXTENT_MM = 8.0
"""The smallest real vertebral body (C3) is about 15 mm across; under 8 mm along any axis it is a fragment."""

_GEOMETRY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class PatientAxes:
    """Which image axis (0, 1, 2 in SimpleITK index order x, y, z) runs closest to each patient axis.

    The signs say whether the index grows toward the patient's left, inferior and posterior side (+1) or the
    opposite (-1). SimpleITK directions are LPS: +x left, +y posterior, +z superior.
    """

    lr: int
    si: int
    ap: int
    lr_sign: int
    si_sign: int
    ap_sign: int

    @property
    def code(self) -> str:
        """Orientation code in the nibabel sense (the side each image axis points to), e.g. ``RAS`` or ``PIR``."""
        letters = {self.lr: "LR"[self.lr_sign < 0], self.si: "IS"[self.si_sign < 0], self.ap: "PA"[self.ap_sign < 0]}
        return "".join(letters[a] for a in range(3))


def direction_matrix(image: sitk.Image) -> np.ndarray:
    """The 3x3 direction matrix whose columns are the image axes in LPS coordinates."""
    return np.array(image.GetDirection(), dtype=float).reshape(3, 3)


def patient_axes(image: sitk.Image, name: str = "image") -> PatientAxes:
    """Assign each patient axis to the image axis most parallel to it (any permutation and flip).

    The assignment maximises the summed |cosine| over the six permutations, so oblique scans get the nearest
    axis-aligned reading instead of an error.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{name}: need a 3-D scalar volume, got {image.GetDimension()}-D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel"
        )
    d = direction_matrix(image)

    def score(p: tuple[int, ...]) -> float:
        return abs(d[0, p[0]]) + abs(d[1, p[1]]) + abs(d[2, p[2]])

    lr, ap, si = max(itertools.permutations(range(3)), key=score)
    return PatientAxes(
        lr=lr,
        si=si,
        ap=ap,
        lr_sign=1 if d[0, lr] > 0 else -1,
        si_sign=1 if d[2, si] < 0 else -1,
        ap_sign=1 if d[1, ap] > 0 else -1,
    )


@dataclass
class VertebraSlices:
    """Sagittal slices of one vertebra and the model grid they were sampled on (everything to map them back).

    Arrays are (S, N, N): slice, row (superior->inferior), column (anterior->posterior). ``origin`` is the
    physical point (LPS, mm) of pixel [0, 0, 0]; ``direction`` has the unit vectors of the slice, row and column
    axes as columns (toward left, inferior, posterior); ``spacing`` is (slice, row, column) in mm.
    ``slice_indices`` are the CT indices, along image axis ``axes.lr``, of the planes the slices lie in.
    ``inside`` marks pixels inside the CT's field of view; outside it ``images`` repeat the nearest edge voxel.
    """

    level: str
    mode: str
    images: np.ndarray
    body: np.ndarray
    inside: np.ndarray
    origin: np.ndarray
    direction: np.ndarray
    spacing: np.ndarray
    slice_indices: np.ndarray
    axes: PatientAxes
    ct_size: tuple[int, int, int]
    ct_origin: tuple[float, float, float]
    ct_spacing: tuple[float, float, float]
    ct_direction: tuple[float, ...]

    @property
    def pixel_mm(self) -> float:
        """In-plane pixel size in mm (square pixels)."""
        return float(self.spacing[1])

    def grid_image(self, values: np.ndarray | None = None) -> sitk.Image:
        """The model grid as a SimpleITK image (x = column, y = row, z = slice) holding ``values`` (S, N, N)."""
        array = np.zeros(self.images.shape, np.uint8) if values is None else values
        image = sitk.GetImageFromArray(array)
        image.SetOrigin(tuple(float(v) for v in self.origin))
        image.SetSpacing((float(self.spacing[2]), float(self.spacing[1]), float(self.spacing[0])))
        columns = self.direction[:, [2, 1, 0]]
        image.SetDirection(tuple(float(v) for v in columns.ravel()))
        return image

    def physical_points(self) -> np.ndarray:
        """LPS coordinates (S, N, N, 3) of every pixel centre."""
        s, r, c = (np.arange(n, dtype=float) for n in self.images.shape)
        steps = self.direction * self.spacing  # column k = one step along axis k
        grid = np.stack(np.meshgrid(s, r, c, indexing="ij"), axis=-1)
        return self.origin + grid @ steps.T


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """True when two images share size, spacing, origin and direction (to a small tolerance)."""
    if a.GetSize() != b.GetSize():
        return False
    spacing = np.array(a.GetSpacing())
    return (
        np.allclose(spacing, b.GetSpacing(), rtol=_GEOMETRY_TOLERANCE, atol=0)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=_GEOMETRY_TOLERANCE * float(spacing.max()))
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=_GEOMETRY_TOLERANCE)
    )


def _bounding_box(body: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive index bounds (x, y, z order) of a non-empty numpy (z, y, x) mask, from its axis projections."""
    bounds = []
    for axis in (2, 1, 0):
        hit = np.flatnonzero(body.any(axis=tuple(k for k in range(3) if k != axis)))
        bounds.append((hit[0], hit[-1]))
    lo, hi = zip(*bounds, strict=True)
    return np.array(lo), np.array(hi)


def _check_body(body: np.ndarray, spacing: np.ndarray, level: str, require_whole: bool) -> None:
    """Refuse bodies too small to be real, or cut by the field of view (their slices would be wrong)."""
    count = int(np.count_nonzero(body))
    if count < MIN_BODY_VOXELS:
        raise InputError(
            f"vertebra {level}: its body mask has {count} voxels (need at least {MIN_BODY_VOXELS}); "
            "check the segmentation or leave this level out"
        )
    lo, hi = _bounding_box(body)
    extent_mm = (hi - lo + 1) * spacing
    if extent_mm.min() < MIN_BODY_EXTENT_MM:
        raise InputError(
            f"vertebra {level}: its body is only {extent_mm.min():.1f} mm thick along one axis "
            f"(need {MIN_BODY_EXTENT_MM:g} mm); it is a fragment, leave this level out"
        )
    size = np.array(body.shape[::-1])
    touching = [a for a in range(3) if lo[a] == 0 or hi[a] == size[a] - 1]
    if require_whole and touching:
        raise InputError(
            f"vertebra {level}: its body touches the image border (image axis {touching[0]}), so it "
            "is cut off by the field of view; use a scan that covers it or leave this level out"
        )


def _corner_indices(slices: VertebraSlices, image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box, in ``image`` index space (x, y, z), of the model grid's extent (half a pixel around it)."""
    size = np.asarray(slices.images.shape, float)
    corners = [
        slices.origin + slices.direction @ (np.where(np.array(sel) == 1, size - 0.5, -0.5) * slices.spacing)
        for sel in itertools.product((0, 1), repeat=3)
    ]
    d = direction_matrix(image) * np.array(image.GetSpacing())
    idx = np.linalg.solve(d, (np.array(corners) - np.array(image.GetOrigin())).T).T
    size_img = np.array(image.GetSize())
    lo = np.clip(np.floor(idx.min(axis=0)).astype(int) - 1, 0, size_img - 1)
    hi = np.clip(np.ceil(idx.max(axis=0)).astype(int) + 1, 0, size_img - 1)
    return lo, hi


def _region(image: sitk.Image, lo: np.ndarray, hi: np.ndarray) -> sitk.Image:
    """The sub-volume lo..hi (inclusive, index order x, y, z), keeping its physical placement."""
    return image[int(lo[0]) : int(hi[0]) + 1, int(lo[1]) : int(hi[1]) + 1, int(lo[2]) : int(hi[2]) + 1]


def _inside(slices: VertebraSlices, ct: sitk.Image) -> np.ndarray:
    """Which pixel centres fall inside the CT voxel grid (the half-open box -0.5 .. size - 0.5 of indices)."""
    d = direction_matrix(ct) * np.array(ct.GetSpacing())
    pts = slices.physical_points() - np.array(ct.GetOrigin())
    idx = np.linalg.solve(d, pts.reshape(-1, 3).T).T.reshape(pts.shape)
    size = np.array(ct.GetSize())
    return np.all((idx >= -0.5) & (idx < size - 0.5), axis=-1)


def extract_vertebra_slices(
    ct: sitk.Image,
    body_mask: sitk.Image,
    preprocessing: Preprocessing,
    mode: str = "mid",
    level: str = "vertebra",
    require_whole: bool = True,
) -> VertebraSlices:
    """Sample the sagittal slices of one vertebral body (``body_mask``: non-zero = body, on the CT's grid).

    Images are HU (float32, linear interpolation), the body mask nearest-neighbour. ``require_whole=False``
    accepts a body that touches the image border (pre-cropped patches such as the published sample).
    """
    if mode not in MODES:
        raise InputError(f"unknown slice mode {mode!r}: use one of {', '.join(MODES)}")
    axes = patient_axes(ct, "CT")
    if not same_grid(ct, body_mask):
        raise InputError(
            f"vertebra {level}: the body mask is not on the CT's voxel grid (size, spacing, origin "
            "and direction must match); resample it to the CT first"
        )
    body = sitk.GetArrayViewFromImage(body_mask) != 0
    spacing = np.array(ct.GetSpacing(), float)
    _check_body(body, spacing, level, require_whole)

    lo, hi = _bounding_box(body)
    d = direction_matrix(ct)
    u_slice, u_row, u_col = d[:, axes.lr] * axes.lr_sign, d[:, axes.si] * axes.si_sign, d[:, axes.ap] * axes.ap_sign

    extent = max((hi[a] - lo[a] + 1) * spacing[a] for a in (axes.si, axes.ap))
    n = preprocessing.image_size
    pixel = extent * (1.0 + 2.0 * preprocessing.crop_margin) / n

    if mode == "mid":
        planes = np.array([int(np.floor((lo[axes.lr] + hi[axes.lr]) / 2.0 + 0.5))])
    else:
        planes = np.arange(lo[axes.lr], hi[axes.lr] + 1)
        if axes.lr_sign < 0:
            planes = planes[::-1]
    centre_index = (lo + hi) / 2.0
    centre_index[axes.lr] = planes[0]
    first_plane_centre = np.array(ct.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in centre_index)))
    origin = first_plane_centre - 0.5 * (n - 1) * pixel * (u_row + u_col)

    slices = VertebraSlices(
        level=level,
        mode=mode,
        images=np.zeros((len(planes), n, n), np.float32),
        body=np.zeros((len(planes), n, n), bool),
        inside=np.zeros((len(planes), n, n), bool),
        origin=origin,
        direction=np.stack([u_slice, u_row, u_col], axis=1),
        spacing=np.array([spacing[axes.lr], pixel, pixel]),
        slice_indices=planes,
        axes=axes,
        ct_size=tuple(int(v) for v in ct.GetSize()),
        ct_origin=tuple(float(v) for v in ct.GetOrigin()),
        ct_spacing=tuple(float(v) for v in ct.GetSpacing()),
        ct_direction=tuple(float(v) for v in ct.GetDirection()),
    )
    grid = slices.grid_image()
    roi_lo, roi_hi = _corner_indices(slices, ct)
    roi = sitk.Cast(_region(ct, roi_lo, roi_hi), sitk.sitkFloat32)
    images = sitk.Resample(roi, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32, True)
    slices.images = sitk.GetArrayFromImage(images).astype(np.float32, copy=False)
    slices.body = sample_labels(slices, body_mask != 0).astype(bool)
    slices.inside = _inside(slices, ct)
    return slices


def sample_labels(slices: VertebraSlices, labels: sitk.Image) -> np.ndarray:
    """A label image on the CT grid sampled nearest-neighbour on the slices' grid: (S, N, N) uint16."""
    lo, hi = _corner_indices(slices, labels)
    roi = sitk.Cast(_region(labels, lo, hi), sitk.sitkUInt16)
    grid = slices.grid_image()
    return sitk.GetArrayFromImage(sitk.Resample(roi, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                sitk.sitkUInt16))


def _check_reference(slices: VertebraSlices, reference: sitk.Image) -> None:
    geometry = sitk.Image(list(slices.ct_size), sitk.sitkUInt8)
    geometry.SetOrigin(slices.ct_origin)
    geometry.SetSpacing(slices.ct_spacing)
    geometry.SetDirection(slices.ct_direction)
    if not same_grid(geometry, reference):
        raise InputError(
            f"vertebra {slices.level}: the reference volume is not the CT these slices were taken "
            "from (size, spacing, origin or direction differ)"
        )


def slices_to_volume(slices: VertebraSlices, masks: np.ndarray, reference: sitk.Image) -> np.ndarray:
    """Map (S, N, N) label slices back onto the CT grid: numpy (z, y, x) uint8, zero where the grid does not reach.

    Each CT voxel takes the label of the model pixel nearest to its centre, which makes this the exact inverse of
    the sampling in ``extract_vertebra_slices``: in ``mid`` mode only the one CT plane the slice lies in is
    written, in ``3d`` mode each slice writes its own plane.
    """
    masks = np.asarray(masks)
    if masks.shape != slices.images.shape:
        raise InputError(f"vertebra {slices.level}: masks have shape {masks.shape}, the slices {slices.images.shape}")
    if masks.size and (masks.min() < 0 or masks.max() > 255 or not np.all(np.mod(masks, 1) == 0)):
        raise InputError(f"vertebra {slices.level}: masks must hold integer labels 0..255")
    _check_reference(slices, reference)
    lo, hi = _corner_indices(slices, reference)
    target = sitk.Image([int(v) for v in hi - lo + 1], sitk.sitkUInt8)
    target.SetSpacing(reference.GetSpacing())
    target.SetDirection(reference.GetDirection())
    target.SetOrigin(reference.TransformIndexToPhysicalPoint(tuple(int(v) for v in lo)))
    grid = slices.grid_image(masks.astype(np.uint8))
    back = sitk.Resample(grid, target, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    volume = np.zeros(tuple(reversed(slices.ct_size)), np.uint8)
    volume[lo[2] : hi[2] + 1, lo[1] : hi[1] + 1, lo[0] : hi[0] + 1] = sitk.GetArrayFromImage(back)
    return volume
