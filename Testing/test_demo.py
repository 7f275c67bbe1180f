"""`hideseek demo`: the README's main job writes every output, the inputs to open in Slicer and the truth beside."""

from __future__ import annotations

import json

import SimpleITK as sitk

from hideseek.cli import main
from hideseek.demo import DEMO_LEVELS, demo_case


def test_demo_writes_outputs_inputs_and_the_comparison(toy_bundle, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--model", str(toy_bundle), "--progress", "none"]) == 0
    printed = capsys.readouterr().out
    for level in DEMO_LEVELS:
        assert level in printed
    names = {p.name for p in out.iterdir()}
    assert {"lesions.nii.gz", "lesions.seg.nrrd", "report.json", "report.csv", "overview.png", "demo.json",
            "input"} <= names
    demo = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    case = demo_case()
    truth = {r.level: (r.n_lytic, r.n_blastic) for r in case.records if r.in_levels}
    assert {row["level"]: (row["truth_lytic"], row["truth_blastic"]) for row in demo["vertebrae"]} == truth
    assert any(n == (0, 0) for n in truth.values()) and any(n[0] for n in truth.values()) \
        and any(n[1] for n in truth.values()), "the demo case shows healthy, lytic and blastic vertebrae"
    ct = sitk.ReadImage(str(out / "input" / "ct.nii.gz"))
    lesions = sitk.ReadImage(str(out / "lesions.nii.gz"))
    assert ct.GetSize() == lesions.GetSize() and ct.GetOrigin() == lesions.GetOrigin()


def test_demo_never_replaces_an_existing_folder(toy_bundle, tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "mine.txt").write_text("keep me", encoding="utf-8")
    assert main(["demo", "--out", str(out), "--model", str(toy_bundle), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_demo_runs_with_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--progress", "none"]) == 0
    assert "hideseek-phantom-demo" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [v["status"] for v in report["vertebrae"] if v["level"] in DEMO_LEVELS] == ["ok"] * len(DEMO_LEVELS)
