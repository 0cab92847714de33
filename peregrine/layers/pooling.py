"""Pooling hidden states into one vector per sequence: the mean of its tokens or its last
token, over a padded batch [B, L, H] (encoders) or a flat batch [T, H] (the decoder)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

PoolingType = Literal["mean", "last"]
POOLING_TYPES: tuple[str, ...] = ("mean", "last")


def pool_padded(hidden: torch.Tensor, mask: torch.Tensor, pooling: PoolingType) -> torch.Tensor:
    """[B, H] from hidden [B, L, H] whose real tokens are mask [B, L] == 1 (left-aligned)."""
    mask_f = mask.to(hidden.dtype).unsqueeze(-1)
    if pooling == "mean":
        # sentence-transformers' mean: a sum over real tokens over their count (>= 1e-9).
        return (hidden * mask_f).sum(1) / mask_f.sum(1).clamp(min=1e-9)
    if pooling == "last":
        last = mask.long().sum(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling must be one of {POOLING_TYPES}, got {pooling!r}")


def pool_flat(hidden: torch.Tensor, seq_lens: list[int],
              pooling: PoolingType | list[PoolingType]) -> torch.Tensor:
    """[B, H] from a flat batch hidden [T, H] of sequences `seq_lens` long, one after another;
    `pooling` is one method for all, or one per sequence."""
    methods = [pooling] * len(seq_lens) if isinstance(pooling, str) else list(pooling)
    if len(methods) != len(seq_lens):
        raise ValueError("pooling must give one method per sequence")
    out = []
    for chunk, method in zip(torch.split(hidden, seq_lens), methods):
        if method == "mean":
            out.append(chunk.float().mean(0))
        elif method == "last":
            out.append(chunk[-1].float())
        else:
            raise ValueError(f"pooling must be one of {POOLING_TYPES}, got {method!r}")
    return torch.stack(out)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    return F.normalize(x, p=2, dim=-1)
