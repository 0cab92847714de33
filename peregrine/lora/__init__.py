"""LoRA adapters served on top of a base model: loading PEFT adapters, the adapter slots and
which request runs on which (docs/lora.md). The batched delta itself is
peregrine/layers/lora.py."""

from peregrine.lora.request import LoRARequest

__all__ = ["LoRARequest"]
