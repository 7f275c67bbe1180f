"""The latent classifier: L2 logistic regression on standardized semantic codes, and the edit along its normal.

Hide-and-Seek labels only whole vertebrae, so the classifier on the DAE's semantic code z is what defines
"malignant": its normal is the direction along which z is moved to render a healthy counterpart. A classifier
may carry another ``edit_direction`` (e.g. ``class_mean_direction``, the limit of its normal for C -> 0, which
cannot fit the training vertebrae's own codes): the edit then moves along that, still until the classifier says
the target probability. It may instead carry ``kind_directions``, one direction per lesion type (e.g. the
class means of vertebrae with lytic lesions only, and of those with blastic lesions only, each against healthy
ones): the method then makes one edit per type (``for_kind``) and takes each type's candidates from its own edit
(attribution.py). Everything
here computes in float64, because the edit places z exactly at a target probability (e.g. 1e-5), far out in
the sigmoid's tail where float32 rounding would miss it.

Fitting reproduces scikit-learn's objective (``LogisticRegression(penalty="l2", C=C)`` after ``StandardScaler``)
with an exact Newton solver, so scikit-learn is not needed at run time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.special import expit
from scipy.stats import rankdata

from .errors import InputError

LOGIT_CLIP = 50.0
"""Logits are clipped to ±50 before the sigmoid: beyond that the probability is 0 or 1 in float64 anyway."""

DEFAULT_CS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)

KINDS = ("lytic", "blastic")
"""Lesion types a classifier's ``kind_directions`` are named by (attribution.LESION_TYPES' names)."""


def _vector(name: str, value: object) -> np.ndarray:
    arr = np.array(value, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"classifier {name} must be a non-empty 1-D vector, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"classifier {name} contains NaN or infinite values")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class LatentClassifier:
    """``P(malignant | z) = sigmoid(((z - mean) / scale) · coef + intercept)``; all parameters float64."""

    coef: np.ndarray
    intercept: float
    mean: np.ndarray
    scale: np.ndarray
    edit_direction: np.ndarray | None = None  # raw-z move towards malignant; None = along the normal
    kind_directions: dict[str, np.ndarray] | None = None  # one raw-z move per lesion type in KINDS, or None

    def __post_init__(self) -> None:
        coef, mean, scale = (_vector(n, getattr(self, n)) for n in ("coef", "mean", "scale"))
        if not coef.shape == mean.shape == scale.shape:
            raise ValueError(
                f"classifier shapes disagree: coef {coef.shape}, mean {mean.shape}, scale {scale.shape}"
            )

        def checked(name: str, value: object) -> np.ndarray:
            direction = _vector(name, value)
            if direction.shape != coef.shape:
                raise ValueError(f"classifier {name} has shape {direction.shape}, coef {coef.shape}")
            if not float(coef / scale @ direction) > 0:  # self.slope, before the fields are set
                raise ValueError(f"classifier {name} does not raise P(malignant): it cannot edit towards healthy")
            return direction

        if self.edit_direction is not None:
            object.__setattr__(self, "edit_direction", checked("edit_direction", self.edit_direction))
        if self.kind_directions is not None:
            if self.edit_direction is not None:
                raise ValueError("a classifier edits along one edit_direction or along kind_directions, not both")
            if not isinstance(self.kind_directions, dict) or set(self.kind_directions) != set(KINDS):
                given = sorted(self.kind_directions) if isinstance(self.kind_directions, dict) else "not a mapping"
                raise ValueError(f"classifier kind_directions needs exactly the lesion types {list(KINDS)}, "
                                 f"got {given}")
            object.__setattr__(self, "kind_directions", {
                kind: checked(f"kind_directions[{kind!r}]", self.kind_directions[kind]) for kind in KINDS})
        if np.any(scale <= 0):
            raise ValueError(f"classifier scale must be positive; {int(np.sum(scale <= 0))} entries are not")
        intercept = float(self.intercept)
        if not math.isfinite(intercept):
            raise ValueError(f"classifier intercept must be finite, got {intercept}")
        object.__setattr__(self, "coef", coef)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "intercept", intercept)

    @property
    def dim(self) -> int:
        return int(self.coef.shape[0])

    @property
    def coef_norm(self) -> float:
        return float(np.linalg.norm(self.coef))

    @classmethod
    def from_dict(cls, data: dict) -> LatentClassifier:
        """Build from the JSON form; exactly the keys of ``to_dict`` are accepted (``edit_direction`` or
        ``kind_directions`` optional)."""
        expected, optional = {"coef", "intercept", "mean", "scale"}, {"edit_direction", "kind_directions"}
        if not isinstance(data, dict) or not expected <= set(data) <= expected | optional:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"classifier needs exactly the keys {sorted(expected)} (and optionally "
                             f"{' or '.join(map(repr, sorted(optional)))}), got {keys}")
        return cls(coef=data["coef"], intercept=data["intercept"], mean=data["mean"], scale=data["scale"],
                   edit_direction=data.get("edit_direction"), kind_directions=data.get("kind_directions"))

    def to_dict(self) -> dict:
        """JSON-able form; Python floats keep every bit, so a JSON round trip is exact."""
        out = {
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
        }
        if self.edit_direction is not None:
            out["edit_direction"] = self.edit_direction.tolist()
        if self.kind_directions is not None:
            out["kind_directions"] = {kind: d.tolist() for kind, d in self.kind_directions.items()}
        return out

    def for_kind(self, kind: str) -> LatentClassifier:
        """This classifier editing along its direction for lesion type ``kind`` (one of ``KINDS``)."""
        if self.kind_directions is None:
            raise ValueError("this classifier has no per-kind edit directions")
        return replace(self, edit_direction=self.kind_directions[kind], kind_directions=None)

    def _as64(self, z: torch.Tensor) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != self.dim:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"expected a tensor of latents with shape (B, {self.dim}), got {shape}")
        if not z.is_floating_point():
            raise ValueError(f"latents must be floating point, got {z.dtype}")
        return z.to(torch.float64)

    def _param(self, values: np.ndarray, device: torch.device) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64, device=device)

    def standardize(self, z: torch.Tensor) -> torch.Tensor:
        """(z - mean) / scale in float64 on z's device: the space in which the classifier is linear."""
        z64 = self._as64(z)
        return (z64 - self._param(self.mean, z.device)) / self._param(self.scale, z.device)

    def _logit_standardized(self, s: torch.Tensor) -> torch.Tensor:
        return s @ self._param(self.coef, s.device) + self.intercept

    def logit(self, z: torch.Tensor) -> torch.Tensor:
        """Log-odds of malignancy, shape (B,), float64."""
        return self._logit_standardized(self.standardize(z))

    def probability(self, z: torch.Tensor) -> torch.Tensor:
        """P(malignant), shape (B,), float64."""
        return torch.sigmoid(self.logit(z).clamp(-LOGIT_CLIP, LOGIT_CLIP))

    def signed_distance(self, z: torch.Tensor) -> torch.Tensor:
        """Signed Euclidean distance to the decision boundary in standardized space (positive = malignant)."""
        return self.logit(z) / self._checked_norm()

    def slope(self, direction: np.ndarray) -> float:
        """How fast the logit rises per unit move of raw z along ``direction`` (an edit direction needs > 0)."""
        return float(self.coef / self.scale @ np.asarray(direction, dtype=np.float64))

    def _checked_norm(self) -> float:
        norm = self.coef_norm
        if norm == 0.0:
            raise ValueError("the classifier's coefficients are all zero: it has no decision boundary to move across")
        return norm

    def edit(self, z: torch.Tensor, target_probability: float, step_scale: float = 1.0) -> torch.Tensor:
        """Move z along the boundary's unit normal (in standardized space), or against ``edit_direction`` when the
        classifier has one, until P(malignant) = target.

        ``step_scale`` multiplies the move (k > 1 over-shoots the boundary, as needed when the decoder
        responds weakly to z). The result has z's dtype and device, ready to be fed back to the network.
        """
        if not 0.0 < target_probability < 1.0:
            raise ValueError(f"target probability must lie strictly between 0 and 1, got {target_probability}")
        if not math.isfinite(step_scale):
            raise ValueError(f"step_scale must be finite, got {step_scale}")
        if self.kind_directions is not None:
            raise ValueError("this classifier edits per lesion type: edit with for_kind(kind)")
        norm = self._checked_norm()
        target_logit = math.log(target_probability) - math.log1p(-target_probability)
        if self.edit_direction is not None:
            direction = self._param(self.edit_direction, z.device)
            distance = (self.logit(z) - target_logit) / self.slope(self.edit_direction)
            return (self._as64(z) - step_scale * distance[:, None] * direction).to(z.dtype)
        s = self.standardize(z)
        unit_normal = self._param(self.coef, z.device) / norm
        distance = (target_logit - self._logit_standardized(s)) / norm
        s_edit = s + step_scale * distance[:, None] * unit_normal
        z_edit = s_edit * self._param(self.scale, z.device) + self._param(self.mean, z.device)
        return z_edit.to(z.dtype)


def class_mean_direction(z: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor | Sequence[int]) -> np.ndarray:
    """Mean code of the malignant class minus that of the healthy class: an ``edit_direction``.

    It is the limit of the L2 logistic normal as C -> 0 (in raw z), and on the demo model it edits lesions as
    strongly as the fitted normal while changing the rest of the body less (BENCHMARKS.md section 3)."""
    x = _latents(z)
    labels = _binary_labels(y, "y")
    if labels.size != x.shape[0] or np.bincount(labels, minlength=2).min() == 0:
        raise InputError("the class-mean direction needs one label per latent and both classes")
    return x[labels == 1].mean(axis=0) - x[labels == 0].mean(axis=0)


def roc_auc(y: Sequence[int] | np.ndarray, score: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney rank statistic (tied scores count one half)."""
    labels = _binary_labels(y, "y")
    s = np.asarray(score, dtype=np.float64).ravel()
    if s.shape != labels.shape:
        raise InputError(f"roc_auc: score has {s.size} values but y has {labels.size}; pass one score per label")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise InputError("roc_auc: y holds a single class; the AUC needs both positives and negatives")
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _binary_labels(y: object, name: str) -> np.ndarray:
    arr = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y).ravel()
    if arr.dtype == bool:
        return arr.astype(np.int64)
    try:
        values = np.asarray(arr, dtype=np.float64)
    except (TypeError, ValueError):
        values = np.array([np.nan])
    if not np.all((values == 0) | (values == 1)):
        raise InputError(f"{name} must hold binary labels 0/1 (1 = malignant); found {np.unique(arr)[:5]}")
    return values.astype(np.int64)


def _latents(z: object) -> np.ndarray:
    arr = np.asarray(z.detach().cpu() if isinstance(z, torch.Tensor) else z, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"z must be a non-empty (samples, dims) array of latents, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InputError("z contains NaN or infinite values; check the encoder outputs")
    return arr


def _standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std per column; a constant column gets scale 1 (as StandardScaler)."""
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    return mean, np.where(np.ptp(x, axis=0) == 0, 1.0, std)


def _sample_weights(labels: np.ndarray, class_weight: str | None) -> np.ndarray:
    if class_weight is None:
        return np.ones(labels.size)
    if class_weight != "balanced":
        raise InputError(f"class_weight must be None or 'balanced', got {class_weight!r}")
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    return (labels.size / (2.0 * counts))[labels]


def _objective(theta: np.ndarray, x: np.ndarray, labels: np.ndarray, sw: np.ndarray, C: float) -> float:
    eta = x @ theta[:-1] + theta[-1]
    loss = np.logaddexp(0.0, eta) - labels * eta
    return float(C * np.dot(sw, loss) + 0.5 * np.dot(theta[:-1], theta[:-1]))


def _newton_logistic(
    x: np.ndarray, labels: np.ndarray, sw: np.ndarray, C: float, max_iter: int = 100
) -> tuple[np.ndarray, float, int]:
    """Minimise C·Σ sw·logloss + ½‖w‖² (intercept unpenalised) by damped Newton steps; returns w, b, iterations.

    It stops when the Newton decrement (the predicted objective gain) falls below 1e-20 of the objective:
    beyond that float64 cannot measure progress, and the coefficients are exact to about 1e-10.
    """
    n, d = x.shape
    xa = np.hstack([x, np.ones((n, 1))])
    penalty = np.ones(d + 1)
    penalty[-1] = 0.0
    theta = np.zeros(d + 1)
    value = _objective(theta, x, labels, sw, C)
    for iteration in range(max_iter):
        p = expit(xa @ theta)
        grad = C * (xa.T @ (sw * (p - labels))) + penalty * theta
        hess = C * (xa.T * (sw * p * (1.0 - p))) @ xa + np.diag(penalty)
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        decrement = float(grad @ step)
        if decrement <= 1e-20 * max(1.0, abs(value)):
            return theta[:-1], float(theta[-1]), iteration
        # Backtracking (Newton's full step can overshoot on nearly separable data); the slack lets the last
        # steps through, whose gain is below the rounding noise of the objective.
        slack = 1e-12 * max(1.0, abs(value))
        t = 1.0
        while (new_value := _objective(theta - t * step, x, labels, sw, C)) > value - 1e-4 * t * decrement + slack:
            t *= 0.5
            if t < 1e-10:
                raise RuntimeError(f"logistic regression: the line search failed at Newton step {iteration} (C={C})")
        theta, value = theta - t * step, new_value
    raise RuntimeError(f"logistic regression did not converge in {max_iter} Newton steps (C={C})")


def _fit_fixed_c(
    x: np.ndarray, labels: np.ndarray, C: float, class_weight: str | None
) -> tuple[LatentClassifier, int]:
    mean, scale = _standardizer(x)
    coef, intercept, n_iter = _newton_logistic(
        (x - mean) / scale, labels, _sample_weights(labels, class_weight), C
    )
    return LatentClassifier(coef=coef, intercept=intercept, mean=mean, scale=scale), n_iter


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Held-out index sets: each class is shuffled (seeded) and dealt into ``folds`` near-equal parts."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(folds)]
    for cls in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == cls))
        for k, chunk in enumerate(np.array_split(members, folds)):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def _cv_auc(x: np.ndarray, labels: np.ndarray, C: float, class_weight: str | None, folds: int, seed: int) -> float:
    aucs = []
    for held_out in stratified_folds(labels, folds, seed):
        train = np.ones(labels.size, dtype=bool)
        train[held_out] = False
        clf, _ = _fit_fixed_c(x[train], labels[train], C, class_weight)
        score = clf.logit(torch.from_numpy(x[held_out])).numpy()
        aucs.append(roc_auc(labels[held_out], score))
    return float(np.mean(aucs))


def _check_c(value: float, name: str) -> float:
    try:
        c = float(value)
    except (TypeError, ValueError):
        c = math.nan
    if not (math.isfinite(c) and c > 0):
        raise InputError(f"{name} must be a positive, finite regularisation strength, got {value!r}")
    return c


def fit_latent_classifier(
    z: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor | Sequence[int],
    *,
    C: float | None = None,
    Cs: Sequence[float] = DEFAULT_CS,
    class_weight: str | None = None,
    folds: int = 5,
    seed: int = 0,
) -> tuple[LatentClassifier, dict]:
    """Standardize z and fit an L2 logistic regression (scikit-learn's objective) for y (1 = malignant).

    With ``C=None`` the regularisation is chosen by seeded stratified k-fold cross-validation: the C with the
    highest mean held-out ROC AUC, ties going to the smaller C (the stronger penalty, whose normal the notes
    found to edit images better). The returned dict is JSON-able and meant for the bundle's ``fit`` record.
    """
    x = _latents(z)
    labels = _binary_labels(y, "y")
    if labels.size != x.shape[0]:
        raise InputError(f"z has {x.shape[0]} rows but y has {labels.size} labels; pass one label per latent")
    counts = np.bincount(labels, minlength=2)
    if counts.min() == 0:
        raise InputError(f"y holds only class {int(labels[0])}; the classifier needs both healthy and malignant")
    cv: list[dict] = []
    if C is None:
        if not isinstance(folds, int) or folds < 2:
            raise InputError(f"folds must be an integer >= 2, got {folds!r}")
        if counts.min() < folds:
            raise InputError(
                f"{folds}-fold cross-validation needs at least {folds} samples of each class, got "
                f"{counts[0]} healthy and {counts[1]} malignant; lower folds or pass C"
            )
        grid = sorted({_check_c(c, "Cs entry") for c in Cs})
        if not grid:
            raise InputError("Cs is empty: give at least one candidate C, or pass C")
        cv = [{"C": c, "auc": _cv_auc(x, labels, c, class_weight, folds, seed)} for c in grid]
        best = max(entry["auc"] for entry in cv)
        chosen = next(entry["C"] for entry in cv if entry["auc"] >= best - 1e-12)
    else:
        chosen = _check_c(C, "C")
    clf, n_iter = _fit_fixed_c(x, labels, chosen, class_weight)
    info = {
        "C": chosen,
        "selection": "cross-validation" if C is None else "given",
        "cv_auc": cv,
        "folds": folds if C is None else None,
        "seed": seed,
        "class_weight": class_weight,
        "n_per_class": {"healthy": int(counts[0]), "malignant": int(counts[1])},
        "n_features": int(x.shape[1]),
        "train_auc": roc_auc(labels, clf.logit(torch.from_numpy(x)).numpy()),
        "newton_iterations": n_iter,
    }
    return clf, info
