"""Fixed workloads as llama.cpp's own benchmarks define them, run on peregrine and on
llama.cpp's binaries alike, so the two print side by side:

- `ppN`: prefill of one N-token prompt (`llama-bench -p N -n 0`): tokens/s = N / time,
  where time runs from the request to its logits (peregrine: from queueing the request to
  its first token).
- `tgN`: one stream decoding N tokens from an empty context (`llama-bench -p 0 -n N`):
  N forward passes of one token at positions 0..N-1; tokens/s = N / time (peregrine: a
  one-token prompt and N output tokens, from queueing to the last).
- `batchSxPxG`: S sequences with P-token prompts of random tokens (not shared), G new
  tokens each, all at once (`llama-batched-bench -npl S -npp P -ntg G`): generated
  tokens/s = S x G / the wall time of prefill and decode together. llama-batched-bench
  prefills all prompts in one batch and then runs G decode passes (the token the prefill
  could sample is not counted); peregrine schedules them as `bench throughput` does (the
  prefill samples the first token, then G - 1 decode passes).

ppN and tgN are repeated (`--repetitions`, llama-bench's -r, default 5): tokens/s is the
mean over repetitions, with its standard deviation, as llama-bench reports. MFU and MBU use
the roofline conventions of `peregrine/bench/roofline.py`, each engine at the bytes per
weight it stores (GGUF blocks as stored for llama.cpp)."""

from __future__ import annotations

import dataclasses
import gc
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from peregrine.bench.datasets import BenchRequest
from peregrine.bench.phases import PhaseAccounting, StepWork
from peregrine.bench.roofline import DevicePeak, ModelCost

DEFAULT_WORKLOADS = ("pp512", "tg128", "batch32x64x128")
_PATTERNS = {"pp": re.compile(r"pp(\d+)$"), "tg": re.compile(r"tg(\d+)$"),
             "batch": re.compile(r"batch(\d+)x(\d+)x(\d+)$")}


@dataclass(frozen=True)
class Workload:
    """One fixed workload: `kind` pp, tg or batch."""

    kind: str
    n_prompt: int = 0
    n_gen: int = 0
    n_seqs: int = 1

    @property
    def name(self) -> str:
        if self.kind == "pp":
            return f"pp{self.n_prompt}"
        if self.kind == "tg":
            return f"tg{self.n_gen}"
        return f"batch{self.n_seqs}x{self.n_prompt}x{self.n_gen}"

    def describe(self) -> str:
        if self.kind == "pp":
            return f"prefill, {self.n_prompt} tokens"
        if self.kind == "tg":
            return f"one stream decode, {self.n_gen} tokens"
        return (f"{self.n_seqs} sequences, {self.n_prompt}-token prompts, {self.n_gen} new "
                "tokens: generated tok/s over the whole wall time")

    @property
    def tokens(self) -> int:
        """The tokens tokens/s counts per run."""
        return {"pp": self.n_prompt, "tg": self.n_gen}.get(self.kind, self.n_seqs * self.n_gen)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self), "description": self.describe()}


def parse_workloads(names: list[str] | str) -> list[Workload]:
    """'pp512,tg128,batch32x64x128' (or a list of those names) -> Workloads."""
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    out = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        for kind, pattern in _PATTERNS.items():
            if m := pattern.match(name):
                nums = [int(g) for g in m.groups()]
                if min(nums) < 1:
                    raise ValueError(f"workload {name!r}: every size must be >= 1")
                if kind == "pp":
                    out.append(Workload("pp", n_prompt=nums[0]))
                elif kind == "tg":
                    out.append(Workload("tg", n_gen=nums[0]))
                else:
                    out.append(Workload("batch", n_seqs=nums[0], n_prompt=nums[1],
                                        n_gen=nums[2]))
                break
        else:
            raise ValueError(f"unknown workload {name!r}: use ppN (prefill of N tokens), tgN "
                             "(one stream decoding N tokens) or batchSxPxG (S sequences, "
                             "P-token prompts, G new tokens)")
    if not out:
        raise ValueError("no workload given")
    return out


# --- the work each run does, for MFU/MBU --------------------------------------------------
def pp_phases(cost: ModelCost, n: int, samples_s: list[float]) -> PhaseAccounting:
    """One prefill pass of n tokens per repetition."""
    phases = PhaseAccounting(cost.weight_bytes)
    for s in samples_s:
        work = StepWork()
        work.add_prefill(cost, 0, n)
        phases.add(s, work)
    return phases


def tg_phases(cost: ModelCost, n: int, samples_s: list[float]) -> PhaseAccounting:
    """n one-token passes at positions 0..n-1 per repetition (the time split evenly)."""
    phases = PhaseAccounting(cost.weight_bytes)
    for s in samples_s:
        for p in range(n):
            work = StepWork()
            work.add_decode(cost, p)
            phases.add(s / n, work)
    return phases


def batch_phases(cost: ModelCost, w: Workload, t_prefill: float, t_decode: float
                 ) -> PhaseAccounting:
    """llama-batched-bench's passes: every prompt in one prefill pass, then n_gen passes
    that each decode one token of every sequence (the decode time split evenly)."""
    phases = PhaseAccounting(cost.weight_bytes)
    work = StepWork()
    for _ in range(w.n_seqs):
        work.add_prefill(cost, 0, w.n_prompt)
    phases.add(t_prefill, work)
    for k in range(w.n_gen):
        work = StepWork()
        for _ in range(w.n_seqs):
            work.add_decode(cost, w.n_prompt + k)
        phases.add(t_decode / w.n_gen, work)
    return phases


def workload_run(*, engine: str, label: str, workload: Workload, samples_s: list[float],
                 prefill: dict[str, Any], decode: dict[str, Any], peak: DevicePeak,
                 cost: ModelCost, settings: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One engine on one workload: tokens/s (mean and stddev over repetitions), and MFU/MBU
    over all the work of every repetition. `prefill`/`decode` are PhaseTotals summaries."""
    rates = [workload.tokens / s for s in samples_s]
    total_s = sum(samples_s)
    flops = sum(p["tflops_per_s"] * 1e12 * p["seconds"] for p in (prefill, decode))
    nbytes = sum(p["gbytes_per_s"] * 1e9 * p["seconds"] for p in (prefill, decode))
    return {"engine": engine, "label": label, "workload": workload.name,
            "workload_kind": workload.kind, "description": workload.describe(),
            "tokens": workload.tokens, "repetitions": len(samples_s),
            "samples_s": samples_s, "seconds": total_s / len(samples_s),
            "tokens_per_s": statistics.fmean(rates),
            "tokens_per_s_stddev": statistics.stdev(rates) if len(rates) > 1 else 0.0,
            "mfu": flops / total_s / peak.flops if total_s > 0 else 0.0,
            "mbu": nbytes / total_s / peak.bandwidth if total_s > 0 else 0.0,
            "prefill": prefill, "decode": decode, "settings": settings,
            "cost_model": {"weight_bytes_per_forward": cost.weight_bytes,
                           "kv_bytes_per_token": cost.kv_bytes_per_token},
            **extra}


def _phase_runs(phases: PhaseAccounting, peak: DevicePeak) -> dict[str, Any]:
    s = phases.summary(peak)
    return {"prefill": s["prefill"], "decode": s["decode"]}


# --- peregrine ----------------------------------------------------------------------------
def run_peregrine_workloads(workloads: list[Workload], config: Any, peak: DevicePeak,
                            repetitions: int = 5, seed: int = 0, warmup: bool = True
                            ) -> list[dict[str, Any]]:
    """Every workload on our engine, one model load for all of them: ppN and tgN as
    single requests on one engine (each repetition a fresh request), batchSxPxG as
    `bench throughput` runs a workload (a fresh engine, every request queued at once)."""
    from peregrine.bench.throughput import (bench_params, engine_cost, load_for,
                                            run_peregrine, warm_up)
    from peregrine.engine.llm_engine import LLMEngine
    if repetitions < 1:
        raise ValueError(f"repetitions must be >= 1, got {repetitions}")
    loaded = load_for(config)
    rng = random.Random(seed)
    settings = {"batching": config.batching, "max_num_seqs": config.max_num_seqs,
                "max_num_batched_tokens": config.token_budget,
                "dtype": str(config.torch_dtype).removeprefix("torch."),
                "quantization": config.quantization,
                "device": str(config.torch_device), "threads": config.num_threads,
                "load_format": loaded.source.format, "model": loaded.source.name}
    label = "peregrine" + ("" if config.quantization in ("none", "auto")  # the defaults
                           else f" ({config.quantization})")
    runs: list[dict[str, Any]] = []
    single = [w for w in workloads if w.kind != "batch"]
    if single:
        engine = LLMEngine(config, loaded=loaded)
        vocab = engine.model_config.vocab_size
        cost = engine_cost(engine)
        if warmup:
            warm_up(engine)

        def one(prompt_len: int, output_len: int) -> float:
            ids = _random_ids(rng, prompt_len, vocab)
            t0 = time.perf_counter()
            engine.add_request(None, {"prompt_token_ids": ids}, bench_params(output_len))
            while engine.has_unfinished_requests():
                engine.step()
            return time.perf_counter() - t0

        for w in single:
            shape = (w.n_prompt, 1) if w.kind == "pp" else (1, w.n_gen)
            if warmup:  # as llama-bench: the whole prompt, or a few decoded tokens
                one(shape[0], 1) if w.kind == "pp" else one(1, min(4, w.n_gen))
            samples = [one(*shape) for _ in range(repetitions)]
            phases = (pp_phases(cost, w.n_prompt, samples) if w.kind == "pp"
                      else tg_phases(cost, w.n_gen, samples))
            runs.append((w, workload_run(engine="peregrine", label=label, workload=w,
                                         samples_s=samples, peak=peak, cost=cost,
                                         settings=settings, **_phase_runs(phases, peak))))
        del engine
        gc.collect()
    for w in workloads:
        if w.kind != "batch":
            continue
        reqs = [BenchRequest(w.n_prompt, w.n_gen, prompt_token_ids=_random_ids(
            rng, w.n_prompt, loaded.config.vocab_size)) for _ in range(w.n_seqs)]
        cfg = dataclasses.replace(config, max_num_seqs=max(config.max_num_seqs, w.n_seqs))
        run = run_peregrine(reqs, cfg, peak, loaded, warmup)
        gc.collect()
        cost_model = run["cost_model"]
        cost = ModelCost(0, 0, 0, cost_model["weight_bytes_per_forward"],
                         cost_model["kv_bytes_per_token"])
        runs.append((w, workload_run(
            engine="peregrine", label=label, workload=w, samples_s=[run["wall_s"]],
            prefill=run["prefill"], decode=run["decode"], peak=peak, cost=cost,
            settings={**settings, **run["settings"]},
            steps=run["steps"])))
    order = {w.name: i for i, w in enumerate(workloads)}
    return [r for _, r in sorted(runs, key=lambda wr: order[wr[0].name])]


def _random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    # Ids from 100 up skip the control tokens at the start of common vocabularies.
    low = min(100, vocab // 2)
    return [rng.randrange(low, vocab) for _ in range(n)]


# --- llama.cpp's binaries -----------------------------------------------------------------
def run_llamacpp_workloads(workloads: list[Workload], model_path: str, peak: DevicePeak, *,
                           threads: int, repetitions: int = 5, warmup: bool = True,
                           bin_dir: str, extra_args: list[str] | None = None
                           ) -> list[dict[str, Any]]:
    """Every workload on llama.cpp's own binaries: ppN and tgN in one llama-bench run,
    each batchSxPxG in a llama-batched-bench run."""
    from peregrine.bench.peers.llamacpp import gguf_cost
    from peregrine.bench.peers.llamacpp_bin import (batched_bench_command,
                                                    llama_bench_command, run_batched_bench,
                                                    run_llama_bench)
    cost = gguf_cost(model_path)
    results: dict[str, dict[str, Any]] = {}
    pp = [w.n_prompt for w in workloads if w.kind == "pp"]
    tg = [w.n_gen for w in workloads if w.kind == "tg"]
    if pp or tg:
        cmd = llama_bench_command(bin_dir, model_path, n_prompt=pp, n_gen=tg,
                                  threads=threads, repetitions=repetitions, warmup=warmup,
                                  extra=extra_args)
        print("   $ " + " ".join(cmd), file=sys.stderr, flush=True)
        tests = {t.name: t for t in run_llama_bench(cmd) if t.n_prompt == 0 or t.n_gen == 0}
        for w in workloads:
            if w.kind not in ("pp", "tg"):
                continue
            t = tests.get(w.name)
            if t is None:
                raise RuntimeError(f"llama-bench reported no {w.name} test")
            samples = list(t.samples_s)
            phases = (pp_phases(cost, w.n_prompt, samples) if w.kind == "pp"
                      else tg_phases(cost, w.n_gen, samples))
            run = workload_run(engine="llama.cpp", label="llama.cpp (llama-bench)",
                               workload=w, samples_s=samples, peak=peak, cost=cost,
                               settings=_llama_settings(t.info, threads, bin_dir),
                               command=" ".join(cmd), **_phase_runs(phases, peak))
            # llama-bench's own figures (the same mean, computed by it)
            run["tokens_per_s"], run["tokens_per_s_stddev"] = t.avg_ts, t.stddev_ts
            results[w.name] = run
    for w in workloads:
        if w.kind != "batch":
            continue
        cmd = batched_bench_command(bin_dir, model_path, n_prompt=w.n_prompt, n_gen=w.n_gen,
                                    n_parallel=w.n_seqs, threads=threads, extra=extra_args)
        print("   $ " + " ".join(cmd), file=sys.stderr, flush=True)
        row = run_batched_bench(cmd)
        phases = batch_phases(cost, w, row.t_pp, row.t_tg)
        results[w.name] = workload_run(
            engine="llama.cpp", label="llama.cpp (llama-batched-bench)", workload=w,
            samples_s=[row.t], peak=peak, cost=cost,
            settings=_llama_settings(row.info, threads, bin_dir), command=" ".join(cmd),
            llama_batched_bench={"t_pp": row.t_pp, "speed_pp": row.speed_pp,
                                 "t_tg": row.t_tg, "speed_tg": row.speed_tg, "t": row.t,
                                 "speed": row.speed, "n_kv": row.n_kv},
            **_phase_runs(phases, peak))
    return [results[w.name] for w in workloads]


_LLAMA_SETTINGS = ("n_threads", "n_threads_batch", "n_batch", "n_ubatch", "type_k", "type_v",
                   "flash_attn", "n_kv_max", "build_commit", "build_number", "cpu_info",
                   "model_type", "model_size", "backends", "repack")


def _llama_settings(info: dict[str, Any], threads: int, bin_dir: str) -> dict[str, Any]:
    return {"threads": threads, "weights": "GGUF as stored", "bin_dir": bin_dir,
            **{k: info[k] for k in _LLAMA_SETTINGS if k in info}}


# --- results ------------------------------------------------------------------------------
def workload_ratios(runs: list[dict[str, Any]], baseline_engine: str = "llama.cpp"
                    ) -> list[dict[str, Any]]:
    """Each run's tokens/s over the baseline engine's on the same workload (the first run
    of that workload when the baseline engine did not run it)."""
    base: dict[str, dict[str, Any]] = {}
    for r in runs:
        if r.get("error") or not r.get("workload"):
            continue
        w = r["workload"]
        if w not in base or (r["engine"] == baseline_engine
                             and base[w]["engine"] != baseline_engine):
            base[w] = r
    out = []
    for r in runs:
        b = base.get(r.get("workload"))
        ok = b is not None and not r.get("error") and b["tokens_per_s"] > 0
        out.append({"label": r.get("label"), "workload": r.get("workload"),
                    "baseline": b["label"] if b else None,
                    "tokens_per_s": r["tokens_per_s"] / b["tokens_per_s"] if ok else None})
    return out


def workloads_table(result: dict[str, Any]) -> str:
    """One row per (workload, engine), with the ratio to the baseline engine."""
    from peregrine.bench.results import table
    ratios = result.get("ratios") or [{}] * len(result["runs"])
    rows = []
    for run, ratio in zip(result["runs"], ratios):
        name = run.get("workload") or "-"
        if run.get("error"):
            rows.append([name, run["label"], "", f"not run: {run['error']}"] + [""] * 7)
            continue
        pre, dec = run["prefill"], run["decode"]
        rows.append([name, run["label"], run.get("settings", {}).get("threads"),
                     run["tokens_per_s"], run["tokens_per_s_stddev"], run["seconds"],
                     _pct(run["mfu"]), _pct(run["mbu"]),
                     pre["tokens_per_s"] if run["workload_kind"] == "batch" else None,
                     dec["tokens_per_s"] if run["workload_kind"] == "batch" else None,
                     "-" if ratio.get("tokens_per_s") is None
                     else f"{ratio['tokens_per_s']:.2f}x"])
    header = ["workload", "engine", "threads", "tok/s", "± stddev", "s per run", "MFU", "MBU",
              "prefill tok/s", "decode tok/s", f"tok/s vs {result.get('baseline', 'first')}"]
    lines = [f"- `{w['name']}`: {w['description']}" for w in result.get("workloads", [])]
    llama = next((r["settings"] for r in result["runs"]
                  if r.get("engine") == "llama.cpp" and not r.get("error")), None)
    if llama:
        lines.append(f"- llama.cpp: {llama.get('model_type', '')}, build "
                     f"{llama.get('build_commit', '?')}, {llama.get('bin_dir', '')}")
    return table(header, rows) + ("\n\n" + "\n".join(lines) if lines else "")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def workloads_suite(runs: list[dict[str, Any]], workloads: list[Workload],
                    **fields: Any) -> dict[str, Any]:
    """A saved result of kind `workloads`: the runs grouped by workload (in the order
    given), each engine's ratio to llama.cpp's on the same workload."""
    order = {w.name: i for i, w in enumerate(workloads)}
    runs = sorted(runs, key=lambda r: order.get(r.get("workload"), len(order)))
    baseline = "llama.cpp" if any(r.get("engine") == "llama.cpp" and not r.get("error")
                                  for r in runs) else (runs[0]["engine"] if runs else None)
    return {"kind": "workloads", "workloads": [w.to_dict() for w in workloads], **fields,
            "baseline": baseline, "runs": runs, "ratios": workload_ratios(runs, baseline)}
