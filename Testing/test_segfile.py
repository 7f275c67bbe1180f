"""The .seg.nrrd writer: what 3D Slicer (slicer-core) and slicerio read back, and the terminology file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hideseek.io import read_ct
from hideseek.segfile import (
    ANATOMIC_CONTEXT,
    CATEGORY,
    LESION_SEGMENTS,
    REGION_VERTEBRA,
    TERMINOLOGY_CONTEXT,
    TERMINOLOGY_FILE,
    TYPE_SECONDARY_NEOPLASM,
    write_seg_nrrd,
)

# A permuted, flipped grid (like the P-I-R TPTBox crop) so that LPS/RAS or axis-order slips show up.
DIRECTION = (0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
SPACING = (0.8, 1.25, 2.5)
ORIGIN = (12.5, -40.0, 101.75)


def _lesions(shape=(9, 8, 7)) -> sitk.Image:
    """A (z, y, x) lesion labelmap on the oblique grid: a lytic box, a blastic box, the rest background."""
    array = np.zeros(shape, np.uint8)
    array[1:3, 2:5, 1:2] = 1
    array[5:8, 0:2, 3:7] = 2
    image = sitk.GetImageFromArray(array)
    image.SetDirection(DIRECTION)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    return image


def _header(path: Path) -> dict[str, str]:
    """The NRRD header as a dict (``key: value`` and ``key:=value`` lines alike)."""
    raw = path.read_bytes()
    lines = raw[: raw.index(b"\n\n")].decode().splitlines()[1:]
    fields = {}
    for line in lines:
        if line.startswith("#"):
            continue
        key, _, value = line.partition(":=") if ":=" in line else line.partition(": ")
        fields[key] = value
    return fields


def test_lesion_segments_are_distinct_and_well_formed():
    assert [s.label for s in LESION_SEGMENTS] == [1, 2]
    assert len({s.segment_id for s in LESION_SEGMENTS}) == len({s.rgb for s in LESION_SEGMENTS}) == 2
    for spec in LESION_SEGMENTS:
        parts = spec.terminology_entry().split("~")
        assert len(parts) == 7
        assert parts[:3] == [TERMINOLOGY_CONTEXT, str(CATEGORY), str(TYPE_SECONDARY_NEOPLASM)]
        assert parts[3] == str(spec.type_modifier) and parts[4:6] == [ANATOMIC_CONTEXT, str(REGION_VERTEBRA)]
        assert not any(c in spec.terminology_entry() for c in "|\n:")  # would break Slicer's tag syntax


def test_terminology_file_matches_the_written_tags():
    term = json.loads(TERMINOLOGY_FILE.read_text(encoding="utf-8"))
    assert term["SegmentationCategoryTypeContextName"] == TERMINOLOGY_CONTEXT
    (category,) = term["SegmentationCodes"]["Category"]
    assert (category["CodingSchemeDesignator"], category["CodeValue"], category["CodeMeaning"]) == (
        CATEGORY.scheme,
        CATEGORY.value,
        CATEGORY.meaning,
    )
    assert category["showAnatomy"] is True
    (neoplasm,) = category["Type"]
    assert neoplasm["CodeValue"] == TYPE_SECONDARY_NEOPLASM.value
    assert neoplasm["CodeMeaning"] == TYPE_SECONDARY_NEOPLASM.meaning
    modifiers = {m["CodeValue"]: m for m in neoplasm["Modifier"]}
    assert len(modifiers) == len(LESION_SEGMENTS)
    for spec in LESION_SEGMENTS:
        entry = modifiers[spec.type_modifier.value]
        assert entry["CodingSchemeDesignator"] == spec.type_modifier.scheme
        assert entry["CodeMeaning"] == spec.type_modifier.meaning
        assert tuple(entry["recommendedDisplayRGBValue"]) == spec.rgb
        assert entry["3dSlicerLabel"] == spec.name.lower()


def test_header_lists_every_segment_with_its_extent(tmp_path):
    image = _lesions()
    array = sitk.GetArrayFromImage(image)
    array[array == 2] = 0  # no blastic voxel: the segment must still be listed, with an empty extent
    empty_blastic = sitk.GetImageFromArray(array)
    empty_blastic.CopyInformation(image)
    path = write_seg_nrrd(tmp_path / "out.seg.nrrd", empty_blastic)
    header = _header(path)
    assert header["sizes"] == "7 8 9"
    assert header["space"] == "left-posterior-superior"
    assert header["space directions"] == "(0,-0.8,0) (0,0,-1.25) (2.5,0,0)"
    assert header["space origin"] == "(12.5,-40,101.75)"
    assert header["Segment0_Extent"] == "1 1 2 4 1 2"
    assert header["Segment1_Extent"] == "0 -1 0 -1 0 -1"
    assert header["Segment1_Name"] == "Blastic metastasis"
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    raw = path.read_bytes()
    voxels = np.frombuffer(gzip.decompress(raw[raw.index(b"\n\n") + 2 :]), np.uint8).reshape(array.shape)
    np.testing.assert_array_equal(voxels, array)
    assert not list(tmp_path.glob("*partial*"))


def test_refuses_labels_without_a_segment_and_wrong_suffix(tmp_path):
    image = _lesions()
    with pytest.raises(ValueError, match=r"values \[3\]"):
        write_seg_nrrd(tmp_path / "x.seg.nrrd", image + 1 * (image == 2))
    with pytest.raises(ValueError, match=r"\.seg\.nrrd"):
        write_seg_nrrd(tmp_path / "x.nrrd", image)
    assert not list(tmp_path.iterdir())


def _read_with_slicer(slicer, path: Path):
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    return scene, node


def _slicer_segment_indices(slicer, node, segment_id: str, reference: sitk.Image) -> set[tuple[int, ...]]:
    """Voxels of one segment as (x, y, z) indices of ``reference``, mapped through Slicer's own geometry."""
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    segment = node.GetSegmentation().GetSegment(segment_id)
    image = segment.GetRepresentation("Binary labelmap")
    extent = image.GetExtent()
    if extent[1] < extent[0]:
        return set()
    dims = [extent[2 * a + 1] - extent[2 * a] + 1 for a in range(3)]
    values = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    k, j, i = np.nonzero(values == segment.GetLabelValue())
    ijk = np.stack([i + extent[0], j + extent[2], k + extent[4], np.ones_like(i)]).astype(float)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]) @ ijk
    lps = ras[:3].T * np.array([-1.0, -1.0, 1.0])
    return {reference.TransformPhysicalPointToIndex(tuple(p)) for p in lps}


def test_slicer_reads_names_colours_terminology_and_voxels(slicer_core, tmp_path):
    image = _lesions()
    array = sitk.GetArrayFromImage(image)
    _, node = _read_with_slicer(slicer_core, write_seg_nrrd(tmp_path / "lesions.seg.nrrd", image))
    segmentation = node.GetSegmentation()
    assert list(segmentation.GetSegmentIDs()) == [s.segment_id for s in LESION_SEGMENTS]
    for spec in LESION_SEGMENTS:
        segment = segmentation.GetSegment(spec.segment_id)
        assert segment.GetName() == spec.name
        assert segment.GetLabelValue() == spec.label
        np.testing.assert_allclose(segment.GetColor(), spec.color, atol=1e-6)
        assert segment.GetTerminology() == spec.terminology_entry()
        expected = {tuple(int(v) for v in idx[::-1]) for idx in np.argwhere(array == spec.label)}
        assert _slicer_segment_indices(slicer_core, node, spec.segment_id, image) == expected


def test_slicer_exports_on_the_ct_grid(slicer_core, tmp_path):
    """The reference geometry we store lets Slicer rebuild the full CT-sized labelmap, voxel for voxel."""
    from vtk.util.numpy_support import vtk_to_numpy

    image = _lesions()
    scene, node = _read_with_slicer(slicer_core, write_seg_nrrd(tmp_path / "lesions.seg.nrrd", image))
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    logic = slicer_core.vtkSlicerSegmentationsModuleLogic
    assert logic.ExportAllSegmentsToLabelmapNode(node, labelmap, slicer_core.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    exported = vtk_to_numpy(labelmap.GetImageData().GetPointData().GetScalars())
    np.testing.assert_array_equal(exported.reshape(image.GetSize()[::-1]), sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(labelmap.GetSpacing(), SPACING)
    np.testing.assert_allclose(labelmap.GetOrigin(), (-ORIGIN[0], -ORIGIN[1], ORIGIN[2]))


def test_slicer_reads_an_all_empty_result(slicer_core, tmp_path):
    image = _lesions() * 0
    _, node = _read_with_slicer(slicer_core, write_seg_nrrd(tmp_path / "none.seg.nrrd", image))
    segmentation = node.GetSegmentation()
    assert [segmentation.GetSegment(i).GetName() for i in segmentation.GetSegmentIDs()] == [
        s.name for s in LESION_SEGMENTS
    ]
    for spec in LESION_SEGMENTS:
        assert _slicer_segment_indices(slicer_core, node, spec.segment_id, image) == set()


def test_slicer_terminology_logic_resolves_our_tags(slicer_core):
    logic = slicer_core.vtkSlicerTerminologiesModuleLogic()
    context = logic.LoadTerminologyFromFile(str(TERMINOLOGY_FILE))
    assert context == TERMINOLOGY_CONTEXT
    for spec in LESION_SEGMENTS:
        entry = slicer_core.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(spec.terminology_entry(), entry)
        assert logic.UpdateEntryFromLoadedTerminologies(entry, [context], [])
        assert entry.GetTypeModifierObject().GetRecommendedDisplayRGBValue() == spec.rgb
        found = slicer_core.vtkSlicerTerminologyEntry()
        assert logic.FindTypeInTerminologyBy3dSlicerLabel(context, spec.name.lower(), found)
        serialized = logic.SerializeTerminologyEntry(found).split("~")
        assert serialized[:4] == spec.terminology_entry().split("~")[:4]


def test_slicer_core_fixture_can_create_segments(slicer_core):
    """The conftest setup that the Slicer module tests rely on: segments can be built from scratch headless."""
    scene = slicer_core.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segment_id = node.GetSegmentation().AddEmptySegment("lytic", "Lytic metastasis", LESION_SEGMENTS[0].color)
    assert segment_id == "lytic"
    assert node.GetSegmentation().GetSegment("lytic").GetRepresentation("Binary labelmap") is not None


def test_slicerio_reads_the_same(tmp_path):
    slicerio = pytest.importorskip("slicerio")
    image = _lesions()
    array = sitk.GetArrayFromImage(image)
    seg = slicerio.read_segmentation(str(write_seg_nrrd(tmp_path / "lesions.seg.nrrd", image)))
    for spec, segment in zip(LESION_SEGMENTS, seg["segments"], strict=True):
        assert (segment["id"], segment["name"], segment["labelValue"]) == (spec.segment_id, spec.name, spec.label)
        np.testing.assert_allclose(segment["color"], spec.color, atol=1e-6)
        assert segment["terminology"] == {
            "contextName": TERMINOLOGY_CONTEXT,
            "category": [CATEGORY.scheme, CATEGORY.value, CATEGORY.meaning],
            "type": [TYPE_SECONDARY_NEOPLASM.scheme, TYPE_SECONDARY_NEOPLASM.value, TYPE_SECONDARY_NEOPLASM.meaning],
            "typeModifier": [spec.type_modifier.scheme, spec.type_modifier.value, spec.type_modifier.meaning],
            "anatomicContextName": ANATOMIC_CONTEXT,
            "anatomicRegion": [REGION_VERTEBRA.scheme, REGION_VERTEBRA.value, REGION_VERTEBRA.meaning],
        }
    np.testing.assert_array_equal(np.transpose(seg["voxels"], (2, 1, 0)), array)
    expected = np.eye(4)
    expected[:3, :3] = np.array(DIRECTION).reshape(3, 3) * SPACING
    expected[:3, 3] = ORIGIN
    np.testing.assert_allclose(seg["ijkToLPS"], expected, atol=1e-12)


def test_slicerio_on_a_real_ct_grid(real_data_dir, tmp_path):
    """On the P-I-R TPTBox CT: a vertebral-body mask written as 'lytic' lands on the same voxels."""
    slicerio = pytest.importorskip("slicerio")
    folder = real_data_dir / "tptbox_sample_ct"
    ct = read_ct(folder / "sub-ct_label-22_ct.nii.gz")
    subregions = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "sub-ct_seg-subreg_label-22_msk.nii.gz")))
    body = ((subregions == 49) | (subregions == 50)).astype(np.uint8)
    labelmap = sitk.GetImageFromArray(body)
    labelmap.CopyInformation(ct)
    seg = slicerio.read_segmentation(str(write_seg_nrrd(tmp_path / "real.seg.nrrd", labelmap)))
    np.testing.assert_array_equal(np.transpose(seg["voxels"], (2, 1, 0)), body)
    lps = seg["ijkToLPS"] @ np.array([3, 5, 7, 1.0])
    np.testing.assert_allclose(lps[:3], ct.TransformIndexToPhysicalPoint((3, 5, 7)), atol=1e-9)
