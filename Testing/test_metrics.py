"""Scores used by the benchmark: matching, Dice, mimic flags, bootstrap, edit efficacy."""

from __future__ import annotations

import numpy as np
import pytest

from hideseek.metrics import (
    MatchCounts,
    bootstrap_ci,
    components,
    dice,
    edit_efficacy,
    flagged_mimics,
    json_measurements,
    match_lesions,
    pooled_dice,
    selection_key,
)


def _square(shape, r0, c0, size, value=1):
    m = np.zeros(shape, np.uint8)
    m[r0 : r0 + size, c0 : c0 + size] = value
    return m


def test_components_are_eight_connected_and_size_filtered():
    m = np.zeros((10, 10), bool)
    m[1, 1] = m[2, 2] = m[3, 3] = m[4, 4] = m[5, 5] = True  # a diagonal line: one 8-connected component
    m[8, 8] = True
    assert [c.sum() for c in components(m, 5)] == [5]
    assert len(components(m, 1)) == 2


def test_matching_is_one_to_one_by_iou_and_type_aware():
    truth = _square((20, 20), 2, 2, 4, 1) + _square((20, 20), 12, 12, 4, 2)
    pred = _square((20, 20), 3, 3, 4, 1)  # IoU 9/23 with the lytic lesion
    pred[12:16, 12:16] = 1  # right place, wrong type
    assert match_lesions(pred, truth, 1) == MatchCounts(tp=1, fp=1, fn=0)
    assert match_lesions(pred, truth, 2) == MatchCounts(tp=0, fp=0, fn=1)
    assert match_lesions(pred, truth, 1, iou=0.5) == MatchCounts(tp=0, fp=2, fn=1)
    assert match_lesions(pred, truth, 1, iou=0.0).tp == 1


def test_two_predictions_on_one_lesion_count_one_hit():
    truth = _square((20, 20), 2, 2, 8)
    pred = _square((20, 20), 2, 2, 3) + _square((20, 20), 7, 7, 3)
    counts = match_lesions(pred, truth, 1, iou=0.1)
    assert counts == MatchCounts(tp=1, fp=1, fn=0)
    assert counts.f1 == pytest.approx(2 / 3)


def test_f1_of_nothing_to_find_and_nothing_found_is_perfect():
    assert MatchCounts(0, 0, 0).f1 == 1.0
    assert (MatchCounts(1, 0, 1) + MatchCounts(1, 2, 0)) == MatchCounts(2, 2, 1)


def test_dice_variants():
    a = _square((10, 10), 0, 0, 4).astype(bool)
    b = _square((10, 10), 2, 0, 4).astype(bool)
    assert dice(a, b) == pytest.approx(0.5)
    assert np.isnan(dice(np.zeros((3, 3), bool), np.zeros((3, 3), bool)))
    assert pooled_dice([a, a], [b, a]) == pytest.approx((8 + 16) * 2 / 64)


def test_flagged_mimics_counts_instances():
    mimics = _square((10, 10), 0, 0, 3, 1) + _square((10, 10), 5, 5, 3, 2)
    pred = _square((10, 10), 6, 6, 1)
    assert flagged_mimics(pred, mimics) == (1, 2)


def test_bootstrap_interval_brackets_the_mean():
    values = np.linspace(0, 1, 50)
    lo, hi = bootstrap_ci(50, lambda idx: values[idx].mean(), reps=300)
    assert lo < values.mean() < hi and hi - lo < 0.3


def test_edit_efficacy_is_one_when_the_edit_removes_the_lesion_exactly():
    img = np.full((1, 10, 10), 0.5, np.float32)
    lesion = _square((10, 10), 3, 3, 3)[None]
    img[lesion > 0] = 0.9
    body = np.ones((1, 10, 10), bool)
    healed = np.full_like(img, 0.5)
    out = edit_efficacy(img, img, healed, lesion, body)
    assert out["efficacy"] == pytest.approx(1.0) and out["outside"] == 0.0
    same = edit_efficacy(img, img, img, lesion, body)
    assert same["efficacy"] == 0.0


def test_edit_efficacy_per_lesion_type_shows_a_type_the_edit_leaves():
    img = np.full((1, 12, 12), 0.5, np.float32)
    lesions = np.zeros((1, 12, 12), np.uint8)
    lesions[0, 1:4, 1:4], lesions[0, 7:10, 7:10] = 1, 2
    img[lesions == 1], img[lesions == 2] = 0.3, 0.9
    healed_blastic = np.where(lesions == 2, 0.5, img).astype(np.float32)
    body, kinds = np.ones_like(lesions, bool), {1: "lytic", 2: "blastic"}
    out = edit_efficacy(img, img, healed_blastic, lesions, body, kinds)
    assert out["efficacy lytic"] == 0.0 and out["efficacy blastic"] == pytest.approx(1.0)
    assert out["efficacy"] == pytest.approx(0.2 / 0.3)  # pooled: mean change 0.2, mean contrast 0.3
    assert "efficacy lytic" not in edit_efficacy(img, img, healed_blastic, np.where(lesions == 1, 0, lesions), body,
                                                 kinds)


def test_settings_are_chosen_by_f1_then_by_the_fewest_mimics_flagged():
    candidates = {"worse f1": (0.30, 0.0), "best, many mimics": (0.32, 0.5), "best, few mimics": (0.32001, 0.1),
                  "no mimic truth": (0.31, float("nan"))}
    ranked = sorted(candidates, key=lambda name: selection_key(*candidates[name]))
    assert ranked == ["best, few mimics", "best, many mimics", "no mimic truth", "worse f1"]
    assert selection_key(0.31, float("nan")) == (-0.31, 0.0)



def test_measurements_for_the_card_leave_out_what_is_undefined():
    """An edit that changes nothing inside lesions has no outside ratio: JSON (and the bundle) cannot hold NaN."""
    import json

    lesions = _square((8, 8), 2, 2, 3)[None]
    image, same = lesions.astype(float), np.zeros((1, 8, 8))
    row = edit_efficacy(image, same, same, lesions, np.ones((1, 8, 8), np.uint8))
    assert np.isnan(row["outside_ratio"])
    clean = json_measurements(row | {"slices": 1, "p": np.float32(0.1234567)})
    assert "outside_ratio" not in clean and clean["inside"] == 0.0 and clean["slices"] == 1 and clean["p"] == 0.12346
    json.dumps(clean, allow_nan=False)
