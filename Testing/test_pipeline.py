"""The whole-CT pipeline on real CTs and labels (a random toy model: geometry, formats and contracts, not accuracy)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from hideseek.errors import Cancelled, InputError
from hideseek.outputs import write_outputs
from hideseek.pipeline import segment_ct
from hideseek.volume import same_grid


@pytest.fixture(scope="module")
def totalseg(real_data_dir):
    d = real_data_dir / "totalsegmentator_example"
    return d / "example_ct_sm.nii.gz", d / "example_seg.nii.gz"


@pytest.fixture(scope="module")
def spineps(real_data_dir):
    d = real_data_dir / "tptbox_sample_ct"
    return d / "sub-ct_label-22_ct.nii.gz", d / "sub-ct_seg-vert_label-22_msk.nii.gz"


@pytest.fixture(scope="module")
def totalseg_run(totalseg, toy_bundle):
    return segment_ct(*totalseg, model=toy_bundle)


def _lesions(result) -> np.ndarray:
    return sitk.GetArrayFromImage(result.lesions)


def test_totalsegmentator_labels_give_lesions_in_ct_geometry(totalseg_run, totalseg):
    ct = sitk.ReadImage(str(totalseg[0]))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(totalseg[1])))
    assert same_grid(totalseg_run.lesions, ct)
    lesions = _lesions(totalseg_run)
    assert set(np.unique(lesions)) <= {0, 1, 2} and lesions.any()
    assert np.all(labels[lesions > 0] == 31)  # only L1 is whole in this crop
    report = totalseg_run.report()
    status = {v["level"]: v["status"] for v in report["vertebrae"]}
    assert status["L1"] == "ok"
    assert all(s.startswith("skipped:") for level, s in status.items() if level != "L1")
    assert "border" in status["T12"] and "voxels" in status["T11"]


def test_report_records_match_the_label_volume(totalseg_run):
    lesions = _lesions(totalseg_run)
    report = totalseg_run.report()
    spacing = np.prod(totalseg_run.ct.GetSpacing())
    for kind, name in ((1, "lytic"), (2, "blastic")):
        records = [r for r in report["lesions"] if r["type"] == name]
        assert sum(r["voxels"] for r in records) == int((lesions == kind).sum())
        for r in records:
            assert r["volume_mm3"] == pytest.approx(r["voxels"] * spacing, rel=1e-6)
            i, j, k = (round(v) for v in r["centroid_ijk"])
            assert 0 <= i < lesions.shape[2] and 0 <= j < lesions.shape[1] and 0 <= k < lesions.shape[0]
            lps = totalseg_run.ct.TransformContinuousIndexToPhysicalPoint(r["centroid_ijk"])
            assert r["centroid_ras"] == pytest.approx([-lps[0], -lps[1], lps[2]], abs=0.01)
            assert r["delta"] > report["settings"]["delta_threshold"]
    (l1,) = [v for v in report["vertebrae"] if v["level"] == "L1"]
    assert l1["n_lytic"] + l1["n_blastic"] == len(report["lesions"])


def test_outputs_follow_the_contract(totalseg_run, tmp_path, slicer_core):
    out = write_outputs(totalseg_run, tmp_path / "run")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["lesions.nii.gz", "lesions.seg.nrrd", "report.json", "report.csv", "overview.png"])
    nifti = sitk.ReadImage(str(out / "lesions.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(nifti), _lesions(totalseg_run))
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report == json.loads(json.dumps(totalseg_run.report()))
    rows = (out / "report.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("record,level,label")
    assert len(rows) == 1 + len(report["vertebrae"]) + len(report["lesions"])

    import slicerio

    seg = slicerio.read_segmentation(str(out / "lesions.seg.nrrd"))
    names = [s["name"] for s in seg["segments"]]
    assert names == ["Lytic metastasis", "Blastic metastasis"]
    with pytest.raises(InputError, match="exists"):
        write_outputs(totalseg_run, out)


def test_spineps_labels_with_subregions_in_3d_mode(spineps, toy_bundle):
    ct_path, vert_path = spineps
    result = segment_ct(ct_path, vert_path, levels="L3", mode="3d", model=toy_bundle)
    (l3,) = result.outcomes
    assert l3.status == "ok" and l3.body_source == "spineps-subregions" and len(l3.results) > 3
    sub = sitk.GetArrayFromImage(sitk.ReadImage(str(vert_path).replace("seg-vert", "seg-subreg")))
    vert = sitk.GetArrayFromImage(sitk.ReadImage(str(vert_path)))
    lesions = _lesions(result)
    assert lesions.any()
    assert np.all(np.isin(sub[lesions > 0], (49, 50))) and np.all(vert[lesions > 0] == 22)
    assert same_grid(result.lesions, sitk.ReadImage(str(ct_path)))


def test_lesions_below_the_voxel_minimum_are_left_out(totalseg, toy_bundle, totalseg_run):
    every = segment_ct(*totalseg, model=toy_bundle, min_lesion_voxels=1)
    sizes = sorted(r["voxels"] for r in every.lesion_records)
    cut = sizes[len(sizes) // 2] + 1  # drops about half of the toy model's lesions
    some = segment_ct(*totalseg, model=toy_bundle, min_lesion_voxels=cut)
    assert totalseg_run.run["min_lesion_voxels"] == 3 and some.run["min_lesion_voxels"] == cut
    assert [r["voxels"] for r in some.lesion_records] == [r["voxels"] for r in every.lesion_records
                                                          if r["voxels"] >= cut]
    assert [r["id"] for r in some.lesion_records] == list(range(1, len(some.lesion_records) + 1))
    kept, full = _lesions(some), _lesions(every)
    assert 0 < (kept > 0).sum() < (full > 0).sum() and np.all(kept[kept > 0] == full[kept > 0])
    assert int((kept > 0).sum()) == sum(r["voxels"] for r in some.lesion_records)


def test_levels_asked_for_by_name_must_be_usable(spineps, toy_bundle):
    with pytest.raises(InputError, match=r"L2: .*border"):
        segment_ct(*spineps, levels="L2,L3", model=toy_bundle)
    with pytest.raises(InputError, match="T10"):
        segment_ct(*spineps, levels="T10", model=toy_bundle)


def test_same_input_same_output(totalseg, toy_bundle, totalseg_run):
    again = segment_ct(*totalseg, model=toy_bundle)
    assert np.array_equal(_lesions(again), _lesions(totalseg_run))
    assert again.lesion_records == totalseg_run.lesion_records


def test_progress_events_and_cancel(totalseg, toy_bundle):
    events = []
    segment_ct(*totalseg, model=toy_bundle, progress=events.append)
    assert events[-1]["stage"] == "done" and events[-1]["percent"] == 100.0
    assert {e["level"] for e in events} >= {"L1"} and all(e["vertebrae"] == 4 for e in events)
    percents = [e["percent"] for e in events]
    assert percents == sorted(percents)
    with pytest.raises(Cancelled):
        segment_ct(*totalseg, model=toy_bundle, cancel=lambda: True)


def test_inputs_are_not_modified(totalseg, toy_bundle):
    ct = sitk.ReadImage(str(totalseg[0]), sitk.sitkFloat32)
    before = sitk.GetArrayFromImage(ct).copy()
    segment_ct(ct, totalseg[1], model=toy_bundle)
    assert np.array_equal(sitk.GetArrayFromImage(ct), before)


def test_the_library_api_is_hideseek_segment_ct():
    import hideseek

    assert hideseek.segment_ct is segment_ct
    with pytest.raises(AttributeError):
        _ = hideseek.not_an_api
