"""`hideseek demo`: the whole job on a built-in synthetic CT, with the truth beside what was found.

The case (phantom seed ``DEMO_SEED``, T12–L3) has one healthy vertebra, lytic, blastic and mixed metastases,
and benign mimics (a haemangioma, a Schmorl node), so a first run shows every kind of finding and of trap.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import SimpleITK as sitk

from .io import check_output_dir
from .outputs import write_outputs
from .phantom import PhantomCase, generate_case
from .pipeline import PipelineProgress, SegmentationResult, segment_ct

DEMO_SEED = 35
DEMO_LEVELS = ("T12", "L1", "L2", "L3")
INPUT_FILES = {"ct": "ct.nii.gz", "vertebrae": "vertebrae.nii.gz", "lesions": "lesions_truth.nii.gz"}


def demo_case() -> PhantomCase:
    return generate_case(DEMO_SEED, levels=DEMO_LEVELS, orientation="RAS", lesion_rate=0.6, mimic_rate=0.5,
                         size=(140.0, 150.0))  # fmt: skip


def run_demo(
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    model: str | os.PathLike | None = None,
    preset: str | None = None,
    overrides: dict | None = None,
    device: str = "auto",
    progress: PipelineProgress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> tuple[SegmentationResult, dict]:
    """Generate the demo CT, segment it, write the usual outputs plus ``input/`` and ``demo.json`` to ``out_dir``.

    Returns the result and the per-vertebra comparison with the truth (also in ``demo.json``).
    """
    check_output_dir(out_dir, overwrite)  # fail before any work
    case = demo_case()
    with tempfile.TemporaryDirectory(prefix="hideseek-demo-") as tmp:
        inputs = {kind: Path(tmp) / name for kind, name in INPUT_FILES.items()}
        for kind, path in inputs.items():
            sitk.WriteImage(case.image(getattr(case, kind)), str(path), useCompression=True)
        result = segment_ct(inputs["ct"], inputs["vertebrae"], model=model, preset=preset, overrides=overrides,
                            device=device,
                            progress=progress, cancel=cancel)  # fmt: skip
        comparison = compare_with_truth(case, result.report())

        def add_inputs(folder: Path) -> None:
            (folder / "input").mkdir()
            for path in inputs.values():
                (folder / "input" / path.name).write_bytes(path.read_bytes())
            (folder / "demo.json").write_text(json.dumps(comparison, indent=1) + "\n", encoding="utf-8")

        write_outputs(result, out_dir, overwrite=overwrite, extra=add_inputs)
    return result, comparison


def compare_with_truth(case: PhantomCase, report: dict) -> dict:
    """Per vertebra: the phantom's true lesions and mimics next to what the model found."""
    found = {v["level"]: v for v in report["vertebrae"]}
    rows = []
    for rec in case.records:
        if not rec.in_levels:
            continue
        f = found.get(rec.level, {})
        rows.append({
            "level": rec.level, "truth_lytic": rec.n_lytic, "truth_blastic": rec.n_blastic,
            "mimics": rec.mimic_kinds, "status": f.get("status", "not processed"),
            "p_malignant": f.get("p_malignant"), "found_lytic": f.get("n_lytic", 0),
            "found_blastic": f.get("n_blastic", 0),
        })  # fmt: skip
    return {"phantom_seed": DEMO_SEED, "vertebrae": rows,
            "note": "the truth is for the whole 3-D vertebra; mode 'mid' searches its mid-sagittal slice only"}
