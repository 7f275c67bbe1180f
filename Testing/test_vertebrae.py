"""Vertebra label conventions, format detection, level parsing and vertebral-body sources (real and synthetic)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from hideseek.errors import InputError
from hideseek.vertebrae import (
    SPINEPS_LEVELS,
    TOTALSEGMENTATOR_LEVELS,
    Vertebra,
    VertebraLabels,
    derive_body,
    detect_label_format,
    level_from_name,
    load_vertebra_labels,
    parse_levels,
    read_label_table,
    vertebral_body,
)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def labelmap(array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    return image


@pytest.fixture(scope="module")
def spineps(real_data_dir):
    folder = real_data_dir / "tptbox_sample_ct"
    ct = sitk.ReadImage(str(folder / "sub-ct_label-22_ct.nii.gz"))
    return ct, load_vertebra_labels(folder / "sub-ct_seg-vert_label-22_msk.nii.gz", reference=ct)


@pytest.fixture(scope="module")
def totalseg(real_data_dir):
    folder = real_data_dir / "totalsegmentator_example"
    ct = sitk.ReadImage(str(folder / "example_ct_sm.nii.gz"))
    return ct, load_vertebra_labels(folder / "example_seg.nii.gz", reference=ct)


def test_level_tables():
    assert [TOTALSEGMENTATOR_LEVELS[v] for v in (26, 27, 28, 29, 30, 31, 32, 43, 44, 50)] == [
        "S1", "L5", "L4", "L3", "L2", "L1", "T12", "T1", "C7", "C1"
    ]  # fmt: skip
    assert 25 not in TOTALSEGMENTATOR_LEVELS  # the sacrum is not a vertebra we slice
    assert [SPINEPS_LEVELS[v] for v in (1, 7, 8, 19, 28, 20, 25, 26)] == [
        "C1", "C7", "T1", "T12", "T13", "L1", "L6", "S1"
    ]  # fmt: skip
    order = sorted(Vertebra(level, 0) for level in ("S1", "L1", "T13", "C7", "T1", "L6", "T12", "C1"))
    assert [v.level for v in order] == ["C1", "C7", "T1", "T12", "T13", "L1", "L6", "S1"]


@pytest.mark.parametrize(
    ("name", "level"),
    [
        ("L1", "L1"),
        ("vertebrae_T12", "T12"),
        ("Th12", "T12"),
        ("Vertebra C7", "C7"),
        ("L1-L2 disc", None),
        ("spinal canal", None),
        ("liver", None),
        ("rib_left_1", None),
        ("T14", None),
        ("L1 and L2", None),
    ],
)
def test_level_from_name(name, level):
    assert level_from_name(name) == level


def test_detect_label_format_rules(tmp_path):
    assert detect_label_format([0, 5, 31, 32, 52, 117]) == "totalsegmentator"
    assert detect_label_format([0, 21, 22, 23]) == "spineps"
    assert detect_label_format([0, 26, 27, 121, 222]) == "spineps"  # discs and endplates
    assert detect_label_format([0, 5], has_table=True) == "plain"
    assert detect_label_format([], tmp_path) == "totalsegmentator"  # a per-structure folder
    with pytest.raises(InputError, match="fit both"):
        detect_label_format([0, 26, 27])
    assert detect_label_format([0, 26, 27], "x_seg-vert_msk.nii.gz") == "spineps"
    assert detect_label_format([0, 26, 27], "vertebrae.nii.gz") == "totalsegmentator"
    with pytest.raises(InputError, match="subregion mask"):
        detect_label_format([0, 41, 42, 49, 50, 61])
    with pytest.raises(InputError, match="empty"):
        detect_label_format([0])
    with pytest.raises(InputError, match="match no known"):
        detect_label_format([0, 150])


def test_detect_real_formats(real_data_dir, spineps, totalseg):
    _, labels = totalseg
    assert labels.label_format == "totalsegmentator"
    assert labels.levels == ["T11", "T12", "L1", "L2"]
    _, labels = spineps
    assert labels.label_format == "spineps"
    assert labels.levels == ["L2", "L3", "L4"]
    assert labels.subregions is not None  # found beside the instance mask
    subreg = sitk.ReadImage(str(real_data_dir / "tptbox_sample_ct" / "sub-ct_seg-subreg_label-22_msk.nii.gz"))
    values = np.unique(sitk.GetArrayViewFromImage(subreg))
    with pytest.raises(InputError, match="subregion mask"):
        detect_label_format(values, "sub-ct_seg-subreg_label-22_msk.nii.gz")


def test_totalsegmentator_folder_matches_the_multilabel_file(tmp_path, totalseg):
    _, labels = totalseg
    array = sitk.GetArrayFromImage(labels.labelmap)
    for value, name in ((31, "vertebrae_L1"), (32, "vertebrae_T12"), (5, "liver")):
        part = sitk.GetImageFromArray((array == value).astype(np.uint8))
        part.CopyInformation(labels.labelmap)
        sitk.WriteImage(part, str(tmp_path / f"{name}.nii.gz"))
    folder = load_vertebra_labels(tmp_path)
    assert folder.label_format == "totalsegmentator"
    assert folder.levels == ["T12", "L1"]
    expected = np.where(np.isin(array, (31, 32)), array, 0)
    assert np.array_equal(sitk.GetArrayFromImage(folder.labelmap), expected)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no TotalSegmentator vertebra masks"):
        load_vertebra_labels(tmp_path / "empty")


@pytest.mark.parametrize(
    ("suffix", "text"),
    [
        (".csv", "value,name\n0,background\n3,L1\n4,T12\n9,liver\n"),
        (".tsv", "3\tvertebrae_L1\n4\tvertebrae_T12\n"),
        (".ctbl", "# Color table file\n0 Background 0 0 0 0\n3 L1 230 200 100 255\n4 Th12 200 200 100 255\n"),
    ],
)
def test_plain_labelmap_with_label_table(tmp_path, suffix, text):
    table = tmp_path / f"labels{suffix}"
    table.write_text(text, encoding="utf-8")
    array = np.zeros((30, 30, 30), np.uint8)
    array[4:12, 8:22, 8:22] = 4
    array[16:24, 8:22, 8:22] = 3
    path = tmp_path / "labels.nrrd"
    sitk.WriteImage(labelmap(array), str(path))
    labels = load_vertebra_labels(path, table=table)
    assert labels.label_format == "plain"
    assert [(v.level, v.label) for v in labels.vertebrae] == [("T12", 4), ("L1", 3)]
    with pytest.raises(InputError, match="needs a label table"):
        load_vertebra_labels(path, label_format="plain")


def test_label_table_errors(tmp_path):
    table = tmp_path / "bad.csv"
    table.write_text("value,name\n", encoding="utf-8")
    with pytest.raises(InputError, match="no 'value,name' rows"):
        read_label_table(table)
    table.write_text("1,L1\n2,vertebrae_L1\n", encoding="utf-8")
    array = np.ones((10, 10, 10), np.uint8)
    sitk.WriteImage(labelmap(array), str(tmp_path / "x.nrrd"))
    with pytest.raises(InputError, match="L1 is named twice"):
        load_vertebra_labels(tmp_path / "x.nrrd", table=table)
    with pytest.raises(InputError, match="file not found"):
        load_vertebra_labels(tmp_path / "missing.nii.gz")


def test_parse_levels():
    present = [Vertebra("L2", 30), Vertebra("T12", 32), Vertebra("L1", 31), Vertebra("T11", 33)]
    assert [v.level for v in parse_levels("L1,T12", present)] == ["T12", "L1"]
    assert [v.label for v in parse_levels(" t12  l1 ", present)] == [32, 31]
    assert [v.level for v in parse_levels("T12-L2", present)] == ["T12", "L1", "L2"]
    assert [v.level for v in parse_levels("L2:T12", present)] == ["T12", "L1", "L2"]
    assert [v.level for v in parse_levels("all", present)] == ["T11", "T12", "L1", "L2"]
    with pytest.raises(InputError, match=r"T9 is not in the labels \(present: T11, T12, L1, L2\)"):
        parse_levels("T9", present)
    with pytest.raises(InputError, match="unknown vertebra level 'X1'"):
        parse_levels("L1,X1", present)
    with pytest.raises(InputError, match="no vertebra levels given"):
        parse_levels(" , ", present)
    with pytest.raises(InputError, match="no vertebra between C1 and C7"):
        parse_levels("C1-C7", present)


def test_spineps_body_derivation_agrees_with_subregions(spineps):
    """The derived body against SPINEPS' own corpus (49 + 50): Dice per vertebra, measured 0.999/0.996/0.990."""
    _, labels = spineps
    array = sitk.GetArrayFromImage(labels.labelmap)
    for vertebra in labels.vertebrae:
        truth, source = vertebral_body(labels, vertebra)
        assert source == "spineps-subregions"
        derived = derive_body(array == vertebra.label, labels.labelmap)
        assert dice(derived, sitk.GetArrayFromImage(truth) > 0) >= 0.98, vertebra.level


def test_body_derivation_follows_a_tilted_vertebra(spineps):
    """L3 tilted 25 degrees in the sagittal plane (like a lordotic L5): measured Dice 0.995."""
    _, labels = spineps
    vert = ndimage.rotate(sitk.GetArrayFromImage(labels.labelmap), 25, axes=(1, 2), order=0)
    sub = ndimage.rotate(sitk.GetArrayFromImage(labels.subregions), 25, axes=(1, 2), order=0)
    grid = sitk.GetImageFromArray(vert)
    grid.SetSpacing(labels.labelmap.GetSpacing())
    grid.SetDirection(labels.labelmap.GetDirection())
    mask = vert == 22
    assert dice(derive_body(mask, grid), mask & np.isin(sub, (49, 50))) >= 0.98


def test_totalsegmentator_derived_bodies_are_anterior(totalseg):
    """No ground truth here: each whole body must be a large share of its vertebra and lie anterior to the rest."""
    _, labels = totalseg
    array = sitk.GetArrayFromImage(labels.labelmap)
    for level in ("T12", "L1"):
        vertebra = next(v for v in labels.vertebrae if v.level == level)
        body, source = vertebral_body(labels, vertebra)
        assert source == "derived"
        body = sitk.GetArrayFromImage(body) > 0
        whole = array == vertebra.label
        assert 0.5 < body.sum() / whole.sum() < 0.9, level
        # RAS file: numpy axis 1 (image y) grows toward anterior
        assert np.argwhere(body)[:, 1].mean() > np.argwhere(whole & ~body)[:, 1].mean() + 3, level


def test_body_sources_and_errors():
    array = np.zeros((40, 40, 40), np.uint8)
    array[10:30, 5:20, 10:30] = 7  # a body-like block ...
    array[17:23, 20:34, 18:22] = 7  # ... and a thin posterior process along y
    lab = labelmap(array)
    labels = load_like(lab, {7: "L1"})
    derived, source = vertebral_body(labels, labels.vertebrae[0])
    assert source == "derived"
    derived = sitk.GetArrayFromImage(derived) > 0
    assert derived[:, 5:20].sum() > 0.95 * (array[:, 5:20] == 7).sum()
    assert derived[:, 22:].sum() == 0
    explicit = np.zeros_like(array)
    explicit[10:30, 5:12, 10:30] = 1
    body_image = labelmap(explicit)
    got, source = vertebral_body(labels, labels.vertebrae[0], body_image)
    assert source == "explicit"
    assert int(sitk.GetArrayFromImage(got).sum()) == 20 * 7 * 20
    with pytest.raises(InputError, match="does not overlap"):
        vertebral_body(labels, labels.vertebrae[0], labelmap(np.zeros_like(array)))
    atlas = load_like(lab, {7: "C1"})
    with pytest.raises(InputError, match=r"C1 .* has no vertebral body"):
        vertebral_body(atlas, atlas.vertebrae[0])


def load_like(image: sitk.Image, levels: dict[int, str]) -> VertebraLabels:
    vertebrae = tuple(sorted(Vertebra(level, value) for value, level in levels.items()))
    return VertebraLabels(image, "plain", vertebrae, "synthetic")
