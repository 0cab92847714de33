"""Reading GGUF files: metadata, tensors, and dequantization (F32/F16/BF16 and the block
types of gguf_quants.py: Q4_0/1, Q5_0/1, Q8_0, Q2_K..Q6_K, IQ4_NL/XS).

The header parser is ours: the `gguf` package's reader builds a numpy view per string and
takes seconds on a 49k-token vocabulary; this one reads the same header in a fraction of
that. The `gguf` package supplies the type constants and is the tests' reference. Tensor
data stays memory-mapped until a tensor is asked for."""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from peregrine.models.errors import ModelLoadError
from peregrine.models.gguf_quants import BLOCK_FORMS, unpack

if TYPE_CHECKING:
    from peregrine.models.config import ModelConfig

try:
    import gguf
except ImportError as e:  # pragma: no cover - gguf is a hard dependency
    raise ImportError("the `gguf` package is required: pip install gguf") from e

QT = gguf.GGMLQuantizationType
SUPPORTED_TYPES = {QT.F32, QT.F16, QT.BF16, *BLOCK_FORMS}
_MAGIC = b"GGUF"
# GGUF value types -> struct formats of the scalar ones (8: string, 9: array).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}


@dataclass
class GGUFTensor:
    """One tensor of the file: its name, type, logical shape (rows first) and raw data."""

    name: str
    qtype: "gguf.GGMLQuantizationType"
    shape: tuple[int, ...]  # torch order: [out_features, in_features] for matrices
    data: np.ndarray  # a read-only uint8 view of the mapped file


class _Cursor:
    """Sequential little-endian reads over a bytes-like buffer."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            item_type, count = self.scalar("I"), self.scalar("Q")
            if item_type in _SCALAR:  # one unpack for the whole array
                fmt = _SCALAR[item_type]
                values = list(struct.unpack_from(f"<{count}{fmt}", self.buf, self.pos))
                self.pos += count * struct.calcsize(fmt)
                return values
            return [self.value(item_type) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {vtype}")


class GGUFFile:
    """A parsed GGUF file: `metadata` (dict) and `tensors` (name -> GGUFTensor)."""

    def __init__(self, path: str) -> None:
        if not os.path.isfile(path):
            raise ModelLoadError(f"GGUF file not found: {path}")
        self.path = path
        with open(path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # empty file
                raise ModelLoadError(f"{path} is not a valid GGUF file (empty)") from None
        try:
            self._parse()
        except ModelLoadError:
            raise
        except Exception as e:  # struct.error, UnicodeDecodeError, ValueError on bad bytes
            raise ModelLoadError(f"{path} is not a valid GGUF file (corrupt header: "
                                 f"{type(e).__name__}: {e})") from None

    def _parse(self) -> None:
        cur = _Cursor(self._map)
        if bytes(self._map[:4]) != _MAGIC:
            raise ModelLoadError(f"{self.path} is not a GGUF file (bad magic "
                                 f"{bytes(self._map[:4])!r})")
        cur.pos = 4
        version = cur.scalar("I")
        if version not in (2, 3):
            raise ModelLoadError(f"{self.path}: unsupported GGUF version {version}")
        n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar("Q") for _ in range(cur.scalar("I"))]
            infos.append((name, dims, cur.scalar("I"), cur.scalar("Q")))
        align = int(self.metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        data_start = -(-cur.pos // align) * align
        whole = np.frombuffer(self._map, dtype=np.uint8)
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, type_id, offset in infos:
            try:
                qtype = QT(type_id)
            except ValueError:
                raise ModelLoadError(f"{self.path}: tensor {name} has unknown type {type_id}"
                                     ) from None
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(dims)) // block * type_size
            start = data_start + offset
            if start + nbytes > len(whole):
                raise ModelLoadError(f"{self.path}: tensor {name} runs past the end of the "
                                     "file (truncated download?)")
            shape = tuple(int(d) for d in reversed(dims))
            self.tensors[name] = GGUFTensor(name, qtype, shape, whole[start:start + nbytes])

    def dequantize(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor `name` as a float tensor of its logical shape."""
        t = self.tensors[name]
        return dequantize(t.data, t.qtype, t.shape, name).to(dtype)


def dequantize(data: np.ndarray, qtype: "gguf.GGMLQuantizationType",
               shape: tuple[int, ...], name: str = "") -> torch.Tensor:
    """Float32 values of raw GGUF tensor data of type `qtype` and logical `shape`."""
    if qtype not in SUPPORTED_TYPES:
        what = f"tensor {name} has" if name else "tensor of"
        raise ModelLoadError(f"unsupported GGUF type: {what} type {qtype.name}; peregrine "
                             f"reads {', '.join(sorted(t.name for t in SUPPORTED_TYPES))}")
    raw = torch.from_numpy(np.array(data)).reshape(-1).view(torch.uint8)  # copy: mmap is read-only
    if qtype == QT.F32:
        return raw.view(torch.float32).reshape(shape)
    if qtype == QT.F16:
        return raw.view(torch.float16).reshape(shape).float()
    if qtype == QT.BF16:
        return raw.view(torch.bfloat16).reshape(shape).float()
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return unpack(raw, qtype, (rows, shape[-1])).dequantize().reshape(shape)


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of Q/K (interleaved RoPE pairs -> rotate-half)."""
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def rope_permuted_heads(cfg: ModelConfig, name: str) -> int | None:
    """The head count of tensor `name` when llama.cpp permuted its rows for RoPE (Q/K of
    the llama architecture, Mixtral's included), else None."""
    if cfg.architecture not in ("llama", "mixtral"):
        return None
    if ".attn_q." in name:
        return cfg.num_heads
    return cfg.num_kv_heads if ".attn_k." in name else None
