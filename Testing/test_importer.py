"""Conversion of the published files: a checkpoint in the Lightning layout built here, the real classifier pickles."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hideseek.bundle import load_bundle, read_bundle_manifest
from hideseek.cli import main
from hideseek.errors import InputError
from hideseek.importer import PUBLISHED_ARCHITECTURE, import_published
from hideseek.network import DAEConfig, DiffusionAutoencoder
from hideseek.preprocessing import PUBLISHED_PREPROCESSING

pytest.importorskip("sklearn")
pytest.importorskip("joblib")

MODEL_FILL = -7.0


def _published_keys(reference_dir: Path) -> dict:
    return json.loads((reference_dir / "dae_fxclass64_keys.json").read_text(encoding="utf-8"))


def _write_lightning_checkpoint(path: Path, keys: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """A file in the layout of the authors' last.ckpt; returns the EMA tensors it holds (without prefix).

    The ``model.*`` copies are stride-0 views of one number: they cost no memory or disk, and an importer
    that took them instead of ``ema_model.*`` would be caught.
    """
    gen = torch.Generator().manual_seed(seed)
    ema = {key.removeprefix("ema_model."): torch.randn(shape, generator=gen) for key, shape in keys.items()}
    state = {f"model.{k}": torch.full((1,), MODEL_FILL).expand(v.shape) for k, v in ema.items()}
    state.update({f"ema_model.{k}": v for k, v in ema.items()})
    state["x_T"] = torch.randn(4, 1, 64, 64, generator=gen)
    torch.save(
        {
            "epoch": 97,
            "global_step": 123456,
            "pytorch-lightning_version": "1.4.5",
            "state_dict": state,
            "hyper_parameters": {"conf": {"lr": 1e-4}, "batch_size": 32, "name": "fxclass64", "beta": float("nan")},
        },
        path,
    )
    return ema


def test_published_architecture_is_the_reference_one(reference_dir):
    golden = json.loads((reference_dir / "dae_tiny_golden.json").read_text(encoding="utf-8"))
    assert DAEConfig.from_dict(golden["full_config"]) == PUBLISHED_ARCHITECTURE
    keys = _published_keys(reference_dir)
    with torch.device("meta"):
        model = DiffusionAutoencoder(PUBLISHED_ARCHITECTURE)
    assert model.num_parameters() == keys["num_parameters"]


def test_published_files_convert_to_a_bundle_via_the_cli(reference_dir, tmp_path, capsys):
    """The 90 M-parameter path end to end (about 20 s): convert, then load the bundle back strictly."""
    keys = _published_keys(reference_dir)["keys"]
    ckpt = tmp_path / "last.ckpt"
    ema = _write_lightning_checkpoint(ckpt, keys)
    out = tmp_path / "published"
    rc = main([
        "import-published", "--checkpoint", str(ckpt), "--classifier", str(reference_dir / "classifier_lr.pkl"),
        "--scaler", str(reference_dir / "scaler.pkl"), "--out", str(out),
    ])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "can execute arbitrary code" in captured.err and f"wrote model bundle {out}" in captured.out
    ckpt.unlink()

    bundle = load_bundle(out)
    state = bundle.dae.state_dict()
    assert state.keys() == ema.keys()
    assert all(torch.equal(state[k], v) for k, v in ema.items())  # the EMA weights, not model.*
    assert bundle.dae.config == PUBLISHED_ARCHITECTURE and bundle.dae.num_parameters() == 90_835_777
    assert bundle.preprocessing == PUBLISHED_PREPROCESSING
    assert bundle.method == {"default_preset": "published"}
    expected = json.loads((reference_dir / "published_classifier_expected.json").read_text(encoding="utf-8"))
    for name in ("coef", "mean", "scale"):
        np.testing.assert_allclose(getattr(bundle.classifier, name), expected[name], rtol=1e-12, atol=0)
    assert bundle.classifier.intercept == pytest.approx(expected["intercept"], rel=1e-12)
    del bundle, state, ema
    gc.collect()

    manifest = read_bundle_manifest(out)
    card = manifest["card"]
    assert card["licence"] == "MIT (authors' release)" and "not for clinical use" in card["intended_use"]
    assert card["provenance"]["paper"] == "arXiv:2512.06849"
    assert card["provenance"]["source_files"]["scaler"]["sha256"] == _sha256(reference_dir / "scaler.pkl")
    assert card["training"]["epoch"] == 97 and card["training"]["global_step"] == 123456
    assert card["training"]["hyper_parameters"] == {"batch_size": 32, "name": "fxclass64"}
    assert manifest["classifier"]["fit"]["C"] == expected["C"]
    assert manifest["classifier"]["fit"]["n_samples"] == expected["n_samples_seen"]


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def pickles(reference_dir) -> tuple[Path, Path]:
    return reference_dir / "classifier_lr.pkl", reference_dir / "scaler.pkl"


def _convert(ckpt: Path, pickles: tuple[Path, Path], out: Path) -> Path:
    return import_published(ckpt, pickles[0], pickles[1], out)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, pickles):
    tiny = DiffusionAutoencoder(DAEConfig(image_size=32, model_channels=32, channel_mult=(1, 2),
                                          embed_channels=64, enc_out_channels=64, enc_channel_mult=(1, 2, 2)))
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": {f"ema_model.{k}": v for k, v in tiny.state_dict().items()}}, ckpt)
    with pytest.raises(InputError, match=r"does not match the published DAE architecture: \d+ missing keys"):
        _convert(ckpt, pickles, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"weight": torch.zeros(2)}, "not a PyTorch Lightning checkpoint: it has no 'state_dict'"),
        ({"state_dict": {"model.a": torch.zeros(2)}}, r"holds no 'ema_model\.\*' weights .*\['model'\]"),
        ({"state_dict": {"ema_model.a": 3}}, "are not tensors"),
    ],
)
def test_checkpoints_of_the_wrong_layout_are_refused(tmp_path, pickles, content, message):
    ckpt = tmp_path / "bad.ckpt"
    torch.save(content, ckpt)
    with pytest.raises(InputError, match=message):
        _convert(ckpt, pickles, tmp_path / "out")


def test_unsafe_or_foreign_files_are_refused(tmp_path, pickles, capsys):
    not_torch = tmp_path / "notes.ckpt"
    not_torch.write_text("hello", encoding="utf-8")
    with pytest.raises(InputError, match="cannot be read as a safe PyTorch checkpoint"):
        _convert(not_torch, pickles, tmp_path / "out")
    with_code = tmp_path / "object.ckpt"
    torch.save({"state_dict": {}, "callback": Path("x")}, with_code)  # needs full unpickling: refused
    with pytest.raises(InputError, match="cannot be read as a safe PyTorch checkpoint"):
        _convert(with_code, pickles, tmp_path / "out")
    rc = main(["import-published", "--checkpoint", str(tmp_path / "missing.ckpt"), "--classifier",
               str(pickles[0]), "--scaler", str(pickles[1]), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "last.ckpt from Hugging Face matanatad/dae_verts" in capsys.readouterr().err


def test_swapped_pickles_are_refused(reference_dir, tmp_path, pickles):
    """The pickles are checked after the checkpoint, so a minimal valid checkpoint is needed first."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DiffusionAutoencoder(PUBLISHED_ARCHITECTURE).state_dict().items()}
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"ema_model.{k}": torch.zeros(1).expand(s) for k, s in shapes.items()}}, ckpt)
    with pytest.raises(InputError, match="swapped"):
        import_published(ckpt, pickles[1], pickles[0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == [ckpt]
    gc.collect()


def test_an_existing_output_folder_is_refused(tmp_path, pickles):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="already exists"):
        _convert(ckpt, pickles, tmp_path / "out")
