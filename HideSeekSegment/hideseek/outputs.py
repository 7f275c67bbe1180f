"""Writing a run's results as the files of ``docs/output-contract.md``, all at once or not at all."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path

import SimpleITK as sitk

from .io import atomic_output_dir
from .overview import render_overview
from .pipeline import SegmentationResult
from .segfile import write_seg_nrrd

CSV_COLUMNS = [
    "record", "level", "label", "status", "slices", "body", "p_malignant", "p_healthy_edit", "n_lytic", "n_blastic",
    "lytic_volume_mm3", "blastic_volume_mm3", "id", "type", "delta", "voxels", "volume_mm3",
    "centroid_r", "centroid_a", "centroid_s", "centroid_i", "centroid_j", "centroid_k",
]


def csv_rows(report: dict) -> list[dict]:
    """One long table: a row per vertebra, then a row per lesion (column ``record`` tells which)."""
    rows = [{"record": "vertebra", **v} for v in report["vertebrae"]]
    for lesion in report["lesions"]:
        r, a, s = lesion["centroid_ras"]
        i, j, k = lesion["centroid_ijk"]
        rows.append({"record": "lesion", "level": lesion["vertebra"], "label": lesion["label"], "id": lesion["id"],
                     "type": lesion["type"], "delta": lesion["delta"], "voxels": lesion["voxels"],
                     "volume_mm3": lesion["volume_mm3"], "centroid_r": r, "centroid_a": a, "centroid_s": s,
                     "centroid_i": i, "centroid_j": j, "centroid_k": k})
    return rows


def write_outputs(
    result: SegmentationResult,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """lesions.nii.gz, lesions.seg.nrrd, report.json, report.csv and overview.png in ``out_dir``.

    ``extra(folder)`` may add files of its own; they land together with the rest, or not at all.
    """
    report = result.report()
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        sitk.WriteImage(result.lesions, str(tmp / "lesions.nii.gz"), useCompression=True)
        write_seg_nrrd(tmp / "lesions.seg.nrrd", result.lesions)
        (tmp / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        with open(tmp / "report.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(csv_rows(report))
        title = f"{report['model']['name']} · preset {report['preset']} · mode {report['mode']}"
        render_overview(result.overview_panels(), tmp / "overview.png", title=title)
        if extra is not None:
            extra(tmp)
    return Path(out_dir)
