"""Attention over a flat batch of sequences, reading past K/V from the paged cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from peregrine.layers.linear import Linear
from peregrine.layers.rotary import apply_rotary


@dataclass
class LayerCache:
    """One layer's slice of the paged KV pool: [num_blocks, block_size, kv_heads, head_dim].

    With a quantized KV cache, k/v hold one byte per value and k_scale/v_scale hold one
    float per (block, slot, kv_head)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def block_size(self) -> int:
        return self.k.shape[1]


@dataclass
class AttentionMetadata:
    """Where each sequence of the flat batch starts, how long it is, where its K/V live.

    The batch holds B sequences; sequence i contributes tokens
    [query_start_loc[i], query_start_loc[i+1]) of the flat batch, which are its positions
    [seq_lens[i] - query_len_i, seq_lens[i]). The first `num_decodes` sequences have exactly
    one query token (decodes); the runner orders them first so they run as one batch."""

    query_start_loc: list[int]
    seq_lens: list[int]
    num_decodes: int = 0
    slot_mapping: torch.Tensor | None = None  # [T] int64; None: no cache (prefill only)
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32, 0 for unused entries
    query_start_loc_t: torch.Tensor | None = None  # [B+1] int32 on device (kernels)
    seq_lens_t: torch.Tensor | None = None  # [B] int32 on device (kernels)
    scratch: dict[str, Any] = field(default_factory=dict)
    """Per-step values a backend derives once and reuses in every layer (gather indices,
    masks); the metadata lives for one step, so they never go stale."""

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens, default=0)

    @property
    def max_query_len(self) -> int:
        q = self.query_start_loc
        return max((q[i + 1] - q[i] for i in range(len(q) - 1)), default=0)

    @classmethod
    def prefill_only(cls, seq_lens: list[int], device: torch.device | str = "cpu"
                     ) -> "AttentionMetadata":
        """Whole sequences attending only to themselves, with no KV cache (eval, tests)."""
        starts = [0]
        for n in seq_lens:
            starts.append(starts[-1] + n)
        return cls(query_start_loc=starts, seq_lens=list(seq_lens),
                   query_start_loc_t=torch.tensor(starts, dtype=torch.int32, device=device),
                   seq_lens_t=torch.tensor(seq_lens, dtype=torch.int32, device=device))


class AttentionBackend(Protocol):
    """Writes the new K/V into the cache and attends; the same contract on CPU and GPU."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cache: LayerCache | None, meta: AttentionMetadata, scale: float,
                sliding_window: int | None) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> out [T, Hq, D]."""
        ...


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """The backend for `name` (auto|torch|triton) on `device`."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from peregrine.kernels.torch_attention import TorchAttentionBackend
        return TorchAttentionBackend()
    if name == "triton":
        from peregrine.kernels.triton_attention import TritonAttentionBackend
        return TritonAttentionBackend(device)
    raise ValueError(f"unknown attention backend {name!r} (auto|torch|triton)")


class Attention(nn.Module):
    """Grouped-query self-attention: fused qkv projection, RoPE, paged attention, output."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 bias: bool = False, sliding_window: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.qkv_proj = Linear(hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = Linear(self.q_size, hidden_size)
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window
        self.backend: AttentionBackend | None = None  # set by the model runner

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                cache: LayerCache | None, meta: AttentionMetadata) -> torch.Tensor:
        """x [T, hidden]; rope: the step's (cos, signed sin) from RotaryEmbedding.lookup."""
        t, hq, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        # q and k are adjacent in the fused output: rotate both with one set of ops.
        qk = apply_rotary(qkv[:, :self.q_size + self.kv_size].view(t, hq + hkv, d), *rope)
        v = qkv[:, self.q_size + self.kv_size:].view(t, hkv, d)
        out = self.backend.forward(qk[:, :hq], qk[:, hq:], v, cache, meta, self.scale,
                                   self.sliding_window)
        return self.o_proj(out.view(t, self.q_size))
