"""DICOM SEG output: written for a DICOM input series, referencing it, readable by highdicom; clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from hideseek.cli import main
from hideseek.demo import demo_case

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")


def _write_ct_series(image: sitk.Image, folder) -> str:
    """A minimal, valid CT series (one file per axial slice) with fresh UIDs; returns its SeriesInstanceUID."""
    folder.mkdir()
    study, series, frame = (pydicom.uid.generate_uid() for _ in range(3))
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {"0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": pydicom.uid.generate_uid(),
                "0008|0060": "CT", "0020|000d": study, "0020|000e": series, "0020|0052": frame,
                "0020|0013": str(k + 1), "0010|0010": "Phantom^Demo", "0010|0020": "PHANTOM1",
                "0020|0032": "\\".join(f"{v:.4f}" for v in position),
                "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[0:7:3], *direction[1:8:3])),
                "0018|0050": f"{image.GetSpacing()[2]:.4f}", "0028|1052": "0", "0028|1053": "1",
                "0008|0020": "20260101", "0008|0030": "120000", "0008|0090": "", "0020|0010": "1",
                "0008|0050": "1", "0020|0011": "1", "0020|0020": ""}  # fmt: skip
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:04d}.dcm"))
        writer.Execute(sl)
    return series


@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory):
    case = demo_case()
    root = tmp_path_factory.mktemp("dicom")
    ct = case.image(case.ct)
    ras = sitk.DICOMOrient(ct, "LPS")  # DICOM slices are written along the image's third axis
    series = _write_ct_series(sitk.Cast(ras, sitk.sitkInt16), root / "ct")
    labels = sitk.DICOMOrient(case.image(case.vertebrae), "LPS")
    sitk.WriteImage(labels, str(root / "vertebrae.nii.gz"))
    return root, series


def test_dicom_input_gives_a_seg_that_references_the_series(dicom_case, toy_bundle, tmp_path):
    root, series = dicom_case
    out = tmp_path / "out"
    assert main(["segment", "--ct", str(root / "ct"), "--vertebrae", str(root / "vertebrae.nii.gz"), "--out",
                 str(out), "--model", str(toy_bundle), "--dicom-seg", "--quiet", "--levels", "L1"]) == 0
    seg = hd.seg.segread(out / "lesions.dcm")
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels == ["Lytic metastasis", "Blastic metastasis"]
    seg_type = seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0]
    assert (seg_type.CodeValue, seg_type.CodingSchemeDesignator) == ("14799000", "SCT")
    assert seg_type.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Blastic"
    # the masks in the SEG are the ones of lesions.nii.gz, slice by slice
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "lesions.nii.gz")))
    assert nifti.any(), "the toy model finds lesions, so the comparison below is not empty"
    files = sorted((root / "ct").iterdir())
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    positions = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    mask = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    order = np.argsort(positions)
    assert np.array_equal(mask[order] > 0, nifti > 0)


def test_the_real_anonymised_series_is_refused_before_any_work(real_data_dir, toy_bundle, tmp_path, capsys):
    folder = real_data_dir / "totalsegmentator_example" / "example_ct_dicom"
    labels = tmp_path / "labels.nii.gz"
    from hideseek.io import read_ct

    ct = read_ct(folder)
    blank = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    blank.CopyInformation(ct)
    sitk.WriteImage(blank, str(labels))
    code = main(["segment", "--ct", str(folder), "--vertebrae", str(labels), "--out", str(tmp_path / "o"),
                 "--model", str(toy_bundle), "--dicom-seg"])
    assert code == 2
    assert "SOPInstanceUID" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_dicom_seg_needs_a_dicom_input(real_data_dir, toy_bundle, tmp_path, capsys):
    d = real_data_dir / "totalsegmentator_example"
    code = main(["segment", "--ct", str(d / "example_ct_sm.nii.gz"), "--vertebrae", str(d / "example_seg.nii.gz"),
                 "--out", str(tmp_path / "o"), "--model", str(toy_bundle), "--dicom-seg"])
    assert code == 2 and "needs a DICOM series" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
