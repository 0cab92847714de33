"""Reading PEFT adapters: the factors and scalings PEFT uses, and a clear refusal of what
cannot be served."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from peregrine.lora import LoRARequest
from peregrine.lora.adapter import LoRAAdapter
from peregrine.lora.errors import InvalidAdapterError
from tests.lora.conftest import edit_config, make_adapter


def peft_layer(adapter, module: str):
    """PEFT's LoRA layer for `layers.<i>.<...>` of the adapter's model."""
    return adapter.model.base_model.model.model.get_submodule(module)


def test_factors_and_scaling_are_peft_s(tiny_adapters):
    adapter = LoRAAdapter.load("all8", tiny_adapters["all8"].path)
    assert len(adapter.weights) == 2 * 7  # two layers, seven linears each
    assert adapter.rank == 8
    f = adapter.weights["layers.1.mlp.up_proj"]
    layer = peft_layer(tiny_adapters["all8"], "layers.1.mlp.up_proj")
    torch.testing.assert_close(f.a, layer.lora_A["default"].weight)
    torch.testing.assert_close(f.b, layer.lora_B["default"].weight)
    assert f.scaling == layer.scaling["default"] == 16 / 8


def test_rslora_and_alpha_pattern_scale_as_peft_does(tiny_adapters):
    adapter = LoRAAdapter.load("rs16", tiny_adapters["rs16"].path)
    for module in ("layers.0.self_attn.q_proj", "layers.0.mlp.down_proj"):
        want = peft_layer(tiny_adapters["rs16"], module).scaling["default"]
        assert adapter.weights[module].scaling == pytest.approx(want)
    assert adapter.weights["layers.0.mlp.down_proj"].scaling == pytest.approx(4 / math.sqrt(16))


def test_a_rank_over_max_lora_rank_is_refused(tiny_adapters):
    with pytest.raises(InvalidAdapterError, match="rank 16, more than max_lora_rank 8"):
        LoRAAdapter.load("rs16", tiny_adapters["rs16"].path, max_rank=8)


def test_missing_and_unreadable_files_are_refused(tmp_path, tiny_adapters):
    with pytest.raises(InvalidAdapterError, match="no adapter directory"):
        LoRAAdapter.load("x", str(tmp_path / "nowhere"))
    with pytest.raises(InvalidAdapterError, match="no adapter_config.json"):
        LoRAAdapter.load("x", str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(InvalidAdapterError, match="not valid JSON"):
        LoRAAdapter.load("x", str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    with pytest.raises(InvalidAdapterError, match="no adapter_model.safetensors"):
        LoRAAdapter.load("x", str(tmp_path))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(InvalidAdapterError, match="cannot read the weights"):
        LoRAAdapter.load("x", str(tmp_path))


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "use_dora is not supported"),
    ({"bias": "all"}, "bias is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save is not supported"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not LORA"),
    ({"lora_alpha": 0}, "lora_alpha must be a number > 0"),
])
def test_variants_beyond_plain_lora_are_refused(tmp_path, tiny_adapters, change, message):
    path = edit_config(tiny_adapters["attn4"].path, str(tmp_path / "edited"), **change)
    with pytest.raises(InvalidAdapterError, match=message):
        LoRAAdapter.load("edited", path)


def test_an_embedding_adapter_is_refused(tmp_path, tiny_base):
    _, base = tiny_base
    adapter = make_adapter(base, str(tmp_path / "emb"), seed=4, r=4,
                           targets=["q_proj", "embed_tokens"])
    with pytest.raises(InvalidAdapterError, match="not a LoRA A/B weight of a linear"):
        LoRAAdapter.load("emb", adapter.path)


def test_an_adapter_of_a_non_llama_module_is_refused(tmp_path, tiny_adapters):
    from safetensors.torch import load_file, save_file
    path = edit_config(tiny_adapters["attn4"].path, str(tmp_path / "lm"))
    file = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(file)
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.lm_head.lora_B.weight"] = torch.zeros(256, 4)
    save_file(tensors, file)
    with pytest.raises(InvalidAdapterError, match="targets lm_head"):
        LoRAAdapter.load("lm", path)


def test_a_request_names_an_adapter_by_name_and_path():
    assert LoRARequest("sql", "/a/b") == LoRARequest("sql", 0, "/a/b")
    assert LoRARequest("sql", 7, "/a/b").lora_path == "/a/b"
    with pytest.raises(ValueError, match="needs a path"):
        LoRARequest("sql", 1)
    with pytest.raises(ValueError, match="needs a name"):
        LoRARequest("", "/a/b")
