"""Gemma 2 and Gemma 3 (text) in plain PyTorch, on the Llama model's layers.

What differs from Llama: the embedding is scaled by sqrt(hidden); RMSNorm scales by
(1 + weight); each layer norms the attention and MLP outputs too (four norms); the MLP is
GeGLU (tanh gelu); attention is scaled by query_pre_attn_scalar^-1/2; layers alternate
between a local sliding window and global attention. Gemma 2 soft-caps the attention and
final logits; Gemma 3 instead norms each q/k head and gives local layers their own RoPE
base (global layers keep the configured RoPE scaling)."""

from __future__ import annotations

import torch
from torch import nn

from peregrine.attention_backend import AttentionMetadata, LayerCache
from peregrine.layers.norm import GemmaRMSNorm
from peregrine.layers.rotary import RotaryEmbedding
from peregrine.models.config import SLIDING, ModelConfig
from peregrine.models.llama import MLP, LlamaForCausalLM, make_attention


class GemmaDecoderLayer(nn.Module):
    """Attention and MLP blocks, each normed before and after, with residual connections."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = make_attention(cfg, layer, GemmaRMSNorm)
        self.mlp = MLP(h, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.is_local = cfg.layer_types is not None and cfg.layer_types[layer] == SLIDING

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                residual: torch.Tensor | None, cache: LayerCache | None, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(rope, x, cache, meta))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma 2 / Gemma 3 text: scaled embedding, Gemma layers, final norm, tied LM head."""

    llama_layers = False
    layer_cls = GemmaDecoderLayer
    norm_cls = GemmaRMSNorm

    @property
    def supports_fused_cpu_decode(self) -> bool:
        """The fused C++ step computes Gemma layers too (options of the Llama layer)."""
        return True

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__(cfg, max_positions)
        # Gemma 3's local layers rotate with their own base and no scaling.
        self.rotary_local = None if cfg.rope_local_theta is None else RotaryEmbedding(
            cfg.head_dim, max_positions or cfg.max_position_embeddings, cfg.rope_local_theta)
        self.embed_scale = cfg.hidden_size ** 0.5
        self.softcap = cfg.final_logit_softcapping

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, kv_caches: list[LayerCache] | None = None,
                num_layers: int | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm. `num_layers` runs only the first
        layers (the self-speculative draft)."""
        x = self.embed_tokens(input_ids)
        # Gemma rounds the scale to the activation dtype before multiplying.
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype).item()
        rope = self.rotary.lookup(positions, x.dtype)
        rope_local = rope if self.rotary_local is None else self.rotary_local.lookup(
            positions, x.dtype)
        residual = None
        for i, layer in enumerate(self.layers[:num_layers]):
            x, residual = layer(rope_local if layer.is_local else rope, x, residual,
                                None if kv_caches is None else kv_caches[i], meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab], soft-capped (Gemma 2) as cap * tanh(logits / cap)."""
        logits = self.lm_head(hidden).float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
