"""Write a transformers mixture of experts as llama.cpp stores it: llama (Mixtral, with
its Q/K rows permuted), qwen2moe or qwen3moe metadata, stacked ffn_*_exps expert tensors,
the router as ffn_gate_inp and Qwen2-MoE's shared expert as ffn_*_shexp."""

from __future__ import annotations

import pytest
import torch

# transformers' module -> llama.cpp's tensor, per layer
NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
         "mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
         "mlp.shared_expert.up_proj": "ffn_up_shexp",
         "mlp.shared_expert.down_proj": "ffn_down_shexp",
         "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}


def permute_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row order for the llama architecture (the inverse of
    gguf_file.unpermute_rope_rows)."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def layer_tensors(i: str, module: str, p: torch.Tensor, arch: str, c) -> dict[str, torch.Tensor]:
    """The GGUF tensors of one transformers parameter of layer `i`."""
    if module == "mlp.experts.gate_up_proj":  # [E, 2I, H]: gate rows, then up rows
        gate, up = p.chunk(2, dim=1)
        return {f"blk.{i}.ffn_gate_exps.weight": gate, f"blk.{i}.ffn_up_exps.weight": up}
    if module == "mlp.experts.down_proj":
        return {f"blk.{i}.ffn_down_exps.weight": p}
    module, kind = module.rsplit(".", 1)  # weight | bias
    out = NAMES[module]
    if arch == "llama" and out in ("attn_q", "attn_k"):
        p = permute_rope_rows(p, c.num_attention_heads if out == "attn_q"
                              else c.num_key_value_heads)
    if out == "ffn_gate_inp_shexp":
        p = p.reshape(-1)
    return {f"blk.{i}.{out}.{kind}": p}


def write_moe_gguf(path: str, ref: torch.nn.Module, arch: str, tokenizer_meta: dict) -> None:
    """`ref`'s float32 weights and hyper-parameters under llama.cpp's names for `arch`
    (llama | qwen2moe | qwen3moe), with a tokenizer borrowed from another GGUF."""
    gguf = pytest.importorskip("gguf")
    c = ref.config
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    w.add_expert_count(c.num_local_experts if arch == "llama" else c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    if arch != "llama":
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
        w.add_key_length(ref.model.layers[0].self_attn.head_dim)
        w.add_value_length(ref.model.layers[0].self_attn.head_dim)
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    w.add_tokenizer_model(tokenizer_meta["tokenizer.ggml.model"])
    w.add_token_list(list(tokenizer_meta["tokenizer.ggml.tokens"]))
    w.add_token_merges(list(tokenizer_meta["tokenizer.ggml.merges"]))
    w.add_eos_token_id(int(tokenizer_meta["tokenizer.ggml.eos_token_id"]))
    globals_ = {"model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    for name, p in ref.state_dict().items():
        if name in globals_:
            tensors = {globals_[name]: p}
        else:
            i, module = name.removeprefix("model.layers.").split(".", 1)
            tensors = layer_tensors(i, module, p, arch, c)
        for out, t in tensors.items():
            w.add_tensor(out, t.float().contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
