"""The fused CPU decode step: every layer of a pure-decode step in one C++ call.

The CPU analogue of CUDA graphs. A decode step of a small model is ~40 eager torch ops per
layer, each a few microseconds of dispatch, which on a 2-core CPU cost more than the
arithmetic. When every linear of the model is int4 or int8 (GGUF Q4_0/Q4_1/Q8_0 blocks, or
`--quantization int4|int8`), the KV cache is float32 and the step holds one new token per
sequence, `FusedDecodeRunner` runs all layers in one OpenMP region of q8_decode.cpp (int8
dot products against activations quantized per 32 values).

Every token of a sequence in its decode phase (a decode, or a draft being verified) takes
this path, and every prefill token the plain modules, whatever else shares the step: a
mixed step runs its decoding entries fused and its prefill chunks through the modules, so
a sequence's output does not depend on what it was batched with. The modules stay the
reference the fused step is tested against."""

from __future__ import annotations

import logging

import torch

from peregrine.layers.attention import AttentionMetadata, LayerCache
from peregrine.layers.linear import Int4Linear, Int8Linear, QuantLinear
from peregrine.models.llama import LlamaForCausalLM

logger = logging.getLogger("peregrine")


def _weight(lin: QuantLinear) -> list[torch.Tensor | None]:
    """(q, scale, offset, bias, group size) of an int4/int8 linear, as the kernel takes them."""
    offset = lin.offset if isinstance(lin, Int4Linear) else None
    bias = None if lin.bias is None else lin.bias.data.float().contiguous()
    return [lin.qweight, lin.scale, offset, bias, torch.tensor(lin.group_size or 0)]


def fusable(model: LlamaForCausalLM, kv_caches: list[LayerCache]) -> str | None:
    """Why the fused step cannot run this model, or None when it can."""
    if any(c.k_scale is not None or c.k.dtype != torch.float32 or c.k.device.type != "cpu"
           for c in kv_caches):
        return "the KV cache is not float32 on the CPU"
    for layer in model.layers:
        for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                    layer.mlp.down_proj):
            if not isinstance(lin, (Int4Linear, Int8Linear)):
                return f"a linear is {type(lin).__name__}, not int4/int8"
    return None


class FusedDecodeRunner:
    """Runs the decoding entries of a step through the C++ decoder."""

    def __init__(self, ops, model: LlamaForCausalLM, kv_caches: list[LayerCache]) -> None:
        cfg = model.config
        self.model = model
        block_size = kv_caches[0].block_size
        self.decoder = ops.Decoder(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                                   cfg.head_dim, cfg.intermediate_size, cfg.rms_norm_eps,
                                   cfg.sliding_window or 0, block_size)
        for layer, cache in zip(model.layers, kv_caches):
            attn, mlp = layer.self_attn, layer.mlp
            self.decoder.add_layer(_weight(attn.qkv_proj), _weight(attn.o_proj),
                                   _weight(mlp.gate_up_proj), _weight(mlp.down_proj),
                                   layer.input_layernorm.weight.data,
                                   layer.post_attention_layernorm.weight.data, cache.k, cache.v)
        self.decoder.set_final_norm(model.norm.weight.data)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            kv_caches: list[LayerCache], num_fused: int) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, as the model's forward gives: the
        first `num_fused` entries (decodes and verifications, attending to their cached
        context) through the C++ decoder, the others (prefill chunks) through the modules."""
        qs = meta.query_start_loc
        t = qs[num_fused]
        if t == num_fused:  # one token per entry
            token_seq = torch.arange(t)
        else:
            lens = torch.tensor([qs[i + 1] - qs[i] for i in range(num_fused)])
            token_seq = torch.repeat_interleave(torch.arange(num_fused), lens)
        x = self.model.embed_tokens(input_ids[:t])
        fused, = self.decoder.forward(x, positions[:t], self.model.rotary.cos_sin,
                                      meta.slot_mapping[:t], meta.block_tables, token_seq, -1)
        if num_fused == meta.num_seqs:
            return fused
        rest = AttentionMetadata(
            query_start_loc=[q - t for q in qs[num_fused:]], seq_lens=meta.seq_lens[num_fused:],
            num_decodes=0, slot_mapping=meta.slot_mapping[t:],
            block_tables=meta.block_tables[num_fused:],
            query_start_loc_t=meta.query_start_loc_t[num_fused:] - t,
            seq_lens_t=meta.seq_lens_t[num_fused:])
        eager = self.model(input_ids[t:], positions[t:], rest, kv_caches)
        return torch.cat([fused, eager])


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
