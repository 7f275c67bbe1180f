"""The diffusion-autoencoder network: a 'BeatGANs' UNet conditioned on time and a semantic code.

Written from the architecture description of Diffusion Autoencoders (Preechakul et al., 2022) as used by
Hide-and-Seek (Atad et al., 2025). Module and parameter names follow that code base, so the authors'
published `ema_model.*` tensors load with ``strict=True``. The network knows nothing about sampling.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DAEConfig:
    """Every architecture fact needed to rebuild a diffusion autoencoder (stored in each bundle's JSON)."""

    image_size: int = 64
    in_channels: int = 1
    out_channels: int = 1
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 1
    embed_channels: int = 512
    enc_out_channels: int = 512
    enc_channel_mult: tuple[int, ...] = (1, 2, 4, 8, 8)
    enc_num_res_block: int = 2
    enc_pool: str = "adaptivenonzero"
    resblock_updown: bool = True
    resnet_two_cond: bool = True
    dropout: float = 0.1
    dims: int = 2
    norm_groups: int = 32

    def __post_init__(self) -> None:
        for name in ("channel_mult", "attention_resolutions", "enc_channel_mult"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.dims != 2:
            raise ValueError(f"only 2-D networks are supported (dims={self.dims})")
        if self.enc_pool != "adaptivenonzero":
            raise ValueError(f"unsupported encoder pooling {self.enc_pool!r}: only 'adaptivenonzero'")
        if not self.resblock_updown:
            raise ValueError("only res-block up/down-sampling (resblock_updown=True) is supported")
        if not self.resnet_two_cond:
            raise ValueError("only two-condition res blocks (resnet_two_cond=True) are supported")
        if self.image_size % (2 ** (len(self.enc_channel_mult) - 1)):
            raise ValueError(f"image_size {self.image_size} is not divisible by the encoder's downsampling")

    @classmethod
    def from_dict(cls, data: dict) -> DAEConfig:
        """Build from a JSON dict; unknown keys are an error so a typo never passes silently."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DAE config keys: {', '.join(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict:
        out = asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in out.items()}


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return _GroupNorm32(min(groups, channels), channels)


class _GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the autocast dtype (as the reference does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (original, 0..T-1) timesteps: cos half then sin half."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ResBlock(nn.Module):
    """Residual block; with conditioning it modulates by time (scale/shift) then by the semantic code (scale).

    Without conditioning (the semantic encoder) the block is ``skip(x) + in_layers(x)``: the reference has no
    out-layers there, and we keep its layout so its weights load.
    """

    def __init__(
        self,
        channels: int,
        out_channels: int,
        *,
        groups: int,
        emb_channels: int = 0,
        cond_channels: int = 0,
        dropout: float = 0.0,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.use_condition = emb_channels > 0
        self.in_layers = nn.Sequential(
            _norm(channels, groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        self.resample = _Upsample() if up else _Downsample() if down else nn.Identity()
        if self.use_condition:
            self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
            self.cond_emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(cond_channels, out_channels))
            self.out_layers = nn.Sequential(
                _norm(out_channels, groups),
                nn.SiLU(),
                nn.Dropout(p=dropout),
                _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
            )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor | None = None, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.resample(h))
            x = self.resample(x)
        else:
            h = self.in_layers(x)
        if self.use_condition:
            scale, shift = self.emb_layers(emb).type(h.dtype)[..., None, None].chunk(2, dim=1)
            cond_scale = self.cond_emb_layers(cond).type(h.dtype)[..., None, None]
            norm, act, drop, conv = self.out_layers
            h = norm(h) * (1 + scale) + shift
            h = h * (1 + cond_scale)
            h = conv(drop(act(h)))
        return self.skip_connection(x) + h


class _Upsample(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest")


class _Downsample(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection ('legacy' head order, as the reference)."""

    def __init__(self, channels: int, *, num_heads: int, groups: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        length = qkv.shape[-1]
        ch = c // self.num_heads
        q, k, v = qkv.reshape(b * self.num_heads, 3 * ch, length).split(ch, dim=1)
        scale = 1.0 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        h = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, length)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class Block(nn.Sequential):
    """A sequence of res-blocks and attention layers that all see the same conditioning."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, emb: torch.Tensor | None = None, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb, cond) if isinstance(layer, ResBlock) else layer(x)
        return x


class _TimeEmbed(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.time_embed = nn.Sequential(
            nn.Linear(in_channels, out_channels), nn.SiLU(), nn.Linear(out_channels, out_channels)
        )

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:
        return self.time_embed(t_emb)


class SemanticEncoder(nn.Module):
    """Half-UNet that maps an image to the semantic code z ('adaptivenonzero' pooling head)."""

    def __init__(self, cfg: DAEConfig) -> None:
        super().__init__()
        g = cfg.norm_groups
        ch = cfg.enc_channel_mult[0] * cfg.model_channels
        self.input_blocks = nn.ModuleList([Block(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        resolution = cfg.image_size
        for level, mult in enumerate(cfg.enc_channel_mult):
            for _ in range(cfg.enc_num_res_block):
                out = mult * cfg.model_channels
                layers: list[nn.Module] = [ResBlock(ch, out, groups=g, dropout=cfg.dropout)]
                ch = out
                if resolution in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=cfg.num_heads, groups=g))
                self.input_blocks.append(Block(*layers))
            if level != len(cfg.enc_channel_mult) - 1:
                self.input_blocks.append(Block(ResBlock(ch, ch, groups=g, dropout=cfg.dropout, down=True)))
                resolution //= 2
        self.middle_block = Block(
            ResBlock(ch, ch, groups=g, dropout=cfg.dropout),
            AttentionBlock(ch, num_heads=cfg.num_heads, groups=g),
            ResBlock(ch, ch, groups=g, dropout=cfg.dropout),
        )
        self.out = nn.Sequential(
            _norm(ch, g), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)), nn.Conv2d(ch, cfg.enc_out_channels, 1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for block in self.input_blocks:
            h = block(h)
        return self.out(self.middle_block(h))


class DiffusionAutoencoder(nn.Module):
    """Noise-predicting UNet conditioned on timestep and semantic code, plus its semantic encoder.

    ``encode(x0) -> z``; ``forward(x_t, t, z) -> predicted noise``. Timesteps are original indices 0..T-1.
    """

    def __init__(self, cfg: DAEConfig) -> None:
        super().__init__()
        self.config = cfg
        g, emb = cfg.norm_groups, cfg.embed_channels
        res_kw = {"groups": g, "emb_channels": emb, "cond_channels": cfg.enc_out_channels, "dropout": cfg.dropout}
        self.time_embed = _TimeEmbed(cfg.model_channels, emb)

        ch = cfg.channel_mult[0] * cfg.model_channels
        self.input_blocks = nn.ModuleList([Block(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels: list[list[int]] = [[ch]] + [[] for _ in cfg.channel_mult[1:]]
        resolution = cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                out = mult * cfg.model_channels
                layers: list[nn.Module] = [ResBlock(ch, out, **res_kw)]
                ch = out
                if resolution in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=cfg.num_heads, groups=g))
                self.input_blocks.append(Block(*layers))
                skip_channels[level].append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Block(ResBlock(ch, ch, down=True, **res_kw)))
                skip_channels[level + 1].append(ch)
                resolution //= 2
        self._blocks_per_level = [len(s) for s in skip_channels]

        self.middle_block = Block(
            ResBlock(ch, ch, **res_kw),
            AttentionBlock(ch, num_heads=cfg.num_heads, groups=g),
            ResBlock(ch, ch, **res_kw),
        )

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            out = cfg.channel_mult[level] * cfg.model_channels
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels[level].pop(), out, **res_kw)]
                ch = out
                if resolution in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=cfg.num_heads, groups=g))
                if level and i == cfg.num_res_blocks:
                    layers.append(ResBlock(ch, ch, up=True, **res_kw))
                    resolution *= 2
                self.output_blocks.append(Block(*layers))

        input_ch = cfg.channel_mult[0] * cfg.model_channels
        self.out = nn.Sequential(
            _norm(ch, g), nn.SiLU(), _zero(nn.Conv2d(input_ch, cfg.out_channels, 3, padding=1))
        )
        self.encoder = SemanticEncoder(cfg)

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """Semantic code z of images in the bundle's intensity range."""
        return self.encoder(x0)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels))
        skips: list[torch.Tensor] = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, cond)
            skips.append(h)
        h = self.middle_block(h, emb, cond)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, cond)
        return self.out(h)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
