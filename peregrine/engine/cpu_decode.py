"""The fused CPU step: every layer of a step's forward in one C++ call.

The CPU analogue of CUDA graphs. A step of a small model is ~40 eager torch ops per layer,
each a few microseconds of dispatch, which on a 2-core CPU cost more than the arithmetic.
When every linear of the model is int4, int6 or int8 (a GGUF file's blocks, or
`--quantization int4|int8`) and the KV cache is float32, `FusedDecodeRunner` runs all layers
of a step in one OpenMP region of q8_decode.cpp (int8 dot products against activations
quantized per 32 values, a scale per 8).

Every token takes the same path: its K/V are written, then it attends to its sequence's
cache up to its own position, with operations whose order depends on nothing but the token
itself. A token's hidden states are therefore the same whether it is a decode, a draft being
verified, part of a prefill chunk of any size, recomputed after preemption or batched with
anything: batching, chunking, preemption, prefix caching and speculation cannot change
greedy output. The torch modules stay the reference the fused step is tested against
(`--enforce-eager` runs them)."""

from __future__ import annotations

import logging

import torch

from peregrine.attention_backend import AttentionMetadata, LayerCache
from peregrine.layers.linear import Int4Linear, Int5Linear, Int6Linear, Int8Linear, QuantLinear
from peregrine.layers.lora import LoRALinear
from peregrine.layers.norm import RMSNorm
from peregrine.layers.parallel_linear import is_parallel
from peregrine.models.llama import LlamaForCausalLM

logger = logging.getLogger("peregrine")


def _weight(lin: QuantLinear) -> list[torch.Tensor | None]:
    """(q, scale, offset, bias, group size, kind, scale and offset super-block factors) of
    an int4/int5/int6/int8 linear, as the kernel takes them."""
    bias = None if lin.bias is None else lin.bias.data.float().contiguous()
    return [lin.qweight, lin.scale, getattr(lin, "offset", None), bias,
            torch.tensor(lin.group_size or 0), torch.tensor(lin.kernel_kind),
            getattr(lin, "scale_super", None), getattr(lin, "offset_super", None)]


def fusable(model: LlamaForCausalLM, kv_caches: list[LayerCache]) -> str | None:
    """Why the fused step cannot run this model, or None when it can."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        return ("LoRA is enabled: the fused step computes no adapter deltas, so every step "
                "runs the eager modules")
    if is_parallel(model):
        return ("the model is split over ranks (tensor/pipeline parallel): the fused step runs "
                "every layer in one C++ call and cannot all-reduce or hand over mid-model")
    if not model.supports_fused_cpu_decode:
        return (f"{model.config.architecture} layers (experts) are not the fused step's "
                "Llama or Gemma layers")
    if any(c.k_scale is not None or c.k.dtype != torch.float32 or c.k.device.type != "cpu"
           for c in kv_caches):
        return "the KV cache is not float32 on the CPU"
    for layer in model.layers:
        for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                    layer.mlp.down_proj):
            if not isinstance(lin, (Int4Linear, Int5Linear, Int6Linear, Int8Linear)):
                return f"a linear is {type(lin).__name__}, not int4/int5/int6/int8"
    return None


def _norm(norm: RMSNorm) -> torch.Tensor:
    """What the norm multiplies a normalized row by: its weight, plus 1 for Gemma's norms."""
    w = norm.weight.data
    return (w + norm.weight_offset).contiguous() if norm.weight_offset else w


def _layer_options(ops, layer: torch.nn.Module, window: int | None, local_rope: bool):
    """What layer `layer` has beyond a Llama layer, as the C++ decoder takes it."""
    opts = ops.LayerOptions()
    attn = layer.self_attn
    if attn.has_qk_norm:
        opts.q_norm, opts.k_norm = _norm(attn.q_norm), _norm(attn.k_norm)
    if hasattr(layer, "post_feedforward_layernorm"):  # Gemma: each block's output is normed
        opts.attn_out_norm = _norm(layer.post_attention_layernorm)
        opts.mlp_out_norm = _norm(layer.post_feedforward_layernorm)
    opts.window = window or 0
    opts.rope_table = int(local_rope)
    return opts


class FusedDecodeRunner:
    """Runs a step's entries through the C++ decoder."""

    def __init__(self, ops, model: LlamaForCausalLM, kv_caches: list[LayerCache]) -> None:
        cfg = model.config
        self.model = model
        attn0 = model.layers[0].self_attn
        options = ops.DecoderOptions()
        options.gelu_tanh = cfg.hidden_act == "gelu_pytorch_tanh"
        options.attn_scale = attn0.scale
        options.attn_softcap = attn0.softcap or 0.0
        self.decoder = ops.Decoder(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                                   cfg.head_dim, cfg.intermediate_size, cfg.rms_norm_eps,
                                   kv_caches[0].block_size, options)
        # Gemma 3's local layers rotate with their own table (the second one passed)
        local = getattr(model, "rotary_local", None)
        self.rope_tables = [model.rotary.cos_sin] + ([local.cos_sin] if local is not None else [])
        self.embed_scale = getattr(model, "embed_scale", None)
        for i, (layer, cache) in enumerate(zip(model.layers, kv_caches)):
            attn, mlp = layer.self_attn, layer.mlp
            # Gemma's pre_feedforward_layernorm is the norm of the residual stream that
            # Llama calls post_attention_layernorm
            pre_mlp = getattr(layer, "pre_feedforward_layernorm", layer.post_attention_layernorm)
            opts = _layer_options(ops, layer, cfg.layer_window(i),
                                  local is not None and getattr(layer, "is_local", False))
            self.decoder.add_layer(_weight(attn.qkv_proj), _weight(attn.o_proj),
                                   _weight(mlp.gate_up_proj), _weight(mlp.down_proj),
                                   _norm(layer.input_layernorm), _norm(pre_mlp), cache.k,
                                   cache.v, opts)
        self.decoder.set_final_norm(_norm(model.norm))

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
            ) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, as the model's forward gives."""
        qs = meta.query_start_loc
        if meta.num_tokens == meta.num_seqs:  # one token per entry
            token_seq = torch.arange(meta.num_seqs)
        else:
            lens = torch.tensor([qs[i + 1] - qs[i] for i in range(meta.num_seqs)])
            token_seq = torch.repeat_interleave(torch.arange(meta.num_seqs), lens)
        x = self.model.embed_tokens(input_ids)
        if self.embed_scale is not None:  # rounded to the activation dtype, as Gemma does
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype).item()
        hidden, = self.decoder.forward(x, positions, self.rope_tables, meta.slot_mapping,
                                       meta.block_tables, token_seq, -1)
        return hidden


def fused_decode_runner(model: LlamaForCausalLM, kv_caches: list[LayerCache]
                        ) -> FusedDecodeRunner | None:
    """The fused decode runner for `model`, or None when it cannot run (reason logged)."""
    from peregrine.kernels.cpu import q8_ops
    reason = fusable(model, kv_caches)
    ops = None if reason else q8_ops()
    if reason is None and ops is None:
        reason = "the C++ kernels are unavailable"
    if reason is not None:
        logger.info("fused CPU decode off: %s", reason)
        return None
    return FusedDecodeRunner(ops, model, kv_caches)
