"""Layer-by-layer calibrated quantization (GPTQ, AWQ) of a loaded float model.

Calibration text runs through the model one decoder layer at a time: the layer's linear
inputs are captured with forward pre-hooks, the layer is quantized from them, and the
*quantized* layer then produces the next layer's inputs (so later layers calibrate on the
errors of earlier ones, as both papers do). The final norm's output calibrates the LM head."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from peregrine.attention_backend import AttentionMetadata
from peregrine.layers.linear import Linear, QuantLinear
from peregrine.models.llama import LlamaForCausalLM
from peregrine.quantization.apply import QuantSpec
from peregrine.quantization.awq import search_scale
from peregrine.quantization.gptq import gptq_quantize

logger = logging.getLogger("peregrine")


def calibration_sequences(ids: list[int], num_seqs: int, seq_len: int) -> list[list[int]]:
    """`num_seqs` consecutive, non-overlapping windows of `seq_len` tokens from `ids`."""
    if len(ids) < seq_len:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one sequence "
                         f"of {seq_len}")
    n = min(num_seqs, len(ids) // seq_len)
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]


class _Capture:
    """Forward pre-hooks that keep the inputs of named linears of one layer."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(name))
                        for name, m in modules.items()]

    def _hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            self.inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1])
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _weight(mod: nn.Module) -> torch.Tensor:
    if not isinstance(mod, Linear):
        raise ValueError("calibrated quantization starts from a float model; this one is "
                         f"already quantized ({type(mod).__name__})")
    return mod.weight.detach().float()


def _bias(mod: nn.Module) -> torch.Tensor | None:
    return None if mod.bias is None else mod.bias.detach().clone()


def _gptq_layer(mods: dict[str, nn.Module], inputs: dict[str, torch.Tensor],
                spec: QuantSpec, act_order: bool, damp: float) -> dict[str, QuantLinear]:
    out = {}
    for name, mod in mods.items():
        x = inputs[name].float()
        h = x.t() @ x
        out[name] = gptq_quantize(_weight(mod), h, spec, _bias(mod), act_order=act_order,
                                  damp=damp)
    return out


def _awq_layer(layer: nn.Module, inputs: dict[str, torch.Tensor], spec: QuantSpec,
               inter: int) -> dict[str, QuantLinear]:
    attn, mlp = layer.self_attn, layer.mlp
    # qkv_proj: scales fold into the input RMSNorm
    s = search_scale(inputs["qkv_proj"], [_weight(attn.qkv_proj)], spec)
    layer.input_layernorm.weight.data /= s.to(layer.input_layernorm.weight.dtype)
    attn.qkv_proj.weight.data *= s.to(attn.qkv_proj.weight.dtype)
    # gate_up_proj: into the post-attention RMSNorm
    s = search_scale(inputs["gate_up_proj"], [_weight(mlp.gate_up_proj)], spec)
    layer.post_attention_layernorm.weight.data /= s.to(layer.post_attention_layernorm.weight.dtype)
    mlp.gate_up_proj.weight.data *= s.to(mlp.gate_up_proj.weight.dtype)
    # down_proj: into the up rows of gate_up_proj (silu(gate) * up is linear in up)
    s = search_scale(inputs["down_proj"], [_weight(mlp.down_proj)], spec)
    mlp.gate_up_proj.weight.data[inter:] /= s.to(mlp.gate_up_proj.weight.dtype).unsqueeze(1)
    mlp.down_proj.weight.data *= s.to(mlp.down_proj.weight.dtype)
    return {name: spec.quantize(_weight(m), _bias(m)) for name, m in
            (("qkv_proj", attn.qkv_proj), ("o_proj", attn.o_proj),
             ("gate_up_proj", mlp.gate_up_proj), ("down_proj", mlp.down_proj))}


@torch.inference_mode()
def calibrated_quantize(net: LlamaForCausalLM, seqs: list[list[int]], spec: QuantSpec,
                        method: str, act_order: bool = False, damp: float = 0.01) -> None:
    """Quantize every linear of `net` in place with `method` (gptq | awq) on `seqs`."""
    if method not in ("gptq", "awq"):
        raise ValueError(f"method must be gptq or awq, got {method!r}")
    if not net.llama_layers:
        raise ValueError(f"{method} calibration walks Llama-structured layers; "
                         f"{net.config.architecture} has others (use int4/int8/nf4/fp8)")
    device = net.embed_tokens.weight.device
    meta = AttentionMetadata.prefill_only([len(s) for s in seqs], device)
    ids = torch.tensor([t for s in seqs for t in s], device=device)
    positions = torch.cat([torch.arange(len(s), device=device) for s in seqs])
    x, residual = net.embed_tokens(ids), None
    rope = net.rotary.lookup(positions, x.dtype)
    inter = net.config.intermediate_size
    if net.config.tie_word_embeddings:  # the head gets its own weight to scale/quantize
        net.lm_head.weight = nn.Parameter(net.lm_head.weight.detach().clone(),
                                          requires_grad=False)
    t0 = time.perf_counter()
    for i, layer in enumerate(net.layers):
        mods = {"qkv_proj": layer.self_attn.qkv_proj, "o_proj": layer.self_attn.o_proj,
                "gate_up_proj": layer.mlp.gate_up_proj, "down_proj": layer.mlp.down_proj}
        cap = _Capture(mods)
        layer(rope, x, residual, None, meta)
        cap.close()
        if method == "gptq":
            new = _gptq_layer(mods, cap.inputs, spec, act_order, damp)
        else:
            new = _awq_layer(layer, cap.inputs, spec, inter)
        layer.self_attn.qkv_proj, layer.self_attn.o_proj = new["qkv_proj"], new["o_proj"]
        layer.mlp.gate_up_proj, layer.mlp.down_proj = new["gate_up_proj"], new["down_proj"]
        x, residual = layer(rope, x, residual, None, meta)
        logger.info("%s: layer %d/%d quantized (%.0fs)", method, i + 1, len(net.layers),
                    time.perf_counter() - t0)
    h, _ = net.norm(x, residual)
    head, head_spec = net.lm_head, spec.for_lm_head()
    if method == "gptq":
        hf = h.float()
        net.lm_head = gptq_quantize(_weight(head), hf.t() @ hf, head_spec, _bias(head),
                                    act_order=act_order, damp=damp)
    else:
        s = search_scale(h, [_weight(head)], head_spec, max_tokens=512)
        net.norm.weight.data /= s.to(net.norm.weight.dtype)
        net.lm_head = head_spec.quantize(_weight(head) * s, _bias(head))
