"""ModelConfig: the hyper-parameters of a decoder model (Llama, Qwen, Mistral, Phi-3, Gemma,
the Mixtral and Qwen mixtures of experts), from config.json or GGUF metadata."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peregrine.models.errors import ModelLoadError

# Hugging Face `architectures` entries we run, and the family name each maps to.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
# config.json `model_type` -> family, for configs without `architectures`.
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
               "phi3": "phi3", "gemma2": "gemma2", "gemma3_text": "gemma3",
               "mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe"}
GEMMA_FAMILIES = ("gemma2", "gemma3")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class ModelConfig:
    """Shape and numerics of one decoder model."""

    architecture: str  # a family of SUPPORTED_ARCHITECTURES: llama | mistral | qwen2 | ...
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    # A window every layer uses (Mistral, Phi-3): the KV cache may free blocks behind it.
    sliding_window: int | None = None
    # Interleaved local/global attention (Gemma): layer i is windowed by `local_window` iff
    # layer_types[i] == "sliding_attention"; global layers keep every block, so
    # `sliding_window` stays None and the engine frees nothing.
    layer_types: list[str] | None = None
    local_window: int | None = None
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each q and k head before RoPE
    hidden_act: str = "silu"  # silu (SwiGLU) | gelu_pytorch_tanh (GeGLU, Gemma)
    query_pre_attn_scalar: float | None = None  # Gemma: attention scale is its -1/2 power
    attn_logit_softcapping: float | None = None  # Gemma 2: cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: the same on the logits
    rope_local_theta: float | None = None  # Gemma 3: RoPE base of the local layers
    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): each token goes through the
    # `num_experts_per_tok` experts (SwiGLU MLPs of width `moe_intermediate_size`) its
    # router rates highest, weighted by their softmax probabilities (renormalized over the
    # chosen ones when `norm_topk_prob`). Qwen2-MoE adds a shared expert, scaled by a sigmoid
    # gate, that every token goes through. A layer in `mlp_only_layers`, or not a multiple
    # of `decoder_sparse_step` (1-based), keeps a dense MLP of `intermediate_size`.
    num_experts: int = 0  # 0: a dense model
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    name: str = ""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                             f"1..num_experts ({self.num_experts})")

    @property
    def is_gemma(self) -> bool:
        return self.architecture in GEMMA_FAMILIES

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` has a sparse mixture-of-experts block (else a dense
        MLP), as transformers' Qwen2-MoE / Qwen3-MoE decide it."""
        return (self.is_moe and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def layer_window(self, layer: int) -> int | None:
        """The attention window of decoder layer `layer` (None: it sees the whole context)."""
        if self.layer_types is None:
            return self.sliding_window
        return self.local_window if self.layer_types[layer] == SLIDING else None

    def num_norm_params(self) -> int:
        """Weights of every RMSNorm: per layer two (Gemma four), q/k norms, the final one."""
        per_layer = (4 if self.is_gemma else 2) * self.hidden_size
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        return self.num_layers * per_layer + self.hidden_size

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def mlp_params(self, layer: int, active: bool = False) -> int:
        """Parameters of layer `layer`'s MLP block: a dense MLP, or the router, the experts
        (only the `num_experts_per_tok` a token runs when `active`) and the shared expert
        with its gate."""
        h = self.hidden_size
        if not self.is_moe_layer(layer):
            return 3 * h * self.intermediate_size
        experts = self.num_experts_per_tok if active else self.num_experts
        total = self.num_experts * h + experts * 3 * h * self.moe_intermediate_size
        if self.shared_expert_intermediate_size:
            total += 3 * h * self.shared_expert_intermediate_size + h
        return total

    def num_params(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Parameter count (embeddings counted once when tied); `active`: only the experts
        one token runs (what a mixture of experts computes with)."""
        h = self.hidden_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        mlp = sum(self.mlp_params(n, active) for n in range(self.num_layers))
        total = self.num_layers * attn + mlp + self.num_norm_params()
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        elif not self.tie_word_embeddings:
            total += self.vocab_size * h  # the LM head is a matmul, the embedding a lookup
        return total

    def kv_bytes_per_token(self, bytes_per_value: float) -> float:
        """KV-cache bytes one token takes across all layers."""
        return 2 * self.num_layers * self.kv_size * bytes_per_value

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], name: str = "") -> "ModelConfig":
        """Build from a Hugging Face config.json dict."""
        archs = cfg.get("architectures") or []
        family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES),
                      None) or MODEL_TYPES.get(cfg.get("model_type", ""))
        if family is None:
            raise ModelLoadError(f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                             f"peregrine runs {sorted(SUPPORTED_ARCHITECTURES)}")
        num_heads = cfg["num_attention_heads"]
        layer_types = _layer_types(family, cfg)
        rope_theta, rope_scaling, local_theta = _rope(cfg, family)
        sliding = cfg.get("sliding_window")
        if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not cfg.get(
                "use_sliding_window", False):
            sliding = None
        if family == "llama" or layer_types is not None:
            sliding = None
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        gemma = family in GEMMA_FAMILIES
        return cls(
            architecture=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", gemma),
            attention_bias=(family == "qwen2" or cfg.get("attention_bias", False)
                            or (family == "qwen2_moe" and cfg.get("qkv_bias", True))),
            sliding_window=sliding,
            layer_types=layer_types,
            local_window=cfg.get("sliding_window") if layer_types is not None else None,
            qk_norm=family in ("qwen3", "gemma3", "qwen3_moe"),
            hidden_act=(cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
                        ) if not gemma else "gelu_pytorch_tanh",
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") if gemma else None,
            attn_logit_softcapping=cfg.get("attn_logit_softcapping") if gemma else None,
            final_logit_softcapping=cfg.get("final_logit_softcapping") if gemma else None,
            rope_local_theta=local_theta,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos_ids,
            name=name or cfg.get("_name_or_path", ""),
            **_moe(family, cfg),
        )

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], has_output_tensor: bool, has_qkv_bias: bool,
                  name: str = "", rope_factors: tuple[list[float], list[float]] | None = None
                  ) -> "ModelConfig":
        """Build from GGUF metadata (keys such as `llama.block_count`); `rope_factors`: the
        (short, long) longrope factors of a Phi-3 file's rope_factors_* tensors."""
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ModelLoadError(f"unsupported GGUF architecture {arch!r}; peregrine runs "
                                 f"{', '.join(GGUF_ARCHITECTURES)} (llama includes Mixtral)")

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        experts = get("expert_count", 0)
        moe: dict[str, Any] = {} if not experts else dict(
            num_experts=experts, num_experts_per_tok=get("expert_used_count"),
            moe_intermediate_size=get("expert_feed_forward_length")
            or get("feed_forward_length"),
            shared_expert_intermediate_size=get("expert_shared_feed_forward_length", 0),
            # llama.cpp renormalizes Mixtral's and Qwen3-MoE's top-k weights, not Qwen2-MoE's
            norm_topk_prob=bool(get("expert_weights_norm", arch != "qwen2moe")))
        # Mixtral files are llama files with experts
        family = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}.get(
            arch, "mixtral" if experts else arch)

        num_heads = get("attention.head_count")
        hidden = get("embedding_length")
        head_dim = (get("attention.key_length") or get("rope.dimension_count")
                    or hidden // num_heads)
        if get("rope.dimension_count", head_dim) != head_dim:
            raise ModelLoadError("partial rotary embeddings (rope.dimension_count "
                                 f"{get('rope.dimension_count')} < head_dim {head_dim}) are "
                                 "not supported")
        vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
        rope_scaling = None
        if get("rope.scaling.type") == "linear":
            rope_scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
        extra: dict[str, Any] = {}
        if family in GEMMA_FAMILIES:
            extra = _gguf_gemma(family, get, hidden, num_heads, head_dim)
        elif family == "phi3":
            rope_scaling = _gguf_longrope(get, rope_factors)
        eos = meta.get("tokenizer.ggml.eos_token_id")
        sliding = get("attention.sliding_window") or None  # Phi-3: 0 means none (Phi-4)
        fields = dict(
            architecture=family,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length"),
            num_layers=get("block_count"),
            num_heads=num_heads,
            num_kv_heads=get("attention.head_count_kv", num_heads),
            head_dim=head_dim,
            rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=get("context_length", 4096),
            tie_word_embeddings=not has_output_tensor,
            attention_bias=has_qkv_bias,
            sliding_window=sliding,
            qk_norm=arch in ("qwen3", "qwen3moe", "gemma3"),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=[] if eos is None else [eos],
            name=name or meta.get("general.name", ""),
            **moe)
        fields.update(extra)
        return cls(**fields)


# `general.architecture` values of the GGUF files we load.
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "phi3",
                      "gemma2", "gemma3")


def _gguf_gemma(family: str, get: Callable[..., Any], hidden: int, num_heads: int,
                head_dim: int) -> dict[str, Any]:
    """Gemma 2 / 3 fields of a GGUF file, with llama.cpp's defaults for absent keys."""
    n = get("block_count")
    window = get("attention.sliding_window", 4096 if family == "gemma2" else 0)
    pattern = get("attention.sliding_window_pattern", 2 if family == "gemma2" else 6)
    if not window:  # a Gemma 3 file without a window: every layer global
        types = [FULL] * n
    elif isinstance(pattern, int):  # every pattern-th layer global, as llama.cpp counts
        types = [SLIDING if pattern == 0 or i % pattern < pattern - 1 else FULL
                 for i in range(n)]
    else:  # one bool per layer: windowed or not
        types = [SLIDING if local else FULL for local in pattern]
        if len(types) != n:
            raise ModelLoadError(f"attention.sliding_window_pattern has {len(types)} entries "
                                 f"for {n} layers")
    # The file does not store query_pre_attn_scalar: llama.cpp (as Google's reference) scales
    # by head_dim^-1/2, except the 27B models (46 / 62 layers) by (hidden / heads)^-1/2.
    big = n == (46 if family == "gemma2" else 62)
    out = dict(layer_types=types, local_window=window or None, sliding_window=None,
               hidden_act="gelu_pytorch_tanh",
               query_pre_attn_scalar=hidden // num_heads if big else head_dim,
               final_logit_softcapping=get("final_logit_softcapping",
                                           30.0 if family == "gemma2" else None) or None)
    if family == "gemma2":
        out["attn_logit_softcapping"] = get("attn_logit_softcapping", 50.0)
    else:
        out["rope_local_theta"] = float(get("rope.freq_base_swa", 10000.0))
    return out


def _gguf_longrope(get: Callable[..., Any], factors: tuple[list[float], list[float]] | None
                   ) -> dict[str, Any] | None:
    """Phi-3's longrope scaling from its rope_factors_short / _long tensors and metadata."""
    if factors is None:
        return None
    orig = get("rope.scaling.original_context_length")
    if orig is None:
        raise ModelLoadError("rope_factors_long/short without "
                             "rope.scaling.original_context_length")
    short, long = factors
    return {"rope_type": "longrope", "short_factor": short, "long_factor": long,
            "original_max_position_embeddings": orig,
            "max_position_embeddings": get("context_length", orig),
            "attention_factor": get("rope.scaling.attn_factor")}


def _moe(family: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The mixture-of-experts fields of a Mixtral / Qwen2-MoE / Qwen3-MoE config.json, with
    transformers' defaults for keys a config leaves out ({} for a dense family)."""
    if family not in MOE_FAMILIES:
        return {}
    if family == "mixtral":  # every layer sparse, experts as wide as `intermediate_size`
        return dict(num_experts=cfg.get("num_local_experts", 8),
                    num_experts_per_tok=cfg.get("num_experts_per_tok", 2),
                    moe_intermediate_size=cfg["intermediate_size"], norm_topk_prob=True)
    qwen2 = family == "qwen2_moe"
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts (an alias)
    experts = cfg.get("num_experts", cfg.get("num_local_experts", 60 if qwen2 else 128))
    out = dict(num_experts=experts,
               num_experts_per_tok=cfg.get("num_experts_per_tok", 4 if qwen2 else 8),
               moe_intermediate_size=cfg.get("moe_intermediate_size", 1408 if qwen2 else 768),
               norm_topk_prob=cfg.get("norm_topk_prob", False),
               decoder_sparse_step=cfg.get("decoder_sparse_step", 1),
               mlp_only_layers=list(cfg.get("mlp_only_layers") or []))
    if qwen2:
        out["shared_expert_intermediate_size"] = cfg.get("shared_expert_intermediate_size",
                                                         5632)
    return out


def _layer_types(family: str, cfg: dict[str, Any]) -> list[str] | None:
    """Gemma's per-layer attention kinds: `layer_types` when given, else Gemma 2's
    alternation (even layers local) or Gemma 3's `sliding_window_pattern` (every n-th
    layer global)."""
    if family not in GEMMA_FAMILIES:
        return None
    n = cfg["num_hidden_layers"]
    if cfg.get("layer_types"):
        types = list(cfg["layer_types"])
    elif family == "gemma2":
        types = [SLIDING if i % 2 == 0 else FULL for i in range(n)]
    else:
        pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    if len(types) != n or not set(types) <= {SLIDING, FULL}:
        raise ModelLoadError(f"layer_types {types} does not give {n} layers of {SLIDING} or "
                             f"{FULL}")
    return types


def _rope(cfg: dict[str, Any], family: str) -> tuple[float, dict[str, Any] | None, float | None]:
    """(theta, scaling or None, Gemma 3's local-layer theta or None) from either the
    transformers 4 keys (rope_theta, rope_scaling, rope_local_base_freq) or transformers 5's
    rope_parameters (per layer type for Gemma 3)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    local_theta = None
    if family == "gemma3":
        if FULL in params:  # transformers 5: one entry per layer type
            local = params.get(SLIDING, {})
            local_theta = float(local.get("rope_theta", 10000.0))
            if local.get("rope_type", "default") != "default":
                raise ModelLoadError(f"unsupported rope on Gemma 3 local layers: {local}")
            params = dict(params[FULL])
        else:
            local_theta = float(cfg.get("rope_local_base_freq", 10000.0))
    theta = float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "su":  # Phi-3's first name for longrope
        kind = "longrope"
    if kind == "default":
        return theta, None, local_theta
    scaling = {k: v for k, v in params.items() if k not in ("type", "rope_theta")}
    scaling["rope_type"] = kind
    if kind == "longrope":
        orig = scaling.get("original_max_position_embeddings",
                           cfg.get("original_max_position_embeddings"))
        if orig is None:
            raise ModelLoadError("longrope scaling needs original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = orig
        scaling.setdefault("max_position_embeddings", cfg.get("max_position_embeddings", orig))
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelLoadError("partial rotary embeddings (partial_rotary_factor < 1) are not "
                             "supported")
    return theta, scaling, local_theta
