"""Intensity contracts: the HU curve is piecewise linear through its knots, stretches the lytic range, and is kept."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hideseek.preprocessing import PHANTOM_CURVE, PHANTOM_WINDOW, Preprocessing

CURVE = Preprocessing(intensity="hu_curve", lower=-200.0, upper=1200.0, curve=((0.0, 0.1), (400.0, 0.7)))


def test_the_curve_passes_its_knots_is_linear_between_them_and_goes_on_beyond_its_ends():
    hu = np.array([-200.0, 0.0, 400.0, 1200.0, 200.0, -100.0, 800.0, -400.0, 1600.0], np.float32)
    got = CURVE.normalize(hu)
    np.testing.assert_allclose(got[:4], [0.0, 0.1, 0.7, 1.0], atol=1e-6)
    np.testing.assert_allclose(got[4:7], [0.4, 0.05, 0.85], atol=1e-6)  # halfway along each segment
    np.testing.assert_allclose(got[7:], [-0.1, 1.15], atol=1e-6)  # the end segments' slopes, unclipped
    clipped = Preprocessing(**(CURVE.to_dict() | {"clip": True})).normalize(hu)
    assert clipped.min() == 0.0 and clipped.max() == 1.0


def test_the_phantom_curve_doubles_the_lytic_contrast_and_keeps_the_blastic_one():
    lytic, cancellous, blastic = 40.0, 190.0, 650.0

    def contrast(prep, lesion):
        lesion_value, bone_value = prep.normalize(np.array([lesion, cancellous], np.float32))
        return abs(float(lesion_value - bone_value))

    assert contrast(PHANTOM_CURVE, lytic) > 2 * contrast(PHANTOM_WINDOW, lytic)
    assert contrast(PHANTOM_CURVE, blastic) >= contrast(PHANTOM_WINDOW, blastic)
    ramp = PHANTOM_CURVE.normalize(np.linspace(-1000, 3000, 500, dtype=np.float32))
    assert np.all(np.diff(ramp) > 0)  # order of densities is kept everywhere


@pytest.mark.parametrize(("fields", "needle"), [
    ({"intensity": "hu_curve"}, "needs knots"),
    ({"intensity": "hu_window", "curve": ((0.0, 0.5),)}, "only an hu_curve"),
    ({"intensity": "hu_curve", "curve": ((400.0, 0.2), (0.0, 0.5))}, "must rise"),
    ({"intensity": "hu_curve", "curve": ((0.0, 0.5), (400.0, 0.4))}, "must rise"),
    ({"intensity": "hu_curve", "curve": ((1500.0, 0.5),)}, "must rise"),
    ({"intensity": "hu_curve", "curve": ((0.0, 1.2),)}, "must rise"),
])
def test_a_curve_that_does_not_rise_through_the_window_is_refused(fields, needle):
    with pytest.raises(ValueError, match=needle):
        Preprocessing(**({"lower": -200.0, "upper": 1200.0} | fields))


def test_a_curve_survives_json_and_a_window_is_written_as_before_curves_existed():
    assert Preprocessing.from_dict(json.loads(json.dumps(PHANTOM_CURVE.to_dict()))) == PHANTOM_CURVE
    assert "curve" not in PHANTOM_WINDOW.to_dict()  # same model.json and slice-cache stamps as older releases
    assert Preprocessing.from_dict(PHANTOM_WINDOW.to_dict()) == PHANTOM_WINDOW
