"""Roofline math: the FLOPs and bytes of a step's work, device peaks, MFU and MBU.

Conventions (the same for every engine we measure, so the numbers compare):

- Matmul FLOPs: 2 x the decoder layers' matmul parameters per computed token, plus
  2 x vocab x hidden (the LM head) per token whose logits are computed (one per sequence
  per step that samples; a prefill chunk that does not end its prompt runs no LM head).
- Attention FLOPs: 4 x num_heads x head_dim x num_layers per (query, key) pair that the
  causal mask keeps (QK^T and PV, 2 FLOPs per multiply-add each), window-limited.
- Bytes: the weights once per forward pass (decoder layers + LM head; the embedding table
  is a lookup, except when it is tied to the LM head) plus the KV cache each sequence reads
  (its whole context) and writes (its new tokens). Activations are left out: at these
  sizes they stay in cache, and leaving them out makes MBU a lower bound.
- MFU = FLOPs / (seconds x peak FLOP/s); MBU = bytes / (seconds x peak bytes/s).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

from peregrine.models.config import ModelConfig


@dataclass(frozen=True)
class DevicePeak:
    """The roof: peak FLOP/s in the compute dtype and peak memory bandwidth."""

    name: str
    flops: float  # FLOP/s
    bandwidth: float  # bytes/s
    source: str  # where the numbers come from (datasheet, or how they were measured)

    def to_dict(self) -> dict:
        return asdict(self)


# NVIDIA datasheet peaks (dense, no sparsity). float32 is the non-tensor-core FP32 rate.
# Matched against torch.cuda.get_device_name(), most specific first.
GPU_PEAKS: list[tuple[str, dict[str, float], float]] = [
    ("H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12}, 2.0e12),
    ("H100", {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}, 3.35e12),  # SXM
    ("H200", {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}, 4.8e12),
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12}, 2.039e12),
]


def gpu_peak(device_name: str, dtype: torch.dtype) -> DevicePeak:
    """Datasheet peak of a known GPU; ValueError for one not in GPU_PEAKS."""
    dtype_name = str(dtype).removeprefix("torch.")
    for key, flops, bandwidth in GPU_PEAKS:
        if key in device_name:
            if dtype_name not in flops:
                raise ValueError(f"no datasheet peak for dtype {dtype_name} on {key}")
            return DevicePeak(key, flops[dtype_name], bandwidth,
                              f"NVIDIA datasheet ({dtype_name} dense)")
    raise ValueError(f"no datasheet peak for GPU {device_name!r}; pass --peak-flops and "
                     "--peak-bandwidth")


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_dir() -> str:
    """~/.cache/peregrine (or $XDG_CACHE_HOME/peregrine)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "peregrine")


def measure_cpu_peak(threads: int, matmul_size: int = 2048, copy_mib: int = 256,
                     repeats: int = 5) -> DevicePeak:
    """Measure this CPU's float32 matmul FLOP/s and memory bandwidth with `threads` threads
    (best of `repeats`: the roof is what the hardware can do, not what it did on average)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(matmul_size, matmul_size)
        b = torch.randn(matmul_size, matmul_size)
        torch.mm(a, b)  # warm up the BLAS threads
        best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
        flops = 2 * matmul_size**3 / best
        n = copy_mib * 2**20 // 4
        src, dst = torch.ones(n), torch.empty(n)
        dst.copy_(src)
        copy_bw = 2 * src.nbytes / min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
        read_bw = src.nbytes / min(_timed(lambda: src.sum()) for _ in range(repeats))
    finally:
        torch.set_num_threads(old)
    return DevicePeak(
        f"{cpu_name()} ({threads} threads)", flops, max(copy_bw, read_bw),
        f"measured: float32 {matmul_size}^3 matmul, {copy_mib} MiB copy "
        f"({copy_bw / 1e9:.1f} GB/s) and sum ({read_bw / 1e9:.1f} GB/s), best of {repeats}")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_peak(threads: int, remeasure: bool = False) -> DevicePeak:
    """The measured CPU peak, cached in ~/.cache/peregrine/cpu_peak.json per CPU model,
    thread count and torch version (measuring takes a few seconds)."""
    key = f"{cpu_name()}|threads={threads}|torch={torch.__version__}"
    path = os.path.join(cache_dir(), "cpu_peak.json")
    try:
        with open(path) as f:
            cached = json.load(f)
    except (OSError, ValueError):
        cached = {}
    if key in cached and not remeasure:
        return DevicePeak(**cached[key])
    peak = measure_cpu_peak(threads)
    cached[key] = peak.to_dict()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(cached, f, indent=1)
    return peak


def device_peak(device: torch.device, dtype: torch.dtype, threads: int,
                flops: float | None = None, bandwidth: float | None = None,
                remeasure: bool = False) -> DevicePeak:
    """The roof for `device`: datasheet for GPUs, measured (cached) for CPUs; explicit
    `flops`/`bandwidth` override either."""
    if flops and bandwidth:
        return DevicePeak(str(device), flops, bandwidth, "given on the command line")
    if device.type == "cuda":
        peak = gpu_peak(torch.cuda.get_device_name(device), dtype)
    else:
        peak = cpu_peak(threads, remeasure)
    if flops is None and bandwidth is None:
        return peak
    return DevicePeak(peak.name, flops or peak.flops, bandwidth or peak.bandwidth,
                      f"partly given on the command line; {peak.source}")


def attention_pairs(start: int, n: int, window: int | None = None) -> int:
    """(query, key) pairs the causal mask keeps for queries at positions start..start+n-1,
    each seeing at most `window` keys."""
    if window is None:
        return n * start + n * (n + 1) // 2
    # Positions p < window see p + 1 keys; later ones see `window`.
    k = max(0, min(start + n, window) - start)
    return k * start + k * (k + 1) // 2 + (n - k) * window


@dataclass(frozen=True)
class ModelCost:
    """Per-token and per-step work of one model, as the roofline counts it."""

    layer_params: int  # matmul parameters of the decoder layers (run for every token)
    head_params: int  # LM head, run only for rows whose logits are computed
    attn_flops_per_pair: int
    weight_bytes: float  # bytes of weights one forward pass reads
    kv_bytes_per_token: float
    sliding_window: int | None = None

    @classmethod
    def from_config(cls, cfg: ModelConfig, bytes_per_param: float,
                    kv_bytes_per_value: float) -> "ModelCost":
        """Costs of `cfg` with weights stored at `bytes_per_param` (4 for float32, about
        0.56 for GGUF Q4_1) and K/V stored at `kv_bytes_per_value`."""
        head = cfg.vocab_size * cfg.hidden_size
        # a mixture of experts computes with the experts a token is routed to
        matmul = cfg.num_params(include_embeddings=False, active=True)
        layers = matmul - (0 if cfg.tie_word_embeddings else head)
        return cls(layer_params=layers, head_params=head,
                   attn_flops_per_pair=4 * cfg.num_heads * cfg.head_dim * cfg.num_layers,
                   weight_bytes=(layers + head) * bytes_per_param,
                   kv_bytes_per_token=cfg.kv_bytes_per_token(kv_bytes_per_value),
                   sliding_window=cfg.sliding_window)

    def chunk_flops(self, start: int, n: int, logits: bool = True) -> float:
        """FLOPs of computing the n tokens at positions start.. of one sequence (plus the
        LM head on its last token when `logits`)."""
        pairs = attention_pairs(start, n, self.sliding_window)
        return (2.0 * self.layer_params * n + float(self.attn_flops_per_pair) * pairs
                + (2.0 * self.head_params if logits else 0.0))

    def chunk_kv_bytes(self, start: int, n: int) -> float:
        """KV-cache bytes of that chunk: its context read once, its new tokens written."""
        context = start + n if self.sliding_window is None else min(start + n,
                                                                   self.sliding_window)
        return (context + n) * self.kv_bytes_per_token


def state_dict_bytes(model: torch.nn.Module) -> int:
    """Bytes of a module's weights (tied tensors counted once)."""
    seen: dict[tuple[int, int], int] = {}
    for t in model.state_dict().values():
        if t.device.type != "meta":
            seen[(t.untyped_storage().data_ptr(), t.storage_offset())] = t.nbytes
    return sum(seen.values())


def mfu(flops: float, seconds: float, peak: DevicePeak) -> float:
    """Model FLOPs utilization: achieved FLOP/s over the peak."""
    return flops / seconds / peak.flops if seconds > 0 else 0.0


def mbu(num_bytes: float, seconds: float, peak: DevicePeak) -> float:
    """Model bandwidth utilization: achieved bytes/s over the peak."""
    return num_bytes / seconds / peak.bandwidth if seconds > 0 else 0.0
