"""Write a transformers model as llama.cpp stores it: its hyper-parameters under an
architecture's GGUF keys, a tokenizer borrowed from another GGUF (or a test vocabulary), and
its tensors under llama.cpp's names, converted as its converter does (the test side of
models/loader.py's GGUF mapping): llama, qwen2/3 and the MoEs (moe_gguf.py), gemma2/gemma3
and phi3."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
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


def named_layer_tensors(names: dict[str, str]) -> LayerTensors:
    """A layer_tensors that renames each parameter by `names`, storing it as it is."""
    def tensors(i: str, module: str, p: torch.Tensor) -> dict[str, torch.Tensor]:
        module, kind = module.rsplit(".", 1)
        return {f"blk.{i}.{names[module]}.{kind}": p}
    return tensors


dense_layer_tensors = named_layer_tensors(LAYER_NAMES)


def write_model_gguf(path: str, ref: torch.nn.Module, arch: str, tokenizer_meta: dict, *,
                     head_dim: int | None = None, hparams: Callable | None = None,
                     layer_tensors: LayerTensors = dense_layer_tensors,
                     norm_shift: float = 0.0, qtype: str = "F32",
                     qtype_of: Callable[[str], str] | None = None) -> None:
    """`ref`'s weights and hyper-parameters as GGUF architecture `arch`; `head_dim` writes
    explicit key/value lengths, `hparams(writer)` the arch's own keys (and extra tensors);
    `norm_shift` is added to every norm weight (Gemma's stored 1 + w); `qtype` (F32, F16,
    Q8_0, Q4_K, ...) is the type of the matrices (`qtype_of(gguf name)` when given), vectors
    staying float32 as llama.cpp keeps them."""
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
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)  # Gemma 3: per kind
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    if hparams is not None:
        hparams(w)
    write_tokenizer(w, tokenizer_meta)
    for name, p in ref.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name in GLOBAL_NAMES:
            tensors = {GLOBAL_NAMES[name]: p}
        else:
            i, module = name.removeprefix("model.layers.").split(".", 1)
            tensors = layer_tensors(i, module, p)
        for out, t in tensors.items():
            values = (t.float() + (norm_shift if out.endswith("norm.weight") else 0.0)).numpy()
            quant = gguf.GGMLQuantizationType[qtype if qtype_of is None else qtype_of(out)]
            if values.ndim < 2 or quant == gguf.GGMLQuantizationType.F32:
                w.add_tensor(out, values)
            else:
                raw, quant = quantize_values(values, quant)
                w.add_tensor(out, raw, raw_dtype=quant)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_values(values: np.ndarray, quant) -> tuple[np.ndarray, object]:
    """(raw blocks, the type used) of a matrix or stacked matrices [..., K]: gguf's own
    quantizer, ours for the K-quants it lacks (falling back as llama.cpp does when K is not
    a multiple of 256)."""
    import gguf
    if not quant.name.endswith("_K"):
        return gguf.quants.quantize(values, quant), quant
    from peregrine.quantization.kquants import quantize_tensor
    raw, used = quantize_tensor(torch.from_numpy(values).reshape(-1, values.shape[-1]), quant)
    return raw.reshape(*values.shape[:-1], -1), used


def write_tokenizer(w, meta: dict) -> None:
    """The `tokenizer.ggml.*` entries of `meta` (another file's, or a test vocabulary)."""
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_token_list(list(meta["tokenizer.ggml.tokens"]))
    if "tokenizer.ggml.merges" in meta:
        w.add_token_merges(list(meta["tokenizer.ggml.merges"]))
    if "tokenizer.ggml.scores" in meta:
        w.add_token_scores(list(meta["tokenizer.ggml.scores"]))
    if "tokenizer.ggml.token_type" in meta:
        w.add_token_types(list(meta["tokenizer.ggml.token_type"]))
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id"):
        if f"tokenizer.ggml.{key}" in meta:
            w.add_uint32(f"tokenizer.ggml.{key}", int(meta[f"tokenizer.ggml.{key}"]))
    for key in ("add_bos_token", "add_space_prefix"):
        if f"tokenizer.ggml.{key}" in meta:
            w.add_bool(f"tokenizer.ggml.{key}", bool(meta[f"tokenizer.ggml.{key}"]))


# Gemma's norms under llama.cpp's names (four per layer; q/k norms as Qwen3's)
GEMMA_NAMES = {**LAYER_NAMES, "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}
# Phi-3's fused projections, stored fused
PHI3_NAMES = {**LAYER_NAMES, "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}


def write_gemma_gguf(path: str, ref: torch.nn.Module, tokenizer_meta: dict,
                     qtype: str = "F32") -> None:
    """A transformers Gemma 2 / Gemma 3 model as llama.cpp's converter writes it: norm
    weights with the 1 added, soft-caps, the window and which layers use it, Gemma 3's
    local RoPE base and global RoPE scaling, no output tensor (tied)."""
    c = ref.config
    arch = "gemma3" if c.model_type == "gemma3_text" else "gemma2"
    rope = c.rope_parameters

    def hparams(w) -> None:
        if c.attn_logit_softcapping is not None:
            w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        if c.final_logit_softcapping is not None:
            w.add_final_logit_softcapping(c.final_logit_softcapping)
        w.add_sliding_window(c.sliding_window)
        local = [t == "sliding_attention" for t in c.layer_types]
        every = 2 if arch == "gemma2" else 6  # llama.cpp's default: every n-th layer global
        if local != [i % every < every - 1 for i in range(len(local))]:  # as files rarely do
            w.add_sliding_window_pattern(local)
        if "sliding_attention" in rope:
            w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
        full = rope.get("full_attention", rope)
        if full.get("rope_type") == "linear":
            w.add_rope_scaling_type(pytest.importorskip("gguf").RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])

    write_model_gguf(path, ref, arch, tokenizer_meta, head_dim=c.head_dim, hparams=hparams,
                     layer_tensors=named_layer_tensors(GEMMA_NAMES), norm_shift=1.0,
                     qtype=qtype)


def write_phi3_gguf(path: str, ref: torch.nn.Module, tokenizer_meta: dict,
                    qtype: str = "F32") -> None:
    """A transformers Phi-3 model as llama.cpp's converter writes it: fused attn_qkv and
    ffn_up (gate rows, then up rows), the window (0 for none), the original context and,
    with longrope, the rope_factors_short/long tensors and the attention factor."""
    import math
    c = ref.config
    rope = c.rope_parameters
    head_dim = c.hidden_size // c.num_attention_heads

    def hparams(w) -> None:
        w.add_rope_dimension_count(head_dim)
        w.add_sliding_window(c.sliding_window or 0)
        orig = c.original_max_position_embeddings
        w.add_rope_scaling_orig_ctx_len(orig)
        if rope.get("rope_type") in ("longrope", "su"):
            scale = c.max_position_embeddings / orig
            w.add_rope_scaling_attn_factors(
                math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
            w.add_tensor("rope_factors_long.weight",
                         torch.tensor(rope["long_factor"], dtype=torch.float32).numpy())
            w.add_tensor("rope_factors_short.weight",
                         torch.tensor(rope["short_factor"], dtype=torch.float32).numpy())

    write_model_gguf(path, ref, "phi3", tokenizer_meta, hparams=hparams,
                     layer_tensors=named_layer_tensors(PHI3_NAMES), qtype=qtype)


def round_matrices(ref: torch.nn.Module, qtype: str) -> None:
    """Replace every matrix of `ref` by its `qtype` blocks dequantized, with gguf's reference
    code: the weights a file written with that `qtype` holds."""
    gguf = pytest.importorskip("gguf")
    quant = gguf.GGMLQuantizationType[qtype]
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 2:
                q = gguf.quants.quantize(p.float().numpy(), quant)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, quant)).reshape(p.shape))
