"""Write lesion labelmaps as 3D Slicer segmentation files (``.seg.nrrd``) with names, colours and terminology.

The format is a plain NRRD image (one layer, one label value per segment) whose header carries Slicer's
``Segment{i}_*`` and ``Segmentation_*`` key/value fields, as read by ``vtkMRMLSegmentationStorageNode`` and by
slicerio. We write the header ourselves instead of going through SimpleITK so that no stray metadata of the
input image leaks into the file and every field is exactly what Slicer expects.

Terminology: the DICOM master list has category ``SCT 49755003 Morphologically Altered Structure``, type
``SCT 14799000 Neoplasm, Secondary`` and anatomic region ``SCT 51282000 Vertebra``, but no code that says
"lytic" or "blastic" (neither DICOM nor the SNOMED qualifier values offer one for metastases). That distinction
is a type modifier from the private coding scheme ``99HSS`` (DICOM reserves designators starting with "99" for
private schemes), defined in ``Resources/Terminology/HideSeekSegment-terminology.term.json`` so that Slicer's
terminology selector shows it. Colours: lytic lesions are dark on CT and blastic ones bright, so lytic is
orange (visible on dark bone defects) and blastic azure blue (visible on bright sclerosis); orange and blue also
stay distinct for red-green colour-blind readers.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .io import atomic_file

TERMINOLOGY_CONTEXT = "Segmentation category and type - HideSeekSegment"
"""Name of our terminology context; must equal ``SegmentationCategoryTypeContextName`` in the .term.json."""
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
TERMINOLOGY_FILE = (
    Path(__file__).resolve().parents[1] / "Resources" / "Terminology" / ("HideSeekSegment-terminology.term.json")
)
PRIVATE_CODING_SCHEME = "99HSS"


@dataclass(frozen=True)
class Code:
    """A coded concept (DICOM coding scheme designator, code value, code meaning)."""

    scheme: str
    value: str
    meaning: str

    def __str__(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}"


CATEGORY = Code("SCT", "49755003", "Morphologically Altered Structure")
TYPE_SECONDARY_NEOPLASM = Code("SCT", "14799000", "Neoplasm, Secondary")
REGION_VERTEBRA = Code("SCT", "51282000", "Vertebra")
MODIFIER_LYTIC = Code(PRIVATE_CODING_SCHEME, "HSS0001", "Lytic")
MODIFIER_BLASTIC = Code(PRIVATE_CODING_SCHEME, "HSS0002", "Blastic")


@dataclass(frozen=True)
class SegmentSpec:
    """One segment of the output: its label value in the labelmap and everything Slicer shows about it."""

    segment_id: str
    name: str
    label: int
    rgb: tuple[int, int, int]  # 0-255, as in the terminology file's recommendedDisplayRGBValue
    type_modifier: Code

    def terminology_entry(self) -> str:
        """Slicer's 7-part ``TerminologyEntry`` string: context~category~type~modifier~anatomic context~region~."""
        return "~".join(
            (
                TERMINOLOGY_CONTEXT,
                str(CATEGORY),
                str(TYPE_SECONDARY_NEOPLASM),
                str(self.type_modifier),
                ANATOMIC_CONTEXT,
                str(REGION_VERTEBRA),
                "^^",
            )
        )

    @property
    def color(self) -> tuple[float, float, float]:
        """The display colour as Slicer stores it (0-1 floats)."""
        r, g, b = self.rgb
        return (r / 255.0, g / 255.0, b / 255.0)


LESION_SEGMENTS: tuple[SegmentSpec, ...] = (
    SegmentSpec("lytic", "Lytic metastasis", 1, (255, 160, 0), MODIFIER_LYTIC),
    SegmentSpec("blastic", "Blastic metastasis", 2, (0, 145, 255), MODIFIER_BLASTIC),
)
"""The engine's two output classes; label values match the lesion labelmap (0 background, 1 lytic, 2 blastic)."""


def write_seg_nrrd(
    path: str | os.PathLike,
    labelmap: sitk.Image,
    segments: Sequence[SegmentSpec] = LESION_SEGMENTS,
) -> Path:
    """Write ``labelmap`` (uint8, 0 = background) as a one-layer Slicer segmentation; returns the path.

    Every segment in ``segments`` is listed even when it has no voxel, so that users see an explicit empty
    "Blastic metastasis" instead of wondering whether it was computed. The file appears atomically.
    """
    out = Path(path)
    if not out.name.endswith(".seg.nrrd"):
        raise ValueError(f"a Slicer segmentation file must end with .seg.nrrd, got {out.name}")
    array = _labelmap_array(labelmap, segments)
    header = _nrrd_header(labelmap, array.shape[::-1]) + _segmentation_fields(labelmap, array, segments)
    with atomic_file(out) as partial, open(partial, "wb") as f:
        f.write(header.encode("utf-8") + b"\n")
        with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=6, mtime=0) as gz:
            gz.write(np.ascontiguousarray(array).data)
    return out


def _labelmap_array(labelmap: sitk.Image, segments: Sequence[SegmentSpec]) -> np.ndarray:
    """The voxels as a (z, y, x) uint8 array, refusing labels that no segment describes."""
    if labelmap.GetDimension() != 3 or labelmap.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("the lesion labelmap must be a 3-D scalar image")
    labels = [s.label for s in segments]
    if len(set(labels)) != len(labels) or len({s.segment_id for s in segments}) != len(segments):
        raise ValueError("segment labels and IDs must be unique")
    if not all(1 <= v <= 255 for v in labels):
        raise ValueError("segment labels must lie in 1..255 (uint8, 0 is background)")
    array = sitk.GetArrayViewFromImage(labelmap)
    if not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() > 255:
        raise ValueError(f"the lesion labelmap must hold integers 0..255, got {array.dtype}")
    array = array.astype(np.uint8, copy=False)
    described = np.zeros(256, bool)
    described[[0, *labels]] = True
    unknown = ~described[array]  # a table lookup: ten times faster than np.unique/bincount on a whole CT
    if unknown.any():
        raise ValueError(f"labelmap holds values {np.unique(array[unknown]).tolist()} that no segment describes")
    return array


def _nrrd_header(image: sitk.Image, size: tuple[int, ...]) -> str:
    """NRRD header in LPS (SimpleITK's physical space), one line per field, ending before the blank line."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), dtype=float)
    axes = " ".join(_vector(direction[:, i] * spacing[i]) for i in range(3))
    return "\n".join(
        (
            "NRRD0004",
            "# Complete NRRD file format specification at:",
            "# http://teem.sourceforge.net/nrrd/format.html",
            "type: unsigned char",
            "dimension: 3",
            "space: left-posterior-superior",
            f"sizes: {' '.join(str(n) for n in size)}",
            f"space directions: {axes}",
            "kinds: domain domain domain",
            "encoding: gzip",
            f"space origin: {_vector(image.GetOrigin())}",
            "",
        )
    )


def _segmentation_fields(image: sitk.Image, array: np.ndarray, segments: Sequence[SegmentSpec]) -> str:
    """Slicer's ``key:=value`` fields: per-segment properties, then segmentation-wide ones."""
    lines = []
    for index, segment in enumerate(segments):
        fields = {
            "Color": " ".join(repr(c) for c in segment.color),
            "ColorAutoGenerated": "0",
            "Extent": " ".join(str(v) for v in _extent(array == segment.label)),
            "ID": segment.segment_id,
            "LabelValue": str(segment.label),
            "Layer": "0",
            "Name": segment.name,
            "NameAutoGenerated": "0",
            "Tags": f"TerminologyEntry:{segment.terminology_entry()}|",
        }
        lines += [f"Segment{index}_{key}:={value}" for key, value in fields.items()]
    lines += [
        "Segmentation_ContainedRepresentationNames:=Binary labelmap|",
        "Segmentation_ConversionParameters:=Reference image geometry|"
        f"{reference_image_geometry(image)}|Image geometry description string determining the geometry of the "
        "labelmap that is created in course of conversion.&",
        "Segmentation_MasterRepresentation:=Binary labelmap",
        "Segmentation_ReferenceImageExtentOffset:=0 0 0",
    ]
    return "\n".join(lines) + "\n"


def reference_image_geometry(image: sitk.Image) -> str:
    """Slicer's serialised geometry (IJK-to-RAS matrix row by row, then the extent), so that Slicer's Segment
    Editor keeps editing on the CT's voxel grid."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.array(image.GetSpacing(), dtype=float)
    ijk_to_lps[:3, 3] = image.GetOrigin()
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps
    extent = [v for n in image.GetSize() for v in (0, n - 1)]
    return "".join(f"{_number(v)};" for v in [*ijk_to_ras.ravel(), *extent])


def _extent(mask: np.ndarray) -> list[int]:
    """``minI maxI minJ maxJ minK maxK`` of a (z, y, x) mask; Slicer's empty extent ``0 -1 0 -1 0 -1`` if empty."""
    if not mask.any():
        return [0, -1, 0, -1, 0, -1]
    extent = []
    for axis in (2, 1, 0):  # I = x, J = y, K = z
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        extent += [int(hit[0]), int(hit[-1])]
    return extent


def _number(value: float) -> str:
    """Shortest exact text for a float, without a trailing '.0' on integers (as Slicer writes them)."""
    value = float(value) + 0.0  # turns -0.0 into 0.0
    return str(int(value)) if value.is_integer() else repr(value)


def _vector(values) -> str:
    return "(" + ",".join(_number(v) for v in values) + ")"
