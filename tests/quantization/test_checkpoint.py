"""`peregrine quantize` writes a checkpoint that loads back to the same quantized model."""

from __future__ import annotations

import json
import os

import pytest
import torch

from peregrine.attention_backend import AttentionMetadata
from peregrine.layers.linear import Int4Linear, QuantLinear
from peregrine.models.loader import load_model
from peregrine.quantization.quantize import QuantizeOptions, quantize_to_dir
from tests.conftest import write_hf_checkpoint


def logits(net, ids: list[int]) -> torch.Tensor:
    meta = AttentionMetadata.prefill_only([len(ids)])
    with torch.inference_mode():
        return net.compute_logits(net(torch.tensor(ids), torch.arange(len(ids)), meta))


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    # the directory has no tokenizer, so SmolLM2's is used: the vocabulary must cover it
    path, _ = write_hf_checkpoint(tmp_path_factory.mktemp("hf"), "qwen2", hidden_size=64,
                                  intermediate_size=128, vocab_size=49152)
    return path


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_quantized_checkpoint_round_trips(tiny_hf, tmp_path, method):
    out = str(tmp_path / method)
    opts = QuantizeOptions(method=method, format="int4", group_size=32, calib_samples=4,
                           calib_seq_len=64)
    summary = quantize_to_dir(tiny_hf, out, opts)
    assert summary["method"] == method
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    with open(os.path.join(out, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc["quant_method"] == "peregrine" and qc["format"] == "int4"
    assert qc["modules"]["layers.0.self_attn.qkv_proj"] == "int4"
    loaded = load_model(out)
    mods = dict(loaded.model.named_modules())
    assert isinstance(mods["layers.1.mlp.down_proj"], Int4Linear)
    assert isinstance(mods["lm_head"], QuantLinear)
    assert mods["layers.0.self_attn.qkv_proj"].bias is not None  # qwen2 biases survive
    ids = list(range(3, 40))
    float_logits = logits(load_model(tiny_hf).model, ids)
    got = logits(loaded.model, ids)
    # int4 of random weights: close to float, far from noise
    cos = torch.nn.functional.cosine_similarity(got.flatten(), float_logits.flatten(), dim=0)
    assert cos > 0.9


def test_rtn_checkpoint_equals_quantization_at_load(tiny_hf, tmp_path):
    out = str(tmp_path / "rtn")
    quantize_to_dir(tiny_hf, out, QuantizeOptions(method="rtn", format="int8"))
    ids = list(range(5, 30))
    a = logits(load_model(out).model, ids)
    b = logits(load_model(tiny_hf, quantization="int8").model, ids)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_quantizing_a_quantized_checkpoint_is_refused(tiny_hf, tmp_path):
    from peregrine.models.errors import ModelLoadError
    out = str(tmp_path / "q")
    quantize_to_dir(tiny_hf, out, QuantizeOptions(method="rtn", format="int8"))
    with pytest.raises(ModelLoadError, match="already quantized"):
        load_model(out, quantization="int4")
