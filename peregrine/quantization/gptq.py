"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs (H = X^T X), so the layer's *outputs* on calibration data move least.

Implemented as in the paper: Cholesky factor of the damped inverse Hessian, lazy batch
updates over blocks of columns, optional act-order (columns by decreasing Hessian
diagonal). Groups keep their contiguous layout: without act-order each group's scale is
found from the error-updated weights when the sweep reaches it; with act-order every group's
scale is fixed up front from the original weights ("static groups")."""

from __future__ import annotations

import torch

from peregrine.layers.linear import Int4Linear, Int8Linear, NF4Linear, QuantLinear
from peregrine.layers import quant_formats as formats
from peregrine.quantization.apply import QuantSpec


class _Grid:
    """Scale parameters of one format and how one column snaps to its grid."""

    def __init__(self, spec: QuantSpec, k: int) -> None:
        self.spec, self.k = spec, k
        self.g = k if spec.group_size is None else spec.group_size
        self.scale: torch.Tensor | None = None  # [N, S]
        self.offset: torch.Tensor | None = None

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale (and offset) of one group from its columns w [N, <=G]."""
        m = self.spec.method
        if m == "int4":
            s, o = formats.int4_params(w, None, self.spec.symmetric)
            return s[:, 0], o[:, 0]
        if m == "nf4":
            return w.abs().amax(-1).half(), None
        return w.abs().amax(-1) / 127.0, None  # int8

    def snap(self, col: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None) -> torch.Tensor:
        """The dequantized value nearest to `col` [N] on the group's grid."""
        m = self.spec.method
        s = s.float()
        safe = torch.where(s == 0, 1.0, s)
        if m == "int4":
            q = torch.round((col - o.float()) / safe).clamp_(0, 15)
            return q * s + o.float()
        if m == "nf4":
            levels = formats.NF4_LEVELS.to(col.device)
            return levels[formats.nf4_codes(col / safe).long()] * s
        return torch.round(col / safe).clamp_(-127, 127) * s

    def module(self, q: torch.Tensor, bias: torch.Tensor | None) -> QuantLinear:
        """The quantized layer holding the (already on-grid) weight q [N, K]."""
        m, g = self.spec.method, self.spec.group_size
        if m == "int4":
            codes = formats.quantize_int4_with(q, self.scale, self.offset, g)
            return Int4Linear(formats.pack_int4(codes), self.scale, self.offset, bias)
        if m == "nf4":
            s = formats.expand_groups(self.scale, self.k, g)
            codes = formats.nf4_codes(q / torch.where(s == 0, 1.0, s))
            return NF4Linear(formats.pack_int4(codes), self.scale, bias)
        s = formats.expand_groups(self.scale, self.k, g)
        codes = torch.round(q / torch.where(s == 0, 1.0, s)).clamp_(-127, 127)
        return Int8Linear(codes.to(torch.int8), self.scale, bias)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec,
                  bias: torch.Tensor | None = None, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False) -> QuantLinear:
    """Quantize w [N, K] given H = sum of x x^T [K, K] over calibration inputs."""
    # The column sweep is thousands of tiny ops: one thread avoids a fork/join per op, which
    # costs more than the op itself (13x slower with 2 threads on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(w, hessian, spec, bias, block_size, damp, act_order)
    finally:
        torch.set_num_threads(threads)


def _gptq(w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, bias: torch.Tensor | None,
          block_size: int, damp: float, act_order: bool) -> QuantLinear:
    if spec.method not in ("int4", "int8", "nf4"):
        raise ValueError(f"GPTQ quantizes int4, int8 and nf4 weights, not {spec.method!r}")
    formats.check_shape(w, spec.group_size)
    W = w.detach().float().clone()
    H = hessian.detach().float().clone()
    n, k = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    grid = _Grid(spec, k)
    num_groups = formats.num_groups(k, spec.group_size)
    grid.scale = torch.zeros(n, num_groups, dtype=torch.float16 if spec.method != "int8"
                             else torch.float32)
    grid.offset = torch.zeros(n, num_groups, dtype=torch.float16)
    if act_order:
        for gi in range(num_groups):  # static groups, from the original weights
            s, o = grid.fit(W[:, gi * grid.g:(gi + 1) * grid.g])
            grid.scale[:, gi] = s
            if o is not None:
                grid.offset[:, gi] = o
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(k)
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            gi = col // grid.g
            if not act_order and col % grid.g == 0:  # entering a group: fit its scale now
                ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :grid.g]
                s, o = grid.fit(ahead)
                grid.scale[:, gi] = s
                if o is not None:
                    grid.offset[:, gi] = o
            q = grid.snap(W1[:, i], grid.scale[:, gi], grid.offset[:, gi])
            Q[:, i1 + i] = q
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return grid.module(Q, bias)
