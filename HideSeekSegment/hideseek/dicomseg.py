"""Lesions as a DICOM Segmentation object (highdicom) that references the CT series it was computed on.

PACS viewers and Slicer's QuantitativeReporting read it next to the original series. Segments and codes are the
ones of the ``.seg.nrrd`` (segfile.py): DICOM master-list category/type/region, and lytic/blastic as a type
modifier from our private scheme ``99HSS``. Needs the optional extra ``hideseek[dicom]``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import __version__
from .errors import InputError
from .segfile import CATEGORY, LESION_SEGMENTS, REGION_VERTEBRA, TYPE_SECONDARY_NEOPLASM, Code

REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")
"""What a DICOM SEG must copy from its source images to reference them."""


def check_referencable(source_files: list[str], where: str) -> None:
    """Refuse, before any work, a series a DICOM SEG cannot point to (e.g. anonymised without its UIDs)."""
    try:
        import pydicom
    except ImportError as exc:
        raise InputError("--dicom-seg needs highdicom: pip install 'hideseek[dicom]'") from exc
    header = pydicom.dcmread(source_files[0], stop_before_pixels=True)
    missing = [name for name in REQUIRED_UIDS if not str(header.get(name, "")).strip()]
    if missing:
        raise InputError(f"DICOM series in {where} has no {', '.join(missing)} (stripped by anonymisation?): a DICOM "
                         "SEG could not reference it; omit --dicom-seg and use lesions.seg.nrrd or lesions.nii.gz")


def write_dicom_seg(lesions: sitk.Image, source_files: list[str], path: str | os.PathLike) -> Path:
    """Write ``lesions`` (0/1 lytic/2 blastic, on the grid read from ``source_files`` in that order) to ``path``."""
    try:
        import highdicom as hd
        import pydicom
    except ImportError as exc:
        raise InputError("--dicom-seg needs highdicom: pip install 'hideseek[dicom]'") from exc
    sources = [pydicom.dcmread(f) for f in source_files]
    labels = sitk.GetArrayFromImage(lesions).astype(np.uint8)
    if labels.shape[0] != len(sources) or labels.shape[1:] != (int(sources[0].Rows), int(sources[0].Columns)):
        raise InputError(f"the lesion map {labels.shape} does not match the DICOM series "
                         f"({len(sources)} slices of {sources[0].Rows}x{sources[0].Columns})")  # fmt: skip
    algorithm = hd.AlgorithmIdentificationSequence(
        name="HideSeekSegment", version=__version__, family=_concept(hd, Code("DCM", "113037", "Deep Learning")),
    )  # fmt: skip
    descriptions = []
    for number, spec in enumerate(LESION_SEGMENTS, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=spec.name,
            segmented_property_category=_concept(hd, CATEGORY),
            segmented_property_type=_concept(hd, TYPE_SECONDARY_NEOPLASM),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            anatomic_regions=[_concept(hd, REGION_VERTEBRA)],
            display_color=hd.color.CIELabColor(*_rgb_to_lab(spec.rgb)),
        )  # fmt: skip
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _concept(hd, spec.type_modifier)
        ]
        descriptions.append(description)
    # segment numbers follow LESION_SEGMENTS; map label values onto them
    by_number = np.zeros(256, np.uint8)
    for number, spec in enumerate(LESION_SEGMENTS, start=1):
        by_number[spec.label] = number
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=by_number[labels], segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="HideSeekSegment",
        manufacturer_model_name="hideseek", software_versions=__version__, device_serial_number="none",
        series_description="Vertebral metastases (HideSeekSegment)", omit_empty_frames=False,
    )  # fmt: skip
    out = Path(path)
    seg.save_as(out)
    return out


def _concept(hd, code: Code):
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _rgb_to_lab(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """sRGB (0-255) to CIE L*a*b* (D65), as DICOM's recommended display colour expects."""
    c = np.asarray(rgb, float) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ c
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return float(116 * f[1] - 16), float(500 * (f[0] - f[1])), float(200 * (f[1] - f[2]))
