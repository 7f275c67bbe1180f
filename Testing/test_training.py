"""The training loop: the loss falls on a toy set, state resumes exactly where it stopped, budgets are honoured."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np
import pytest
import torch

from hideseek.sampler import DiffusionConfig
from hideseek.training import DEMO_ARCHITECTURE, RESUME_OVERRIDES, TrainConfig, Trainer

TOY_ARCH = {"image_size": 16, "model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
            "attention_resolutions": [8], "embed_channels": 32, "enc_out_channels": 16,
            "enc_channel_mult": [1, 2], "enc_num_res_block": 1, "dropout": 0.0, "norm_groups": 8}


def _toy_images(n=64, seed=0):
    """Blobs on a dark background: easy to denoise, so a few steps must lower the loss."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:16, :16]
    cy, cx = rng.uniform(4, 12, (2, n, 1, 1))
    return (np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)).astype(np.float32)


def _cfg(**kw):
    base = {"architecture": TOY_ARCH, "steps": 60, "batch_size": 8, "lr": 2e-3, "warmup_steps": 5,
            "log_every": 10, "checkpoint_every": 20, "bf16": False}
    return TrainConfig(**(base | kw))


def test_loss_falls_on_toy_images():
    trainer = Trainer(_cfg(), DiffusionConfig(), torch.device("cpu"))
    logs = []
    trainer.run(_toy_images(), progress=logs.append)
    assert [r["step"] for r in logs] == [10, 20, 30, 40, 50, 60]
    assert logs[-1]["loss"] < 0.6 * logs[0]["loss"]
    assert logs[-1]["eta_s"] == 0


def test_x0_weighting_up_weights_high_noise_levels_only_up_to_its_clip():
    plain = Trainer(_cfg(), DiffusionConfig(), torch.device("cpu"))
    weighted = Trainer(_cfg(x0_weight_max=10.0), DiffusionConfig(), torch.device("cpu"))
    t = torch.tensor([0, 300, 500, 999])  # 1/SNR: 1e-4, 1.5, 11.9, ~2e4
    assert torch.equal(plain._weights(t), torch.ones(4))
    w = weighted._weights(t)
    assert w[0] == 1.0 and 1.0 < w[1] < 10.0 and w[2] == w[3] == 10.0


def test_a_resume_may_change_the_curriculum_and_says_so(tmp_path):
    Trainer(_cfg(steps=20), DiffusionConfig(), torch.device("cpu")).run(_toy_images(), state_dir=tmp_path)
    resumed = Trainer.resume(tmp_path, torch.device("cpu"), steps=40, x0_weight_max=10.0)
    assert resumed.cfg.x0_weight_max == 10.0
    assert resumed.history[-1] == {"step": 20, "resume": "x0_weight_max -> 10.0"}
    # A new command may switch bf16 too: train_bundle passes the command's RESUME_OVERRIDES to the resume.
    command = _cfg(steps=40, bf16=True)
    with_bf16 = Trainer.resume(tmp_path, torch.device("cpu"),
                               **{name: getattr(command, name) for name in RESUME_OVERRIDES})
    assert with_bf16.cfg.bf16 is True and with_bf16.history[-1] == {"step": 20, "resume": "bf16 -> True"}


def test_state_resumes_where_it_stopped(tmp_path):
    trainer = Trainer(_cfg(steps=20), DiffusionConfig(), torch.device("cpu"))
    trainer.run(_toy_images(), state_dir=tmp_path)
    meta = json.loads((tmp_path / "state.json").read_text(encoding="utf-8"))
    assert meta["step"] == 20 and len(meta["history"]) == 2

    resumed = Trainer.resume(tmp_path, torch.device("cpu"), steps=40)
    for a, b in zip(trainer.ema.parameters(), resumed.ema.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(trainer.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert len(resumed.opt.state) == len(list(resumed.model.parameters()))
    resumed.run(_toy_images(), state_dir=tmp_path)
    assert resumed.step == 40
    assert json.loads((tmp_path / "state.json").read_text(encoding="utf-8"))["step"] == 40
    with pytest.raises(ValueError, match="architecture"):
        Trainer.resume(tmp_path, torch.device("cpu"), architecture={**TOY_ARCH, "model_channels": 8})


def test_time_budget_stops_early():
    trainer = Trainer(_cfg(steps=10_000), DiffusionConfig(), torch.device("cpu"))
    trainer.run(_toy_images(), time_budget_s=0.5)
    assert 0 < trainer.step < 10_000


def test_time_budget_holds_across_checkpoints_and_bounds_the_eta(tmp_path):
    """Checkpoints bank the elapsed time; the budget and the ETA must still count from the start of the run."""
    trainer = Trainer(_cfg(steps=10_000, checkpoint_every=2, log_every=2), DiffusionConfig(), torch.device("cpu"))
    logs = []
    started = time.monotonic()
    trainer.run(_toy_images(), state_dir=tmp_path, time_budget_s=1.5, progress=logs.append)
    assert time.monotonic() - started < 15 and 0 < trainer.step < 10_000
    assert all(r["eta_s"] <= 1.5 for r in logs)
    assert trainer.elapsed_s >= 1.5


def test_the_learning_rate_warms_up_holds_then_decays_to_its_final_value_from_the_given_step(tmp_path):
    def lrs(trainer, steps):
        out = []
        for step in steps:
            trainer.step = step
            out.append(trainer._lr())
        return out

    constant = Trainer(_cfg(steps=100, lr=1e-3, warmup_steps=10), DiffusionConfig(), torch.device("cpu"))
    assert lrs(constant, [0, 9, 50, 99]) == pytest.approx([1e-4, 1e-3, 1e-3, 1e-3])
    decaying = Trainer(_cfg(steps=100, lr=1e-3, warmup_steps=10, lr_decay_from=60, lr_final=1e-5),
                       DiffusionConfig(), torch.device("cpu"))
    values = lrs(decaying, range(60, 101))
    assert lrs(decaying, [30, 59]) == pytest.approx([1e-3, 1e-3]) and values[0] == pytest.approx(1e-3)
    assert values[20] == pytest.approx((1e-3 + 1e-5) / 2) and values[-1] == pytest.approx(1e-5)
    assert all(np.diff(values) < 0)
    # A resumed run may switch the decay on (a curriculum): the state keeps the rest of its config.
    decaying.step = 0
    decaying.save_state(tmp_path)
    resumed = Trainer.resume(tmp_path, torch.device("cpu"), steps=200, lr_decay_from=100, lr_final=1e-6)
    assert (resumed.cfg.lr_decay_from, resumed.cfg.lr_final, resumed.cfg.lr) == (100, 1e-6, 1e-3)


def test_high_noise_fraction_shifts_the_timesteps():
    trainer = Trainer(_cfg(high_noise_fraction=1.0, high_noise_from=0.7), DiffusionConfig(), torch.device("cpu"))
    assert trainer._timesteps(2000).min() >= 700
    uniform = Trainer(_cfg(high_noise_fraction=0.0), DiffusionConfig(), torch.device("cpu"))
    assert uniform._timesteps(2000).float().mean() == pytest.approx(500, abs=40)


def test_wrong_slice_size_is_rejected():
    trainer = Trainer(_cfg(), DiffusionConfig(), torch.device("cpu"))
    with pytest.raises(ValueError, match="expects 16 px"):
        trainer.run(np.zeros((4, 32, 32), np.float32))


def test_demo_architecture_is_compact():
    from hideseek.network import DiffusionAutoencoder

    with torch.device("meta"):
        n = DiffusionAutoencoder(DEMO_ARCHITECTURE).num_parameters()
    assert 3e6 < n < 8e6  # bundle weights stay well under the 50 MB limit


def _toy_slice_set(n_vertebrae=8, per=4, lytic=False):
    """Every other vertebra malignant, with a bright "lesion"; with ``lytic`` every other malignant one has a dark
    lesion instead."""
    from hideseek.dataset import SliceSet

    images = _toy_images(n_vertebrae * per)
    index = np.repeat(np.arange(n_vertebrae), per)
    malignant = (index % 2).astype(np.int8)
    dark = (index % 4 == 3) if lytic else np.zeros(len(index), bool)
    images[(malignant == 1) & ~dark, 6:9, 6:9] += 0.8
    images[dark, 6:9, 6:9] -= 0.4
    lesions = np.zeros(images.shape, np.uint8)
    lesions[malignant == 1, 6:9, 6:9] = 2
    lesions[dark, 6:9, 6:9] = 1
    mimics = np.zeros(images.shape, np.uint16)
    mimics[:, 10:13, 10:13] = 1  # a benign "mimic" in every vertebra
    return SliceSet(images=images, bodies=np.ones(images.shape, bool), lesions=lesions, mimics=mimics,
                    malignant=malignant,
                    vertebra=np.repeat(np.arange(n_vertebrae), per).astype(np.int32),
                    names=np.array([f"v{i}" for i in range(n_vertebrae)]))


def test_kind_directions_are_the_class_means_of_one_type_vertebrae_against_healthy_ones():
    from hideseek.training import kind_mean_directions

    data = _toy_slice_set(lytic=True)
    z = np.random.default_rng(0).normal(size=(len(data), 6))
    kinds = kind_mean_directions(z, data)
    healthy, v = data.malignant == 0, data.vertebra
    assert np.allclose(kinds["lytic"], z[v % 4 == 3].mean(0) - z[healthy].mean(0))
    assert np.allclose(kinds["blastic"], z[v % 4 == 1].mean(0) - z[healthy].mean(0))
    # A vertebra with both types belongs to neither; without vertebrae of one type only, there are no directions.
    both = _toy_slice_set(lytic=True)
    both.lesions[v == 1, 0, 0] = 1
    assert np.allclose(kind_mean_directions(z, both)["blastic"], z[v == 5].mean(0) - z[healthy].mean(0))
    assert kind_mean_directions(z, _toy_slice_set()) is None


def test_train_bundle_writes_a_loadable_bundle_with_a_learning_curve(tmp_path):
    from hideseek.bundle import load_bundle
    from hideseek.calibration import CANDIDATE_GRID
    from hideseek.modelcard import write_model_card
    from hideseek.preprocessing import Preprocessing
    from hideseek.training import EDIT_SLICES, train_bundle

    prep = Preprocessing(image_size=16, intensity="hu_window", lower=0, upper=1)
    records = []
    out = train_bundle(_toy_slice_set(lytic=True), tmp_path / "bundle", tmp_path / "state", _cfg(steps=40), prep,
                       device=torch.device("cpu"), classifier_C=0.01, eval_every=20, name="toy",
                       progress=records.append)
    bundle = load_bundle(out)
    # The minutes between the last step and the bundle are reported phase by phase, after the training records.
    phases = [r["export"] for r in records if "export" in r and "done" not in r]
    assert [p.split()[0] for p in phases] == ["encoding", "calibrating", "tuning"]
    assert "export" not in records[0] and "5 shortlisted edits" in phases[-1]
    # Within the tuning, every candidate setting of every shortlisted edit is counted, with an ETA from the second.
    tuned = records[records.index({"export": phases[-1]}) + 1:]
    settings = math.prod(len(values) for values in CANDIDATE_GRID.values())
    assert [(r["done"], r["total"]) for r in tuned] == [(i, 5 * settings) for i in range(1, 5 * settings + 1)]
    assert tuned[0]["eta_s"] is None and all(r["eta_s"] >= 0 for r in tuned[1:]) and tuned[-1]["eta_s"] == 0
    card = bundle.card
    assert card["training"]["steps"] == 40 and bundle.manifest["name"] == "toy"
    curve = card["metrics"]["learning_curve"]
    assert [p["step"] for p in curve] == [20, 40]
    assert {"val_auc", "efficacy", "efficacy blastic", "outside_ratio", "p_reencoded_edit"} <= set(curve[-1])
    assert "efficacy lytic" not in curve[-1]  # the one malignant validation vertebra has a blastic lesion
    assert bundle.preprocessing == prep
    calibration = card["metrics"]["edit_calibration"]
    assert len(calibration["table"]) == 24  # two classifier strengths x three directions x four edit steps
    assert {r["direction"] for r in calibration["table"]} == {"normal", "class means", "class means per kind"}
    chosen = calibration["chosen"]
    tuning = card["metrics"]["candidate_tuning"]
    assert bundle.method["presets"]["fast"] == {"edit_step_scale": chosen["step_scale"], **tuning["chosen"]}
    assert tuning["slices"] == 2  # the middle slice of each validation vertebra (one per class)
    assert tuning["f1"] == tuning["best"][0]["f1"] >= tuning["default_f1"]
    assert all(0 <= r["mimic_fp"] <= 1 for r in tuning["best"])
    assert bundle.manifest["classifier"]["fit"]["C"] == chosen["C"]
    # Candidate tuning chose the edit among the calibration's shortlist by its best F1.
    tried = calibration["shortlist"]
    assert len(tried) == 5 and chosen | {"f1": tuning["f1"]} in tried
    assert [r["direction"] for r in tried].count("class means") == 1
    assert [r["direction"] for r in tried].count("class means per kind") == 1
    # The bundle's classifier edits along the chosen direction (or directions).
    assert (bundle.classifier.edit_direction is not None) == (chosen["direction"] == "class means")
    assert (bundle.classifier.kind_directions is not None) == (chosen["direction"] == "class means per kind")
    assert tuning["f1"] == max(r["f1"] for r in tried)
    # Resuming continues the same run and keeps its curve; a last step between checkpoints gets its point too.
    out2 = train_bundle(_toy_slice_set(lytic=True), tmp_path / "bundle", tmp_path / "state", _cfg(steps=50), prep,
                        device=torch.device("cpu"), classifier_C=0.01, eval_every=20, overwrite=True)
    assert [p["step"] for p in load_bundle(out2).card["metrics"]["learning_curve"]] == [20, 40, 50]
    card_md = (out2 / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "| 50 |" in card_md and (out2 / "learning_curve.png").stat().st_size > 0
    assert "| lytic | blastic |" in card_md and "| – |" in card_md
    assert "| P gate | mean F1 | mimic FP |" in card_md
    assert "by the best lesion F1 of candidate tuning" in card_md
    assert ("by the most along each direction (3 along the classifier normal, 1 along the class means, 1 along the "
            "class means per kind)") in card_md
    assert "gate_probability" in tuning["chosen"]
    assert "†" not in card_md  # every point was measured on the same validation vertebrae
    assert "‡" not in card_md and {p["edit_slices"] for p in curve} == {EDIT_SLICES}
    # Points from before the edit slices were drawn by type and vertebra are marked as such.
    manifest = json.loads((out2 / "model.json").read_text(encoding="utf-8"))
    for point in manifest["card"]["metrics"]["learning_curve"][:2]:
        del point["edit_slices"]
    # ... and the chosen edit is named with its direction; cards from before there was a choice have none.
    calibration = manifest["card"]["metrics"]["edit_calibration"]
    calibration["chosen"] |= {"C": 0.01, "direction": "class means", "step_scale": 3}
    write_model_card(tmp_path, manifest)
    old_card = (tmp_path / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "| 20 ‡ |" in old_card and "| 40 ‡ |" in old_card and "| 50 |" in old_card
    assert "‡ edit measured on the first 32 validation slices with lesions" in old_card
    assert "Chosen: classifier C = 0.01, edit along the difference of the class means, edit step × 3" in old_card
    assert "(C = 0.01, class means × 3): edit efficacy" in old_card
    for row in [calibration["chosen"], *calibration["table"]]:
        row.pop("direction")
    calibration["chosen"]["step_scale"] = 1
    write_model_card(tmp_path, manifest)
    old_card = (tmp_path / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "Chosen: classifier C = 0.01, edit step × 1" in old_card and "| 0.01 | normal | 1 |" in old_card
    # A resume on other vertebrae marks the points measured on the old validation set.
    other = dataclasses.replace(_toy_slice_set(), names=np.array([f"w{i}" for i in range(8)]))
    out3 = train_bundle(other, tmp_path / "bundle", tmp_path / "state", _cfg(steps=60), prep,
                        device=torch.device("cpu"), classifier_C=0.01, eval_every=20, overwrite=True)
    card_md = (out3 / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert all(f"| {step} † |" in card_md for step in (20, 40, 50)) and "| 60 |" in card_md
    assert "† measured on other validation vertebrae than the last point" in card_md


def test_a_run_stopped_by_its_budget_is_measured_where_it_stopped_and_a_zero_budget_measures_nothing(tmp_path):
    """The last step of a budget-stopped run is what gets exported: the curve and the snapshots end there."""
    from hideseek.preprocessing import Preprocessing
    from hideseek.training import snapshot_path, train_bundle

    prep = Preprocessing(image_size=16, intensity="hu_window", lower=0, upper=1)
    state = tmp_path / "state"

    def run(budget_s: float) -> list[int]:
        train_bundle(_toy_slice_set(), tmp_path / "bundle", state, _cfg(steps=10_000), prep,
                     device=torch.device("cpu"), classifier_C=0.01, time_budget_s=budget_s, eval_every=5000,
                     keep_snapshots=True, overwrite=True, calibrate=False)
        return [p["step"] for p in json.loads((state / "curve.json").read_text())]

    steps = run(1.0)
    stopped = json.loads((state / "state.json").read_text())["step"]
    assert 0 < stopped < 5000 and steps == [stopped] and snapshot_path(state, stopped).is_file()
    assert run(0) == [stopped]  # a re-export adds no point


def test_a_compact_state_resumes_with_the_ema_of_its_bundle_and_a_zero_budget_reexports(tmp_path):
    """What travels between sessions is weights + state.json (+ the bundle): the rest is rebuilt."""
    from hideseek.bundle import load_bundle
    from hideseek.preprocessing import Preprocessing
    from hideseek.training import EMA_FILE, OPTIMIZER_FILE, train_bundle

    prep = Preprocessing(image_size=16, intensity="hu_window", lower=0, upper=1)
    state, bundle_dir = tmp_path / "state", tmp_path / "bundle"
    train_bundle(_toy_slice_set(), bundle_dir, state, _cfg(steps=20), prep, device=torch.device("cpu"),
                 classifier_C=0.01, eval_every=20, name="toy", provenance={"command": "hideseek train A"})
    ema_before = load_bundle(bundle_dir).dae.state_dict()
    (state / EMA_FILE).unlink()
    (state / OPTIMIZER_FILE).unlink()
    text = {"intended_use": "demonstration only", "limitations": "synthetic data",
            "provenance": {"commands": ["hideseek phantom X"]}}
    out = train_bundle(_toy_slice_set(), bundle_dir, state, _cfg(steps=20), prep, device=torch.device("cpu"),
                       classifier_C=0.01, time_budget_s=0, overwrite=True, card_text=text, name="toy",
                       provenance={"command": "hideseek train B"})
    bundle = load_bundle(out)
    assert bundle.version == "20" and bundle.card["intended_use"] == "demonstration only"
    for name, tensor in bundle.dae.state_dict().items():
        assert torch.equal(tensor, ema_before[name]), f"the EMA came back from the bundle exactly: {name}"
    # The card names the data command and every run of the training, in order, with the step each began at.
    assert bundle.card["provenance"]["commands"] == [
        "hideseek phantom X", "hideseek train A   # from step 0", "hideseek train B   # from step 20"]
    card_md = (out / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "synthetic data" in card_md and "`hideseek train B   # from step 20`" in card_md
    calibration = bundle.card["metrics"]["edit_calibration"]
    chosen = next(r for r in calibration["table"]
                  if all(r[k] == calibration["chosen"][k] for k in ("C", "direction", "step_scale")))
    assert chosen["C"] == bundle.manifest["classifier"]["fit"]["C"]
    assert (f"edit efficacy {chosen['efficacy']:.2f} (blastic {chosen['efficacy blastic']:.2f}) (target ≥ 0.7)"
            in card_md)  # the toy lesions are all blastic


def test_a_run_resumes_only_on_slices_normalised_as_it_began_and_an_older_state_records_them(tmp_path):
    from hideseek.errors import InputError
    from hideseek.preprocessing import Preprocessing
    from hideseek.training import train_bundle

    window = Preprocessing(image_size=16, intensity="hu_window", lower=0, upper=1)
    curve = Preprocessing(image_size=16, intensity="hu_curve", lower=0, upper=1, curve=((0.5, 0.7),))
    state = tmp_path / "state"

    def run(prep: Preprocessing, steps: int) -> None:
        train_bundle(_toy_slice_set(), tmp_path / "bundle", state, _cfg(steps=steps, checkpoint_every=10), prep,
                     device=torch.device("cpu"), classifier_C=0.01, eval_every=10, overwrite=True, calibrate=False)

    def recorded() -> Preprocessing:
        return Preprocessing.from_dict(json.loads((state / "state.json").read_text())["config"]["preprocessing"])

    run(window, 10)
    assert recorded() == window
    before = (state / "state.json").read_bytes()
    with pytest.raises(InputError, match=r"intensity 'hu_window' \(now 'hu_curve'\)"):
        run(curve, 20)
    assert (state / "state.json").read_bytes() == before
    # A state written before the record existed resumes with the slices it is given, and records them.
    meta = json.loads(before)
    del meta["config"]["preprocessing"]
    (state / "state.json").write_text(json.dumps(meta))
    run(curve, 20)
    assert recorded() == curve


def test_snapshots_keep_every_curve_point_and_one_exports_without_touching_the_state(tmp_path):
    """The best learning-curve point is not always the last: it can be exported after the run."""
    from safetensors.torch import load_file

    from hideseek.bundle import load_bundle
    from hideseek.errors import InputError
    from hideseek.preprocessing import Preprocessing
    from hideseek.training import load_snapshot, snapshot_path, train_bundle

    prep = Preprocessing(image_size=16, intensity="hu_window", lower=0, upper=1)
    state = tmp_path / "state"
    last = train_bundle(_toy_slice_set(), tmp_path / "last", state, _cfg(steps=20, checkpoint_every=10), prep,
                        device=torch.device("cpu"), classifier_C=0.01, eval_every=10, keep_snapshots=True,
                        provenance={"command": "hideseek train --steps 20"})
    assert snapshot_path(state, 10).is_file() and snapshot_path(state, 20).is_file()
    for name, tensor in load_bundle(last).dae.state_dict().items():
        assert torch.equal(tensor, load_file(str(snapshot_path(state, 20)))[name])
    state_before = {f.name: f.read_bytes() for f in state.iterdir() if f.is_file()}

    out = train_bundle(_toy_slice_set(), tmp_path / "best", state, _cfg(steps=20, checkpoint_every=10), prep,
                       device=torch.device("cpu"), classifier_C=0.01, eval_every=10, from_snapshot=10,
                       provenance={"command": "hideseek train --export-snapshot 10"})
    bundle = load_bundle(out)
    # The export is named as one, not as a training run, and the run that made the snapshot is listed.
    assert bundle.card["provenance"]["commands"] == [
        "hideseek train --steps 20   # from step 0",
        "hideseek train --export-snapshot 10   # exports the EMA snapshot of step 10, no training"]
    assert bundle.version == "10" and bundle.card["training"]["steps"] == 10
    assert [p["step"] for p in bundle.card["metrics"]["learning_curve"]] == [10]
    snapshot = load_file(str(snapshot_path(state, 10)))
    for name, tensor in bundle.dae.state_dict().items():
        assert torch.equal(tensor, snapshot[name]), name
    assert "validation, step 10" in (out / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert {f.name: f.read_bytes() for f in state.iterdir() if f.is_file()} == state_before

    with pytest.raises(InputError, match=r"no EMA snapshot of step 15 .*kept: 10, 20"):
        train_bundle(_toy_slice_set(), tmp_path / "none", state, _cfg(steps=20, checkpoint_every=10), prep,
                     device=torch.device("cpu"), from_snapshot=15)
    assert not (tmp_path / "none").exists()

    # A kept point can also be read back as a network with its slice preprocessing, to study the run mid-way.
    dae, preprocessing = load_snapshot(state, 10)
    assert preprocessing == prep and not any(p.requires_grad for p in dae.parameters())
    for name, tensor in dae.state_dict().items():
        assert torch.equal(tensor, snapshot[name]), name
    with pytest.raises(InputError, match=r"no EMA snapshot of step 15 .*kept: 10, 20"):
        load_snapshot(state, 15)
    meta = json.loads((state / "state.json").read_text())
    del meta["config"]["preprocessing"]
    (state / "state.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="does not record how its slices were made"):
        load_snapshot(state, 10)
    with pytest.raises(InputError, match="no training state"):
        load_snapshot(tmp_path / "nowhere", 10)


def test_split_keeps_vertebrae_whole():
    from hideseek.training import split_by_vertebra

    vertebra = np.repeat(np.arange(20), 3)
    malignant = (vertebra % 4 == 0).astype(np.int8)  # 5 malignant, 15 healthy vertebrae
    held = split_by_vertebra(vertebra, malignant, 0.2, seed=1)
    assert held.sum() == 3 * (1 + 3)
    assert set(malignant[held]) == {0, 1}
    for v in range(20):
        assert len(set(held[vertebra == v])) == 1


def test_train_command_resumes_and_its_card_names_every_command(tmp_path, monkeypatch, capsys):
    """`hideseek train` end to end on phantoms (a toy-sized network in place of the demo one, to stay fast)."""
    from hideseek import training
    from hideseek.bundle import load_bundle
    from hideseek.cli import main
    from hideseek.network import DAEConfig
    from hideseek.phantom import write_phantom_set

    monkeypatch.setattr(training, "DEMO_ARCHITECTURE", DAEConfig.from_dict(TOY_ARCH | {"image_size": 64}))
    manifest = write_phantom_set(tmp_path / "data", 2, seed=4, levels=("L1", "L2", "L3"), spacing=1.5,
                                 size=(120.0, 190.0), lesion_rate=0.5, mimic_rate=0.3)
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"limitations": "toy", "data_commands": ["hideseek phantom --seed 4"]}), "utf-8")
    out, state = tmp_path / "bundle", tmp_path / "state"
    train = ["train", "--manifest", str(manifest), "--out", str(out), "--state", str(state), "--card", str(card),
             "--name", "cli-toy", "--no-bf16", "--threads", "1"]
    assert main([*train, "--steps", "2"]) == 0
    assert main([*train, "--steps", "4"]) == 2  # an existing bundle is refused before training, not after it
    assert "already exists" in capsys.readouterr().err
    assert json.loads((state / "state.json").read_text())["step"] == 2
    assert main([*train, "--steps", "4", "--overwrite"]) == 0
    bundle = load_bundle(out)
    assert bundle.version == "4" and bundle.card["limitations"] == "toy"
    command = "hideseek " + " ".join(train)
    assert bundle.card["provenance"]["commands"] == [
        "hideseek phantom --seed 4", f"{command} --steps 2   # from step 0",
        f"{command} --steps 4 --overwrite   # from step 2"]
    assert "wrote model bundle" in capsys.readouterr().err
    # The two validation vertebrae show no lesion in their middle slices: the card says the defaults apply.
    assert bundle.card["metrics"]["candidate_tuning"] == {
        "skipped": "no lesion in the middle slices of the validation vertebrae"}
    assert "were not tuned" in (out / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "body_margin_px" not in bundle.method["presets"]["fast"]

    card.write_text(json.dumps({"data_commands": "hideseek phantom"}), "utf-8")
    before = (out / "model.json").read_bytes()
    assert main([*train, "--steps", "6", "--overwrite"]) == 2
    assert "'data_commands' must be a list" in capsys.readouterr().err
    assert (out / "model.json").read_bytes() == before and json.loads((state / "state.json").read_text())["step"] == 4
    card.unlink()
    train.remove("--card")
    train.remove(str(card))
    assert main([*train, "--steps", "6", "--overwrite", "--intensity", "hu_curve"]) == 2
    assert "intensity 'hu_window' (now 'hu_curve')" in capsys.readouterr().err  # refused before extracting slices
    assert (out / "model.json").read_bytes() == before and json.loads((state / "state.json").read_text())["step"] == 4
    assert main([*train, "--steps", "4", "--export-snapshot", "4", "--out", str(tmp_path / "best")]) == 2
    assert "no EMA snapshot of step 4" in capsys.readouterr().err and not (tmp_path / "best").exists()


def test_data_without_both_classes_is_refused_before_training(tmp_path):
    from hideseek.errors import InputError
    from hideseek.preprocessing import Preprocessing
    from hideseek.training import train_bundle

    data = _toy_slice_set()
    only_malignant = data.subset(data.malignant == 1)
    with pytest.raises(InputError, match=r"2 healthy and 2 malignant vertebrae.*has 0 healthy and 4 malignant"):
        train_bundle(only_malignant, tmp_path / "bundle", tmp_path / "state", _cfg(), Preprocessing(image_size=16),
                     device=torch.device("cpu"))
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "state").exists()


@pytest.mark.parametrize(("data", "direction", "needle"), [
    ("blastic only", "class means per kind", "lytic lesions only and with blastic lesions only"),
    ("no truth", "normal", "needs lesion truth.*this data has none"),
    ("no truth in validation", "class means", "needs lesion truth.*none of the 2 validation vertebrae"),
    ("both types", "sideways", "unknown edit direction 'sideways'"),
])
def test_an_edit_direction_the_data_cannot_calibrate_is_refused_before_training(tmp_path, data, direction, needle):
    from hideseek.errors import InputError
    from hideseek.preprocessing import Preprocessing
    from hideseek.training import split_by_vertebra, train_bundle

    slices = _toy_slice_set(lytic=data == "both types")
    if data == "no truth":
        slices.lesions[:] = 0
    if data == "no truth in validation":  # the export calibrates on its validation vertebrae only
        slices.lesions[split_by_vertebra(slices.vertebra, slices.malignant, 0.1, _cfg().seed)] = 0
    with pytest.raises(InputError, match=needle):
        train_bundle(slices, tmp_path / "bundle", tmp_path / "state", _cfg(), Preprocessing(image_size=16),
                     device=torch.device("cpu"), edit_direction=direction)
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "state").exists()


def test_an_edit_direction_that_does_not_raise_the_score_is_refused_without_writing_a_bundle(tmp_path, monkeypatch):
    import hideseek.training as training
    from hideseek.errors import InputError
    from hideseek.preprocessing import Preprocessing

    means = training.class_mean_direction
    # reversed, the direction points to healthy codes: P(malignant) falls along it
    monkeypatch.setattr(training, "class_mean_direction", lambda z, malignant: -means(z, malignant))
    prep = Preprocessing(image_size=16, intensity="hu_window", lower=0, upper=1)
    with pytest.raises(InputError, match="no classifier raises P\\(malignant\\) along the class means"):
        training.train_bundle(_toy_slice_set(), tmp_path / "bundle", tmp_path / "state", _cfg(steps=10), prep,
                              device=torch.device("cpu"), classifier_C=0.01, eval_every=10,
                              edit_direction="class means")
    assert not (tmp_path / "bundle").exists() and (tmp_path / "state" / "state.json").is_file()


def test_an_edit_direction_without_calibration_is_a_programming_error(tmp_path):
    from hideseek.preprocessing import Preprocessing
    from hideseek.training import train_bundle

    with pytest.raises(ValueError, match="needs calibrate=True"):
        train_bundle(_toy_slice_set(), tmp_path / "bundle", tmp_path / "state", _cfg(), Preprocessing(image_size=16),
                     device=torch.device("cpu"), edit_direction="normal", calibrate=False)
    assert not (tmp_path / "state").exists()


def test_an_export_limited_to_the_per_kind_edit_calibrates_and_tunes_only_that(tmp_path):
    from hideseek.bundle import load_bundle
    from hideseek.preprocessing import Preprocessing
    from hideseek.training import train_bundle

    prep = Preprocessing(image_size=16, intensity="hu_window", lower=0, upper=1)
    out = train_bundle(_toy_slice_set(lytic=True), tmp_path / "bundle", tmp_path / "state", _cfg(steps=20), prep,
                       device=torch.device("cpu"), classifier_C=0.01, eval_every=20,
                       edit_direction="class means per kind")
    bundle = load_bundle(out)
    calibration = bundle.card["metrics"]["edit_calibration"]
    assert {r["direction"] for r in calibration["table"]} == {"class means per kind"} and len(calibration["table"]) == 8
    assert [r["direction"] for r in calibration["shortlist"]] == ["class means per kind"]
    assert set(bundle.classifier.kind_directions) == {"lytic", "blastic"} and bundle.classifier.edit_direction is None


@pytest.mark.parametrize(("extra", "needle"), [(["--lr-decay-from", "20"], "--lr-decay-from 20 must be a step before"),
                                               (["--lr-final", "0.1"], "--lr-final 0.1 must be positive"),
                                               (["--label-weight", "-1"], "--label-weight -1.0 must be 0 or"),
                                               (["--label-dropout", "1"], "--label-dropout 1.0 must be at least 0 "
                                                                          "and below 1"),
                                               (["--body-weight", "0.5"], "--body-weight 0.5 must be a number of at "
                                                                          "least 1")])
def test_an_impossible_schedule_or_label_setting_is_refused_before_any_work(extra, needle, tmp_path, capsys):
    from hideseek.cli import main

    argv = ["train", "--manifest", str(tmp_path / "none.csv"), "--out", str(tmp_path / "b"), "--state",
            str(tmp_path / "s"), "--steps", "10", *extra]
    assert main(argv) == 2
    assert needle in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_the_label_head_learns_the_vertebra_label_from_z_and_resumes_with_the_state(tmp_path):
    from safetensors.torch import load_file

    from hideseek.training import HEAD_PREFIX, WEIGHTS_FILE

    images = _toy_images(64)
    labels = (np.arange(64) % 2).astype(np.int8)
    images[labels == 1, 2:5, 2:5] += 1.0  # malignant slices carry a bright corner the encoder must see
    trainer = Trainer(_cfg(steps=80, label_weight=1.0), DiffusionConfig(), torch.device("cpu"))
    logs = []
    trainer.run(images, labels, state_dir=tmp_path, progress=logs.append)
    assert logs[-1]["label_loss"] < 0.5 * logs[0]["label_loss"]
    saved = load_file(str(tmp_path / WEIGHTS_FILE))
    assert {HEAD_PREFIX + "weight", HEAD_PREFIX + "bias"} <= set(saved)
    resumed = Trainer.resume(tmp_path, torch.device("cpu"), steps=100, label_weight=1.0)
    assert torch.equal(resumed.label_head.weight, trainer.label_head.weight)
    assert len(resumed.opt.state) == len(list(resumed.model.parameters())) + 2  # the head's Adam moments too
    with pytest.raises(ValueError, match="label"):
        resumed.run(images)


def test_label_dropout_hides_a_share_of_z_from_the_head_and_a_resume_may_switch_it_on(tmp_path):
    z = torch.ones(64, 512)
    plain = Trainer(_cfg(label_weight=1.0), DiffusionConfig(), torch.device("cpu"))
    assert plain._dropped(z) is z
    dropping = Trainer(_cfg(label_weight=1.0, label_dropout=0.25), DiffusionConfig(), torch.device("cpu"))
    seen = dropping._dropped(z)
    assert abs(float((seen == 0).float().mean()) - 0.25) < 0.01  # 32768 draws: the share is within ±0.01
    assert seen.unique().tolist() == [0.0, pytest.approx(1 / 0.75)]  # inverted dropout: the mean input is kept
    assert not torch.equal(seen, dropping._dropped(z))  # a fresh draw at every step

    labels = (np.arange(32) % 2).astype(np.int8)
    Trainer(_cfg(steps=20, label_weight=1.0), DiffusionConfig(), torch.device("cpu")).run(
        _toy_images(32), labels, state_dir=tmp_path)
    resumed = Trainer.resume(tmp_path, torch.device("cpu"), steps=30, label_weight=1.0, label_dropout=0.5)
    assert resumed.cfg.label_dropout == 0.5
    assert resumed.history[-1] == {"step": 20, "resume": "label_dropout -> 0.5"}
    resumed.run(_toy_images(32), labels, state_dir=tmp_path)
    assert resumed.step == 30


def test_a_state_from_before_the_label_head_resumes_without_it_and_may_switch_it_on(tmp_path):
    """States written before ``label_weight`` existed have neither the setting nor the head's tensors."""
    from safetensors.torch import load_file, save_file

    from hideseek.training import HEAD_PREFIX, WEIGHTS_FILE

    Trainer(_cfg(steps=20), DiffusionConfig(), torch.device("cpu")).run(_toy_images(), state_dir=tmp_path)
    meta = json.loads((tmp_path / "state.json").read_text(encoding="utf-8"))
    del meta["config"]["label_weight"]
    (tmp_path / "state.json").write_text(json.dumps(meta), encoding="utf-8")
    weights = {k: v for k, v in load_file(str(tmp_path / WEIGHTS_FILE)).items() if not k.startswith(HEAD_PREFIX)}
    save_file(weights, str(tmp_path / WEIGHTS_FILE))
    plain = Trainer.resume(tmp_path, torch.device("cpu"), steps=40, label_weight=0.0)
    assert "resume" not in plain.history[-1] and plain.cfg.label_weight == 0.0
    switched = Trainer.resume(tmp_path, torch.device("cpu"), steps=40, label_weight=0.01)
    assert switched.history[-1] == {"step": 20, "resume": "label_weight -> 0.01"}


def test_body_weight_counts_the_error_inside_the_body_that_many_times():
    """The network is replaced by one whose only error is 1 in the top half of each slice, so the weighted mean
    is known: with the body on the top half and weight 4, (4 × 128) / (4 × 128 + 128) = 0.8 against a plain 0.5."""
    trainer = Trainer(_cfg(body_weight=4.0), DiffusionConfig(), torch.device("cpu"))
    error = torch.zeros(1, 1, 16, 16)
    error[..., :8, :] = 1.0
    trainer.model.forward = lambda xt, t, cond: xt / trainer._sqrt_1m_ac[t][:, None, None, None] + error
    x0 = torch.zeros(8, 1, 16, 16)  # x_t is then the noise alone, scaled
    top = torch.zeros(8, 1, 16, 16, dtype=torch.bool)
    top[..., :8, :] = True
    assert float(trainer.loss(x0, bodies=top)[0]) == pytest.approx(0.8)
    assert float(trainer.loss(x0, bodies=~top)[0]) == pytest.approx(0.2)
    assert float(trainer.loss(x0, bodies=torch.ones_like(top))[0]) == pytest.approx(0.5)  # uniform: plain mean
    with pytest.raises(ValueError, match="body masks"):
        trainer.loss(x0)


def test_augmentation_moves_the_body_masks_with_their_slices_and_a_resume_may_switch_body_weight_on(tmp_path):
    trainer = Trainer(_cfg(augment_shift_px=3), DiffusionConfig(), torch.device("cpu"))
    masks = torch.from_numpy(_toy_images(32) > 0.5)[:, None]
    shifted, moved = trainer._augment(masks.float(), masks)
    assert not torch.equal(moved, masks)  # 32 random shifts of up to 3 px: some moved
    assert torch.equal(moved, shifted > 0.5)  # gain and offset of at most 5 % keep 0 and 1 apart

    images, bodies = _toy_images(32), _toy_images(32) > 0.3
    with pytest.raises(ValueError, match="one vertebral body mask per slice"):
        Trainer(_cfg(body_weight=4.0), DiffusionConfig(), torch.device("cpu")).run(images, bodies=bodies[:5])
    Trainer(_cfg(steps=20), DiffusionConfig(), torch.device("cpu")).run(images, state_dir=tmp_path)
    resumed = Trainer.resume(tmp_path, torch.device("cpu"), steps=30, body_weight=4.0)
    assert resumed.history[-1] == {"step": 20, "resume": "body_weight -> 4.0"}
    resumed.run(images, bodies=bodies, state_dir=tmp_path)
    assert resumed.step == 30


def test_the_tuning_eta_times_each_edits_decode_apart_from_its_settings():
    """Each shortlisted edit decodes its healthy edit before its first setting: counting that decode against
    one setting made the first ETA hours long; measured apart, the ETA is the true time left."""
    from hideseek.training import _TuningClock

    now = [0.0]
    logs: list[dict] = []
    clock = _TuningClock(logs.append, 3, clock=lambda: now[0])
    for edit in range(3):
        report = clock.reporter(edit)
        now[0] += 30.0  # the edit's own decode
        for done in range(1, 91):
            now[0] += 1.0
            report(done, 90)
    assert [r["done"] for r in logs] == list(range(1, 271)) and {r["total"] for r in logs} == {270}
    assert logs[0]["eta_s"] is None  # one setting tells no pace yet
    time_left = [now[0] - t for t in np.cumsum([31.0] + [1.0] * 89 + ([31.0] + [1.0] * 89) * 2)]
    assert [r["eta_s"] for r in logs[1:]] == pytest.approx(time_left[1:])
    assert logs[-1]["eta_s"] == 0
