"""The BERT family of encoders (BERT, MiniLM, all-MiniLM-L6-v2) in plain PyTorch.

A padded batch of token ids [B, L] and its attention mask in, hidden states [B, L, H] out.
Module names follow Hugging Face's BertModel, so its checkpoints load as they are."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peregrine.models.errors import ModelLoadError


@dataclass
class BertConfig:
    """The fields of a BERT config.json that shape the network."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BertConfig":
        """Read a Hugging Face config.json; ModelLoadError for what this encoder cannot run."""
        if d.get("model_type", "bert") != "bert":
            raise ModelLoadError(f"model_type {d.get('model_type')!r} is not a BERT encoder")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ModelLoadError("only absolute position embeddings are supported, got "
                                 f"{d['position_embedding_type']!r}")
        if d.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise ModelLoadError(f"hidden_act {d['hidden_act']!r} is not supported "
                                 f"({sorted(_ACTIVATIONS)})")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if d.get(k) is not None})

    @classmethod
    def from_json(cls, text: str | bytes) -> "BertConfig":
        """Read config.json's text."""
        return cls.from_dict(json.loads(text))


_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu,
                "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(positions))
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    """Bidirectional multi-head attention projections (query, key, value)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = h // cfg.num_attention_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, H]; bias [B, 1, 1, L]: 0 for real keys, -inf for padding."""
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)),
                                             heads(self.value(x)), attn_mask=bias)
        return out.transpose(1, 2).reshape(b, n, -1)


class BertAttentionOutput(nn.Module):
    """Projection, residual, LayerNorm (post-norm, as BERT)."""

    def __init__(self, cfg: BertConfig, inner: int) -> None:
        super().__init__()
        self.dense = nn.Linear(inner, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    """Self-attention and its output block."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertAttentionOutput(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, bias), x)


class BertIntermediate(nn.Module):
    """The feed-forward's up projection and activation."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    """One encoder layer: attention block, then feed-forward block, each post-norm."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertAttentionOutput(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    """The stack of encoder layers."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, bias)
        return x


class BertModel(nn.Module):
    """Embeddings and encoder: the last hidden states of every token (no pooler)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [B, L, H] of input_ids [B, L]; attention_mask [B, L] is 1 for real
        tokens and 0 for padding (which no real token attends to)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        bias = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
        bias.masked_fill_(attention_mask == 0, float("-inf"))
        return self.encoder(x, bias[:, None, None, :])

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load a Hugging Face BertModel state dict (a `bert.` prefix and the pooler, which
        sentence embeddings do not use, are dropped); ModelLoadError on missing tensors."""
        state = {k.removeprefix("bert."): v for k, v in state.items()}
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ModelLoadError(f"the checkpoint lacks {len(missing)} tensors, e.g. "
                                 f"{missing[:3]}")
        for name, param in own.items():
            t = state[name]
            if t.shape != param.shape:
                raise ModelLoadError(f"{name}: the checkpoint's shape {tuple(t.shape)} is not "
                                     f"the config's {tuple(param.shape)}")
            param.copy_(t.to(param.dtype))
