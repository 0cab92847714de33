"""GPTQ beats round-to-nearest on the layer outputs it calibrates on; AWQ never does worse."""

from __future__ import annotations

import pytest
import torch

from peregrine.quantization.apply import QuantSpec
from peregrine.quantization.awq import search_scale
from peregrine.quantization.gptq import gptq_quantize


def calibration(n: int = 64, k: int = 256, t: int = 1024, seed: int = 0):
    """A weight and correlated inputs with a few loud channels (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(t, k // 4, generator=g) @ torch.randn(k // 4, k, generator=g)
    x[:, :8] *= 10
    return w, x


def output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return float((x @ w.t() - x @ wq.t()).pow(2).mean())


@pytest.mark.parametrize("spec", [QuantSpec("int4", 128), QuantSpec("int4", 32, True),
                                  QuantSpec("int8"), QuantSpec("nf4", 64)],
                         ids=["int4-g128", "int4-g32-sym", "int8", "nf4"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reduces_output_error_vs_rtn(spec, act_order):
    w, x = calibration()
    rtn = spec.quantize(w).dequantize()
    q = gptq_quantize(w, x.t() @ x, spec, act_order=act_order)
    assert q.method == spec.method
    assert output_error(x, w, q.dequantize()) < 0.8 * output_error(x, w, rtn)


def test_gptq_result_is_on_the_format_grid():
    w, x = calibration()
    spec = QuantSpec("int4", 64)
    q = gptq_quantize(w, x.t() @ x, spec)
    deq = q.dequantize()
    # re-quantizing with the layer's own scales changes nothing
    from peregrine.layers import quant_formats as formats
    codes = formats.quantize_int4_with(deq, q.scale, q.offset, 64)
    assert torch.equal(formats.pack_int4(codes), q.qweight)


def test_gptq_refuses_fp8():
    w, x = calibration()
    with pytest.raises(ValueError, match="GPTQ"):
        gptq_quantize(w, x.t() @ x, QuantSpec("fp8"))


@pytest.mark.parametrize("spec", [QuantSpec("int4", 128), QuantSpec("nf4", 64)],
                         ids=["int4", "nf4"])
def test_awq_scale_is_no_worse_than_rtn(spec):
    w, x = calibration()
    s = search_scale(x, [w], spec)
    awq = spec.quantize(w * s).dequantize() / s
    rtn = spec.quantize(w).dequantize()
    assert output_error(x, w, awq) <= output_error(x, w, rtn)
    assert (s > 0).all() and s.shape == (256,)
