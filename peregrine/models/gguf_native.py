"""Keep a GGUF file's Q8_0 / Q4_0 / Q4_1 blocks quantized: repack them into our int8 and
int4 layouts (group size 32) instead of dequantizing to float.

Q8_0 (w = d * q) is Int8Linear with one scale per 32 weights; Q4_1 (w = d * q + m) is
Int4Linear with scale d and offset m; Q4_0 (w = d * (q - 8)) is offset -8 d. The loader's
fusions carry over: Q/K rows are un-permuted (a pure row permutation of the blocks) and
q/k/v and gate/up are concatenated along the output dimension."""

from __future__ import annotations

import logging

import numpy as np
import torch

from peregrine.layers.linear import Int4Linear, Int8Linear, QuantLinear
from peregrine.memory_model import gguf_native_format
from peregrine.models.config import ModelConfig
from peregrine.models.gguf_file import QT, GGUFFile, split_blocks, unpermute_rope_rows
from peregrine.layers.quant_formats import pack_int4

logger = logging.getLogger("peregrine")

# our fused module -> the GGUF tensors that make it, in order along the output dimension
_FUSED = {"self_attn.qkv_proj": ("attn_q", "attn_k", "attn_v"),
          "self_attn.o_proj": ("attn_output",),
          "mlp.gate_up_proj": ("ffn_gate", "ffn_up"),
          "mlp.down_proj": ("ffn_down",)}


def _blocks(f: GGUFFile, name: str, cfg: ModelConfig
            ) -> tuple[QT, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(type, q [N, K] int16, d [N, K/32], m [N, K/32] or None) of one tensor, rows
    un-permuted like the float loader does."""
    t = f.tensors[name]
    n, k = t.shape
    raw = torch.from_numpy(np.array(t.data)).reshape(-1)
    d, m, q = split_blocks(raw, t.qtype)
    q, d = q.reshape(n, k), d.reshape(n, k // 32)
    m = None if m is None else m.reshape(n, k // 32)
    if cfg.architecture == "llama" and (".attn_q." in name or ".attn_k." in name):
        heads = cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads
        q, d = unpermute_rope_rows(q, heads), unpermute_rope_rows(d, heads)
        m = None if m is None else unpermute_rope_rows(m, heads)
    return t.qtype, q, d, m


def _linear(f: GGUFFile, names: list[str], cfg: ModelConfig) -> QuantLinear | None:
    """One quantized linear from GGUF tensors fused along rows; None when they are not all
    of one kind (int8 vs int4) of quantized type."""
    fmt = gguf_native_format([f.tensors[n].qtype for n in names])
    if fmt.method == "float":
        return None
    parts = [_blocks(f, n, cfg) for n in names]
    if fmt.method == "int8":
        q = torch.cat([p[1] for p in parts]).to(torch.int8)
        d = torch.cat([p[2] for p in parts])
        return Int8Linear(q, d)
    qs, scales, offsets = [], [], []
    for qtype, q, d, m in parts:
        if qtype == QT.Q4_0:  # split_blocks returned q - 8
            q, m = q + 8, -8.0 * d
        qs.append(q)
        scales.append(d)
        offsets.append(m)
    q = torch.cat(qs).to(torch.uint8)
    # d and m come from float16 fields, and -8 d is exact in float16: no rounding here
    return Int4Linear(pack_int4(q), torch.cat(scales).half(), torch.cat(offsets).half())


def gguf_module_tensors(cfg: ModelConfig) -> dict[str, list[str]]:
    """Our module name -> the GGUF tensors fused into it, in order along the output dim."""
    out = {f"layers.{i}.{module}": [f"blk.{i}.{p}.weight" for p in parts]
           for i in range(cfg.num_layers) for module, parts in _FUSED.items()}
    out["lm_head"] = ["token_embd.weight" if cfg.tie_word_embeddings else "output.weight"]
    return out


def gguf_module_types(f: GGUFFile, cfg: ModelConfig) -> dict[str, list[QT]]:
    """Our module name -> the GGUF types of its tensors (what the memory model needs)."""
    return {module: [f.tensors[n].qtype for n in names]
            for module, names in gguf_module_tensors(cfg).items()}


def gguf_quantized_linears(f: GGUFFile, cfg: ModelConfig) -> dict[str, QuantLinear]:
    """Our module name -> quantized linear for every linear of the file that is stored in
    Q8_0 / Q4_0 / Q4_1 (others stay float and are left out)."""
    out: dict[str, QuantLinear] = {}
    for module, names in gguf_module_tensors(cfg).items():
        lin = _linear(f, names, cfg)
        if lin is None:
            logger.info("%s: not in one quantized GGUF type, kept float", module)
        else:
            out[module] = lin
    return out
