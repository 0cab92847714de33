"""Linear layers. `Linear` is the dense float path; quantized methods replace it at load.

A quantized linear keeps its weight packed (see peregrine/layers/quant_formats.py) and
picks one of four paths per call:
  - CPU, float32, int4 weights, any rows: int8 dot products against activations quantized
    per 32 values, four scales each (q8_decode.cpp), faster than a float GEMM at every
    batch size;
  - CPU, float32, few rows (decode), other formats: our C++ kernels (quant_linear.cpp):
    int16 dot products for int8 weights, dequantization in registers for nf4/fp8;
  - CPU, many rows (prefill) or no kernel: dequantize the whole weight, then one matmul
    (compute-bound there, so MKL's GEMM wins over any dequantizing loop);
  - CUDA: the Triton dequant-GEMM (fp8: torch._scaled_mm on GPUs that have it).
`forward_reference` is the plain torch path every other path is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peregrine.layers import quant_formats as formats

# Rows up to which the C++ kernel runs; above, dequantize + MKL GEMM (compute-bound there).
# At 32 rows the kernel still wins on the 2-core EPYC (12288x1152 int4, one thread:
# 17.5 ms vs 19.3 ms for MKL on the float matrix, before counting the dequantization).
KERNEL_MAX_ROWS = 32


class Linear(nn.Module):
    """y = x W^T (+ b) with W stored [out_features, in_features] in the compute dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored quantized; subclasses define the format."""

    method = ""  # the --quantization name of the format
    int8_dot = False  # runs on q8_decode.cpp's int8 dot products (int4, int6)
    kernel_kind = -1  # q8_decode.cpp's weight kind (0 int4, 1 int8, 2 int6, 3 int5); -1: by dtype

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    # --- per format ---------------------------------------------------------------------------
    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] this layer computes with (the torch reference)."""
        raise NotImplementedError

    def _cpu_kernel(self, ops, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T by the C++ kernel (x float32 contiguous [M, K])."""
        raise NotImplementedError

    def _cpu_dequantize(self, ops) -> torch.Tensor:
        """The float32 weight, dequantized by the C++ code (parallel, vectorized)."""
        raise NotImplementedError

    def _cuda_matmul(self, x: torch.Tensor) -> torch.Tensor:
        from peregrine.kernels.triton_quant import quant_matmul
        return quant_matmul(x, self)

    # --- shared --------------------------------------------------------------------------------
    def _set_scales(self, scale: torch.Tensor, offset: torch.Tensor | None, dtype: torch.dtype,
                    scale_super: torch.Tensor | None = None,
                    offset_super: torch.Tensor | None = None) -> None:
        """Register scale and offset [N, S] in `dtype`, or, given the super-block factors
        [N, K / 256] of GGUF K-quants, as their int8 sub-block values (the kernels multiply
        them out: memory_model.LinearFormat.sub_scales)."""
        compact = scale_super is not None
        if compact and (offset is None) != (offset_super is None):
            raise ValueError("an int8 sub-block offset needs its super-block factors")
        kind = torch.int8 if compact else dtype
        self.register_buffer("scale", scale.to(kind).contiguous())
        self.register_buffer("offset", None if offset is None else offset.to(kind).contiguous())
        self.register_buffer("scale_super", None if not compact
                             else scale_super.float().contiguous())
        self.register_buffer("offset_super", None if offset_super is None
                             else offset_super.float().contiguous())

    def float_scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale, offset or None) as float32 [N, S], sub-block values multiplied out."""
        offset = getattr(self, "offset", None)
        sup = getattr(self, "scale_super", None)
        if sup is None:
            return self.scale.float(), None if offset is None else offset.float()
        n, s = self.scale.shape
        per = s // sup.shape[1]
        scale = (self.scale.float().reshape(n, -1, per) * sup.unsqueeze(-1)).reshape(n, s)
        if offset is not None:
            offset = (offset.float().reshape(n, -1, per)
                      * self.offset_super.unsqueeze(-1)).reshape(n, s)
        return scale, offset

    def plain(self) -> "QuantLinear":
        """This layer with float32 scales (itself when they are not sub-block values): for
        what slices the scales or reads them directly (tensor parallelism, Triton)."""
        if getattr(self, "scale_super", None) is None:
            return self
        scale, offset = self.float_scales()
        bias = None if self.bias is None else self.bias.data
        extra = {} if isinstance(self, Int6Linear) else {"scale_dtype": torch.float32}
        return type(self)(self.qweight, scale, offset, bias, **extra)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.is_cuda:
            y = self._cuda_matmul(x2)
        else:
            y = self._cpu_forward(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def _cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
        from peregrine.kernels.cpu import q8_ops, quant_ops
        if self.int8_dot and x.dtype == torch.float32 and (q8 := q8_ops()) is not None:
            return q8.q8_linear(x, self.qweight, self.scale, getattr(self, "offset", None), None,
                                self.group_size or 0, self.kernel_kind,
                                getattr(self, "scale_super", None),
                                getattr(self, "offset_super", None))
        ops = quant_ops() if x.dtype == torch.float32 else None
        if ops is None:
            return F.linear(x, self.dequantize().to(x.dtype))
        if x.shape[0] <= KERNEL_MAX_ROWS:
            return self._cpu_kernel(ops, x.contiguous())
        return F.linear(x, self._cpu_dequantize(ops))

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The torch reference: dequantize, then a float matmul."""
        y = F.linear(x, self.dequantize().to(x.dtype))
        return y if self.bias is None else y + self.bias

    def weight_bytes(self) -> int:
        """Bytes of the stored weight (packed values and scales, bias excluded)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers())

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, method={self.method}, "
                f"bias={self.bias is not None}")


class Int8Linear(QuantLinear):
    """int8 weights, symmetric, one float32 scale per output channel (or per group)."""

    method = "int8"
    # int8 weights against int8 activations need the sign trick (|w| . sign(x, w)), which
    # measured 2.5x slower on AVX2 than widening both to int16 (quant_linear.cpp's kernel):
    # the 49k-row Q8_0 LM head of SmolLM2 takes 2.2 ms there against 5.5 ms (one thread):
    # int8_dot (below) is off unless the format needs it.

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> None:
        super().__init__(qweight.shape[1], qweight.shape[0], bias)
        scale = scale.float().reshape(qweight.shape[0], -1)
        self.group_size = formats.infer_group_size(self.in_features, scale.shape[1])
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("offset", None if offset is None
                             else offset.float().reshape(scale.shape).contiguous())

    @property
    def int8_dot(self) -> bool:
        """GGUF K-quant rows fused with Q8_0 ones keep their minimums as offsets: those, and
        groups of 16, exist only in the int8-dot kernel."""
        return self.offset is not None or self.group_size == 16

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None,
                   group_size: int | None = None) -> "Int8Linear":
        q, s = formats.quantize_int8(w, group_size)
        return cls(q, s, bias)

    def dequantize(self) -> torch.Tensor:
        return formats.dequantize_int8(self.qweight, self.scale, self.group_size, self.offset)

    def _cpu_kernel(self, ops, x: torch.Tensor) -> torch.Tensor:
        return ops.int8_linear(x, self.qweight, self.scale, self.group_size or 0)

    def _cpu_dequantize(self, ops) -> torch.Tensor:
        return ops.int8_dequantize(self.qweight, self.scale, self.group_size or 0)


class Int4Linear(QuantLinear):
    """Group-wise int4 weights, w = scale * q + offset (asymmetric, symmetric, GGUF Q4_0/1)."""

    method = "int4"
    int8_dot = True

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                 bias: torch.Tensor | None = None, scale_dtype: torch.dtype = torch.float16,
                 scale_super: torch.Tensor | None = None,
                 offset_super: torch.Tensor | None = None) -> None:
        super().__init__(qweight.shape[1] * 2, qweight.shape[0], bias)
        self.group_size = formats.infer_group_size(self.in_features, scale.shape[1])
        self.register_buffer("qweight", qweight.to(torch.uint8).contiguous())
        # float32 only for GGUF K-quants, whose scales (d * sc) float16 would round
        self._set_scales(scale, offset, scale_dtype, scale_super, offset_super)

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None,
                   group_size: int | None = 128, symmetric: bool = False) -> "Int4Linear":
        return cls(*formats.quantize_int4(w, group_size, symmetric), bias)

    def dequantize(self) -> torch.Tensor:
        scale, offset = self.float_scales() if self.scale_super is not None else (
            self.scale, self.offset)
        return formats.dequantize_int4(self.qweight, scale, offset, self.group_size)

    def _cpu_kernel(self, ops, x: torch.Tensor) -> torch.Tensor:
        lin = self.plain()
        return ops.int4_linear(x, lin.qweight, lin.scale, lin.offset, self.group_size or 0)

    def _cpu_dequantize(self, ops) -> torch.Tensor:
        lin = self.plain()
        return ops.int4_dequantize(lin.qweight, lin.scale, lin.offset, self.group_size or 0)


class Int5Linear(QuantLinear):
    """GGUF's 5-bit weights (Q5_0, Q5_1, Q5_K) as the file packs them: low nibbles plus a
    plane of fifth bits, w = scale * q + offset with q in 0..31 (see quant_formats)."""

    method = "int5"
    int8_dot = True
    kernel_kind = 3

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                 bias: torch.Tensor | None = None, scale_dtype: torch.dtype = torch.float32,
                 scale_super: torch.Tensor | None = None,
                 offset_super: torch.Tensor | None = None) -> None:
        super().__init__(qweight.shape[1] // 5 * 8, qweight.shape[0], bias)
        self.group_size = formats.infer_group_size(self.in_features, scale.shape[1])
        self.register_buffer("qweight", qweight.to(torch.uint8).contiguous())
        self._set_scales(scale, offset, scale_dtype, scale_super, offset_super)

    def dequantize(self) -> torch.Tensor:
        scale, offset = self.float_scales()
        return formats.dequantize_int8(formats.unpack_int5(self.qweight), scale,
                                       self.group_size, offset)

    def _cuda_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.dequantize().to(x.dtype))


class Int6Linear(QuantLinear):
    """GGUF's 6-bit weights (Q6_K, and 5-bit ones fused with them) one per byte,
    w = scale * q + offset with q in 0..63: unsigned, so the int8-dot kernel multiplies them
    as they are. (Packed as the file packs them, 6 bits a weight, the unpacking cost more than
    the bytes saved: 24-30% slower on AVX2 at one and two threads.)"""

    method = "int6"
    int8_dot = True
    kernel_kind = 2

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                 bias: torch.Tensor | None = None, scale_super: torch.Tensor | None = None,
                 offset_super: torch.Tensor | None = None) -> None:
        super().__init__(qweight.shape[1], qweight.shape[0], bias)
        if qweight.numel() and (qweight.min() < 0 or qweight.max() > 63):
            raise ValueError("int6 weights must lie in 0..63")
        self.group_size = formats.infer_group_size(self.in_features, scale.shape[1])
        self.register_buffer("qweight", qweight.to(torch.uint8).contiguous())
        self._set_scales(scale, offset, torch.float32, scale_super, offset_super)

    def dequantize(self) -> torch.Tensor:
        scale, offset = self.float_scales()
        return formats.dequantize_int8(self.qweight, scale, self.group_size, offset)


class NF4Linear(QuantLinear):
    """NF4 weights (bitsandbytes' normal-float levels) with group-wise absmax scales."""

    method = "nf4"

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__(qweight.shape[1] * 2, qweight.shape[0], bias)
        self.group_size = formats.infer_group_size(self.in_features, scale.shape[1])
        self.register_buffer("qweight", qweight.to(torch.uint8).contiguous())
        self.register_buffer("scale", scale.half().contiguous())
        self.register_buffer("levels", formats.NF4_LEVELS.clone(), persistent=False)

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None,
                   group_size: int | None = 64) -> "NF4Linear":
        return cls(*formats.quantize_nf4(w, group_size), bias)

    def dequantize(self) -> torch.Tensor:
        return formats.dequantize_nf4(self.qweight, self.scale, self.group_size)

    def _cpu_kernel(self, ops, x: torch.Tensor) -> torch.Tensor:
        return ops.nf4_linear(x, self.qweight, self.scale, self.levels, self.group_size or 0)

    def _cpu_dequantize(self, ops) -> torch.Tensor:
        return ops.nf4_dequantize(self.qweight, self.scale, self.levels, self.group_size or 0)


class FP8Linear(QuantLinear):
    """float8 e4m3 weights with one float32 scale per output channel."""

    method = "fp8"

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__(qweight.shape[1], qweight.shape[0], bias)
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.float().reshape(-1).contiguous())

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> "FP8Linear":
        return cls(*formats.quantize_fp8(w), bias)

    def dequantize(self) -> torch.Tensor:
        return formats.dequantize_fp8(self.qweight, self.scale)

    def _cpu_kernel(self, ops, x: torch.Tensor) -> torch.Tensor:
        return ops.fp8_linear(x, self.qweight.view(torch.int8), self.scale)

    def _cpu_dequantize(self, ops) -> torch.Tensor:
        return ops.fp8_dequantize(self.qweight.view(torch.int8), self.scale)

    def _cuda_matmul(self, x: torch.Tensor) -> torch.Tensor:
        if torch.cuda.get_device_capability(x.device) >= (8, 9):
            # Hopper/Ada: fp8 tensor cores. x is scaled to fp8 per row, W per column.
            xs = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / formats.FP8_MAX
            xq = (x.float() / xs).to(torch.float8_e4m3fn)
            y = torch._scaled_mm(xq, self.qweight.t(), scale_a=xs,
                                 scale_b=self.scale.view(1, -1), out_dtype=x.dtype)
            return y
        return F.linear(x, self.dequantize().to(x.dtype))


QUANT_LINEAR_TYPES: dict[str, type[QuantLinear]] = {
    cls.method: cls for cls in (Int8Linear, Int4Linear, NF4Linear, FP8Linear)}
