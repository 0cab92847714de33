"""Keep a GGUF file's quantized blocks: repack them into the kernels' int4 / int5 / int6 /
int8 layouts instead of dequantizing to float.

Every block type unpacks to w = scale * q (+ offset) per group of 16 or 32 weights
(models/gguf_quants.py). A fused linear (q/k/v, gate/up) may mix types (llama.cpp's _M
recipes give attn_v and some ffn_down more bits): its parts take the narrowest format that
holds all their integers unchanged (memory_model.gguf_native_format), signed parts shifted
to unsigned where the format is unsigned (q - qmin, offset qmin * scale: exact, qmin is a
power of two). Q4_0/Q4_1 stay int4 with float16 scales and Q8_0 int8, as stored; K-quant
scales (d * sc) keep float32. The loader's fusions carry over: Q/K rows are un-permuted and
q/k/v and gate/up are concatenated along the output dimension; tensors a file stores fused
(Phi-3's attn_qkv, ffn_up) are already in that order and are taken whole."""

from __future__ import annotations

import logging

import numpy as np
import torch

from peregrine.layers.linear import Int4Linear, Int5Linear, Int6Linear, Int8Linear, QuantLinear
from peregrine.layers.quant_formats import pack_int4, pack_int5
from peregrine.memory_model import LinearFormat, gguf_native_format
from peregrine.models.config import ModelConfig
from peregrine.models.gguf_file import QT, GGUFFile, unpermute_rope_rows
from peregrine.models.gguf_quants import BLOCK_FORMS, Unpacked, unpack

logger = logging.getLogger("peregrine")

# our fused module -> the GGUF tensors that make it, in order along the output dimension
_FUSED = {"self_attn.qkv_proj": ("attn_q", "attn_k", "attn_v"),
          "self_attn.o_proj": ("attn_output",),
          "mlp.gate_up_proj": ("ffn_gate", "ffn_up"),
          "mlp.down_proj": ("ffn_down",)}
# Architectures whose files store a module's tensors already fused, in our row order:
# Phi-3's attn_qkv is q, k, v rows and its ffn_up gate then up rows (llama.cpp's SwiGLU
# takes the first half as the gate), as qkv_proj and gate_up_proj.
_FUSED_BY_ARCH = {"phi3": {**_FUSED, "self_attn.qkv_proj": ("attn_qkv",),
                           "mlp.gate_up_proj": ("ffn_up",)}}


def _unpacked(f: GGUFFile, name: str, cfg: ModelConfig) -> Unpacked:
    """One tensor's integers, scales and offsets, rows un-permuted like the float loader."""
    t = f.tensors[name]
    u = unpack(torch.from_numpy(np.array(t.data)).reshape(-1), t.qtype, t.shape)
    if cfg.architecture == "llama" and (".attn_q." in name or ".attn_k." in name):
        heads = cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads
        u = Unpacked(unpermute_rope_rows(u.q, heads), unpermute_rope_rows(u.scale, heads),
                     None if u.offset is None else unpermute_rope_rows(u.offset, heads), u.group)
    return u


def _in_format(u: Unpacked, qtype: QT, fmt: LinearFormat) -> tuple[torch.Tensor, torch.Tensor,
                                                                     torch.Tensor | None]:
    """(q, scale, offset or None) of one part in `fmt`'s group size and integer range."""
    rep = u.group // fmt.group_size
    scale = u.scale.repeat_interleave(rep, dim=1)
    offset = None if u.offset is None else u.offset.repeat_interleave(rep, dim=1)
    q, qmin = u.q, BLOCK_FORMS[qtype].qmin
    if fmt.method != "int8" and qmin < 0:  # unsigned formats: shift, offset it back
        q, offset = q - qmin, qmin * scale
    if offset is None and (fmt.method != "int8" or fmt.offset):
        offset = torch.zeros_like(scale)
    return q, scale, offset


def native_linear(parts: list[tuple[Unpacked, QT]]) -> QuantLinear:
    """One quantized linear from unpacked GGUF tensors stacked along its rows."""
    fmt = gguf_native_format([t for _, t in parts])
    if fmt.method == "float":
        raise ValueError(f"not GGUF block types: {[t.name for _, t in parts]}")
    conv = [_in_format(u, t, fmt) for u, t in parts]
    q = torch.cat([c[0] for c in conv])
    scale = torch.cat([c[1] for c in conv])
    offset = None if conv[0][2] is None else torch.cat([c[2] for c in conv])
    if fmt.method == "int8":
        return Int8Linear(q.to(torch.int8), scale, offset=offset)
    if fmt.method == "int6":
        return Int6Linear(q.to(torch.uint8), scale, offset)
    # Q4_x/Q5_x scales and offsets (d, m, -8 d, -16 d) are exact in float16, as stored
    scale_dtype = torch.float32 if fmt.wide_scales else torch.float16
    if fmt.method == "int5":
        return Int5Linear(pack_int5(q.to(torch.uint8)), scale, offset, scale_dtype=scale_dtype)
    return Int4Linear(pack_int4(q.to(torch.uint8)), scale, offset, scale_dtype=scale_dtype)


def _linear(f: GGUFFile, names: list[str], cfg: ModelConfig) -> QuantLinear | None:
    """One quantized linear from GGUF tensors fused along rows; None when a part is not a
    block type."""
    qtypes = [f.tensors[n].qtype for n in names]
    if gguf_native_format(qtypes).method == "float":
        return None
    return native_linear([(_unpacked(f, n, cfg), t) for n, t in zip(names, qtypes)])


def gguf_module_tensors(cfg: ModelConfig) -> dict[str, list[str]]:
    """Our module name -> the GGUF tensors fused into it, in order along the output dim."""
    fused = _FUSED_BY_ARCH.get(cfg.architecture, _FUSED)
    out = {f"layers.{i}.{module}": [f"blk.{i}.{p}.weight" for p in parts]
           for i in range(cfg.num_layers) for module, parts in fused.items()}
    out["lm_head"] = ["token_embd.weight" if cfg.tie_word_embeddings else "output.weight"]
    return out


def gguf_module_types(f: GGUFFile, cfg: ModelConfig) -> dict[str, list[QT]]:
    """Our module name -> the GGUF types of its tensors (what the memory model needs)."""
    return {module: [f.tensors[n].qtype for n in names]
            for module, names in gguf_module_tensors(cfg).items()}


def gguf_quantized_linears(f: GGUFFile, cfg: ModelConfig) -> dict[str, QuantLinear]:
    """Our module name -> quantized linear for every linear of the file stored in block
    types (float ones are left out)."""
    out: dict[str, QuantLinear] = {}
    for module, names in gguf_module_tensors(cfg).items():
        lin = _linear(f, names, cfg)
        if lin is None:
            logger.info("%s: not in GGUF block types, kept float", module)
        else:
            out[module] = lin
    return out
