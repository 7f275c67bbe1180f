"""The Slicer module's logic on real MRML nodes (pip package slicer-core, no Slicer application).

The logic lives in HideSeekSegment/HideSeekSegmentLib and imports only slicer (MRML), vtk and numpy, so it runs
here; the module file itself needs the application (qt, ScriptedLoadableModule, parameterNodeWrapper) and is
checked statically at the end: its .ui, the widget names it uses and the parameter node's fields.
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import os
import re
import sys
import textwrap
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO

from hideseek.errors import Cancelled, HideSeekError, InputError
from hideseek.segfile import LESION_SEGMENTS, TERMINOLOGY_FILE
from hideseek.vertebrae import level_rank, load_vertebra_labels

MODULE_DIR = REPO / "HideSeekSegment"
MODULE_FILE = MODULE_DIR / "HideSeekSegment.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "HideSeekSegment.ui"


@pytest.fixture(scope="module")
def lib(slicer_core):
    """The HideSeekSegmentLib package, importable once slicer-core is there."""
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    import HideSeekSegmentLib
    from HideSeekSegmentLib import dependencies, inputs, logic, models, phantom, results, runner, volumes  # noqa: F401

    return HideSeekSegmentLib


@pytest.fixture
def scene(slicer_core):
    return slicer_core.vtkMRMLScene()


@pytest.fixture
def phantom(lib, scene):
    return lib.phantom.makePhantom(scene)


def _labelmap_node(lib, scene, array: np.ndarray, ijk_to_ras, name="labels"):
    """A labelmap node in the scene holding ``array`` (k, j, i) with the given IJK-to-RAS matrix."""
    import vtk

    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[::-1])
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    lib.volumes.voxels(image)[:] = array
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(ijk_to_ras)
    return node


def _ct_array(lib, phantom) -> np.ndarray:
    return lib.volumes.voxels(phantom.ct.GetImageData()).copy()


# ---------------------------------------------------------------------------------------------------------------
# (a) result import


def _lesion_array(phantom) -> np.ndarray:
    lesions = np.zeros(phantom.labels.shape, np.uint8)
    lesions[phantom.lytic] = 1
    lesions[12:14, 14:16, 17:19] = 2  # inside L2's body
    return lesions


def _report(lesions: np.ndarray) -> dict:
    voxel = 8.0  # mm³ at 2 mm spacing
    return {
        "hideseek_version": "0.1.0", "preset": "fast", "mode": "mid",
        "vertebrae": [
            {"label": 21, "level": "L1", "status": "ok", "slices": 1, "p_malignant": 0.93, "p_healthy_edit": 1e-05,
             "n_lytic": 1, "n_blastic": 0, "lytic_volume_mm3": float((lesions == 1).sum()) * voxel,
             "blastic_volume_mm3": 0.0},
            {"label": 22, "level": "L2", "status": "ok", "slices": 1, "p_malignant": 0.71, "p_healthy_edit": 0.02,
             "n_lytic": 0, "n_blastic": 1, "lytic_volume_mm3": 0.0,
             "blastic_volume_mm3": float((lesions == 2).sum()) * voxel},
            {"label": 19, "level": "T12", "status": "skipped: vertebra T12: its body touches the image border",
             "slices": 0, "p_malignant": None, "p_healthy_edit": None, "n_lytic": 0, "n_blastic": 0,
             "lytic_volume_mm3": 0, "blastic_volume_mm3": 0},
        ],
        "lesions": [
            {"id": 1, "vertebra": "L1", "label": 21, "type": "lytic", "delta": 0.83,
             "volume_mm3": float((lesions == 1).sum()) * voxel, "voxels": int((lesions == 1).sum()),
             "centroid_ras": [-1.0, 12.0, 12.0], "centroid_ijk": [18.0, 14.0, 26.5]},
            {"id": 2, "vertebra": "L2", "label": 22, "type": "blastic", "delta": 0.61,
             "volume_mm3": float((lesions == 2).sum()) * voxel, "voxels": int((lesions == 2).sum()),
             "centroid_ras": [0.0, 10.0, -15.0], "centroid_ijk": [17.5, 14.5, 12.5]},
        ],
    }


def _write_run(lib, phantom, folder, lesions: np.ndarray, report: dict):
    """A run's output as the engine writes it: lesions.nii.gz (SimpleITK, on the CT grid read from the exported
    CT, as the worker does) and report.json."""
    exported = lib.inputs.exportInputs(phantom.ct, phantom.vertebrae, folder / "inputs")
    reference = sitk.ReadImage(str(exported.ct))
    image = sitk.GetImageFromArray(lesions)
    image.CopyInformation(reference)
    out = folder / "out"
    out.mkdir()
    sitk.WriteImage(image, str(out / "lesions.nii.gz"))
    (out / "report.json").write_text(json.dumps(report), encoding="utf-8")
    return out


def _segment_labels(lib, slicer, segmentation_node, ct) -> np.ndarray:
    """The lesion segments rasterised on the CT grid: 1 lytic, 2 blastic."""
    import vtk

    ids, values = vtk.vtkStringArray(), vtk.vtkIntArray()
    for spec in LESION_SEGMENTS:
        ids.InsertNextValue(spec.segment_id)
        values.InsertNextValue(spec.label)
    merged = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(
        segmentation_node, ct, ids, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, merged, values)
    return lib.volumes.voxels(merged).copy()


def _table_rows(table) -> list[dict]:
    columns = [table.GetTable().GetColumn(c) for c in range(table.GetNumberOfColumns())]
    return [{col.GetName(): col.GetValue(r) for col in columns} for r in range(table.GetNumberOfRows())]


def _check_segments(lib, slicer, segmentation_node, ct, lesions):
    import vtk

    segmentation = segmentation_node.GetSegmentation()
    for spec in LESION_SEGMENTS:
        segment = segmentation.GetSegment(spec.segment_id)
        assert segment is not None, spec.segment_id
        assert segment.GetName() == spec.name
        assert segment.GetColor() == pytest.approx(spec.color)
        tag = vtk.reference("")
        assert segment.GetTag(segment.GetTerminologyEntryTagName(), tag) and str(tag) == spec.terminology_entry()
    assert np.array_equal(_segment_labels(lib, slicer, segmentation_node, ct), lesions)


def test_results_are_imported_as_two_tagged_segments_on_the_ct_grid(lib, slicer_core, scene, phantom, tmp_path):
    slicer = slicer_core
    lesions = _lesion_array(phantom)
    report = _report(lesions)
    out = _write_run(lib, phantom, tmp_path, lesions, report)
    ct_before, ct_mtime, vert_mtime = _ct_array(lib, phantom), phantom.ct.GetMTime(), phantom.vertebrae.GetMTime()

    imported = lib.results.importResults(out, phantom.ct)

    seg = imported.segmentation
    assert seg.GetName() == "Phantom CT metastases"
    assert seg.GetSegmentation().GetNumberOfSegments() == 2
    _check_segments(lib, slicer, seg, phantom.ct, lesions)
    converter = slicer.vtkSegmentationConverter
    geometry = seg.GetSegmentation().GetConversionParameter(converter.GetReferenceImageGeometryParameterName())
    assert geometry == converter.SerializeImageGeometry(lib.volumes.orientedImage(phantom.ct))
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) is phantom.ct
    # the CT and the vertebrae are read, never modified
    assert np.array_equal(_ct_array(lib, phantom), ct_before)
    assert (phantom.ct.GetMTime(), phantom.vertebrae.GetMTime()) == (ct_mtime, vert_mtime)


def test_report_table_has_one_row_per_vertebra_then_per_lesion(lib, scene, phantom, tmp_path):
    lesions = _lesion_array(phantom)
    report = _report(lesions)
    imported = lib.results.importResults(_write_run(lib, phantom, tmp_path, lesions, report), phantom.ct)
    assert imported.table.GetName() == "Phantom CT metastases report"
    rows = _table_rows(imported.table)
    assert len(rows) == len(report["vertebrae"]) + len(report["lesions"])

    def same(value, expected):
        return math.isnan(value) if expected is None else value == pytest.approx(expected)

    for row, v in zip(rows, report["vertebrae"], strict=False):
        assert (row["Record"], row["Vertebra"], row["Status"], row["Type"]) == ("vertebra", v["level"], v["status"], "")
        pairs = [("P(malignant)", "p_malignant"), ("P(malignant) after edit", "p_healthy_edit"),
                 ("Lytic lesions", "n_lytic"), ("Blastic lesions", "n_blastic"),
                 ("Lytic volume", "lytic_volume_mm3"), ("Blastic volume", "blastic_volume_mm3")]
        assert all(same(row[column], v[key]) for column, key in pairs), row
        assert math.isnan(row["Delta"]) and math.isnan(row["Volume"])
    for row, lesion in zip(rows[len(report["vertebrae"]) :], report["lesions"], strict=True):
        assert (row["Record"], row["Vertebra"], row["Type"]) == ("lesion", lesion["vertebra"], lesion["type"])
        assert row["Delta"] == pytest.approx(lesion["delta"]) and row["Volume"] == pytest.approx(lesion["volume_mm3"])
        ras = [row["Centroid R"], row["Centroid A"], row["Centroid S"]]
        assert ras == pytest.approx(lesion["centroid_ras"])
        assert math.isnan(row["P(malignant)"])
    assert imported.table.GetColumnUnitLabel("Volume") == "mm3"


def test_rerun_updates_the_output_node_and_keeps_other_segments(lib, slicer_core, scene, phantom, tmp_path):
    lesions = _lesion_array(phantom)
    first = lib.results.importResults(_write_run(lib, phantom, tmp_path / "a", lesions, _report(lesions)), phantom.ct)
    first.segmentation.GetSegmentation().AddEmptySegment("note", "Reader's note")
    second_lesions = np.where(lesions == 2, 0, lesions).astype(np.uint8)  # no blastic lesion this time
    report = _report(second_lesions)
    second = lib.results.importResults(
        _write_run(lib, phantom, tmp_path / "b", second_lesions, report), phantom.ct, first.segmentation)

    assert second.segmentation is first.segmentation and second.table is first.table
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2  # the phantom's vertebrae + ours
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1
    segmentation = second.segmentation.GetSegmentation()
    assert sorted(segmentation.GetSegmentIDs()) == ["blastic", "lytic", "note"]
    _check_segments(lib, slicer_core, second.segmentation, phantom.ct, second_lesions)


def test_output_is_placed_in_the_cts_study(lib, slicer_core, scene, phantom, tmp_path):
    hierarchy = slicer_core.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient"), "Study")
    hierarchy.CreateItem(study, phantom.ct)
    lesions = _lesion_array(phantom)
    imported = lib.results.importResults(_write_run(lib, phantom, tmp_path, lesions, _report(lesions)), phantom.ct)
    for node in (imported.segmentation, imported.table):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study


def test_seg_nrrd_round_trip_keeps_names_colours_tags_and_voxels(lib, slicer_core, scene, phantom, tmp_path):
    slicer = slicer_core
    lesions = _lesion_array(phantom)
    imported = lib.results.importResults(_write_run(lib, phantom, tmp_path, lesions, _report(lesions)), phantom.ct)
    path = str(tmp_path / "lesions.seg.nrrd")
    writer = slicer.vtkMRMLSegmentationStorageNode()
    writer.SetFileName(path)
    assert writer.WriteData(imported.segmentation)
    reread = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reread")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(path)
    assert reader.ReadData(reread)
    assert reread.GetSegmentation().GetNumberOfSegments() == 2
    _check_segments(lib, slicer, reread, phantom.ct, lesions)


def test_unusable_results_are_refused(lib, scene, phantom, tmp_path):
    lesions = _lesion_array(phantom)
    out = _write_run(lib, phantom, tmp_path, lesions, _report(lesions))
    (out / "report.json").write_text('{"vertebrae": []}', encoding="utf-8")
    with pytest.raises(InputError, match="not a hideseek report"):
        lib.results.importResults(out, phantom.ct)
    (out / "report.json").write_text(json.dumps(_report(lesions)), encoding="utf-8")
    shifted = sitk.ReadImage(str(out / "lesions.nii.gz"))
    shifted.SetOrigin([o + 2.0 for o in shifted.GetOrigin()])
    sitk.WriteImage(shifted, str(out / "lesions.nii.gz"))
    with pytest.raises(InputError, match="not on the grid"):
        lib.results.importResults(out, phantom.ct)
    wrong = sitk.GetImageFromArray(np.full(lesions.shape, 3, np.uint8))
    wrong.CopyInformation(sitk.ReadImage(str(tmp_path / "inputs" / "ct.nrrd")))
    sitk.WriteImage(wrong, str(out / "lesions.nii.gz"))
    with pytest.raises(InputError, match=r"labels \[3\]"):
        lib.results.importResults(out, phantom.ct)
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 0


# ---------------------------------------------------------------------------------------------------------------
# (b) input export


def _check_export(lib, phantom, node, folder, expected_values: dict[str, int]):
    """Export, then read the files back with the engine's own reader: each level has exactly its voxels."""
    exported = lib.inputs.exportInputs(phantom.ct, node, folder)
    ct = sitk.ReadImage(str(exported.ct))
    assert np.array_equal(sitk.GetArrayFromImage(ct), _ct_array(lib, phantom))
    labels = load_vertebra_labels(exported.vertebrae, "plain", exported.labelTable, reference=ct)
    assert labels.levels == list(expected_values) == list(exported.levels)
    array = sitk.GetArrayFromImage(labels.labelmap)
    for vertebra in labels.vertebrae:
        assert vertebra.label == level_rank(vertebra.level)
        assert np.array_equal(array == vertebra.label, phantom.labels == expected_values[vertebra.level])
    return exported


def test_totalsegmentator_segmentation_exports_each_level(lib, phantom, tmp_path):
    assert lib.inputs.listVertebrae(phantom.vertebrae) == ["L1", "L2"]
    mtime = phantom.vertebrae.GetMTime()
    _check_export(lib, phantom, phantom.vertebrae, tmp_path, {"L1": 31, "L2": 30})
    assert phantom.vertebrae.GetMTime() == mtime


def test_totalsegmentator_labelmap_exports_each_level(lib, slicer_core, scene, phantom, tmp_path):
    node = _labelmap_node(lib, scene, phantom.labels, lib.volumes.ijkToRas(phantom.ct), "example_seg")
    assert lib.inputs.listVertebrae(node) == ["L1", "L2"]
    before = lib.volumes.voxels(node.GetImageData()).copy()
    _check_export(lib, phantom, node, tmp_path, {"L1": 31, "L2": 30})
    assert np.array_equal(lib.volumes.voxels(node.GetImageData()), before)


def test_labelmap_on_another_grid_is_resampled_onto_the_ct(lib, slicer_core, scene, phantom, tmp_path):
    coarse = phantom.labels[::2, ::2, ::2]
    matrix = lib.volumes.ijkToRas(phantom.ct)
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, 2 * matrix.GetElement(r, c))  # 4 mm voxels, same first voxel centre
    node = _labelmap_node(lib, scene, coarse, matrix)
    exported = lib.inputs.exportInputs(phantom.ct, node, tmp_path)
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(exported.vertebrae)))
    assert array.shape == phantom.labels.shape
    ranks = np.zeros(256, np.uint8)
    ranks[[31, 30]] = [level_rank("L1"), level_rank("L2")]
    assert np.array_equal(array[::2, ::2, ::2], ranks[coarse])


def test_labelmap_levels_come_from_a_user_colour_table_not_a_builtin_one(lib, slicer_core, scene, phantom):
    values = np.where(phantom.labels == 31, 5, np.where(phantom.labels == 30, 6, 0)).astype(np.uint8)
    node = _labelmap_node(lib, scene, values, lib.volumes.ijkToRas(phantom.ct))
    colours = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "my vertebrae")
    colours.SetTypeToUser()
    colours.SetNumberOfColors(7)
    colours.SetColorName(5, "Lumbar L1")
    colours.SetColorName(6, "Lumbar L2")
    display = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeDisplayNode")
    display.SetAndObserveColorNodeID(colours.GetID())
    node.SetAndObserveDisplayNodeID(display.GetID())
    assert lib.inputs.listVertebrae(node) == ["L1", "L2"]
    colours.SetSingletonTag("builtin")  # a Slicer default table: its names say nothing about these labels
    assert lib.inputs.listVertebrae(node) == ["C5", "C6"]  # SPINEPS values 5, 6


def test_segments_named_only_by_terminology(lib, slicer_core, scene, phantom, tmp_path):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "renamed")
    node.SetReferenceImageGeometryParameterFromVolumeNode(phantom.ct)
    for segment_id, value in (("Segment_1", 31), ("Segment_2", 30)):
        node.GetSegmentation().AddEmptySegment(segment_id, segment_id)
        mask = lib.volumes.orientedImageFromArray((phantom.labels == value).astype(np.uint8), phantom.ct)
        slicer_core.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(mask, node, segment_id)
    node.GetSegmentation().GetSegment("Segment_1").SetName("L1")
    segment = node.GetSegmentation().GetSegment("Segment_2")
    segment.SetTag(segment.GetTerminologyEntryTagName(),
                   "Segmentation category and type - Total Segmentator~SCT^123037004^Anatomical Structure~"
                   "SCT^14293000^L2 vertebra~^^~Anatomic codes - DICOM master list~^^~^^")
    _check_export(lib, phantom, node, tmp_path, {"L1": 31, "L2": 30})


def test_bad_vertebrae_and_ct_are_refused(lib, slicer_core, scene, phantom, tmp_path):
    segmentation = phantom.vertebrae.GetSegmentation()
    segmentation.GetSegment("vertebrae_L2").SetName("L1")
    with pytest.raises(InputError, match="name vertebra L1"):
        lib.inputs.listVertebrae(phantom.vertebrae)
    unnamed = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "unnamed")
    unnamed.GetSegmentation().AddEmptySegment("a", "liver")
    unnamed.GetSegmentation().AddEmptySegment("b", "spleen")
    with pytest.raises(InputError, match="name"):
        lib.inputs.listVertebrae(unnamed)
    with pytest.raises(InputError, match="segmentation or a labelmap"):
        lib.inputs.listVertebrae(phantom.ct)
    segmentation.GetSegment("vertebrae_L2").SetName("L2 vertebra")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    phantom.ct.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(InputError, match="harden"):
        lib.inputs.exportInputs(phantom.ct, phantom.vertebrae, tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# (c) the out-of-process runner


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _wait_for(predicate, seconds=20.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_runner_parses_progress_lines_and_keeps_other_output(lib):
    seen = []
    runner = lib.runner.ProcessRunner(_python("""
        import json
        print(json.dumps({"stage": "attribution", "vertebra": 1, "vertebrae": 2, "level": "L1", "percent": 25.0,
                          "eta_s": 30.0}), flush=True)
        print("a warning from a library", flush=True)
        print(json.dumps({"stage": "done", "out": "/x"}), flush=True)
        """), onEvent=seen.append)
    runner.start()
    assert runner.wait(30) == 0
    events = runner.poll()
    assert [e["stage"] for e in events] == ["attribution", "done"] and seen == events
    assert runner.poll() == []
    assert runner.succeeded and runner.error is None and runner.log == ["a warning from a library"]
    assert lib.logic.describeProgress(events[0]) == "attribution · vertebra 1/2 L1 · 25 % · about 0:30 left"


def test_runner_reports_a_failure_as_one_line(lib):
    runner = lib.runner.ProcessRunner(_python("""
        import sys
        print("some detail", file=sys.stderr)
        print("hideseek: error: vertebra L1: its body touches the image border", file=sys.stderr)
        sys.exit(2)
        """))
    runner.start()
    assert runner.wait(30) == 2 and not runner.succeeded
    assert runner.error == "vertebra L1: its body touches the image border"
    crash = lib.runner.ProcessRunner(_python("raise RuntimeError('boom')"))
    crash.start()
    crash.wait(30)
    assert crash.error == "RuntimeError: boom"


def test_cancel_kills_the_worker_and_its_children(lib, tmp_path):
    pid_file = tmp_path / "child.pid"
    runner = lib.runner.ProcessRunner(_python(f"""
        import json, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print(json.dumps({{"stage": "attribution", "percent": 1.0}}), flush=True)
        time.sleep(60)
        """))
    runner.start()
    seen = []
    assert _wait_for(lambda: seen.extend(runner.poll()) or bool(seen))
    assert _wait_for(lambda: pid_file.exists() and pid_file.read_text(encoding="utf-8"))
    started = time.monotonic()
    runner.cancel()
    assert time.monotonic() - started < 5
    child = int(pid_file.read_text(encoding="utf-8"))
    assert _wait_for(lambda: not _alive(child), 5), "the worker's child survived the cancel"
    assert _wait_for(lambda: not runner.running, 5)
    assert runner.cancelled and not runner.succeeded and runner.error is None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead, only not yet reaped
    except FileNotFoundError:
        return False


FAKE_WORKER = """
import json, os, sys, time
import numpy as np, SimpleITK as sitk

args = sys.argv[1:]
assert args[:3] == ["-m", "hideseek", "segment"], args
options = dict(zip(args[3::2], args[4::2]))
behaviour = os.environ.get("FAKE_WORKER", "ok")
print(json.dumps({"stage": "vertebra", "vertebra": 1, "vertebrae": 1, "level": "L1", "percent": 0.0}), flush=True)
if behaviour == "hang":
    time.sleep(60)
if behaviour == "fail":
    print("hideseek: error: vertebra L1: its body touches the image border", file=sys.stderr)
    sys.exit(2)
labels = sitk.ReadImage(options["--vertebrae"])
table = dict(line.split(",")[::-1] for line in open(options["--label-table"]).read().split()[1:])
lesions = sitk.Cast(labels == int(table["L1"]), sitk.sitkUInt8)  # all of L1 as one lytic lesion
os.makedirs(options["--out"])
sitk.WriteImage(lesions, os.path.join(options["--out"], "lesions.nii.gz"))
voxels = int(sitk.GetArrayViewFromImage(lesions).sum())
report = {"vertebrae": [{"level": "L1", "status": "ok", "n_lytic": 1, "n_blastic": 0}],
          "lesions": [{"vertebra": "L1", "type": "lytic", "delta": 0.9, "volume_mm3": 8.0 * voxels,
                       "centroid_ras": [0, 0, 0]}]}
open(os.path.join(options["--out"], "report.json"), "w").write(json.dumps(report))
print(json.dumps({"stage": "done", "out": options["--out"]}), flush=True)
"""


@pytest.fixture
def fake_logic(lib, tmp_path):
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER, encoding="utf-8")

    def make(behaviour: str):
        work = tmp_path / f"work-{behaviour}"
        work.mkdir()
        environment = {**os.environ, "FAKE_WORKER": behaviour}
        return lib.logic.HideSeekLogic([sys.executable, str(worker)], environment, work), work

    return make


def test_process_runs_the_worker_and_imports_its_results(lib, slicer_core, scene, phantom, fake_logic):
    logic, work = fake_logic("ok")
    events = []
    result = logic.process(phantom.ct, phantom.vertebrae, progress=events.append)
    assert [e["stage"] for e in events] == ["vertebra", "done"]
    expected = (phantom.labels == 31).astype(np.uint8)
    assert np.array_equal(_segment_labels(lib, slicer_core, result.segmentation, phantom.ct), expected)
    assert result.table.GetNumberOfRows() == 2
    assert list(work.iterdir()) == [], "the temporary folder must be removed"


def test_failed_or_cancelled_runs_import_nothing(lib, scene, phantom, fake_logic):
    logic, failed_work = fake_logic("fail")
    with pytest.raises(HideSeekError, match=r"^vertebra L1: its body touches the image border$"):
        logic.process(phantom.ct, phantom.vertebrae)
    assert list(failed_work.iterdir()) == []
    logic, work = fake_logic("hang")
    started = time.monotonic()
    events = []
    with pytest.raises(Cancelled):
        logic.process(phantom.ct, phantom.vertebrae, progress=events.append, cancel=lambda: bool(events))
    assert time.monotonic() - started < 20
    run = logic.startRun(phantom.ct, phantom.vertebrae)  # the widget's way: returns at once
    assert run.runner.running
    run.runner.cancel()
    with pytest.raises(Cancelled):
        logic.finishRun(run)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1  # only the phantom's vertebrae
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 0
    assert list(work.iterdir()) == []


def test_worker_command_is_what_the_cli_accepts(lib, phantom, tmp_path):
    from hideseek.cli import build_parser

    logic = lib.logic.HideSeekLogic()
    exported = logic.exportInputs(phantom.ct, phantom.vertebrae, tmp_path)
    command = logic.segmentCommand(exported, tmp_path / "out", levels=["L1", "L2"], mode="3d", model="/m",
                                   preset="published", deltaThreshold=0.35, device="cpu", ddimSteps=50,
                                   minLesionVoxels=7, searchEverySlice=True)
    assert command[:3] == [sys.executable, "-m", "hideseek"]
    args = build_parser().parse_args(command[3:])
    assert (args.ct, args.vertebrae, args.label_table) == tuple(map(str, (exported.ct, exported.vertebrae,
                                                                          exported.labelTable)))
    assert (args.label_format, args.levels, args.mode, args.model, args.preset) == (
        "plain", "L1,L2", "3d", "/m", "published")
    assert (args.delta_threshold, args.device, args.progress, args.out) == (0.35, "cpu", "json",
                                                                            str(tmp_path / "out"))
    assert (args.ddim_steps, args.min_lesion_voxels, args.gate) == (50, 7, 0.0)
    defaults = logic.segmentCommand(exported, tmp_path / "out")  # the preset's, the engine's and the model's own
    assert not {"--ddim-steps", "--min-lesion-voxels", "--gate"} & set(defaults)
    assert "0.0" in logic.segmentCommand(exported, tmp_path / "out", deltaThreshold=0.0)  # every tunable value
    for bad in ({"mode": "2d"}, {"deltaThreshold": 1.5}, {"levels": []}, {"preset": "slow"}, {"device": "tpu"},
                {"ddimSteps": 0}, {"ddimSteps": 251}, {"minLesionVoxels": 0}):
        with pytest.raises(InputError, match="invalid setting"):
            logic.segmentCommand(exported, tmp_path / "out", **bad)


def test_end_to_end_with_the_real_engine(lib, slicer_core, scene, phantom, toy_bundle, tmp_path):
    """The real ``python -m hideseek segment`` on the phantom (random toy model: plumbing, not accuracy)."""
    logic = lib.logic.HideSeekLogic(workRoot=tmp_path)
    events = []
    result = logic.process(phantom.ct, phantom.vertebrae, levels=["L1"], model=toy_bundle, progress=events.append)
    assert events and events[-1] == {"stage": "done", "out": events[-1]["out"]}
    report = result.report
    assert [v["level"] for v in report["vertebrae"]] == ["L1"] and report["vertebrae"][0]["status"] == "ok"
    labels = _segment_labels(lib, slicer_core, result.segmentation, phantom.ct)
    for spec, kind in ((LESION_SEGMENTS[0], "lytic"), (LESION_SEGMENTS[1], "blastic")):
        voxels = sum(lesion["voxels"] for lesion in report["lesions"] if lesion["type"] == kind)
        assert int((labels == spec.label).sum()) == voxels
    assert np.all(phantom.labels[labels > 0] == 31), "lesions only inside L1"
    assert result.table.GetNumberOfRows() == 1 + len(report["lesions"])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# models and dependencies


def test_model_cards_are_read_without_torch(lib, toy_bundle, tmp_path):
    card = lib.models.readModelCard(toy_bundle)
    assert (card.name, card.version, card.licence, card.intendedUse) == ("toy", "0", "MIT", "tests only")
    assert card.describe().startswith("Licence: MIT\nIntended use: tests only")
    broken = tmp_path / "nested" / "broken"
    broken.mkdir(parents=True)
    (broken / "model.json").write_text("{not json", encoding="utf-8")
    (broken / "model.safetensors").write_bytes(b"")
    with pytest.raises(HideSeekError, match="cannot read it"):
        lib.models.readModelCard(broken)
    with pytest.raises(HideSeekError, match="not a model bundle"):
        lib.models.readModelCard(tmp_path)
    found = lib.models.findModels([tmp_path, toy_bundle.parent])
    assert [c.path for c in found] == [toy_bundle.absolute()]


def test_model_cards_carry_the_tuned_delta_threshold_per_preset(lib, toy_bundle, tmp_path):
    """The GUI's "sensitivity from the model" reads these; values that are not a fraction are left out."""
    assert lib.models.readModelCard(toy_bundle).deltaThresholds == {}
    manifest = json.loads((toy_bundle / "model.json").read_text(encoding="utf-8"))
    manifest["method"]["presets"] = {"fast": {"delta_threshold": 0.3}, "published": {"delta_threshold": 0.5},
                                     "edge": {"delta_threshold": 0.0}, "odd": {"delta_threshold": 2},
                                     "bad": {"delta_threshold": "0.4"}}
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    (tuned / "model.json").write_text(json.dumps(manifest), encoding="utf-8")
    (tuned / "model.safetensors").write_bytes((toy_bundle / "model.safetensors").read_bytes())
    assert lib.models.readModelCard(tuned).deltaThresholds == {"fast": 0.3, "published": 0.5, "edge": 0.0}


def test_model_cards_say_which_slices_a_gated_model_searches(lib, toy_bundle, tmp_path):
    card = lib.models.readModelCard(toy_bundle)
    assert card.gates == {} and "searched" not in card.describe()
    manifest = json.loads((toy_bundle / "model.json").read_text(encoding="utf-8"))
    manifest["method"]["presets"] = {"fast": {"gate_probability": 0.5}, "published": {"gate_probability": None},
                                     "zero": {"gate_probability": 0.0}, "odd": {"gate_probability": 1.0}}
    gated = tmp_path / "gated"
    gated.mkdir()
    (gated / "model.json").write_text(json.dumps(manifest), encoding="utf-8")
    (gated / "model.safetensors").write_bytes((toy_bundle / "model.safetensors").read_bytes())
    card = lib.models.readModelCard(gated)
    assert card.gates == {"fast": 0.5}  # no gate, a zero gate (searches all) and an impossible one say nothing
    assert "Preset fast: only slices scored above P(malignant) 0.5 are searched" in card.describe()


def test_missing_requirements(lib):
    assert lib.dependencies.missingRequirements() == []
    assert lib.dependencies.missingRequirements(["numpy<1", "no-such-package-hideseek>=1", "scipy>=1"]) == [
        "numpy<1", "no-such-package-hideseek>=1"]


def test_install_uses_pip_ensure_and_never_touches_slicers_own_packages(lib, monkeypatch):
    import types

    calls = []
    fake = types.SimpleNamespace(
        pydeps=types.SimpleNamespace(pip_ensure=lambda reqs, **kw: calls.append(([str(r) for r in reqs], kw))),
        util=types.SimpleNamespace(pip_install=lambda text: calls.append(("pip_install", text))))
    monkeypatch.setitem(sys.modules, "slicer", fake)
    lib.dependencies.installRequirements(["scipy>=1.10"])
    assert calls == [(["scipy>=1.10"], {"requester": "HideSeekSegment",
                                        "skip_packages": ["numpy", "SimpleITK", "vtk", "torch"]})]
    calls.clear()
    del fake.pydeps  # Slicer before 5.11
    lib.dependencies.installRequirements(["scipy>=1.10"])
    assert calls == [("pip_install", "scipy>=1.10")]


def test_logic_process_signature(lib):
    params = list(inspect.signature(lib.logic.HideSeekLogic.process).parameters)
    assert params == ["self", "ctVolume", "vertebrae", "outputSegmentation", "levels", "mode", "model", "preset",
                      "deltaThreshold", "device", "ddimSteps", "minLesionVoxels", "searchEverySlice", "progress",
                      "cancel"]


# ---------------------------------------------------------------------------------------------------------------
# (d) static checks of the module file and its .ui (they need the Slicer application to run)


@pytest.fixture(scope="module")
def ui():
    tree = ET.parse(UI_FILE)
    widgets = {w.get("name"): w for w in tree.iter("widget")}
    return tree, widgets


@pytest.fixture(scope="module")
def module_source() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def _parameter_fields(module: ast.Module) -> dict[str, str]:
    (wrapper,) = [n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "HideSeekSegmentParameterNode"]
    assert any(ast.unparse(d) == "parameterNodeWrapper" for d in wrapper.decorator_list)
    return {n.target.id: ast.unparse(n.annotation) for n in wrapper.body if isinstance(n, ast.AnnAssign)}


def _property(widget: ET.Element, name: str):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop
    return None


def test_module_has_the_four_classes(module_source):
    bases = {n.name: [ast.unparse(b) for b in n.bases] for n in module_source.body if isinstance(n, ast.ClassDef)}
    assert bases["HideSeekSegment"] == ["ScriptedLoadableModule"]
    assert bases["HideSeekSegmentWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert bases["HideSeekSegmentLogic"] == ["ScriptedLoadableModuleLogic", "HideSeekLogic"]
    assert bases["HideSeekSegmentTest"] == ["ScriptedLoadableModuleTest"]
    text = MODULE_FILE.read_text(encoding="utf-8")
    assert f'TERMINOLOGY_FILE = "{TERMINOLOGY_FILE.name}"' in text
    assert '"Segmentation"' in text and "2512.06849" in text and "#readme" in text


def test_every_widget_the_module_uses_is_in_the_ui(ui):
    _, widgets = ui
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used, "the module uses its .ui widgets through self.ui"
    assert used <= set(widgets), f"missing from the .ui: {sorted(used - set(widgets))}"


def test_every_parameter_has_a_matching_widget(ui, module_source):
    _, widgets = ui
    bound = {}
    for widget in widgets.values():
        prop = _property(widget, "SlicerParameterName")
        if prop is not None:
            bound[prop.findtext("string")] = widget
    fields = _parameter_fields(module_source)
    assert set(bound) == set(fields)
    enums = {n.name for n in module_source.body if isinstance(n, ast.ClassDef) and "enum.Enum" in map(ast.unparse,
                                                                                                    n.bases)}
    for field, annotation in fields.items():
        widget = bound[field]
        if "vtkMRML" in annotation:
            assert widget.get("class") == "qMRMLNodeComboBox", field
            node_types = [s.text for s in _property(widget, "nodeTypes").iter("string")]
            assert node_types == re.findall(r"vtkMRML\w+", annotation), field
        elif annotation in enums:
            assert widget.get("class") == "QComboBox", field
        elif annotation == "bool":
            assert widget.get("class") == "QCheckBox", field
        elif annotation.startswith("Annotated[int"):
            low, high = map(int, re.fullmatch(r"Annotated\[int, WithinRange\((.+), (.+)\)\]", annotation).groups())
            assert widget.get("class") == "QSpinBox", field
            assert (int(_property(widget, "minimum").findtext("number")), int(_property(widget, "maximum").findtext(
                "number"))) == (low, high), field
        else:
            low, high = map(float, re.fullmatch(r"Annotated\[float, WithinRange\((.+), (.+)\)\]", annotation).groups())
            assert widget.get("class") == "ctkSliderWidget", field
            assert float(_property(widget, "minimum").findtext("double")) == low
            assert float(_property(widget, "maximum").findtext("double")) == high


def test_ui_declares_its_custom_widgets_and_gives_mrml_widgets_the_scene(ui):
    tree, widgets = ui
    declared = {c.findtext("class") for c in tree.iter("customwidget")}
    custom = {w.get("class") for w in widgets.values() if not w.get("class").startswith("Q")}
    assert custom <= declared, f"undeclared: {custom - declared}"
    receivers = {c.findtext("receiver") for c in tree.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    top = tree.getroot().find("widget")
    mrml = {name for name, w in widgets.items() if w.get("class").startswith("qMRML") and w is not top}
    assert mrml == receivers


def test_module_file_runs_with_the_application_parts_stubbed(lib, slicer_core, monkeypatch, tmp_path):
    """Execute the module file with stand-ins for what only the Slicer application provides (qt, the scripted
    module base classes, the parameter node wrapper): catches import and class-definition errors, and shows
    that the module's logic runs the worker with PythonSlicer in Slicer's startup environment."""
    import importlib.util
    import types

    class Base:
        def __init__(self, parent=None):
            self.parent = parent

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (Base,), {}))
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.WithinRange = lambda low, high: ("WithinRange", low, high)
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper)
    monkeypatch.setattr(slicer_core, "app", types.SimpleNamespace(temporaryPath=str(tmp_path)), raising=False)
    monkeypatch.setattr(slicer_core.util, "startupEnvironment", lambda: {"PATH": "/startup"})
    spec = importlib.util.spec_from_file_location("HideSeekSegmentUnderTest", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    assert list(module.HideSeekSegmentParameterNode.__annotations__) == [
        "inputVolume", "vertebrae", "outputSegmentation", "mode", "preset", "modelSensitivity", "deltaThreshold",
        "ddimSteps", "minLesionVoxels", "searchEverySlice", "device"]
    assert [m.value for m in module.Mode] == list(lib.logic.MODES)
    assert [m.value for m in module.Preset] == list(lib.logic.PRESETS)
    assert [m.value for m in module.Device] == list(lib.logic.DEVICES)
    assert all(isinstance(m.label(), str) for enum in (module.Mode, module.Preset, module.Device) for m in enum)
    logic = module.HideSeekSegmentLogic()
    assert os.path.basename(logic.pythonCommand[0]) == "PythonSlicer"
    assert logic.environment["PATH"] == "/startup" and logic.workRoot == str(tmp_path)
    assert logic._workerEnvironment()["PYTHONPATH"] == str(MODULE_DIR)


def test_logic_settings_match_the_engine(lib, ui):
    from hideseek.attribution import PRESETS
    from hideseek.calibration import DELTA_THRESHOLDS
    from hideseek.pipeline import MIN_LESION_VOXELS
    from hideseek.volume import MODES

    assert lib.logic.MODES == MODES
    spin_box_max = _property(ui[1]["ddimStepsSpinBox"], "maximum").findtext("number")
    assert int(spin_box_max) == lib.logic.MAX_DDIM_STEPS == PRESETS["published"].encode_steps
    default_size = _property(ui[1]["minLesionVoxelsSpinBox"], "specialValueText").findtext("string")
    assert default_size == f"Default ({MIN_LESION_VOXELS} voxels)"
    # The Δ slider follows the model's tuned threshold, so it must reach every threshold the tuner may choose.
    slider = ui[1]["deltaThresholdSliderWidget"]
    low, high = (float(_property(slider, k).findtext("double")) for k in ("minimum", "maximum"))
    assert low <= min(DELTA_THRESHOLDS) and max(DELTA_THRESHOLDS) <= high
    assert set(lib.logic.PRESETS) == set(PRESETS)
