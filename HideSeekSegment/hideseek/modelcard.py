"""The human-readable model card of a trained bundle: MODEL_CARD.md and its learning-curve figure.

Everything in it comes from the bundle's ``model.json`` (written by the trainer), so it cannot disagree with
the model it describes. Slicer shows the same card fields (intended use, licence) before a model is used.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .calibration import NORMAL

CURVE_FILE = "learning_curve.png"
CARD_FILE = "MODEL_CARD.md"
PER_TYPE = ("lytic", "blastic")
"""Lesion types whose edit efficacy has its own column (``efficacy <type>`` in the metrics, see edit_efficacy)."""


def write_model_card(folder: Path, manifest: dict) -> None:
    card = manifest["card"]
    training = card.get("training", {})
    curve = card.get("metrics", {}).get("learning_curve", [])
    cfg = training.get("config", {})
    lines = [
        f"# Model card: {manifest['name']} (version {manifest['version']})",
        "",
        card.get("summary", ""),
        "",
        f"**Intended use.** {card.get('intended_use') or 'not stated'}",
        "",
        f"**Limitations.** {card.get('limitations') or 'not stated'}",
        "",
        *_measured(card.get("metrics", {}), training.get("steps", "?")),
        f"**Licence.** {card.get('licence') or 'not stated'}",
        "",
        "## Training",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| command | `{c}` |" for c in card.get("provenance", {}).get("commands")
          or [card.get("provenance", {}).get("command", "?")]],
        f"| data | {training.get('vertebrae', '?')} vertebrae, {training.get('slices_train', '?')} training and "
        f"{training.get('slices_val', '?')} validation slices, {training.get('malignant_fraction', '?')} malignant |",
        f"| network | {manifest['weights']['num_parameters']:,} parameters, "
        f"{manifest['architecture']['image_size']} px |",
        f"| steps | {training.get('steps', '?')} × batch {cfg.get('batch_size', '?')}, seed {cfg.get('seed', '?')}, "
        f"high-noise fraction {cfg.get('high_noise_fraction', '?')} |",
        f"| time | {training.get('elapsed_s', 0) / 3600:.2f} h on {training.get('device', '?')} |",
        f"| classifier | {manifest['classifier'].get('fit', {})} |",
        "",
    ]
    if curve:
        lines += [
            "## Learning curve (validation)",
            "",
            "*Edit efficacy* = mean |healthy edit − reconstruction| inside true lesions ÷ mean lesion contrast "
            "(target ≥ 0.7), also per lesion type (– where not measured); *outside ratio* = the change in the "
            "rest of the body ÷ the change in lesions (target ≤ 0.1); *P(edit)* = P(malignant) of the re-encoded "
            "edit (should fall towards 0).",
            "",
            f"![learning curve]({CURVE_FILE})",
            "",
            "| step | hours | val AUC | edit efficacy | lytic | blastic | outside ratio | P(edit) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        elsewhere = _measured_elsewhere(curve)
        first_slices = _first_slices_before(curve)
        lines += [
            f"| {p['step']}{' †' if i in elsewhere else ''}{' ‡' if i in first_slices else ''} | "
            f"{p['elapsed_s'] / 3600:.2f} | "
            f"{p.get('val_auc', float('nan')):.3f} | {p.get('efficacy', float('nan')):.3f} | {_per_type(p)} | "
            f"{p.get('outside_ratio', float('nan')):.2f} | {p.get('p_reencoded_edit', float('nan')):.3f} |"
            for i, p in enumerate(curve)
        ]
        if elsewhere:
            lines += ["", "† measured on other validation vertebrae than the last point (a run resumed on other "
                      "data): compare these points with each other, not with the rest."]
        if first_slices:
            lines += ["", "‡ edit measured on the first 32 validation slices with lesions, which come from a few "
                      "vertebrae (the lytic column often from one); later points draw them by lesion type and "
                      "vertebra: compare these points with each other, not with the rest."]
        _plot_curve(curve, folder / CURVE_FILE)
    calibration = card.get("metrics", {}).get("edit_calibration")
    if calibration:
        chosen = calibration["chosen"]
        lines += [
            "",
            "## Edit calibration (validation lesions)",
            "",
            f"Chosen: {_edit_name(chosen)}"
            f"{_shortlist_clause(calibration.get('shortlist'))} (see calibration.py).",
            "",
            "| C | direction | step × | efficacy | lytic | blastic | inside | outside | outside ratio | P(edit) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['C']:g} | {r.get('direction', NORMAL)} | {r['step_scale']:g} | {_value(r, 'efficacy', '.3f')} | "
            f"{_per_type(r)} | "
            f"{_value(r, 'inside', '.4f')} | {_value(r, 'outside', '.4f')} | {_value(r, 'outside_ratio', '.2f')} | "
            f"{_value(r, 'p_reencoded_edit', '.3f')} |"
            for r in calibration["table"]
        ]
    lines += _candidate_tuning(card.get("metrics", {}).get("candidate_tuning"))
    (folder / CARD_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _shortlist_clause(shortlist: list[dict] | None) -> str:
    """Cards from before the shortlist say only what was chosen."""
    if not shortlist:
        return ""
    tried = "; ".join(_edit_name(r, short=True) + (f" (F1 {r['f1']:.3f})" if "f1" in r else "")
                      for r in shortlist)
    how = ", by the best lesion F1 of candidate tuning" if all("f1" in r for r in shortlist) else ""
    counts = Counter(r.get("direction", NORMAL) for r in shortlist)
    per = "" if set(counts) == {NORMAL} else " along each direction (" + ", ".join(
        f"{n} along the {'classifier normal' if d == NORMAL else d}" for d, n in counts.items()) + ")"
    return (f", from the {len(shortlist)} settings whose change inside lesions exceeds the change outside by the "
            f"most{per} ({tried}){how}")


def _edit_name(edit: dict, short: bool = False) -> str:
    """'classifier C = 0.001, edit step × 1', naming the direction when it is not the classifier's normal (cards
    from before there was a choice have none)."""
    direction = edit.get("direction", NORMAL)
    if short:
        return f"C = {edit['C']:g}{'' if direction == NORMAL else f', {direction}'} × {edit['step_scale']:g}"
    along = "" if direction == NORMAL else f", edit along the difference of the {direction}"
    return f"classifier C = {edit['C']:g}{along}, edit step × {edit['step_scale']:g}"


def _value(row: dict, key: str, spec: str) -> str:
    """A measurement, or – where it was undefined (``json_measurements`` leaves those out)."""
    return format(row[key], spec) if key in row else "–"


def _measured_elsewhere(curve: list[dict]) -> set[int]:
    """Indices of the points whose validation set is known and differs from the last point's (points from before
    the set was recorded are left unmarked: unknown is not different)."""
    last = curve[-1].get("val_set")
    if last is None:
        return set()
    return {i for i, p in enumerate(curve) if p.get("val_set") not in (None, last)}


def _first_slices_before(curve: list[dict]) -> set[int]:
    """Indices of the points that measured the edit on the first validation slices with lesions (no
    ``edit_slices`` record), where the last point drew its slices by type and vertebra."""
    if "edit_slices" not in curve[-1]:
        return set()
    return {i for i, p in enumerate(curve) if "efficacy" in p and "edit_slices" not in p}


def _per_type(row: dict) -> str:
    """The lytic and blastic efficacy cells (points measured before they were recorded show –)."""
    return " | ".join(f"{row[f'efficacy {kind}']:.3f}" if f"efficacy {kind}" in row else "–" for kind in PER_TYPE)


def _candidate_tuning(tuning: dict | None) -> list[str]:
    if not tuning:
        return []
    if "skipped" in tuning:
        return ["", f"Candidate settings were not tuned ({tuning['skipped']}): the published defaults apply."]
    chosen = tuning["chosen"]
    mimics = all("mimic_fp" in r for r in tuning["best"])
    return [
        "",
        "## Candidate settings (validation lesions)",
        "",
        f"Chosen on the middle slice of {tuning['slices']} validation vertebrae (preset {tuning['preset']}): "
        f"candidates {chosen['body_margin_px']} px inside the body outline, |edit − recon| > "
        f"{chosen['min_change']:g}, above the {chosen['candidate_quantile']:g} quantile of their map, kept at "
        f"Δ > {chosen['delta_threshold']:g}{_gate_clause(chosen.get('gate_probability'))}. "
        f"Mean lesion F1 (IoU ≥ 0.1, lytic and blastic) {tuning['f1']:.2f}; "
        f"the published defaults (0 px, no floor, median, Δ > 0.5) scored {tuning['default_f1']:.2f} on the same "
        "slices." + (" Equal F1 goes to the fewest benign mimics flagged (mimic FP: share of mimic instances touched)."
                     if mimics else "") + " Best combinations:",
        "",
        "| body margin px | min change | quantile | Δ threshold | P gate | mean F1 |"
        + (" mimic FP |" if mimics else ""),
        "| --- | --- | --- | --- | --- | --- |" + (" --- |" if mimics else ""),
        *[f"| {r['body_margin_px']} | {r['min_change']:g} | {r['candidate_quantile']:g} | {r['delta_threshold']:g} | "
          f"{_gate_cell(r.get('gate_probability'))} | {r['f1']:.3f} |" + (f" {r['mimic_fp']:.2f} |" if mimics else "")
          for r in tuning["best"]],
    ]


def _gate_clause(gate: float | None) -> str:
    return "" if gate is None else f", in slices the classifier scores above P(malignant) {gate:g} only"


def _gate_cell(gate: float | None) -> str:
    """Cards from before the gate was tuned have no such key: no gate."""
    return "none" if gate is None else f"{gate:g}"


def _measured(metrics: dict, step: int | str) -> list[str]:
    """One line with where the model stands against the edit targets, read from its own metrics.

    The calibration ran on the exported weights (``step``); the AUC comes from the last learning-curve point,
    which a run stopped by its time budget before such runs got a point of their own may have passed.
    """
    curve, calibration = metrics.get("learning_curve", []), metrics.get("edit_calibration")
    if not curve or not calibration:
        return []
    chosen = calibration["chosen"]
    row = next(r for r in calibration["table"] if all(r.get(k, NORMAL) == chosen.get(k, NORMAL)
                                                      for k in ("C", "direction", "step_scale")))
    per_type = ", ".join(f"{kind} {row[f'efficacy {kind}']:.2f}" for kind in PER_TYPE
                         if f"efficacy {kind}" in row)
    return [
        f"**Measured (validation, step {step}).** With the calibrated edit ({_edit_name(chosen, short=True)}): "
        f"edit efficacy {_value(row, 'efficacy', '.2f')}"
        f"{f' ({per_type})' if per_type else ''} "
        f"(target ≥ 0.7), change outside lesions "
        f"{_value(row, 'outside_ratio', '.2f')} of the change inside (target ≤ 0.1), P(malignant) of the re-encoded "
        f"edit {_value(row, 'p_reencoded_edit', '.2f')}; latent classifier AUC "
        f"{_value(curve[-1], 'val_auc', '.2f')} (step {curve[-1]['step']}).",
        "",
    ]


def _plot_curve(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = [p["elapsed_s"] / 3600 for p in curve]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(hours, [p.get("efficacy", float("nan")) for p in curve], "o-", label="edit efficacy")
    for kind, marker in zip(PER_TYPE, "v^", strict=True):
        if any(f"efficacy {kind}" in p for p in curve):
            ax1.plot(hours, [p.get(f"efficacy {kind}", float("nan")) for p in curve], marker + ":",
                     label=f"edit efficacy, {kind}")
    ax1.plot(hours, [p.get("p_reencoded_edit", float("nan")) for p in curve], "s-", label="P(malignant) of edit")
    ax1.axhline(0.7, color="grey", ls="--", lw=0.8, label="efficacy target")
    ax1.set_xlabel("training hours")
    ax1.legend(fontsize=8)
    ax2.plot(hours, [p.get("val_auc", float("nan")) for p in curve], "o-", color="tab:green")
    ax2.set_xlabel("training hours")
    ax2.set_ylabel("validation AUC of the latent classifier")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
