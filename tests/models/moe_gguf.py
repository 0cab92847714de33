"""Write a transformers mixture of experts as llama.cpp stores it: llama (Mixtral, with
its Q/K rows permuted), qwen2moe or qwen3moe metadata, stacked ffn_*_exps expert tensors,
the router as ffn_gate_inp and Qwen2-MoE's shared expert as ffn_*_shexp."""

from __future__ import annotations

import torch

from tests.models.gguf_writer import LAYER_NAMES, write_model_gguf

# the MoE modules' llama.cpp names, on top of the dense ones
NAMES = {**LAYER_NAMES, "mlp.gate": "ffn_gate_inp",
         "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
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


def write_moe_gguf(path: str, ref: torch.nn.Module, arch: str, tokenizer_meta: dict,
                   qtype: str = "F32", expert_qtype: str | None = None) -> None:
    """`ref`'s weights and hyper-parameters under llama.cpp's names for `arch`
    (llama | qwen2moe | qwen3moe), with a tokenizer borrowed from another GGUF: matrices in
    `qtype`, the routed experts in `expert_qtype` (default `qtype`), the routers float32
    as llama.cpp's quantizer keeps them."""
    def qtype_of(name: str) -> str:
        if ".ffn_gate_inp" in name:
            return "F32"
        return (expert_qtype or qtype) if "_exps." in name else qtype

    c = ref.config

    def hparams(w) -> None:
        w.add_expert_count(c.num_local_experts if arch == "llama" else c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        if arch != "llama":
            w.add_expert_feed_forward_length(c.moe_intermediate_size)
        if arch == "qwen2moe":
            w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)

    head_dim = None if arch == "llama" else ref.model.layers[0].self_attn.head_dim
    write_model_gguf(path, ref, arch, tokenizer_meta, head_dim=head_dim, hparams=hparams,
                     layer_tensors=lambda i, module, p: layer_tensors(i, module, p, arch, c),
                     qtype_of=qtype_of)
