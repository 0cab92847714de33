"""The attention contract, below both the model layers (which call a backend) and the kernels
(which are one): the paged KV layout, the step's attention metadata, the backend interface."""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from peregrine.memory_model import KV_QUANTIZED, kv_block_shape, kv_store_dtype
from peregrine.models.config import ModelConfig


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


def allocate_kv_pool(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                     device: torch.device, kv_cache_dtype: str = "auto") -> list[LayerCache]:
    """One zeroed K and V tensor per layer: [num_blocks, block_size, kv_heads, head_dim];
    int8/fp8 store one byte per value and add float32 scales [num_blocks, block_size, kv_heads]."""
    shape = kv_block_shape(cfg, num_blocks, block_size)
    quantized = kv_cache_dtype in KV_QUANTIZED
    store = kv_store_dtype(kv_cache_dtype, dtype)

    def scales() -> torch.Tensor | None:
        return torch.zeros(shape[:-1], dtype=torch.float32, device=device) if quantized else None
    return [LayerCache(torch.zeros(shape, dtype=store, device=device),
                       torch.zeros(shape, dtype=store, device=device), scales(), scales())
            for _ in range(cfg.num_layers)]


def block_table_tensor(tables: list[list[int]], width: int) -> torch.Tensor:
    """The first `width` entries of each block table as one int32 [B, width] tensor."""
    rows = [t[:width] + [0] * (width - len(t[:width])) for t in tables]
    # Padding and freed (out-of-window) entries are never read: they may point anywhere.
    return torch.tensor(rows, dtype=torch.int32).clamp_(min=0)


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

    @classmethod
    def build(cls, query_start_loc: list[int], seq_lens: list[int], num_decodes: int = 0,
              slot_mapping: torch.Tensor | None = None, block_tables: torch.Tensor | None = None,
              device: torch.device | str | Callable[[torch.Tensor], torch.Tensor] = "cpu",
              query_start_loc_t: torch.Tensor | None = None,
              seq_lens_t: torch.Tensor | None = None) -> "AttentionMetadata":
        """The one builder: host lists, and tensors moved to (or by) `device`; the lists'
        device copies are made unless given (a CUDA graph's static buffers)."""
        move = device if callable(device) else (lambda t: t.to(device))
        if query_start_loc_t is None:
            query_start_loc_t = move(torch.tensor(query_start_loc, dtype=torch.int32))
        if seq_lens_t is None:
            seq_lens_t = move(torch.tensor(seq_lens, dtype=torch.int32))
        return cls(query_start_loc, seq_lens, num_decodes,
                   None if slot_mapping is None else move(slot_mapping),
                   None if block_tables is None else move(block_tables),
                   query_start_loc_t, seq_lens_t)

    @classmethod
    def prefill_only(cls, seq_lens: list[int], device: torch.device | str = "cpu"
                     ) -> "AttentionMetadata":
        """Whole sequences attending only to themselves, with no KV cache (eval, tests)."""
        starts = list(itertools.accumulate(seq_lens, initial=0))
        return cls.build(starts, list(seq_lens), device=device)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]



class AttentionBackend(Protocol):
    """Writes the new K/V into the cache and attends; the same contract on CPU and GPU."""

    supports_softcap: bool  # whether forward takes a logit soft-cap (Gemma 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cache: LayerCache | None, meta: AttentionMetadata, scale: float,
                sliding_window: int | None, softcap: float | None = None) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> out [T, Hq, D]; with `softcap`, the scaled
        scores s become softcap * tanh(s / softcap) before the mask and softmax."""
        ...


# By module path: the kernels import this contract, so it imports no kernel.
_BACKENDS = {"torch": "peregrine.kernels.torch_attention:TorchAttentionBackend",
             "triton": "peregrine.kernels.triton_attention:TritonAttentionBackend"}


def _backend_class(name: str) -> type:
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def resolve_attention_backend(name: str, device: torch.device,
                              cfg: ModelConfig | None = None) -> str:
    """The backend `name` (auto|torch|triton) means on `device` for a model of `cfg`: auto is
    triton on CUDA, torch elsewhere; a backend without `supports_softcap` is refused for a
    model that soft-caps attention logits (Gemma 2)."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (auto|torch|triton)")
    if (cfg is not None and cfg.attn_logit_softcapping is not None
            and not _backend_class(name).supports_softcap):
        raise ValueError(f"{cfg.name or cfg.architecture} soft-caps attention logits, which "
                         f"the {name} backend cannot do")
    return name


def get_attention_backend(name: str, device: torch.device,
                          cfg: ModelConfig | None = None) -> AttentionBackend:
    """The backend for `name` (auto|torch|triton) on `device`, for a model of `cfg`."""
    name = resolve_attention_backend(name, device, cfg)
    backend = _backend_class(name)
    return backend() if name == "torch" else backend(device)
