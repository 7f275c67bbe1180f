"""The latent classifier: exact agreement with scikit-learn, the closed-form edit, CV choice of C, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hideseek.classifier import (
    KINDS,
    LatentClassifier,
    class_mean_direction,
    fit_latent_classifier,
    roc_auc,
    stratified_folds,
)
from hideseek.errors import InputError

sklearn = pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402


def _synthetic(n: int = 240, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Latents with unequal scales and offsets, one constant column, and imbalanced noisy labels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.2, 5.0, size=d) + rng.normal(scale=3.0, size=d)
    w = rng.normal(size=d) / x.std(0)
    y = ((x - x.mean(0)) @ w + rng.normal(scale=1.5, size=n) > 1.0).astype(int)
    x[:, -1] = 1.5
    return x, y


def _random_classifier(d: int = 8, seed: int = 1) -> LatentClassifier:
    rng = np.random.default_rng(seed)
    return LatentClassifier(
        coef=rng.normal(size=d), intercept=0.3, mean=rng.normal(size=d), scale=rng.uniform(0.5, 2.0, size=d)
    )


@pytest.mark.parametrize("C", [1e-3, 0.1, 10.0])
@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_fit_matches_sklearn(C, class_weight):
    x, y = _synthetic()
    clf, info = fit_latent_classifier(x, y, C=C, class_weight=class_weight)
    scaler = StandardScaler().fit(x)
    ref = LogisticRegression(C=C, class_weight=class_weight, tol=1e-12, max_iter=10_000).fit(scaler.transform(x), y)
    np.testing.assert_allclose(clf.mean, scaler.mean_, rtol=1e-12)
    np.testing.assert_allclose(clf.scale, scaler.scale_, rtol=1e-12)
    assert clf.scale[-1] == 1.0  # constant column
    np.testing.assert_allclose(clf.coef, ref.coef_[0], rtol=1e-4, atol=1e-4 * np.abs(ref.coef_).max())
    assert clf.intercept == pytest.approx(ref.intercept_[0], rel=1e-4, abs=1e-6)
    assert info["C"] == C and info["selection"] == "given" and info["cv_auc"] == []
    assert info["n_per_class"] == {"healthy": int((y == 0).sum()), "malignant": int((y == 1).sum())}
    assert info["train_auc"] == pytest.approx(roc_auc_score(y, ref.decision_function(scaler.transform(x))), abs=1e-9)
    json.dumps(info, allow_nan=False)


def test_fit_accepts_torch_tensors_and_bool_labels():
    x, y = _synthetic(n=80, d=4)
    a, _ = fit_latent_classifier(x, y, C=1.0)
    b, _ = fit_latent_classifier(torch.from_numpy(x).float(), torch.from_numpy(y.astype(bool)), C=1.0)
    np.testing.assert_allclose(a.coef, b.coef, rtol=1e-5)


def test_probability_and_logit_follow_the_formula():
    clf = _random_classifier()
    z = torch.randn(5, 8, dtype=torch.float32)
    s = (z.double().numpy() - clf.mean) / clf.scale
    expected = s @ clf.coef + clf.intercept
    logit = clf.logit(z)
    assert logit.dtype == torch.float64 and logit.shape == (5,)
    np.testing.assert_allclose(logit.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(clf.probability(z).numpy(), 1 / (1 + np.exp(-expected)), rtol=1e-12)
    np.testing.assert_allclose(clf.signed_distance(z).numpy(), expected / np.linalg.norm(clf.coef), rtol=1e-12)
    far = torch.full((1, 8), 1e6, dtype=torch.float64)
    p = clf.probability(torch.cat([far, -far]))
    assert torch.all((p >= 0) & (p <= 1)) and torch.isfinite(p).all()


@pytest.mark.parametrize("target", [1e-5, 0.5, 0.999])
def test_edit_reaches_the_target_along_the_normal(target):
    clf = _random_classifier()
    z = torch.randn(6, 8, dtype=torch.float64) * 3
    z_edit = clf.edit(z, target)
    np.testing.assert_allclose(clf.probability(z_edit).numpy(), target, rtol=1e-9)
    move = (clf.standardize(z_edit) - clf.standardize(z)).numpy()
    normal = clf.coef / np.linalg.norm(clf.coef)
    along = move @ normal
    np.testing.assert_allclose(move - along[:, None] * normal, 0.0, atol=1e-10)
    if target == 0.5:  # on the boundary: the move is the signed distance
        np.testing.assert_allclose(along, -clf.signed_distance(z).numpy(), rtol=1e-10)


def test_edit_step_scale_multiplies_the_move_and_keeps_dtype():
    clf = _random_classifier()
    z = torch.randn(4, 8, dtype=torch.float64)
    once = clf.standardize(clf.edit(z, 1e-3)) - clf.standardize(z)
    thrice = clf.standardize(clf.edit(z, 1e-3, step_scale=3.0)) - clf.standardize(z)
    np.testing.assert_allclose(thrice.numpy(), 3.0 * once.numpy(), rtol=1e-10, atol=1e-12)
    assert (clf.probability(clf.edit(z, 1e-3, step_scale=3.0)) < 1e-3).all()
    z32 = z.float()
    out = clf.edit(z32, 1e-3)
    assert out.dtype == torch.float32 and out.device == z32.device


def test_roc_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=200)
    score = np.round(rng.normal(size=200) + y, 1)  # many ties
    assert roc_auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert roc_auc([0, 1], [1.0, 1.0]) == 0.5
    assert roc_auc([1, 0, 1], [3, 1, 2]) == 1.0


def test_cv_auc_matches_sklearn_on_the_same_folds():
    x, y = _synthetic(n=150, d=6, seed=4)
    _, info = fit_latent_classifier(x, y, Cs=(0.01, 1.0), folds=4, seed=7)
    for entry in info["cv_auc"]:
        aucs = []
        for held in stratified_folds(y, 4, 7):
            train = np.setdiff1d(np.arange(y.size), held)
            scaler = StandardScaler().fit(x[train])
            model = LogisticRegression(C=entry["C"], tol=1e-12, max_iter=10_000)
            model.fit(scaler.transform(x[train]), y[train])
            aucs.append(roc_auc_score(y[held], model.decision_function(scaler.transform(x[held]))))
        assert entry["auc"] == pytest.approx(np.mean(aucs), abs=1e-6)


def test_stratified_folds_partition_and_balance():
    y = np.array([0] * 23 + [1] * 7)
    folds = stratified_folds(y, 5, 0)
    assert np.array_equal(np.sort(np.concatenate(folds)), np.arange(30))
    assert all(1 <= y[f].sum() <= 2 for f in folds)
    assert [f.tolist() for f in folds] == [f.tolist() for f in stratified_folds(y, 5, 0)]


def test_cv_prefers_weak_penalty_when_a_noise_feature_must_be_cancelled():
    """x1 = signal + nuisance, x2 = nuisance: only a weakly penalised fit learns to subtract x2."""
    rng = np.random.default_rng(5)
    n = 200
    y = rng.integers(0, 2, size=n)
    nuisance = rng.normal(scale=4.0, size=n)
    x = np.column_stack([y + nuisance + 0.1 * rng.normal(size=n), nuisance])
    _, info = fit_latent_classifier(x, y)
    auc = {e["C"]: e["auc"] for e in info["cv_auc"]}
    assert info["C"] >= 0.1 and info["selection"] == "cross-validation"
    assert auc[info["C"]] > auc[1e-4] + 0.2


def test_cv_ties_go_to_the_smaller_c():
    y = np.array([0] * 10 + [1] * 10)
    x = np.column_stack([y + np.linspace(0, 0.5, 20), np.zeros(20)])  # perfectly separable: AUC 1 for every C
    _, info = fit_latent_classifier(x, y, Cs=(10.0, 0.1, 1e-3), folds=5)
    assert [e["auc"] for e in info["cv_auc"]] == [1.0, 1.0, 1.0]
    assert info["C"] == 1e-3


def test_json_round_trip_is_exact():
    clf = _random_classifier()
    again = LatentClassifier.from_dict(json.loads(json.dumps(clf.to_dict())))
    for name in ("coef", "mean", "scale"):
        assert np.array_equal(getattr(again, name), getattr(clf, name))
    assert again.intercept == clf.intercept


def test_an_edit_direction_is_followed_until_the_classifier_says_the_target():
    from dataclasses import replace

    clf = _random_classifier()
    z = torch.tensor(np.random.default_rng(4).normal(size=(5, 8)), dtype=torch.float32)
    # Along the normal written as a raw-z direction, the edit is exactly the plain one.
    normal = replace(clf, edit_direction=clf.scale * clf.coef)
    assert torch.allclose(normal.edit(z, 1e-3, step_scale=2.0), clf.edit(z, 1e-3, step_scale=2.0), atol=1e-5)
    other = clf.scale * clf.coef + np.random.default_rng(5).normal(scale=0.3, size=8)
    along = replace(clf, edit_direction=other)
    z_edit = along.edit(z, 1e-3)
    assert torch.allclose(clf.probability(z_edit.double()), torch.full((5,), 1e-3, dtype=torch.float64), rtol=1e-3)
    move = (z_edit - z).double().numpy()
    assert np.allclose(move / np.linalg.norm(move, axis=1, keepdims=True), -other / np.linalg.norm(other), atol=1e-5)
    # The direction travels with the classifier's JSON form; one that cannot make z healthier is refused.
    again = LatentClassifier.from_dict(json.loads(json.dumps(along.to_dict())))
    assert np.array_equal(again.edit_direction, along.edit_direction)
    assert "edit_direction" not in clf.to_dict()
    assert along.slope(other) > 0 > clf.slope(-other)
    with pytest.raises(ValueError, match="does not raise"):
        replace(clf, edit_direction=-other)
    with pytest.raises(ValueError, match="edit_direction has shape"):
        replace(clf, edit_direction=other[:3])


def test_the_class_mean_direction_is_the_limit_of_a_strong_penalty():
    x, y = _synthetic()
    means = class_mean_direction(x, y)
    assert np.allclose(means, x[y == 1].mean(0) - x[y == 0].mean(0))
    clf, _ = fit_latent_classifier(x, y, C=1e-7, class_weight="balanced")
    raw_normal = clf.scale * clf.coef  # the normal of standardized space as a move of raw z
    cosine = raw_normal @ means / np.linalg.norm(raw_normal) / np.linalg.norm(means)
    assert cosine > 0.999
    with pytest.raises(InputError, match="both classes"):
        class_mean_direction(x, np.zeros(len(y), int))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"coef": [1.0, 2.0], "mean": [0.0], "scale": [1.0, 1.0]}, "shapes disagree"),
        ({"coef": [1.0, np.nan], "mean": [0.0, 0.0], "scale": [1.0, 1.0]}, "NaN"),
        ({"coef": [1.0, 2.0], "mean": [0.0, 0.0], "scale": [1.0, 0.0]}, "scale must be positive"),
        ({"coef": [[1.0, 2.0]], "mean": [0.0, 0.0], "scale": [1.0, 1.0]}, "1-D"),
    ],
)
def test_invalid_parameters_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LatentClassifier(intercept=0.0, **kwargs)


def test_invalid_use_is_rejected():
    clf = _random_classifier()
    with pytest.raises(ValueError, match="shape"):
        clf.logit(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="strictly between"):
        clf.edit(torch.zeros(1, 8), 1.0)
    with pytest.raises(ValueError, match="exactly the keys"):
        LatentClassifier.from_dict({"coef": [1.0], "intercept": 0.0, "mean": [0.0]})
    flat = LatentClassifier(coef=np.zeros(8), intercept=0.0, mean=np.zeros(8), scale=np.ones(8))
    with pytest.raises(ValueError, match="no decision boundary"):
        flat.edit(torch.zeros(1, 8), 0.1)
    with pytest.raises(ValueError):
        clf.coef[0] = 5.0  # parameters are read-only


@pytest.mark.parametrize(
    ("z", "y", "kwargs", "message"),
    [
        (np.zeros((4, 2)), [0, 0, 0, 0], {"C": 1.0}, "only class 0"),
        (np.zeros((4, 2)), [0, 1, 0], {"C": 1.0}, "one label per latent"),
        (np.zeros((4, 2)), [0, 1, 2, 0], {"C": 1.0}, "binary labels"),
        (np.zeros((4, 2)), ["a", "b", "a", "b"], {"C": 1.0}, "binary labels"),
        (np.zeros((4, 2)), [0, 1, 0, 1], {"C": "strong"}, "positive"),
        (np.full((4, 2), np.nan), [0, 1, 0, 1], {"C": 1.0}, "NaN"),
        (np.zeros(4), [0, 1, 0, 1], {"C": 1.0}, "samples, dims"),
        (np.zeros((4, 2)), [0, 1, 0, 1], {"C": -1.0}, "positive"),
        (np.zeros((4, 2)), [0, 1, 0, 1], {"C": 1.0, "class_weight": "auto"}, "class_weight"),
        (np.zeros((6, 2)), [0, 1, 0, 1, 0, 0], {}, "at least 5 samples of each class"),
        (np.zeros((20, 2)), [0, 1] * 10, {"Cs": ()}, "Cs is empty"),
    ],
)
def test_bad_fit_inputs_raise_input_error(z, y, kwargs, message):
    with pytest.raises(InputError, match=message):
        fit_latent_classifier(z, y, **kwargs)


def test_kind_directions_give_one_edit_per_lesion_type_and_travel_with_the_json_form():
    from dataclasses import replace

    clf = _random_classifier()
    z = torch.tensor(np.random.default_rng(4).normal(size=(5, 8)), dtype=torch.float32)
    rng = np.random.default_rng(6)
    kinds = {name: clf.scale * clf.coef + rng.normal(scale=0.3, size=8) for name in KINDS}
    per_kind = replace(clf, kind_directions=kinds)
    for name in KINDS:  # each type's edit is the plain edit along its direction
        along = replace(clf, edit_direction=kinds[name])
        assert torch.equal(per_kind.for_kind(name).edit(z, 1e-3), along.edit(z, 1e-3))
    with pytest.raises(ValueError, match="for_kind"):
        per_kind.edit(z, 1e-3)
    with pytest.raises(ValueError, match="no per-kind"):
        clf.for_kind("lytic")
    again = LatentClassifier.from_dict(json.loads(json.dumps(per_kind.to_dict())))
    assert all(np.array_equal(again.kind_directions[k], kinds[k]) for k in KINDS) and again.edit_direction is None
    assert "kind_directions" not in clf.to_dict()
    # Both types, each raising P(malignant), and not beside a single edit direction.
    with pytest.raises(ValueError, match="exactly the lesion types"):
        replace(clf, kind_directions={"lytic": kinds["lytic"]})
    with pytest.raises(ValueError, match=r"kind_directions\['blastic'\] does not raise"):
        replace(clf, kind_directions=kinds | {"blastic": -kinds["blastic"]})
    with pytest.raises(ValueError, match="not both"):
        replace(clf, kind_directions=kinds, edit_direction=kinds["lytic"])
