"""Deterministic DDIM (eta = 0) for a diffusion autoencoder: encode x0 -> x_T and decode x_T -> x0.

Pure schedule arithmetic: the denoiser is passed in as a callable ``eps(x_t, t, cond)``, the device is the
tensors', and a callback is checked at every step so that callers can report progress and cancel.
The schedule and the "ddimN" respacing follow the published pipeline exactly (see ``respaced_timesteps``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int], None]
"""Called as ``callback(step_done, steps_total)``; raise (e.g. ``errors.Cancelled``) inside it to stop."""


@dataclass(frozen=True)
class DiffusionConfig:
    """The diffusion facts a model was trained with (stored in each bundle's JSON)."""

    T: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    clip_x0: bool = True

    def __post_init__(self) -> None:
        if self.beta_schedule != "linear":
            raise ValueError(f"unsupported beta schedule {self.beta_schedule!r}: only 'linear'")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")

    @classmethod
    def from_dict(cls, data: dict) -> DiffusionConfig:
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


def alphas_cumprod(cfg: DiffusionConfig) -> np.ndarray:
    """Cumulative products of (1 - beta) in float64; betas scaled by 1000/T as in the reference."""
    scale = 1000.0 / cfg.T
    betas = np.linspace(scale * cfg.beta_start, scale * cfg.beta_end, cfg.T, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def respaced_timesteps(T: int, steps: int) -> list[int]:
    """The published "ddimN" respacing: the first stride s with len(range(0, T, s)) == steps."""
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM steps must be in 1..{T}, got {steps}")
    for stride in range(1, T):
        if len(range(0, T, stride)) == steps:
            return list(range(0, T, stride))
    if steps == 1:
        return [0]
    raise ValueError(f"no stride gives exactly {steps} DDIM steps out of {T}; choose another step count")


class DDIMSampler:
    """Deterministic DDIM on a respaced schedule; one instance per (T, steps)."""

    def __init__(self, cfg: DiffusionConfig, steps: int) -> None:
        self.cfg = cfg
        self.timesteps = respaced_timesteps(cfg.T, steps)
        ac = alphas_cumprod(cfg)[self.timesteps]
        self._ac = ac
        self._ac_prev = np.append(1.0, ac[:-1])
        self._ac_next = np.append(ac[1:], 0.0)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def _x0_and_eps(
        self, denoiser: Denoiser, x: torch.Tensor, i: int, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.full((x.shape[0],), self.timesteps[i], device=x.device, dtype=torch.long)
        eps = denoiser(x, t, cond).float()
        recip = float(np.sqrt(1.0 / self._ac[i]))
        recipm1 = float(np.sqrt(1.0 / self._ac[i] - 1.0))
        x0 = recip * x - recipm1 * eps
        if self.cfg.clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        # Recompute the noise from the clipped x0, so that the step stays on the (clipped) data manifold.
        eps = (recip * x - x0) / recipm1
        return x0, eps

    @torch.no_grad()
    def encode(
        self, denoiser: Denoiser, x0: torch.Tensor, cond: torch.Tensor, callback: StepCallback | None = None
    ) -> torch.Tensor:
        """Deterministic inversion x0 -> x_T (walks the respaced timesteps upward)."""
        x = x0.float()
        for i in range(self.steps):
            x0_pred, eps = self._x0_and_eps(denoiser, x, i, cond)
            a_next = self._ac_next[i]
            x = x0_pred * float(np.sqrt(a_next)) + float(np.sqrt(1.0 - a_next)) * eps
            if callback is not None:
                callback(i + 1, self.steps)
        return x

    @torch.no_grad()
    def decode(
        self, denoiser: Denoiser, xT: torch.Tensor, cond: torch.Tensor, callback: StepCallback | None = None
    ) -> torch.Tensor:
        """Deterministic generation x_T -> x0 (walks the respaced timesteps downward)."""
        x = xT.float()
        for n, i in enumerate(reversed(range(self.steps))):
            x0_pred, eps = self._x0_and_eps(denoiser, x, i, cond)
            a_prev = self._ac_prev[i]
            x = x0_pred * float(np.sqrt(a_prev)) + float(np.sqrt(1.0 - a_prev)) * eps
            if callback is not None:
                callback(n + 1, self.steps)
        return x
