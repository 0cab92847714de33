"""GGUF reading: our dequantizer equals gguf's reference for every supported type; bad
files give clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gguf
from gguf import quants

from peregrine.models.errors import ModelLoadError
from peregrine.models.gguf_file import GGUFFile, dequantize
from peregrine.models.loader import load_model

QT = gguf.GGMLQuantizationType


def write_gguf(path, arch="llama", tensors=None, raw=None):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    for name, (array, qtype) in (tensors or {}).items():
        w.add_tensor(name, array, raw_dtype=qtype)
    for name, (array, qtype, shape) in (raw or {}).items():
        w.add_tensor(name, array, raw_shape=shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1])
def test_dequantize_matches_gguf_reference(tmp_path, qtype):
    x = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    if qtype == QT.F32:
        stored = x
    elif qtype == QT.F16:
        stored = x.astype(np.float16)
    else:
        stored = quants.quantize(x, qtype)
    path = tmp_path / "t.gguf"
    write_gguf(path, tensors={"w": (stored, qtype)})
    f = GGUFFile(str(path))
    t = f.tensors["w"]
    assert t.shape == (6, 64) and t.qtype == qtype
    want = quants.dequantize(np.asarray(gguf.GGUFReader(str(path)).tensors[0].data), qtype)
    torch.testing.assert_close(f.dequantize("w"), torch.from_numpy(want.reshape(6, 64)),
                               rtol=0, atol=0)


def test_real_file_tensors_match_reference(smollm2_path):
    ours = GGUFFile(smollm2_path)
    reader = gguf.GGUFReader(smollm2_path)
    seen = set()
    for t in reader.tensors:
        if t.tensor_type in seen:
            continue
        seen.add(t.tensor_type)
        want = quants.dequantize(np.asarray(t.data), t.tensor_type)
        got = ours.dequantize(t.name)
        torch.testing.assert_close(got, torch.from_numpy(want).reshape(got.shape), rtol=0, atol=0)
    assert seen == {QT.Q4_1, QT.Q8_0, QT.F32}
    assert ours.metadata["llama.block_count"] == 30
    assert ours.metadata["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>",
                                                          "<|im_end|>"]


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        GGUFFile(str(tmp_path / "nope.gguf"))


def test_corrupt_header(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(ModelLoadError, match="not a valid GGUF"):
        GGUFFile(str(bad))
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"hello world, not a model")
    with pytest.raises(ModelLoadError, match="bad magic"):
        GGUFFile(str(notgguf))


def test_truncated_file(tmp_path, smollm2_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        cut.write_bytes(f.read(5_000_000))
    with pytest.raises(ModelLoadError, match="past the end"):
        GGUFFile(str(cut))


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, arch="gpt2", tensors={"w": (np.zeros((2, 32), np.float32), QT.F32)})
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'gpt2'"):
        load_model(str(path))


def test_unsupported_tensor_type_names_the_tensor_and_its_type(tmp_path):
    path = tmp_path / "iq2.gguf"
    q = np.zeros((2, 66), np.uint8)  # two IQ2_XXS blocks of raw bytes
    write_gguf(path, tensors={"blk.0.ffn_down.weight": (q, QT.IQ2_XXS)})
    with pytest.raises(ModelLoadError, match="tensor blk.0.ffn_down.weight has type IQ2_XXS"):
        GGUFFile(str(path)).dequantize("blk.0.ffn_down.weight")


def test_dequantize_rejects_unknown_type():
    with pytest.raises(ModelLoadError, match="IQ2_XXS"):
        dequantize(np.zeros(66, np.uint8), QT.IQ2_XXS, (1, 256))
