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
(Phi-3's attn_qkv, ffn_up) are already in that order and are taken whole.

A mixture of experts' routed experts are stored stacked, ffn_{gate,up,down}_exps
[E, rows, cols]: each tensor is unpacked once and sliced per expert, expert e's gate_up
being its gate rows then its up rows (as FusedExperts stacks them); the loader builds
QuantExperts from them. A layer's experts are kept only all together (QuantExperts has no
float expert). The router and Qwen2-MoE's shared-expert gate stay float (memory_model
.always_float); the shared expert is a dense MLP like any other."""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
import torch

from peregrine.layers.linear import Int4Linear, Int5Linear, Int6Linear, Int8Linear, QuantLinear
from peregrine.layers.quant_formats import pack_int4, pack_int5
from peregrine.memory_model import LinearFormat, gguf_native_format
from peregrine.models.config import ModelConfig
from peregrine.models.gguf_file import (QT, GGUFFile, rope_permuted_heads,
                                        unpermute_rope_rows)
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
    """One tensor's integers, scales and offsets, rows un-permuted like the float loader;
    stacked experts [E, rows, cols] come as [E * rows, cols]."""
    t = f.tensors[name]
    rows = math.prod(t.shape[:-1])
    u = unpack(torch.from_numpy(np.array(t.data)).reshape(-1), t.qtype, (rows, t.shape[-1]))
    heads = rope_permuted_heads(cfg, name)
    if heads is not None:
        u = u.map_rows(lambda t: unpermute_rope_rows(t, heads))
    return u


def _expert_rows(u: Unpacked, expert: int, num_experts: int) -> Unpacked:
    """Expert `expert`'s rows of a stacked experts tensor unpacked as [E * rows, cols]."""
    n = u.q.shape[0] // num_experts
    return u.map_rows(lambda t: t[expert * n:(expert + 1) * n])


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


def _sub_in_format(u: Unpacked, qtype: QT, fmt: LinearFormat) -> list[torch.Tensor]:
    """_in_format's scale and offset as stored (int8 sub-block values, float32 factor per
    super-block): [scale_sub, scale_super, offset_sub, offset_super]; `fmt` is unsigned with
    offsets (int4/int5/int6)."""
    rep = u.group // fmt.group_size
    sub = u.sub
    scale_sub = sub.scale_sub.repeat_interleave(rep, dim=1)
    qmin = BLOCK_FORMS[qtype].qmin
    if qmin < 0:  # shifted as _in_format shifts it: offset qmin * d * sc (qmin a power of 2)
        return [scale_sub, sub.scale_super, scale_sub, qmin * sub.scale_super]
    return [scale_sub, sub.scale_super, sub.offset_sub.repeat_interleave(rep, dim=1),
            sub.offset_super]


def native_linear(parts: list[tuple[Unpacked, QT]]) -> QuantLinear:
    """One quantized linear from unpacked GGUF tensors stacked along its rows; K-quant
    parts keep their scales compact (`LinearFormat.sub_scales`)."""
    fmt = gguf_native_format([t for _, t in parts])
    if fmt.method == "float":
        raise ValueError(f"not GGUF block types: {[t.name for _, t in parts]}")
    conv = [_in_format(u, t, fmt) for u, t in parts]
    q = torch.cat([c[0] for c in conv])
    scale = torch.cat([c[1] for c in conv])
    offset = None if conv[0][2] is None else torch.cat([c[2] for c in conv])
    if fmt.sub_scales:
        sub = [torch.cat(c) for c in zip(*(_sub_in_format(u, t, fmt) for u, t in parts))]
        if fmt.shared_offsets:  # signed types' offsets are qmin * scale: one copy of sc
            sub[2] = sub[0]
        compact = {"scale_super": sub[1], "offset_super": sub[3]}
        scale, offset = sub[0], sub[2]
        if fmt.method == "int6":
            return Int6Linear(q.to(torch.uint8), scale, offset, **compact)
        if fmt.method == "int5":
            return Int5Linear(pack_int5(q.to(torch.uint8)), scale, offset, **compact)
        return Int4Linear(pack_int4(q.to(torch.uint8)), scale, offset, **compact)
    if fmt.method == "int8":
        return Int8Linear(q.to(torch.int8), scale, offset=offset)
    if fmt.method == "int6":
        return Int6Linear(q.to(torch.uint8), scale, offset)
    # Q4_x/Q5_x scales and offsets (d, m, -8 d, -16 d) are exact in float16, as stored
    scale_dtype = torch.float32 if fmt.wide_scales else torch.float16
    if fmt.method == "int5":
        return Int5Linear(pack_int5(q.to(torch.uint8)), scale, offset, scale_dtype=scale_dtype)
    return Int4Linear(pack_int4(q.to(torch.uint8)), scale, offset, scale_dtype=scale_dtype)


# One part of a linear: a GGUF tensor and, for stacked experts [E, rows, cols], the expert
Part = tuple[str, int | None]


def _layer_parts(cfg: ModelConfig, i: int) -> dict[str, list[Part]]:
    """Layer `i`'s modules -> their parts, in order along the output dim. A sparse layer's
    MLP is its experts (each expert's gate_up and down, named as memory_model names them)
    and Qwen2-MoE's shared expert; the router and the shared expert's gate stay float."""
    fused = _FUSED_BY_ARCH.get(cfg.architecture, _FUSED)
    blk = f"blk.{i}."
    sparse = cfg.is_moe_layer(i)
    out = {f"layers.{i}.{module}": [(f"{blk}{p}.weight", None) for p in parts]
           for module, parts in fused.items() if not (sparse and module.startswith("mlp."))}
    if not sparse:
        return out
    experts = range(cfg.num_experts)
    out.update({f"layers.{i}.mlp.experts.gate_up_proj.{e}": [
        (f"{blk}ffn_gate_exps.weight", e), (f"{blk}ffn_up_exps.weight", e)] for e in experts})
    out.update({f"layers.{i}.mlp.experts.down_proj.{e}": [(f"{blk}ffn_down_exps.weight", e)]
                for e in experts})
    if cfg.shared_expert_intermediate_size:
        out[f"layers.{i}.mlp.shared_expert.gate_up_proj"] = [
            (f"{blk}ffn_gate_shexp.weight", None), (f"{blk}ffn_up_shexp.weight", None)]
        out[f"layers.{i}.mlp.shared_expert.down_proj"] = [(f"{blk}ffn_down_shexp.weight", None)]
    return out


def _module_parts(cfg: ModelConfig) -> dict[str, list[Part]]:
    """Our module name -> its parts, every layer's and the LM head's."""
    out: dict[str, list[Part]] = {}
    for i in range(cfg.num_layers):
        out.update(_layer_parts(cfg, i))
    out["lm_head"] = [("token_embd.weight" if cfg.tie_word_embeddings else "output.weight",
                       None)]
    return out


def gguf_module_tensors(cfg: ModelConfig) -> dict[str, list[str]]:
    """Our module name -> the GGUF tensors fused into it, in order along the output dim."""
    return {module: [name for name, _ in parts] for module, parts in _module_parts(cfg).items()}


def gguf_module_types(f: GGUFFile, cfg: ModelConfig) -> dict[str, list[QT]]:
    """Our module name -> the GGUF types of its tensors (what the memory model needs)."""
    return {module: [f.tensors[n].qtype for n in names]
            for module, names in gguf_module_tensors(cfg).items()}


def gguf_quantized_linears(f: GGUFFile, cfg: ModelConfig) -> dict[str, QuantLinear]:
    """Our module name -> quantized linear for every linear of the file stored in block
    types (float ones are left out, and a sparse layer's experts unless all of them are
    kept)."""
    # each stacked experts tensor is unpacked once for all its experts; gate_up alternates
    # two of them, so two at a time bound the memory to a layer's largest pair
    unpacked = functools.lru_cache(maxsize=2)(lambda name: _unpacked(f, name, cfg))
    out: dict[str, QuantLinear] = {}
    for module, parts in _module_parts(cfg).items():
        qtypes = [f.tensors[name].qtype for name, _ in parts]
        if gguf_native_format(qtypes).method == "float":
            if parts[0][1] is None:  # experts: logged once per layer below
                logger.info("%s: not in GGUF block types, kept float", module)
            continue
        out[module] = native_linear([
            (unpacked(name) if e is None else _expert_rows(unpacked(name), e, cfg.num_experts),
             t) for (name, e), t in zip(parts, qtypes)])
    _drop_partial_experts(f, cfg, out)
    return out


def _drop_partial_experts(f: GGUFFile, cfg: ModelConfig, out: dict[str, QuantLinear]) -> None:
    """Take a sparse layer's expert linears out of `out` unless every one is there:
    QuantExperts holds both projections of every expert, the float experts all of them."""
    for i in range(cfg.num_layers):
        if not cfg.is_moe_layer(i):
            continue
        names = [f"layers.{i}.mlp.experts.{proj}.{e}" for proj in ("gate_up_proj", "down_proj")
                 for e in range(cfg.num_experts)]
        if all(n in out for n in names):
            continue
        for n in names:
            out.pop(n, None)
        types = {p: f.tensors[f"blk.{i}.ffn_{p}_exps.weight"].qtype.name
                 for p in ("gate", "up", "down")}
        logger.info("layers.%d.mlp.experts: not all in GGUF block types (%s), kept float", i,
                    ", ".join(f"ffn_{p}_exps {t}" for p, t in types.items()))
