"""AWQ (Lin et al., 2023): activation-aware scaling before round-to-nearest.

Input channels that carry large activations matter most; scaling weight column c up by
s_c (and the activation down by s_c) shrinks that column's relative rounding error. The
scale is s = mean|x|^alpha (normalized), alpha searched over a grid to minimize the error
of the layers' outputs on calibration inputs; alpha = 0 is plain RTN, so the search never
does worse than RTN on its data. 1/s is folded into the op before: the RMSNorm weight
before qkv_proj / gate_up_proj / lm_head, the up_proj rows before down_proj. o_proj is not
scaled (with grouped-query attention its input channels share v_proj rows)."""

from __future__ import annotations

import torch

from peregrine.quantization.apply import QuantSpec


@torch.no_grad()
def search_scale(x: torch.Tensor, weights: list[torch.Tensor], spec: QuantSpec,
                 grid: int = 20, max_tokens: int = 4096) -> torch.Tensor:
    """Per-input-channel scales [K] for the linears `weights` (all reading x [T, K])."""
    if x.shape[0] > max_tokens:  # an even subsample keeps the search cheap
        x = x[torch.linspace(0, x.shape[0] - 1, max_tokens).long()]
    x = x.float()
    w = torch.cat([wi.float() for wi in weights])
    ref = x @ w.t()
    x_mean = x.abs().mean(0)
    best, best_err = torch.ones_like(x_mean), float("inf")
    for i in range(grid):
        alpha = i / grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        wq = spec.quantize(w * s).dequantize() / s
        err = float((x @ wq.t() - ref).pow(2).mean())
        if err < best_err:
            best, best_err = s, err
    return best
