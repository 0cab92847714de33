"""Each weight format round-trips within its error bound; 4-bit packing is lossless."""

from __future__ import annotations

import pytest
import torch

from peregrine.layers import quant_formats as formats


def weights(n: int = 48, k: int = 576, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[3, 7] = 0.9  # an outlier
    w[5] = 0.0  # an all-zero row
    return w


def test_pack_unpack_round_trip():
    q = torch.randint(0, 16, (7, 96), dtype=torch.uint8)
    packed = formats.pack_int4(q)
    assert packed.shape == (7, 48)
    assert torch.equal(formats.unpack_int4(packed), q)
    # GGUF order: byte i of a 32-run holds weight i (low nibble) and i + 16 (high)
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 16]) << 4)


@pytest.mark.parametrize("group_size", [None, 32, 128])
def test_int8_error_is_at_most_half_a_step(group_size):
    w = weights()
    q, scale = formats.quantize_int8(w, group_size)
    err = (formats.dequantize_int8(q, scale, group_size) - w).abs()
    step = formats.expand_groups(scale, w.shape[1], group_size)
    assert (err <= step / 2 + 1e-7).all()
    assert q.abs().max() <= 127


@pytest.mark.parametrize("group_size,symmetric", [(32, False), (128, False), (64, True)])
def test_int4_error_is_at_most_half_a_step(group_size, symmetric):
    w = weights()
    packed, scale, offset = formats.quantize_int4(w, group_size, symmetric)
    assert scale.shape == (48, -(-576 // group_size))  # 576 = 4.5 groups of 128: ragged
    deq = formats.dequantize_int4(packed, scale, offset, group_size)
    step = formats.expand_groups(scale, w.shape[1], group_size)
    # half a step, plus the float16 rounding of the group's scale and offset
    slack = 16 * step * 2 ** -11 + offset.float().abs().max() * 2 ** -11
    assert ((deq - w).abs() <= step / 2 + slack).all()
    assert float((deq - w).abs()[5].max()) == 0.0  # zero rows stay zero


def test_nf4_picks_the_nearest_level():
    w = weights()
    packed, scale = formats.quantize_nf4(w, 64)
    deq = formats.dequantize_nf4(packed, scale, 64)
    s = formats.expand_groups(scale, w.shape[1], 64)
    candidates = formats.NF4_LEVELS.view(1, 1, 16) * s.unsqueeze(-1)
    best = (candidates - w.unsqueeze(-1)).abs().amin(-1)
    assert torch.allclose((deq - w).abs(), best, atol=1e-6)


def test_fp8_relative_error():
    w = weights()
    q, scale = formats.quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (48,)
    deq = formats.dequantize_fp8(q, scale)
    # 3 mantissa bits: relative error <= 2^-4 for normals; subnormals: absolute 2^-10 * scale
    bound = w.abs() * 2 ** -4 + scale[:, None] * 2 ** -10
    assert ((deq - w).abs() <= bound + 1e-9).all()


def test_group_size_is_inferred_from_the_scale_shape():
    assert formats.infer_group_size(576, 1) is None
    assert formats.infer_group_size(576, 18) == 32
    assert formats.infer_group_size(576, 5) == 128
    assert formats.infer_group_size(1536, 12) == 128
    with pytest.raises(ValueError):
        formats.infer_group_size(576, 7)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        formats.quantize_int4(torch.randn(4, 40), 32)
    with pytest.raises(ValueError, match="group_size"):
        formats.quantize_int4(torch.randn(4, 96), 96)


def test_activation_quantization_reference():
    x = torch.randn(3, 64)
    xd, d = formats.quantize_activations(x)
    assert d.shape == (3, 64) and (d.reshape(3, 2, 32) == d.reshape(3, 2, 32)[..., :1]).all()
    assert ((xd - x).abs() <= d / 2 + 1e-7).all()


def test_int8_activations_have_a_scale_per_lane_group_of_8():
    """q8_decode.cpp's groups: values 4g..4g+3 and 16+4g..16+4g+3 of each run of 32, so an
    outlier coarsens only the 8 values of its group."""
    x = torch.randn(2, 64)
    x[0, 5] = 100.0  # group 1 of block 0: values 4-7 and 20-23
    xd, d = formats.quantize_activations(x, 127.0)
    assert ((xd - x).abs() <= d / 2 + 1e-6).all()
    big = d[0] == 100.0 / 127
    assert big.nonzero().flatten().tolist() == [4, 5, 6, 7, 20, 21, 22, 23]
    torch.testing.assert_close(d[0, 0], x[0, [0, 1, 2, 3, 16, 17, 18, 19]].abs().max() / 127)
