"""How a model wants its 2-D vertebra slices: size, intensity normalisation and orientation (stored per bundle).

The published model scales each slice so that its 0th percentile maps to 0 and its 99.5th to 1 (no clipping);
our phantom-trained models use a fixed HU window, which keeps lesion contrast comparable between slices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SLICE_CONVENTION = "sagittal; rows run superior->inferior, columns anterior->posterior"
"""How the engine samples every slice: row 0 is the most superior, column 0 the most anterior."""

PUBLISHED_SLICE_LAYOUT = "sagittal; rows run anterior->posterior, columns superior->inferior (S-I flip augmented)"
"""How the published model saw its slices: ``SLICE_CONVENTION`` transposed. Its training flipped the S-I axis at
random (MONAI ``RandFlipd(spatial_axis=1)``), so only the transpose matters for it."""

SLICE_LAYOUTS = (SLICE_CONVENTION, PUBLISHED_SLICE_LAYOUT)


@dataclass(frozen=True)
class Preprocessing:
    """The input contract of a model: ``normalize`` maps HU slices into the range the DAE was trained on."""

    image_size: int = 64
    intensity: str = "percentile"  # "percentile" (per slice) or "hu_window" (fixed)
    lower: float = 0.0  # percentile, or HU, mapped to 0
    upper: float = 99.5  # percentile, or HU, mapped to 1
    clip: bool = False
    slice_convention: str = SLICE_CONVENTION
    crop_margin: float = 0.15  # fraction of the body's extent added on each side of the crop

    def __post_init__(self) -> None:
        if self.intensity not in ("percentile", "hu_window"):
            raise ValueError(f"unknown intensity normalisation {self.intensity!r}: use percentile or hu_window")
        if not self.lower < self.upper:
            raise ValueError(f"need lower < upper, got {self.lower} and {self.upper}")
        if self.slice_convention not in SLICE_LAYOUTS:
            raise ValueError(f"unknown slice convention {self.slice_convention!r}: use one of {SLICE_LAYOUTS}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_model_layout(self, slices: np.ndarray) -> np.ndarray:
        """(..., H, W) slices in ``SLICE_CONVENTION`` -> the layout this model was trained on."""
        return np.swapaxes(slices, -1, -2) if self.slice_convention == PUBLISHED_SLICE_LAYOUT else slices

    def from_model_layout(self, slices: np.ndarray) -> np.ndarray:
        """The inverse of ``to_model_layout`` (a transpose is its own inverse)."""
        return self.to_model_layout(slices)

    def normalize(self, slices: np.ndarray) -> np.ndarray:
        """Map HU slices (..., H, W) to model intensities, slice by slice for the percentile rule."""
        x = np.asarray(slices, dtype=np.float32)
        if self.intensity == "hu_window":
            lo = np.float32(self.lower)
            hi = np.float32(self.upper)
        else:
            flat = x.reshape(*x.shape[:-2], -1)
            lo = np.percentile(flat, self.lower, axis=-1).astype(np.float32)[..., None, None]
            hi = np.percentile(flat, self.upper, axis=-1).astype(np.float32)[..., None, None]
        out = (x - lo) / np.maximum(hi - lo, np.float32(1e-6))
        return np.clip(out, 0.0, 1.0) if self.clip else out


PUBLISHED_PREPROCESSING = Preprocessing(crop_margin=0.06, slice_convention=PUBLISHED_SLICE_LAYOUT)
"""The published pipeline: percentile 0 -> 0 and 99.5 -> 1 per 64x64 slice, no clipping, transposed layout; the
body fills about 57 of 64 pixels along its long side in the authors' sample, hence the small margin."""
