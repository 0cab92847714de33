"""The Llama family (Llama 2/3, SmolLM2, Qwen2/2.5, Qwen3, Mistral, Phi-3) in plain PyTorch.

The members differ by flags of ModelConfig, not by code: q/k/v bias (Qwen2), per-head q/k
RMSNorm (Qwen3), a sliding window (Mistral, Phi-3), the RoPE scaling (Llama 3, longrope
for Phi-3, whose fused qkv_proj / gate_up_proj checkpoint tensors load as they are).

The model sees one flat batch of tokens from many sequences: token ids [T], their
positions [T], and attention metadata saying where each sequence starts and where its
K/V live. Nothing about batching or caching is hidden inside the modules."""

from __future__ import annotations

import torch
from torch import nn

from peregrine.attention_backend import (AttentionBackend, AttentionMetadata, LayerCache,
                                         get_attention_backend)
from peregrine.layers.activation import GATED_ACTIVATIONS
from peregrine.layers.attention import Attention
from peregrine.layers.linear import Linear
from peregrine.layers.norm import RMSNorm
from peregrine.layers.rotary import RotaryEmbedding
from peregrine.models.config import ModelConfig


class MLP(nn.Module):
    """Gated feed-forward (SwiGLU, or GeGLU for Gemma) with gate and up projections fused
    into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu") -> None:
        super().__init__()
        if act not in GATED_ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {act!r} ({sorted(GATED_ACTIVATIONS)})")
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)
        self.act_and_mul = GATED_ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))


def make_attention(cfg: ModelConfig, layer: int, norm: type[RMSNorm] = RMSNorm) -> Attention:
    """Decoder layer `layer`'s attention as `cfg` describes it (window, q/k norm, scale)."""
    scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
    return Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                     bias=cfg.attention_bias, sliding_window=cfg.layer_window(layer),
                     qk_norm=norm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None,
                     scale=scale, softcap=cfg.attn_logit_softcapping)


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residual connections."""

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.self_attn = make_attention(cfg, layer)
        self.mlp = self.make_mlp(cfg, layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def make_mlp(self, cfg: ModelConfig, layer: int) -> nn.Module:
        """The feed-forward block of layer `layer`: a gated MLP (models/moe.py overrides it
        with a mixture of experts)."""
        return MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                residual: torch.Tensor | None, cache: LayerCache | None, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x, cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head (tied to the embedding or not)."""

    # Checkpoint tensors that load into one fused parameter, in order along dim 0.
    packed_modules = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "gate_up_proj": ("gate_proj", "up_proj"),
    }
    # Layers are DecoderLayer (norm, attention, norm, MLP), what GPTQ/AWQ calibration and the
    # fused CPU step (engine/cpu_decode.py) walk.
    llama_layers = True
    layer_cls: type[nn.Module] = DecoderLayer
    norm_cls: type[RMSNorm] = RMSNorm

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions or cfg.max_position_embeddings,
                                      cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(self.layer_cls(cfg, i) for i in range(cfg.num_layers))
        self.norm = self.norm_cls(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.set_attention_backend(get_attention_backend("torch", torch.device("cpu")))

    @property
    def supports_fused_cpu_decode(self) -> bool:
        """Whether the fused C++ step computes this model's layers (dense Llama layers, with
        or without q/k norms and windows)."""
        return self.llama_layers

    # Whether the decode step may be captured as CUDA graphs (engine/cuda_graphs.py).
    supports_cuda_graphs = True

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        """Route every layer's attention through `backend`."""
        for layer in self.layers:
            layer.self_attn.backend = backend

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, kv_caches: list[LayerCache] | None = None,
                num_layers: int | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm. `num_layers` runs only the first
        layers (the self-speculative draft)."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions, x.dtype)
        residual = None
        for i, layer in enumerate(self.layers[:num_layers]):
            x, residual = layer(rope, x, residual,
                                None if kv_caches is None else kv_caches[i], meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab] for the selected hidden states [N, hidden]."""
        return self.lm_head(hidden).float()
