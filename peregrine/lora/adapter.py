"""Reading a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) into
per-module (A, B, scaling) triples keyed by the Hugging Face module name.

PEFT computes, for a targeted linear, y = W x + B (A x) * scaling with A [r, in], B [out, r]
and scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora); rank_pattern and
alpha_pattern give some modules their own r and alpha. The variants that change more than
the delta (DoRA, LoRA biases, modules_to_save, embedding adapters) are refused."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch

from peregrine.layers.lora import LoRAFactors
from peregrine.lora.errors import InvalidAdapterError

# PEFT module names peregrine applies LoRA to (the Llama family's linears).
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj", "qkv_proj", "gate_up_proj")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])"
                  r"(?:\.[^.]+)?\.weight$")


@dataclass
class LoRAAdapter:
    """An adapter read from disk: its factors (float32, on the CPU) by module name
    (`layers.3.self_attn.q_proj`)."""

    name: str
    path: str
    weights: dict[str, LoRAFactors]
    config: dict

    @property
    def rank(self) -> int:
        """The largest rank of any of its modules."""
        return max(w.rank for w in self.weights.values())

    @property
    def nbytes(self) -> int:
        """Bytes of its factors (as stored here, float32)."""
        return sum(w.a.numel() * 4 + w.b.numel() * 4 for w in self.weights.values())

    @classmethod
    def load(cls, name: str, path: str, max_rank: int | None = None) -> "LoRAAdapter":
        """Read and check the adapter at `path`; InvalidAdapterError says what is wrong."""
        config = _read_config(path)
        tensors = _read_tensors(path)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            m = _KEY.match(key)
            if m is None:
                raise InvalidAdapterError(f"adapter {name!r}: tensor {key!r} is not a LoRA A/B "
                                          "weight of a linear (embedding adapters, biases and "
                                          "modules_to_save are not supported)")
            pairs.setdefault(m["module"], {})[m["ab"]] = value
        if not pairs:
            raise InvalidAdapterError(f"adapter {name!r} at {path} holds no LoRA weights")
        weights = {}
        for module, ab in pairs.items():
            leaf = module.rsplit(".", 1)[-1]
            if leaf not in SUPPORTED_TARGETS:
                raise InvalidAdapterError(f"adapter {name!r} targets {module}; peregrine applies "
                                          f"LoRA to {', '.join(SUPPORTED_TARGETS[:7])}")
            if set(ab) != {"A", "B"}:
                raise InvalidAdapterError(f"adapter {name!r}: {module} lacks its lora_"
                                          f"{'B' if 'A' in ab else 'A'} weight")
            a, b = ab["A"].float(), ab["B"].float()
            if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
                raise InvalidAdapterError(f"adapter {name!r}: {module} has A {tuple(a.shape)} "
                                          f"and B {tuple(b.shape)}, not [r, in] and [out, r]")
            rank = a.shape[0]
            if max_rank is not None and rank > max_rank:
                raise InvalidAdapterError(f"adapter {name!r} has rank {rank}, more than "
                                          f"max_lora_rank {max_rank} (--max-lora-rank)")
            weights[module] = LoRAFactors(a.contiguous(), b.contiguous(),
                                          _scaling(config, module, rank))
        return cls(name, path, weights, config)


def _read_config(path: str) -> dict:
    file = os.path.join(path, "adapter_config.json")
    if not os.path.isdir(path):
        raise InvalidAdapterError(f"no adapter directory at {path!r}")
    try:
        with open(file) as f:
            config = json.load(f)
    except OSError:
        raise InvalidAdapterError(f"{path!r} has no adapter_config.json") from None
    except json.JSONDecodeError as e:
        raise InvalidAdapterError(f"{file}: not valid JSON ({e.msg})") from None
    if not isinstance(config, dict):
        raise InvalidAdapterError(f"{file}: expected a JSON object")
    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise InvalidAdapterError(f"{file}: peft_type {kind!r} is not LORA")
    refused = {"use_dora": bool(config.get("use_dora")),
               "bias": config.get("bias", "none") not in (None, "none"),
               "lora_bias": bool(config.get("lora_bias")),
               "modules_to_save": bool(config.get("modules_to_save")),
               "fan_in_fan_out": bool(config.get("fan_in_fan_out"))}
    bad = [k for k, v in refused.items() if v]
    if bad:
        raise InvalidAdapterError(f"{file}: {', '.join(bad)} is not supported (plain LoRA "
                                  "deltas on linears only)")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or value <= 0:
            raise InvalidAdapterError(f"{file}: {key} must be a number > 0, got {value!r}")
    return config


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    st = os.path.join(path, "adapter_model.safetensors")
    pt = os.path.join(path, "adapter_model.bin")
    try:
        if os.path.exists(st):
            from safetensors.torch import load_file
            return load_file(st)
        if os.path.exists(pt):
            return torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the adapter's fault
        raise InvalidAdapterError(f"cannot read the weights of {path!r}: {e}") from None
    raise InvalidAdapterError(f"{path!r} has no adapter_model.safetensors")


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of
    the module's name."""
    for key, value in (patterns or {}).items():
        if any(re.match(rf"(.*\.)?({key})$", m) for m in (module, f"model.{module}")):
            return value
    return default


def _scaling(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern", {}), module, config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
