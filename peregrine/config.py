"""EngineConfig: every knob of the engine in one place, with its default and why."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Batching = Literal["continuous", "dynamic", "static"]


@dataclass
class EngineConfig:
    """Configuration of one engine; every field is also a keyword argument of `LLM(...)`."""

    # --- model -------------------------------------------------------------------------
    model: str | None = None
    """Model name (`smollm2-135m`, a shipped config such as `llama-3-8b`), a GGUF file or a
    Hugging Face directory. None means the embedded default, SmolLM2-135M-Instruct."""
    tokenizer: str | None = None
    """Where to take the tokenizer from when it differs from `model` (a directory or GGUF)."""
    load_format: Literal["auto", "gguf", "hf", "dummy"] = "auto"
    """`auto` picks by path; `dummy` builds random weights from the config (speed work)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = "auto"
    """Compute dtype. `auto`: float32 on CPU (bf16 is emulated and slow there), bf16 on GPU.
    float64 exists for exactness tests: it removes floating-point near-ties."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA when available, else CPU."""
    seed: int = 0
    """Seed for dummy weights and for requests that sample without a seed of their own."""
    quantization: Literal["auto", "none", "int8", "int4", "nf4", "fp8", "gguf"] = "auto"
    """Weight quantization applied at load (docs/quantization.md): `int8` per-channel,
    `int4` group-wise, `nf4` group-wise absmax, `fp8` e4m3 per-channel, all round-to-nearest
    from the float weights; `gguf` keeps a GGUF file's Q8_0/Q4_0/Q4_1 blocks as they are.
    `auto` (the default): `gguf` for a GGUF file on the CPU (the fastest lossless path),
    `none` otherwise. `none` computes in float (the reference path). A checkpoint written by
    `peregrine quantize` loads quantized with `auto` or `none`."""
    quantization_group_size: int | None = None
    """Weights per scale for int4/nf4/int8 (a multiple of 32). None: the format's default,
    128 for int4 (32 for a GGUF source, whose blocks already sit on a 32-weight grid), 64 for
    nf4, one scale per output channel for int8."""
    quantization_symmetric: bool = False
    """int4 only: symmetric levels (-8..7 times a scale) instead of min/max (scale + offset)."""
    max_model_len: int | None = None
    """Longest prompt + output in tokens. None: the model's context length."""

    # --- KV cache ----------------------------------------------------------------------
    block_size: int = 16
    """Tokens per KV block."""
    num_kv_blocks: int | None = None
    """Explicit pool size in blocks; overrides the memory budget when set."""
    kv_cache_memory: float = 2.0
    """KV pool budget in GiB on CPU."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory the engine may use (weights + activations + KV pool)."""
    kv_cache_dtype: Literal["auto", "int8", "fp8"] = "auto"
    """`auto` stores K/V in the compute dtype; int8/fp8 store one byte per value with scales."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes across requests."""

    # --- scheduling --------------------------------------------------------------------
    max_num_seqs: int = 128
    """Most sequences in one step."""
    max_num_batched_tokens: int | None = None
    """Token budget of one step. None: 512 on CPU (keeps decode latency low while a long
    prompt is prefilled in chunks), 8192 on GPU."""
    enable_chunked_prefill: bool = True
    """Split long prompts across steps so prefill and decode share each forward pass."""
    batching: Batching = "continuous"
    """`continuous`: join/leave every step. `static`: a fixed batch runs to completion.
    `dynamic`: like static, but the batch forms after waiting up to `batch_wait_ms`."""
    batch_wait_ms: float = 50.0
    """How long `dynamic` batching waits for a batch to fill before starting it."""

    # --- execution ---------------------------------------------------------------------
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    """`auto`: torch on CPU, Triton on GPU."""
    enforce_eager: bool = False
    """Run every step through the eager modules: no CUDA graphs on a GPU, no fused C++ decode
    step on a CPU (the reference path)."""
    max_logprobs: int = 20
    """Largest `logprobs` / `top_logprobs` a request may ask for."""
    num_threads: int | None = None
    """torch intra-op threads on CPU. None: torch's default (all cores)."""

    # --- parallelism (docs/distributed.md) ------------------------------------------------
    tensor_parallel_size: int = 1
    """Processes that split every layer (Megatron: attention heads, MLP columns, vocabulary)
    and all-reduce twice per layer. Rank 0 is this process; the others are started and
    stopped by the engine."""
    pipeline_parallel_size: int = 1
    """Processes that split the layers into contiguous stages, a step's micro-batches flowing
    through them in turn (combined with tensor_parallel_size: tp x pp processes)."""
    enable_expert_parallel: bool = False
    """Split mixture-of-experts layers over the tensor-parallel ranks by whole experts (rank
    r of N holds experts E*r//N .. E*(r+1)//N - 1) instead of every expert's columns; no
    effect on dense models or with tensor_parallel_size 1."""
    distributed_timeout: float = 60.0
    """Seconds a rank waits in one collective or transfer before the step fails (a stuck
    worker); a crashed worker is reported at once."""

    # --- speculative decoding ------------------------------------------------------------
    speculative: str | None = None
    """None (off), `ngram` (prompt lookup), `draft:<model>` (a smaller model with the same
    tokenizer, its own KV pool) or `layers:<k>` (self-speculative: the target's first k
    layers and its LM head, sharing the target's KV of those layers)."""
    num_speculative_tokens: int = 4
    """Tokens proposed per sequence per step when speculating."""
    ngram_min: int = 2
    """`ngram`: the shortest suffix of the sequence looked up (vLLM's prompt_lookup_min).
    1 proposes more often and is right less often: on chat it costs more than it gains."""
    ngram_max: int = 4
    """`ngram`: the longest suffix looked up first (vLLM's prompt_lookup_max)."""

    # --- LoRA adapters (docs/lora.md) ----------------------------------------------------
    enable_lora: bool = False
    """Serve LoRA adapters on this model: requests name one (`lora_request`, or an
    adapter's name as `model` on the server) and run in the same batches as the base
    model's. Steps then run the eager modules: the fused CPU step and CUDA graphs compute
    no adapter deltas."""
    max_loras: int = 1
    """Adapters resident at once (slots). A step runs requests of at most this many distinct
    adapters; a request whose adapter finds no free slot waits, and the least recently
    used adapter without running requests is evicted for it."""
    max_lora_rank: int = 16
    """Largest adapter rank accepted; every slot is this wide (its memory: 2 x rank x
    (in + out) values per targeted linear)."""

    # --- energy and cost (docs/cost.md) --------------------------------------------------
    power_source: Literal["auto", "nvml", "rapl", "model", "off"] = "auto"
    """Where each step's joules come from. `auto`: the GPU's NVML energy counter
    (nvidia-ml-py), the CPU's RAPL counters when readable, else the stated `model`
    (CPU: process CPU seconds x watts per core; GPU: wall time x board power). `off`: no
    energy accounting."""
    power_watts: float | None = None
    """Wattage of the power model: per busy CPU core, or the GPU's board power. None:
    devices.json's (CPU: 3.75 W, an AMD EPYC 9654's 360 W TDP / 96 cores; GPU: the
    datasheet power limit of the matching GPU)."""
    price_per_hour: float = 0.0
    """What one hour of this device costs in USD (rent, or amortised purchase plus power);
    0 means unknown and no cost is reported. A request is charged its token share of the
    wall time of each step it is in."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form options for experiments; nothing in the engine depends on it."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field when a value is out of range."""
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1, got "
                             f"{self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.batching not in ("continuous", "dynamic", "static"):
            raise ValueError(f"batching must be continuous|dynamic|static, got {self.batching!r}")
        if self.quantization not in ("auto", "none", "int8", "int4", "nf4", "fp8", "gguf"):
            raise ValueError("quantization must be auto|none|int8|int4|nf4|fp8|gguf, got "
                             f"{self.quantization!r}")
        g = self.quantization_group_size
        if g is not None and (g < 32 or g % 32 or (g // 32) & (g // 32 - 1)):
            raise ValueError("quantization_group_size must be 32 times a power of two "
                             f"(32, 64, 128, ...), got {g}")
        spec = self.speculative
        if spec is not None and spec != "ngram" and not (
                spec.startswith("draft:") and len(spec) > 6
                or re.fullmatch(r"layers:[1-9][0-9]*", spec)):
            raise ValueError("speculative must be ngram, draft:<model> or layers:<k>, got "
                             f"{spec!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("ngram_min and ngram_max must satisfy 1 <= ngram_min <= ngram_max, "
                             f"got {self.ngram_min} and {self.ngram_max}")
        if self.power_source not in ("auto", "nvml", "rapl", "model", "off"):
            raise ValueError("power_source must be auto|nvml|rapl|model|off, got "
                             f"{self.power_source!r}")
        if self.power_watts is not None and self.power_watts <= 0:
            raise ValueError(f"power_watts must be > 0, got {self.power_watts}")
        if self.price_per_hour < 0:
            raise ValueError(f"price_per_hour must be >= 0, got {self.price_per_hour}")
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.enable_lora and self.speculative is not None:
            raise ValueError("enable_lora does not combine with speculative decoding yet")
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("tensor_parallel_size and pipeline_parallel_size must be >= 1, got "
                             f"{self.tensor_parallel_size} and {self.pipeline_parallel_size}")
        if self.distributed_timeout <= 0:
            raise ValueError(f"distributed_timeout must be > 0 s, got {self.distributed_timeout}")
        if self.world_size > 1 and self.num_kv_blocks is None and self.torch_device.type == "cuda":
            raise ValueError("set num_kv_blocks with tensor/pipeline parallelism on GPUs: the "
                             "memory profile runs in one process")
        if self.world_size > 1 and spec is not None and spec.startswith("layers:"):
            raise ValueError("speculative=layers:<k> runs the target's first layers in this "
                             "process alone; use ngram or draft:<model> with tensor or "
                             "pipeline parallelism")
        if self.world_size > 1 and self.enable_lora:
            raise ValueError("enable_lora does not combine with tensor or pipeline parallelism "
                             "yet: the adapters' deltas are not split over ranks")
        if self.num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be >= 1, got "
                             f"{self.num_speculative_tokens}")

    @property
    def torch_device(self) -> torch.device:
        """The device the engine runs on."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The compute dtype."""
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    @property
    def world_size(self) -> int:
        """Processes the engine runs on: tensor_parallel_size x pipeline_parallel_size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def token_budget(self) -> int:
        """Tokens one step may compute."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 8192 if self.torch_device.type == "cuda" else 512

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of all fields (the keyword arguments `LLM(...)` accepts)."""
        return [f.name for f in dataclasses.fields(cls)]


def add_engine_args(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One --flag per EngineConfig field, except those in `exclude`."""
    add_dataclass_args(parser, EngineConfig, "engine", exclude=("extra", *exclude))


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, group: str,
                       exclude: tuple[str, ...] = ()) -> None:
    """One --flag per field of the dataclass `cls` (its docstring is the help), in `group`."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    flags = parser.add_argument_group(group)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = typing.get_args(hint)
        kwargs: dict[str, Any] = {"default": f.default, "dest": f.name,
                                  "help": docs.get(f.name, "").replace("%", "%%") or None}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = list(args)
        else:
            base = next((a for a in (args or (hint,)) if a is not type(None)), str)
            if typing.get_origin(base) is list:  # --flag a b c
                kwargs["nargs"] = "+"
                base = typing.get_args(base)[0]
            kwargs["type"] = base if base in (int, float, str) else str
        flags.add_argument(flag, **kwargs)


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the dataclass's source)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs
