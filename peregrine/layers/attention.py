"""Attention over a flat batch of sequences, reading past K/V from the paged cache."""

from __future__ import annotations

import torch
from torch import nn

from peregrine.attention_backend import AttentionBackend, AttentionMetadata, LayerCache
from peregrine.layers.linear import Linear
from peregrine.layers.norm import RMSNorm
from peregrine.layers.rotary import apply_rotary


class Attention(nn.Module):
    """Grouped-query self-attention: fused qkv projection, optional per-head q/k RMSNorm
    (`qk_norm`, an instance of the norm class to use), RoPE, paged attention, output."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 bias: bool = False, sliding_window: int | None = None,
                 qk_norm: RMSNorm | None = None, scale: float | None = None,
                 softcap: float | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.qkv_proj = Linear(hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = Linear(self.q_size, hidden_size)
        if qk_norm is not None:
            self.q_norm = qk_norm
            self.k_norm = type(qk_norm)(head_dim, qk_norm.eps)
        self.has_qk_norm = qk_norm is not None
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.sliding_window = sliding_window
        self.softcap = softcap  # attention logits become softcap * tanh(logits / softcap)
        self.backend: AttentionBackend | None = None  # set by the model runner

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                cache: LayerCache | None, meta: AttentionMetadata) -> torch.Tensor:
        """x [T, hidden]; rope: the step's (cos, signed sin) from RotaryEmbedding.lookup."""
        t, hq, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        qk = qkv[:, :self.q_size + self.kv_size].view(t, hq + hkv, d)
        if self.has_qk_norm:
            qk = torch.cat([self.q_norm(qk[:, :hq]), self.k_norm(qk[:, hq:])], 1)
        # q and k are adjacent in the fused output: rotate both with one set of ops.
        qk = apply_rotary(qk, *rope)
        v = qkv[:, self.q_size + self.kv_size:].view(t, hkv, d)
        out = self.backend.forward(qk[:, :hq], qk[:, hq:], v, cache, meta, self.scale,
                                   self.sliding_window, self.softcap)
        return self.o_proj(out.view(t, self.q_size))
