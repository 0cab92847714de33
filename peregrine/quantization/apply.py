"""Swap a model's Linear modules for quantized ones (gpt-fast style), at load time.

The projections of every decoder layer (qkv_proj, o_proj, gate_up_proj, down_proj) and the
LM head are quantized; embeddings and norms stay float. A tied LM head gets its own
quantized copy, while the embedding table it was tied to stays float for lookups. A mixture
of experts' stacked experts become one quantized linear per expert and projection
(QuantExperts); its router and shared-expert gate stay float."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from peregrine.layers.linear import (FP8Linear, Int4Linear, Int8Linear, Linear, NF4Linear,
                                     QuantLinear)
from peregrine.layers.moe import FusedExperts, QuantExperts
from peregrine.memory_model import DEFAULT_GROUP_SIZE, LinearFormat, lm_head_format

# `--quantization` values that quantize weights at load (gguf repacks the file's blocks).
WEIGHT_METHODS = ("int8", "int4", "nf4", "fp8")
METHODS = ("none", *WEIGHT_METHODS, "gguf")


@dataclass
class QuantSpec:
    """How to quantize: format, group size (None: the format's default) and symmetry."""

    method: str
    group_size: int | None = None
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.method not in WEIGHT_METHODS:
            raise ValueError(f"quantization must be one of {METHODS}, got {self.method!r}")
        if self.group_size is None:
            self.group_size = DEFAULT_GROUP_SIZE[self.method]
        if self.method == "fp8" and self.group_size is not None:
            raise ValueError("fp8 uses per-channel scales; quantization_group_size must be unset")
        g = self.group_size
        if g is not None and (g < 32 or g % 32 or (g // 32) & (g // 32 - 1)):
            raise ValueError(f"quantization_group_size must be 32 times a power of two, got {g}")

    def for_lm_head(self) -> "QuantSpec":
        """The spec of the LM head (memory_model.lm_head_format: int8 per channel under a
        4-bit format)."""
        head = lm_head_format(LinearFormat(self.method, self.group_size))
        return self if head.method == self.method else QuantSpec(head.method, head.group_size)

    def quantize(self, w: torch.Tensor, bias: torch.Tensor | None = None) -> QuantLinear:
        """A quantized linear layer holding the round-to-nearest quantization of `w`."""
        w = w.detach().float().cpu()
        b = None if bias is None else bias.detach().cpu()
        if self.method == "int8":
            return Int8Linear.from_float(w, b, self.group_size)
        if self.method == "int4":
            return Int4Linear.from_float(w, b, self.group_size, self.symmetric)
        if self.method == "nf4":
            return NF4Linear.from_float(w, b, self.group_size)
        return FP8Linear.from_float(w, b)


def linear_layers(net: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """(full name, parent module, attribute, module) of every Linear / QuantLinear."""
    for name, parent in list(net.named_modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, (Linear, QuantLinear)):
                yield (f"{name}.{attr}" if name else attr), parent, attr, child


def fused_experts(net: nn.Module) -> Iterator[tuple[str, nn.Module, str, FusedExperts]]:
    """(full name, parent module, attribute, module) of every float FusedExperts."""
    for name, parent in list(net.named_modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, FusedExperts):
                yield (f"{name}.{attr}" if name else attr), parent, attr, child


def quantize_model(net: nn.Module, spec: QuantSpec) -> nn.Module:
    """Replace every Linear of `net` by its round-to-nearest quantization (in place); the
    LM head follows `spec.for_lm_head()`, each expert's projections follow `spec`."""
    for name, parent, attr, mod in linear_layers(net):
        if isinstance(mod, Linear):
            device = mod.weight.device
            s = spec.for_lm_head() if name == "lm_head" else spec
            setattr(parent, attr, s.quantize(mod.weight, mod.bias).to(device))
    for name, parent, attr, mod in fused_experts(net):
        device = mod.gate_up_proj.device
        gate_up = [spec.quantize(w) for w in mod.gate_up_proj]
        down = [spec.quantize(w) for w in mod.down_proj]
        setattr(parent, attr, QuantExperts(gate_up, down, mod.act).to(device))
    return net


def replace_experts(net: nn.Module, new: dict[str, QuantLinear]) -> nn.Module:
    """Put QuantExperts made of the linears of `new` (full name -> module, e.g.
    `layers.0.mlp.experts.gate_up_proj.3`) in place of the model's float experts, taking
    those linears out of `new`."""
    for name, parent, attr, mod in fused_experts(net):
        gate_up = [f"{name}.gate_up_proj.{e}" for e in range(mod.num_experts)]
        down = [f"{name}.down_proj.{e}" for e in range(mod.num_experts)]
        if all(n in new for n in gate_up + down):
            setattr(parent, attr, QuantExperts([new.pop(n) for n in gate_up],
                                               [new.pop(n) for n in down], mod.act))
    return net


def replace_linears(net: nn.Module, new: dict[str, QuantLinear]) -> nn.Module:
    """Put the modules of `new` (full name -> module) in place of the model's linears."""
    for name, parent, attr, mod in linear_layers(net):
        if name in new:
            q = new[name]
            if (q.in_features, q.out_features) != (mod.in_features, mod.out_features):
                raise ValueError(f"{name}: quantized shape ({q.out_features}, "
                                 f"{q.in_features}) does not match the model's "
                                 f"({mod.out_features}, {mod.in_features})")
            if q.bias is None and getattr(mod, "bias", None) is not None:
                q.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
            device = mod.bias.device if getattr(mod, "bias", None) is not None else None
            setattr(parent, attr, q if device is None else q.to(device))
    return net


def model_weight_bytes(net: nn.Module) -> int:
    """Bytes of all weights the forward pass reads: quantized buffers, float parameters
    (the embedding counted once even when an LM head shares it)."""
    seen: set[int] = set()
    total = 0
    for mod in net.modules():
        tensors = list(mod.parameters(recurse=False))
        if isinstance(mod, QuantLinear):
            tensors += list(mod.buffers(recurse=False))
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total
