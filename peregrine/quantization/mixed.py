"""Mixed precision per layer: measure what quantizing each linear costs the model, then give
each linear the format that fits a size budget with the least predicted loss.

Sensitivity is measured, not guessed: the rise in mean NLL (nats per token) on calibration
text when that linear alone is quantized to the reference format (int4, groups of 128).
The loss of another format on the same linear is predicted from it by the ratio of the two
formats' weight errors on that linear (cheap: no forward pass), so one pass over the linears
prices every candidate. A greedy upgrade by loss saved per byte spent then fills the budget.
Every candidate runs on the fused CPU decode path (int4 of any group size, int8)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from peregrine.models.llama import LlamaForCausalLM
from peregrine.quantization.apply import QuantSpec, linear_layers
from peregrine.quantization.perplexity import perplexity

logger = logging.getLogger("peregrine")

# The formats a linear may get, smallest first: (method, group size; None = per channel).
CANDIDATES: tuple[tuple[str, int | None], ...] = (
    ("int4", 256), ("int4", 128), ("int4", 64), ("int4", 32), ("int8", None))
REFERENCE: tuple[str, int | None] = ("int4", 128)
SENSITIVITY_FLOOR = 1e-6  # nats per token


def format_name(fmt: tuple[str, int | None]) -> str:
    """"int4-g128", "int8" (per channel)."""
    method, group = fmt
    return method if group is None else f"{method}-g{group}"


def parse_format(name: str) -> tuple[str, int | None]:
    """The inverse of format_name."""
    method, _, group = name.partition("-g")
    return method, int(group) if group else None


@dataclass
class LayerStats:
    """One linear: its size in each format, its sensitivity and its weight errors."""

    name: str
    weights: int
    sensitivity: float  # NLL rise (nats/token) with this linear alone in REFERENCE
    bytes: dict[str, int] = field(default_factory=dict)
    rel_error: dict[str, float] = field(default_factory=dict)  # weight MSE / REFERENCE's

    def loss(self, fmt: str) -> float:
        """Predicted NLL rise of this linear in `fmt`. A sensitivity measured at or below
        zero is noise around a small loss, not a gain: floored, so budget left over once
        the sensitive linears are served still goes where the weight error falls most."""
        return max(self.sensitivity, SENSITIVITY_FLOOR) * self.rel_error[fmt]


def _planned_linears(net: LlamaForCausalLM) -> list[tuple[str, torch.nn.Module, str]]:
    """(name, parent, attribute) of the decoder's linears; the LM head keeps its own rule."""
    return [(name, parent, attr) for name, parent, attr, _ in linear_layers(net)
            if name != "lm_head"]


def measure(net: LlamaForCausalLM, ids: list[int], context: int = 256,
            progress: Callable[[int, int], None] | None = None) -> list[LayerStats]:
    """Sensitivity and per-format size and error of every decoder linear of a float model
    (left as it was)."""
    base = perplexity(net, ids, context=context).nll
    stats = []
    layers = _planned_linears(net)
    t0 = time.perf_counter()
    for i, (name, parent, attr) in enumerate(layers):
        mod = getattr(parent, attr)
        w, bias = mod.weight.detach(), getattr(mod, "bias", None)
        s = LayerStats(name, w.numel(), 0.0)
        errors = {}
        for fmt in CANDIDATES:
            q = QuantSpec(*fmt).quantize(w, bias)
            key = format_name(fmt)
            s.bytes[key] = q.weight_bytes()
            errors[key] = float((q.dequantize().float() - w.float()).pow(2).mean())
            if fmt == REFERENCE:
                setattr(parent, attr, q)
                try:
                    s.sensitivity = perplexity(net, ids, context=context).nll - base
                finally:
                    setattr(parent, attr, mod)
        ref = max(errors[format_name(REFERENCE)], 1e-30)
        s.rel_error = {k: e / ref for k, e in errors.items()}
        stats.append(s)
        if progress:
            progress(i + 1, len(layers))
        logger.info("mixed: %s sensitivity %.5f (%d/%d, %.0fs)", name, s.sensitivity, i + 1,
                    len(layers), time.perf_counter() - t0)
    return stats


def uniform_bits(stats: list[LayerStats], fmt: tuple[str, int | None]) -> float:
    """Bits per weight of every planned linear in `fmt` (scales and offsets included)."""
    key = format_name(fmt)
    return 8 * sum(s.bytes[key] for s in stats) / sum(s.weights for s in stats)


def plan(stats: list[LayerStats], target_bits: float) -> dict[str, str]:
    """Each linear's format (name -> format_name) within `target_bits` per weight on
    average, least predicted loss first: all start in the smallest format, then the
    upgrade that saves the most loss per extra byte is taken while it fits."""
    names = [format_name(f) for f in CANDIDATES]
    budget = target_bits * sum(s.weights for s in stats) / 8
    choice = {s.name: names[0] for s in stats}
    used = sum(s.bytes[names[0]] for s in stats)
    if used > budget:
        raise ValueError(f"target_bits {target_bits} is below the smallest format's "
                         f"{uniform_bits(stats, CANDIDATES[0]):.3f} bits per weight")
    while True:
        best: tuple[float, LayerStats, str] | None = None
        for s in stats:
            now = choice[s.name]
            for key in names:
                extra = s.bytes[key] - s.bytes[now]
                saved = s.loss(now) - s.loss(key)
                if extra <= 0 or saved <= 0 or used + extra > budget:
                    continue
                if best is None or saved / extra > best[0]:
                    best = (saved / extra, s, key)
        if best is None:
            return choice
        _, s, key = best
        used += s.bytes[key] - s.bytes[choice[s.name]]
        choice[s.name] = key


def plan_bits(stats: list[LayerStats], choice: dict[str, str]) -> float:
    """Bits per weight of a plan."""
    return 8 * sum(s.bytes[choice[s.name]] for s in stats) / sum(s.weights for s in stats)


def apply_plan(net: LlamaForCausalLM, choice: dict[str, str]) -> LlamaForCausalLM:
    """Quantize each planned linear of a float model to its format (in place); the LM head
    as the reference format's LM head rule (int8 per channel)."""
    for name, parent, attr, mod in linear_layers(net):
        spec = (QuantSpec(*REFERENCE).for_lm_head() if name == "lm_head"
                else QuantSpec(*parse_format(choice[name])))
        setattr(parent, attr, spec.quantize(mod.weight, getattr(mod, "bias", None)))
    return net
