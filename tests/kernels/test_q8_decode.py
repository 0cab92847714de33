"""q8_linear (q8_decode.cpp): int4/int5/int6/int8 weights (groups of 16 to a whole row,
float16 or float32 scales, offsets) against activations quantized to int8 per 32 values
equal the dequantized float reference on the same quantized activations, stay within
the activation rounding of the float reference, give each row the same bits whatever else
is in the batch, and refuse bad inputs with an exception."""

from __future__ import annotations

import pytest
import torch

from peregrine.layers import quant_formats as formats
from tests.conftest import q8_activations


@pytest.fixture(scope="module")
def q8():
    from peregrine.kernels.cpu import cpu_supports_kernels, q8_ops
    if not cpu_supports_kernels():
        pytest.skip("this CPU has no AVX2/FMA: the C++ kernels do not apply")
    ops = q8_ops()
    assert ops is not None, "q8_decode.cpp failed to build (see the logged warning)"
    return ops


def make_weight(kind: str, n: int, k: int, group: int | None, seed: int = 0):
    """(kernel args, dequantized float weight [N, K]) of a random int4/int8 weight."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if kind == "int4":
        q, scale, offset = formats.quantize_int4(w, group)
        return (q, scale, offset), formats.dequantize_int4(q, scale, offset, group)
    q, scale = formats.quantize_int8(w, group)
    return (q, scale, None), formats.dequantize_int8(q, scale, group)


def run(q8, x, args, bias=None, group=None):
    q, scale, offset = args
    return q8.q8_linear(x, q, scale, offset, bias, group or 0)


KINDS = ["int4", "int8"]
GROUPS = [32, 64, 128, None]  # None: one scale per output row
KS = [96, 160, 576]  # 3 and 5 blocks (an odd block count leaves half a pair), SmolLM2's 576
ROWS = [1, 2, 3, 4, 5, 17]
N = 44  # not a multiple of the kernel's 4- and 8-row tiles


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", ROWS)
def test_equals_the_dequantized_reference_on_quantized_activations(q8, kind, group, k, m):
    args, w = make_weight(kind, N, k, group, seed=k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    got = run(q8, x, args, group=group)
    assert got.shape == (m, N) and got.dtype == torch.float32
    xq, d = q8_activations(x)
    # the integer dot products are exact; what differs is float32 summation order
    torch.testing.assert_close(got, xq @ w.t(), rtol=1e-4, atol=1e-4)
    # against float x: at most half a quantization step of x per weight
    bound = w.abs() @ (d / 2).t()
    assert ((got - x @ w.t()).abs() <= bound.t() + 1e-4).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group", [32, 128])
def test_relative_error_to_float_is_about_one_percent(q8, kind, group):
    """int8 activations cost well under 1% relative error on Gaussian data, which is what
    llama.cpp's Q8 activations cost too."""
    args, w = make_weight(kind, 256, 576, group)
    x = torch.randn(8, 576, generator=torch.Generator().manual_seed(1))
    got, want = run(q8, x, args, group=group), x @ w.t()
    rel = float((got - want).norm() / want.norm())
    assert rel < 0.01, rel


@pytest.mark.parametrize("kind", KINDS)
def test_bias_is_added(q8, kind):
    args, w = make_weight(kind, N, 160, 32)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(3))
    x = torch.randn(3, 160, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(run(q8, x, args, bias, 32), run(q8, x, args, None, 32) + bias,
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group", [32, None])
@pytest.mark.parametrize("k", [96, 576])
def test_a_row_has_the_same_bits_in_any_batch(q8, kind, group, k):
    """Batch invariance of the kernel: row m of an M-row call equals the same row alone,
    bit for bit, for every M (the engine's batch invariance rests on it)."""
    args, _ = make_weight(kind, N, k, group)
    x = torch.randn(17, k, generator=torch.Generator().manual_seed(5))
    alone = torch.cat([run(q8, x[i:i + 1], args, group=group) for i in range(17)])
    for m in ROWS:
        assert torch.equal(run(q8, x[:m], args, group=group), alone[:m]), m
    assert torch.equal(run(q8, x[3:11], args, group=group), alone[3:11])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [96, 160])
@pytest.mark.parametrize("m", [1, 2, 5])
def test_memory_after_the_scales_is_never_read(q8, kind, k, m):
    """Scales and offsets that end just before NaN bit patterns (what a freed page can
    hold): 8-wide scale loads must not reach past the tensor, or NaN * 0 spoils a row."""
    (q, scale, offset), w = make_weight(kind, N, k, 32)

    def nan_after(t):
        if t is None:
            return None
        room = torch.full((t.numel() + 64,), float("nan"), dtype=t.dtype)
        room[:t.numel()] = t.flatten()
        return room[:t.numel()].view(t.shape)

    x = torch.randn(m, k, generator=torch.Generator().manual_seed(7))
    got = run(q8, x, (q, nan_after(scale), nan_after(offset)), group=32)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, q8_activations(x)[0] @ w.t(), rtol=1e-4, atol=1e-4)


# GGUF block formats (models/gguf_native.py): kind id, levels, offsets, scale dtype
GGUF_KINDS = {"int4-f32": (0, 16, True, torch.float32), "int5-f16": (3, 32, True, torch.float16),
              "int5": (3, 32, True, torch.float32), "int6": (2, 64, True, torch.float32),
              "int8-offset": (1, 256, True, torch.float32)}


def make_gguf_weight(kind: str, n: int, k: int, group: int | None, seed: int = 0):
    """(kernel args, dequantized float weight) of random integers in a GGUF block format."""
    kid, levels, has_offset, dtype = GGUF_KINDS[kind]
    g = torch.Generator().manual_seed(seed)
    if kid == 1:
        q = torch.randint(-128, 128, (n, k), generator=g).to(torch.int8)
    else:
        q = torch.randint(0, levels, (n, k), generator=g).to(torch.uint8)
    s = formats.num_groups(k, group) if group != 16 else k // 16
    scale = (torch.rand(n, s, generator=g) * 0.01 + 1e-3).to(dtype)
    offset = (torch.randn(n, s, generator=g) * 0.05).to(dtype)
    size = k if group is None else group
    w = q.float() * formats.expand_groups(scale.float(), k, size) + formats.expand_groups(
        offset.float(), k, size)
    packed = {0: formats.pack_int4, 3: formats.pack_int5}.get(kid, lambda t: t)(q)
    return (packed, scale, offset, kid), w


@pytest.mark.parametrize("kind", sorted(GGUF_KINDS))
@pytest.mark.parametrize("group", [16, 32, 64, None])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", [1, 3, 5])
def test_gguf_block_formats_equal_the_reference_on_quantized_activations(q8, kind, group, k, m):
    (q, scale, offset, kid), w = make_gguf_weight(kind, N, k, group, seed=k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    got = q8.q8_linear(x, q, scale, offset, None, group or 0, kid)
    torch.testing.assert_close(got, q8_activations(x)[0] @ w.t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(GGUF_KINDS))
@pytest.mark.parametrize("group", [16, 32])
@pytest.mark.parametrize("k", [96, 160, 576, 1536])
def test_gguf_block_formats_give_a_row_the_same_bits_in_any_batch(q8, kind, group, k):
    """One row alone (the one-row kernel, bands of eight blocks and their tails) equals the
    same row in a batch (the general tile), bit for bit, in every GGUF block format."""
    (q, scale, offset, kid), _ = make_gguf_weight(kind, N + 1, k, group, seed=k)
    x = torch.randn(6, k, generator=torch.Generator().manual_seed(k))
    alone = torch.cat([q8.q8_linear(x[i:i + 1], q, scale, offset, None, group, kid)
                       for i in range(6)])
    assert torch.equal(q8.q8_linear(x, q, scale, offset, None, group, kid), alone)


def make_sub_scales(n: int, k: int, group: int, seed: int):
    """K-quant scales as stored: int8 sub-block values (signed as Q6_K's, or 0..63 as
    Q4_K's) times a float32 per 256 weights, and the same multiplied out in float32."""
    g = torch.Generator().manual_seed(seed)
    s = k // group
    sub = torch.randint(-128, 128, (n, s), generator=g).to(torch.int8)
    osub = torch.randint(0, 64, (n, s), generator=g).to(torch.int8)
    sup = (torch.rand(n, k // 256, generator=g) * 1e-3).half().float()
    osup = -(torch.rand(n, k // 256, generator=g) * 1e-3).half().float()
    per = s // (k // 256)
    wide = (sub.float().reshape(n, -1, per) * sup.unsqueeze(-1)).reshape(n, s)
    owide = (osub.float().reshape(n, -1, per) * osup.unsqueeze(-1)).reshape(n, s)
    return (sub, sup, osub, osup), (wide, owide)


@pytest.mark.parametrize("kind", ["int4-f32", "int5", "int6"])
@pytest.mark.parametrize("group", [16, 32])
@pytest.mark.parametrize("k", [256, 1536])
@pytest.mark.parametrize("m", [1, 2, 6])
def test_sub_block_scales_give_the_bits_of_the_float32_scales_they_multiply_out_to(
        q8, kind, group, k, m):
    """GGUF K-quants' compact scales (int8 sc with float32 d per 256 weights) compute what
    the float32 products d * sc would, bit for bit, alone and in a batch."""
    (q, _, _, kid), _ = make_gguf_weight(kind, N + 1, k, group, seed=k)
    (sub, sup, osub, osup), (wide, owide) = make_sub_scales(N + 1, k, group, seed=k + group)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    want = q8.q8_linear(x, q, wide, owide, None, group, kid)
    got = q8.q8_linear(x, q, sub, osub, None, group, kid, sup, osup)
    assert torch.equal(got, want)


def test_sub_block_scales_need_their_factors_and_whole_super_blocks(q8):
    (q, _, _, kid), _ = make_gguf_weight("int4-f32", N, 256, 32)
    (sub, sup, osub, osup), _ = make_sub_scales(N, 256, 32, seed=0)
    x = torch.randn(1, 256)
    with pytest.raises(RuntimeError, match="super-block factors"):
        q8.q8_linear(x, q, sub, osub, None, 32, kid)
    with pytest.raises(RuntimeError, match="super-block factors"):
        q8.q8_linear(x, q, sub, osub, None, 32, kid, sup[:, :0], osup)
    (q, _, _, kid), _ = make_gguf_weight("int4-f32", N, 160, 32)
    with pytest.raises(RuntimeError, match="multiple of 256"):
        q8.q8_linear(torch.randn(1, 160), q, sub[:, :5].contiguous(), osub[:, :5].contiguous(),
                     None, 32, kid, sup, osup)


def test_int5_packing_round_trips():
    q = torch.randint(0, 32, (3, 96), dtype=torch.uint8)
    packed = formats.pack_int5(q)
    assert packed.shape == (3, 96 // 2 + 96 // 8)
    assert torch.equal(formats.unpack_int5(packed), q)


def test_zero_rows_and_zero_activations(q8):
    args, w = make_weight("int4", N, 96, 32)
    assert run(q8, torch.zeros(2, 96), args, group=32).abs().max() == 0
    x = torch.randn(1, 96)
    x[0, :32] = 0  # one all-zero block: d = 0 must not give NaN
    got = run(q8, x, args, group=32)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, q8_activations(x)[0] @ w.t(), rtol=1e-4, atol=1e-4)


def test_non_contiguous_x_is_accepted(q8):
    args, w = make_weight("int8", N, 96, 32)
    x = torch.randn(96, 4).t()  # [4, 96], strided
    torch.testing.assert_close(run(q8, x, args, group=32), run(q8, x.contiguous(), args,
                                                                 group=32), rtol=0, atol=0)


BAD_INPUTS = {
    "K not a multiple of 32": lambda x, q4, s4, o4, q8w, s8: (
        torch.randn(2, 80), torch.zeros(8, 80, dtype=torch.int8), torch.ones(8, 3), None,
        None, 32),
    "x and the weight disagree on K": lambda x, q4, s4, o4, q8w, s8: (
        torch.randn(2, 64), q8w, s8, None, None, 32),
    "x not float32": lambda x, q4, s4, o4, q8w, s8: (x.double(), q8w, s8, None, None, 32),
    "x not 2-D": lambda x, q4, s4, o4, q8w, s8: (x.view(1, 2, 96), q8w, s8, None, None, 32),
    "int4 without an offset": lambda x, q4, s4, o4, q8w, s8: (x, q4, s4, None, None, 32),
    "int4 with float32 scales": lambda x, q4, s4, o4, q8w, s8: (
        x, q4, s4.float(), o4, None, 32),
    "int8 with float16 scales": lambda x, q4, s4, o4, q8w, s8: (
        x, q8w, s8.half(), None, None, 32),
    "float weights": lambda x, q4, s4, o4, q8w, s8: (x, q8w.float(), s8, None, None, 32),
    "group size not 32 * 2^k": lambda x, q4, s4, o4, q8w, s8: (x, q8w, s8, None, None, 48),
    "group size disagrees with the scales": lambda x, q4, s4, o4, q8w, s8: (
        x, q8w, s8, None, None, 64),
    "bias of the wrong length": lambda x, q4, s4, o4, q8w, s8: (
        x, q8w, s8, None, torch.zeros(7), 32),
    "bias not float32": lambda x, q4, s4, o4, q8w, s8: (
        x, q8w, s8, None, torch.zeros(8, dtype=torch.float64), 32),
    "non-contiguous weights": lambda x, q4, s4, o4, q8w, s8: (
        x, torch.zeros(96, 8, dtype=torch.int8).t(), s8, None, None, 32),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_raise_an_exception(q8, case):
    (q4, s4, o4), _ = make_weight("int4", 8, 96, 32)
    (q8w, s8, _), _ = make_weight("int8", 8, 96, 32)
    args = BAD_INPUTS[case](torch.randn(2, 96), q4, s4, o4, q8w, s8)
    with pytest.raises(RuntimeError):
        q8.q8_linear(*args)


@pytest.mark.parametrize("rows,vocab", [(1, 49152), (32, 4099), (3, 7), (2, 1), (1, 8), (5, 100003)])
def test_argmax_rows_is_torch_argmax(q8, rows, vocab):
    """The greedy rows' kernel picks what torch.argmax picks: the first maximum (ties are
    common in masked logits), the first NaN when a row holds one, index 0 of an all -inf row;
    row by row and, with fewer rows than threads, over pieces of the vocabulary."""
    g = torch.Generator().manual_seed(vocab)
    cases = [torch.randn(rows, vocab, generator=g),
             torch.randint(0, 3, (rows, vocab), generator=g).float(),
             torch.full((rows, vocab), float("-inf"))]
    with_nan = cases[1].clone()
    with_nan[:, vocab // 2:] = float("nan")
    threads = torch.get_num_threads()
    try:
        for logits in cases + [with_nan]:
            for n in (1, 2):
                torch.set_num_threads(n)
                assert torch.equal(q8.argmax_rows(logits), logits.argmax(-1))
    finally:
        torch.set_num_threads(threads)
