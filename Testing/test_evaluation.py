"""`hideseek evaluate`: the scores are right on known answers, baselines are tuned on validation only, CLI output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hideseek.cli import main
from hideseek.dataset import SliceSet
from hideseek.evaluation import (
    delta_ranking,
    difference_maps,
    mean_f1,
    score_method,
    split_validation,
    threshold_maps,
)
from hideseek.phantom import write_phantom_set


def _slice_set(n: int = 8) -> SliceSet:
    """Square bodies; even slices carry a dark (lytic) lesion, every third a bright (blastic) one."""
    images = np.full((n, 32, 32), 0.3, np.float32)
    bodies = np.zeros((n, 32, 32), bool)
    bodies[:, 4:28, 4:28] = True
    lesions = np.zeros((n, 32, 32), np.uint8)
    mimics = np.zeros((n, 32, 32), np.uint16)
    for i in range(n):
        if i % 2 == 0:
            lesions[i, 6:12, 6:12] = 1
            images[i, 6:12, 6:12] = 0.05
        if i % 3 == 0:
            lesions[i, 18:24, 18:24] = 2
            images[i, 18:24, 18:24] = 0.9
        if i % 4 == 1:
            mimics[i, 14:17, 6:9] = 1
            images[i, 14:17, 6:9] = 0.6
    malignant = (lesions > 0).any(axis=(1, 2)).astype(np.int8)
    return SliceSet(images, bodies, lesions, mimics, malignant, np.arange(n, dtype=np.int32),
                    np.array([f"v{i}" for i in range(n)]))


def test_perfect_and_empty_predictions_score_as_they_must():
    data = _slice_set()
    perfect = score_method(data.lesions, data, reps=20)
    for kind in ("lytic", "blastic"):
        assert perfect[kind]["f1 IoU>=0.1"] == 1.0 and perfect[kind]["dice"] == 1.0
        assert perfect[kind]["pooled dice"] == 1.0
    assert perfect["mimics"]["flagged"] == 0 and perfect["mimics"]["instances"] == 2
    empty = score_method(np.zeros_like(data.lesions), data, reps=20)
    assert empty["lytic"]["f1 IoU>=0.1"] == 0.0 and empty["lytic"]["fn"] == 4
    assert empty["blastic"]["dice"] == 0.0


def test_wrong_type_is_a_false_positive_and_a_miss():
    data = _slice_set()
    swapped = np.where(data.lesions == 1, 2, np.where(data.lesions == 2, 1, 0)).astype(np.uint8)
    scores = score_method(swapped, data, reps=20)
    assert scores["lytic"]["tp"] == 0 and scores["lytic"]["fp"] == 3 and scores["lytic"]["fn"] == 4


def test_hu_threshold_baseline_finds_what_is_bright_and_dark_and_flags_bright_mimics():
    data = _slice_set()
    maps = threshold_maps(data.images, data.bodies, lytic_below=0.1, blastic_above=0.5)
    assert mean_f1(maps[[0, 2, 3, 4, 6]], data.lesions[[0, 2, 3, 4, 6]]) == 1.0
    assert score_method(maps, data, reps=20)["mimics"]["flagged"] == 2  # the bright mimics look blastic


def test_validation_split_is_whole_vertebrae_from_both_classes_and_seeded():
    data = _slice_set(40)
    val, test = split_validation(data, 0.25, seed=3)
    assert set(val).isdisjoint(test) and len(val) + len(test) == 40
    assert set(data.malignant[val]) == {0, 1}
    assert np.array_equal(val, split_validation(data, 0.25, seed=3)[0])


@pytest.fixture(scope="module")
def small_phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms") / "set"
    return write_phantom_set(out, 3, seed=11, levels=("L1", "L2"), spacing=1.2, size=(120.0, 140.0),
                             lesion_rate=0.7, mimic_rate=0.5)


def test_cli_writes_scores_table_and_figure(small_phantoms, toy_bundle, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--manifest", str(small_phantoms), "--out", str(out), "--model", str(toy_bundle),
                 "--bootstrap", "20"]) == 0
    assert "| hide-and-seek | lytic |" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics["methods"]) == {"hide-and-seek", "difference map", "occlusion", "HU threshold"}
    sha256 = json.loads((toy_bundle / "model.json").read_text(encoding="utf-8"))["weights"]["sha256"]
    assert metrics["model"]["weights_sha256"] == sha256  # names the weights even after the folder moves
    assert metrics["slices"]["validation"] + metrics["slices"]["test"] == 6
    assert "min_change" in metrics["methods"]["difference map"]["tuned"]
    assert (out / "examples.png").stat().st_size > 0 and (out / "table.md").is_file()
    ranking = metrics["delta ranking (test candidates)"]
    assert 0 <= ranking["on a true lesion"] <= ranking["candidates"]


def test_delta_ranking_is_the_auc_of_delta_for_candidates_on_true_lesions():
    from hideseek.attribution import BLASTIC, LYTIC, Candidate, SliceResult

    data = _slice_set(2)  # slice 0: a lytic lesion at 6:12 and a blastic one at 18:24
    empty = np.zeros((32, 32), bool)

    def cand(kind, rows, cols, delta):
        mask = empty.copy()
        mask[rows, cols] = True
        return Candidate(kind, mask, delta=delta)

    on_lytic = cand(LYTIC, slice(6, 12), slice(6, 12), 0.9)
    wrong_type = cand(BLASTIC, slice(6, 12), slice(6, 12), 0.8)  # on the lytic lesion, but called blastic
    on_blastic = cand(BLASTIC, slice(19, 23), slice(19, 23), 0.7)
    elsewhere = cand(LYTIC, slice(25, 27), slice(6, 12), 0.6)
    results = [SliceResult(data.images[i], data.images[i], data.images[i], 0.9, 0.0, empty, cands)
               for i, cands in enumerate([[on_lytic, wrong_type, on_blastic], [elsewhere]])]
    ranking = delta_ranking(results, data.lesions)
    # hits 0.9 and 0.7 against misses 0.8 and 0.6: three of the four (hit, miss) pairs ordered right
    assert ranking == {"candidates": 4, "on a true lesion": 2, "delta auc": 0.75}
    assert delta_ranking(results[1:], data.lesions[1:])["delta auc"] is None  # no hit: no AUC


def test_cli_refuses_a_manifest_without_truth(toy_bundle, tmp_path, small_phantoms, capsys):
    lines = small_phantoms.read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    keep = [i for i, name in enumerate(header) if name not in ("lesions", "mimics")]
    stripped = small_phantoms.parent / "no_truth.csv"
    stripped.write_text("\n".join(",".join(row.split(",")[i] for i in keep) for row in lines) + "\n", encoding="utf-8")
    assert main(["evaluate", "--manifest", str(stripped), "--out", str(tmp_path / "e"), "--model",
                 str(toy_bundle)]) == 2
    assert "no lesion truth" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_difference_map_baseline_searches_the_methods_region():
    """An edit that redraws the body outline: the method's margin keeps the baseline off it too."""
    from hideseek.attribution import SliceResult

    data = _slice_set(1)
    recon = np.full((32, 32), 0.3, np.float32)
    edit = recon + 0.05 * data.bodies[0]
    ring = data.bodies[0] & ~np.pad(np.ones((20, 20), bool), 6)
    edit[ring] += 0.25  # the outline, two pixels wide
    edit[6:12, 6:12] += 0.25  # the lytic lesion (the edit fills it in)
    result = SliceResult(data.images[0], recon, edit, 0.9, 0.0, np.zeros((32, 32), bool))
    plain = difference_maps([result], data.bodies, min_change=0.0, margin_px=0)
    assert (plain[0][ring] == 1).all()
    inner = difference_maps([result], data.bodies, min_change=0.0, margin_px=2)
    assert not inner[0][ring].any() and score_method(inner, data, reps=5)["lytic"]["f1 IoU>=0.1"] == 1.0
