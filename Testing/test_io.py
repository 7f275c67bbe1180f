"""Input reading and validation (every refusal names the file) and the atomic output folder."""

from __future__ import annotations

import gzip
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hideseek.errors import InputError
from hideseek.io import atomic_file, atomic_output_dir, check_output_dir, describe_ct, read_ct, read_labelmap

REAL_CTS = (
    "totalsegmentator_example/example_ct.nii.gz",
    "totalsegmentator_example/example_ct_sm.nii.gz",
    "tptbox_sample_ct/sub-ct_label-22_ct.nii.gz",
    "totalsegmentator_example/example_ct_dicom",
)
SYNTHETIC_UID = "1.2.826.0.1.3680043.8.498.77"


def _ct_array(shape=(12, 16, 16)) -> np.ndarray:
    """A small body-like CT in HU: air around, fat ring, soft tissue, a bone block, some noise."""
    _, y, x = np.indices(shape)
    r = np.hypot(y - shape[1] / 2, x - shape[2] / 2)
    hu = np.where(r < 7, -90.0, -1000.0)
    hu[r < 6] = 40.0
    hu[:, 6:10, 6:10] = 700.0
    return (hu + np.random.default_rng(0).normal(0, 10, shape)).astype(np.int16)


def _write(path: Path, array: np.ndarray, spacing=(0.8, 0.8, 2.0), **kw) -> Path:
    image = sitk.GetImageFromArray(array, **kw)
    image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


def _write_dicom_series(folder: Path, array: np.ndarray, uid: str, *, modality="CT", skip=()) -> None:
    """Write ``array`` (z, y, x, int16 HU) as one DICOM file per slice, the way scanners store a series."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[0]):
        if k in skip:
            continue
        image = sitk.GetImageFromArray(array[k : k + 1])
        image.SetSpacing((0.7, 0.7, 2.5))
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{uid}.{k + 1}",
            "0008|0060": modality,
            "0008|103e": f"synthetic {modality}",
            "0020|000d": "1.2.826.0.1.3680043.8.498.1",
            "0020|000e": uid,
            "0020|0013": str(k + 1),
            "0020|0032": f"-5\\-5\\{2.5 * k}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
        }
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(image)


# --- reading real CTs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_CTS)
def test_real_cts_read_as_float_hu(real_data_dir, name):
    start = time.perf_counter()
    image = read_ct(real_data_dir / name)
    seconds = time.perf_counter() - start
    assert image.GetPixelID() == sitk.sitkFloat32 and image.GetDimension() == 3
    array = sitk.GetArrayViewFromImage(image)
    assert array.min() < -500 and array.max() > 300  # air and bone, in HU
    info = describe_ct(image)
    assert info["source"] == str(real_data_dir / name) and len(info["orientation"]) == 3
    print(f"{name}: {image.GetSize()} read in {seconds:.2f} s")


def test_real_dicom_series_metadata(real_data_dir):
    image = read_ct(real_data_dir / "totalsegmentator_example/example_ct_dicom")
    info = describe_ct(image)
    assert info["modality"] == "CT" and info["series_description"] == "CT Body 3.0"
    assert info["patient_position"] == "HFS" and info["orientation"] == "LPS"
    assert image.GetSize() == (512, 512, 20)
    # rescale intercept -1024 applied: the air outside the body reads about -1000 HU, not 0
    assert np.median(sitk.GetArrayViewFromImage(image)[:, :40, :40]) < -900


def test_normalised_sample_is_refused_unless_allowed(real_data_dir):
    path = real_data_dir / "hide_and_seek_sample/sample_ct.nii.gz"
    with pytest.raises(InputError, match=r"sample_ct\.nii\.gz.*Hounsfield.*--allow-non-hu"):
        read_ct(path)
    assert read_ct(path, require_hu=False).GetSize() == (64, 64, 64)


# --- refusing CT files ----------------------------------------------------------------------------------------


def _mr_like(shape=(12, 16, 16)) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.abs(rng.normal(300, 150, shape)).astype(np.float32)


@pytest.mark.parametrize(
    "array",
    [
        pytest.param(_mr_like(), id="mr-magnitude"),
        pytest.param(((_ct_array() + 1000) / 2000).astype(np.float32), id="normalised-0-1"),
        pytest.param(((_ct_array() - 0.0) / 500).astype(np.float32), id="z-scored"),
        pytest.param((_ct_array() + 1024).astype(np.int16), id="missing-intercept"),
        pytest.param((_ct_array().astype(np.float32) * 1000), id="wrong-unit"),
    ],
)
def test_not_hounsfield_is_refused(tmp_path, array):
    path = _write(tmp_path / "scan.nii.gz", array)
    with pytest.raises(InputError, match=r"scan\.nii\.gz does not look like a CT in Hounsfield"):
        read_ct(path)


def test_tight_bone_crop_with_padding_is_accepted(tmp_path):
    """No outside air, a sliver of fat, -3024 padding corners: still a CT."""
    array = np.full((10, 20, 20), 45.0, np.float32)
    array[:, 5:15, 5:15] = 400.0
    array[:, :, :1] = -110.0  # 5 % fat at one edge
    array[:, :3, :3] = -3024.0
    assert read_ct(_write(tmp_path / "crop.nrrd", array)).GetSize() == (20, 20, 10)


def test_mha_and_nrrd_with_a_single_time_point_are_squeezed(tmp_path):
    image = sitk.JoinSeries([sitk.GetImageFromArray(_ct_array())])
    sitk.WriteImage(image, str(tmp_path / "ct.mha"))
    assert read_ct(tmp_path / "ct.mha").GetSize() == (16, 16, 12)


@pytest.mark.parametrize(
    ("name", "array", "kw", "message"),
    [
        ("flat.nii.gz", _ct_array()[0], {}, "2-D"),
        ("phases.nii.gz", np.stack([_ct_array(), _ct_array()], axis=-1), {"isVector": True}, "2 values per voxel"),
        ("slab.nrrd", _ct_array()[:1], {}, "single slice"),
    ],
)
def test_not_a_3d_volume_is_refused(tmp_path, name, array, kw, message):
    path = _write(tmp_path / name, array, **kw)
    with pytest.raises(InputError, match=f"{re.escape(name)}.*{message}"):
        read_ct(path)


def test_4d_series_is_refused(tmp_path):
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(_ct_array())] * 2), str(tmp_path / "cine.nrrd"))
    with pytest.raises(InputError, match=r"cine\.nrrd is 4-D.*extract"):
        read_ct(tmp_path / "cine.nrrd")


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii", "ct.nrrd"])
@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_nan_or_inf_is_refused(tmp_path, name, bad):
    """ITK reads NaN in a NIfTI as 0, so NIfTI is scanned before ITK reads it; the other formats after."""
    array = _ct_array().astype(np.float64 if name == "ct.nii" else np.float32)
    array[3, 4, 5] = bad
    with pytest.raises(InputError, match=f"{re.escape(name)} has 1 NaN or infinite"):
        read_ct(_write(tmp_path / name, array))


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii", "float.nii.gz", "ct.nrrd", "ct.mha"])
def test_truncated_file_is_refused(tmp_path, name):
    """ITK silently zero-fills a truncated NIfTI; the other formats fail inside ITK. Both must name the file."""
    array = _ct_array((30, 40, 40))
    full = _write(tmp_path / f"full_{name}", array.astype(np.float32) if name.startswith("float") else array)
    raw = full.read_bytes()
    (tmp_path / name).write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(InputError, match=f"{re.escape(name)} is (truncated|damaged)"):
        read_ct(tmp_path / name)
    assert read_ct(full).GetSize() == (40, 40, 30)  # the complete file passes the same check


def test_gzip_nifti_with_extra_trailing_bytes_is_read(tmp_path):
    """The fast gzip-trailer check falls back to counting bytes instead of refusing a valid file."""
    raw = gzip.decompress(_write(tmp_path / "a.nii.gz", _ct_array()).read_bytes())
    (tmp_path / "b.nii.gz").write_bytes(gzip.compress(raw + b"\0" * 8))
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(read_ct(tmp_path / "b.nii.gz")), _ct_array().astype(np.float32)
    )


def test_unreadable_or_missing_file_is_refused(tmp_path):
    (tmp_path / "notes.nii.gz").write_text("not an image", encoding="utf-8")
    with pytest.raises(InputError, match=r"notes\.nii\.gz is not a readable image"):
        read_ct(tmp_path / "notes.nii.gz")
    with pytest.raises(InputError, match=r"nowhere\.nrrd not found"):
        read_ct(tmp_path / "nowhere.nrrd")


def test_series_option_on_a_file_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"ct\.nrrd is a file"):
        read_ct(_write(tmp_path / "ct.nrrd", _ct_array()), series_uid=SYNTHETIC_UID)


# --- DICOM folders --------------------------------------------------------------------------------------------


def test_two_series_ask_which_one(real_data_dir, tmp_path):
    folder = tmp_path / "study"
    shutil.copytree(real_data_dir / "totalsegmentator_example/example_ct_dicom", folder / "body")
    _write_dicom_series(folder / "extra", _ct_array(), SYNTHETIC_UID)
    with pytest.raises(InputError) as caught:
        read_ct(folder)
    message = str(caught.value)
    assert str(folder) in message and "2 DICOM series" in message and "--series UID" in message
    assert f"{SYNTHETIC_UID!r} (CT 'synthetic CT', 12 slices)" in message
    assert "(CT 'CT Body 3.0', 20 slices)" in message
    image = read_ct(folder, series_uid=SYNTHETIC_UID)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), _ct_array().astype(np.float32))
    assert describe_ct(image)["series_uid"] == SYNTHETIC_UID
    with pytest.raises(InputError, match=r"has no DICOM series '1\.2\.3'"):
        read_ct(folder, series_uid="1.2.3")


def test_dicom_folder_problems_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty holds no DICOM series"):
        read_ct(tmp_path / "empty")
    _write_dicom_series(tmp_path / "mr", _ct_array(), SYNTHETIC_UID, modality="MR")
    with pytest.raises(InputError, match=r"mr is MR, not CT"):
        read_ct(tmp_path / "mr")
    _write_dicom_series(tmp_path / "gap", _ct_array(), SYNTHETIC_UID, skip=(5,))
    with pytest.raises(InputError, match=r"gap has missing or irregularly spaced slices"):
        read_ct(tmp_path / "gap")
    with pytest.raises(InputError, match=r"slice000\.dcm is a single DICOM file"):
        read_ct(tmp_path / "gap" / "slice000.dcm")


# --- labelmaps ------------------------------------------------------------------------------------------------


@pytest.fixture
def ct(tmp_path) -> sitk.Image:
    return read_ct(_write(tmp_path / "ct.nrrd", _ct_array()))


def _labels(dtype=np.uint8) -> np.ndarray:
    labels = np.zeros((12, 16, 16), dtype)
    labels[2:6, 6:10, 6:10] = 20
    labels[6:10, 6:10, 6:10] = 21
    return labels


def test_labelmap_integral_floats_are_cast(tmp_path, ct):
    labels = read_labelmap(_write(tmp_path / "vert.nii.gz", _labels(np.float32)), ct)
    assert labels.GetPixelID() == sitk.sitkUInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), _labels())


@pytest.mark.parametrize(
    ("array", "message"),
    [
        pytest.param(_labels(np.float32) * 0.5, "non-integer values", id="fractional"),
        pytest.param(_labels(np.int16) - 1, "labels -1..20", id="negative"),
        pytest.param(np.zeros((12, 16, 16), np.uint8), "is empty", id="empty"),
    ],
)
def test_bad_labelmap_values_are_refused(tmp_path, ct, array, message):
    with pytest.raises(InputError, match=rf"spine labelmap .*seg\.nii\.gz .*{message}"):
        read_labelmap(_write(tmp_path / "seg.nii.gz", array), ct, name="spine")


@pytest.mark.parametrize(
    ("change", "prop"),
    [
        ({"spacing": (0.8, 0.8, 2.5)}, "spacing"),
        ({"origin": (0.0, 0.0, 1.0)}, "origin"),
        ({"direction": (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)}, "direction"),
    ],
)
def test_labelmap_on_another_grid_is_refused(tmp_path, ct, change, prop):
    image = sitk.GetImageFromArray(_labels())
    image.CopyInformation(ct)
    for key, value in change.items():
        getattr(image, f"Set{key.capitalize()}")(value)
    sitk.WriteImage(image, str(tmp_path / "seg.nrrd"))
    with pytest.raises(InputError, match=rf"seg\.nrrd has a different geometry than the CT \({prop} .*Resample"):
        read_labelmap(tmp_path / "seg.nrrd", ct)


def test_labelmap_within_tolerance_takes_the_ct_geometry(tmp_path, ct):
    image = sitk.GetImageFromArray(_labels())
    image.CopyInformation(ct)
    image.SetOrigin(tuple(o + 1e-5 for o in ct.GetOrigin()))
    image.SetSpacing(tuple(s * (1 + 1e-6) for s in ct.GetSpacing()))
    sitk.WriteImage(image, str(tmp_path / "seg.nrrd"))
    labels = read_labelmap(tmp_path / "seg.nrrd", ct)
    assert labels.GetOrigin() == ct.GetOrigin() and labels.GetSpacing() == ct.GetSpacing()


def test_real_labelmaps_match_only_their_own_ct(real_data_dir):
    folder = real_data_dir / "totalsegmentator_example"
    small = read_ct(folder / "example_ct_sm.nii.gz")
    labels = sitk.GetArrayFromImage(read_labelmap(folder / "example_seg.nii.gz", small))
    assert {30, 31, 32, 33} <= set(np.unique(labels).tolist())  # L2, L1, T12, T11
    with pytest.raises(InputError, match=r"example_seg\.nii\.gz has a different geometry .*size 122×101×30 vs "):
        read_labelmap(folder / "example_seg.nii.gz", read_ct(folder / "example_ct.nii.gz"))
    tptbox = real_data_dir / "tptbox_sample_ct"
    vertebrae = read_labelmap(
        tptbox / "sub-ct_seg-vert_label-22_msk.nii.gz", read_ct(tptbox / "sub-ct_label-22_ct.nii.gz")
    )
    assert {21, 22, 23} <= set(np.unique(sitk.GetArrayFromImage(vertebrae)).tolist())


# --- output folder --------------------------------------------------------------------------------------------


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_atomic_output_appears_only_on_success(tmp_path):
    out = tmp_path / "results" / "case1"
    with atomic_output_dir(out) as work:
        (work / "lesions.seg.nrrd").write_text("x", encoding="utf-8")
        assert not out.exists()
    assert (out / "lesions.seg.nrrd").read_text(encoding="utf-8") == "x"
    assert _siblings(out) == ["case1"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_run_leaves_nothing(tmp_path, error):
    out = tmp_path / "case1"
    with pytest.raises(error), atomic_output_dir(out) as work:
        (work / "partial.txt").write_text("half", encoding="utf-8")
        raise error()
    assert not out.exists() and _siblings(out) == []


def test_existing_results_are_kept_unless_overwrite_succeeds(tmp_path):
    out = tmp_path / "case1"
    out.mkdir()
    (out / "old.txt").write_text("old", encoding="utf-8")
    with pytest.raises(InputError, match=r"case1 exists and is not empty.*--overwrite"), atomic_output_dir(out):
        pass
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(out, overwrite=True) as work:
        (work / "new.txt").write_text("new", encoding="utf-8")
        raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"] and _siblings(out) == ["case1"]
    with atomic_output_dir(out, overwrite=True) as work:
        (work / "new.txt").write_text("new", encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and _siblings(out) == ["case1"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_atomic_file_replaces_the_old_version_only_when_complete(tmp_path, error):
    path = tmp_path / "summary.csv"
    path.write_text("old", encoding="utf-8")
    with pytest.raises(error), atomic_file(path) as tmp:
        tmp.write_text("half", encoding="utf-8")
        raise error()
    assert path.read_text(encoding="utf-8") == "old" and _siblings(path) == ["summary.csv"]
    with atomic_file(path) as tmp:
        tmp.write_text("new", encoding="utf-8")
        assert path.read_text(encoding="utf-8") == "old"
    assert path.read_text(encoding="utf-8") == "new" and _siblings(path) == ["summary.csv"]


def test_output_path_checks(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", overwrite=False) == tmp_path / "empty"
    (tmp_path / "report.txt").write_text("", encoding="utf-8")
    with pytest.raises(InputError, match=r"report\.txt is a file"):
        check_output_dir(tmp_path / "report.txt", overwrite=True)
