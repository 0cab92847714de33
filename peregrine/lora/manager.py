"""LoRAManager: the adapters one engine knows and the slots they run in.

Wrapping: every targeted linear of the model's decoder layers (qkv_proj, o_proj,
gate_up_proj, down_proj) becomes a LoRALinear around the linear that was there, float or
quantized. Adapters: read from disk once (`add`), kept on the host, mapped from PEFT's
module names onto our fused linears' slices. Slots: `max_loras` adapters are resident in
the linears' buffers at once; `activate` gives each adapter of the running requests a slot,
evicting the least recently used adapter that no running request uses (the scheduler
never runs more distinct adapters than there are slots)."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from peregrine.layers.lora import LoRABatch, LoRAFactors, LoRALinear, LoRAState
from peregrine.lora.adapter import LoRAAdapter
from peregrine.lora.errors import AdapterNotFoundError, InvalidAdapterError
from peregrine.lora.request import LoRARequest

logger = logging.getLogger("peregrine")

# Our linears that carry LoRA deltas, and the PEFT modules each one fuses.
WRAPPED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def wrap_linears(model: nn.Module, max_loras: int, max_rank: int, state: LoRAState,
                 dtype: torch.dtype, device: torch.device) -> dict[str, LoRALinear]:
    """Replace the model's targeted linears by LoRALinears (in place); them by name."""
    cfg = model.config
    sizes = {"qkv_proj": [cfg.q_size, cfg.kv_size, cfg.kv_size],
             "gate_up_proj": [cfg.intermediate_size, cfg.intermediate_size]}
    wrapped = {}
    for name, module in list(model.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        if leaf not in WRAPPED or not name.startswith("layers.") or isinstance(module,
                                                                               LoRALinear):
            continue
        slices = sizes.get(leaf, [module.out_features])
        wrapper = LoRALinear(module, slices, max_loras, max_rank, state, dtype, device)
        setattr(model.get_submodule(parent_name), leaf, wrapper)
        wrapped[name] = wrapper
    return wrapped


class LoRAManager:
    """Adapters by name, the slots they occupy, and the batch mapping of each step."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.max_loras, self.max_rank, self.device = max_loras, max_rank, device
        self.state = LoRAState()
        self.linears = wrap_linears(model, max_loras, max_rank, self.state, dtype, device)
        self.packed: dict[str, tuple[str, ...]] = dict(getattr(model, "packed_modules", {}))
        self.adapters: dict[str, LoRAAdapter] = {}
        self._plans: dict[str, dict[str, list[LoRAFactors | None]]] = {}
        self.slots: list[str | None] = [None] * max_loras
        self._clock = itertools.count()
        self._last_used: dict[str, int] = {}
        self.num_slot_loads = 0  # adapters copied into a slot (first use or after eviction)

    # --- the adapters known ---------------------------------------------------------------
    def add(self, request: LoRARequest) -> LoRAAdapter:
        """Read and check the adapter (once per name); InvalidAdapterError says why not."""
        known = self.adapters.get(request.lora_name)
        if known is not None:
            if known.path != request.lora_path:
                raise InvalidAdapterError(f"an adapter named {request.lora_name!r} is already "
                                          f"loaded from {known.path}")
            return known
        began = time.perf_counter()
        adapter = LoRAAdapter.load(request.lora_name, request.lora_path, self.max_rank)
        self._plans[adapter.name] = self._plan(adapter)
        self.adapters[adapter.name] = adapter
        logger.info("LoRA adapter %s (rank %d, %d modules) read in %.2fs", adapter.name,
                    adapter.rank, len(adapter.weights), time.perf_counter() - began)
        return adapter

    def remove(self, name: str) -> None:
        """Forget adapter `name` and free its slot; AdapterNotFoundError if unknown."""
        if name not in self.adapters:
            raise AdapterNotFoundError(f"no LoRA adapter named {name!r} is loaded")
        if name in self.slots:
            slot = self.slots.index(name)
            for linear in self.linears.values():
                linear.clear_slot(slot)
            self.slots[slot] = None
        del self.adapters[name], self._plans[name]
        self._last_used.pop(name, None)

    def _plan(self, adapter: LoRAAdapter) -> dict[str, list[LoRAFactors | None]]:
        """Each wrapped linear's factors per slice; checks the shapes against the model."""
        plan: dict[str, list[LoRAFactors | None]] = {}
        for module, f in adapter.weights.items():
            parent, _, leaf = module.rpartition(".")
            fused = next((k for k, parts in self.packed.items() if leaf in parts), leaf)
            path = f"{parent}.{fused}"
            linear = self.linears.get(path)
            if linear is None:
                raise InvalidAdapterError(f"adapter {adapter.name!r} targets {module}, which "
                                          "this model does not have")
            if leaf == fused and len(linear.slices) > 1:  # a fused module adapted whole
                index, parts = None, _split_rows(f, linear.slices)
            else:
                index = self.packed.get(fused, (leaf,)).index(leaf)
                parts = [f]
            want_out = linear.slices[index] if index is not None else linear.out_features
            if f.a.shape[1] != linear.in_features or f.b.shape[0] != want_out:
                raise InvalidAdapterError(
                    f"adapter {adapter.name!r}: {module} maps {f.a.shape[1]} -> {f.b.shape[0]} "
                    f"features, the model's {linear.in_features} -> {want_out} (an adapter "
                    "of another base model?)")
            slices = plan.setdefault(path, [None] * len(linear.slices))
            for j, part in enumerate(parts):
                slices[j if index is None else index] = part
        return plan

    # --- slots ---------------------------------------------------------------------------------
    def activate(self, names: set[str]) -> None:
        """Make every adapter in `names` resident, evicting least recently used ones not in
        `names`; RuntimeError when there are more names than slots."""
        now = next(self._clock)
        for name in names:
            self._last_used[name] = now
        for name in sorted(n for n in names if n not in self.slots):
            if name not in self.adapters:
                raise AdapterNotFoundError(f"no LoRA adapter named {name!r} is loaded")
            slot = self._free_slot(names)
            plan = self._plans[name]
            for path, linear in self.linears.items():
                factors = plan.get(path)
                if factors is None:
                    linear.clear_slot(slot)
                else:
                    linear.set_slot(slot, factors)
            self.slots[slot] = name
            self.num_slot_loads += 1

    def _free_slot(self, keep: set[str]) -> int:
        if None in self.slots:
            return self.slots.index(None)
        idle = [i for i, n in enumerate(self.slots) if n not in keep]
        if not idle:
            raise RuntimeError(f"{len(keep)} adapters in one step, {self.max_loras} slots")
        return min(idle, key=lambda i: self._last_used.get(self.slots[i], -1))

    def slot_of(self, name: str | None) -> int:
        """The slot of a resident adapter; -1 for the base model (None)."""
        return -1 if name is None else self.slots.index(name)

    @contextmanager
    def batch(self, token_slots: torch.Tensor) -> Iterator[None]:
        """Apply each row's adapter (by slot, -1: none) to the forward pass in the block."""
        with self.state.active(LoRABatch(token_slots, self.device)):
            yield


def _split_rows(f: LoRAFactors, sizes: list[int]) -> list[LoRAFactors]:
    """A fused module's factors as one per slice: the same A, B cut by output rows."""
    bounds = [sum(sizes[:j]) for j in range(len(sizes) + 1)]
    return [LoRAFactors(f.a, f.b[bounds[j]:bounds[j + 1]], f.scaling)
            for j in range(len(sizes))]
