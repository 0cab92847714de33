"""Write a transformers model as llama.cpp stores it: its hyper-parameters under an
architecture's GGUF keys, a tokenizer borrowed from another GGUF, and its tensors under
llama.cpp's names (the test side of models/loader.py's GGUF mapping)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

# transformers' module -> llama.cpp's tensor, per layer
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
# (layer, transformers module with its .weight/.bias, parameter) -> GGUF name -> tensor
LayerTensors = Callable[[str, str, torch.Tensor], dict[str, torch.Tensor]]


def dense_layer_tensors(i: str, module: str, p: torch.Tensor) -> dict[str, torch.Tensor]:
    """A parameter of layer `i` under its llama.cpp name, as stored."""
    module, kind = module.rsplit(".", 1)  # weight | bias
    return {f"blk.{i}.{LAYER_NAMES[module]}.{kind}": p}


def write_model_gguf(path: str, ref: torch.nn.Module, arch: str, tokenizer_meta: dict, *,
                     head_dim: int | None = None, hparams: Callable | None = None,
                     layer_tensors: LayerTensors = dense_layer_tensors) -> None:
    """`ref`'s float32 weights and hyper-parameters as GGUF architecture `arch`;
    `head_dim` writes explicit key/value lengths, `hparams(writer)` the arch's own keys."""
    gguf = pytest.importorskip("gguf")
    c = ref.config
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    if hparams is not None:
        hparams(w)
    w.add_tokenizer_model(tokenizer_meta["tokenizer.ggml.model"])
    w.add_token_list(list(tokenizer_meta["tokenizer.ggml.tokens"]))
    w.add_token_merges(list(tokenizer_meta["tokenizer.ggml.merges"]))
    w.add_eos_token_id(int(tokenizer_meta["tokenizer.ggml.eos_token_id"]))
    for name, p in ref.state_dict().items():
        if name in GLOBAL_NAMES:
            tensors = {GLOBAL_NAMES[name]: p}
        else:
            i, module = name.removeprefix("model.layers.").split(".", 1)
            tensors = layer_tensors(i, module, p)
        for out, t in tensors.items():
            w.add_tensor(out, t.float().contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
