"""Write a GGUF model in llama.cpp's K-quant recipes (Q4_K_M, Q6_K) from another GGUF file.

The quantizers search their scales for the least squared error instead of rounding to
nearest (the idea of llama.cpp's make_qx_quants / make_qkx2_quants, in vectorized torch):

  1. each group's float scale (Q6_K: per 16 weights; Q5_0/Q8_0: per 32) or scale and
     minimum (Q4_K/Q5_K: per 32) is chosen among candidates around the round-to-nearest
     (RTN) one, each also refit by (weighted) least squares for the levels it gives;
  2. the K-quants' sub-scales are stored as 6- or 8-bit integers times a float16 super
     scale: each super scale candidate (RTN's and the one fitted to the searched scales)
     is rounded to float16, each sub-block takes the integer (floor, ceil of its searched
     scale, or RTN's) with the least error, and the block keeps the super scale with the
     least total error. Errors are always those of the scales as stored.

RTN's encoding is always a candidate, so no group ends worse than RTN. An optional
importance per input column (llama.cpp's "imatrix": mean x^2 of the activations entering
the matrix on calibration text, `importance_from_calibration`) weights the squared error;
on SmolLM2 it is what lowers perplexity (a few hidden channels carry most of the
activation energy), while the unweighted search lowers the weights' error but not the
perplexity (scripts/quality_kquants.py).

What the writer is for: making K-quant files where llama-quantize is not at hand (the
tests, CI, the quality comparison), with the same tensor types per recipe:

  Q4_K_M  attn_v and ffn_down of the first and last eighth of the layers and every third
          layer between them in Q6_K, the other matrices in Q4_K, token_embd/output Q6_K;
  Q6_K    every matrix in Q6_K;
  F32     every matrix in float32 (what llama-quantize takes as its input).

Rows whose length is not a multiple of 256 fall back as llama.cpp does (Q4_K -> Q5_0,
Q6_K -> Q8_0; Q5_K -> Q5_1 by the gguf package's RTN): SmolLM2's hidden size, 576, is one
of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gguf
import numpy as np
import torch

from peregrine.models.gguf_file import QT, GGUFFile

QK_K = 256
_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}
# candidate scales: the largest weight moved by up to one level, in tenths of a level
_STEPS = [0.1 * k for k in range(-10, 11) if k]
_GROUPS = 1 << 14  # groups searched at a time, to bound the candidates' memory


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [nb] -> float16 bytes [nb, 2]."""
    return x.half().contiguous().view(torch.uint8).reshape(-1, 2)


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, 1.0, x)


def _keep_better(err: torch.Tensor, best: list[torch.Tensor], e: torch.Tensor,
                 cand: list[torch.Tensor]) -> torch.Tensor:
    """Replace best[i] by cand[i] where e < err (in place in `best`); returns the new error."""
    better = e < err
    for i, c in enumerate(cand):
        best[i] = torch.where(better.reshape(better.shape + (1,) * (c.dim() - better.dim())),
                              c, best[i])
    return torch.where(better, e, err)


def _sym_error(x: torch.Tensor, imp: torch.Tensor, s: torch.Tensor, lo: int, hi: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted squared error [...], levels) of x [..., n] as s q, q the nearest in [lo, hi]."""
    q = torch.round(x / _nonzero(s)).clamp(lo, hi)
    return (imp * (x - s * q).square()).sum(-1), q


def symmetric_scales(x: torch.Tensor, imp: torch.Tensor, rtn: torch.Tensor, lo: int, hi: int,
                     stored: bool = True, search: bool = True) -> torch.Tensor:
    """Scale s [G, 1] per group of x [G, n] with the least weighted error of x ~ s q, q in
    [lo, hi]: RTN's `rtn` [G, 1], candidates around it and around the signed extreme / lo,
    each refit by least squares; `stored`: candidates rounded to float16 as stored;
    `search` False: RTN's scale."""
    store = _f16 if stored else (lambda s: s)
    best = [store(rtn)]
    err, _ = _sym_error(x, imp, best[0], lo, hi)
    top = x.gather(-1, x.abs().argmax(-1, keepdim=True)) / lo
    # Q5_0's RTN scale is already the signed extreme / lo: one sweep, not two alike
    bases = [(rtn, hi)] + ([] if torch.equal(top, rtn) else [(top, -lo)])
    for base, n in bases:
        for step in _STEPS if search else []:
            s = store(base * n / (n + step))
            e, q = _sym_error(x, imp, s, lo, hi)
            err = _keep_better(err, best, e, [s])
            fit = store((imp * x * q).sum(-1, keepdim=True)
                        / _nonzero((imp * q * q).sum(-1, keepdim=True)))
            err = _keep_better(err, best, _sym_error(x, imp, fit, lo, hi)[0], [fit])
    return best[0]


def _affine_error(x: torch.Tensor, imp: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted squared error, levels) of x [..., n] as a q + b, q the nearest in [0, levels)."""
    q = torch.round((x - b) / _nonzero(a)).clamp(0, levels - 1)
    return (imp * (x - a * q - b).square()).sum(-1), q


def affine_scales(x: torch.Tensor, imp: torch.Tensor, rtn: torch.Tensor, low: torch.Tensor,
                  levels: int, search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) [G, 1] per group of x [G, n] with the least weighted error of x ~ a q + b,
    q in [0, levels), b <= 0: RTN's (rtn, low), candidates around it, each refit by least
    squares; `search` False: RTN's."""
    best = [rtn, low]
    err, _ = _affine_error(x, imp, rtn, low, levels)
    span = x.amax(-1, keepdim=True) - low
    sw = (imp * torch.ones_like(x)).sum(-1, keepdim=True)
    sx = (imp * x).sum(-1, keepdim=True)
    for step in _STEPS if search else []:
        a = span / (levels - 1 + step)
        e, q = _affine_error(x, imp, a, low, levels)
        err = _keep_better(err, best, e, [a, low])
        sq, sqq, sqx = [(imp * t).sum(-1, keepdim=True) for t in (q, q * q, q * x)]
        det = _nonzero(sw * sqq - sq * sq)
        fa, fb = (sw * sqx - sq * sx) / det, (sqq * sx - sq * sqx) / det
        # the minimum is stored as -dmin m with m >= 0
        fa = torch.where(fb > 0, sqx / _nonzero(sqq), fa).clamp(min=0)
        fb = fb.clamp(max=0)
        err = _keep_better(err, best, _affine_error(x, imp, fa, fb, levels)[0], [fa, fb])
    return best[0], best[1]


def _in_chunks(fn: Callable[..., Any], x: torch.Tensor, imp: torch.Tensor,
               *per_group: torch.Tensor, **kw: Any) -> Any:
    """fn over slices of _GROUPS groups of x (and of imp where it is per weight)."""
    outs = []
    for i in range(0, x.shape[0], _GROUPS):
        sl = slice(i, i + _GROUPS)
        outs.append(fn(x[sl], imp[sl] if imp.dim() else imp, *(t[sl] for t in per_group), **kw))
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(o) for o in zip(*outs))
    return torch.cat(outs)


def _importance(w: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """Per-weight error weights for w [N, K]: `importance` [K] per input column, or 1."""
    if importance is None:
        return torch.ones(())
    return importance.float().expand(w.shape[0], -1).contiguous()


def _grouped(imp: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return imp.reshape(shape) if imp.dim() else imp


def _k_min_levels(w: torch.Tensor, importance: torch.Tensor | None, levels: int, search: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d, dmin [nb, 1], sc, m [nb, 8], q [nb, 8, 32]) of the Q4_K/Q5_K blocks of w."""
    x = w.float().reshape(-1, 8, 32)
    imp = _grouped(_importance(w, importance), x.shape)
    nb = x.shape[0]
    low = x.amin(-1).clamp(max=0)  # w = d sc q - dmin m with m >= 0: the minimum is <= 0
    rtn = (x.amax(-1) - low) / (levels - 1)
    a, b = _in_chunks(affine_scales, x.reshape(-1, 32), _grouped(imp, (-1, 32)),
                      rtn.reshape(-1, 1), low.reshape(-1, 1), levels=levels, search=search)
    a, b = a.reshape(nb, 8), b.reshape(nb, 8)
    supers = [(rtn.amax(-1, keepdim=True) / 63, (-low).amax(-1, keepdim=True) / 63)]
    if search:
        supers.append((a.amax(-1, keepdim=True) / 63, (-b).amax(-1, keepdim=True) / 63))
    err = torch.full((nb,), torch.inf)
    best: list[torch.Tensor] = [torch.zeros(nb, 1)] * 2 + [torch.zeros(nb, 8)] * 2
    for d, dmin in supers:
        d, dmin = _f16(d), _f16(dmin)
        cands = [(torch.round(rtn / _nonzero(d)), torch.round(-low / _nonzero(dmin)))]
        if search:
            cands += [(s, m) for s in (torch.floor(a / _nonzero(d)), torch.ceil(a / _nonzero(d)))
                      for m in (torch.floor(-b / _nonzero(dmin)),
                                torch.ceil(-b / _nonzero(dmin)))]
        sub_err = torch.full((nb, 8), torch.inf)
        sub: list[torch.Tensor] = [torch.zeros(nb, 8)] * 2
        for sc, m in cands:
            sc, m = sc.clamp(0, 63), m.clamp(0, 63)
            e, _ = _affine_error(x, imp, (d * sc).unsqueeze(-1), (-dmin * m).unsqueeze(-1),
                                 levels)
            sub_err = _keep_better(sub_err, sub, e, [sc, m])
        err = _keep_better(err, best, sub_err.sum(-1), [d, dmin, *sub])
    d, dmin, sc, m = best
    _, q = _affine_error(x, imp, (d * sc).unsqueeze(-1), (-dmin * m).unsqueeze(-1), levels)
    return d, dmin, sc, m, q


def _quantize_k_min(w: torch.Tensor, levels: int, importance: torch.Tensor | None,
                    search: bool) -> np.ndarray:
    """Q4_K (16 levels, 144 bytes per 256 weights) or Q5_K (32 levels, 176 bytes) blocks of
    w [N, K], K a multiple of 256: per 32 weights a 6-bit scale and minimum."""
    d, dmin, sc, m, q = _k_min_levels(w, importance, levels, search)
    nb = q.shape[0]
    q = q.to(torch.uint8).reshape(nb, 4, 2, 32)
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    packed = torch.cat([
        (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
        (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)], dim=1)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(nb, 128)
    head = [_f16_bytes(d[:, 0]), _f16_bytes(dmin[:, 0]), packed]
    if levels == 16:
        return torch.cat([*head, qs], 1).numpy()
    high = (q.reshape(nb, 8, 32) >> 4) & 1  # bit j of byte l: weight 32 j + l's fifth bit
    qh = torch.zeros(nb, 32, dtype=torch.uint8)
    for j in range(8):
        qh |= high[:, j] << j
    return torch.cat([*head, qh, qs], 1).numpy()


def quantize_q4_k(w: torch.Tensor, importance: torch.Tensor | None = None,
                  search: bool = True) -> np.ndarray:
    """Q4_K blocks (144 bytes per 256 weights) of w [N, K], K a multiple of 256."""
    return _quantize_k_min(w, 16, importance, search)


def quantize_q5_k(w: torch.Tensor, importance: torch.Tensor | None = None,
                  search: bool = True) -> np.ndarray:
    """Q5_K blocks (176 bytes per 256 weights) of w [N, K], K a multiple of 256."""
    return _quantize_k_min(w, 32, importance, search)


def _q6_k_levels(w: torch.Tensor, importance: torch.Tensor | None, search: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d [nb, 1], sc [nb, 16], q [nb, 16, 16]) of the Q6_K blocks of w."""
    x = w.float().reshape(-1, 16, 16)
    imp = _grouped(_importance(w, importance), x.shape)
    nb = x.shape[0]
    rtn = x.abs().amax(-1) / 31
    s = _in_chunks(symmetric_scales, x.reshape(-1, 16), _grouped(imp, (-1, 16)),
                   rtn.reshape(-1, 1), lo=-32, hi=31, stored=False, search=search)
    s = s.reshape(nb, 16)
    supers = [rtn.amax(-1, keepdim=True) / 127]
    if search:
        supers += [s.gather(-1, s.abs().argmax(-1, keepdim=True)) / -128,
                   s.abs().amax(-1, keepdim=True) / 127]
    err = torch.full((nb,), torch.inf)
    best: list[torch.Tensor] = [torch.zeros(nb, 1), torch.zeros(nb, 16)]
    for d in supers:
        d = _f16(d)
        cands = [torch.round(rtn / _nonzero(d))]
        if search:
            cands += [torch.floor(s / _nonzero(d)), torch.ceil(s / _nonzero(d))]
        sub_err = torch.full((nb, 16), torch.inf)
        sub = [torch.zeros(nb, 16)]
        for sc in cands:
            sc = sc.clamp(-128, 127)
            e, _ = _sym_error(x, imp, (d * sc).unsqueeze(-1), -32, 31)
            sub_err = _keep_better(sub_err, sub, e, [sc])
        err = _keep_better(err, best, sub_err.sum(-1), [d, sub[0]])
    d, sc = best
    return d, sc, _sym_error(x, imp, (d * sc).unsqueeze(-1), -32, 31)[1]


def quantize_q6_k(w: torch.Tensor, importance: torch.Tensor | None = None,
                  search: bool = True) -> np.ndarray:
    """Q6_K blocks (210 bytes per 256 weights) of w [N, K], K a multiple of 256."""
    d, sc, q = _q6_k_levels(w, importance, search)
    nb = q.shape[0]
    q = (q + 32).to(torch.uint8).reshape(nb, 2, 128)  # two halves of 128 weights
    ql = (q[:, :, :64] & 0xF) | ((q[:, :, 64:] & 0xF) << 4)
    qh = torch.zeros(nb, 2, 32, dtype=torch.uint8)
    for s in range(4):
        qh |= ((q[:, :, 32 * s:32 * s + 32] >> 4) & 3) << (2 * s)
    return torch.cat([ql.reshape(nb, 128), qh.reshape(nb, 64),
                      sc.to(torch.int8).view(torch.uint8), _f16_bytes(d[:, 0])], 1).numpy()


_BLOCK32 = {  # levels [lo, hi] and RTN's scale (the gguf package's) of a block of 32
    QT.Q5_0: (-16, 15, lambda x: x.gather(-1, x.abs().argmax(-1, keepdim=True)) / -16),
    QT.Q8_0: (-128, 127, lambda x: x.abs().amax(-1, keepdim=True) / 127)}


def _block32_levels(w: torch.Tensor, importance: torch.Tensor | None, qtype: QT,
                    search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(d [nb, 1], q [nb, 32]) of the Q5_0/Q8_0 blocks of w, d as stored (float16)."""
    lo, hi, rtn = _BLOCK32[qtype]
    x = w.float().reshape(-1, 32)
    imp = _grouped(_importance(w, importance), x.shape)
    d = _in_chunks(symmetric_scales, x, imp, rtn(x), lo=lo, hi=hi, search=search)
    return d, _sym_error(x, imp, d, lo, hi)[1]


def quantize_q5_0(w: torch.Tensor, importance: torch.Tensor | None = None,
                  search: bool = True) -> np.ndarray:
    """Q5_0 blocks (22 bytes per 32 weights: float16 d, fifth bits, nibbles) of w [N, K]."""
    d, q = _block32_levels(w, importance, QT.Q5_0, search)
    q = (q + 16).to(torch.uint8)
    bits = (q >> 4).reshape(-1, 4, 8)  # bit j of the little-endian uint32: weight j's
    qh = torch.zeros(q.shape[0], 4, dtype=torch.uint8)
    for j in range(8):
        qh |= bits[:, :, j] << j
    qs = (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)
    return torch.cat([_f16_bytes(d[:, 0]), qh, qs], 1).numpy()


def quantize_q8_0(w: torch.Tensor, importance: torch.Tensor | None = None,
                  search: bool = True) -> np.ndarray:
    """Q8_0 blocks (34 bytes per 32 weights: float16 d, int8 levels) of w [N, K]."""
    d, q = _block32_levels(w, importance, QT.Q8_0, search)
    return torch.cat([_f16_bytes(d[:, 0]), q.to(torch.int8).view(torch.uint8)], 1).numpy()


def intended_values(w: torch.Tensor, qtype: QT, importance: torch.Tensor | None = None,
                    search: bool = True) -> torch.Tensor:
    """The values [N, K] the writer's `qtype` blocks of w stand for (no fallback)."""
    if qtype in (QT.Q4_K, QT.Q5_K):
        d, dmin, sc, m, q = _k_min_levels(w, importance, 16 if qtype == QT.Q4_K else 32,
                                          search)
        v = (d * sc).unsqueeze(-1) * q - (dmin * m).unsqueeze(-1)
    elif qtype == QT.Q6_K:
        d, sc, q = _q6_k_levels(w, importance, search)
        v = (d * sc).unsqueeze(-1) * q
    else:
        d, q = _block32_levels(w, importance, qtype, search)
        v = d * q
    return v.reshape(w.shape)


_QUANTIZERS = {QT.Q4_K: quantize_q4_k, QT.Q5_K: quantize_q5_k, QT.Q6_K: quantize_q6_k,
               QT.Q5_0: quantize_q5_0, QT.Q8_0: quantize_q8_0}


def quantize_tensor(w: torch.Tensor, qtype: QT, importance: torch.Tensor | None = None,
                    search: bool = True) -> tuple[np.ndarray, QT]:
    """(raw rows, the type used) of w [N, K] in `qtype`, falling back as llama.cpp does
    when K is not a multiple of 256; `importance` [K] weights each input column's error,
    `search` False rounds to nearest (the reference the search is measured against)."""
    if qtype in _FALLBACK and w.shape[1] % QK_K:
        qtype = _FALLBACK[qtype]
    n = w.shape[0]
    if qtype == QT.F32:
        return w.float().numpy(), qtype
    if qtype in _QUANTIZERS:
        return _QUANTIZERS[qtype](w, importance, search).reshape(n, -1), qtype
    return gguf.quants.quantize(w.float().numpy(), qtype), qtype


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth, and every third in between."""
    return (layer < n_layers // 8 or layer >= 7 * n_layers // 8
            or (layer - n_layers // 8) % 3 == 2)


def recipe_type(name: str, recipe: str, n_layers: int) -> QT | None:
    """The type `recipe` gives tensor `name` (None: a vector, kept float32)."""
    if recipe in ("Q6_K", "F32"):
        return QT[recipe]
    if recipe != "Q4_K_M":
        raise ValueError(f"unknown recipe {recipe!r}: Q4_K_M, Q6_K or F32")
    if name in ("token_embd.weight", "output.weight"):
        return QT.Q6_K
    if ".attn_v." in name or ".ffn_down." in name:
        return QT.Q6_K if _more_bits(int(name.split(".")[1]), n_layers) else QT.Q4_K
    return QT.Q4_K


def importance_from_calibration(src: str, max_tokens: int = 4096, context: int = 512
                                ) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> mean x^2 per input column of the activations entering it, over
    `calibration_text()` run through GGUF `src` in float (llama.cpp's imatrix)."""
    from peregrine.models.gguf_native import gguf_module_tensors
    from peregrine.models.loader import load_model
    from peregrine.quantization.corpus import calibration_text
    from peregrine.quantization.perplexity import perplexity

    loaded = load_model(src, quantization="none")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(module_name: str):
        def record(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[module_name] = sums.get(module_name, 0) + x.square().sum(0)
            counts[module_name] = counts.get(module_name, 0) + x.shape[0]
        return record

    tensors = gguf_module_tensors(loaded.config)
    handles = [loaded.model.get_submodule(m).register_forward_pre_hook(hook(m)) for m in tensors]
    try:
        ids = loaded.tokenizer.encode(calibration_text(), add_special_tokens=False)[:max_tokens]
        perplexity(loaded.model, ids, context=context)
    finally:
        for h in handles:
            h.remove()
    return {name: sums[m] / counts[m] for m, names in tensors.items() if m in sums
            for name in names}


def write_recipe(src: str, dst: str, recipe: str,
                 importance: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
    """Requantize every matrix of GGUF `src` into `recipe`, keeping its metadata; returns
    tensor name -> type name written. `importance` (`importance_from_calibration`) weights
    each tensor's squared error per input column."""
    f = GGUFFile(src)
    reader = gguf.GGUFReader(src)
    arch = f.metadata["general.architecture"]
    n_layers = int(f.metadata[f"{arch}.block_count"])
    w = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    written = {}
    for name, t in f.tensors.items():
        values = f.dequantize(name)
        if values.dim() < 2:
            w.add_tensor(name, values.numpy())
            written[name] = "F32"
            continue
        raw, qtype = quantize_tensor(values.reshape(values.shape[0], -1),
                                     recipe_type(name, recipe, n_layers),
                                     (importance or {}).get(name))
        w.add_tensor(name, raw, raw_dtype=qtype)
        written[name] = qtype.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written
