"""Quantized checkpoints: a directory `peregrine serve --model DIR` loads directly.

    config.json            the model's Hugging Face config + a `quantization_config`
    model.safetensors      quantized linears (qweight, scale[, offset][, bias]) under our
                           module names, and the float tensors (embeddings, norms)
    tokenizer.json, tokenizer_config.json (chat template, special tokens)

quantization_config = {"quant_method": "peregrine", "method": "gptq", "bits": 4,
"group_size": 128, "symmetric": false, "modules": {"layers.0.self_attn.qkv_proj": "int4", ...}}."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from peregrine.layers.linear import QUANT_LINEAR_TYPES, QuantLinear
from peregrine.models.config import MODEL_TYPES, SUPPORTED_ARCHITECTURES, ModelConfig
from peregrine.models.errors import ModelLoadError
from peregrine.models.tokenizer import Tokenizer
from peregrine.quantization.apply import linear_layers, replace_experts, replace_linears

QUANT_METHOD = "peregrine"
WEIGHTS_FILE = "model.safetensors"


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A Hugging Face config.json dict that ModelConfig.from_hf reads back as `cfg`."""
    arch = next(a for a, f in SUPPORTED_ARCHITECTURES.items() if f == cfg.architecture)
    model_type = next(t for t, f in MODEL_TYPES.items() if f == cfg.architecture)
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_id),
        "torch_dtype": "float32", "_name_or_path": cfg.name,
    }
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.sliding_window is not None:
        out["sliding_window"] = cfg.sliding_window
        out["use_sliding_window"] = True
    if cfg.layer_types is not None:
        out.update(layer_types=list(cfg.layer_types), sliding_window=cfg.local_window)
    if cfg.is_gemma:
        out.update(hidden_activation=cfg.hidden_act,
                   query_pre_attn_scalar=cfg.query_pre_attn_scalar,
                   attn_logit_softcapping=cfg.attn_logit_softcapping,
                   final_logit_softcapping=cfg.final_logit_softcapping)
    if cfg.rope_local_theta is not None:
        out["rope_local_base_freq"] = cfg.rope_local_theta
    if cfg.is_moe:
        out.update(num_experts=cfg.num_experts, num_local_experts=cfg.num_experts,
                   num_experts_per_tok=cfg.num_experts_per_tok,
                   moe_intermediate_size=cfg.moe_intermediate_size,
                   shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                   norm_topk_prob=cfg.norm_topk_prob,
                   decoder_sparse_step=cfg.decoder_sparse_step,
                   mlp_only_layers=list(cfg.mlp_only_layers), qkv_bias=cfg.attention_bias)
    return out


def save_tokenizer(tok: Tokenizer, out_dir: str) -> None:
    """tokenizer.json (the tokenizers backend) + tokenizer_config.json (template, specials)."""
    tok.backend.save(os.path.join(out_dir, "tokenizer.json"))
    tcfg: dict[str, Any] = {"chat_template": tok.chat_template}
    if tok.bos_token_id is not None:
        tcfg["bos_token"] = tok.id_to_token(tok.bos_token_id)
    if tok.eos_token_ids:
        tcfg["eos_token"] = tok.id_to_token(tok.eos_token_ids[0])
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tcfg, f, indent=2, ensure_ascii=False)


def save_quantized(net: nn.Module, cfg: ModelConfig, tok: Tokenizer, out_dir: str,
                   info: dict[str, Any]) -> None:
    """Write a quantized model (its linears already QuantLinear) as a checkpoint directory."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    modules = {name: mod.method for name, _, _, mod in linear_layers(net)
               if isinstance(mod, QuantLinear)}
    tensors: dict[str, torch.Tensor] = {}
    for name, t in net.state_dict().items():
        tensors[name] = t.detach().cpu().contiguous()
    if cfg.tie_word_embeddings and "lm_head.weight" in tensors:
        del tensors["lm_head.weight"]  # the same tensor as embed_tokens.weight
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    config = hf_config(cfg)
    config["quantization_config"] = {"quant_method": QUANT_METHOD, **info, "modules": modules}
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_tokenizer(tok, out_dir)


def is_quantized_checkpoint(config: dict[str, Any]) -> bool:
    qc = config.get("quantization_config") or {}
    return qc.get("quant_method") == QUANT_METHOD


def load_quantized(net: nn.Module, path: str, config: dict[str, Any]) -> None:
    """Fill a materialized float model from a quantized checkpoint: swap in the quantized
    linears, copy the float tensors; every tensor must find its place and vice versa."""
    from safetensors import safe_open
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        raise ModelLoadError(f"{path} has no {WEIGHTS_FILE}")
    modules: dict[str, str] = config["quantization_config"].get("modules", {})
    with safe_open(file, framework="pt") as h:
        keys = set(h.keys())
        new: dict[str, QuantLinear] = {}
        for name, method in modules.items():
            cls = QUANT_LINEAR_TYPES.get(method)
            if cls is None:
                raise ModelLoadError(f"{path}: module {name} has unknown format {method!r}")
            fields = {"int4": ("qweight", "scale", "offset")}.get(method, ("qweight", "scale"))
            try:
                args = [h.get_tensor(f"{name}.{f}") for f in fields]
            except Exception:
                raise ModelLoadError(f"{path}: tensors of {name} are missing") from None
            bias = h.get_tensor(f"{name}.bias") if f"{name}.bias" in keys else None
            new[name] = cls(*args, bias=bias)
            keys -= {f"{name}.{f}" for f in fields} | {f"{name}.bias"}
        replace_experts(net, new)
        replace_linears(net, new)
        params = dict(net.named_parameters())
        quantized_params = {n for n, _ in net.named_parameters()
                            if n.rsplit(".", 1)[0] in new}
        for key in keys:
            if key not in params:
                raise ModelLoadError(f"{path}: tensor {key} has no place in the model")
            value = h.get_tensor(key)
            if value.shape != params[key].shape:
                raise ModelLoadError(f"{path}: {key} has shape {tuple(value.shape)}, the "
                                     f"model wants {tuple(params[key].shape)}")
            params[key].data.copy_(value)
        missing = set(params) - keys - quantized_params
        if missing:
            raise ModelLoadError(f"{path} is missing {len(missing)} tensors, e.g. "
                                 f"{sorted(missing)[:3]}")
