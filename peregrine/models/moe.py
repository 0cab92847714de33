"""Mixtures of experts on the Llama decoder: Mixtral, Qwen2-MoE and Qwen3-MoE.

Their decoder layers are Llama's (pre-norm attention, residuals) with the MLP swapped for a
sparse block (layers/moe.py) where the config makes the layer sparse; what differs between
the three is config: Mixtral renormalizes its top-2 weights and has no shared expert;
Qwen2-MoE has q/k/v bias, a shared expert behind a sigmoid gate and `norm_topk_prob`
(usually off); Qwen3-MoE has Qwen3's q/k norms and no shared expert."""

from __future__ import annotations

from torch import nn

from peregrine.layers.moe import SparseMoE
from peregrine.models.config import ModelConfig
from peregrine.models.llama import MLP, DecoderLayer, LlamaForCausalLM


class MoEDecoderLayer(DecoderLayer):
    """A Llama decoder layer whose MLP is a sparse mixture of experts in sparse layers."""

    def make_mlp(self, cfg: ModelConfig, layer: int) -> nn.Module:
        if not cfg.is_moe_layer(layer):
            return super().make_mlp(cfg, layer)
        shared = None
        if cfg.shared_expert_intermediate_size:
            shared = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, cfg.hidden_act)
        return SparseMoE(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok,
                         cfg.moe_intermediate_size, cfg.norm_topk_prob, cfg.hidden_act,
                         shared)


class MoEForCausalLM(LlamaForCausalLM):
    """Mixtral / Qwen2-MoE / Qwen3-MoE: embedding, MoE decoder layers, norm, LM head."""

    # The fused CPU step and GPTQ/AWQ calibration know only dense MLPs.
    llama_layers = False
    layer_cls = MoEDecoderLayer
    # The Triton fused MoE reads no host values, but it has not run on a GPU yet, and
    # quantized experts group on the host: CUDA runs these models eagerly.
    supports_cuda_graphs = False
