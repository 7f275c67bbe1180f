"""The at-a-glance figure of a run: per vertebra, the slice with lesion outlines, its healthy edit and the change.

A reader checks three things here: do the outlines sit on what looks like a lesion, does the healthy edit look
like a plausible healthy vertebra, and is the change concentrated in the outlined regions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .attribution import BLASTIC, LYTIC, SliceResult
from .segfile import LESION_SEGMENTS

COLOURS = {spec.label: tuple(c / 255 for c in spec.rgb) for spec in LESION_SEGMENTS}


@dataclass
class OverviewPanel:
    """One vertebra's row in the figure: its most informative slice and what the method made of it."""

    level: str
    image: np.ndarray  # normalised model input (N, N)
    result: SliceResult


def most_informative(results: list[SliceResult]) -> int:
    """Index of the slice with the largest lesion area (the middle slice when there is none)."""
    areas = [int((r.label_map() > 0).sum()) for r in results]
    return int(np.argmax(areas)) if max(areas, default=0) > 0 else len(results) // 2


def render_overview(panels: list[OverviewPanel], path: Path, title: str = "") -> Path:
    """Write a PNG: one row per vertebra with input + outlines, healthy edit, and signed change."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, len(panels))
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.6 * rows), squeeze=False)
    for ax_row, panel in zip(axes, panels, strict=False):
        _draw_row(ax_row, panel)
    if not panels:
        axes[0, 1].text(0.5, 0.5, "no vertebra processed", ha="center", va="center")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_row(ax_row, panel: OverviewPanel) -> None:
    res = panel.result
    lo, hi = np.percentile(panel.image, [1, 99.5])
    ax_in, ax_edit, ax_diff = ax_row
    ax_in.imshow(panel.image, cmap="gray", vmin=lo, vmax=hi)
    for kind in (LYTIC, BLASTIC):
        mask = res.label_map() == kind
        if mask.any():
            ax_in.contour(mask, levels=[0.5], colors=[COLOURS[kind]], linewidths=1.2)
    for lesion in res.lesions:
        r, c = lesion.centroid
        ax_in.text(c, r, f"{lesion.delta:.2f}", color=COLOURS[lesion.kind], fontsize=7, ha="center", va="center",
                   bbox={"facecolor": "black", "alpha": 0.4, "pad": 0.5, "edgecolor": "none"})
    n_lytic = sum(lesion.kind == LYTIC for lesion in res.lesions)
    n_blastic = len(res.lesions) - n_lytic
    ax_in.set_title(f"{panel.level}  P={res.p_malignant:.2f}  lytic {n_lytic} / blastic {n_blastic}", fontsize=8)
    ax_edit.imshow(res.edit, cmap="gray", vmin=lo, vmax=hi)
    ax_edit.set_title(f"healthy edit (P={res.p_healthy:.1e})", fontsize=8)
    diff = res.edit - res.recon
    bound = max(float(np.abs(diff).max()), 1e-6)
    ax_diff.imshow(diff, cmap="coolwarm", vmin=-bound, vmax=bound)
    ax_diff.set_title("edit − reconstruction", fontsize=8)
