"""Hide-and-Seek Attribution on 2-D vertebra slices (Atad et al., arXiv 2512.06849).

1. encode each slice to its semantic code z and (DDIM) noise code x_T, and reconstruct it;
2. move z along the latent classifier's normal to P(malignant) = target and decode with the same x_T:
   the *healthy edit* (a model may carry one edit direction per lesion type: the lytic edit's brightening and
   the blastic edit's darkening then make up the healthy edit, ``merge_kind_edits``);
3. lytic candidates = where the edit is brighter than the reconstruction, blastic = where it is darker,
   inside the vertebral body, each above the median of its positive values, split into components (a model's
   bundle may keep them a few pixels inside the body outline and above an absolute change: an imperfect edit
   redraws the cortical shell of every vertebra);
4. hide-and-seek: reveal one candidate from the reconstruction, replace all other candidates by the edit,
   (optionally) project the composite back through the DAE, re-encode, and measure the candidate's share
   Δ = (p − p_healthy) / (p_malignant − p_healthy) of the malignant score; keep Δ above a threshold.

All slices of a call and all their candidates run in network batches; nothing here knows about volumes. Steps 1-2
(``edit``) and 3-4 (``seek``) are separate so that candidate settings can be tuned on one set of edits, and step 1
(``invert``) can serve several edits of the same slices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from scipy import ndimage

from .classifier import LatentClassifier
from .device import bf16_is_fast
from .network import DiffusionAutoencoder
from .sampler import DDIMSampler, DiffusionConfig

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)`` with done/total counted in network passes; raise ``Cancelled`` to stop."""

LYTIC, BLASTIC = 1, 2
LESION_TYPES = {LYTIC: "lytic", BLASTIC: "blastic"}


@dataclass(frozen=True)
class AttributionSettings:
    """Every knob of the method. ``PRESETS`` holds the named combinations."""

    encode_steps: int = 250  # DDIM steps x0 -> x_T
    decode_steps: int = 100  # DDIM steps x_T -> x0 (reconstruction and edit)
    target_probability: float = 1e-5  # P(malignant) of the healthy edit's latent
    edit_step_scale: float = 1.0  # >1 moves past the target along the normal
    candidate_quantile: float = 0.5  # threshold = this quantile of a map's positive values
    body_margin_px: int = 0  # candidates stay this many pixels inside the body outline
    min_change: float = 0.0  # candidates need |edit - recon| above this (model intensity units)
    min_component_px: int = 5  # smaller candidate components are not scored (they stay hidden)
    connectivity: int = 4  # 4 or 8 neighbours for candidate components
    harmonize: bool = True  # DAE round trip of each composite before re-encoding (the published way)
    rescore_encode_steps: int | None = None  # round-trip steps; None = encode_steps
    rescore_decode_steps: int | None = None  # None = decode_steps
    delta_threshold: float = 0.5  # keep candidates with Δ strictly above
    gate_probability: float | None = None  # slices with P(malignant) at or below this are not searched
    batch_size: int = 16  # images per network batch
    autocast_bf16: bool = False  # bfloat16 autocast for the UNet where the device runs it natively (device.py)

    def __post_init__(self) -> None:
        if not 0.0 < self.target_probability < 1.0:
            raise ValueError(f"target_probability must be in (0, 1), got {self.target_probability}")
        if not 0.0 <= self.candidate_quantile < 1.0:
            raise ValueError(f"candidate_quantile must be in [0, 1), got {self.candidate_quantile}")
        if self.connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {self.connectivity}")
        if self.batch_size < 1 or self.min_component_px < 1:
            raise ValueError("batch_size and min_component_px must be positive")
        if self.body_margin_px < 0 or self.min_change < 0:
            raise ValueError("body_margin_px and min_change must not be negative")
        if not 0.0 <= self.delta_threshold <= 1.0:
            raise ValueError(f"delta_threshold must be in [0, 1] (a share of the malignant score), "
                             f"got {self.delta_threshold}")
        if self.gate_probability is not None and not 0.0 <= self.gate_probability < 1.0:
            raise ValueError(f"gate_probability must be in [0, 1) (0 searches every slice), "
                             f"got {self.gate_probability}")
        if min(self.ddim_steps()) < 1:
            raise ValueError(f"DDIM step counts must be positive, got {self.ddim_steps()}")

    def ddim_steps(self) -> tuple[int, ...]:
        """Every DDIM step count the method will run (inversion, generation, and the round trip's)."""
        return (self.encode_steps, self.decode_steps, self.rescore_encode_steps or self.encode_steps,
                self.rescore_decode_steps or self.decode_steps)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, **overrides) -> AttributionSettings:
        unknown = sorted(set(overrides) - set(asdict(self)))
        if unknown:
            raise ValueError(f"unknown attribution settings: {', '.join(unknown)}")
        return replace(self, **overrides)


PRESETS: dict[str, AttributionSettings] = {
    # Exactly the authors' demo: 250/100 DDIM steps and a full DAE round trip for every candidate.
    "published": AttributionSettings(),
    # Fewer steps and encoder-only scoring of the composites; see BENCHMARKS.md for its cost and quality.
    "fast": AttributionSettings(encode_steps=20, decode_steps=20, harmonize=False, autocast_bf16=True),
}


def settings_for(preset: str, **overrides) -> AttributionSettings:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[preset].with_overrides(**overrides)


@dataclass
class Candidate:
    """One connected region of a difference map and its hide-and-seek score."""

    kind: int  # LYTIC or BLASTIC
    mask: np.ndarray  # (H, W) bool
    delta: float = float("nan")
    probability: float = float("nan")  # P(malignant) of the composite that reveals only this region

    @property
    def area_px(self) -> int:
        return int(self.mask.sum())

    @property
    def centroid(self) -> tuple[float, float]:
        rows, cols = np.nonzero(self.mask)
        return float(rows.mean()), float(cols.mean())

    @property
    def type_name(self) -> str:
        return LESION_TYPES[self.kind]


@dataclass
class SliceResult:
    """Everything the method computed for one slice; ``lesions`` are the kept candidates."""

    image: np.ndarray  # the normalised input
    recon: np.ndarray
    edit: np.ndarray
    p_malignant: float  # P(malignant) of the input's latent
    p_healthy: float  # P(malignant) of the edited latent (the target, up to rounding)
    candidate_mask: np.ndarray  # (H, W) bool: every candidate pixel, small components included
    candidates: list[Candidate] = field(default_factory=list)
    delta_threshold: float = 0.5

    @property
    def lesions(self) -> list[Candidate]:
        return self.kept(self.delta_threshold)

    def kept(self, delta_threshold: float) -> list[Candidate]:
        return [c for c in self.candidates if c.delta > delta_threshold]

    def label_map(self, delta_threshold: float | None = None) -> np.ndarray:
        """(H, W) uint8: 0 background, 1 lytic, 2 blastic (kept lesions; another Δ threshold may be given)."""
        out = np.zeros(self.recon.shape, dtype=np.uint8)
        for lesion in self.kept(self.delta_threshold if delta_threshold is None else delta_threshold):
            out[lesion.mask] = lesion.kind
        return out


def edited_latents(
    classifier: LatentClassifier, z: torch.Tensor, target_probability: float, step_scale: float
) -> dict[int | None, torch.Tensor]:
    """The healthy edit's latent ({None: z_edit}), or one per lesion type ({LYTIC: .., BLASTIC: ..}) when the
    classifier carries ``kind_directions``; each until the classifier says ``target_probability``."""
    if classifier.kind_directions is None:
        return {None: classifier.edit(z, target_probability, step_scale=step_scale)}
    return {kind: classifier.for_kind(name).edit(z, target_probability, step_scale=step_scale)
            for kind, name in LESION_TYPES.items()}


def merge_kind_edits(recon: torch.Tensor, edits: dict[int | None, torch.Tensor]) -> torch.Tensor:
    """One healthy edit from the decoded edits of ``edited_latents``: with one per lesion type, the lytic edit
    where it brightens the reconstruction and the blastic edit where it darkens it, so that each type's
    candidates (``candidate_maps``) come from the edit that was made to remove that type."""
    if None in edits:
        return edits[None]
    return recon + (edits[LYTIC] - recon).clamp(min=0) + (edits[BLASTIC] - recon).clamp(max=0)


def candidate_maps(
    recon: np.ndarray, edit: np.ndarray, body: np.ndarray, quantile: float
) -> tuple[np.ndarray, np.ndarray]:
    """Lytic (edit brighter) and blastic (edit darker) candidate masks inside the body."""
    diff = (edit - recon) * body
    lytic = _above_quantile(np.clip(diff, 0, None), quantile)
    blastic = _above_quantile(np.clip(-diff, 0, None), quantile)
    return lytic, blastic


def search_region(
    body: np.ndarray, recon: np.ndarray, edit: np.ndarray, margin_px: int, min_change: float
) -> np.ndarray:
    """Where candidates may lie: the body shrunk by ``margin_px``, where the edit changed more than ``min_change``."""
    inner = ndimage.binary_erosion(body, iterations=margin_px) if margin_px and body.any() else body
    return inner & (np.abs(edit - recon) > min_change)


def _above_quantile(values: np.ndarray, quantile: float) -> np.ndarray:
    positive = values[values > 0]
    if positive.size == 0:
        return np.zeros(values.shape, dtype=bool)
    return values > np.quantile(positive, quantile)


def split_components(mask: np.ndarray, connectivity: int) -> list[np.ndarray]:
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    labels, n = ndimage.label(mask, structure=structure)
    return [labels == i for i in range(1, n + 1)]


def composite(recon: torch.Tensor, edit: torch.Tensor, hide: torch.Tensor) -> torch.Tensor:
    """The reconstruction with every ``hide`` pixel replaced by the healthy edit."""
    return torch.where(hide, edit, recon)


def normalized_delta(p: np.ndarray, p_healthy: np.ndarray, p_malignant: np.ndarray) -> np.ndarray:
    """Share of the malignant score that a revealed region restores (1 = all of it, 0 = none)."""
    return (p - p_healthy) / (p_malignant - p_healthy + 1e-8)


@dataclass
class Inversion:
    """Step 1 for a batch of slices, which does not depend on the classifier: every edit of them starts here."""

    images: np.ndarray  # (N, H, W) the normalised inputs
    z: torch.Tensor  # (N, D) semantic codes
    xT: torch.Tensor  # (N, 1, H, W) DDIM noise codes
    recon: torch.Tensor  # (N, 1, H, W) reconstructions
    ddim_steps: tuple[int, int]  # (encode, decode) steps it was made with


@dataclass
class Edits:
    """Steps 1-2 for a batch of slices: what every candidate setting of steps 3-4 starts from."""

    images: np.ndarray  # (N, H, W) the normalised inputs
    recon: torch.Tensor  # (N, 1, H, W) on the model's device
    edit: torch.Tensor  # (N, 1, H, W); equals recon where not active
    p_malignant: np.ndarray  # (N,)
    p_healthy: np.ndarray  # (N,)
    active: np.ndarray  # (N,) bool: slices that were edited


class HideAndSeek:
    """The method bound to one model; ``run`` takes normalised slices and body masks."""

    def __init__(
        self,
        dae: DiffusionAutoencoder,
        diffusion: DiffusionConfig,
        classifier: LatentClassifier,
        settings: AttributionSettings | None = None,
    ) -> None:
        self.dae = dae.eval()
        self.diffusion = diffusion
        self.classifier = classifier
        self.settings = settings or PRESETS["published"]
        s = self.settings
        self._enc = DDIMSampler(diffusion, s.encode_steps)
        self._dec = DDIMSampler(diffusion, s.decode_steps)
        self._re_enc = DDIMSampler(diffusion, s.rescore_encode_steps or s.encode_steps)
        self._re_dec = DDIMSampler(diffusion, s.rescore_decode_steps or s.decode_steps)

    @property
    def device(self) -> torch.device:
        return next(self.dae.parameters()).device

    # -- network passes, batched --------------------------------------------------------------------

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        bf16 = self.settings.autocast_bf16 and bf16_is_fast(x.device.type)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            return self.dae(x, t, cond).float()

    def _batches(self, n: int) -> Iterator[slice]:
        for start in range(0, n, self.settings.batch_size):
            yield slice(start, min(start + self.settings.batch_size, n))

    def _encode_z(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.dae.encode(x[b]) for b in self._batches(len(x))]) if len(x) else x.new_zeros(0)

    def _ddim(
        self, sampler: DDIMSampler, encode: bool, x: torch.Tensor, z: torch.Tensor, tick: Callable[[int], None]
    ) -> torch.Tensor:
        run = sampler.encode if encode else sampler.decode
        out = []
        for b in self._batches(len(x)):
            size = b.stop - b.start
            out.append(run(self._denoise, x[b], z[b], callback=lambda _i, _n, k=size: tick(k)))
        return torch.cat(out)

    # -- the method ---------------------------------------------------------------------------------------

    def run(self, images: np.ndarray, bodies: np.ndarray, progress: Progress | None = None) -> list[SliceResult]:
        """Attribute every slice: ``images`` (N, H, W) in the model's intensity range, ``bodies`` the same bool."""
        images = np.asarray(images, dtype=np.float32)
        bodies = np.asarray(bodies, dtype=bool)
        if images.ndim != 3 or images.shape != bodies.shape:
            raise ValueError(
                f"need images and body masks of the same (N, H, W) shape, got {images.shape} and {bodies.shape}"
            )
        counter = _Counter(progress, total=len(images) * (self._enc.steps + 2 * self._dec.steps))
        return self.seek(self.edit(images, counter), bodies, counter)

    @torch.inference_mode()
    def invert(self, images: np.ndarray, counter: _Counter | None = None) -> Inversion:
        """Step 1 alone, for several edits of the same slices (e.g. with other classifiers or edit steps)."""
        x = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None].to(self.device)
        return self._invert(x, self._encode_z(x), counter or _Counter(None, 0))

    def _invert(self, x: torch.Tensor, z: torch.Tensor, counter: _Counter) -> Inversion:
        counter.stage = "encoding"
        xT = self._ddim(self._enc, True, x, z, counter.tick)
        counter.stage = "reconstructing"
        recon = self._ddim(self._dec, False, xT, z, counter.tick)
        return Inversion(x[:, 0].cpu().numpy(), z, xT, recon, (self._enc.steps, self._dec.steps))

    @torch.inference_mode()
    def edit(self, images: np.ndarray | Inversion, counter: _Counter | None = None) -> Edits:
        """Steps 1-2: reconstruction and healthy edit of (N, H, W) slices in the model's intensity range, or of
        their ``invert`` output (made with the same DDIM steps), which is then not computed again."""
        s = self.settings
        counter = counter or _Counter(None, 0)
        if isinstance(images, Inversion):
            inversion = images
            if inversion.ddim_steps != (self._enc.steps, self._dec.steps):
                raise ValueError(f"the inversion was made with {inversion.ddim_steps} DDIM steps (encode, decode), "
                                 f"this method runs {(self._enc.steps, self._dec.steps)}")
            z = inversion.z
        else:
            inversion = None
            x = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None].to(self.device)
            z = self._encode_z(x)
        n = len(z)
        p_malignant = self.classifier.probability(z).cpu().numpy()
        # A slice already as healthy as the target (or below the gate) is not edited: it has no candidates.
        active = torch.from_numpy(p_malignant > max(s.target_probability, s.gate_probability or 0.0))
        z_edits = edited_latents(self.classifier, z.double(), s.target_probability, s.edit_step_scale)
        on = active.to(z.device)[:, None]
        # Δ's healthy end: with one edit per lesion type, the higher of the two edited latents' scores (both
        # are the target at edit step × 1).
        p_healthy = np.max([self.classifier.probability(torch.where(on, z_edit, z.double())).cpu().numpy()
                            for z_edit in z_edits.values()], axis=0)
        n_active = int(active.sum())
        counter.add_total(-(n - n_active) * self._dec.steps + (len(z_edits) - 1) * n_active * self._dec.steps)

        inversion = inversion or self._invert(x, z, counter)
        counter.stage = "healthy edit"
        edit = inversion.recon.clone()
        if active.any():
            on = active.to(self.device)
            recon = inversion.recon[on]
            decoded = {kind: self._ddim(self._dec, False, inversion.xT[on], z_edit[on].to(z.dtype), counter.tick)
                       for kind, z_edit in z_edits.items()}
            edit[on] = merge_kind_edits(recon, decoded)
        return Edits(inversion.images, inversion.recon, edit, p_malignant, p_healthy, active.numpy())

    @torch.inference_mode()
    def seek(self, edits: Edits, bodies: np.ndarray, counter: _Counter | None = None) -> list[SliceResult]:
        """Steps 3-4 on the output of ``edit`` (made by a method with the same edit settings)."""
        s = self.settings
        results = []
        for i in range(len(edits.images)):
            r, e = edits.recon[i, 0].cpu().numpy(), edits.edit[i, 0].cpu().numpy()
            region = search_region(bodies[i] & bool(edits.active[i]), r, e, s.body_margin_px, s.min_change)
            lytic, blastic = candidate_maps(r, e, region, s.candidate_quantile)
            cands = [
                Candidate(kind, m)
                for kind, mask in ((LYTIC, lytic), (BLASTIC, blastic))
                for m in split_components(mask, s.connectivity)
                if m.sum() >= s.min_component_px
            ]
            results.append(
                SliceResult(
                    edits.images[i],
                    r,
                    e,
                    float(edits.p_malignant[i]),
                    float(edits.p_healthy[i]),
                    lytic | blastic,
                    cands,
                    s.delta_threshold,
                )
            )
        self._score(results, edits, counter or _Counter(None, 0))
        return results

    def _score(self, results: list[SliceResult], edits: Edits, counter: _Counter) -> None:
        """Δ of every candidate of every slice, all composites batched together."""
        owners = [(i, c) for i, res in enumerate(results) for c in res.candidates]
        if not owners:
            return
        per_pass = self._re_enc.steps + self._re_dec.steps if self.settings.harmonize else 0
        counter.add_total(len(owners) * per_pass)
        counter.stage = "hide-and-seek"
        # Every other candidate pixel (small, unscored components included) is hidden under the edit.
        hide = np.stack([results[i].candidate_mask & ~c.mask for i, c in owners])
        idx = torch.tensor([i for i, _ in owners], device=self.device)
        comp = composite(edits.recon[idx], edits.edit[idx], torch.from_numpy(hide)[:, None].to(self.device))
        p = self.classifier.probability(self._rescore_latent(comp, counter)).cpu().numpy()
        owner_idx = idx.cpu().numpy()
        deltas = normalized_delta(p, edits.p_healthy[owner_idx], edits.p_malignant[owner_idx])
        for (_, cand), prob, delta in zip(owners, p, deltas, strict=True):
            cand.probability, cand.delta = float(prob), float(delta)

    def _rescore_latent(self, images: torch.Tensor, counter: _Counter) -> torch.Tensor:
        z = self._encode_z(images)
        if not self.settings.harmonize:
            return z
        xT = self._ddim(self._re_enc, True, images, z, counter.tick)
        return self._encode_z(self._ddim(self._re_dec, False, xT, z, counter.tick))


class _Counter:
    """Counts network passes (images × DDIM steps) and forwards them to the progress callback."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done, self.stage = progress, total, 0, "encoding"

    def add_total(self, extra: int) -> None:
        self.total += extra

    def tick(self, images: int) -> None:
        self.done += images
        if self.progress is not None:
            self.progress(self.stage, self.done, self.total)
