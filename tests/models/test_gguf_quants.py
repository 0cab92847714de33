"""Every GGUF block type peregrine reads unpacks to integers, scales and offsets that
dequantize bit-exactly as the gguf package's reference does."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import quants

from peregrine.models.gguf_file import GGUFFile
from peregrine.models.gguf_quants import BLOCK_FORMS, QT, unpack
from tests.models.test_gguf_file import write_gguf

# byte offsets of each type's float16 fields (d, dmin, m), filled with sane values: random
# bytes there would be NaN or inf as often as not
F16_FIELDS = {QT.Q8_0: [0], QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2],
              QT.Q2_K: [80, 82], QT.Q3_K: [108], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2],
              QT.Q6_K: [208], QT.IQ4_NL: [0], QT.IQ4_XS: [0]}


def random_blocks(qtype: QT, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Raw bytes of a [rows, cols] tensor of `qtype`: random bits, valid float16 scales."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    nb = rows * cols // block
    raw = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        raw[:, at:at + 2] = (rng.standard_normal(nb) * 0.01).astype(np.float16).view(
            np.uint8).reshape(nb, 2)
    return raw


def test_every_block_type_has_its_float16_fields_listed():
    assert set(F16_FIELDS) == set(BLOCK_FORMS)


@pytest.mark.parametrize("qtype", list(BLOCK_FORMS), ids=lambda t: t.name)
def test_unpack_dequantizes_bit_exactly_like_the_gguf_package(qtype):
    raw = random_blocks(qtype, 4, 512)
    want = quants.dequantize(raw.reshape(-1), qtype).reshape(4, 512).astype(np.float32)
    u = unpack(torch.from_numpy(raw.copy()), qtype, (4, 512))
    got = u.dequantize().numpy()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("qtype", list(BLOCK_FORMS), ids=lambda t: t.name)
def test_unpacked_integers_stay_in_the_declared_range(qtype):
    form = BLOCK_FORMS[qtype]
    u = unpack(torch.from_numpy(random_blocks(qtype, 8, 256, seed=1)), qtype, (8, 256))
    assert form.qmin <= u.q.min() and u.q.max() <= form.qmax
    assert u.group == form.group and u.scale.shape == (8, 256 // form.group)
    assert (u.offset is not None) == form.offset


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K, QT.Q5_0, QT.IQ4_XS], ids=lambda t: t.name)
def test_k_quant_tensors_read_from_a_file(tmp_path, qtype):
    raw = random_blocks(qtype, 3, 256)
    path = tmp_path / "k.gguf"
    write_gguf(path, tensors={"w": (raw.reshape(3, -1), qtype)})
    f = GGUFFile(str(path))
    want = quants.dequantize(raw.reshape(-1), qtype).reshape(3, 256)
    torch.testing.assert_close(f.dequantize("w"), torch.from_numpy(want), rtol=0, atol=0)
