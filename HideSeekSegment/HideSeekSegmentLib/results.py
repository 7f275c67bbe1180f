"""Bring a finished run into the scene: the lesion segmentation and the report table, next to the CT.

The segmentation node "<CT> metastases" gets exactly the engine's two lesion segments (names, colours and
terminology from ``hideseek.segfile.LESION_SEGMENTS``), on the CT's grid, with the CT as its reference geometry
(which DICOM SEG export needs). Re-running into the same node replaces those two segments and keeps any other
segment the user added. The table "<CT> metastases report" has one row per vertebra, then one per lesion, like
``report.csv``. Both are placed under the CT's study in the subject hierarchy. The CT is only read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer
import vtk

from hideseek.errors import InputError
from hideseek.segfile import LESION_SEGMENTS, SegmentSpec

from .volumes import orientedImage, orientedImageFromArray, readLabelmap, sameGrid, voxels

LESIONS_FILE = "lesions.nii.gz"
REPORT_FILE = "report.json"
REPORT_REFERENCE_ROLE = "HideSeekReport"
"""Node reference from the output segmentation to its report table, so that a re-run updates the same table."""


@dataclass(frozen=True)
class Column:
    """One report table column: its title, whether it holds text (else numbers), its unit and its meaning."""

    title: str
    text: bool
    unit: str
    description: str


COLUMNS: tuple[Column, ...] = (
    Column("Record", True, "", "vertebra: one row per processed vertebra; lesion: one row per lesion"),
    Column("Vertebra", True, "", "vertebra level"),
    Column("Status", True, "", "ok, or why the vertebra was skipped"),
    Column("Type", True, "", "lesion type: lytic or blastic"),
    Column("Delta", False, "", "normalised drop of P(malignant) when the lesion is hidden (0..1)"),
    Column("Volume", False, "mm3", "lesion volume"),
    Column("Centroid R", False, "mm", "lesion centroid, patient right-left coordinate (RAS)"),
    Column("Centroid A", False, "mm", "lesion centroid, anterior-posterior coordinate (RAS)"),
    Column("Centroid S", False, "mm", "lesion centroid, superior-inferior coordinate (RAS)"),
    Column("P(malignant)", False, "", "classifier probability that the vertebra holds metastases"),
    Column("P(malignant) after edit", False, "", "the same probability after the healthy edit"),
    Column("Lytic lesions", False, "", "number of lytic lesions in the vertebra"),
    Column("Blastic lesions", False, "", "number of blastic lesions in the vertebra"),
    Column("Lytic volume", False, "mm3", "total lytic lesion volume in the vertebra"),
    Column("Blastic volume", False, "mm3", "total blastic lesion volume in the vertebra"),
)


@dataclass
class ImportedResult:
    """What a run added to the scene, and the report it came with."""

    segmentation: object  # vtkMRMLSegmentationNode
    table: object  # vtkMRMLTableNode
    report: dict


def readReport(outDir: str | Path) -> dict:
    """``report.json`` of a run, refusing files that are not a hideseek report."""
    path = Path(outDir) / REPORT_FILE
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the run's report {path}: {exc}") from exc
    if not isinstance(report, dict) or not all(isinstance(report.get(k), list) for k in ("vertebrae", "lesions")):
        raise InputError(f"{path} is not a hideseek report (no 'vertebrae' and 'lesions' lists)")
    return report


def importResults(outDir: str | Path, ctVolume, outputSegmentation=None) -> ImportedResult:
    """Load a run's ``lesions.nii.gz`` and ``report.json`` into ``outputSegmentation`` (created when None)."""
    scene = ctVolume.GetScene() if ctVolume is not None else None
    if scene is None:
        raise InputError("the CT volume is not in a scene: load it into Slicer first")
    report = readReport(outDir)
    lesions = readLesions(Path(outDir) / LESIONS_FILE, ctVolume)

    segmentationNode = outputSegmentation or scene.AddNewNodeByClass(
        "vtkMRMLSegmentationNode", f"{ctVolume.GetName()} metastases"
    )
    if segmentationNode.GetDisplayNode() is None:
        segmentationNode.CreateDefaultDisplayNodes()
    wasModified = segmentationNode.StartModify()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(ctVolume)
    segmentationNode.SetNodeReferenceID(segmentationNode.GetReferenceImageGeometryReferenceRole(), ctVolume.GetID())
    for spec in LESION_SEGMENTS:
        _setLesionSegment(segmentationNode, spec, lesions == spec.label, ctVolume)
    segmentationNode.EndModify(wasModified)

    table = _reportTable(segmentationNode, ctVolume, report)
    _placeNextTo(ctVolume, segmentationNode, table)
    return ImportedResult(segmentationNode, table, report)


def readLesions(path: Path, ctVolume) -> np.ndarray:
    """The lesion labelmap as a (k, j, i) uint8 array, refused unless it lies on the CT's grid and holds only the
    engine's labels."""
    labelmap = readLabelmap(path)
    if not sameGrid(orientedImage(labelmap), orientedImage(ctVolume)):
        raise InputError(f"{path} is not on the grid of the CT '{ctVolume.GetName()}': it belongs to another CT")
    array = voxels(labelmap.GetImageData())
    known = [0] + [spec.label for spec in LESION_SEGMENTS]
    unknown = sorted(set(np.unique(array).tolist()) - set(known))
    if unknown:
        raise InputError(f"{path} holds labels {unknown} that are neither background nor a lesion type")
    return array.astype(np.uint8)


def _setLesionSegment(segmentationNode, spec: SegmentSpec, mask: np.ndarray, ctVolume) -> None:
    """Create or replace one lesion segment; its voxels, name, colour and terminology come from the run."""
    segmentation = segmentationNode.GetSegmentation()
    if segmentation.GetSegment(spec.segment_id) is None:
        segmentation.AddEmptySegment(spec.segment_id, spec.name, spec.color)
    segment = segmentation.GetSegment(spec.segment_id)
    segment.SetName(spec.name)
    segment.SetColor(spec.color)
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)
    segment.SetTag(segment.GetTerminologyEntryTagName(), spec.terminology_entry())
    image = orientedImageFromArray(mask.astype(np.uint8), ctVolume)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentationNode, spec.segment_id, logic.MODE_REPLACE):
        raise RuntimeError(f"could not store the '{spec.name}' voxels in '{segmentationNode.GetName()}'")


def _reportTable(segmentationNode, ctVolume, report: dict):
    """Fill the table linked to the segmentation (created on the first run) with the report's records."""
    table = segmentationNode.GetNodeReference(REPORT_REFERENCE_ROLE)
    if table is None:
        table = ctVolume.GetScene().AddNewNodeByClass("vtkMRMLTableNode", f"{ctVolume.GetName()} metastases report")
        segmentationNode.SetNodeReferenceID(REPORT_REFERENCE_ROLE, table.GetID())
    rows = [_vertebraRow(v) for v in report["vertebrae"]] + [_lesionRow(lesion) for lesion in report["lesions"]]
    wasModified = table.StartModify()
    table.RemoveAllColumns()
    for column in COLUMNS:
        array = vtk.vtkStringArray() if column.text else vtk.vtkDoubleArray()
        array.SetName(column.title)
        for row in rows:
            value = row.get(column.title)
            array.InsertNextValue(("" if value is None else str(value)) if column.text else _number(value))
        table.AddColumn(array)
        table.SetColumnUnitLabel(column.title, column.unit)
        table.SetColumnDescription(column.title, column.description)
    table.EndModify(wasModified)
    return table


def _vertebraRow(v: dict) -> dict:
    return {
        "Record": "vertebra", "Vertebra": v.get("level"), "Status": v.get("status"),
        "P(malignant)": v.get("p_malignant"), "P(malignant) after edit": v.get("p_healthy_edit"),
        "Lytic lesions": v.get("n_lytic"), "Blastic lesions": v.get("n_blastic"),
        "Lytic volume": v.get("lytic_volume_mm3"), "Blastic volume": v.get("blastic_volume_mm3"),
    }


def _lesionRow(lesion: dict) -> dict:
    r, a, s = lesion.get("centroid_ras") or (None, None, None)
    return {
        "Record": "lesion", "Vertebra": lesion.get("vertebra"), "Type": lesion.get("type"),
        "Delta": lesion.get("delta"), "Volume": lesion.get("volume_mm3"),
        "Centroid R": r, "Centroid A": a, "Centroid S": s,
    }


def _number(value) -> float:
    """Report numbers as floats; not applicable (absent, null) as NaN, which the table view leaves readable."""
    return math.nan if value is None else float(value)


def _placeNextTo(ctVolume, *nodes) -> None:
    """Put the nodes in the CT's folder of the subject hierarchy (its study, when it came from DICOM)."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(ctVolume.GetScene())
    ctItem = hierarchy.GetItemByDataNode(ctVolume) if hierarchy is not None else 0
    if not ctItem:
        return
    parent = hierarchy.GetItemParent(ctItem)
    for node in nodes:
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, parent)
        else:
            hierarchy.CreateItem(parent, node)
