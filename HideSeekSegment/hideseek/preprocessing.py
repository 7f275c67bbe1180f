"""How a model wants its 2-D vertebra slices: size, intensity normalisation and orientation (stored per bundle).

The published model scales each slice so that its 0th percentile maps to 0 and its 99.5th to 1 (no clipping);
our phantom-trained models use a fixed HU window, which keeps lesion contrast comparable between slices, or a fixed
piecewise-linear HU curve, which gives the cancellous range (where lytic lesions differ from healthy bone by only
~150 HU) more of the model's intensity range, and so more of the training loss, than a straight window does.
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
    intensity: str = "percentile"  # "percentile" (per slice), "hu_window" or "hu_curve" (fixed)
    lower: float = 0.0  # percentile, or HU, mapped to 0
    upper: float = 99.5  # percentile, or HU, mapped to 1
    curve: tuple[tuple[float, float], ...] = ()  # "hu_curve": (HU, value) knots between (lower, 0) and (upper, 1)
    clip: bool = False
    slice_convention: str = SLICE_CONVENTION
    crop_margin: float = 0.15  # fraction of the body's extent added on each side of the crop

    def __post_init__(self) -> None:
        if self.intensity not in ("percentile", "hu_window", "hu_curve"):
            raise ValueError(f"unknown intensity normalisation {self.intensity!r}: "
                             "use percentile, hu_window or hu_curve")
        if not self.lower < self.upper:
            raise ValueError(f"need lower < upper, got {self.lower} and {self.upper}")
        object.__setattr__(self, "curve", tuple((float(h), float(v)) for h, v in self.curve))  # JSON gives lists
        if (self.intensity == "hu_curve") != bool(self.curve):
            raise ValueError("an hu_curve needs knots in 'curve', and only an hu_curve has them")
        hu, values = self._knots()
        if np.any(np.diff(hu) <= 0) or np.any(np.diff(values) <= 0):
            raise ValueError(f"the curve's knots must rise in HU and in value between ({self.lower:g}, 0) and "
                             f"({self.upper:g}, 1), got {list(self.curve)}")
        if self.slice_convention not in SLICE_LAYOUTS:
            raise ValueError(f"unknown slice convention {self.slice_convention!r}: use one of {SLICE_LAYOUTS}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(**data)

    def to_dict(self) -> dict:
        """Every field; a model without a curve is written as before curves existed (same bundles, same caches)."""
        data = asdict(self)
        if not self.curve:
            del data["curve"]
        return data

    def _knots(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole curve as (HU, value) arrays, from (lower, 0) to (upper, 1); a window is the two ends alone."""
        hu = [self.lower, *(h for h, _ in self.curve), self.upper]
        values = [0.0, *(v for _, v in self.curve), 1.0]
        return np.asarray(hu, dtype=np.float32), np.asarray(values, dtype=np.float32)

    def to_model_layout(self, slices: np.ndarray) -> np.ndarray:
        """(..., H, W) slices in ``SLICE_CONVENTION`` -> the layout this model was trained on."""
        return np.swapaxes(slices, -1, -2) if self.slice_convention == PUBLISHED_SLICE_LAYOUT else slices

    def from_model_layout(self, slices: np.ndarray) -> np.ndarray:
        """The inverse of ``to_model_layout`` (a transpose is its own inverse)."""
        return self.to_model_layout(slices)

    def normalize(self, slices: np.ndarray) -> np.ndarray:
        """Map HU slices (..., H, W) to model intensities, slice by slice for the percentile rule."""
        x = np.asarray(slices, dtype=np.float32)
        if self.intensity == "hu_curve":
            out = self._map_curve(x)
        else:
            if self.intensity == "hu_window":
                lo = np.float32(self.lower)
                hi = np.float32(self.upper)
            else:
                flat = x.reshape(*x.shape[:-2], -1)
                lo = np.percentile(flat, self.lower, axis=-1).astype(np.float32)[..., None, None]
                hi = np.percentile(flat, self.upper, axis=-1).astype(np.float32)[..., None, None]
            out = (x - lo) / np.maximum(hi - lo, np.float32(1e-6))
        return np.clip(out, 0.0, 1.0) if self.clip else out

    def _map_curve(self, x: np.ndarray) -> np.ndarray:
        """Piecewise-linear between the knots; beyond the ends the end segments go on (as the window does)."""
        hu, values = self._knots()
        first = (values[1] - values[0]) / (hu[1] - hu[0])
        last = (values[-1] - values[-2]) / (hu[-1] - hu[-2])
        out = np.interp(x, hu, values).astype(np.float32)
        out = np.where(x < hu[0], (x - hu[0]) * first, out)
        return np.where(x > hu[-1], values[-1] + (x - hu[-1]) * last, out).astype(np.float32)


PHANTOM_WINDOW = Preprocessing(intensity="hu_window", lower=-200.0, upper=1200.0)
"""Default of phantom-trained models: soft tissue to dense sclerosis on a straight line, lesions keep their contrast."""

PHANTOM_CURVE = Preprocessing(intensity="hu_curve", lower=-200.0, upper=1200.0, curve=((0.0, 0.08), (400.0, 0.72)))
"""The same span with 0..400 HU (lytic 20-60, cancellous 100-260, the edge of sclerosis) stretched to 64 % of the
range: the lytic-to-cancellous contrast is 2.2x the window's, the blastic one (~650 HU) 1.3-1.5x."""


PUBLISHED_PREPROCESSING = Preprocessing(crop_margin=0.06, slice_convention=PUBLISHED_SLICE_LAYOUT)
"""The published pipeline: percentile 0 -> 0 and 99.5 -> 1 per 64x64 slice, no clipping, transposed layout; the
body fills about 57 of 64 pixels along its long side in the authors' sample, hence the small margin."""
