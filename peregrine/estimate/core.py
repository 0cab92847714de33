"""What a model needs and how fast it runs, per device, from the engine's own memory model
(peregrine/memory_model.py) and the roofline of peregrine/bench/roofline.py.

Memory, per device of a tensor-parallel group of n:
  weights: the bytes the loader builds (memory_model.weight_bytes), split n ways except
    norms and the rotary table (replicated);
  KV cache: blocks the engine's pool needs so `max_num_seqs` sequences of `max_model_len`
    tokens are all resident (memory_model.blocks_per_sequence: block rounding, sliding
    window), KV heads split n ways (replicated when n exceeds them);
  activations: the largest step's temporaries (memory_model.activation_bytes), split n ways;
  runtime overhead: outside all of those (CUDA context; on a CPU the process's RSS before
    loading), measured or assumed per device;
  load peak: the loader materializes the float model in the compute dtype before it
    quantizes (plus, for a GGUF file, its mapped pages and a dequantization scratch), so
    loading can need more than serving.
A GPU fits when utilization x memory covers weights + activations + overhead + KV, as the
engine's own budget (memory_profile.kv_budget_bytes) computes it, and the load peak fits.

Speed: decode tok/s = batch / max(bytes / (eff_d x bandwidth), FLOPs / (eff_p x FLOP/s))
per step, bytes = weights read + every sequence's KV context; prefill tok/s likewise over
a whole prompt. Efficiencies come from devices.json: measured on CPUs, assumed on GPUs."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from peregrine.bench.roofline import ModelCost
from peregrine.config import EngineConfig
from peregrine.engine.memory_profile import kv_budget_bytes
from peregrine.estimate.devices import (CpuCalibration, Device, cpu_calibrations, gpu_devices,
                                        load_data, pick_calibration)
from peregrine.memory_model import (FLOAT, LinearFormat, WeightBytes, activation_bytes,
                                    blocks_per_sequence, kv_bytes_per_token,
                                    kv_pool_bytes, linear_shapes, linear_weight_bytes,
                                    quantization_plan, resolve_quantization, weight_bytes)
from peregrine.models.config import ModelConfig
from peregrine.models.gguf_file import QT, GGUFFile
from peregrine.models.registry import resolve_model

TP_SIZES = (1, 2, 4, 8)
FUSED_CPU_METHODS = ("int4", "int8", "gguf")  # engine/cpu_decode.py runs these fused


@dataclass
class EstimateOptions:
    """What `estimate` adds to the engine's flags."""

    tensor_parallel_size: int | None = None
    """Devices per model replica. None: the fewest of 1, 2, 4, 8 that fit."""
    prompt_len: int | None = None
    """Traffic profile: prompt tokens per request. None: max_model_len / 2."""
    output_len: int | None = None
    """Traffic profile: output tokens per request. None: max_model_len - prompt_len."""
    request_rate: float | None = None
    """Traffic profile: requests/s. None: max_num_seqs sequences always in flight."""
    devices: list[str] | None = None
    """Device names to report (case-insensitive). None: every GPU of the table and the CPU."""

    def validate(self) -> None:
        """ValueError naming the option when a value is out of range."""
        if self.tensor_parallel_size is not None and self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1, got "
                             f"{self.tensor_parallel_size}")
        for name in ("prompt_len", "output_len"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.request_rate is not None and self.request_rate <= 0:
            raise ValueError(f"request_rate must be > 0, got {self.request_rate}")


@dataclass
class ModelSpec:
    """A model's config and what its file says about stored formats."""

    name: str
    config: ModelConfig
    gguf_path: str | None = None
    gguf_types: dict[str, list[QT]] | None = None  # module -> types of its GGUF tensors
    gguf_scratch_bytes: int = 0  # dequantizing the largest tensor at load
    gguf_file_bytes: int = 0


def model_spec(model: str | None) -> ModelSpec:
    """Resolve `--model` (a name, a shipped config, a GGUF file, a HF directory) without
    loading weights; ModelLoadError when it names nothing."""
    from peregrine.models.loader import _read_config, gguf_blocks_unfit, gguf_config
    from peregrine.models.gguf_native import gguf_module_types
    source = resolve_model(model, "dummy")  # configs only: weights need not exist
    if source.path.endswith(".gguf"):
        f = GGUFFile(source.path)
        cfg = gguf_config(f, source.name)
        types = None if gguf_blocks_unfit(f, cfg) else gguf_module_types(f, cfg)
        return ModelSpec(source.name, cfg, source.path, types,
                         gguf_dequant_scratch(f), os.path.getsize(source.path))
    hf = _read_config(source.path)
    if (hf.get("quantization_config") or {}).get("quant_method") == "peregrine":
        raise ValueError(f"{source.path} is a pre-quantized checkpoint; estimate its source "
                         "model with --quantization instead")
    return ModelSpec(source.name, ModelConfig.from_hf(hf, source.name))


def gguf_dequant_scratch(f: GGUFFile) -> int:
    """Peak temporaries of dequantizing the file's largest tensor at load
    (gguf_file.dequantize): the raw copy, int16 quants, their float32 copy and the result."""
    best = 0
    for t in f.tensors.values():
        n = math.prod(t.shape)
        per_value = 4 + 4 + 2 if t.qtype in (QT.Q8_0, QT.Q4_0, QT.Q4_1) else 4
        best = max(best, t.data.nbytes + n * per_value)
    return best


@dataclass
class MemoryEstimate:
    """Bytes of one model replica on one device kind, before tensor parallelism."""

    device_kind: str
    quantization: str
    dtype: str
    kv_cache_dtype: str
    weights: WeightBytes
    kv_cache_bytes_per_token: float
    kv_blocks_per_sequence: int
    kv_blocks: int
    kv_cache_bytes: int
    activation_bytes: int
    load_peak_bytes: int  # float model + quantized copies + file pages + scratch at load
    step_tokens: int
    file_bytes: int = 0  # a GGUF file's pages, mapped for the engine's life (CPU only)

    @property
    def serving_bytes(self) -> int:
        """Weights, KV pool, activations and mapped file pages while serving."""
        return (self.weights.total + self.kv_cache_bytes + self.activation_bytes
                + self.file_bytes)

    @property
    def peak_bytes(self) -> int:
        """The larger of loading and serving (runtime overhead excluded)."""
        return max(self.load_peak_bytes, self.serving_bytes)

    def to_dict(self) -> dict[str, Any]:
        w = self.weights
        return {"device_kind": self.device_kind, "quantization": self.quantization,
                "dtype": self.dtype, "kv_cache_dtype": self.kv_cache_dtype,
                "weights_bytes": w.total,
                "weights": {"linears": w.linears, "lm_head": w.lm_head,
                            "embedding": w.embedding, "norms_biases": w.norms_biases,
                            "rotary": w.rotary, "read_per_step": w.read_per_step,
                            "formats": w.formats},
                "kv_cache_bytes_per_token": self.kv_cache_bytes_per_token,
                "kv_blocks_per_sequence": self.kv_blocks_per_sequence,
                "kv_blocks": self.kv_blocks, "kv_cache_bytes": self.kv_cache_bytes,
                "activation_bytes": self.activation_bytes,
                "activation_step_tokens": self.step_tokens,
                "mapped_file_bytes": self.file_bytes,
                "load_peak_bytes": self.load_peak_bytes, "peak_bytes": self.peak_bytes}


def engine_config_for(config: EngineConfig, kind: str) -> EngineConfig:
    """`config` on a device kind (cpu|cuda): the compute dtype and token budget follow it."""
    return dataclasses.replace(config, device=kind)


def memory_estimate(spec: ModelSpec, config: EngineConfig, kind: str) -> MemoryEstimate:
    """The memory of `spec` under `config` on a `kind` device, as the engine allocates it."""
    cfg = engine_config_for(config, kind)
    m = spec.config
    quant = resolve_quantization(cfg.quantization, spec.gguf_types is not None, kind)
    plan = quantization_plan(m, quant, cfg.quantization_group_size, spec.gguf_types)
    dtype = cfg.torch_dtype
    max_len = cfg.max_model_len or m.max_position_embeddings
    weights = weight_bytes(m, plan, dtype, max_len)
    per_seq = blocks_per_sequence(max_len, cfg.block_size, m.sliding_window)
    blocks = cfg.max_num_seqs * per_seq
    tokens = cfg.token_budget if cfg.enable_chunked_prefill else max(cfg.token_budget, max_len)
    # the fused CPU step (int4/int8 linears) attends without materializing scores
    eager = kind == "cpu" and (cfg.enforce_eager or quant not in FUSED_CPU_METHODS)
    act = activation_bytes(m, tokens, min(cfg.max_num_seqs, tokens), dtype,
                           max_len if eager else 0)
    load = load_peak_bytes(spec, plan, weights, weight_bytes(m, {k: FLOAT for k in plan},
                                                             dtype, max_len), quant, kind,
                           dtype)
    return MemoryEstimate(kind, quant, str(dtype).removeprefix("torch."), cfg.kv_cache_dtype,
                          weights, kv_bytes_per_token(m, cfg.kv_cache_dtype, dtype), per_seq,
                          blocks, kv_pool_bytes(m, blocks, cfg.block_size, cfg.kv_cache_dtype,
                                                dtype),
                          act, load, tokens, spec.gguf_file_bytes if kind == "cpu" else 0)


# float32 temporaries per weight of quantizing one linear round-to-nearest
# (layers/quant_formats.py): int8/fp8: w / scale and its rounding; int4: expanded scale
# and offset, w - offset, the zero guard and the quotient; nf4: expanded scale, guard,
# quotient and int64 bucket indices
QUANTIZE_SCRATCH_PER_WEIGHT = {"int8": 8, "fp8": 8, "int4": 20, "nf4": 20}


def load_peak_bytes(spec: ModelSpec, plan: dict[str, LinearFormat], weights: WeightBytes,
                    float_model: WeightBytes, quantization: str, kind: str,
                    compute_dtype: torch.dtype) -> int:
    """Peak bytes while loading (models/loader.py), the larger of two phases. Reading a
    GGUF file dequantizes tensor by tensor (its largest tensor's scratch, before the model's
    pages are all written). Then the whole float model is resident while the linears are
    swapped: GGUF blocks are all built first (plus the repacking scratch of the largest,
    about 6 bytes per weight), a load-time quantization replaces one linear at a time (the
    largest quantized linear plus its float32 temporaries; freed float memory is counted
    as still resident: the allocator keeps most of it). On a CPU the GGUF file's pages
    stay mapped. Quantizing runs on the CPU, so a GPU sees only the quantized results."""
    shapes = linear_shapes(spec.config)
    after = float_model.total
    if quantization == "gguf":
        biggest = max(math.prod(shapes[k]) for k in shapes if plan[k].method != "float")
        after += weights.linears + weights.lm_head + (6 * biggest if kind == "cpu" else 0)
    elif quantization != "none":
        copy = 0 if compute_dtype == torch.float32 else 4  # w.float() copies
        def step(k: str) -> int:
            n, kk = shapes[k]
            q = linear_weight_bytes(n, kk, plan[k], 4)
            scratch = n * kk * (QUANTIZE_SCRATCH_PER_WEIGHT[plan[k].method] + copy)
            return q + (scratch if kind == "cpu" else 0)
        after += max(step(k) for k in shapes if plan[k].method != "float")
    if kind != "cpu":
        return after
    return spec.gguf_file_bytes + max(spec.gguf_scratch_bytes, after)


# --- speed ------------------------------------------------------------------------------

def model_cost(spec: ModelSpec, mem: MemoryEstimate) -> ModelCost:
    """The roofline cost model of the weights as stored (bytes read per forward pass)."""
    m = spec.config
    base = ModelCost.from_config(m, 1.0, 1.0)
    per_param = mem.weights.read_per_step / (base.layer_params + base.head_params)
    return ModelCost.from_config(m, per_param, mem.kv_cache_bytes_per_token
                                 / m.kv_bytes_per_token(1.0))


def decode_tok_s(cost: ModelCost, batch: int, context: int, bandwidth: float, flops: float
                 ) -> float:
    """Tokens/s of decode steps of `batch` sequences at `context` tokens each, given the
    effective bandwidth and FLOP/s (peak x efficiency)."""
    step_bytes = cost.weight_bytes + batch * cost.chunk_kv_bytes(context - 1, 1)
    step_flops = batch * cost.chunk_flops(context - 1, 1)
    return batch / max(step_bytes / bandwidth, step_flops / flops)


def prefill_tok_s(cost: ModelCost, prompt_len: int, step_tokens: int, bandwidth: float,
                  flops: float, num_prompts: int = 1) -> float:
    """Tokens/s of prefilling `num_prompts` prompts of `prompt_len` tokens, packed into
    steps of `step_tokens` tokens."""
    tokens = num_prompts * prompt_len
    steps = -(-tokens // step_tokens)
    total_bytes = steps * cost.weight_bytes + num_prompts * cost.chunk_kv_bytes(0, prompt_len)
    total_flops = num_prompts * cost.chunk_flops(0, prompt_len)
    return tokens / max(total_bytes / bandwidth, total_flops / flops)


def workload_shape(name: str) -> tuple[str, int]:
    """('pp'|'tg', N) of a llama.cpp-style workload name."""
    kind, n = name[:2], int(name[2:])
    if kind not in ("pp", "tg"):
        raise ValueError(f"calibration workload must be ppN or tgN, got {name!r}")
    return kind, n


def calibrated_efficiency(cal: CpuCalibration, config: EngineConfig) -> tuple[float, float]:
    """(decode, prefill) efficiency of a CPU measurement: measured tok/s over what the
    speed model predicts for that run at efficiency 1 on the measured roof."""
    spec = model_spec(cal.model)
    run_cfg = dataclasses.replace(config, model=cal.model, quantization=cal.quantization,
                                  kv_cache_dtype="auto", max_model_len=None, max_num_seqs=128,
                                  max_num_batched_tokens=None, quantization_group_size=None)
    mem = memory_estimate(spec, run_cfg, "cpu")
    cost = model_cost(spec, mem)
    _, n_dec = workload_shape(cal.decode_workload)
    _, n_pre = workload_shape(cal.prefill_workload)
    # tgN decodes positions 0..N-1: its mean step sees N/2 tokens of context
    ideal_dec = decode_tok_s(cost, 1, max(n_dec // 2, 1), cal.peak_bandwidth, math.inf)
    ideal_pre = prefill_tok_s(cost, n_pre, mem.step_tokens, math.inf, cal.peak_flops)
    return cal.decode_tok_s / ideal_dec, cal.prefill_tok_s / ideal_pre


def cpu_device(config: EngineConfig, method: str, data: dict[str, Any] | None = None
               ) -> Device:
    """This machine's CPU: its RAM, the roof and efficiencies of the stored measurement
    that matches it best."""
    from peregrine.bench.env import memory_gib
    from peregrine.bench.roofline import cpu_name
    threads = config.num_threads or os.cpu_count() or 1
    cal = pick_calibration(cpu_calibrations(data), cpu_name(), threads, method)
    ram = (memory_gib() or 0.0) * 2**30
    if cal is None:
        raise ValueError("devices.json has no CPU calibration: run `peregrine bench workloads` "
                         "and add it (docs/estimate.md)")
    dec, pre = calibrated_efficiency(cal, config)
    same = cal.cpu == cpu_name()
    note = "" if same else f" (measured on {cal.cpu}, not this CPU: {cpu_name()})"
    if cal.quantization != method:
        note += f" (measured with {cal.quantization} weights: none stored for {method})"
    if cal.threads != threads:
        note += f" (measured with {cal.threads} threads, not {threads})"
    return Device(name=f"CPU ({cpu_name()}, {threads} threads)", kind="cpu",
                  memory_bytes=ram, bandwidth=cal.peak_bandwidth, flops=cal.peak_flops,
                  decode_efficiency=dec, prefill_efficiency=pre,
                  runtime_overhead_bytes=cal.runtime_overhead_bytes,
                  load_overhead_bytes=cal.load_overhead_bytes,
                  source=f"RAM of this machine; roof {cal.peak_source}",
                  efficiency_source=(f"measured: `{cal.command}` ({cal.model}, "
                                     f"{cal.quantization}, {cal.threads} threads, "
                                     f"{' '.join(cal.isa)}) on {cal.date}: "
                                     f"{cal.prefill_workload} {cal.prefill_tok_s:.1f} tok/s, "
                                     f"{cal.decode_workload} {cal.decode_tok_s:.1f} tok/s"
                                     + note),
                  max_count=1)


# --- fitting ----------------------------------------------------------------------------

@dataclass
class DeviceEstimate:
    """One device kind: how many, whether the model fits, the largest batch and context,
    and the predicted speeds."""

    device: Device
    count: int
    fits: bool  # serving and loading both fit
    fits_serving: bool
    fits_load: bool
    per_device_bytes: float  # weights + KV + activations + overhead on each device
    kv_budget_bytes: float  # what is left to the KV pool on each device
    max_batch: int  # sequences of max_model_len whose KV fits
    max_context: int  # tokens per sequence at max_num_seqs sequences
    decode_tok_s: float
    prefill_tok_s: float
    decode_batch: int
    decode_context: int
    traffic: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = self.device
        return {"name": d.name, "kind": d.kind, "count": self.count, "fits": self.fits,
                "fits_serving": self.fits_serving, "fits_load": self.fits_load,
                "max_batch": self.max_batch, "max_context": self.max_context,
                "decode_tok_s": round(self.decode_tok_s, 2),
                "prefill_tok_s": round(self.prefill_tok_s, 2),
                "decode_batch": self.decode_batch, "decode_context": self.decode_context,
                "per_device_bytes": round(self.per_device_bytes),
                "kv_budget_bytes": round(self.kv_budget_bytes),
                "memory_bytes": round(d.memory_bytes), "bandwidth": d.bandwidth,
                "flops": d.flops, "decode_efficiency": round(d.decode_efficiency, 4),
                "prefill_efficiency": round(d.prefill_efficiency, 4), "source": d.source,
                "efficiency_source": d.efficiency_source, "traffic": self.traffic,
                "notes": self.notes}


def kv_share(cfg: ModelConfig, n: int) -> float:
    """Fraction of the KV cache one of n tensor-parallel devices holds (KV heads split,
    replicated when n exceeds them)."""
    return math.ceil(cfg.num_kv_heads / n) / cfg.num_kv_heads


def split_weights(w: WeightBytes, n: int) -> float:
    """Weight bytes per device of n: norms and the rotary table are replicated."""
    shared = w.norms_biases + w.rotary
    return (w.total - shared) / n + shared


def fit_device(spec: ModelSpec, config: EngineConfig, mem: MemoryEstimate, device: Device,
               n: int, opts: EstimateOptions) -> DeviceEstimate:
    """The estimate for `n` devices of one kind holding one replica."""
    m = spec.config
    max_len = config.max_model_len or m.max_position_embeddings
    share = kv_share(m, n)
    weights = split_weights(mem.weights, n)
    act = mem.activation_bytes / n
    overhead = device.runtime_overhead_bytes
    kv_needed = mem.kv_cache_bytes * share
    if device.kind == "cuda":
        budget = kv_budget_bytes(device.memory_bytes, weights + act, overhead,
                                 config.gpu_memory_utilization)
        # gpu_memory_utilization caps the KV budget, not what loading may touch
        load_ok = mem.load_peak_bytes / n + overhead <= device.memory_bytes
    else:
        budget = device.memory_bytes - overhead - weights - act - mem.file_bytes
        load_ok = mem.load_peak_bytes + device.load_overhead <= device.memory_bytes
    block_bytes = kv_pool_bytes(m, 1, config.block_size, mem.kv_cache_dtype,
                                getattr(torch, mem.dtype)) * share
    blocks = max(int(budget // block_bytes), 0)
    max_batch = blocks // mem.kv_blocks_per_sequence
    per_seq_blocks = blocks // config.max_num_seqs
    # a sequence never holds more than the model's context (nor, past it, the window's)
    max_context = min(per_seq_blocks * config.block_size, m.max_position_embeddings)
    if m.sliding_window is not None and per_seq_blocks >= blocks_per_sequence(
            m.max_position_embeddings, config.block_size, m.sliding_window):
        max_context = m.max_position_embeddings
    serving_ok = budget >= kv_needed
    cost = model_cost(spec, mem)
    bw = n * device.bandwidth * device.decode_efficiency
    fl = n * device.flops * device.prefill_efficiency
    prompt = opts.prompt_len or max(max_len // 2, 1)
    output = opts.output_len or max(max_len - prompt, 1)
    batch = max(min(config.max_num_seqs, max_batch), 1)
    context = min(prompt + output // 2, max_len)
    dec = decode_tok_s(cost, batch, context, bw, fl)
    pre = prefill_tok_s(cost, prompt, mem.step_tokens, bw, fl)
    notes = []
    if not load_ok:
        notes.append(f"loading needs {gib(mem.load_peak_bytes / n + overhead)} GiB per device: "
                     "the loader builds the float model before quantizing it")
    if n > 1:
        notes.append("tensor parallelism is a projection: the engine runs on one device")
    traffic = traffic_estimate(cost, opts, batch, max_len, mem.step_tokens, bw, fl) \
        if opts.request_rate else None
    return DeviceEstimate(device, n, serving_ok and load_ok, serving_ok, load_ok,
                          weights + act + overhead + kv_needed,
                          budget, max_batch, max_context, dec, pre, batch, context, traffic,
                          notes)


def traffic_estimate(cost: ModelCost, opts: EstimateOptions, max_batch: int, max_len: int,
                     step_tokens: int, bandwidth: float, flops: float) -> dict[str, Any]:
    """Concurrency and utilization under `request_rate` requests/s of the given lengths
    (Little's law: concurrency = rate x time in system, solved by fixed-point iteration)."""
    rate = opts.request_rate or 0.0
    prompt = opts.prompt_len or max(max_len // 2, 1)
    output = opts.output_len or max(max_len - prompt, 1)
    context = min(prompt + output // 2, max_len)
    pre = prefill_tok_s(cost, prompt, step_tokens, bandwidth, flops)
    concurrency = 1.0
    for _ in range(100):
        b = max(1, min(max_batch, math.ceil(concurrency)))
        step = b / decode_tok_s(cost, b, context, bandwidth, flops)
        latency = prompt / pre + output * step
        concurrency = rate * latency
    b = max(1, min(max_batch, math.ceil(concurrency)))
    capacity = decode_tok_s(cost, b, context, bandwidth, flops) / output
    utilization = rate * (prompt / pre + output / decode_tok_s(cost, b, context,
                                                               bandwidth, flops) * b) / b
    return {"request_rate": rate, "prompt_len": prompt, "output_len": output,
            "concurrency": round(concurrency, 2), "fits_batch": concurrency <= max_batch,
            "requests_per_s_capacity": round(capacity, 3),
            "keeps_up": concurrency <= max_batch and utilization < 1.0,
            "latency_s": round(latency, 3)}


def gib(x: float) -> str:
    return f"{x / 2**30:.1f}"


def estimate(config: EngineConfig, opts: EstimateOptions | None = None,
             data: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full estimate as a JSON-ready dict: the breakdown for `config.device` (auto: the
    GPU's) and one entry per device kind (the fewest devices that fit, or the given
    tensor-parallel size)."""
    opts = opts or EstimateOptions()
    opts.validate()
    config.validate()
    data = data or load_data()
    spec = model_spec(config.model)
    m = spec.config
    max_len = config.max_model_len or m.max_position_embeddings
    if max_len > m.max_position_embeddings:
        raise ValueError(f"max_model_len {max_len} exceeds the model's context of "
                         f"{m.max_position_embeddings} tokens")
    kinds = {"cuda": memory_estimate(spec, config, "cuda"),
             "cpu": memory_estimate(spec, config, "cpu")}
    main = kinds["cpu" if config.device == "cpu" else "cuda"]
    devices: list[DeviceEstimate] = []
    wanted = {d.lower() for d in opts.devices} if opts.devices else None
    table = gpu_devices(data)
    if wanted is None or any("cpu" in w for w in wanted):
        table.append(cpu_device(config, kinds["cpu"].quantization, data))
    if wanted is not None:
        table = [d for d in table if d.name.lower() in wanted
                 or (d.kind == "cpu" and any("cpu" in w for w in wanted))]
        if not table:
            raise ValueError(f"no device named {sorted(wanted)}; known: "
                             f"{[d.name for d in gpu_devices(data)] + ['CPU']}")
    for dev in table:
        mem = kinds[dev.kind]
        if opts.tensor_parallel_size is not None:
            counts = [opts.tensor_parallel_size]
        else:
            counts = [n for n in TP_SIZES if n <= dev.max_count and m.num_heads % n == 0]
        # the fewest devices whose serving memory fits; `fits` also asks that loading fits
        best = None
        for n in counts:
            best = fit_device(spec, config, mem, dev, n, opts)
            if best.fits_serving:
                break
        devices.append(best)
    if main.device_kind == "cuda":
        runtime = load_overhead = data["gpu_runtime_overhead_bytes"]
    else:
        cpu = cpu_device(config, main.quantization, data)
        runtime, load_overhead = cpu.runtime_overhead_bytes, cpu.load_overhead
    out = {"model": spec.name, "architecture": m.architecture,
           "params": m.num_params(), "max_model_len": max_len,
           "max_num_seqs": config.max_num_seqs, "block_size": config.block_size,
           "sliding_window": m.sliding_window,
           **main.to_dict(),
           "runtime_overhead_bytes": runtime,
           "total_bytes": main.serving_bytes + runtime,
           "peak_total_bytes": max(main.load_peak_bytes + load_overhead,
                                   main.serving_bytes + runtime),
           "devices": [d.to_dict() for d in devices],
           "breakdowns": {k: v.to_dict() for k, v in kinds.items()},
           "notes": ["GPU efficiencies are an assumption until a GPU run exists: "
                     + data["gpu_efficiency"]["source"]]}
    return out
