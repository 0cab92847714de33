"""LoRA adapters on the server (vLLM's API): `--lora-modules name=path ...` and the bodies
of POST /v1/load_lora_adapter and /v1/unload_lora_adapter."""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field

from peregrine.lora.request import LoRARequest


class LoadLoRAAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter: serve the PEFT adapter at `lora_path` as model
    `lora_name` (on `base_model_name`, default: the default model)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)
    base_model_name: str | None = None


class UnloadLoRAAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter: stop serving adapter `lora_name`."""

    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None  # vLLM's; adapters are known by name here


def parse_lora_modules(specs: list[str]) -> list[tuple[LoRARequest, str | None]]:
    """--lora-modules entries as (adapter, base model name or None): `name=path`, or vLLM's
    JSON `{"name": ..., "path": ..., "base_model_name": ...}`."""
    out = []
    for spec in specs:
        base = None
        if spec.lstrip().startswith("{"):
            try:
                data = json.loads(spec)
                name, path, base = data["name"], data["path"], data.get("base_model_name")
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"--lora-modules: {spec!r} is not name=path or a JSON object "
                                 "with name and path") from None
        else:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules: expected name=path, got {spec!r}")
        out.append((LoRARequest(name, path), base))
    return out
