"""LoRARequest: which adapter a request runs with (vLLM's type, by the same name)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter by name and PEFT directory. As in vLLM, `LoRARequest(name, int_id, path)`;
    `LoRARequest(name, path)` works too. The engine knows an adapter by its name."""

    lora_name: str
    lora_int_id: int | str = 0
    lora_path: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.lora_int_id, str):  # the two-argument form: (name, path)
            if self.lora_path:
                raise ValueError("LoRARequest takes (name, path) or (name, int_id, path)")
            object.__setattr__(self, "lora_path", self.lora_int_id)
            object.__setattr__(self, "lora_int_id", 0)
        if not self.lora_name:
            raise ValueError("a LoRA adapter needs a name")
        if not self.lora_path:
            raise ValueError(f"LoRA adapter {self.lora_name!r} needs a path")
