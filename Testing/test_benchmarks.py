"""The benchmark scripts' own logic (they are run by hand; their numbers live in benchmarks/results)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from hideseek.dataset import SliceSet

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("latent_probe", BENCHMARKS / "latent_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_probe_separates_what_z_carries_and_not_what_it_lacks(probe):
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    z = rng.standard_normal((80, 6))
    carried = z.copy()
    carried[:, 2] += 4.0 * labels  # one latent direction tells the classes apart
    assert probe.probe_auc(carried, labels, C=0.01, folds=5, seed=0) > 0.9
    assert abs(probe.probe_auc(z, labels, C=0.01, folds=5, seed=0) - 0.5) < 0.2  # noise: near chance


def test_slices_are_grouped_by_the_lesion_types_they_show(probe):
    lesions = np.zeros((5, 4, 4), np.uint8)
    lesions[1, 0, 0] = 1
    lesions[2, 0, 0] = 2
    lesions[3, 0, 0], lesions[3, 1, 1] = 1, 2
    data = SliceSet(images=np.zeros((5, 4, 4), np.float32), bodies=np.ones((5, 4, 4), bool), lesions=lesions,
                    mimics=np.zeros((5, 4, 4), np.uint16), malignant=np.array([0, 1, 1, 1, 1], np.int8),
                    vertebra=np.arange(5, dtype=np.int32), names=np.array([f"v{i}" for i in range(5)]))
    groups = {name: np.flatnonzero(g).tolist() for name, g in probe.slice_groups(data).items()}
    assert groups == {"lytic only": [1], "blastic only": [2], "lytic and blastic": [3],
                      "malignant, no lesion in the slice": [4]}
