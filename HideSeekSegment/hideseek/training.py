"""Training a diffusion autoencoder on vertebra slices, resumably, on a CPU or a GPU.

The objective is the usual DDPM noise-prediction MSE with the semantic code z = encoder(x0) as condition,
trained end to end. Because the healthy edit only works when the decoder relies on z (not on the DDIM noise
code) for lesion content, timesteps can be drawn with extra weight at high noise levels, where x_t carries
almost nothing and z must carry the image (``high_noise_fraction``).

Optionally (``label_weight``) a linear head on z is trained with the vertebra-level label (logistic loss), so
that z must separate malignant from healthy slices: the denoising loss alone let the bundled model's encoder
drop low-contrast lytic defects (BENCHMARKS.md, latent probe). The labels are the same vertebra-level ones the
latent classifier is fitted on; no lesion mask is used. The head is a training aid and is not exported.

Resumable state (``Trainer.save_state``): the raw weights and the EMA in float32, the Adam moments in bfloat16,
each in its own file, so that the part worth committing between sessions (the weights) stays small.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .attribution import LESION_TYPES, AttributionSettings, HideAndSeek, settings_for
from .bundle import check_replaceable, read_bundle_manifest, save_bundle
from .calibration import CLASS_MEANS, KIND_MEANS, NORMAL, calibrate_edit, tune_candidates
from .classifier import KINDS, LatentClassifier, class_mean_direction, fit_latent_classifier, roc_auc
from .dataset import SliceSet
from .device import bf16_is_fast
from .errors import BundleError, InputError
from .io import atomic_file
from .metrics import edit_efficacy, json_measurements, selection_key
from .modelcard import write_model_card
from .network import DAEConfig, DiffusionAutoencoder
from .preprocessing import Preprocessing
from .sampler import DiffusionConfig, alphas_cumprod

TrainProgress = Callable[[dict], None]
"""Called after every logged step with {step, steps, loss, elapsed_s, eta_s}."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (recorded in the model card)."""

    architecture: dict = field(default_factory=dict)  # DAEConfig fields; empty = DEMO_ARCHITECTURE
    preprocessing: dict = field(default_factory=dict)  # Preprocessing of the slices; empty = not recorded (older)
    steps: int = 20000
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.998
    warmup_steps: int = 200
    lr_decay_from: int | None = None  # from this step, cosine decay of lr to lr_final at the run's last step
    lr_final: float = 2e-6
    high_noise_fraction: float = 0.5  # share of each batch with t drawn from [high_noise_from*T, T)
    high_noise_from: float = 0.5
    x0_weight_max: float = 1.0  # >1: weight each sample by clip(1/SNR(t), 1, this), i.e. toward an x0-space loss
    label_weight: float = 0.0  # >0: add this × the logistic loss of a linear head on z against the slice's label
    label_dropout: float = 0.0  # share of z's channels the label head does not see (per sample, freshly drawn)
    body_weight: float = 1.0  # >1: denoising error inside the vertebral body counts this many times a pixel outside
    augment_shift_px: int = 2  # random translation (reflect-padded)
    augment_intensity: float = 0.05  # random gain/offset in the normalised range
    bf16: bool = True  # autocast where the device runs bf16 natively (device.bf16_is_fast), else float32
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 250

    def dae_config(self) -> DAEConfig:
        return DAEConfig.from_dict(self.architecture) if self.architecture else DEMO_ARCHITECTURE

    def to_dict(self) -> dict:
        return asdict(self)


DEMO_ARCHITECTURE = DAEConfig(
    image_size=64,
    model_channels=32,
    channel_mult=(1, 2, 2, 4),
    num_res_blocks=1,
    attention_resolutions=(8,),
    embed_channels=256,
    enc_out_channels=256,
    enc_channel_mult=(1, 2, 2, 4, 4),
    enc_num_res_block=1,
    dropout=0.0,
)
"""A compact DAE (about 5 M parameters) that trains on a 2-core CPU; same code path as the published one."""


class Trainer:
    """Owns the model, its EMA copy and the optimizer; ``run`` trains until steps or a time budget are spent."""

    def __init__(self, cfg: TrainConfig, diffusion: DiffusionConfig, device: torch.device) -> None:
        self.cfg, self.diffusion, self.device = cfg, diffusion, device
        torch.manual_seed(cfg.seed)
        self.model = DiffusionAutoencoder(cfg.dae_config()).to(device)
        self.ema = DiffusionAutoencoder(cfg.dae_config()).to(device).eval()
        self.ema.load_state_dict(self.model.state_dict())
        self.ema.requires_grad_(False)
        self.label_head = torch.nn.Linear(cfg.dae_config().enc_out_channels, 1).to(device)
        self.opt = torch.optim.AdamW(
            [*self.model.parameters(), *self.label_head.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.step = 0
        self.history: list[dict] = []
        self.elapsed_s = 0.0
        ac = torch.tensor(alphas_cumprod(diffusion), dtype=torch.float32)
        self._sqrt_ac, self._sqrt_1m_ac = ac.sqrt().to(device), (1 - ac).sqrt().to(device)
        self._rng = torch.Generator().manual_seed(cfg.seed)
        self._bf16 = cfg.bf16 and bf16_is_fast(device.type)
        self._warmup_from = 0  # a resume without optimizer state warms up again

    # -- one step -------------------------------------------------------------------------------------

    def _timesteps(self, n: int) -> torch.Tensor:
        T = self.diffusion.T
        t = torch.randint(0, T, (n,), generator=self._rng)
        high = torch.rand(n, generator=self._rng) < self.cfg.high_noise_fraction
        lo = int(self.cfg.high_noise_from * T)
        t[high] = torch.randint(lo, T, (int(high.sum()),), generator=self._rng)
        return t

    def _augment(self, x: torch.Tensor, bodies: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Shift (reflect-padded) and scale the slices; the body masks, when given, move with their slices."""
        n, s = x.shape[0], self.cfg.augment_shift_px
        if s:
            stacked = x if bodies is None else torch.cat([x, bodies.to(x.dtype)], dim=1)
            padded = torch.nn.functional.pad(stacked, (s, s, s, s), mode="reflect")
            dy, dx = torch.randint(0, 2 * s + 1, (2, n), generator=self._rng)
            h, w = x.shape[-2:]
            stacked = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
            x, bodies = stacked[:, :1], None if bodies is None else stacked[:, 1:] > 0.5
        if self.cfg.augment_intensity:
            a = self.cfg.augment_intensity
            gain = 1 + a * (2 * torch.rand(n, 1, 1, 1, generator=self._rng) - 1)
            offset = a * (2 * torch.rand(n, 1, 1, 1, generator=self._rng) - 1)
            x = x * gain + offset
        return x, bodies

    def loss(
        self, x0: torch.Tensor, labels: torch.Tensor | None = None, bodies: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Noise-prediction MSE, per sample weighted by ``_weights`` (plain MSE when x0_weight_max is 1) and per
        pixel by ``_pixel_weights`` (plain when body_weight is 1), and the label head's logistic loss (None
        without ``label_weight``); the total is their weighted sum.

        Why weight: with eps-prediction, an error e in the predicted image costs only SNR(t)·e² at timestep t, so
        at high noise levels (SNR ~ 1e-3) the loss barely asks the network to know the image, and the decoder
        learns to lean on x_T instead of z. Weighting by 1/SNR turns those samples into an x0-space loss, which
        only z can satisfy; the clip keeps it bounded.
        """
        t = self._timesteps(x0.shape[0]).to(self.device)
        noise = torch.randn(x0.shape, generator=self._rng).to(self.device)
        xt = self._sqrt_ac[t][:, None, None, None] * x0 + self._sqrt_1m_ac[t][:, None, None, None] * noise
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._bf16):
            cond = self.model.encode(x0)
            pred = self.model(xt, t, cond)
        squared = (pred.float() - noise).pow(2)
        if self.cfg.body_weight == 1.0:
            per_sample = squared.mean(dim=(1, 2, 3))
        else:
            pixel = self._pixel_weights(bodies)
            per_sample = (pixel * squared).sum(dim=(1, 2, 3)) / pixel.sum(dim=(1, 2, 3))
        w = self._weights(t)
        denoising = (w * per_sample).sum() / w.sum()
        if not self.cfg.label_weight:
            return denoising, None
        if labels is None:
            raise ValueError("label_weight > 0 needs the slices' vertebra-level labels")
        logits = self.label_head(self._dropped(cond.float()))[:, 0]
        return denoising, torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float().to(self.device))

    def _pixel_weights(self, bodies: torch.Tensor | None) -> torch.Tensor:
        """``body_weight`` inside the vertebral body, 1 elsewhere. Why: metastases live in the body, about a third
        of the slice (36 % of the phantom slices' pixels), yet the plain loss spends most of its error around it;
        the edit's lack of specificity for lesions lies in what z encodes (BENCHMARKS.md section 3)."""
        if bodies is None:
            raise ValueError("body_weight != 1 needs the slices' vertebral body masks")
        return 1.0 + (self.cfg.body_weight - 1.0) * bodies.to(self.device, torch.float32)

    def _dropped(self, z: torch.Tensor) -> torch.Tensor:
        """Inverted dropout on the label head's input: a head that cannot rest on a few channels of z is
        harder to fit by memorising slices (the head's loss fell to ~0.3 in ~3000 steps while validation AUC
        turned down; BENCHMARKS.md section 3). Drawn from the trainer's generator, so a resumed run repeats."""
        rate = self.cfg.label_dropout
        if not rate:
            return z
        keep = (torch.rand(z.shape, generator=self._rng) >= rate).to(z.device)
        return z * keep / (1.0 - rate)

    def _weights(self, t: torch.Tensor) -> torch.Tensor:
        snr = self._sqrt_ac[t].pow(2) / self._sqrt_1m_ac[t].pow(2)
        return (1.0 / snr).clamp(1.0, max(1.0, self.cfg.x0_weight_max))

    def _lr(self) -> float:
        """Warm-up, constant, then (with ``lr_decay_from``) a cosine down to ``lr_final`` at the last step: a
        constant rate stopped helping the bundled model after ~8000 steps (BENCHMARKS.md section 3)."""
        cfg = self.cfg
        lr = cfg.lr
        if cfg.lr_decay_from is not None and self.step >= cfg.lr_decay_from:
            done = min(1.0, (self.step - cfg.lr_decay_from) / max(1, cfg.steps - cfg.lr_decay_from))
            lr = cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1.0 + math.cos(math.pi * done))
        return lr * min(1.0, (self.step - self._warmup_from + 1) / max(1, cfg.warmup_steps))

    def train_step(
        self, x0: torch.Tensor, labels: torch.Tensor | None = None, bodies: torch.Tensor | None = None
    ) -> tuple[float, float | None]:
        """One optimizer step; returns the denoising loss and the label loss (None when not trained)."""
        self.model.train()
        for group in self.opt.param_groups:
            group["lr"] = self._lr()
        x, bodies = self._augment(x0, bodies)
        denoising, label_loss = self.loss(x.to(self.device), labels, bodies)
        loss = denoising if label_loss is None else denoising + self.cfg.label_weight * label_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*self.model.parameters(), *self.label_head.parameters()], 1.0)
        self.opt.step()
        with torch.no_grad():
            d = self.cfg.ema_decay if self.step >= self.cfg.warmup_steps else 0.0
            for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                e.lerp_(p, 1.0 - d)
        self.step += 1
        return float(denoising.detach()), None if label_loss is None else float(label_loss.detach())

    # -- the loop -------------------------------------------------------------------------------------

    def run(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        bodies: np.ndarray | None = None,
        *,
        state_dir: Path | None = None,
        time_budget_s: float | None = None,
        progress: TrainProgress | None = None,
        on_checkpoint: Callable[[Trainer], None] | None = None,
        on_stop: Callable[[Trainer], None] | None = None,
    ) -> None:
        """Train on ``images`` (N, H, W) in the model's intensity range until ``cfg.steps`` or the budget;
        ``labels`` (N,) 0/1 are each slice's vertebra label, needed when ``cfg.label_weight`` > 0; ``bodies``
        (N, H, W) bool its vertebral body, needed when ``cfg.body_weight`` != 1. ``on_checkpoint`` follows
        every saved checkpoint; ``on_stop`` follows the last save of a run that trained at least one step, so
        that where a run stopped (its steps or its budget spent) can be measured."""
        data = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None]
        if self.cfg.label_weight and (labels is None or len(labels) != len(data)):
            raise ValueError("label_weight > 0 needs one vertebra-level label per slice")
        if self.cfg.body_weight != 1.0 and (bodies is None or np.shape(bodies) != (len(data), *data.shape[2:])):
            raise ValueError("body_weight != 1 needs one vertebral body mask per slice, of the slices' size")
        masks = None if self.cfg.body_weight == 1.0 else torch.from_numpy(np.asarray(bodies, dtype=bool))[:, None]
        targets = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.float32))
        if data.shape[-1] != self.cfg.dae_config().image_size:
            raise ValueError(
                f"slices are {tuple(data.shape[-2:])} but the model expects {self.cfg.dae_config().image_size} px"
            )
        order_rng = np.random.default_rng(self.cfg.seed + self.step)
        start, losses, label_losses = time.monotonic(), [], []
        session_steps = 0
        session_start = start  # ``start`` moves on at every checkpoint (time banked); budget and rate use this
        while self.step < self.cfg.steps:
            if time_budget_s is not None and time.monotonic() - session_start >= time_budget_s:
                break
            idx = order_rng.integers(0, len(data), self.cfg.batch_size)
            denoising, label_loss = self.train_step(
                data[idx], None if targets is None else targets[idx], None if masks is None else masks[idx]
            )
            losses.append(denoising)
            if label_loss is not None:
                label_losses.append(label_loss)
            session_steps += 1
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                now = time.monotonic() - session_start
                rate = now / session_steps
                record = {
                    "step": self.step,
                    "steps": self.cfg.steps,
                    "loss": float(np.mean(losses)),
                    "elapsed_s": round(self.elapsed_s + time.monotonic() - start, 1),
                    "eta_s": round(_eta(rate * (self.cfg.steps - self.step), time_budget_s, now), 1),
                }
                if label_losses:
                    record["label_loss"] = float(np.mean(label_losses))
                self.history.append(record)
                losses, label_losses = [], []
                if progress is not None:
                    progress(record)
            if state_dir is not None and self.step % self.cfg.checkpoint_every == 0:
                self._bank_time(start)
                start = time.monotonic()
                self.save_state(state_dir)
                if on_checkpoint is not None:
                    on_checkpoint(self)
        self._bank_time(start)
        if state_dir is not None:
            self.save_state(state_dir)
        if on_stop is not None and session_steps:
            on_stop(self)

    def _bank_time(self, start: float) -> None:
        self.elapsed_s += time.monotonic() - start

    # -- resumable state ------------------------------------------------------------------------------

    def _named_parameters(self):
        """Every trained parameter by the name it has in the state files (the head's under HEAD_PREFIX)."""
        yield from self.model.named_parameters()
        for name, p in self.label_head.named_parameters():
            yield HEAD_PREFIX + name, p

    def save_state(self, state_dir: Path) -> None:
        """Write the state atomically (temp files renamed into place), one file per part.

        ``weights`` (float32) and ``state.json`` are enough to resume; ``ema`` and ``optimizer`` (Adam moments in
        bfloat16) make the resume exact. Only the first two need to travel between sessions (see ``resume``).
        """
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        index = {id(p): n for n, p in self._named_parameters()}
        moments, adam_steps = {}, {}
        for p, st in self.opt.state.items():
            name = index[id(p)]
            moments[f"m.{name}"] = st["exp_avg"].detach().to(torch.bfloat16).cpu().contiguous()
            moments[f"v.{name}"] = st["exp_avg_sq"].detach().to(torch.bfloat16).cpu().contiguous()
            adam_steps[name] = float(st["step"])
        weights = _float_tensors(self.model) | {HEAD_PREFIX + k: v for k, v in _float_tensors(self.label_head).items()}
        parts = {WEIGHTS_FILE: weights, EMA_FILE: _float_tensors(self.ema), OPTIMIZER_FILE: moments}
        for filename, tensors in parts.items():
            _save_atomically(tensors, state_dir / filename)
        meta = {
            "step": self.step,
            "elapsed_s": round(self.elapsed_s, 1),
            "config": self.cfg.to_dict(),
            "diffusion": self.diffusion.to_dict(),
            "history": self.history,
            "adam_steps": adam_steps,
            "rng": self._rng.get_state().tolist(),
        }
        with atomic_file(state_dir / "state.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")

    @classmethod
    def resume(cls, state_dir: Path, device: torch.device, ema_fallback: Path | None = None, **overrides) -> Trainer:
        """Continue a run; ``overrides`` may change e.g. ``steps`` (not the architecture).

        Without ``ema.safetensors`` the EMA is read from ``ema_fallback`` (the run's bundle weights, written at
        the same step) or restarted from the weights; without ``optimizer.safetensors`` Adam restarts with a
        fresh warm-up. Both are logged in the history so a learning curve shows where a resume was inexact.
        """
        state_dir = Path(state_dir)
        meta = json.loads((state_dir / "state.json").read_text(encoding="utf-8"))
        began = TrainConfig().to_dict() | meta["config"]  # a setting newer than the state: its default applied
        cfg_dict = began | overrides
        if cfg_dict["architecture"] != began["architecture"]:
            raise ValueError("the architecture of a run cannot change when resuming")
        trainer = cls(TrainConfig(**cfg_dict), DiffusionConfig.from_dict(meta["diffusion"]), device)
        changed = {k: v for k, v in overrides.items() if k != "steps" and began[k] != v}
        weights = load_file(str(state_dir / WEIGHTS_FILE))
        head = {k.removeprefix(HEAD_PREFIX): weights.pop(k) for k in list(weights) if k.startswith(HEAD_PREFIX)}
        trainer.model.load_state_dict(weights)
        if head:  # states written before the label head have none: it starts fresh
            trainer.label_head.load_state_dict(head)
        notes = []
        if (state_dir / EMA_FILE).is_file():
            trainer.ema.load_state_dict(load_file(str(state_dir / EMA_FILE)))
        elif ema_fallback is not None and Path(ema_fallback).is_file():
            trainer.ema.load_state_dict(load_file(str(ema_fallback)))
            notes.append("ema from bundle")
        else:
            trainer.ema.load_state_dict(trainer.model.state_dict())
            notes.append("ema restarted")
        trainer.step, trainer.elapsed_s, trainer.history = meta["step"], meta["elapsed_s"], meta["history"]
        if (state_dir / OPTIMIZER_FILE).is_file():
            moments = load_file(str(state_dir / OPTIMIZER_FILE))
            for name, p in trainer._named_parameters():
                if f"m.{name}" in moments:
                    trainer.opt.state[p] = {
                        "step": torch.tensor(meta["adam_steps"][name]),
                        "exp_avg": moments[f"m.{name}"].float().to(device),
                        "exp_avg_sq": moments[f"v.{name}"].float().to(device),
                    }
        else:
            trainer._warmup_from = trainer.step
            notes.append("optimizer restarted")
        notes += [f"{k} -> {v}" for k, v in changed.items()]
        if notes:
            trainer.history.append({"step": trainer.step, "resume": ", ".join(notes)})
        trainer._rng.set_state(torch.tensor(meta["rng"], dtype=torch.uint8))
        return trainer


RESUME_OVERRIDES = ("steps", "high_noise_fraction", "x0_weight_max", "lr_decay_from", "lr_final", "label_weight",
                    "label_dropout", "body_weight", "bf16")
"""Settings a resumed run takes from the new command (a curriculum, or float32 on a machine with native bf16); the
rest stays as the run began."""

WEIGHTS_FILE, EMA_FILE, OPTIMIZER_FILE = "weights.safetensors", "ema.safetensors", "optimizer.safetensors"
"""Parts of a training state; a compact copy between sessions keeps only the weights (see save_state)."""

HEAD_PREFIX = "label_head."
"""The label head's tensors in the weights file, beside the DAE's (the bundle never holds them)."""

EDIT_SLICES = "by type and vertebra"
"""How ``measure_edit`` picks its slices, recorded in each learning-curve point (older points took the first 32
validation slices with lesions; the model card marks them)."""

SNAPSHOT_DIR = "snapshots"
"""Optional EMA copies, one per learning-curve point, so the best point of a run can be exported after it."""


def snapshot_path(state_dir: str | Path, step: int) -> Path:
    return Path(state_dir) / SNAPSHOT_DIR / f"ema-{step}.safetensors"


def _snapshot_to_export(state_dir: Path, step: int, curve: list[dict]) -> Path:
    """The snapshot of ``step``, refused with what is there when it (or its learning-curve point) is missing."""
    path = snapshot_path(state_dir, step)
    if not path.is_file() or not any(point["step"] == step for point in curve):
        names = (f.name.removeprefix("ema-").removesuffix(".safetensors")
                 for f in (state_dir / SNAPSHOT_DIR).glob("ema-*.safetensors"))
        kept = sorted(int(n) for n in names if n.isdigit())
        raise InputError(f"no EMA snapshot of step {step} in {state_dir / SNAPSHOT_DIR} (kept: "
                         f"{', '.join(map(str, kept)) or 'none'}; snapshots are written by training with "
                         "--keep-snapshots)")
    return path


def _state_meta(state_dir: str | Path) -> dict | None:
    """A training state's state.json (step, config, history), or None where there is no state."""
    path = Path(state_dir) / "state.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _state_curve(state_dir: Path) -> list[dict]:
    """The learning curve a state has measured so far (empty before its first point)."""
    path = state_dir / "curve.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def load_snapshot(state_dir: str | Path, step: int) -> tuple[DiffusionAutoencoder, Preprocessing]:
    """The EMA network of one kept learning-curve point and how its slices were made: a run can be studied
    mid-way (e.g. ``benchmarks/latent_probe.py --snapshot``) without exporting a bundle, which costs a calibration."""
    state_dir = Path(state_dir)
    meta = _state_meta(state_dir)
    if meta is None:
        raise InputError(f"{state_dir}: no training state (state.json) there")
    config = meta["config"]
    path = _snapshot_to_export(state_dir, step, _state_curve(state_dir))
    if not config.get("preprocessing"):
        raise InputError(f"{state_dir}: the state does not record how its slices were made (written by an older "
                         "hideseek); export a bundle from it instead (hideseek train --export-snapshot)")
    model = DiffusionAutoencoder(TrainConfig(**(TrainConfig().to_dict() | config)).dae_config()).eval()
    model.load_state_dict(load_file(str(path)))
    return model.requires_grad_(False), Preprocessing.from_dict(config["preprocessing"])


def _bundle_ema(out_dir: str | Path, state_dir: Path) -> Path | None:
    """The bundle's weights when the bundle was written at the state's step: then they are exactly its EMA."""
    try:
        manifest = read_bundle_manifest(out_dir)
    except BundleError:
        return None
    step = _state_meta(state_dir)["step"]
    weights = Path(out_dir) / manifest["weights"]["file"]
    return weights if manifest["version"] == str(step) and weights.is_file() else None


def _check_both_classes(slices: SliceSet) -> None:
    """Refuse before hours of training what the classifier and the validation split would refuse at the end."""
    counts = [len(np.unique(slices.vertebra[slices.malignant == label])) for label in (0, 1)]
    if min(counts) < 2:
        raise InputError(
            f"training needs at least 2 healthy and 2 malignant vertebrae (one of each is held out for validation); "
            f"the data has {counts[0]} healthy and {counts[1]} malignant"
        )


def check_resume_preprocessing(state_dir: str | Path, preprocessing: Preprocessing) -> None:
    """Refuse to resume a run on slices normalised otherwise than it began: the model would learn another image."""
    meta = _state_meta(state_dir)
    recorded = meta["config"].get("preprocessing") if meta else None
    began = Preprocessing.from_dict(recorded) if recorded else None
    if began is not None and began != preprocessing:
        before, given = asdict(began), asdict(preprocessing)
        differ = ", ".join(f"{k} {before[k]!r} (now {given[k]!r})" for k in given if given[k] != before[k])
        raise InputError(f"--state {state_dir}: this run began with other slice preprocessing: {differ}; "
                         "resume it with the settings it began with (e.g. the same --intensity), or start a new state")


def _commands_behind(history: list[dict], step: int, export_command: str | None) -> list[str]:
    """The command of every run that led to the weights of ``step``, each with the step it started from.

    ``export_command`` (exporting an EMA snapshot) is listed as what it is, after the runs that started before
    that step: runs of the state after the snapshot did not shape it."""
    runs = [f"{h['run']}   # from step {h['step']}" for h in history
            if "run" in h and (export_command is None or h["step"] < step)]
    if export_command is None:
        return runs
    return [*runs, f"{export_command}   # exports the EMA snapshot of step {step}, no training"]


def _eta(to_the_last_step: float, budget_s: float | None, elapsed_s: float) -> float:
    """Seconds left: to the last step, or to the end of the time budget when that comes first."""
    return to_the_last_step if budget_s is None else max(0.0, min(to_the_last_step, budget_s - elapsed_s))


class _TuningClock:
    """ETA of the export's candidate tuning over all shortlisted edits. Each edit first decodes its own healthy
    edit (a fixed cost), then scores its grid settings (a cost per setting). The two are timed apart: one pace
    over both counted the first decode against a single setting and promised 40 min for a 12-minute tuning."""

    def __init__(self, progress: TrainProgress, edits: int, clock: Callable[[], float] = time.monotonic):
        self.progress, self.edits, self.clock = progress, edits, clock
        self.last = clock()  # the previous report, or the start of the first edit
        self.openings: list[float] = []  # an edit's start to its first setting: its decode and one setting
        self.settings: list[float] = []  # one setting after another within an edit

    def reporter(self, edit: int) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            now = self.clock()
            (self.openings if done == 1 else self.settings).append(now - self.last)
            self.last = now
            eta = None
            if self.settings:  # from an edit's second setting on
                per_setting = float(np.mean(self.settings))
                decode = max(0.0, float(np.mean(self.openings)) - per_setting)
                eta = round(per_setting * (total - done) + (self.edits - 1 - edit) * (decode + per_setting * total), 1)
            self.progress({"export": "tuning", "done": edit * total + done, "total": self.edits * total,
                           "eta_s": eta})
        return report


def _save_atomically(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write safetensors so that an interrupted write never leaves a half file."""
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp))


def _float_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}


# -- from slices to a bundle ----------------------------------------------------------------------------------


def split_by_vertebra(vertebra: np.ndarray, malignant: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Slices held out for validation: whole vertebrae (never slices of one vertebra apart), from each class."""
    rng = np.random.default_rng(seed)
    held = []
    for label in (0, 1):
        ids = np.unique(vertebra[malignant == label])
        if len(ids) > 1:
            held += list(rng.choice(ids, size=max(1, round(len(ids) * fraction)), replace=False))
    return np.isin(vertebra, held)


@torch.inference_mode()
def encode_latents(model: DiffusionAutoencoder, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    device = next(model.parameters()).device
    out = [
        model.encode(torch.from_numpy(images[i : i + batch])[:, None].to(device)).float().cpu()
        for i in range(0, len(images), batch)
    ]
    return torch.cat(out) if out else torch.zeros(0)


def measure_edit(
    model: DiffusionAutoencoder,
    diffusion: DiffusionConfig,
    classifier: LatentClassifier,
    val: SliceSet,
    settings: AttributionSettings,
    max_slices: int = 32,
) -> dict[str, float]:
    """Edit efficacy on validation slices that carry true lesions (the number to watch while training), drawn by
    lesion type and vertebra (``SliceSet.lesion_sample``; ``edit_slices`` in the result says so)."""
    has = val.lesion_sample(max_slices)
    if has.size == 0:
        return {}
    method = HideAndSeek(model, diffusion, classifier, settings)
    results = method.run(val.images[has], val.bodies[has])
    recon = np.stack([r.recon for r in results])
    edit = np.stack([r.edit for r in results])
    out = edit_efficacy(val.images[has], recon, edit, val.lesions[has], val.bodies[has], LESION_TYPES)
    z_edit = encode_latents(model, edit.astype(np.float32))
    out["p_reencoded_edit"] = float(classifier.probability(z_edit).mean())
    out["slices"] = int(has.size)
    return json_measurements(out) | {"edit_slices": EDIT_SLICES}


def learning_point(model: DiffusionAutoencoder, diffusion: DiffusionConfig, train: SliceSet, val: SliceSet, *,
                   C: float | None, seed: int, bf16: bool = True) -> dict:
    """One learning-curve point: the AUC on ``val`` of a classifier fitted on ``train``'s codes, and its edit on
    ``val``'s lesions (20/20 DDIM steps, step × 1; ``bf16``: autocast where native). Also measures a model on
    vertebrae it was not trained with."""
    clf, info = fit_classifier(model, train, C=C, seed=seed)
    val_auc = roc_auc(val.malignant, clf.probability(encode_latents(model, val.images).double()).numpy())
    quick = settings_for("fast", encode_steps=20, decode_steps=20, autocast_bf16=bf16)
    return {"val_auc": round(val_auc, 4), "C": info["C"]} | measure_edit(model, diffusion, clf, val, quick)


EDIT_DIRECTIONS = (NORMAL, CLASS_MEANS, KIND_MEANS)


def check_edit_direction(direction: str, train: SliceSet, val: SliceSet) -> None:
    """Refuse, before any training, an edit direction the export could not fit on ``train`` or calibrate on
    ``val`` (its validation vertebrae): otherwise the option would be silently moot."""
    if direction not in EDIT_DIRECTIONS:
        raise InputError(f"unknown edit direction {direction!r}: use one of {', '.join(EDIT_DIRECTIONS)}")
    if not (val.lesions > 0).any():
        where = "this data has none" if not (train.lesions > 0).any() else (
            f"none of the {len(np.unique(val.vertebra))} validation vertebrae (held out by the seed) has any")
        raise InputError(f"choosing the edit direction needs lesion truth to calibrate it on (e.g. phantoms); {where}")
    if direction == KIND_MEANS and any(not only.any() for only in _one_type_vertebrae(train).values()):
        raise InputError("an edit per lesion type needs malignant training vertebrae with lytic lesions only and "
                         "with blastic lesions only in the lesion truth; this data lacks one of them")


def _one_type_vertebrae(data: SliceSet) -> dict[str, np.ndarray]:
    """Per lesion type, which slices belong to malignant vertebrae whose lesions are all of that type."""
    has = {name: data.vertebra_has(kind) for kind, name in LESION_TYPES.items()}
    return {name: (data.malignant == 1) & has[name] & ~np.any([v for k, v in has.items() if k != name], axis=0)
            for name in KINDS}


def kind_mean_directions(z: np.ndarray, data: SliceSet) -> dict[str, np.ndarray] | None:
    """Per lesion type, the mean code of vertebrae with lesions of that type only minus that of healthy vertebrae
    (``classifier.kind_directions``); None unless both types have such vertebrae.

    The class means of all malignant vertebrae move towards whichever type dominates z (blastic, for the demo
    model: BENCHMARKS.md section 3); those of lytic-only vertebrae were a lytic edit in the same z."""
    healthy = data.malignant == 0
    directions = {}
    for name, only in _one_type_vertebrae(data).items():
        if not only.any() or not healthy.any():
            return None
        keep = healthy | only
        directions[name] = class_mean_direction(z[keep], only[keep])
    return directions


def fit_classifier(model: DiffusionAutoencoder, data: SliceSet, *, C: float | None, seed: int,
                   z: np.ndarray | None = None):
    """The latent classifier of ``model`` on ``data`` (``z``: its latents, when already encoded)."""
    z = encode_latents(model, data.images).double().numpy() if z is None else z
    return fit_latent_classifier(z, data.malignant.astype(int), C=C, class_weight="balanced", seed=seed)


def train_bundle(
    slices: SliceSet,
    out_dir: str | Path,
    state_dir: str | Path,
    cfg: TrainConfig,
    preprocessing: Preprocessing,
    *,
    device: torch.device,
    time_budget_s: float | None = None,
    classifier_C: float | None = None,
    eval_every: int = 1000,
    name: str = "hideseek-model",
    provenance: dict | None = None,
    progress: TrainProgress | None = None,
    overwrite: bool = False,
    card_text: dict | None = None,
    calibrate: bool = True,
    keep_snapshots: bool = False,
    from_snapshot: int | None = None,
    edit_direction: str | None = None,
) -> Path:
    """Train (or resume) the DAE, fit the latent classifier on its codes and write a bundle with a model card.

    ``card_text`` sets the card's prose (summary, intended_use, licence, limitations) and may add provenance,
    e.g. the commands that made the data; the command of every training run is kept in the state's history and
    listed after them, so the card of a model trained over several sessions names all of them. A time budget of
    0 re-exports the bundle from the saved state without training. ``calibrate`` chooses the classifier's C
    (the given one or ten times stronger) and the edit step on validation lesions (calibration.py).
    ``keep_snapshots`` also saves the EMA at every learning-curve point (``snapshot_path``); ``from_snapshot``
    exports the one of that step instead of training, leaving the state as it is: the last step of a run is
    not always its best. ``edit_direction`` (one of ``EDIT_DIRECTIONS``) limits the calibration to edits along
    that direction; by default every direction the data allows competes.
    """
    _check_both_classes(slices)
    held = split_by_vertebra(slices.vertebra, slices.malignant, 0.1, cfg.seed)
    train, val = slices.subset(~held), slices.subset(held)
    if edit_direction is not None:
        if not calibrate:
            raise ValueError("edit_direction chooses among calibrated edits: it needs calibrate=True")
        check_edit_direction(edit_direction, train, val)
    check_resume_preprocessing(state_dir, preprocessing)
    check_replaceable(out_dir, overwrite)  # not after hours of training and export
    state_dir = Path(state_dir)
    if from_snapshot is not None and not (state_dir / "state.json").is_file():
        raise InputError(f"--state {state_dir}: no training state to export a snapshot from")
    text = dict(card_text or {})
    provenance = (provenance or {}) | text.pop("provenance", {})
    diffusion = DiffusionConfig()
    if (state_dir / "state.json").is_file():
        changeable = {name: getattr(cfg, name) for name in RESUME_OVERRIDES}
        trainer = Trainer.resume(state_dir, device, ema_fallback=_bundle_ema(out_dir, state_dir), **changeable)
    else:
        trainer = Trainer(cfg, diffusion, device)
    trainer.cfg = replace(trainer.cfg, preprocessing=preprocessing.to_dict())  # recorded, also in older states
    if "command" in provenance and from_snapshot is None:  # every run of a training is in its history (card)
        trainer.history.append({"step": trainer.step, "run": provenance["command"]})
    curve = _state_curve(state_dir)
    val_set = val.vertebra_fingerprint()  # a run resumed on other data measures on other vertebrae (model card)

    def evaluate(t: Trainer, last: bool = False) -> None:
        """A learning-curve point every ``eval_every`` steps and where the run stops, once per step."""
        if (t.step % eval_every and not last) or (curve and curve[-1]["step"] == t.step):
            return
        point = {"step": t.step, "elapsed_s": round(t.elapsed_s, 1)}
        point |= learning_point(t.ema, diffusion, train, val, C=classifier_C, seed=cfg.seed,
                                bf16=t.cfg.bf16) | {"val_set": val_set}
        curve.append(point)
        (state_dir / "curve.json").write_text(json.dumps(curve, indent=1), encoding="utf-8")
        if keep_snapshots:
            snapshot_path(state_dir, t.step).parent.mkdir(exist_ok=True)
            _save_atomically(_float_tensors(t.ema), snapshot_path(state_dir, t.step))
        if progress is not None:
            progress({"eval": point})

    if from_snapshot is None:
        trainer.run(
            train.images, train.malignant, train.bodies, state_dir=state_dir, time_budget_s=time_budget_s,
            progress=progress, on_checkpoint=evaluate, on_stop=lambda t: evaluate(t, last=True),
        )
        step, elapsed_s = trainer.step, trainer.elapsed_s
    else:
        trainer.ema.load_state_dict(load_file(str(_snapshot_to_export(state_dir, from_snapshot, curve))))
        curve = [point for point in curve if point["step"] <= from_snapshot]
        step, elapsed_s = from_snapshot, curve[-1]["elapsed_s"]

    def phase(text: str) -> None:
        """The export runs for minutes (11 to 23 measured on a 2-core CPU) after training: say what it does."""
        if progress is not None:
            progress({"export": text})

    phase(f"encoding {len(train)} training slices and fitting the latent classifier")
    z_train = encode_latents(trainer.ema, train.images).double().numpy()
    classifier, fit_info = fit_classifier(trainer.ema, train, C=classifier_C, seed=cfg.seed, z=z_train)
    method: dict = {"default_preset": "fast"}
    metrics: dict = {"learning_curve": curve}
    if calibrate and (val.lesions > 0).any():
        stronger = fit_info["C"] / 10
        fits = {fit_info["C"]: (classifier, fit_info),
                stronger: fit_classifier(trainer.ema, train, C=stronger, seed=cfg.seed, z=z_train)}
        means = class_mean_direction(z_train, train.malignant)
        classifiers = {(C, NORMAL): f[0] for C, f in fits.items()}
        # On codes that barely separate the classes the mean difference may not raise the score: no such edit.
        classifiers |= {(C, CLASS_MEANS): replace(f[0], edit_direction=means) for C, f in fits.items()
                        if f[0].slope(means) > 0}
        if (kinds := kind_mean_directions(z_train, train)) is not None:
            classifiers |= {(C, KIND_MEANS): replace(f[0], kind_directions=kinds) for C, f in fits.items()
                            if all(f[0].slope(d) > 0 for d in kinds.values())}
        if edit_direction is not None:
            classifiers = {key: clf for key, clf in classifiers.items() if key[1] == edit_direction}
            if not classifiers:
                raise InputError(f"no classifier raises P(malignant) along the {edit_direction}: this model's codes "
                                 "cannot be edited that way; export without --edit-direction")
        phase("calibrating the edit strength on validation lesions")
        cal = calibrate_edit(trainer.ema, diffusion, classifiers, val)
        C, direction, scale = cal.shortlist[0]
        chosen = {"edit_step_scale": scale}
        calibration = {"table": cal.table,
                       "shortlist": [{"C": c, "direction": d, "step_scale": k} for c, d, k in cal.shortlist]}
        mid = val.subset(val.middle_slices())
        if (mid.lesions > 0).any():
            # Each shortlisted edit gets its own candidate tuning; the best F1 (then fewest mimics) wins, ties
            # going to the earlier, more lesion-specific edit.
            phase(f"tuning the candidates of {len(cal.shortlist)} shortlisted edits on {len(mid)} validation slices")
            fast = settings_for("fast", autocast_bf16=trainer.cfg.bf16)
            inverted = HideAndSeek(trainer.ema, diffusion, classifier, fast).invert(mid.images)  # one for all
            clock = None if progress is None else _TuningClock(progress, len(cal.shortlist))

            def reporter(edit: int) -> Callable[[int, int], None] | None:
                return None if clock is None else clock.reporter(edit)

            tunings = {(c, d, k): tune_candidates(HideAndSeek(trainer.ema, diffusion, classifiers[c, d],
                                                              fast.with_overrides(edit_step_scale=k)),
                                                  inverted, mid.bodies, mid.lesions, mid.mimics, progress=reporter(i))
                       for i, (c, d, k) in enumerate(cal.shortlist)}
            calibration["shortlist"] = [{"C": c, "direction": d, "step_scale": k, "f1": t.f1}
                                        for (c, d, k), t in tunings.items()]
            (C, direction, scale), tuning = min(
                tunings.items(), key=lambda kv: selection_key(kv[1].f1, kv[1].table[0].get("mimic_fp", np.nan)))
            chosen = {"edit_step_scale": scale} | tuning.settings
            metrics["candidate_tuning"] = {"chosen": tuning.settings, "f1": tuning.f1, "slices": tuning.slices,
                                           "default_f1": tuning.default_f1, "preset": "fast",
                                           "best": tuning.table[:10]}
        else:
            metrics["candidate_tuning"] = {"skipped": "no lesion in the middle slices of the validation vertebrae"}
        classifier, fit_info = classifiers[C, direction], fits[C][1]
        metrics["edit_calibration"] = {"chosen": {"C": C, "direction": direction, "step_scale": scale}} | calibration
        method["presets"] = {preset: chosen for preset in ("fast", "published")}
    card = {
        "summary": f"Diffusion autoencoder + latent classifier trained with hideseek {__version__}.",
        "intended_use": "Research use only; not a medical device. Validate on your own data before relying on it.",
        "training": {
            "config": cfg.to_dict(),
            "steps": step,
            "elapsed_s": round(elapsed_s, 1),
            "device": str(device),
            "slices_train": len(train),
            "slices_val": len(val),
            "vertebrae": len(np.unique(slices.vertebra)),
            "malignant_fraction": round(float(slices.malignant.mean()), 3),
            "loss": [h for h in trainer.history if h["step"] <= step][-20:],
        },
        "metrics": metrics,
        "provenance": provenance | {"commands": provenance.get("commands", []) + _commands_behind(
            trainer.history, step, provenance.get("command") if from_snapshot is not None else None)},
    } | text
    return save_bundle(
        out_dir,
        trainer.ema,
        diffusion,
        preprocessing,
        classifier,
        name=name,
        version=str(step),
        method=method,
        card=card,
        fit_info=fit_info,
        overwrite=overwrite,
        extra=write_model_card,
    )
