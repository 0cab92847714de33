"""The models one server serves: from repeated --model flags or a models file (TOML), each
with its names, engine options, placement (pinned, share) and estimated memory."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from typing import Any

from peregrine.config import EngineConfig
from peregrine.memory_model import kv_dtype_bytes, kv_pool_bytes, num_blocks_for_memory
from peregrine.models.registry import resolve_model

# Keys of a [[models]] table that are not EngineConfig fields.
_ENTRY_KEYS = ("served_name", "aliases", "pinned", "share")


@dataclass
class ModelEntry:
    """One model behind the API: its served name, aliases, engine config and placement."""

    name: str
    config: EngineConfig
    aliases: list[str] = field(default_factory=list)
    pinned: bool = False
    """Never unloaded to make room or for idleness (an admin unload still unloads it)."""
    share: float = 1.0
    """Its weight in the fair sharing of compute between loaded models."""
    memory_bytes: int = 0
    """Weights + KV pool as the memory model estimates them (0: not estimated)."""

    @property
    def names(self) -> list[str]:
        """The served name, then the aliases."""
        return [self.name, *self.aliases]


def estimate_memory(config: EngineConfig) -> int:
    """Bytes `config`'s model will hold once loaded: weights (and a GGUF file's mapped pages)
    plus the KV pool, sized as the engine sizes it; known before loading."""
    from peregrine.estimate.core import memory_estimate, model_spec
    spec = model_spec(config.model)
    kind = config.torch_device.type
    est = memory_estimate(spec, config, kind)
    m, dtype = spec.config, config.torch_dtype
    if config.num_kv_blocks is not None:
        blocks = config.num_kv_blocks
    elif kind == "cpu":
        per_value = kv_dtype_bytes(config.kv_cache_dtype, dtype, m.head_dim)
        blocks = num_blocks_for_memory(m, config.block_size, per_value,
                                       config.kv_cache_memory * 2**30)
    else:  # a GPU pool fills what gpu_memory_utilization leaves: count what a full batch needs
        return est.weights.total + est.kv_cache_bytes
    kv = kv_pool_bytes(m, blocks, config.block_size, config.kv_cache_dtype, dtype)
    return est.weights.total + est.file_bytes + kv


def entries_from_flags(models: list[str | None], base: EngineConfig,
                       served_model_name: str | None = None) -> list[ModelEntry]:
    """One entry per --model (the engine flags apply to each); --served-model-name names the
    first. Two models may not end up with one name."""
    entries = []
    for i, model in enumerate(models):
        config = dataclasses.replace(base, model=model)
        name = resolve_model(model, config.load_format).name
        if i == 0 and served_model_name:
            name = served_model_name
        aliases = [model] if model and model != name else []
        entries.append(ModelEntry(name, config, aliases))
    return _check_names(entries)


def entries_from_file(path: str, base: EngineConfig) -> list[ModelEntry]:
    """The [[models]] tables of a models file; engine options not given come from `base`
    (the command line's engine flags)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"--models-config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--models-config {path}: {e}") from None
    tables = data.get("models")
    if not isinstance(tables, list) or not tables:
        raise ValueError(f"--models-config {path}: expected one or more [[models]] tables")
    return _check_names([_entry(t, base, f"{path}: models[{i}]")
                         for i, t in enumerate(tables)])


def _entry(table: dict[str, Any], base: EngineConfig, where: str) -> ModelEntry:
    known = set(EngineConfig.field_names()) - {"extra"}
    unknown = sorted(set(table) - known - set(_ENTRY_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (engine options are the "
                         "EngineConfig fields, e.g. quantization, kv_cache_memory)")
    options = {k: v for k, v in table.items() if k in known}
    try:
        config = dataclasses.replace(base, **options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    name = table.get("served_name") or resolve_model(config.model, config.load_format).name
    aliases = table.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise ValueError(f"{where}: aliases must be a list of strings")
    share = table.get("share", 1.0)
    if not isinstance(share, (int, float)) or share <= 0:
        raise ValueError(f"{where}: share must be a number > 0, got {share!r}")
    return ModelEntry(name, config, aliases, bool(table.get("pinned", False)), float(share))


def _check_names(entries: list[ModelEntry]) -> list[ModelEntry]:
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        for n in entry.names:
            if seen.setdefault(n, i) != i:
                raise ValueError(f"two models are both called {n!r}: give each its own "
                                 "served_name (in a --models-config file)")
    return entries
