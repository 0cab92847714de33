"""Quantized linear layers: the C++ kernels equal the torch reference path."""

from __future__ import annotations

import functools

import pytest
import torch

from peregrine.layers import linear
from peregrine.layers.linear import FP8Linear, Int4Linear, Int8Linear, NF4Linear
from peregrine.layers import quant_formats as formats
from tests.conftest import q8_activations

K = 576  # SmolLM2's hidden size: 4.5 groups of 128


@functools.cache
def layers(n: int = 80) -> dict[str, linear.QuantLinear]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, K, generator=g) * 0.05
    b = torch.randn(n, generator=g)
    return {"int8": Int8Linear.from_float(w, b), "int8-g32": Int8Linear.from_float(w, None, 32),
            "int4-g128": Int4Linear.from_float(w, b, 128),
            "int4-g32-sym": Int4Linear.from_float(w, None, 32, symmetric=True),
            "nf4": NF4Linear.from_float(w, b, 64), "fp8": FP8Linear.from_float(w, b)}


@pytest.mark.parametrize("name", sorted(layers()))
def test_cpp_dequantize_is_exact(quant_ops, name):
    mod = layers()[name]
    assert torch.equal(mod._cpu_dequantize(quant_ops), mod.dequantize())


@pytest.mark.parametrize("name", sorted(layers()))
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 32])
def test_kernel_equals_reference(quant_ops, name, rows):
    mod = layers()[name]
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    got = mod(x)
    if mod.int8_dot:
        # int4 runs on q8_decode.cpp's int8 dot products at every row count: x is quantized
        # to int8 per 32 values (as llama.cpp's Q8 activations), so compare with the
        # reference run on the same int8 x, and bound the difference to the float reference
        # by that rounding (half an int8 step per value: ~0.5-1% relative, against ~0.003%
        # for the int16 activations of the kernel below)
        xq, d = q8_activations(x)
        torch.testing.assert_close(got, mod.forward_reference(xq), rtol=1e-4, atol=1e-4)
        bound = (mod.dequantize().abs() @ (d / 2).t()).t()
        assert ((got - mod.forward_reference(x)).abs() <= bound + 1e-4).all()
    elif mod.method == "int8":
        # int8 keeps quant_linear.cpp's kernel, which quantizes x to int16 per 32 values:
        # compare with the reference run on the same quantized x ...
        xq, d = formats.quantize_activations(x)
        torch.testing.assert_close(got, mod.forward_reference(xq), rtol=1e-4, atol=1e-4)
        # ... and bound the difference to the float reference by that rounding
        bound = (mod.dequantize().abs() @ (d / 2).t()).t()
        assert ((got - mod.forward_reference(x)).abs() <= bound + 1e-4).all()
    else:
        torch.testing.assert_close(got, mod.forward_reference(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(layers()))
def test_many_rows_take_dequantize_then_matmul(quant_ops, name):
    """Above KERNEL_MAX_ROWS the weight-only formats dequantize and run one float GEMM;
    int4 stays on its int8 dot products (faster than a float GEMM at every row count)."""
    mod = layers()[name]
    x = torch.randn(linear.KERNEL_MAX_ROWS + 7, K)
    want = mod.forward_reference(q8_activations(x)[0] if mod.int8_dot else x)
    torch.testing.assert_close(mod(x), want, rtol=1e-4, atol=1e-4)


def test_float64_and_3d_inputs_use_the_reference_path():
    mod = layers()["int4-g128"]
    x = torch.randn(2, 3, K, dtype=torch.float64)
    y = mod(x)
    assert y.shape == (2, 3, 80) and y.dtype == torch.float64
    torch.testing.assert_close(y, mod.forward_reference(x.reshape(6, K)).reshape(2, 3, 80))


def test_weight_bytes_are_what_is_stored():
    mods = layers()
    assert mods["int8"].weight_bytes() == 80 * K + 80 * 4
    assert mods["int4-g128"].weight_bytes() == 80 * K // 2 + 2 * 80 * 5 * 2
