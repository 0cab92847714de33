"""The memory model: bytes of weights, KV cache and step activations, as the engine
allocates them. The engine sizes its KV pool and chooses weight formats through these
functions, and `peregrine estimate` predicts with the same ones, so the two cannot drift.

Weights: a float linear stores [out, in] in the compute dtype; the quantized formats store
what peregrine/layers/quant_formats.py describes (int8: 1 byte per weight + a float32
scale per group or row; int4: packed nibbles + float16 scale and offset per group; int5 (GGUF
5-bit blocks): nibbles + a bit plane + scale and offset per group; int6 (GGUF 6-bit blocks):
1 byte per weight + float32 scale and offset per group; nf4:
packed nibbles + a float16 scale per group + 16 float32 levels; fp8: 1 byte + a float32
scale per row). Embeddings, norms, biases and the rotary table stay float.

KV cache: per layer, K and V of [num_blocks, block_size, kv_heads, head_dim] in the compute
dtype, or one byte per value plus a float32 scale per (slot, kv head) when quantized."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from peregrine.models.config import ModelConfig
from peregrine.models.gguf_file import QT
from peregrine.models.gguf_quants import BLOCK_FORMS, SUPER_BLOCK_TYPES

KV_QUANTIZED = ("int8", "fp8")
# Weights per scale of each load-time format when --quantization-group-size is unset
# (None: one scale per output row).
DEFAULT_GROUP_SIZE: dict[str, int | None] = {"int8": None, "int4": 128, "nf4": 64, "fp8": None}
# A GGUF file's Q4/Q8 blocks hold 32 weights: its own grid, whether kept or requantized.
GGUF_GROUP_SIZE = 32


# --- KV cache ----------------------------------------------------------------------------

def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes of one element of `dtype`."""
    return torch.empty((), dtype=dtype).element_size()


def kv_store_dtype(kv_cache_dtype: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype K/V values are stored in; ValueError when this torch lacks it."""
    if kv_cache_dtype == "int8":
        return torch.int8
    if kv_cache_dtype == "fp8":
        store = getattr(torch, "float8_e4m3fn", None)
        if store is None:
            raise ValueError("kv_cache_dtype fp8 needs a torch with float8_e4m3fn")
        return store
    if kv_cache_dtype != "auto":
        raise ValueError(f"kv_cache_dtype must be auto|int8|fp8, got {kv_cache_dtype!r}")
    return compute_dtype


def kv_dtype_bytes(kv_cache_dtype: str, compute_dtype: torch.dtype,
                   head_dim: int | None = None) -> float:
    """Bytes per stored K or V value; a quantized cache adds its float32 scale (one per
    token and KV head) spread over the `head_dim` values it scales."""
    if kv_cache_dtype in KV_QUANTIZED:
        return 1 + (4 / head_dim if head_dim else 0)
    return dtype_bytes(compute_dtype)


def kv_block_shape(cfg: ModelConfig, num_blocks: int, block_size: int
                   ) -> tuple[int, int, int, int]:
    """Shape of one layer's K (or V) pool tensor."""
    return (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)


def kv_bytes_per_token(cfg: ModelConfig, kv_cache_dtype: str, compute_dtype: torch.dtype
                       ) -> float:
    """KV-cache bytes one token takes across all layers (K and V, scales included)."""
    return cfg.kv_bytes_per_token(kv_dtype_bytes(kv_cache_dtype, compute_dtype, cfg.head_dim))


def kv_pool_bytes(cfg: ModelConfig, num_blocks: int, block_size: int, kv_cache_dtype: str,
                  compute_dtype: torch.dtype) -> int:
    """Bytes of the whole pool `allocate_kv_pool` makes."""
    return round(num_blocks * block_size * kv_bytes_per_token(cfg, kv_cache_dtype,
                                                              compute_dtype))


def num_blocks_for_memory(cfg: ModelConfig, block_size: int, bytes_per_value: float,
                          memory_bytes: float) -> int:
    """How many blocks of `block_size` tokens fit in `memory_bytes` (K and V, all layers)."""
    per_block = cfg.kv_bytes_per_token(bytes_per_value) * block_size
    return max(1, int(memory_bytes // per_block))


def held_weight_bytes(module: torch.nn.Module) -> int:
    """What a loaded model really stores: numel * element_size over its parameters and
    buffers, storage shared by several (tied embeddings) counted once."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def held_kv_bytes(caches: Iterable[Any]) -> int:
    """What an allocated KV pool really stores: K, V and their scales (when quantized) of
    every layer's cache."""
    return sum(t.numel() * t.element_size() for c in caches
               for t in (c.k, c.v, c.k_scale, c.v_scale) if t is not None)


def first_live_block(num_computed: int, sliding_window: int | None, block_size: int) -> int:
    """Index of a sequence's first block a future query can still attend to (the blocks
    before it are freed under a sliding window)."""
    if sliding_window is None:
        return 0
    return max(num_computed - sliding_window + 1, 0) // block_size


def blocks_per_sequence(num_tokens: int, block_size: int,
                        sliding_window: int | None = None) -> int:
    """Most blocks one sequence holds on its way to `num_tokens` tokens, decoding one token
    per step (out-of-window blocks are freed before each step's allocation)."""
    def held(n: int) -> int:  # blocks held while computing token n (1-based)
        return -(-n // block_size) - first_live_block(n - 1, sliding_window, block_size)
    if sliding_window is None or num_tokens <= sliding_window:
        return held(num_tokens)
    # past the window the count repeats every block_size tokens
    return max(held(n) for n in range(max(num_tokens - block_size, 1), num_tokens + 1))


# --- weights -----------------------------------------------------------------------------

@dataclass(frozen=True)
class LinearFormat:
    """How one linear layer's weight is stored: `float` (compute dtype) or a quantized
    method with its group size (None: one scale per output row)."""

    method: str = "float"
    group_size: int | None = None
    wide_scales: bool = False  # int4/int5: float32 scales/offsets (GGUF K-quants' d * sc)
    offset: bool = False  # int8 with float32 per-group offsets (K-quant minimums)
    # int4/int5/int6 from GGUF K-quants only: scales and offsets as stored, an int8 per group
    # and a float32 per 256 weights (d * sc, -dmin * m), instead of float32 per group
    sub_scales: bool = False
    shared_offsets: bool = False  # sub_scales of signed types (Q6_K, Q3_K): offset qmin * sc


FLOAT = LinearFormat()


def default_group_size(method: str, group_size: int | None, gguf_source: bool) -> int | None:
    """The group size a load-time quantization uses: the given one, else 32 for int4 from
    a GGUF file (its own grid: group 128 costs ~+29% perplexity on SmolLM2's Q4_1, group 32
    ~+0.2%), else the format's default."""
    if group_size is not None:
        return group_size
    if method == "int4" and gguf_source:
        return GGUF_GROUP_SIZE
    return DEFAULT_GROUP_SIZE[method]


def lm_head_format(fmt: LinearFormat) -> LinearFormat:
    """The LM head's format under `fmt`: int8 per channel under a 4-bit format. The head is
    the widest matrix and the most sensitive one (llama.cpp's mixes keep it at 6-8 bits
    too; SmolLM2's GGUF stores it as Q8_0); 8-bit it costs 0.5 byte/weight more."""
    return LinearFormat("int8") if fmt.method in ("int4", "nf4") else fmt


def gguf_native_format(qtypes: list[QT]) -> LinearFormat:
    """The format of a linear fused from GGUF tensors of types `qtypes` when the file's
    blocks are kept: the narrowest kernel format that holds every part's integers as they
    are (int4: at most 16 levels; int6: 64; int8 otherwise), groups of the smallest part's
    group size; float when a part is not a block type."""
    forms = [BLOCK_FORMS.get(t) for t in qtypes]
    if not forms or None in forms:
        return FLOAT
    span = max(f.qmax - f.qmin for f in forms)
    group = min(f.group for f in forms)
    exact16 = all(f.f16_exact for f in forms)
    sub = all(t in SUPER_BLOCK_TYPES for t in qtypes)
    shared = sub and all(f.qmin < 0 for f in forms)
    if span <= 15:
        return LinearFormat("int4", group, wide_scales=not exact16, sub_scales=sub,
                            shared_offsets=shared)
    if span <= 31:
        return LinearFormat("int5", group, wide_scales=not exact16, sub_scales=sub,
                            shared_offsets=shared)
    if span <= 63:
        return LinearFormat("int6", group, sub_scales=sub, shared_offsets=shared)
    return LinearFormat("int8", group, offset=any(f.offset for f in forms))


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear the model builds, by module name."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes = {}
    for n in range(cfg.num_layers):
        p = f"layers.{n}."
        shapes[p + "self_attn.qkv_proj"] = (cfg.q_size + 2 * cfg.kv_size, h)
        shapes[p + "self_attn.o_proj"] = (h, cfg.q_size)
        if cfg.is_moe_layer(n):
            shapes.update(_moe_shapes(cfg, p + "mlp."))
        else:
            shapes[p + "mlp.gate_up_proj"] = (2 * i, h)
            shapes[p + "mlp.down_proj"] = (h, i)
    shapes["lm_head"] = (cfg.vocab_size, h)
    return shapes


def _moe_shapes(cfg: ModelConfig, p: str) -> dict[str, tuple[int, int]]:
    """(out, in) of a sparse block's router, each expert's two projections (one linear
    each once quantized, layers/moe.py) and the shared expert with its gate."""
    h, i, s = cfg.hidden_size, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    shapes = {p + "gate": (cfg.num_experts, h)}
    for e in range(cfg.num_experts):
        shapes[f"{p}experts.gate_up_proj.{e}"] = (2 * i, h)
        shapes[f"{p}experts.down_proj.{e}"] = (h, i)
    if s:
        shapes[p + "shared_expert.gate_up_proj"] = (2 * s, h)
        shapes[p + "shared_expert.down_proj"] = (h, s)
        shapes[p + "shared_expert_gate"] = (1, h)
    return shapes


def always_float(name: str) -> bool:
    """Whether linear `name` stays in the compute dtype under every quantization: a mixture
    of experts' router and shared-expert gate (layers/moe.py, FloatLinear)."""
    return name.endswith((".mlp.gate", ".mlp.shared_expert_gate"))


def linear_weight_bytes(out_features: int, in_features: int, fmt: LinearFormat,
                        float_bytes: int) -> int:
    """Bytes one linear's weight buffers take (bias excluded)."""
    n, k = out_features, in_features
    groups = 1 if fmt.group_size is None else -(-k // fmt.group_size)
    if fmt.method == "float":
        return n * k * float_bytes
    if fmt.sub_scales:  # int8 scale and offset per group, float32 pair per 256 weights
        packed = {"int4": n * k // 2, "int5": n * k // 2 + n * k // 8, "int6": n * k}
        subs = 1 if fmt.shared_offsets else 2
        return packed[fmt.method] + subs * n * groups + 2 * 4 * n * (k // 256)
    if fmt.method == "int8":
        return n * k + 4 * n * groups * (2 if fmt.offset else 1)
    if fmt.method == "int4":
        return n * k // 2 + 2 * (4 if fmt.wide_scales else 2) * n * groups
    if fmt.method == "int6":
        return n * k + 2 * 4 * n * groups
    if fmt.method == "int5":
        return n * k // 2 + n * k // 8 + 2 * (4 if fmt.wide_scales else 2) * n * groups
    if fmt.method == "nf4":
        return n * k // 2 + 2 * n * groups + 16 * 4
    if fmt.method == "fp8":
        return n * k + 4 * n
    raise ValueError(f"unknown weight format {fmt.method!r}")


def resolve_quantization(quantization: str, gguf_source: bool, device_type: str) -> str:
    """What `--quantization auto` means: a GGUF file's own blocks on a CPU (the fastest
    lossless path there), float otherwise; ValueError for `gguf` without a GGUF file."""
    if quantization == "gguf" and not gguf_source:
        raise ValueError("--quantization gguf keeps a GGUF file's blocks; the model is not "
                         "a GGUF file")
    if quantization == "auto":
        return "gguf" if gguf_source and device_type == "cpu" else "none"
    return quantization


def quantization_plan(cfg: ModelConfig, quantization: str, group_size: int | None = None,
                      gguf_types: dict[str, list[QT]] | None = None) -> dict[str, LinearFormat]:
    """The format of every linear (by module name) after loading with `quantization`
    (none|int8|int4|nf4|fp8|gguf, already resolved from auto); `gguf_types` gives the
    GGUF tensor types each module is fused from (needed for `gguf`, and for int4's
    default group size)."""
    shapes = linear_shapes(cfg)
    if quantization == "none":
        return {name: FLOAT for name in shapes}
    if quantization == "gguf":
        if gguf_types is None:
            raise ValueError("quantization gguf needs a GGUF file")
        return {name: gguf_native_format(gguf_types[name]) if name in gguf_types else FLOAT
                for name in shapes}
    if quantization not in DEFAULT_GROUP_SIZE:
        raise ValueError(f"unknown quantization {quantization!r}")
    g = default_group_size(quantization, group_size, gguf_types is not None)
    fmt = LinearFormat(quantization, None if quantization == "fp8" else g)
    return {name: FLOAT if always_float(name) else lm_head_format(fmt) if name == "lm_head"
            else fmt for name in shapes}


@dataclass
class WeightBytes:
    """Bytes of a loaded model's parameters and buffers, by part."""

    linears: int  # decoder layers' projections
    lm_head: int  # 0 when tied to a float embedding (shared storage)
    embedding: int
    norms_biases: int  # RMSNorm weights and attention biases
    rotary: int  # the float32 cos/sin table of max_model_len positions
    formats: dict[str, int] = field(default_factory=dict)  # linear format -> linear count

    @property
    def total(self) -> int:
        return self.linears + self.lm_head + self.embedding + self.norms_biases + self.rotary

    @property
    def read_per_step(self) -> int:
        """Bytes a forward pass reads: every linear and the LM head (the embedding is a
        lookup, except when it is the LM head)."""
        return self.linears + (self.lm_head or self.embedding)


def weight_bytes(cfg: ModelConfig, plan: dict[str, LinearFormat], compute_dtype: torch.dtype,
                 max_positions: int) -> WeightBytes:
    """Bytes of the model the loader builds under `plan` (see `quantization_plan`)."""
    fb = dtype_bytes(compute_dtype)
    shapes = linear_shapes(cfg)
    linears = lm_head = 0
    counts: dict[str, int] = {}
    for name, (n, k) in shapes.items():
        fmt = plan[name]
        key = fmt.method if fmt.group_size is None else f"{fmt.method}/g{fmt.group_size}"
        counts[key] = counts.get(key, 0) + 1
        b = linear_weight_bytes(n, k, fmt, fb)
        if name == "lm_head":
            # a tied float head is the embedding's own tensor; a quantized one is a copy
            lm_head = 0 if cfg.tie_word_embeddings and fmt.method == "float" else b
        else:
            linears += b
    h = cfg.hidden_size
    norms = cfg.num_norm_params()
    biases = cfg.num_layers * (cfg.q_size + 2 * cfg.kv_size) if cfg.attention_bias else 0
    tables = 1 if cfg.rope_local_theta is None else 2  # Gemma 3: a local and a global table
    rotary = tables * max_positions * 2 * cfg.head_dim * 4
    return WeightBytes(linears=linears, lm_head=lm_head, embedding=cfg.vocab_size * h * fb,
                       norms_biases=(norms + biases) * fb, rotary=rotary, formats=counts)


# --- activations -------------------------------------------------------------------------

def activation_bytes(cfg: ModelConfig, num_tokens: int, logit_rows: int,
                     compute_dtype: torch.dtype, attention_context: int = 0) -> int:
    """Peak bytes of the temporaries of the largest step: a forward over `num_tokens`
    tokens (the larger of a decoder layer's attention and MLP live tensors, plus the hidden
    state), then the float32 logits, softmax and sort of `logit_rows` rows (the sampler).
    `attention_context` > 0: attention materializes its scores against that many keys (the
    CPU's eager path, scaled_dot_product_attention with a mask: float32 scores and
    probabilities and a boolean mask); the fused CPU step and the GPU kernels do not."""
    b = dtype_bytes(compute_dtype)
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    # MLP: residual, normed x, gate_up [2I], silu(gate) * up [I]
    mlp = 2 * h + 3 * i
    if cfg.is_moe:
        # sparse block: residual, normed x, the k routed rows gathered, their outputs and
        # the outputs back in token order (k h each), the experts' gate_up and activation
        # (3 I per row in the worst case, all rows on one expert), the shared expert's
        k = cfg.num_experts_per_tok
        mlp = max(mlp, 2 * h + 3 * k * h + 3 * k * cfg.moe_intermediate_size
                  + 3 * cfg.shared_expert_intermediate_size)
    # attention: residual, normed x, qkv, rotated q and k, attention output, o_proj output
    attn = 2 * h + (q + 2 * kv) + (q + kv) + q + h
    scores = num_tokens * cfg.num_heads * attention_context * (4 + 4 + 1)
    layer = (max(num_tokens * mlp * b, num_tokens * attn * b + scores)
             + num_tokens * (8 + 8 + 2 * cfg.head_dim * 4))
    # logits in the compute dtype, as float32, their softmax, sorted values and int64 indices
    logits = logit_rows * cfg.vocab_size * (b + 4 + 4 + 4 + 8)
    return max(layer, logits + num_tokens * h * b)
