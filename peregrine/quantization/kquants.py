"""Write a GGUF model in llama.cpp's K-quant recipes (Q4_K_M, Q6_K) from another GGUF file.

The quantizers here are plain round-to-nearest (per sub-block min/max or absmax, scales
rounded to 6/8 bits); llama.cpp's `llama-quantize` searches scales and makes somewhat
better files of the same layout. What they are for: making K-quant files where
llama-quantize is not at hand (the tests, CI), with the same tensor types per recipe:

  Q4_K_M  attn_v and ffn_down of the first and last eighth of the layers and every third
          layer between them in Q6_K, the other matrices in Q4_K, token_embd/output Q6_K;
  Q6_K    every matrix in Q6_K;
  F32     every matrix in float32 (what llama-quantize takes as its input).

Rows whose length is not a multiple of 256 fall back as llama.cpp does (Q4_K -> Q5_0,
Q6_K -> Q8_0): SmolLM2's hidden size, 576, is one of them."""

from __future__ import annotations

import gguf
import numpy as np
import torch

from peregrine.models.gguf_file import QT, GGUFFile

QK_K = 256
_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [nb] -> float16 bytes [nb, 2]."""
    return x.half().contiguous().view(torch.uint8).reshape(-1, 2)


def _quantize_k_min(w: torch.Tensor, levels: int) -> np.ndarray:
    """Q4_K (16 levels, 144 bytes per 256 weights) or Q5_K (32 levels, 176 bytes) blocks of
    w [N, K], K a multiple of 256: per 32 weights a 6-bit scale and minimum."""
    x = w.float().reshape(-1, 8, 32)
    nb = x.shape[0]
    lo = x.amin(-1).clamp(max=0)  # w = d sc q - dmin m with m >= 0: the minimum is <= 0
    scale = (x.amax(-1) - lo) / (levels - 1)
    d = scale.amax(-1, keepdim=True) / 63
    dmin = (-lo).amax(-1, keepdim=True) / 63
    d, dmin = d.half().float(), dmin.half().float()
    sc = torch.round(scale / torch.where(d == 0, 1.0, d)).clamp(0, 63)
    m = torch.round(-lo / torch.where(dmin == 0, 1.0, dmin)).clamp(0, 63)
    step = (d * sc).unsqueeze(-1)
    q = torch.round((x + (dmin * m).unsqueeze(-1)) / torch.where(step == 0, 1.0, step))
    q = q.clamp(0, levels - 1).to(torch.uint8).reshape(nb, 4, 2, 32)
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


def quantize_q4_k(w: torch.Tensor) -> np.ndarray:
    """Q4_K blocks (144 bytes per 256 weights) of w [N, K], K a multiple of 256."""
    return _quantize_k_min(w, 16)


def quantize_q5_k(w: torch.Tensor) -> np.ndarray:
    """Q5_K blocks (176 bytes per 256 weights) of w [N, K], K a multiple of 256."""
    return _quantize_k_min(w, 32)


def quantize_q6_k(w: torch.Tensor) -> np.ndarray:
    """Q6_K blocks (210 bytes per 256 weights) of w [N, K], K a multiple of 256."""
    x = w.float().reshape(-1, 16, 16)
    nb = x.shape[0]
    scale = x.abs().amax(-1) / 31
    d = (scale.amax(-1, keepdim=True) / 127).half().float()
    sc = torch.round(scale / torch.where(d == 0, 1.0, d)).clamp(-128, 127)
    step = (d * sc).unsqueeze(-1)
    q = torch.round(x / torch.where(step == 0, 1.0, step)).clamp(-32, 31) + 32
    q = q.to(torch.uint8).reshape(nb, 2, 128)  # two halves of 128 weights
    ql = (q[:, :, :64] & 0xF) | ((q[:, :, 64:] & 0xF) << 4)
    qh = torch.zeros(nb, 2, 32, dtype=torch.uint8)
    for s in range(4):
        qh |= ((q[:, :, 32 * s:32 * s + 32] >> 4) & 3) << (2 * s)
    return torch.cat([ql.reshape(nb, 128), qh.reshape(nb, 64),
                      sc.to(torch.int8).view(torch.uint8), _f16_bytes(d[:, 0])], 1).numpy()


def quantize_tensor(w: torch.Tensor, qtype: QT) -> tuple[np.ndarray, QT]:
    """(raw rows, the type used) of w [N, K] in `qtype`, falling back as llama.cpp does
    when K is not a multiple of 256."""
    if qtype in _FALLBACK and w.shape[1] % QK_K:
        qtype = _FALLBACK[qtype]
    n = w.shape[0]
    if qtype == QT.F32:
        return w.float().numpy(), qtype
    if qtype == QT.Q4_K:
        return quantize_q4_k(w).reshape(n, -1), qtype
    if qtype == QT.Q5_K:
        return quantize_q5_k(w).reshape(n, -1), qtype
    if qtype == QT.Q6_K:
        return quantize_q6_k(w).reshape(n, -1), qtype
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


def write_recipe(src: str, dst: str, recipe: str) -> dict[str, str]:
    """Requantize every matrix of GGUF `src` into `recipe`, keeping its metadata; returns
    tensor name -> type name written."""
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
                                     recipe_type(name, recipe, n_layers))
        w.add_tensor(name, raw, raw_dtype=qtype)
        written[name] = qtype.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written
