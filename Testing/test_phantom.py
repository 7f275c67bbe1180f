"""The phantom generator: deterministic, literature HU ranges, masks that match the CT, files the pipeline reads."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from scipy import ndimage

from hideseek import phantom as P
from hideseek.cli import main
from hideseek.errors import InputError
from hideseek.io import read_ct
from hideseek.vertebrae import load_vertebra_labels

SMALL = {"levels": ("L1", "L2"), "spacing": 1.2, "size": (120.0, 140.0)}


@pytest.fixture(scope="module")
def case():
    # seed 3 with every level malignant and carrying mimics: all structures occur
    return P.generate_case(3, lesion_rate=1.0, mimic_rate=1.0, orientation="LPS", **SMALL)


def test_a_case_is_a_pure_function_of_its_seed():
    a = P.generate_case(7, **SMALL)
    b = P.generate_case(7, **SMALL)
    c = P.generate_case(8, **SMALL)
    assert np.array_equal(a.ct, b.ct) and np.array_equal(a.lesions, b.lesions)
    assert a.ct.shape != c.ct.shape or not np.array_equal(a.ct, c.ct)


def _median_hu(case, tissue: int) -> float:
    return float(np.median(case.ct[case.tissue == tissue]))


def test_tissues_lie_in_their_literature_ranges(case):
    # medians of the noisy CT per dominant tissue; ranges from docs/phantom.md with room for noise and partial volume
    assert 55 <= _median_hu(case, P.DISC) <= 90
    assert 60 <= _median_hu(case, P.CANCELLOUS) <= 280
    assert 380 <= _median_hu(case, P.CORTEX) <= 1000
    assert -110 <= _median_hu(case, P.FAT) <= -40
    assert 10 <= _median_hu(case, P.LYTIC_T) <= 80
    assert 400 <= _median_hu(case, P.BLASTIC_T) <= 900
    assert case.ct.dtype == np.int16


def test_lesions_and_mimics_sit_in_their_own_malignant_or_mimic_vertebra(case):
    for rec in case.records:
        own = case.vertebrae == rec.label
        lesion_voxels = int(((case.lesions > 0) & own).sum())
        assert (lesion_voxels > 0) == rec.malignant
        assert lesion_voxels == sum(les.n_voxels for les in rec.lesions)
        assert rec.n_lytic + rec.n_blastic <= 4
    inside = case.vertebrae[case.lesions > 0]
    assert inside.all(), "every lesion voxel belongs to a vertebra"
    assert ((case.lesions > 0) & (case.body > 0)).sum() >= 0.8 * (case.lesions > 0).sum()
    assert any(rec.mimic_kinds for rec in case.records)
    assert not (case.mimics[case.lesions > 0]).any(), "a voxel is a lesion or a mimic, never both"


def test_mimic_only_vertebrae_are_labelled_healthy():
    case = P.generate_case(5, lesion_rate=0.0, mimic_rate=1.0, **SMALL)
    assert all(not r.malignant for r in case.records)
    assert (case.lesions == 0).all()
    assert any(r.mimic_kinds for r in case.records if r.in_levels)


@pytest.mark.parametrize("code", ["RAS", "PIR"])
def test_orientations_are_the_same_anatomy(code):
    lps = P.generate_case(9, orientation="LPS", **SMALL)
    other = P.generate_case(9, orientation=code, **SMALL)
    assert np.array_equal(P.to_canonical(other.vertebrae, code), P.to_canonical(lps.vertebrae, "LPS"))
    assert other.orientation == code


def test_bad_settings_are_refused():
    with pytest.raises(InputError, match="lesion_rate"):
        P.generate_case(1, lesion_rate=1.5)
    with pytest.raises(InputError, match="level"):
        P.generate_case(1, levels=("L1", "X9"))
    with pytest.raises(InputError, match=r"lytic_hu.*fat"):
        P.generate_case(1, lytic_hu=(-80, 0))
    with pytest.raises(InputError, match="lytic_hu"):
        P.generate_case(1, lytic_hu=(40, 20))
    with pytest.raises(InputError, match="lytic_min_mm"):
        P.generate_case(1, lytic_min_mm=25)


def _lesions(case, kind):
    return [les for rec in case.records for les in rec.lesions if les.kind == kind]


def test_a_curriculum_draws_darker_larger_lytic_lesions_and_leaves_the_defaults_alone(case):
    easy = P.generate_case(3, lesion_rate=1.0, mimic_rate=1.0, orientation="LPS", lytic_hu=(0, 10),
                           lytic_min_mm=10, **SMALL)
    lytic, default_lytic = _lesions(easy, "lytic"), _lesions(case, "lytic")
    assert lytic and default_lytic
    assert all(0 <= les.hu <= 10 and les.diameter_mm >= 10 for les in lytic)
    assert not all(0 <= les.hu <= 10 and les.diameter_mm >= 10 for les in default_lytic)
    assert all(20 <= les.hu <= 60 for les in default_lytic)
    assert np.median(easy.ct[easy.tissue == P.LYTIC_T]) < np.median(case.ct[case.tissue == P.LYTIC_T])
    assert (easy.lesions == P.LYTIC).sum() > (case.lesions == P.LYTIC).sum()


@pytest.mark.parametrize("kind", ["lytic", "blastic"])
def test_a_one_kind_curriculum_gives_every_malignant_vertebra_that_kind_only(case, kind):
    one = P.generate_case(3, lesion_rate=1.0, mimic_rate=1.0, orientation="LPS", lesion_kinds=kind, **SMALL)
    assert {les.kind for les in _lesions(case, "lytic") + _lesions(case, "blastic")} == {"lytic", "blastic"}
    malignant = [rec for rec in one.records if rec.malignant]
    assert malignant and all(rec.lesions and {les.kind for les in rec.lesions} == {kind} for rec in malignant)
    other = P.BLASTIC if kind == "lytic" else P.LYTIC
    assert (one.lesions > 0).any() and not (one.lesions == other).any()
    with pytest.raises(InputError, match="lesion_kinds"):
        P.generate_case(3, lesion_kinds="mixed", **SMALL)


def test_a_healthy_twin_is_the_same_case_without_its_lesions(case):
    twin = P.generate_case(3, lesion_rate=1.0, mimic_rate=1.0, orientation="LPS", paint_lesions=False, **SMALL)
    assert np.array_equal(twin.lesions, case.lesions) and np.array_equal(twin.vertebrae, case.vertebrae)
    assert [r.lesions for r in twin.records] == [r.lesions for r in case.records]
    near = ndimage.distance_transform_edt(case.lesions == 0) <= 8  # soft edges, cortex breaches, scanner blur
    assert np.array_equal(twin.ct[~near], case.ct[~near]), "the twin differs only around the lesions"
    blastic, lytic = case.lesions == P.BLASTIC, case.lesions == P.LYTIC
    assert np.median(twin.ct[blastic]) < np.median(case.ct[blastic]) - 150
    assert np.median(twin.ct[lytic]) > np.median(case.ct[lytic]) + 30
    assert not np.isin(twin.tissue, (P.LYTIC_T, P.BLASTIC_T)).any()


def test_cli_writes_a_set_the_pipeline_reads(tmp_path, capsys):
    out = tmp_path / "set"
    assert main(["phantom", "--out", str(out), "--cases", "1", "--seed", "4", "--levels", "L1,L2"]) == 0
    assert "case_0000" in capsys.readouterr().out
    with (out / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == P.MANIFEST_COLUMNS
    assert [r["level"] for r in rows] == ["L1", "L2"]
    ct = read_ct(out / rows[0]["ct"])
    labels = load_vertebra_labels(out / rows[0]["vertebrae"], reference=ct)
    assert {v.level for v in labels.vertebrae} >= {"L1", "L2"}
    assert {int(r["label"]) for r in rows} == {P.TS_LABELS["L1"], P.TS_LABELS["L2"]}
    # the curriculum options reach the generator; a malformed range is refused before anything is written
    easy = tmp_path / "easy"
    assert main(["phantom", "--out", str(easy), "--cases", "1", "--seed", "4", "--levels", "L1",
                 "--lytic-hu=-30,15", "--lytic-min-mm", "8", "--lesion-kinds", "lytic", "--lesion-rate", "1"]) == 0
    with (easy / "manifest.csv").open() as fh:
        easy_rows = list(csv.DictReader(fh))
    assert int(easy_rows[0]["n_lytic"]) > 0 and int(easy_rows[0]["n_blastic"]) == 0
    assert main(["phantom", "--out", str(tmp_path / "bad"), "--cases", "1", "--seed", "4", "--lytic-hu", "0"]) == 2
    assert "lytic_hu" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["phantom", "--out", str(tmp_path / "bad"), "--cases", "1", "--seed", "4", "--lytic-hu", "a,b"]) == 2
    assert "--lytic-hu 'a,b'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    # an existing set is never replaced silently
    before = sorted(p.name for p in out.iterdir())
    assert main(["phantom", "--out", str(out), "--cases", "1", "--seed", "5"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_set_is_replaced_only_with_overwrite_and_only_a_phantom_set(tmp_path):
    out = tmp_path / "set"
    P.write_phantom_set(out, 1, seed=4, **SMALL)
    first = (out / "manifest.csv").read_bytes()
    with pytest.raises(InputError, match=r"not empty.*--overwrite"):
        P.write_phantom_set(out, 1, seed=5, **SMALL)
    assert (out / "manifest.csv").read_bytes() == first
    P.write_phantom_set(out, 1, seed=5, overwrite=True, **SMALL)
    assert (out / "manifest.csv").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # the old set and the temp folder are gone

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep", encoding="utf-8")
    with pytest.raises(InputError, match="not a phantom set"):
        P.write_phantom_set(mine, 1, seed=5, overwrite=True, **SMALL)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    with pytest.raises(InputError, match="is a file"):
        P.write_phantom_set(mine / "notes.txt", 1, seed=5, overwrite=True, **SMALL)
