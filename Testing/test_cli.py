"""`hideseek segment` from the command line: outputs, progress lines, and every bad input -> one clear line, exit 2,
nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hideseek.cli import main


@pytest.fixture(scope="module")
def ts(real_data_dir):
    d = real_data_dir / "totalsegmentator_example"
    return d / "example_ct_sm.nii.gz", d / "example_seg.nii.gz"


def _segment(ct, vertebrae, out, *extra, model):
    return main(["segment", "--ct", str(ct), "--vertebrae", str(vertebrae), "--out", str(out), "--model", str(model),
                 *extra])


def test_segment_writes_the_outputs_and_a_summary(ts, toy_bundle, tmp_path, capsys):
    assert _segment(*ts, tmp_path / "out", model=toy_bundle) == 0
    printed = capsys.readouterr()
    assert "L1" in printed.out and "lesions.seg.nrrd" in printed.out
    assert (tmp_path / "out" / "report.json").is_file()


def test_method_settings_from_the_command_line_reach_the_report(ts, toy_bundle, tmp_path):
    extra = ("--levels", "L1", "--quiet", "--delta-threshold", "0.7", "--body-margin", "3", "--min-change", "0.05",
             "--gate", "0.25", "--ddim-steps", "10")
    assert _segment(*ts, tmp_path / "out", *extra, model=toy_bundle) == 0
    settings = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))["settings"]
    assert (settings["delta_threshold"], settings["body_margin_px"], settings["min_change"]) == (0.7, 3, 0.05)
    assert settings["gate_probability"] == 0.25
    assert (settings["encode_steps"], settings["decode_steps"]) == (10, 10)


def test_no_bf16_overrides_the_presets_bf16_autocast_in_every_command_that_runs_the_model():
    from hideseek.cli import _setting_overrides, build_parser

    parser = build_parser()
    for command in (["segment", "--ct", "c", "--vertebrae", "v", "--out", "o"], ["demo"],
                    ["evaluate", "--manifest", "m", "--out", "o"], ["batch", "cohort.csv", "--out", "o"]):
        assert "autocast_bf16" not in _setting_overrides(parser.parse_args(command))  # the preset's (fast: bf16)
        assert _setting_overrides(parser.parse_args([*command, "--no-bf16"])) == {"autocast_bf16": False}


def test_json_progress_lines_for_scripts(ts, toy_bundle, tmp_path, capsys):
    assert _segment(*ts, tmp_path / "out", "--progress", "json", "--levels", "L1", model=toy_bundle) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1] == {"stage": "done", "out": str(tmp_path / "out")}
    assert {"stage", "vertebra", "vertebrae", "percent", "eta_s"} <= set(lines[0])


def test_quiet_prints_nothing(ts, toy_bundle, tmp_path, capsys):
    assert _segment(*ts, tmp_path / "out", "--quiet", model=toy_bundle) == 0
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == ""


def _write(path: Path, array: np.ndarray, like: sitk.Image | None = None, spacing=(1.0, 1.0, 1.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    if like is not None:
        image.CopyInformation(like)
    else:
        image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


def _bad_inputs(ts, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments replacing --ct/--vertebrae/--levels, text the error must contain)."""
    ct_path, seg_path = ts
    ct = sitk.ReadImage(str(ct_path))
    seg = sitk.ReadImage(str(seg_path))
    ct_arr = sitk.GetArrayFromImage(ct)
    mr = _write(tmp / "mr.nii.gz", (np.abs(ct_arr) % 700).astype(np.float32) / 7, like=ct)
    flat = _write(tmp / "flat.nii.gz", ct_arr[5].astype(np.int16), spacing=(1.0, 1.0))
    nan = ct_arr.astype(np.float32)
    nan[3, 4, 5] = np.nan
    nan_path = _write(tmp / "nan.nrrd", nan, like=ct)
    shifted = sitk.GetImageFromArray(sitk.GetArrayFromImage(seg))
    shifted.CopyInformation(seg)
    shifted.SetOrigin(tuple(o + 7.0 for o in seg.GetOrigin()))
    moved = tmp / "moved.nii.gz"
    sitk.WriteImage(shifted, str(moved))
    empty = _write(tmp / "empty.nii.gz", np.zeros_like(sitk.GetArrayFromImage(seg)), like=seg)
    odd = _write(tmp / "odd.nii.gz", (sitk.GetArrayFromImage(seg) > 0).astype(np.uint8) * 200, like=seg)
    truncated = tmp / "truncated.nii.gz"
    truncated.write_bytes(Path(ct_path).read_bytes()[:5000])
    return {
        "mr-like": (["--ct", str(mr)], "Hounsfield"),
        "2-D image": (["--ct", str(flat)], "3-D"),
        "NaN voxels": (["--ct", str(nan_path)], "NaN"),
        "other geometry": (["--vertebrae", str(moved)], "geometry"),
        "no labels": (["--vertebrae", str(empty)], "empty"),
        "unknown labels": (["--vertebrae", str(odd)], "no known vertebra"),
        "absent level": (["--levels", "C5"], "C5"),
        "cut by the border": (["--levels", "T12"], "border"),
        "truncated file": (["--ct", str(truncated)], "truncated"),
        "missing file": (["--ct", str(tmp / "nope.nii.gz")], "nope.nii.gz"),
        "impossible DDIM steps": (["--ddim-steps", "999"], "999 DDIM steps"),
        "Δ above 1": (["--delta-threshold", "1.5"], "delta_threshold must be in [0, 1]"),
        "gate of 1": (["--gate", "1"], "gate_probability must be in [0, 1)"),
        "lesion size 0": (["--min-lesion-voxels", "0"], "min_lesion_voxels must be at least 1"),
    }


BAD = ["mr-like", "2-D image", "NaN voxels", "other geometry", "no labels", "unknown labels", "absent level",
       "cut by the border", "truncated file", "missing file", "impossible DDIM steps", "Δ above 1",
       "gate of 1", "lesion size 0"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_clear_line_and_writes_nothing(case, ts, toy_bundle, tmp_path, capsys):
    args, needle = _bad_inputs(ts, tmp_path)[case]
    base = {"--ct": str(ts[0]), "--vertebrae": str(ts[1])}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = ["segment", *[x for kv in base.items() for x in kv], "--out", str(tmp_path / "out"),
            "--model", str(toy_bundle)]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if "error" in line]
    assert errors == [lines[-1]] and lines[-1].startswith("hideseek: error:")  # progress lines may come first
    assert needle.lower() in lines[-1].lower()
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_dicom_folder_with_two_series_asks_which(real_data_dir, ts, toy_bundle, tmp_path, capsys):
    pydicom = pytest.importorskip("pydicom")
    src = real_data_dir / "totalsegmentator_example" / "example_ct_dicom"
    both = tmp_path / "dicom"
    shutil.copytree(src, both / "a")
    for f in sorted((both / "a").iterdir())[:10]:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "1.2.3.4.5"
        (both / "b").mkdir(exist_ok=True)
        ds.save_as(both / "b" / f.name)
    assert main(["segment", "--ct", str(both), "--vertebrae", str(ts[1]), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--series" in err and "1.2.3.4.5" in err and not (tmp_path / "out").exists()


def test_existing_output_is_never_overwritten_without_asking(ts, toy_bundle, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious", encoding="utf-8")
    assert _segment(*ts, out, model=toy_bundle) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "mine.txt").read_text(encoding="utf-8") == "precious"
    assert _segment(*ts, out, "--overwrite", "--quiet", model=toy_bundle) == 0
    assert (out / "report.json").is_file() and not (out / "mine.txt").exists()


def test_train_progress_redraws_steps_and_tuning_and_adds_a_line_per_phase(capsys):
    from hideseek.cli import _print_training

    _print_training({"step": 25, "steps": 100, "loss": 0.01, "eta_s": 3700.0})
    _print_training({"export": "tuning the candidates of 3 shortlisted edits on 9 validation slices"})
    _print_training({"export": "tuning", "done": 1, "total": 270, "eta_s": None})  # no pace measured yet
    _print_training({"export": "tuning", "done": 2, "total": 270, "eta_s": 1490.0})
    err = capsys.readouterr().err
    assert err == ("\rstep 25/100  loss 0.0100  ETA 1:01h  "
                   "\nexport: tuning the candidates of 3 shortlisted edits on 9 validation slices\n"
                   "\r  candidate settings 1/270  \r  candidate settings 2/270  ETA 0:24h  ")


def test_every_command_prints_its_help_without_formatting_leftovers():
    from hideseek.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"demo", "segment", "batch", "phantom", "train", "evaluate", "import-published"} <= set(commands)
    for name, parser in commands.items():
        text = parser.format_help()
        assert "%%" not in text and "%(" not in text, name  # argparse formats help strings, not descriptions
