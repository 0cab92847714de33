"""GPU checks and measurements of the Triton path, one part per process (scripts/gpu_check.sh
runs them all under time limits and assembles the summary).

    python scripts/gpu_bench.py PART --work DIR [--dry-run]

Parts (each writes DIR/PART.json, row by row, so a part stopped by its time limit keeps
what it measured):

    kernel_tests  pytest of the Triton kernels, CUDA graphs and pool sizing on the device
    parity        greedy tokens, Triton vs torch attention backend, dummy Llama-3.2-1B bf16
    attention     paged decode vs SDPA on contiguous K/V, prefill vs SDPA causal (8B shapes)
    gemm          int8 / int4 / fp8 weight GEMMs vs bf16 at decode and prefill shapes
    decode        decode tok/s and MBU at batch 1/8/64/256 (CUDA graphs off and on) and
                  prefill MFU at 512/2048/8192 tokens, dummy Llama-3-8B bf16
    offline       nano-vllm's workload (256 requests, lengths uniform in 100-1024)
    offline_hf    transformers `generate` on a time-bounded subset of the same workload

    python scripts/gpu_bench.py summary --work DIR --out OUT [--dry-run]

reads the parts' files and the status file the shell script writes, and writes
OUT/summary.json and OUT/summary.md. `--dry-run` runs every part on the CPU at tiny sizes
(Triton's interpreter, tiny configs shrunk from the shipped ones, float32) so the GPU's
minutes are never spent on a typo. Times: median of timed runs after warm-up (CUDA events
on the GPU)."""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

STARTED = time.monotonic()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from peregrine.bench.roofline import DevicePeak, ModelCost, cpu_name, device_peak  # noqa: E402

# Exit status of a part that stopped itself at its time limit, keeping what it measured.
PARTIAL = 3

PARTS = ["kernel_tests", "attention", "gemm", "parity", "decode", "offline", "offline_hf"]

# The goals of issue 22: (summary key, what it is, target).
GOALS = [("decode_mbu_batch1", "decode MBU at batch 1, CUDA graphs, Llama-3-8B bf16", 0.8),
         ("prefill_mfu_2048", "prefill MFU at 2048 tokens, Llama-3-8B bf16", 0.6),
         ("offline_roofline_frac", "offline output tok/s over the workload's roofline", 0.6),
         ("offline_vs_transformers", "offline output tok/s over transformers generate", 5.0)]

# What the kernel_tests part runs: the Triton kernels' tests (bf16 included on a GPU) and
# CUDA graph replay, split across processes (compiling the kernels' many variants is most of
# their time, and it is single-threaded per process), then the profiled pool size alone (it
# measures the device's memory, other processes included). test_q8_decode.py tests C++ CPU
# kernels (building them would spend the GPU's minutes) and is left out.
KERNEL_TESTS = ("tests/kernels", "--ignore=tests/kernels/test_q8_decode.py",
                "tests/engine/test_cuda_graphs.py")
KERNEL_TESTS_ALONE = ("tests/engine/test_memory_profile.py",)
# Under the interpreter the dry run checks the plumbing on a few quick tests only.
DRY_KERNEL_TESTS = ("tests/kernels/test_triton_attention.py", "tests/engine/test_cuda_graphs.py",
                    "-k", "split_plan or quantized_write or ladder")
DRY_KERNEL_TESTS_ALONE = ("tests/engine/test_memory_profile.py", "-k", "budget")


@dataclass(frozen=True)
class Sizes:
    """Models, shapes and counts of every part: full on the GPU, tiny for the dry run."""

    big_model: str  # decode, prefill, offline
    small_model: str  # parity
    dtype: str
    kernel_tests: tuple[str, ...]  # pytest arguments, the tests split into kernel_shards
    kernel_tests_alone: tuple[str, ...]  # run afterwards in one process
    kernel_shards: int
    parity_prompts: int
    parity_stem: int  # tokens shared by every parity prompt (prefix-cache hits)
    parity_suffix: tuple[int, int]  # lengths of the prompts' own tails
    parity_tokens: int  # greedy tokens per prompt
    parity_budget: int  # step token budget: chunks every prompt longer than it
    decode_batches: tuple[int, ...]
    decode_prompt: int
    decode_steps: int
    prefill_tokens: tuple[int, ...]
    offline_requests: int
    offline_lens: tuple[int, int]
    hf_requests: int
    hf_batch: int
    attn_heads: tuple[int, int, int]  # query heads, kv heads, head dim
    attn_decode: tuple[tuple[int, int], ...]  # (batch, context)
    attn_prefill: tuple[int, ...]
    gemm_shapes: tuple[tuple[int, int], ...]  # (in features, out features)
    gemm_rows: tuple[int, ...]  # decode and prefill row counts
    iters: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def wider_dtype(self) -> str:
        """The dtype of the second parity run: one that rounds less than `dtype`."""
        return {"bfloat16": "float32", "float32": "float64"}[self.dtype]


FULL = Sizes(
    big_model="llama-3-8b", small_model="llama-3.2-1b", dtype="bfloat16",
    kernel_tests=KERNEL_TESTS, kernel_tests_alone=KERNEL_TESTS_ALONE, kernel_shards=6,
    parity_prompts=4, parity_stem=48,
    parity_suffix=(20, 400), parity_tokens=32, parity_budget=256,
    decode_batches=(1, 8, 64, 256), decode_prompt=512, decode_steps=64,
    prefill_tokens=(512, 2048, 8192), offline_requests=256, offline_lens=(100, 1024),
    hf_requests=64, hf_batch=64, attn_heads=(32, 8, 128),
    attn_decode=((1, 1024), (1, 8192), (8, 1024), (64, 1024), (256, 512), (256, 2048)),
    attn_prefill=(512, 2048, 8192), gemm_shapes=((4096, 14336), (14336, 4096)),
    gemm_rows=(1, 16, 2048), iters=30)

DRY = Sizes(
    big_model="llama-3-8b", small_model="llama-3.2-1b", dtype="float32",
    kernel_tests=DRY_KERNEL_TESTS, kernel_tests_alone=DRY_KERNEL_TESTS_ALONE, kernel_shards=2,
    parity_prompts=3, parity_stem=16,
    parity_suffix=(2, 14), parity_tokens=4, parity_budget=12,
    decode_batches=(1, 2), decode_prompt=8, decode_steps=3,
    prefill_tokens=(8, 24), offline_requests=3, offline_lens=(4, 12),
    hf_requests=2, hf_batch=2, attn_heads=(4, 2, 16),
    attn_decode=((1, 24), (2, 40)), attn_prefill=(16,), gemm_shapes=((64, 96),),
    gemm_rows=(1, 32), iters=2)

# The dry run's models: the shipped configs with every dimension shrunk (the same code paths).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=2048,
            bos_token_id=1, eos_token_id=2)


class Bench:
    """What every part shares: device, dtype, sizes, the roof and the part's output file."""

    def __init__(self, part: str, work: str, dry_run: bool, time_limit: float) -> None:
        self.part = part
        # Parts that can stop early (offline, offline_hf) stop here and keep what they have.
        self.deadline = STARTED + time_limit - 15
        self.work = work
        self.dry_run = dry_run
        self.sizes = DRY if dry_run else FULL
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.dtype = self.sizes.torch_dtype
        self.result: dict[str, Any] = {"meta": {
            "part": part, "device": device_name(self.device), "dry_run": dry_run,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
            "dtype": self.sizes.dtype}}
        os.makedirs(work, exist_ok=True)

    @functools.cached_property
    def peak(self) -> DevicePeak | None:
        """The device's roof (datasheet on a GPU, measured on the CPU); None if unknown."""
        try:
            return device_peak(self.device, self.dtype, torch.get_num_threads())
        except ValueError as e:
            print(f"no roofline: {e}", flush=True)
            return None

    def model(self, name: str) -> str:
        """A shipped config's name, or in the dry run a tiny copy of it (a directory)."""
        if not self.dry_run:
            return name
        from peregrine.models.registry import CONFIG_DIR
        path = os.path.join(self.work, "tiny", name)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(CONFIG_DIR, name, "config.json")) as f:
            cfg = {**json.load(f), **TINY}
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        return path

    def engine_args(self, **kwargs: Any) -> dict[str, Any]:
        """LLM(...) arguments: dummy weights in the part's dtype; on the CPU a small pool."""
        args: dict[str, Any] = dict(load_format="dummy", dtype=self.sizes.dtype,
                                    attention_backend="triton")
        if self.dry_run:
            args.update(device="cpu", num_kv_blocks=512)
        return {**args, **kwargs}

    def save(self, **fields: Any) -> None:
        """Merge `fields` into the part's result and write DIR/PART.json now."""
        self.result.update(fields)
        path = os.path.join(self.work, f"{self.part}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.result, f, indent=1)
        os.replace(path + ".tmp", path)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def release(self) -> None:
        """Free what deleted engines held before the next one sizes its pool."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            print(f"after release: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated",
                  flush=True)

    def median_seconds(self, fn: Callable[[], Any]) -> float:
        """Median seconds of `fn` after warm-up (CUDA events on a GPU)."""
        iters = self.sizes.iters
        for _ in range(max(1, iters // 6)):
            fn()
        self.sync()
        times = []
        for _ in range(iters):
            if self.device.type == "cuda":
                start, end = (torch.cuda.Event(enable_timing=True),
                              torch.cuda.Event(enable_timing=True))
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)


def device_name(device: torch.device) -> str:
    """torch's name of a CUDA device; the CPU's model name otherwise."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, None when either is missing or den is 0."""
    return num / den if num is not None and den else None


# --- kernel tests ---------------------------------------------------------------------------------
OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def count_outcomes(pytest_verbose_output: str) -> dict[str, Any]:
    """Per-outcome counts of `pytest -v` lines (complete even when pytest was killed midway)
    and the ids of what failed."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "xfailed": 0, "xpassed": 0}
    key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped",
           "XFAIL": "xfailed", "XPASS": "xpassed"}
    failures = []
    for line in pytest_verbose_output.splitlines():
        m = OUTCOME.match(line)
        if m:
            counts[key[m.group(2)]] += 1
            if m.group(2) in ("FAILED", "ERROR"):
                failures.append(m.group(1))
    return {**counts, "failures": failures}


# The kernel tests use none of these plugins; loading them costs seconds per process.
PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
          "-p", "no:schemathesis", "-p", "no:anyio"]


def collect_tests(args: tuple[str, ...]) -> list[str]:
    """The node ids pytest selects with `args`."""
    proc = subprocess.run([*PYTEST, "--collect-only", "-q", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    if proc.returncode != 0 or not ids:
        raise SystemExit(f"collecting the kernel tests failed:\n{proc.stdout[-3000:]}"
                         f"{proc.stderr[-3000:]}")
    return ids


def run_pytest_processes(arg_lists: list[list[str]], log_prefix: str, deadline: float
                         ) -> tuple[str, list[int | None]]:
    """Run one `pytest -v` per argument list, all at once; their output (complete, or up to
    where the deadline killed them) and return codes (None for killed)."""
    procs = []
    for i, args in enumerate(arg_lists):
        log = open(f"{log_prefix}.{i}.log", "w+")
        procs.append((subprocess.Popen([*PYTEST, "-v", *args], cwd=ROOT, stdout=log,
                                       stderr=subprocess.STDOUT, text=True), log))
    output, codes = "", []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes.append(None)
        log.seek(0)
        output += log.read()
        log.close()
    return output, codes


def part_kernel_tests(b: Bench, time_limit: float) -> None:
    """pytest of the kernel tests on this device, in kernel_shards processes at once, then
    the tests that must run alone; counts what passed and failed."""
    s = b.sizes
    t = time.perf_counter()
    deadline = STARTED + time_limit - 10
    ids = collect_tests(s.kernel_tests)
    shards = [ids[i::s.kernel_shards] for i in range(s.kernel_shards) if ids[i::s.kernel_shards]]
    prefix = os.path.join(b.work, "kernel_tests")
    output, codes = run_pytest_processes(shards, prefix, deadline)
    alone, alone_codes = run_pytest_processes([list(s.kernel_tests_alone)], prefix + "_alone",
                                              deadline)
    output += alone
    codes += alone_codes
    counts = count_outcomes(output)
    timed_out = None in codes
    # All of it when something failed: the log is all that comes back from the GPU machine.
    print(output if timed_out or any(codes) else output[-3000:], flush=True)
    b.save(kernel_tests={**counts, "returncodes": codes, "timed_out": timed_out,
                         "collected": len(ids), "seconds": time.perf_counter() - t,
                         "tests": [*s.kernel_tests, "then", *s.kernel_tests_alone]})
    if any(codes):
        raise SystemExit(f"kernel tests: return codes {codes}")
    if timed_out:
        print("kernel tests: stopped at the time limit", flush=True)
        sys.exit(PARTIAL)


# --- parity ---------------------------------------------------------------------------------------
def parity_prompts(s: Sizes, vocab: int, seed: int = 0) -> list[list[int]]:
    """Prompts sharing a stem (prefix-cache hits after the first), with tails of random
    length; the longer ones exceed the step budget, so they are prefilled in chunks."""
    rng = random.Random(seed)
    stem = [rng.randrange(vocab) for _ in range(s.parity_stem)]
    return [stem + [rng.randrange(vocab) for _ in range(rng.randint(*s.parity_suffix))]
            for _ in range(s.parity_prompts)]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where a and b differ (or where one ends); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def parity_run(b: Bench, dtype: str) -> dict[str, Any]:
    """Greedy tokens of the Triton backend (CUDA graphs on a GPU) against the torch backend
    on the same dummy weights in `dtype`, all prompts batched and each alone."""
    from peregrine import LLM, SamplingParams
    s = b.sizes
    model = b.model(s.small_model)
    sp = SamplingParams(temperature=0, max_tokens=s.parity_tokens, ignore_eos=True)
    tokens: dict[str, dict[str, list[list[int]]]] = {}
    hits = {}
    prompts: list[list[int]] = []
    for backend in ("torch", "triton"):
        llm = LLM(model, **b.engine_args(
            attention_backend=backend, dtype=dtype, max_model_len=2048, max_num_seqs=16,
            max_num_batched_tokens=s.parity_budget, enable_prefix_caching=True,
            enable_chunked_prefill=True, gpu_memory_utilization=0.4))
        prompts = parity_prompts(s, llm.engine.model_config.vocab_size)
        batch = [{"prompt_token_ids": p} for p in prompts]
        batched = [o.outputs[0].token_ids for o in llm.generate(batch, sp)]
        alone = [llm.generate(p, sp)[0].outputs[0].token_ids for p in batch]
        tokens[backend] = {"batched": batched, "alone": alone}
        hits[backend] = llm.engine.get_stats().prefix_cache_hits
        del llm
        b.release()
    cases = []
    for mode in ("batched", "alone"):
        for i, (ref, got) in enumerate(zip(tokens["torch"][mode], tokens["triton"][mode])):
            cases.append({"mode": mode, "prompt": i, "prompt_len": len(prompts[i]),
                          "identical": ref == got, "first_difference": first_difference(ref, got)})
    total = sum(len(t) for t in tokens["torch"]["batched"] + tokens["torch"]["alone"])
    same = sum(x == y for m in ("batched", "alone")
               for ref, got in zip(tokens["torch"][m], tokens["triton"][m])
               for x, y in zip(ref, got))
    return {"triton_vs_torch_identical": all(c["identical"] for c in cases),
            "matching_token_frac": same / total, "model": s.small_model, "dtype": dtype,
            "prefix_cache_hits": hits, "step_token_budget": s.parity_budget,
            "batch_invariant": {k: v["batched"] == v["alone"] for k, v in tokens.items()},
            "cases": cases}


def part_parity(b: Bench) -> None:
    """Parity in the part's dtype (the answer), then in a wider one: if bf16 tokens differ,
    identical float32 tokens say the difference is rounding, not a kernel bug."""
    result = parity_run(b, b.sizes.dtype)
    b.save(parity=result)
    result["wider_dtype"] = parity_run(b, b.sizes.wider_dtype)
    b.save(parity=result)
    print(json.dumps(result, indent=1), flush=True)


# --- attention kernels ----------------------------------------------------------------------------
def part_attention(b: Bench) -> None:
    """Paged decode against SDPA on contiguous K/V, and the prefill kernel against SDPA's
    causal attention, one layer call each."""
    from peregrine.kernels.triton.decode_attention import paged_decode_attention
    from peregrine.kernels.triton.prefill_attention import prefill_attention
    from peregrine.kernels.triton_attention import default_decode_tiles, default_prefill_tiles
    s, dev, dt, peak = b.sizes, b.device, b.dtype, b.peak
    hq, hkv, d = s.attn_heads
    bs, scale, size = 16, d ** -0.5, torch.tensor([], dtype=dt).element_size()
    rows: list[dict[str, Any]] = []
    for batch, ctx in s.attn_decode:
        nblocks = -(-ctx // bs)
        pool = batch * nblocks
        k_cache = torch.randn(pool, bs, hkv, d, device=dev, dtype=dt)
        v_cache = torch.randn_like(k_cache)
        tables = torch.randperm(pool, device=dev).view(batch, nblocks).int()
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        q = torch.randn(batch, hq, d, device=dev, dtype=dt)
        out = torch.empty_like(q)
        tiles = default_decode_tiles(dev)
        t_ours = b.median_seconds(lambda: paged_decode_attention(
            q, k_cache, v_cache, None, None, tables, seq_lens, out, scale, None, ctx, tiles))
        k = torch.randn(batch, hkv, ctx, d, device=dev, dtype=dt)
        v = torch.randn_like(k)
        q4 = q.view(batch, hq, 1, d)
        t_sdpa = b.median_seconds(lambda: F.scaled_dot_product_attention(
            q4, k, v, scale=scale, enable_gqa=True))
        kv_bytes = 2 * batch * ctx * hkv * d * size
        rows.append({"kernel": "decode", "batch": batch, "context": ctx, "ours_us": t_ours * 1e6,
                     "sdpa_us": t_sdpa * 1e6, "sdpa_over_ours": t_sdpa / t_ours,
                     "ours_gb_s": kv_bytes / t_ours / 1e9,
                     "ours_mbu": kv_bytes / t_ours / peak.bandwidth if peak else None})
        b.save(rows=rows)
        del k_cache, v_cache, k, v
    for length in s.attn_prefill:
        q = torch.randn(length, hq, d, device=dev, dtype=dt)
        k = torch.randn(length, hkv, d, device=dev, dtype=dt)
        v = torch.randn_like(k)
        out = torch.empty_like(q)
        qsl = torch.tensor([0, length], dtype=torch.int32, device=dev)
        lens = torch.tensor([length], dtype=torch.int32, device=dev)
        tiles = default_prefill_tiles(dev)
        t_ours = b.median_seconds(lambda: prefill_attention(
            q, k, v, None, None, None, None, None, qsl, lens, out, 0, 1, length, scale, None,
            tiles))
        qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        t_sdpa = b.median_seconds(lambda: F.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True))
        flops = 4 * hq * d * length * (length + 1) / 2
        rows.append({"kernel": "prefill", "batch": 1, "context": length,
                     "ours_us": t_ours * 1e6, "sdpa_us": t_sdpa * 1e6,
                     "sdpa_over_ours": t_sdpa / t_ours, "ours_tflop_s": flops / t_ours / 1e12,
                     "ours_mfu": flops / t_ours / peak.flops if peak else None})
        b.save(rows=rows)
    print_table("attention", rows)


# --- quantized GEMMs ------------------------------------------------------------------------------
def quant_layer_fn(layer: torch.nn.Module, x: torch.Tensor) -> tuple[Callable[[], Any], str]:
    """The call to time for a quantized linear on x's device and what it runs: the layer's
    own forward on a GPU; on the CPU (dry run) the Triton kernel under the interpreter, or
    the torch reference for fp8 (torch._scaled_mm needs a GPU)."""
    if x.is_cuda:
        return (lambda: layer(x)), "layer forward (CUDA)"
    if layer.method == "fp8":
        return (lambda: layer.forward_reference(x)), "torch reference (dry run)"
    from peregrine.kernels.triton_quant import quant_matmul
    return (lambda: quant_matmul(x, layer)), "Triton dequant-GEMM (interpreter)"


def part_gemm(b: Bench) -> None:
    """int8 (per channel), int4 (groups of 128) and fp8 (per channel) weight GEMMs against
    the float GEMM, time and max error against the layer's torch reference."""
    from peregrine.layers.linear import FP8Linear, Int4Linear, Int8Linear
    s, dev, dt = b.sizes, b.device, b.dtype
    gen = torch.Generator(device=dev).manual_seed(0)
    rows: list[dict[str, Any]] = []
    for k, n in s.gemm_shapes:
        w = torch.randn(n, k, device=dev, dtype=dt, generator=gen) * 0.02
        group = 128 if k % 128 == 0 else 32
        layers = {"int8": Int8Linear.from_float(w.float()),
                  "int4": Int4Linear.from_float(w.float(), None, group),
                  "fp8": FP8Linear.from_float(w.float())}
        for m in s.gemm_rows:
            x = torch.randn(m, k, device=dev, dtype=dt, generator=gen)
            t_dense = b.median_seconds(lambda: F.linear(x, w))
            dense_bytes = w.numel() * w.element_size()
            for name, layer in layers.items():
                row: dict[str, Any] = {"format": name, "rows": m, "in": k, "out": n}
                fn, row["path"] = quant_layer_fn(layer, x)
                try:  # one format failing on this GPU must not hide the others' numbers
                    t = b.median_seconds(fn)
                    ref = layer.forward_reference(x.float())
                    err = (fn().float() - ref).abs().max().item() / ref.abs().max().item()
                except Exception as e:  # noqa: BLE001
                    rows.append({**row, "error": f"{type(e).__name__}: {e}"[:300]})
                    b.save(rows=rows)
                    continue
                rows.append({**row, "us": t * 1e6, "dense_us": t_dense * 1e6,
                             "speedup": t_dense / t, "weight_gb_s": layer.weight_bytes() / t / 1e9,
                             "dense_weight_gb_s": dense_bytes / t_dense / 1e9,
                             "max_rel_error": err})
                b.save(rows=rows)
        del w, layers
        b.release()
    print_table("gemm", rows)


# --- engine decode and prefill --------------------------------------------------------------------
def random_prompt(rng: random.Random, vocab: int, n: int) -> list[int]:
    """n random token ids."""
    return [rng.randrange(vocab) for _ in range(n)]


def part_decode(b: Bench) -> None:
    """Steady-state decode tok/s and MBU of the engine at each batch size, CUDA graphs off
    then on; prefill MFU of one prompt per length (eager engine, one step each)."""
    from peregrine import LLM, SamplingParams
    from peregrine.bench.phases import EngineStepTimer
    from peregrine.bench.throughput import engine_cost
    s, peak = b.sizes, b.peak
    decode: list[dict[str, Any]] = []
    prefill: list[dict[str, Any]] = []
    max_len = max(s.decode_prompt + s.decode_steps + 64, max(s.prefill_tokens) + 16)
    for graphs in (False, True):
        t0 = time.perf_counter()
        llm = LLM(b.model(s.big_model), **b.engine_args(
            enforce_eager=not graphs, max_num_seqs=max(s.decode_batches), max_model_len=max_len,
            max_num_batched_tokens=max(s.prefill_tokens)))
        init_s = time.perf_counter() - t0
        engine = llm.engine
        cost = engine_cost(engine)
        vocab = engine.model_config.vocab_size
        rng = random.Random(0)
        for batch in s.decode_batches:
            sp = SamplingParams(temperature=0, max_tokens=s.decode_steps + 8, ignore_eos=True)
            ids = [f"{batch}-{i}" for i in range(batch)]
            for rid in ids:
                engine.add_request(rid, {"prompt_token_ids": random_prompt(
                    rng, vocab, s.decode_prompt)}, sp)
            while engine.scheduler.waiting or any(q.is_prefilling
                                                  for q in engine.scheduler.running):
                engine.step()
            for _ in range(3):  # warm-up decode steps
                engine.step()
            timer = EngineStepTimer(engine, cost)
            for _ in range(s.decode_steps):
                timer.step()
            timer.close()
            d = timer.phases.decode
            decode.append({"batch": batch, "cuda_graphs": engine.runner.graphs is not None,
                           "tok_s": d.tokens / d.seconds, "step_ms": d.seconds / d.steps * 1e3,
                           "mbu": d.bytes / d.seconds / peak.bandwidth if peak else None,
                           "engine_init_s": init_s})
            for rid in ids:
                engine.abort_request(rid)
            b.save(decode=decode, prefill=prefill)
        if not graphs:
            for n in s.prefill_tokens:
                prefill.append(prefill_row(b, engine, cost, n, rng))
                b.save(decode=decode, prefill=prefill)
        # Every reference to the engine goes before the next one measures free memory.
        del llm, engine, timer
        b.release()
    print_table("decode", decode)
    print_table("prefill", prefill)


def prefill_row(b: Bench, engine: Any, cost: ModelCost, n: int, rng: random.Random
                ) -> dict[str, Any]:
    """Median seconds of one step prefilling a fresh n-token prompt (first token sampled)."""
    from peregrine import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    times = []
    for i in range(4):  # the first is a warm-up (kernel compilation for new shapes)
        engine.add_request(f"prefill-{n}-{i}", {"prompt_token_ids": random_prompt(rng, vocab, n)},
                           sp)
        b.sync()
        t = time.perf_counter()
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        b.sync()
        if i:
            times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    flops = cost.chunk_flops(0, n)
    peak = b.peak
    return {"tokens": n, "ms": seconds * 1e3, "steps": steps, "tok_s": n / seconds,
            "tflop_s": flops / seconds / 1e12,
            "mfu": flops / seconds / peak.flops if peak else None}


# --- offline throughput ---------------------------------------------------------------------------
def nano_vllm_workload(n: int, lens: tuple[int, int], vocab: int, seed: int = 0
                       ) -> tuple[list[list[int]], list[int]]:
    """n requests of random tokens; prompt and output lengths uniform in `lens`."""
    rng = random.Random(seed)
    prompts = [random_prompt(rng, vocab, rng.randint(*lens)) for _ in range(n)]
    outputs = [rng.randint(*lens) for _ in range(n)]
    return prompts, outputs


def workload_roofline_seconds(cost: ModelCost, prompt_lens: list[int], output_lens: list[int],
                              max_num_seqs: int, peak: DevicePeak) -> float:
    """A lower bound on any engine's time for the workload on this roof: all its FLOPs at
    peak FLOP/s, or all its bytes at peak bandwidth, whichever is longer. Bytes: the KV
    cache each token reads and writes, plus the weights once per forward pass, of which
    there are at least max(longest output, outputs / max_num_seqs) (a request's tokens
    come one pass at a time, a pass serves at most max_num_seqs requests)."""
    flops = kv = 0.0
    for p, o in zip(prompt_lens, output_lens):
        flops += cost.chunk_flops(0, p)  # the prompt, sampling the first output token
        kv += cost.chunk_kv_bytes(0, p)
        for pos in range(p, p + o - 1):  # each later output token is one decode
            flops += cost.chunk_flops(pos, 1)
            kv += cost.chunk_kv_bytes(pos, 1)
    passes = max(max(output_lens), math.ceil(sum(output_lens) / max_num_seqs))
    return max(flops / peak.flops, (passes * cost.weight_bytes + kv) / peak.bandwidth)


def step_roofline_seconds(step_log: list[tuple[float, Any]], cost: ModelCost,
                          peak: DevicePeak) -> float:
    """The time the forward passes an engine ran would take at the roof, each bounded by
    the larger of its FLOPs at peak and its bytes (weights + KV) at peak bandwidth."""
    total = 0.0
    for _, w in step_log:
        flops = w.prefill_flops + w.decode_flops
        nbytes = cost.weight_bytes + w.prefill_kv_bytes + w.decode_kv_bytes
        total += max(flops / peak.flops, nbytes / peak.bandwidth)
    return total


def part_offline(b: Bench) -> None:
    """The whole workload queued at once, greedy, ignore_eos; output tok/s against the
    workload's roofline. Near the part's time limit it stops and reports what it produced
    (`completed` false, no workload roofline)."""
    from peregrine import LLM
    from peregrine.bench.phases import EngineStepTimer
    from peregrine.bench.throughput import bench_params, engine_cost, warm_up
    s, peak = b.sizes, b.peak
    max_seqs = s.offline_requests
    llm = LLM(b.model(s.big_model), **b.engine_args(
        max_num_seqs=max_seqs, max_model_len=2 * s.offline_lens[1] + 16))
    engine = llm.engine
    cost = engine_cost(engine)
    prompts, outs = nano_vllm_workload(s.offline_requests, s.offline_lens,
                                       engine.model_config.vocab_size)
    warm_up(engine)
    timer = EngineStepTimer(engine, cost)
    before = engine.generation_tokens_total
    b.sync()
    t = time.perf_counter()
    for p, o in zip(prompts, outs):
        engine.add_request(None, {"prompt_token_ids": p}, bench_params(o))
    while engine.has_unfinished_requests() and time.monotonic() < b.deadline:
        timer.step()
    b.sync()
    wall = time.perf_counter() - t
    timer.close()
    completed = not engine.has_unfinished_requests()
    produced = engine.generation_tokens_total - before
    bound = (workload_roofline_seconds(cost, list(map(len, prompts)), outs, max_seqs, peak)
             if peak and completed else None)
    result = {"requests": len(prompts), "model": s.big_model, "completed": completed,
              "output_tokens": produced, "requested_output_tokens": sum(outs),
              "prompt_tokens": sum(map(len, prompts)), "wall_s": wall,
              "output_tok_s": produced / wall, "roofline_s": bound,
              "roofline_frac": ratio(bound, wall),
              "steps_roofline_frac": ratio(step_roofline_seconds(timer.step_log, cost, peak),
                                           wall) if peak else None,
              "max_num_seqs": max_seqs, "preemptions": engine.get_stats().num_preemptions,
              "phases": timer.phases.summary(peak) if peak else None}
    b.save(offline=result)
    print(json.dumps({k: v for k, v in result.items() if k != "phases"}, indent=1), flush=True)
    if not completed:
        print("offline: stopped at the time limit before the workload finished", flush=True)
        sys.exit(PARTIAL)


def part_offline_hf(b: Bench) -> None:
    """transformers generate on the same config with random weights (sdpa attention), on
    the workload's first hf_requests requests in batches of hf_batch, each batch left-padded
    and decoding until its longest requested output (greedy); only requested tokens count.
    Near the part's time limit generate stops (its max_time) and what came out counts."""
    import transformers
    from peregrine.models.registry import CONFIG_DIR
    s, dev = b.sizes, b.device
    model_dir = b.model(s.big_model) if b.dry_run else os.path.join(CONFIG_DIR, s.big_model)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    with dev:
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=b.dtype, attn_implementation="sdpa").eval()
    prompts, outs = nano_vllm_workload(s.offline_requests, s.offline_lens, config.vocab_size)
    prompts, outs = prompts[:s.hf_requests], outs[:s.hf_requests]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i:i + s.hf_batch] for i in range(0, len(order), s.hf_batch)]

    def generate(idx: list[int], new_tokens: int, max_time: float | None = None) -> int:
        """Left-padded batch generate; the requested tokens it produced."""
        width = max(len(prompts[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long, device=dev)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                 max_time=max_time)
        made = out.shape[1] - width
        return sum(min(outs[i], made) for i in idx)

    generate(batches[0][:2], 4)  # warm-up
    b.sync()
    t = time.perf_counter()
    useful = 0
    for idx in batches:
        left = b.deadline - time.monotonic()
        if left <= 0:
            break
        useful += generate(idx, max(outs[i] for i in idx), max_time=left)
    b.sync()
    wall = time.perf_counter() - t
    completed = useful == sum(outs)
    b.save(offline_hf={"transformers": transformers.__version__, "requests": len(prompts),
                       "of_requests": s.offline_requests, "batch": s.hf_batch,
                       "completed": completed, "output_tokens": useful,
                       "requested_output_tokens": sum(outs), "wall_s": wall,
                       "output_tok_s": useful / wall})
    print(json.dumps(b.result["offline_hf"], indent=1), flush=True)
    if not completed:
        sys.exit(PARTIAL)


# --- summary --------------------------------------------------------------------------------------
def read_statuses(path: str) -> dict[str, dict[str, Any]]:
    """The shell script's status file (see read_statuses_lines); {} if there is none."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return read_statuses_lines(f.read().splitlines())


def read_statuses_lines(lines: list[str]) -> dict[str, dict[str, Any]]:
    """Part statuses from lines `part returncode seconds limit`: returncode 124 or 137 is a
    timeout (TERM, then KILL), PARTIAL a part that stopped itself at its limit, `skip` a
    part not started for lack of time."""
    statuses: dict[str, dict[str, Any]] = {}
    for line in lines:
        part, rc, seconds, limit = line.split()
        if rc == "skip":
            status = "skipped (no time left)"
        else:
            status = {"0": "ok", "124": "timeout", "137": "timeout",
                      str(PARTIAL): "partial (stopped at its time limit)"
                      }.get(rc, f"failed (rc {rc})")
        statuses[part] = {"status": status, "seconds": float(seconds), "limit_s": float(limit)}
    return statuses


def build_summary(parts: dict[str, dict[str, Any]], statuses: dict[str, dict[str, Any]],
                  env: dict[str, Any]) -> dict[str, Any]:
    """summary.json from the parts' results (a missing part gives None fields, never
    numbers from anywhere else), the statuses of the runs that made them, and `env`
    (dry_run, device, date, versions)."""
    def part(name: str) -> dict[str, Any]:
        return parts.get(name) or {}

    kt = part("kernel_tests").get("kernel_tests")
    parity = part("parity").get("parity")
    decode = [{k: r[k] for k in ("batch", "tok_s", "mbu", "cuda_graphs", "step_ms")}
              for r in part("decode").get("decode", [])]
    prefill = [{k: r[k] for k in ("tokens", "mfu", "tok_s", "ms")}
               for r in part("decode").get("prefill", [])]
    off, hf = part("offline").get("offline"), part("offline_hf").get("offline_hf")
    ours = off["output_tok_s"] if off else None
    theirs = hf["output_tok_s"] if hf else None
    offline = {"output_tok_s": ours, "roofline_frac": off["roofline_frac"] if off else None,
               "transformers_output_tok_s": theirs,
               "vs_transformers": ratio(ours, theirs), "peregrine": off, "transformers": hf}
    b1 = [r["mbu"] for r in decode if r["batch"] == 1 and r["cuda_graphs"]]
    p2048 = [r["mfu"] for r in prefill if r["tokens"] == 2048]
    values = {"decode_mbu_batch1": b1[0] if b1 else None,
              "prefill_mfu_2048": p2048[0] if p2048 else None,
              "offline_roofline_frac": offline["roofline_frac"],
              "offline_vs_transformers": offline["vs_transformers"]}
    goals = {key: {"goal": text, "target": target, "value": values[key],
                   "met": None if values[key] is None else values[key] >= target}
             for key, text, target in GOALS}
    return {
        **env,
        "kernel_tests": ({"passed": kt["passed"], "failed": kt["failed"] + kt["errors"],
                          "skipped": kt["skipped"], "timed_out": kt["timed_out"],
                          "failures": kt["failures"]} if kt else
                         {"passed": None, "failed": None}),
        "parity": parity or {"triton_vs_torch_identical": None},
        "decode": decode, "prefill": prefill, "offline": offline,
        "attention": part("attention").get("rows", []), "gemm": part("gemm").get("rows", []),
        "goals": goals,
        "parts": {name: statuses.get(name, {"status": "not run"}) for name in PARTS},
    }


def triton_version() -> str | None:
    """triton's version, None where it is not installed."""
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def fmt(v: Any) -> str:
    """A table cell: 4 significant digits for floats, `-` for None."""
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table with a column for every key of any row, in first-seen order."""
    if not rows:
        return "(no rows)\n"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"## {title}\n\n{table(rows)}", flush=True)


def summary_markdown(s: dict[str, Any]) -> str:
    """The summary as markdown: goals, part statuses, then every table."""
    kt, off, parity = s["kernel_tests"], s["offline"], s["parity"]
    wider, hf = parity.get("wider_dtype"), off["transformers"]
    head = "DRY RUN (CPU, tiny sizes; not a measurement) — " if s["dry_run"] else ""
    out = [f"# GPU check — {head}{s['device']} ({s['date']})", "",
           f"torch {s['torch']}, triton {s['triton']}", "", "## Goals", "",
           table([{"goal": g["goal"], "target": g["target"], "value": g["value"],
                   "met": g["met"]} for g in s["goals"].values()]),
           "## Parts", "",
           table([{"part": k, **v} for k, v in s["parts"].items()]),
           f"kernel tests: {kt['passed']} passed, {kt['failed']} failed", "",
           f"parity (Triton vs torch greedy tokens identical): "
           f"{parity['triton_vs_torch_identical']}" + (
               f" in {parity['dtype']}; in {wider['dtype']}: "
               f"{wider['triton_vs_torch_identical']}" if wider else ""), "",
           f"offline: {fmt(off['output_tok_s'])} output tok/s, {fmt(off['roofline_frac'])} of "
           f"roofline; transformers {fmt(off['transformers_output_tok_s'])} tok/s" + (
               f" on {hf['requests']} of {hf['of_requests']} requests, batch {hf['batch']}"
               if hf else "") + f" (ratio {fmt(off['vs_transformers'])})", ""]
    for name in ("decode", "prefill", "attention", "gemm"):
        out += [f"## {name}", "", table(s[name])]
    return "\n".join(out)


def write_summary(work: str, out: str, dry_run: bool, name: str = "summary") -> dict[str, Any]:
    """Assemble OUT/<name>.json and .md from the parts' files in WORK; print the markdown."""
    parts = {}
    for p in PARTS:
        path = os.path.join(work, f"{p}.json")
        if os.path.exists(path):
            with open(path) as f:
                parts[p] = json.load(f)
    device = torch.device("cpu" if dry_run or not torch.cuda.is_available() else "cuda")
    env = {"dry_run": dry_run, "device": device_name(device),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
           "triton": triton_version()}
    summary = build_summary(parts, read_statuses(os.path.join(work, "status.tsv")), env)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    text = summary_markdown(summary)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text)
    print(text, flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=PARTS + ["summary"])
    ap.add_argument("--work", required=True, help="folder of the parts' result files")
    ap.add_argument("--out", help="summary: folder of summary.json / summary.md")
    ap.add_argument("--name", default="summary", help="summary: file name without suffix")
    ap.add_argument("--time-limit", type=float, default=600.0,
                    help="the part's time limit in seconds (the slow parts stop before it)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, interpreter")
    args = ap.parse_args(argv)
    if args.part == "summary":
        write_summary(args.work, args.out or args.work, args.dry_run, args.name)
        return
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_bench needs a CUDA device (or --dry-run)")
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--dry-run needs TRITON_INTERPRET=1 in the environment")
    b = Bench(args.part, args.work, args.dry_run, args.time_limit)
    if args.part == "kernel_tests":
        part_kernel_tests(b, args.time_limit)
    else:
        {"parity": part_parity, "attention": part_attention, "gemm": part_gemm,
         "decode": part_decode, "offline": part_offline,
         "offline_hf": part_offline_hf}[args.part](b)


if __name__ == "__main__":
    main()
