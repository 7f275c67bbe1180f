"""The benchmark scripts' own logic (they are run by hand; their numbers live in benchmarks/results)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from hideseek.dataset import SliceSet

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # as when a script is run: its folder comes first (studied_model.py)

import studied_model  # noqa: E402


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def probe():
    return _script("latent_probe")


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


def test_a_training_snapshot_is_probed_by_its_state_and_step_without_a_classifier(probe, monkeypatch, capsys, tmp_path):
    """The wiring of --snapshot: the state's network and preprocessing are used, the model column stays empty."""
    import torch

    rng = np.random.default_rng(1)
    n = 40
    lesions = np.zeros((n, 4, 4), np.uint8)
    lesions[20:30, 0, 0], lesions[30:, 0, 0] = 1, 2
    data = SliceSet(images=np.zeros((n, 4, 4), np.float32), bodies=np.ones((n, 4, 4), bool), lesions=lesions,
                    mimics=np.zeros((n, 4, 4), np.uint16), malignant=(np.arange(n) >= 20).astype(np.int8),
                    vertebra=np.arange(n, dtype=np.int32), names=np.array([f"v{i}" for i in range(n)]))
    z = rng.standard_normal((n, 3))
    z[:, 0] += 5.0 * (lesions == 2).any(axis=(1, 2))  # the code carries blastic lesions, not lytic ones
    asked = {}

    def fake_snapshot(state, step):
        asked["snapshot"] = (state, step)
        return "dae", "prep"

    def fake_slices(manifest, preprocessing, cache, mode):
        asked["preprocessing"] = preprocessing
        return data

    monkeypatch.setattr(studied_model, "load_snapshot", fake_snapshot)
    monkeypatch.setattr(probe, "cached_slice_set", fake_slices)
    monkeypatch.setattr(probe, "encode_latents", lambda dae, images: torch.from_numpy(z))
    out = tmp_path / "probe.json"
    monkeypatch.setattr("sys.argv", ["latent_probe.py", "--manifest", "m.csv", "--snapshot", "runs/state", "3000",
                                     "--json", str(out)])
    probe.main()
    assert asked == {"snapshot": ("runs/state", 3000), "preprocessing": "prep"}
    printed = capsys.readouterr().out
    assert printed.startswith("runs/state v3000: 40 slices, 20 healthy")
    result = json.loads(out.read_text())
    assert (result["model"], result["version"]) == ("runs/state", "3000")
    groups = result["groups"]
    assert groups["blastic only"]["probe auc"] > 0.9 and groups["blastic only"]["model classifier auc"] is None
    assert "| blastic only | 10 | – |" in printed


@pytest.mark.parametrize("step", ["3k", "-1"])
def test_a_snapshot_step_that_is_not_a_whole_number_is_refused_clearly(probe, monkeypatch, capsys, step):
    monkeypatch.setattr(studied_model, "load_snapshot", lambda state, step: pytest.fail("nothing is loaded"))
    monkeypatch.setattr("sys.argv", ["latent_probe.py", "--manifest", "m.csv", "--snapshot", "runs/state", step])
    with pytest.raises(SystemExit) as exit_info:
        probe.main()
    assert exit_info.value.code == 2
    assert f"the step is a whole number (e.g. 3000), not '{step}'" in capsys.readouterr().err


def test_a_snapshot_the_state_does_not_have_is_refused_without_a_traceback(probe, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("sys.argv", ["latent_probe.py", "--manifest", "m.csv", "--snapshot", str(tmp_path), "3000"])
    with pytest.raises(SystemExit) as exit_info:
        probe.main()
    assert exit_info.value.code == 2 and "no training state (state.json) there" in capsys.readouterr().err


def test_a_learning_point_is_measured_on_the_manifests_training_split(monkeypatch, capsys, tmp_path):
    """learning_point.py splits the manifest's slices by vertebra as training does and hands both halves on."""
    from hideseek.training import split_by_vertebra

    script = _script("learning_point")
    n = 60
    data = SliceSet(images=np.zeros((n, 4, 4), np.float32), bodies=np.ones((n, 4, 4), bool),
                    lesions=np.zeros((n, 4, 4), np.uint8), mimics=np.zeros((n, 4, 4), np.uint16),
                    malignant=(np.arange(n) // 3 % 2).astype(np.int8), vertebra=np.arange(n, dtype=np.int32) // 3,
                    names=np.array([f"v{i}" for i in range(n // 3)]))
    seen = {}

    def fake_point(dae, diffusion, train, val, *, C, seed):
        seen.update(dae=dae, train=train, val=val, C=C, seed=seed)
        return {"val_auc": 0.75, "C": C, "efficacy": 0.5, "efficacy blastic": 0.6, "outside_ratio": 0.4}

    monkeypatch.setattr(studied_model, "load_snapshot", lambda state, step: ("dae", "prep"))
    monkeypatch.setattr(script, "cached_slice_set", lambda manifest, prep, cache: data)
    monkeypatch.setattr(script, "learning_point", fake_point)
    out = tmp_path / "point.json"
    monkeypatch.setattr("sys.argv", ["learning_point.py", "--manifest", "m.csv", "--snapshot", "runs/state", "7000",
                                     "--seed", "3", "--json", str(out)])
    script.main()
    held = split_by_vertebra(data.vertebra, data.malignant, 0.1, 3)
    assert seen["dae"] == "dae" and (seen["C"], seen["seed"]) == (0.01, 3)
    assert np.array_equal(seen["val"].vertebra, data.vertebra[held])
    assert np.array_equal(seen["train"].vertebra, data.vertebra[~held])
    assert not set(seen["val"].vertebra) & set(seen["train"].vertebra)
    point = json.loads(out.read_text())
    assert point["version"] == "7000" and point["val_set"] == data.subset(held).vertebra_fingerprint()
    assert point["fit_manifest"] == "m.csv"
    assert "| 0.750 | 0.500 | – | 0.600 | 0.400 | – |" in capsys.readouterr().out

    # --fit-manifest: the classifier is fitted on another manifest's training split, validated on the same vertebrae
    other = data.subset(np.arange(n) < 30)
    monkeypatch.setattr(script, "cached_slice_set", lambda manifest, *_: {"f.csv": other}.get(manifest, data))
    monkeypatch.setattr("sys.argv", ["learning_point.py", "--manifest", "m.csv", "--snapshot", "runs/state", "7000",
                                     "--seed", "3", "--fit-manifest", "f.csv"])
    script.main()
    held_other = split_by_vertebra(other.vertebra, other.malignant, 0.1, 3)
    assert np.array_equal(seen["train"].vertebra, other.vertebra[~held_other])
    assert np.array_equal(seen["val"].vertebra, data.vertebra[held])
    assert "classifier fitted on f.csv" in capsys.readouterr().out


def test_a_fit_cache_without_its_manifest_is_refused(monkeypatch, capsys):
    script = _script("learning_point")
    monkeypatch.setattr(studied_model, "load_snapshot", lambda state, step: pytest.fail("nothing is loaded"))
    monkeypatch.setattr("sys.argv", ["learning_point.py", "--manifest", "m.csv", "--snapshot", "s", "1",
                                     "--fit-cache", "f.npz"])
    with pytest.raises(SystemExit) as exit_info:
        script.main()
    assert exit_info.value.code == 2 and "--fit-cache is the slice cache of --fit-manifest" in capsys.readouterr().err


def test_a_bundle_that_cannot_be_read_is_refused_without_a_traceback(monkeypatch, capsys, tmp_path):
    script = _script("learning_point")
    monkeypatch.setattr(script, "cached_slice_set", lambda *_: pytest.fail("no slices are read"))
    monkeypatch.setattr("sys.argv", ["learning_point.py", "--manifest", "m.csv", "--model", str(tmp_path / "none")])
    with pytest.raises(SystemExit) as exit_info:
        script.main()
    assert exit_info.value.code == 2 and str(tmp_path / "none") in capsys.readouterr().err


def test_a_cache_the_model_cannot_use_is_refused_without_a_traceback(monkeypatch, capsys):
    from hideseek.errors import InputError

    script = _script("learning_point")

    def refuse(*_):
        raise InputError("slices.npz was made with hu_window, this model uses hu_curve")

    monkeypatch.setattr(studied_model, "load_snapshot", lambda state, step: ("dae", "prep"))
    monkeypatch.setattr(script, "cached_slice_set", refuse)
    monkeypatch.setattr("sys.argv", ["learning_point.py", "--manifest", "m.csv", "--snapshot", "s", "1"])
    with pytest.raises(SystemExit) as exit_info:
        script.main()
    assert exit_info.value.code == 2 and "made with hu_window" in capsys.readouterr().err


def _manifest(folder: Path, cases: range) -> Path:
    folder.mkdir(parents=True)
    lines = ["case,ct,vertebrae,label,malignant"]
    lines += [f"case_{n:04d},case_{n:04d}_ct.nii.gz,case_{n:04d}_vertebrae.nii.gz,20,{n % 2}" for n in cases]
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "manifest.csv"


def test_mixed_manifests_keep_the_case_ranges_asked_for_with_distinct_names_and_working_paths(tmp_path):
    from hideseek.dataset import read_manifest

    mix = _script("mix_manifests")
    easy, standard = _manifest(tmp_path / "easy", range(4)), _manifest(tmp_path / "std", range(4))
    out = tmp_path / "mixes" / "mix.csv"
    mix.main([f"{easy}:0-1", f"{standard}:2-3", "--out", str(out)])
    rows = read_manifest(out)  # paths resolve from the new manifest's folder
    assert [r["case"] for r in rows] == ["easy-case_0000", "easy-case_0001", "std-case_0002", "std-case_0003"]
    assert [Path(r["ct"]) for r in rows] == [tmp_path / "easy" / "case_0000_ct.nii.gz",
                                            tmp_path / "easy" / "case_0001_ct.nii.gz",
                                            tmp_path / "std" / "case_0002_ct.nii.gz",
                                            tmp_path / "std" / "case_0003_ct.nii.gz"]
    assert not Path(out.read_text(encoding="utf-8").splitlines()[1].split(",")[1]).is_absolute()


@pytest.mark.parametrize("sources, message", [(["{m}:5-9"], "no row in that case range"),
                                              (["{m}:x-9"], "a case range is FIRST-LAST"),
                                              (["{m}", "{m}.missing"], "file not found")])
def test_a_mix_that_selects_nothing_or_cannot_be_read_is_refused(tmp_path, sources, message):
    mix = _script("mix_manifests")
    m = _manifest(tmp_path / "set", range(3))
    with pytest.raises(SystemExit, match=message):
        mix.main([s.format(m=m) for s in sources] + ["--out", str(tmp_path / "mix.csv")])
    assert not (tmp_path / "mix.csv").exists()


def test_an_existing_mixed_manifest_is_not_overwritten(tmp_path):
    mix = _script("mix_manifests")
    m, out = _manifest(tmp_path / "set", range(3)), tmp_path / "mix.csv"
    out.write_text("mine", encoding="utf-8")
    with pytest.raises(SystemExit, match="exists"):
        mix.main([str(m), "--out", str(out)])
    assert out.read_text(encoding="utf-8") == "mine"


def test_the_twin_direction_of_a_slice_comes_from_the_other_half_of_the_vertebrae():
    import torch

    oracle = _script("edit_oracle")
    z = torch.zeros(4, 2)
    z_twin = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 3.0]])
    direction = oracle.half_direction(z, z_twin, np.array([0, 1, 2, 3]))
    assert torch.equal(direction[0], torch.tensor([0.0, 2.0])) and torch.equal(direction[2], direction[0])
    assert torch.equal(direction[1], torch.tensor([2.0, 0.0]))


def test_the_twin_study_compares_edits_against_a_truth_that_removes_the_lesions(toy_bundle, monkeypatch, capsys,
                                                                                tmp_path):
    oracle = _script("edit_oracle")
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", ["edit_oracle.py", "--pairs", str(tmp_path / "pairs"), "--cases", "1",
                                     "--seed", "5", "--slices", "4", "--model", str(toy_bundle), "--out", str(out)])
    oracle.main()
    rows = json.loads((out / "oracle.json").read_text())["rows"]
    assert set(rows) == {*oracle.EDITS, "input"} and rows["input"]["slices"] == 4
    assert rows["truth"]["efficacy"] > 0.5 and rows["truth"]["outside_ratio"] < 0.3  # the twin lacks only lesions
    assert rows["classifier"]["cosine_to_normal"] == pytest.approx(1.0)
    assert -1 <= rows["twin code"]["cosine_to_normal"] <= 1
    assert (out / "examples.png").stat().st_size > 0 and "| twin code |" in capsys.readouterr().out

    # A model that edits per lesion type gets its two edits merged as the method merges them: along the normal
    # for both types, exactly the plain edit (and no single code to measure).
    import shutil

    per_kind = tmp_path / "per-kind"
    shutil.copytree(toy_bundle, per_kind)
    manifest = json.loads((per_kind / "model.json").read_text())
    normal = manifest["classifier"]["coef"]  # scale 1: the normal as a move of raw z
    manifest["classifier"]["kind_directions"] = {"lytic": normal, "blastic": normal}
    (per_kind / "model.json").write_text(json.dumps(manifest))
    monkeypatch.setattr("sys.argv", ["edit_oracle.py", "--pairs", str(tmp_path / "pairs"), "--cases", "1",
                                     "--seed", "5", "--slices", "4", "--model", str(per_kind), "--out",
                                     str(tmp_path / "out-per-kind")])
    oracle.main()
    merged = json.loads((tmp_path / "out-per-kind" / "oracle.json").read_text())["rows"]["classifier"]
    assert merged["efficacy"] == pytest.approx(rows["classifier"]["efficacy"], rel=1e-4)
    assert "cosine_to_normal" not in merged

    # pairs that no longer match (one set regenerated from another seed) are refused, not compared

    shutil.rmtree(tmp_path / "pairs" / "twins")
    (tmp_path / "pairs" / "slices-twins.npz").unlink()
    monkeypatch.setattr("sys.argv", ["edit_oracle.py", "--pairs", str(tmp_path / "pairs"), "--cases", "1",
                                     "--seed", "6", "--model", str(toy_bundle), "--out", str(out)])
    with pytest.raises(SystemExit, match="do not hold the same slices"):
        oracle.main()


def test_the_class_mean_direction_points_from_healthy_to_malignant_codes():
    directions = _script("edit_directions")
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1], 50)
    z = rng.standard_normal((100, 4))
    z[:, 1] += 2.0 * labels
    dirs, _ = directions.directions(z, labels, seed=0)
    assert set(dirs) == {*(f"C = {c:g}" for c in directions.CS), directions.CLASS_MEANS}
    for d in dirs.values():
        assert int(np.argmax(np.abs(d.numpy()))) == 1 and float(d[1]) > 0


def test_the_direction_study_edits_along_every_direction_at_every_step(toy_bundle, monkeypatch, capsys, tmp_path):
    from hideseek.bundle import load_bundle
    from hideseek.phantom import write_phantom_set

    study = _script("edit_directions")
    fitted_directions, toy = study.directions, load_bundle(toy_bundle).classifier

    def oriented(z, labels, seed):  # the toy classifier is random: turn each direction to its malignant side ...
        dirs, fitted = fitted_directions(z, labels, seed)
        dirs = {name: d if toy.slope(d.numpy()) > 0 else -d for name, d in dirs.items()}
        return dirs | {"C = 0.01": -dirs["C = 0.01"]}, fitted  # ... but one, which cannot reach the target

    monkeypatch.setattr(study, "directions", oriented)
    fit = write_phantom_set(tmp_path / "fit", 2, 11, levels=("L1", "L2", "L3"), lesion_rate=0.5)
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", ["edit_directions.py", "--pairs", str(tmp_path / "pairs"), "--cases", "1",
                                     "--slices", "3", "--fit-manifest", str(fit), "--model", str(toy_bundle),
                                     "--out", str(out)])
    study.main()
    record = json.loads((out / "directions.json").read_text())
    rows = record["rows"]
    assert record["skipped (the model's classifier does not rise along them)"] == ["C = 0.01"]
    expected = [(name, k) for name in [*(f"C = {c:g}" for c in study.CS[1:]), study.CLASS_MEANS]
                for k in study.SCALES]
    assert [(r["direction"], r["step_scale"]) for r in rows] == expected
    assert all(0 <= r["val_auc"] <= 1 and -1 <= r["cosine_to_twin"] <= 1 and r["move_norm"] > 0 for r in rows)
    twice = {r["direction"]: r["move_norm"] for r in rows if r["step_scale"] == 2}
    once = {r["direction"]: r["move_norm"] for r in rows if r["step_scale"] == 1}
    assert all(twice[d] == pytest.approx(2 * once[d], rel=1e-3) for d in once)  # the step scales the move
    assert (out / "directions.png").stat().st_size > 0 and "| class means |" in capsys.readouterr().out


def _grid_row(margin: float, lytic: tuple[float, float], blastic: tuple[float, float]) -> dict:
    """A per-type grid row with (validation, test) F1 per type; counts are not looked at."""
    return {"body_margin_px": margin, "min_change": 0.0, "candidate_quantile": 0.5, "delta_threshold": 0.5,
            "gate_probability": None,
            "lytic validation": [lytic[0], 0, 0, 0], "lytic test": [lytic[1], 0, 0, 0],
            "blastic validation": [blastic[0], 0, 0, 0], "blastic test": [blastic[1], 0, 0, 0]}


def test_per_type_settings_are_chosen_per_type_on_validation_and_the_ceiling_on_test():
    study = _script("per_type_settings")
    rows = [_grid_row(0, (0.2, 0.3), (0.8, 0.6)),  # the model's own
            _grid_row(2, (0.6, 0.1), (0.1, 0.2)),  # best lytic on validation
            _grid_row(3, (0.4, 0.5), (0.75, 0.9)),  # best mean on validation, and on test
            _grid_row(4, (0.1, 0.2), (0.9, 0.1))]  # best blastic on validation
    picked = study.choices(rows, {k: rows[0][k] for k in study.SETTINGS})
    margins = {rule: (p["lytic"]["settings"]["body_margin_px"], p["blastic"]["settings"]["body_margin_px"])
               for rule, p in picked.items()}
    assert margins == {"the model's own settings": (0, 0),
                       "one setting for both, best mean F1 on validation": (3, 3),
                       "a setting per type, best on validation": (2, 4),
                       "a setting per type, best on test (ceiling)": (3, 3)}
    assert picked["a setting per type, best on validation"]["mean test f1"] == pytest.approx(0.1)
    assert "the model's own settings" not in study.choices(rows, {**rows[0], "min_change": 0.5})


def test_the_per_type_study_scores_the_whole_export_grid_on_both_splits(toy_bundle, monkeypatch, capsys, tmp_path):
    from hideseek.calibration import CANDIDATE_GRID, DELTA_THRESHOLDS, GATE_PROBABILITIES
    from hideseek.phantom import write_phantom_set

    study = _script("per_type_settings")
    manifest = write_phantom_set(tmp_path / "set", 2, 7, levels=("L1", "L2", "L3"), lesion_rate=0.7)
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", ["per_type_settings.py", "--manifest", str(manifest), "--model",
                                     str(toy_bundle), "--val-fraction", "0.34", "--out", str(out)])
    study.main()
    report = json.loads((out / "per_type.json").read_text())
    grid = (out / "per_type_grid.jsonl").read_text().splitlines()
    assert len(grid) == np.prod([len(v) for v in CANDIDATE_GRID.values()]) * len(DELTA_THRESHOLDS) * len(
        GATE_PROBABILITIES)
    assert sum(report["slices"].values()) == 6 and min(report["slices"].values()) > 0
    picked = report["choices"]
    assert len(picked) == 4  # the toy model's own settings lie on the grid
    ceiling = picked["a setting per type, best on test (ceiling)"]
    for rule in picked.values():
        for name in ("lytic", "blastic"):
            assert rule[name]["test"]["f1"] <= ceiling[name]["test"]["f1"]
    assert "| a setting per type, best on validation |" in capsys.readouterr().out
    assert (out / "per_type.md").read_text().count("\n| ") == 2 + 4  # header, its rule, a row per rule


def test_the_per_type_study_refuses_a_missing_manifest_without_a_traceback(monkeypatch, tmp_path):
    study = _script("per_type_settings")
    monkeypatch.setattr("sys.argv", ["per_type_settings.py", "--manifest", str(tmp_path / "none.csv"),
                                     "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"per_type_settings: .*none\.csv"):
        study.main()
    assert not (tmp_path / "out").exists()
