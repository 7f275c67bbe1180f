"""Model bundles with a tiny DAE: exact round trip, refusal of damaged bundles, atomic and protected writes."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

import hideseek.bundle as bundle_module
from hideseek.bundle import find_bundles, load_bundle, read_bundle_manifest, save_bundle
from hideseek.classifier import LatentClassifier
from hideseek.errors import BundleError, InputError
from hideseek.network import DAEConfig, DiffusionAutoencoder
from hideseek.preprocessing import Preprocessing
from hideseek.sampler import DiffusionConfig

TINY = DAEConfig(
    image_size=32, model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(16,),
    embed_channels=64, enc_out_channels=64, enc_channel_mult=(1, 2, 2), enc_num_res_block=2,
)
CARD = {
    "summary": "tiny test model", "intended_use": "tests only", "licence": "MIT",
    "provenance": {"made_by": "test_bundle.py"}, "training": {"steps": 0}, "metrics": {"auc": 0.5},
    "limitations": "random weights",
}


def test_tiny_config_is_the_reference_tiny_config(reference_dir):
    golden = json.loads((reference_dir / "dae_tiny_golden.json").read_text(encoding="utf-8"))
    assert DAEConfig.from_dict(golden["config"]) == TINY


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = DiffusionAutoencoder(TINY).eval()
    with torch.no_grad():  # the zero-initialised output convolutions would hide a lost tensor
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    rng = np.random.default_rng(0)
    d = TINY.enc_out_channels
    classifier = LatentClassifier(
        coef=rng.normal(size=d), intercept=-0.25, mean=rng.normal(size=d), scale=rng.uniform(0.5, 2, size=d)
    )
    preprocessing = Preprocessing(image_size=32, intensity="hu_window", lower=-200, upper=1200)
    return model, DiffusionConfig(), preprocessing, classifier


def _save(parts, out: Path, **kw) -> Path:
    model, diffusion, preprocessing, classifier = parts
    kw = {"name": "tiny", "version": "0.0.1", "method": {"default_preset": "fast"}, "card": CARD, **kw}
    return save_bundle(out, model, diffusion, preprocessing, classifier, **kw)


@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory) -> Path:
    return _save(parts, tmp_path_factory.mktemp("bundles") / "tiny", fit_info={"C": 0.01})


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_round_trip_gives_identical_outputs(parts, saved):
    model, diffusion, preprocessing, classifier = parts
    loaded = load_bundle(saved)
    assert not loaded.dae.training
    assert loaded.dae.config == TINY and loaded.diffusion == diffusion and loaded.preprocessing == preprocessing
    assert np.array_equal(loaded.classifier.coef, classifier.coef)
    assert np.array_equal(loaded.classifier.scale, classifier.scale)
    assert loaded.classifier.intercept == classifier.intercept
    assert loaded.method == {"default_preset": "fast"} and loaded.card == CARD
    assert loaded.manifest["classifier"]["fit"] == {"C": 0.01}
    assert loaded.name == "tiny" and loaded.version == "0.0.1"
    torch.manual_seed(1)
    x0 = torch.rand(2, 1, 32, 32)
    xt = torch.randn(2, 1, 32, 32)
    t = torch.tensor([10, 900])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.dae.state_dict()[name]), name
    with torch.no_grad():  # same weights; kernels may still sum in another order (threads, memory layout)
        z, z2 = model.encode(x0), loaded.dae.encode(x0)
        torch.testing.assert_close(z, z2, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(xt, t, z), loaded.dae(xt, t, z), rtol=0, atol=1e-6)


def test_manifest_reads_without_weights_and_records_the_checksum(saved):
    manifest = read_bundle_manifest(saved / "model.json")
    assert manifest["format"] == "hideseek-bundle" and manifest["format_version"] == 1
    assert manifest["weights"]["num_parameters"] == DiffusionAutoencoder(TINY).num_parameters()
    assert manifest["weights"]["sha256"] == bundle_module.file_sha256(saved / "model.safetensors")
    assert set(manifest["card"]) == set(CARD)


def test_identical_weights_give_identical_files(parts, saved, tmp_path):
    """Re-exporting the same model must not change the weights' checksum (or add a blob to git)."""
    hashes = {read_bundle_manifest(_save(parts, tmp_path / f"again{i}", fit_info={"C": 0.01}))["weights"]["sha256"]
              for i in range(6)}
    assert hashes == {read_bundle_manifest(saved)["weights"]["sha256"]}


def test_card_is_completed_and_checked(parts, tmp_path):
    out = _save(parts, tmp_path / "b", card={"summary": "only a summary"})
    card = read_bundle_manifest(out)["card"]
    assert card["summary"] == "only a summary" and card["provenance"] == {} and card["limitations"] == ""
    with pytest.raises(InputError, match="unknown card fields license"):
        _save(parts, tmp_path / "c", card={"license": "MIT"})
    with pytest.raises(InputError, match="not plain JSON"):
        _save(parts, tmp_path / "d", method={"gate": float("nan")})
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_tampered_weights_fail_the_checksum(saved, tmp_path):
    bad = _copy(saved, tmp_path / "bad")
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 0x01
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch: the weights were changed or corrupted"):
        load_bundle(bad)


def _edit_manifest(saved: Path, dst: Path, edit) -> Path:
    folder = _copy(saved, dst)
    manifest = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    edit(manifest)
    (folder / "model.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format="other"), "not a hideseek model bundle"),
        (lambda m: m.update(format_version=2), "update hideseek"),
        (lambda m: m.pop("classifier"), "lacks the keys classifier"),
        (lambda m: m["architecture"].update(widht=3), "invalid 'architecture'.*widht"),
        (lambda m: m["diffusion"].update(beta_schedule="cosine"), "invalid 'diffusion'.*cosine"),
        (lambda m: m["preprocessing"].update(windw=1), "invalid 'preprocessing'.*windw"),
        (lambda m: m["classifier"].update(coef=m["classifier"]["coef"][:-1]), "invalid 'classifier'"),
        (lambda m: m["card"].pop("licence"), "invalid 'card'.*licence"),
        (lambda m: m["weights"].update(file="../model.safetensors"), "plain file name"),
        (lambda m: m["architecture"].update(enc_out_channels=32), "classifier has 64 inputs"),
    ],
)
def test_malformed_manifests_are_refused(saved, tmp_path, edit, message):
    folder = _edit_manifest(saved, tmp_path / "b", edit)
    with pytest.raises(BundleError, match=message):
        read_bundle_manifest(folder)
    with pytest.raises(BundleError, match=message):
        load_bundle(folder)


def test_weights_of_another_architecture_are_listed(saved, tmp_path):
    folder = _edit_manifest(saved, tmp_path / "b", lambda m: m["architecture"].update(num_res_blocks=1))
    with pytest.raises(BundleError, match=r"\d+ missing keys \(input_blocks.*\d+ unexpected keys.*shape mismatches"):
        load_bundle(folder, verify=False)


def test_broken_files_are_refused(saved, tmp_path):
    no_json = _copy(saved, tmp_path / "a")
    (no_json / "model.json").unlink()
    with pytest.raises(BundleError, match=r"model\.json is missing"):
        load_bundle(no_json)
    no_weights = _copy(saved, tmp_path / "b")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(BundleError, match=r"weights file model\.safetensors is missing"):
        load_bundle(no_weights)
    bad_json = _copy(saved, tmp_path / "c")
    (bad_json / "model.json").write_text('{"format": "hideseek-bundle",', encoding="utf-8")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_bundle_manifest(bad_json)
    garbage = _copy(saved, tmp_path / "d")
    (garbage / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(BundleError, match="not a readable safetensors file"):
        load_bundle(garbage, verify=False)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_existing_folders_are_protected(parts, saved, tmp_path):
    out = _copy(saved, tmp_path / "b")
    with pytest.raises(InputError, match="already exists"):
        _save(parts, out)
    _save(parts, out, version="0.0.2", overwrite=True)
    assert read_bundle_manifest(out)["version"] == "0.0.2"
    user_folder = tmp_path / "documents"
    user_folder.mkdir()
    (user_folder / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(InputError, match="not a model bundle"):
        _save(parts, user_folder, overwrite=True)
    assert (user_folder / "notes.txt").read_text(encoding="utf-8") == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "documents"]


def test_a_failed_write_leaves_nothing_behind(parts, saved, tmp_path, monkeypatch):
    def fail(path):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_module, "file_sha256", fail)
    with pytest.raises(OSError, match="disk full"):
        _save(parts, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    old = _copy(saved, tmp_path / "old")
    with pytest.raises(OSError, match="disk full"):
        _save(parts, old, version="9", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert read_bundle_manifest(old)["version"] == "0.0.1"


def test_incompatible_parts_are_refused(parts, tmp_path):
    model, diffusion, preprocessing, classifier = parts
    with pytest.raises(InputError, match="64-px slices"):
        save_bundle(tmp_path / "x", model, diffusion, Preprocessing(image_size=64), classifier, name="a", version="1")
    small = LatentClassifier(coef=np.ones(3), intercept=0.0, mean=np.zeros(3), scale=np.ones(3))
    with pytest.raises(InputError, match="3 inputs"):
        save_bundle(tmp_path / "x", model, diffusion, preprocessing, small, name="a", version="1")
    with pytest.raises(InputError, match="name"):
        save_bundle(tmp_path / "x", model, diffusion, preprocessing, classifier, name=" ", version="1")
    assert not (tmp_path / "x").exists()


def test_find_bundles_lists_bundle_folders(saved, tmp_path):
    (tmp_path / "models" / "group").mkdir(parents=True)
    _copy(saved, tmp_path / "models" / "a")
    _copy(saved, tmp_path / "models" / "group" / "b")
    _copy(saved, tmp_path / "models" / ".b.partial")
    (tmp_path / "models" / "empty").mkdir()
    found = find_bundles(tmp_path / "models", tmp_path / "missing", tmp_path / "models" / "a")
    assert found == [(tmp_path / "models" / "a").absolute(), (tmp_path / "models" / "group" / "b").absolute()]
    assert find_bundles(tmp_path / "models", max_depth=1) == [(tmp_path / "models" / "a").absolute()]


def test_the_bundled_model_loads_verified_and_says_what_it_is_for():
    from hideseek.bundle import load_bundle
    from hideseek.pipeline import default_model_path

    path = default_model_path()
    assert (path / "model.safetensors").stat().st_size <= 50 * 2**20
    bundle = load_bundle(path)  # checksum verified, strict state_dict
    assert "NOT for clinical use" in bundle.card["intended_use"]
    assert "import-published" in bundle.card["intended_use"]
    assert bundle.card["metrics"]["learning_curve"] and bundle.card["metrics"]["edit_calibration"]["chosen"]
    assert (path / "MODEL_CARD.md").is_file()
    # the training state its last run names travels with the repository, so the model can be trained further
    last_run = shlex.split(bundle.card["provenance"]["command"])
    state = path.parents[1] / last_run[last_run.index("--state") + 1]
    committed = [state / "weights.safetensors", state / "state.json", state / "curve.json"]
    assert sum(p.stat().st_size for p in committed) <= 40 * 2**20
    assert json.loads((state / "state.json").read_text())["step"] == int(bundle.version)
