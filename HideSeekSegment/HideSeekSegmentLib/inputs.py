"""The module's inputs as files for the worker: the CT, and the vertebrae as one labelmap on the CT grid + a table.

Vertebrae come as a segmentation node (TotalSegmentator's Slicer extension names its segments by ID
``vertebrae_L1`` and, with "standard names", ``L1 vertebra``, tagged with terminology type "L1 vertebra";
SPINEPS-style or hand-made names such as ``L1`` or ``Th12`` work too) or as a labelmap node (names from its
colour table when the user gave one, else the TotalSegmentator or SPINEPS label values, as in the files those
tools write). The engine's own level naming (``hideseek.vertebrae``) decides what counts as a vertebra, so the
module and the command line agree.

Whatever the source, the export is the same: one uint8 labelmap on the CT's voxel grid whose value for a level is
that level's rank (C1 = 1 ... S1 = 27) and a ``value,name`` table, passed as ``--label-format plain``. The inputs
are read, never modified: nothing is added to or changed in the scene.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer
import vtk

from hideseek.errors import InputError
from hideseek.vertebrae import (
    SPINEPS_LEVELS,
    TOTALSEGMENTATOR_LEVELS,
    detect_label_format,
    level_from_name,
    level_rank,
)

from .volumes import orientedImage, sameGrid, voxels, writeLabelArray, writeVolumeNode

CT_FILE = "ct.nrrd"
VERTEBRAE_FILE = "vertebrae.nrrd"
LABEL_TABLE_FILE = "vertebrae.csv"


@dataclass(frozen=True)
class VertebraSource:
    """Where one level lives in the vertebrae node: a segment ID, or a label value of a labelmap."""

    level: str
    key: str | int


@dataclass(frozen=True)
class ExportedInputs:
    """The files written for one run and the levels they contain (superior to inferior)."""

    ct: Path
    vertebrae: Path
    labelTable: Path
    levels: tuple[str, ...]


def listVertebrae(vertebraeNode) -> list[str]:
    """The vertebra levels found in a segmentation or labelmap node, superior to inferior (for the checklist)."""
    return [source.level for source in findVertebrae(vertebraeNode)]


def findVertebrae(vertebraeNode) -> list[VertebraSource]:
    """Name every vertebra of the node; raises InputError when none can be named or a level appears twice."""
    if vertebraeNode is None:
        raise InputError("no vertebrae selected: choose a segmentation or labelmap of the vertebrae")
    if vertebraeNode.IsA("vtkMRMLSegmentationNode"):
        sources = _segmentVertebrae(vertebraeNode)
    elif vertebraeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        sources = _labelmapVertebrae(vertebraeNode)
    else:
        raise InputError(
            f"'{vertebraeNode.GetName()}' is a {vertebraeNode.GetClassName()}: the vertebrae must be a "
            "segmentation or a labelmap volume"
        )
    return sorted(sources, key=lambda source: level_rank(source.level))


def exportInputs(ctVolume, vertebraeNode, folder: str | Path) -> ExportedInputs:
    """Write ``ct.nrrd``, ``vertebrae.nrrd`` (on the CT grid) and ``vertebrae.csv`` into ``folder``."""
    _checkVolume(ctVolume, "CT volume")
    if ctVolume.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"'{ctVolume.GetName()}' is a labelmap, not a CT: choose the CT volume as input")
    _checkUntransformed(vertebraeNode, "vertebrae")
    sources = findVertebrae(vertebraeNode)
    if vertebraeNode.IsA("vtkMRMLSegmentationNode"):
        labels = _segmentsOnCtGrid(vertebraeNode, sources, ctVolume)
    else:
        _checkVolume(vertebraeNode, "vertebrae labelmap")
        labels = _labelmapOnCtGrid(vertebraeNode, sources, ctVolume)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    exported = ExportedInputs(
        folder / CT_FILE, folder / VERTEBRAE_FILE, folder / LABEL_TABLE_FILE, tuple(s.level for s in sources)
    )
    writeVolumeNode(ctVolume, exported.ct)
    writeLabelArray(labels, ctVolume, exported.vertebrae)
    rows = [f"{level_rank(level)},{level}" for level in exported.levels]
    exported.labelTable.write_text("value,name\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return exported


def _segmentVertebrae(segmentationNode) -> list[VertebraSource]:
    """Segments whose name, ID or terminology type names one vertebra. Segment label values are not used: Slicer
    numbers segments 1, 2, ... in each layer, so values would mistake any segmentation for SPINEPS labels."""
    segmentation = segmentationNode.GetSegmentation()
    named = {}
    for i in range(segmentation.GetNumberOfSegments()):
        segmentId, segment = segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i)
        level = level_from_name(segment.GetName()) or level_from_name(segmentId) or _terminologyLevel(segment)
        if level is not None:
            _claim(named, level, segmentId, segmentationNode)
    if not named:
        raise InputError(
            f"'{segmentationNode.GetName()}': no segment names a vertebra; name them (e.g. 'L1' or "
            "'vertebrae_T12'), or load a TotalSegmentator or SPINEPS label file as a labelmap volume"
        )
    return [VertebraSource(level, key) for level, key in named.items()]


def _terminologyLevel(segment) -> str | None:
    """The level in the terminology type, e.g. ``SCT^66794005^L1 vertebra`` in TotalSegmentator's entries."""
    entry = vtk.reference("")
    if not segment.GetTag(segment.GetTerminologyEntryTagName(), entry):
        return None
    parts = str(entry).split("~")
    return level_from_name(parts[2].split("^")[-1]) if len(parts) > 2 else None


def _labelmapVertebrae(labelmapNode) -> list[VertebraSource]:
    """Names from the labelmap's own colour table when the user gave one, else TotalSegmentator/SPINEPS values."""
    _checkVolume(labelmapNode, "vertebrae labelmap")
    values = {int(v) for v in np.unique(voxels(labelmapNode.GetImageData()))} - {0}
    if not values:
        raise InputError(f"labelmap '{labelmapNode.GetName()}' is empty: it holds no vertebra labels")
    named = {}
    for value, name in _colourNames(labelmapNode, values).items():
        level = level_from_name(name)
        if level is not None:
            _claim(named, level, value, labelmapNode)
    if named:
        return [VertebraSource(level, value) for level, value in named.items()]
    return [VertebraSource(level, value) for value, level in _levelsFromValues(values, labelmapNode.GetName()).items()]


def _colourNames(labelmapNode, values: set[int]) -> dict[int, str]:
    """Label names from a colour table the user chose; Slicer's built-in tables (singletons such as
    GenericAnatomyColors) name anatomy in general, not these labels, and are ignored."""
    display = labelmapNode.GetDisplayNode()
    colours = display.GetColorNode() if display is not None else None
    if colours is None or colours.GetSingletonTag():
        return {}
    return {value: colours.GetColorName(value) for value in values if 0 <= value < colours.GetNumberOfColors()}


def _levelsFromValues(values: set[int], nodeName: str) -> dict[int, str]:
    """Label value -> level under the TotalSegmentator or SPINEPS convention (the engine's detection rule)."""
    try:
        convention = detect_label_format(values, nodeName)
    except InputError as exc:
        raise InputError(
            f"'{nodeName}': its colour table names no vertebra and its label values fit no known "
            f"convention ({exc}); name the vertebrae (e.g. 'L1', 'vertebrae_T12') and try again"
        ) from exc
    table = TOTALSEGMENTATOR_LEVELS if convention == "totalsegmentator" else SPINEPS_LEVELS
    levels = {value: table[value] for value in sorted(values) if value in table}
    if not levels:
        raise InputError(f"'{nodeName}': no vertebra labels of the {convention} convention in it")
    return levels


def _claim(found: dict, level: str, key, node) -> None:
    if level in found:
        raise InputError(
            f"'{node.GetName()}': both '{found[level]}' and '{key}' name vertebra {level}; rename or remove one"
        )
    found[level] = key


def _segmentsOnCtGrid(segmentationNode, sources: list[VertebraSource], ctVolume) -> np.ndarray:
    """The named segments merged into one labelmap on the CT grid (value = level rank); Slicer resamples them."""
    segmentation = segmentationNode.GetSegmentation()
    if not segmentation.ContainsRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()):
        raise InputError(
            f"segmentation '{segmentationNode.GetName()}' has no binary labelmap representation: create it in "
            "the Segmentations module (Representations section)"
        )
    ids = vtk.vtkStringArray()
    values = vtk.vtkIntArray()
    for source in sources:
        ids.InsertNextValue(source.key)
        values.InsertNextValue(level_rank(source.level))
    merged = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(
        segmentationNode, ctVolume, ids, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, merged, values
    )
    array = voxels(merged)
    if array.shape != voxels(ctVolume.GetImageData()).shape:
        raise InputError(f"segmentation '{segmentationNode.GetName()}' could not be resampled onto the CT grid")
    return array.astype(np.uint8)


def _labelmapOnCtGrid(labelmapNode, sources: list[VertebraSource], ctVolume) -> np.ndarray:
    """The labelmap's vertebra labels as level ranks on the CT grid (nearest neighbour when the grids differ)."""
    image = orientedImage(labelmapNode)
    reference = orientedImage(ctVolume)
    if not sameGrid(image, reference):
        resampled = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(image, reference, resampled)
        image = resampled
    array = voxels(image)
    if array.min() < 0:
        raise InputError(f"labelmap '{labelmapNode.GetName()}' holds negative labels; vertebra labels are positive")
    lookup = np.zeros(max(int(array.max()), *(int(s.key) for s in sources)) + 1, np.uint8)
    for source in sources:
        lookup[source.key] = level_rank(source.level)
    return lookup[array]


def _checkVolume(volumeNode, what: str) -> None:
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise InputError(f"no {what} selected, or it holds no voxels: choose a loaded volume")
    _checkUntransformed(volumeNode, what)


def _checkUntransformed(node, what: str) -> None:
    """Files carry no Slicer transforms: a transformed node would be exported in the wrong place."""
    if node is not None and node.GetParentTransformNode() is not None:
        raise InputError(
            f"the {what} '{node.GetName()}' is under a transform: harden it first (Data module, right-click, "
            "'Harden transform')"
        )
