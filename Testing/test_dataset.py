"""Slice sets from a manifest of real CTs: geometry, labels, truth restricted to the vertebra, caching."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hideseek.dataset import SliceSet, build_slice_set, cached_slice_set, read_manifest
from hideseek.errors import InputError
from hideseek.preprocessing import Preprocessing

PREP = Preprocessing(image_size=32, intensity="hu_window", lower=-200, upper=1200)


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def manifest(real_data_dir, tmp_path_factory):
    """L1 of the TotalSegmentator example (called malignant, with a fake lesion) and L3 of the SPINEPS crop."""
    tmp = tmp_path_factory.mktemp("manifest")
    ts = real_data_dir / "totalsegmentator_example"
    seg = sitk.ReadImage(str(ts / "example_seg.nii.gz"))
    labels = sitk.GetArrayFromImage(seg)
    lesion = np.zeros_like(labels, np.uint8)
    lesion[(labels == 31) | (labels == 32)] = 2  # "lesions" filling L1 and T12: only L1's may be kept
    image = sitk.GetImageFromArray(lesion)
    image.CopyInformation(seg)
    sitk.WriteImage(image, str(tmp / "lesions.nii.gz"))
    tp = real_data_dir / "tptbox_sample_ct"
    rows = [
        {"case": "ts", "ct": str(ts / "example_ct_sm.nii.gz"), "vertebrae": str(ts / "example_seg.nii.gz"),
         "label": 31, "level": "L1", "malignant": 1, "lesions": "lesions.nii.gz"},
        {"case": "tp", "ct": str(tp / "sub-ct_label-22_ct.nii.gz"),
         "vertebrae": str(tp / "sub-ct_seg-vert_label-22_msk.nii.gz"), "label": 22, "level": "L3", "malignant": 0},
    ]
    return _write_manifest(tmp / "manifest.csv", rows)


def test_slices_carry_labels_and_truth_of_their_own_vertebra(manifest, tmp_path):
    data = build_slice_set(manifest, PREP, central_fraction=0.5)
    assert data.images.shape[1:] == (32, 32) and data.images.dtype == np.float32
    assert list(data.names) == ["ts/L1", "tp/L3"]
    for vid, malignant in ((0, 1), (1, 0)):
        mine = data.vertebra == vid
        assert mine.sum() >= 1 and np.all(data.malignant[mine] == malignant)
        assert data.bodies[mine].any(axis=(1, 2)).all()
    lesions = data.lesions[data.vertebra == 0]
    assert lesions.any() and set(np.unique(lesions)) <= {0, 2}
    assert not data.lesions[data.vertebra == 1].any()
    full = build_slice_set(manifest, PREP, central_fraction=1.0)
    assert len(full) > len(data)

    again = SliceSet.load(data.save(tmp_path / "slices.npz"))
    assert np.array_equal(again.images, data.images) and list(again.names) == list(data.names)
    assert len(data.subset(data.vertebra == 1)) == int((data.vertebra == 1).sum())


def test_a_slice_cache_is_written_once_then_read_instead_of_the_manifest(manifest, tmp_path):
    cache = tmp_path / "mid.npz"
    first = cached_slice_set(manifest, PREP, cache, mode="mid")
    assert cache.is_file() and len(first) == 2  # one mid slice per vertebra
    again = cached_slice_set(tmp_path / "gone.csv", PREP, cache, mode="mid")  # the manifest is not read again
    assert np.array_equal(again.images, first.images) and list(again.names) == list(first.names)
    assert len(cached_slice_set(manifest, PREP, None, mode="mid")) == 2 and sorted(tmp_path.glob("*.npz")) == [cache]


def test_a_slice_cache_made_with_other_settings_is_refused_and_kept(manifest, tmp_path):
    from dataclasses import replace

    cache = tmp_path / "mid.npz"
    cached_slice_set(manifest, PREP, cache, mode="mid")
    before = cache.read_bytes()
    with pytest.raises(InputError, match=r"mid.npz was made with other settings \(upper: .*this run needs 1000"):
        cached_slice_set(manifest, replace(PREP, upper=1000.0), cache, mode="mid")
    with pytest.raises(InputError, match=r"mode: 'mid', this run needs '3d'"):
        cached_slice_set(manifest, PREP, cache, mode="3d")
    unstamped = cached_slice_set(manifest, PREP, None, mode="mid").save(tmp_path / "old.npz")
    with pytest.raises(InputError, match=r"does not record the preprocessing.*delete it"):
        cached_slice_set(manifest, PREP, unstamped, mode="mid")
    assert cache.read_bytes() == before


def test_an_interrupted_cache_write_leaves_no_cache_and_a_truncated_one_is_refused(manifest, tmp_path, monkeypatch):
    """A run stopped while writing the cache must not leave a file the next run takes for it (seen in use)."""
    import hideseek.dataset as dataset

    def stopped(out, **arrays):
        out.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    cache = tmp_path / "mid.npz"
    with monkeypatch.context() as m:
        m.setattr(dataset.np, "savez_compressed", stopped)
        with pytest.raises(KeyboardInterrupt):
            cached_slice_set(manifest, PREP, cache, mode="mid")
    assert list(tmp_path.glob("*mid.npz*")) == []
    assert len(cached_slice_set(manifest, PREP, cache, mode="mid")) == 2 and cache.is_file()

    cache.write_bytes(cache.read_bytes()[:100])  # as a kill -9 before the rename of an older version would leave it
    with pytest.raises(InputError, match=r"mid.npz is not a readable .npz file.*delete it"):
        cached_slice_set(manifest, PREP, cache, mode="mid")
    assert cache.stat().st_size == 100


def test_manifest_errors_are_specific(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_manifest(tmp_path / "none.csv")
    bad = _write_manifest(tmp_path / "m.csv", [{"ct": "a", "vertebrae": "b", "label": 1}])
    with pytest.raises(InputError, match="missing column"):
        read_manifest(bad)
    bad = _write_manifest(tmp_path / "m2.csv", [{"ct": "a", "vertebrae": "b", "label": 1, "malignant": "yes"}])
    with pytest.raises(InputError, match="0 or 1"):
        read_manifest(bad)


def test_lesion_sample_alternates_types_and_spreads_over_vertebrae():
    """The first slices with lesions in set order can all be one vertebra's; the sample takes each vertebra's
    best slice of each type before anyone's second, alternating lytic and blastic."""
    n_vertebrae, per = 6, 5
    n = n_vertebrae * per
    lesions = np.zeros((n, 8, 8), np.uint8)
    vertebra = np.repeat(np.arange(n_vertebrae), per).astype(np.int32)
    lesions[0:5, :2, :2] = 1  # vertebra 0: lytic in all five slices, the most in slice 2
    lesions[2, :3, :3] = 1
    lesions[5:10, 4:6, 4:6] = 2  # vertebra 1: blastic in all five, the most in slice 8
    lesions[8, 4:7, 4:7] = 2
    lesions[12, :2, :2] = 1  # vertebra 2: one lytic slice that also holds a blastic lesion
    lesions[12, 5:7, 5:7] = 2
    lesions[26, 5:7, 5:7] = 2  # vertebra 5: one blastic slice
    data = SliceSet(images=np.zeros((n, 8, 8), np.float32), bodies=np.ones((n, 8, 8), bool), lesions=lesions,
                    mimics=np.zeros((n, 8, 8), np.uint16), malignant=np.ones(n, np.int8), vertebra=vertebra,
                    names=np.array([f"v{i}" for i in range(n_vertebrae)]))
    assert data.lesion_sample(3).tolist() == [2, 8, 12]  # best lytic of v0, best blastic of v1, then v2's slice
    assert data.lesion_sample(4).tolist() == [2, 8, 12, 26]  # slice 12 serves both types once
    assert set(data.lesion_sample(6)) == {2, 8, 12, 26, 0, 5}  # then the second slice of each vertebra
    assert data.lesion_sample(100).tolist() == np.flatnonzero(lesions.any(axis=(1, 2))).tolist()
    assert data.subset(np.arange(20, 25)).lesion_sample(8).size == 0  # no lesions: an empty sample
