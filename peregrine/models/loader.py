"""Build a model and its tokenizer from a GGUF file, a Hugging Face directory or a config
with random ("dummy") weights."""

from __future__ import annotations

import ctypes
import glob
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from peregrine.config import EngineConfig
from peregrine.memory_model import default_group_size, resolve_quantization
from peregrine.models.config import ModelConfig
from peregrine.models.errors import ModelLoadError
from peregrine.models.gguf_file import GGUFFile, rope_permuted_heads, unpermute_rope_rows
from peregrine.models.huge_pages import move_to_huge_pages
from peregrine.layers.norm import RMSNorm
from peregrine.layers.rotary import RotaryEmbedding
from peregrine.models.gemma import GemmaForCausalLM
from peregrine.models.llama import LlamaForCausalLM
from peregrine.models.moe import MoEForCausalLM
from peregrine.models.registry import ModelSource, default_gguf_path, resolve_model
from peregrine.models.tokenizer import Tokenizer

def model_class(cfg: ModelConfig) -> type[LlamaForCausalLM]:
    """The module class that runs `cfg`'s family."""
    if cfg.is_gemma:
        return GemmaForCausalLM
    return MoEForCausalLM if cfg.is_moe else LlamaForCausalLM


# A checkpoint tensor, produced lazily (so a 7B model never sits in memory twice).
TensorSource = Callable[[], torch.Tensor | None]  # None: kept in its blocks, not loaded


@dataclass
class LoadedModel:
    """What the loader hands the engine."""

    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    source: ModelSource
    gguf: GGUFFile | None = None  # kept for quantization methods that reuse GGUF blocks


def load_model(model: str | None = None, *, load_format: str = "auto",
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               tokenizer: str | None = None, max_model_len: int | None = None,
               seed: int = 0, quantization: str = "none", quant_group_size: int | None = None,
               quant_symmetric: bool = False) -> LoadedModel:
    """Load `model` (see `resolve_model`) onto `device` in `dtype`, then quantize its
    linear layers when `quantization` says so (see peregrine/quantization/apply.py)."""
    from peregrine.quantization.checkpoint import is_quantized_checkpoint, load_quantized
    source = resolve_model(model, load_format)
    device = torch.device(device)
    gguf_file = None
    hf_cfg: dict = {}
    if source.format == "gguf" or (source.format == "dummy" and source.path.endswith(".gguf")):
        gguf_file = GGUFFile(source.path)
        cfg = gguf_config(gguf_file, source.name)
        tok = Tokenizer.from_gguf_metadata(gguf_file.metadata, source.name)
    else:
        hf_cfg = _read_config(source.path)
        cfg = ModelConfig.from_hf(hf_cfg, source.name)
        tok = _tokenizer_for_dir(source.path)
    prequantized = source.format == "hf" and is_quantized_checkpoint(hf_cfg)
    if prequantized and quantization not in ("none", "auto"):
        raise ModelLoadError(f"{source.path} is already quantized; drop --quantization "
                             f"{quantization}")
    unfit = None if gguf_file is None else gguf_blocks_unfit(gguf_file, cfg)
    if unfit and source.format == "gguf" and quantization in ("auto", "gguf"):
        if quantization == "gguf":
            raise ModelLoadError(f"--quantization gguf keeps the blocks of projections stored "
                                 f"apart or stacked experts; {source.name!r} {unfit}: load it "
                                 "dequantized (--quantization none|int8|int4)")
        quantization = "none"
    try:
        quantization = resolve_quantization(quantization, source.format == "gguf", device.type)
    except ValueError as e:
        raise ModelLoadError(f"{e} ({source.name!r})") from None
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    if not tok.eos_token_ids:
        tok.eos_token_ids = list(cfg.eos_token_id)
    max_len = max_model_len or cfg.max_position_embeddings
    with torch.device("meta"):
        net = model_class(cfg)(cfg, max_positions=max_len)
    net = _materialize(net, device, dtype, cfg)
    native = None
    if quantization == "gguf":
        from peregrine.models.gguf_native import gguf_quantized_linears
        native = gguf_quantized_linears(gguf_file, cfg)
    if source.format == "gguf":
        load_weights(net, gguf_tensors(gguf_file, cfg, _kept_in_blocks(native, gguf_file, cfg)))
    elif prequantized:
        load_quantized(net, source.path, hf_cfg)
    elif source.format == "hf":
        load_weights(net, safetensors_tensors(source.path))
    else:
        init_dummy_weights(net, seed)
    _quantize(net, quantization, quant_group_size, quant_symmetric, gguf_file is not None,
              native)
    if device.type == "cpu":
        move_to_huge_pages(net)
        _return_freed_memory()
    return LoadedModel(net.eval(), cfg, tok, source, gguf_file)


def _return_freed_memory() -> None:
    """Hand the heap memory freed while loading (unpacked blocks, the copies huge pages
    replaced) back to the system: glibc keeps freed blocks below its mmap threshold for
    reuse, which left a 0.6B-parameter Q4_K_M load 0.36 GB above what it holds."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        pass


def load_model_for(config: EngineConfig, device: torch.device | None = None) -> LoadedModel:
    """`load_model` with the model options of an engine's config (on `device`, default the
    config's)."""
    return load_model(
        config.model, load_format=config.load_format, dtype=config.torch_dtype,
        device=device or config.torch_device, tokenizer=config.tokenizer,
        max_model_len=config.max_model_len, seed=config.seed, quantization=config.quantization,
        quant_group_size=config.quantization_group_size,
        quant_symmetric=config.quantization_symmetric)


def gguf_blocks_unfit(f: GGUFFile, cfg: ModelConfig) -> str | None:
    """Why the GGUF-native linears (models/gguf_native.py: attn_q/k/v and ffn_gate/up
    fused by us, Phi-3's attn_qkv / ffn_up as stored, a mixture of experts' stacked
    ffn_*_exps) cannot keep this file's blocks; None when they can."""
    from peregrine.models.gguf_native import gguf_module_tensors
    missing = [name for module, names in gguf_module_tensors(cfg).items()
               if module.startswith("layers.0.") for name in names if name not in f.tensors]
    if missing:
        return f"has no {', '.join(missing)} (its projections are stored another way)"
    return None


def _kept_in_blocks(native: dict | None, f: GGUFFile | None, cfg: ModelConfig) -> set[str]:
    """GGUF tensors that only feed linears kept in their blocks: not worth dequantizing (the
    float parameters they would fill are replaced right after loading). A tied embedding
    still feeds the embedding lookup."""
    if not native:
        return set()
    from peregrine.models.gguf_native import gguf_module_tensors
    tensors = gguf_module_tensors(cfg)
    return {t for module in native if module != "lm_head" or not cfg.tie_word_embeddings
            for t in tensors[module]}


def _quantize(net: LlamaForCausalLM, quantization: str, group_size: int | None,
              symmetric: bool, gguf_source: bool, native: dict | None) -> None:
    """Swap the linears for quantized ones: GGUF blocks as stored (`native`), or
    round-to-nearest."""
    from peregrine.quantization.apply import (QuantSpec, quantize_model, replace_experts,
                                              replace_linears)
    if quantization in ("none", "auto"):
        return
    if native is not None:
        replace_experts(net, native)
        replace_linears(net, native)
        return
    group_size = default_group_size(quantization, group_size, gguf_source)
    quantize_model(net, QuantSpec(quantization, group_size, symmetric))


def load_tokenizer(path: str | None) -> Tokenizer:
    """A tokenizer from a GGUF file, a Hugging Face directory or a model name."""
    source = resolve_model(path)
    if source.path.endswith(".gguf"):
        return Tokenizer.from_gguf_metadata(GGUFFile(source.path).metadata, source.name)
    return _tokenizer_for_dir(source.path)


def _tokenizer_for_dir(path: str) -> Tokenizer:
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return Tokenizer.from_dir(path)
    # Shipped configs carry no tokenizer; the default model's byte-level BPE gives valid ids
    # for any vocabulary at least as large (random weights make the text meaningless anyway).
    return Tokenizer.from_gguf_metadata(GGUFFile(default_gguf_path()).metadata, "smollm2-135m")


def _read_config(path: str) -> dict:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}/config.json: {e}") from None


def gguf_config(f: GGUFFile, name: str = "") -> ModelConfig:
    """ModelConfig from GGUF metadata and the tensors present."""
    factors = None
    if "rope_factors_long.weight" in f.tensors:  # Phi-3's longrope
        factors = (f.dequantize("rope_factors_short.weight").tolist(),
                   f.dequantize("rope_factors_long.weight").tolist())
    return ModelConfig.from_gguf(f.metadata, has_output_tensor="output.weight" in f.tensors,
                                 has_qkv_bias="blk.0.attn_q.bias" in f.tensors, name=name,
                                 rope_factors=factors)


def _materialize(net: LlamaForCausalLM, device: torch.device, dtype: torch.dtype,
                 cfg: ModelConfig) -> LlamaForCausalLM:
    """Allocate the meta-device model on `device` and rebuild its non-persistent buffers."""
    net = net.to_empty(device=device).to(dtype)
    for mod in net.modules():
        if isinstance(mod, RotaryEmbedding):
            mod.cos_sin = mod.build(device)  # stays float32
    if cfg.tie_word_embeddings:
        net.lm_head.weight = net.embed_tokens.weight
    return net


# --- checkpoint name mapping ------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # Qwen3
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    # mixtures of experts: the router, every expert's projection stacked [E, rows, cols],
    # Qwen2-MoE's shared expert and its gate
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": "mlp.experts.gate_proj",
    "ffn_up_exps.weight": "mlp.experts.up_proj",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
# Where an architecture's names differ: Gemma's four norms per layer, Phi-3's fused tensors.
_GGUF_ARCH_LAYER_NAMES = {
    "gemma": {"post_attention_norm.weight": "post_attention_layernorm.weight",
              "ffn_norm.weight": "pre_feedforward_layernorm.weight",
              "post_ffw_norm.weight": "post_feedforward_layernorm.weight"},
    "phi3": {"attn_qkv.weight": "self_attn.qkv_proj.weight",
             "ffn_up.weight": "mlp.gate_up_proj.weight"},  # gate rows, then up rows
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_to_hf_name(name: str, family: str = "llama") -> str | None:
    """The Hugging Face name of a GGUF tensor in a model of `family` (None for tensors we do
    not use)."""
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m is None:
        return None
    names = {**_GGUF_LAYER_NAMES,
             **_GGUF_ARCH_LAYER_NAMES.get("gemma" if family.startswith("gemma") else family, {})}
    return f"model.layers.{m.group(1)}.{names[m.group(2)]}" if m.group(2) in names else None


def gguf_tensors(f: GGUFFile, cfg: ModelConfig, kept: set[str] = frozenset()
                 ) -> Iterator[tuple[str, TensorSource]]:
    """(Hugging Face name, lazy float tensor) for every tensor of a GGUF file; tensors in
    `kept` (kept in their blocks elsewhere) come as None: not dequantized, and their float
    parameters, replaced right after loading, are never written, so never resident."""
    for name in f.tensors:
        hf = gguf_to_hf_name(name, cfg.architecture)
        if hf is None:
            continue
        heads = rope_permuted_heads(cfg, name)
        # llama.cpp stores Gemma's (1 + w) norm weights with the 1 added
        shift = 1.0 if cfg.is_gemma and name.endswith("norm.weight") else 0.0

        def get(name: str = name, heads: int | None = heads, shift: float = shift
                ) -> torch.Tensor:
            if name in kept:
                return None
            t = f.dequantize(name)
            if name.endswith("ffn_gate_inp_shexp.weight"):  # llama.cpp keeps it 1-D
                return t.reshape(1, -1)
            if shift:
                return t - shift
            return t if heads is None else unpermute_rope_rows(t, heads)
        yield hf, get


def safetensors_tensors(path: str) -> Iterator[tuple[str, TensorSource]]:
    """(name, lazy tensor) for every tensor of every *.safetensors shard in `path`."""
    from safetensors import safe_open
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors files")
    for file in files:
        handle = safe_open(file, framework="pt")
        for key in handle.keys():
            yield key, (lambda h=handle, k=key: h.get_tensor(k))


@dataclass
class _Part:
    """Where a checkpoint tensor goes inside a parameter: `keys` name the slots it fills
    (every slot of every parameter must be filled once), `view` selects them."""

    keys: list[str]
    view: Callable[[torch.Tensor], torch.Tensor]


def load_weights(net: LlamaForCausalLM, tensors: Iterator[tuple[str, TensorSource]]) -> None:
    """Copy checkpoint tensors (Hugging Face names) into the model, filling fused params."""
    params = dict(net.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for hf_name, get in tensors:
        target, part = _target_of(net, hf_name)
        if target is None:
            continue
        if target not in params:
            raise ModelLoadError(f"checkpoint tensor {hf_name} has no place in the model")
        param = params[target]
        value = get()
        if value is None:  # kept in its blocks: the parameter is replaced after loading
            loaded.update(_slots(net, target, param) if part is None else part.keys)
            continue
        # stored whole (fused already, as Phi-3's or transformers 5's stacked experts): it
        # fills every slot of the parameter
        dest = param.data if part is None else part.view(param.data)
        if value.shape != dest.shape:
            raise ModelLoadError(f"{hf_name}: shape {tuple(value.shape)} does not match "
                                 f"the model's {tuple(dest.shape)}")
        dest.copy_(value)
        loaded.update(_slots(net, target, param) if part is None else part.keys)
    if net.config.tie_word_embeddings:
        loaded.add("lm_head.weight#")
    missing = [n for name, p in net.named_parameters(remove_duplicate=False)
               for n in _slots(net, name, p) if n not in loaded]
    if missing:
        raise ModelLoadError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")


# a routed expert's projection: Mixtral's experts.E.w1/w3/w2, Qwen's experts.E.gate_proj/...;
# without E (GGUF's stacked ffn_*_exps) the projection of every expert at once
_EXPERT = re.compile(r"(layers\.\d+\.mlp\.experts)\.(?:(\d+)\.)?(\w+?)(?:\.weight)?")
_EXPERT_PROJ = {"w1": ("gate_up_proj", 0), "gate_proj": ("gate_up_proj", 0),
                "w3": ("gate_up_proj", 1), "up_proj": ("gate_up_proj", 1),
                "w2": ("down_proj", None), "down_proj": ("down_proj", None)}


def _target_of(net: LlamaForCausalLM, hf_name: str) -> tuple[str | None, _Part | None]:
    """Our parameter name for a Hugging Face name, and the part of it the tensor fills when
    the parameter is a fused one (q/k/v, gate/up, stacked experts)."""
    name = hf_name.removeprefix("model.").replace(".block_sparse_moe.", ".mlp.")  # Mixtral
    if name.endswith("rotary_emb.inv_freq"):
        return None, None
    if name == "lm_head.weight" and net.config.tie_word_embeddings:
        return None, None
    m = _EXPERT.fullmatch(name)
    if m and m.group(3) in _EXPERT_PROJ:
        return _expert_part(net, m.group(1), m.group(2), m.group(3))
    cfg = net.config
    for fused, parts in net.packed_modules.items():
        for i, part in enumerate(parts):
            if f".{part}." in name:
                target = name.replace(f".{part}.", f".{fused}.")
                if fused == "qkv_proj":
                    sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size]
                else:  # gate/up halves: the dense MLP's, a Qwen2-MoE shared expert's
                    try:
                        sizes = [net.get_parameter(target).shape[0] // 2] * 2
                    except AttributeError:  # no such parameter: load_weights says so
                        return target, None
                start, size = sum(sizes[:i]), sizes[i]
                return target, _Part([f"{target}#{i}"],
                                     lambda p, s=start, n=size: p.narrow(0, s, n))
    return name, None


def _expert_part(net: LlamaForCausalLM, prefix: str, expert: str | None, proj: str
                 ) -> tuple[str, _Part]:
    """The slice of a stacked expert parameter [E, rows, cols] one expert's projection
    (or, `expert` None, every expert's) fills: gate and up are halves of gate_up_proj."""
    fused, half = _EXPERT_PROJ[proj]
    target = f"{prefix}.{fused}"
    experts = range(net.config.num_experts) if expert is None else [int(expert)]
    keys = [f"{target}#{e}.{half or 0}" for e in experts]
    rows = net.config.moe_intermediate_size

    def view(p: torch.Tensor) -> torch.Tensor:
        p = p if expert is None else p[int(expert)]
        return p if half is None else p.narrow(-2, half * rows, rows)
    return target, _Part(keys, view)


def _slots(net: LlamaForCausalLM, name: str, param: torch.Tensor) -> list[str]:
    """The slots of parameter `name` that checkpoint tensors fill: one per part of a fused
    parameter (per expert and part of stacked experts), else one."""
    if name.endswith(".experts.gate_up_proj") or name.endswith(".experts.down_proj"):
        halves = 2 if name.endswith("gate_up_proj") else 1
        return [f"{name}#{e}.{h}" for e in range(param.shape[0]) for h in range(halves)]
    fused = next((f for f in net.packed_modules if f".{f}." in name), None)
    if fused is None:
        return [f"{name}#"]
    return [f"{name}#{i}" for i in range(len(net.packed_modules[fused]))]


def init_dummy_weights(net: LlamaForCausalLM, seed: int = 0) -> None:
    """Random weights with the scale of trained ones: norms scaling by 1, biases 0,
    matrices N(0, 0.02)."""
    gen = torch.Generator(device=net.embed_tokens.weight.device).manual_seed(seed)
    norms = {f"{n}.weight": m.weight_offset for n, m in net.named_modules()
             if isinstance(m, RMSNorm)}
    for name, p in net.named_parameters():
        if name in norms:
            p.data.fill_(1.0 - norms[name])
        elif name.endswith(".bias"):
            p.data.zero_()
        else:
            p.data.normal_(0.0, 0.02, generator=gen)
