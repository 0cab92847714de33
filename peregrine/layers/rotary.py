"""Rotary position embeddings (the rotate-half layout of Hugging Face checkpoints)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies, with Llama-3 or linear scaling applied when configured (for
    longrope, the short factors: see `longrope_tables`)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "longrope":
        return inv_freq / torch.tensor(scaling["short_factor"], dtype=torch.float32,
                                       device="cpu")
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling {kind!r} (supported: linear, llama3, longrope)")


def longrope_attention_factor(scaling: dict[str, Any]) -> float:
    """The cos/sin multiplier of longrope (Phi-3): given, or sqrt(1 + ln(s) / ln(L)) for the
    context extension s = factor (or max / original positions) over the original length L."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    orig = float(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor") or scaling["max_position_embeddings"] / orig
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


def position_freqs(head_dim: int, theta: float, scaling: dict[str, Any] | None,
                   positions: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(angles [P, head_dim / 2] of each position, cos/sin multiplier).

    Longrope (Phi-3) rotates positions below original_max_position_embeddings with the short
    factors and the others with the long ones. That is what transformers computes when it
    decodes token by token with its cache; its single forward over a prompt longer than the
    original context instead uses the long factors for every position."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    freqs = torch.outer(positions, inv_freq)
    if scaling is None or scaling.get("rope_type") != "longrope":
        return freqs, 1.0
    long = torch.tensor(scaling["long_factor"], dtype=torch.float32, device="cpu")
    long_inv = rope_inv_freq(head_dim, theta, None) / long
    is_long = (positions >= scaling["original_max_position_embeddings"]).unsqueeze(1)
    freqs = torch.where(is_long, torch.outer(positions, long_inv), freqs)
    return freqs, longrope_attention_factor(scaling)


class RotaryEmbedding(nn.Module):
    """RoPE for arbitrary (flat, per-token) positions: a cos/sin table gathered once per
    step (`lookup`), then applied to q and k of every layer together (`apply_rotary`)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim, self.max_positions = head_dim, max_positions
        self.theta, self.scaling = theta, scaling
        self.register_buffer("cos_sin", self.build(torch.device("cpu")), persistent=False)

    def build(self, device: torch.device) -> torch.Tensor:
        """[max_positions, 2, head_dim]: cos, and sin with the sign of rotate-half folded in
        (-sin on the first half), float32 so long positions stay exact."""
        positions = torch.arange(self.max_positions, dtype=torch.float32, device="cpu")
        freqs, mult = position_freqs(self.head_dim, self.theta, self.scaling, positions)
        cos, sin = freqs.cos() * mult, freqs.sin() * mult
        return torch.stack([torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)], 1).to(device)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin), each [T, 1, head_dim] in `dtype`, for the step's positions."""
        table = self.cos_sin[positions]
        if table.dtype != dtype:
            table = table.to(dtype)
        return table[:, 0:1], table[:, 1:2]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated: x * cos + rotate_half(x) * sin, where rotate_half(x) =
    cat(-x2, x1) is computed as the halves swapped (flip) times the signed sin."""
    t, h, d = x.shape
    swapped = x.view(t, h, 2, d // 2).flip(2).view(t, h, d)
    return torch.addcmul(x * cos, swapped, signed_sin)
