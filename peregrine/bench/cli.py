"""`peregrine bench throughput | latency | serve | compare | plot | report`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import typing
from typing import Any

from peregrine.bench.peers.workloads import DEFAULT_WORKLOADS
from peregrine.config import EngineConfig, add_engine_args

# llama.cpp: its own binaries (llama-bench, llama-batched-bench; the fixed workloads of
# `bench workloads` / `bench compare --workloads`); llama.cpp-python: the llama-cpp-python
# package, which runs any workload but one sequence at a time.
ENGINES = ("peregrine", "transformers", "llama.cpp", "llama.cpp-python")
# Engine flags the bench commands own: --seed seeds the workload and the engine alike,
# --threads sets every engine's CPU threads, --batching takes a comma list.
OWN_FLAGS = ("seed", "num_threads", "batching")
DEFAULT_COMPARE = "peregrine:continuous,peregrine:static,transformers,llama.cpp-python"
DEFAULT_WORKLOAD_ENGINES = "peregrine,llama.cpp"


# --- argument groups ---------------------------------------------------------------------------
def _workload_args(p: argparse.ArgumentParser, prompt_format: str = "token_ids",
                   serving: bool = False) -> None:
    g = p.add_argument_group("workload")
    if serving:
        g.add_argument("--num-prompts", type=_csv(int), default=[64],
                       help="requests per sweep point; a comma list gives each point its own "
                            "(the first N of one workload)")
    else:
        g.add_argument("--num-prompts", type=int, default=64, help="requests in the workload")
    g.add_argument("--input-len", default="32-512",
                   help="prompt tokens, N or LOW-HIGH drawn uniformly (random dataset)")
    g.add_argument("--output-len", default="32-256",
                   help="output tokens, N or LOW-HIGH drawn uniformly (random dataset)")
    g.add_argument("--dataset-path", default=None,
                   help='JSONL file, one {"prompt": ..., "max_tokens": ...} per line '
                        "(instead of random prompts)")
    g.add_argument("--prompt-format", choices=("token_ids", "text"), default=prompt_format,
                   help="random prompts as token ids, or decoded to text")
    g.add_argument("--seed", type=int, default=0, help="seeds the workload and the engine")
    if serving:  # commands with engine flags have the engine's --tokenizer
        g.add_argument("--tokenizer", default=None,
                       help="tokenizer for prompts (default: the model's)")


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads of every engine (default: all cores)")
    p.add_argument("--output", default=None, help="save the results as JSON here")
    p.add_argument("--markdown", default=None, help="save the results table as markdown here")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the short warm-up run before measuring")
    g = p.add_argument_group("roofline")
    g.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s for MFU (default: datasheet on GPU, measured on CPU)")
    g.add_argument("--peak-bandwidth", type=float, default=None,
                   help="peak memory bytes/s for MBU (default: datasheet / measured)")
    g.add_argument("--remeasure-peak", action="store_true",
                   help="measure the CPU peak again instead of using the cached one")


def _common_flags(ns: argparse.Namespace) -> list[str]:
    """The roofline and warm-up flags of `ns` again, for a child bench command."""
    flags = []
    if ns.peak_flops:
        flags += ["--peak-flops", str(ns.peak_flops)]
    if ns.peak_bandwidth:
        flags += ["--peak-bandwidth", str(ns.peak_bandwidth)]
    if not ns.warmup:
        flags.append("--no-warmup")
    return flags


def _csv(kind: type) -> typing.Callable[[str], list]:
    def parse(value: str) -> list:
        try:
            return [kind(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list, got {value!r}") from None
    return parse


def _rates(value: str) -> list[float]:
    out = []
    for v in value.split(","):
        rate = math.inf if v.strip() == "inf" else float(v)
        if rate <= 0:
            raise argparse.ArgumentTypeError(f"request rates must be > 0, got {v!r}")
        out.append(rate)
    return out


def add_bench_parser(sub: Any) -> None:
    """Add `bench` and its subcommands to the top-level parser's subparsers."""
    bench = sub.add_parser("bench", help="benchmarks: throughput, latency, serve, compare, "
                                         "plot, report")
    bsub = bench.add_subparsers(dest="bench_command", required=True)

    p = bsub.add_parser("throughput", help="offline throughput (like `vllm bench throughput`)")
    p.add_argument("--engine", choices=ENGINES, default="peregrine")
    p.add_argument("--batching", default="continuous",
                   help="our scheduler policy; a comma list runs each side by side "
                        "(continuous,static,dynamic)")
    p.add_argument("--hf-batch-size", type=int, default=16,
                   help="static batch size of the transformers peer")
    _workload_args(p)
    _common_args(p)
    add_engine_args(p, exclude=OWN_FLAGS)
    p.set_defaults(func=cmd_throughput)

    p = bsub.add_parser("latency", help="TTFT by prompt length, TPOT by batch size")
    p.add_argument("--input-lens", type=_csv(int), default=[32, 128, 512, 1024])
    p.add_argument("--batch-sizes", type=_csv(int), default=[1, 4, 16, 64])
    p.add_argument("--output-len", type=int, default=32, help="tokens decoded per request")
    p.add_argument("--decode-prompt-len", type=int, default=128)
    p.add_argument("--iters", type=int, default=3, help="TTFT repetitions per prompt length")
    p.add_argument("--seed", type=int, default=0)
    _common_args(p)
    add_engine_args(p, exclude=("seed", "num_threads"))
    p.set_defaults(func=cmd_latency)

    p = bsub.add_parser("serve", help="online serving latency (like `vllm bench serve`)")
    p.add_argument("--base-url", default=None, help="an OpenAI-compatible server to drive")
    p.add_argument("--launch", default=None,
                   help="start these servers one after another instead (comma list of "
                        "peregrine, llama.cpp = llama-server from llama.cpp's binaries, "
                        "llama.cpp-python = llama-cpp-python's server)")
    p.add_argument("--endpoint", choices=("/v1/completions", "/v1/chat/completions"),
                   default="/v1/completions")
    p.add_argument("--model", default=None,
                   help="the model to launch and take the tokenizer from (default: the "
                        "embedded SmolLM2-135M)")
    p.add_argument("--served-model", default=None,
                   help="the model name sent in requests (default: the first of /v1/models)")
    p.add_argument("--request-rate", type=_rates, default=[math.inf],
                   help="Poisson arrival rate(s) in req/s, inf = all at once; a comma list "
                        "sweeps")
    p.add_argument("--max-concurrency", type=_csv(int), default=[None],
                   help="most requests in flight; a comma list sweeps (1,8,32)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="1 = Poisson; lower is burstier (gamma-distributed gaps)")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput: ttft:MS tpot:MS e2el:MS")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send ignore_eos so every request generates exactly its length")
    p.add_argument("--extra-body", type=json.loads, default=None,
                   help="JSON merged into every request body")
    p.add_argument("--api-key", default=None)
    p.add_argument("--max-model-len", type=int, default=2048,
                   help="context length of launched servers")
    p.add_argument("--server-args", default="",
                   help="extra flags for a launched `peregrine serve`")
    p.add_argument("--llamacpp-parallel", type=int, default=None,
                   help="llama-server's parallel slots (-np; default: the largest "
                        "--max-concurrency, 32 when unbounded)")
    p.add_argument("--llamacpp-args", default="",
                   help="extra flags for a launched llama-server")
    _build_peers_arg(p)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    _workload_args(p, prompt_format="text", serving=True)
    _common_args(p)
    p.set_defaults(func=cmd_serve)

    p = bsub.add_parser("spec", help="decode speed with and without speculative decoding "
                                     "on copy-heavy and chat workloads")
    p.add_argument("--proposers", type=_csv(str), default=["ngram", "layers:24"],
                   help="compared with no speculation (ngram, layers:<k>, draft:<model>)")
    p.add_argument("--workloads", type=_csv(str), default=["copy", "chat"])
    p.add_argument("--batch-sizes", type=_csv(int), default=[1, 8])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests per workload (default: all 8)")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads (default: all cores)")
    p.add_argument("--output", default=None, help="save the results as JSON here")
    p.add_argument("--markdown", default=None, help="save the results table as markdown here")
    add_engine_args(p, exclude=(*OWN_FLAGS, "speculative", "num_speculative_tokens"))
    p.set_defaults(func=cmd_spec)

    p = bsub.add_parser("workloads", help="llama.cpp's benchmark workloads on one engine: "
                                          "prefill ppN, one-stream decode tgN, S sequences "
                                          "batchSxPxG")
    p.add_argument("--engine", choices=("peregrine", "llama.cpp"), default="peregrine",
                   help="peregrine, or llama.cpp's own llama-bench / llama-batched-bench")
    p.add_argument("--workloads", type=_csv(str), default=list(DEFAULT_WORKLOADS),
                   help="ppN: prefill of N tokens (llama-bench -p N); tgN: one stream "
                        "decoding N tokens (llama-bench -n N); batchSxPxG: S sequences, "
                        "P-token prompts, G new tokens, generated tok/s over the wall time "
                        "(llama-batched-bench -npl S -npp P -ntg G)")
    p.add_argument("--repetitions", type=int, default=5,
                   help="repetitions of ppN and tgN (llama-bench -r)")
    p.add_argument("--batching", default="continuous", help="our scheduler policy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llamacpp-args", default="",
                   help="extra flags for llama-bench and llama-batched-bench")
    _build_peers_arg(p)
    _common_args(p)
    add_engine_args(p, exclude=OWN_FLAGS)
    p.set_defaults(func=cmd_workloads)

    p = bsub.add_parser("compare", help="ours and the peers on one workload, side by side")
    p.add_argument("--engines", default=None,
                   help="comma list of peregrine:<batching>, transformers, llama.cpp "
                        "(its own binaries: with --workloads), llama.cpp-python (default: "
                        f"{DEFAULT_COMPARE}; with --workloads: {DEFAULT_WORKLOAD_ENGINES})")
    p.add_argument("--workloads", type=_csv(str), default=None,
                   help="llama.cpp's fixed workloads instead of the random one, e.g. "
                        f"{','.join(DEFAULT_WORKLOADS)} (see `bench workloads`)")
    p.add_argument("--repetitions", type=int, default=5,
                   help="with --workloads: repetitions of ppN and tgN (llama-bench -r)")
    p.add_argument("--llamacpp-args", default="",
                   help="with --workloads: extra flags for llama-bench and "
                        "llama-batched-bench")
    _build_peers_arg(p)
    p.add_argument("--output-dir", default="bench-results",
                   help="where each engine's JSON and compare.json/.md go")
    p.add_argument("--hf-batch-size", type=int, default=16)
    _workload_args(p)
    _common_args(p)
    add_engine_args(p, exclude=OWN_FLAGS)
    p.set_defaults(func=cmd_compare)

    p = bsub.add_parser("plot", help="draw PNG plots from saved results")
    p.add_argument("results", nargs="+", help="result JSON files")
    p.add_argument("--out-dir", default="docs/images")
    p.set_defaults(func=cmd_plot)

    p = bsub.add_parser("report", help="markdown tables of saved results")
    p.add_argument("results", nargs="*", help="result JSON files to print as markdown")
    p.add_argument("--results-dir", default=None,
                   help="with --doc: fill the doc's bench:NAME blocks from NAME.json here")
    p.add_argument("--doc", default=None, help="the markdown file to update")
    p.set_defaults(func=cmd_report)


def _build_peers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--build-peers", action="store_true",
                   help="build llama.cpp's binaries now if they are not built "
                        "(../shared/peers/build_llamacpp.sh, about 5 minutes, once)")


# --- helpers -----------------------------------------------------------------------------------
def bench_config(ns: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """The EngineConfig of the engine flags, with --threads as num_threads."""
    names = set(EngineConfig.field_names()) - {"extra", *OWN_FLAGS}
    kwargs = {k: v for k, v in vars(ns).items() if k in names}
    return EngineConfig(**{**kwargs, "seed": ns.seed, "num_threads": ns.threads, **overrides})


def model_vocab_size(model: str | None, load_format: str = "auto") -> int:
    """The model's vocabulary size, read from its config (no weights loaded)."""
    from peregrine.models.gguf_file import GGUFFile
    from peregrine.models.loader import gguf_config
    from peregrine.models.registry import resolve_model
    source = resolve_model(model, load_format)
    if source.path.endswith(".gguf"):
        return gguf_config(GGUFFile(source.path), "").vocab_size
    with open(os.path.join(source.path, "config.json")) as f:
        return int(json.load(f)["vocab_size"])


def workload_tokenizer(model: str | None, load_format: str = "auto",
                       tokenizer: str | None = None):
    """The tokenizer prompts are made with: --tokenizer, else the model's own, else (a
    config without one, run with dummy weights) the default model's, as the loader does."""
    from peregrine.models.loader import load_tokenizer
    from peregrine.models.registry import resolve_model
    from peregrine.models.tokenizer import Tokenizer
    if tokenizer:
        return load_tokenizer(tokenizer)
    source = resolve_model(model, load_format)
    if source.path.endswith(".gguf"):
        return load_tokenizer(source.path)
    if os.path.isfile(os.path.join(source.path, "tokenizer.json")):
        return Tokenizer.from_dir(source.path)
    return load_tokenizer(None)


def build_workload(ns: argparse.Namespace, model: str | None, load_format: str = "auto"
                   ) -> tuple[list, dict[str, Any]]:
    """The requests the workload flags describe, and how they were made."""
    from peregrine.bench.datasets import file_requests, parse_range, random_requests
    from peregrine.bench.results import workload_fields
    tok = workload_tokenizer(model, load_format, ns.tokenizer)
    num = max(ns.num_prompts) if isinstance(ns.num_prompts, list) else ns.num_prompts
    if ns.dataset_path:
        default_out = parse_range(ns.output_len, "--output-len")[1]
        reqs = file_requests(ns.dataset_path, tok, default_out, num)
        return reqs, workload_fields(reqs, {"dataset": f"file {ns.dataset_path}"})
    vocab = model_vocab_size(model, load_format)
    if vocab < tok.vocab_size:  # a small random model: keep ids inside its vocabulary
        tok.vocab_size = vocab
    in_len, out_len = parse_range(ns.input_len, "--input-len"), parse_range(ns.output_len,
                                                                            "--output-len")
    reqs = random_requests(num, in_len, out_len, tok, ns.seed,
                           as_text=ns.prompt_format == "text")
    return reqs, workload_fields(reqs, {"dataset": "random", "seed": ns.seed,
                                        "input_len": ns.input_len, "output_len": ns.output_len,
                                        "prompt_format": ns.prompt_format})


def bench_peak(ns: argparse.Namespace, cfg: EngineConfig | None = None):
    """The roof the MFU/MBU of this run are measured against."""
    import torch

    from peregrine.bench.roofline import device_peak
    device = cfg.torch_device if cfg else torch.device("cpu")
    dtype = cfg.torch_dtype if cfg else torch.float32
    return device_peak(device, dtype, ns.threads, ns.peak_flops, ns.peak_bandwidth,
                       ns.remeasure_peak)


def _env(ns: argparse.Namespace, cfg: EngineConfig | None = None) -> dict[str, Any]:
    from peregrine.bench.env import environment
    gpu = cfg is not None and cfg.torch_device.type == "cuda"
    env = environment(ns.threads, gpu, getattr(ns, "argv", None))
    if cfg is not None:
        env["tensor_parallel_size"] = cfg.tensor_parallel_size
        env["pipeline_parallel_size"] = cfg.pipeline_parallel_size
        env["enable_expert_parallel"] = cfg.enable_expert_parallel
    return env


def finish(ns: argparse.Namespace, result: dict[str, Any]) -> None:
    """Print the markdown of a result, and save it as --output / --markdown ask."""
    from peregrine.bench.report import render
    from peregrine.bench.results import save_json
    md = render(result)
    print(md)
    if ns.output:
        save_json(result, ns.output)
        print(f"saved {ns.output}", file=sys.stderr)
    if ns.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(ns.markdown)), exist_ok=True)
        with open(ns.markdown, "w") as f:
            f.write(md)


# --- commands ----------------------------------------------------------------------------------
def cmd_throughput(ns: argparse.Namespace) -> int:
    from peregrine.bench.results import suite
    batchings = [b.strip() for b in ns.batching.split(",") if b.strip()]
    for b in batchings:
        if b not in ("continuous", "dynamic", "static"):
            raise ValueError(f"--batching takes continuous, dynamic or static, got {b!r}")
    if ns.engine == "llama.cpp":
        raise ValueError("llama.cpp's own binaries run fixed workloads: use `bench workloads "
                         "--engine llama.cpp` or `bench compare --workloads ...`; for this "
                         "random workload use --engine llama.cpp-python (llama-cpp-python, "
                         "one sequence at a time)")
    cfg = bench_config(ns, batching=batchings[0])
    requests, workload = build_workload(ns, cfg.model, cfg.load_format)
    peak = bench_peak(ns, cfg if ns.engine == "peregrine" else None)
    if ns.engine == "peregrine":
        from peregrine.bench.datasets import with_token_ids
        from peregrine.bench.throughput import run_batchings
        tok = workload_tokenizer(cfg.model, cfg.load_format, ns.tokenizer)
        requests = with_token_ids(requests, tok)
        runs = run_batchings(requests, cfg, batchings, peak, ns.warmup)
    elif ns.engine == "transformers":
        from peregrine.bench.peers.hf_transformers import run_transformers
        runs = [run_transformers(requests, peak, model=cfg.model, load_format=cfg.load_format,
                                 threads=ns.threads, batch_size=ns.hf_batch_size,
                                 seed=ns.seed, warmup=ns.warmup)]
    else:  # llama.cpp-python
        from peregrine.bench.peers.llamacpp import run_llamacpp
        runs = [run_llamacpp(requests, peak, model=cfg.model, threads=ns.threads,
                             warmup=ns.warmup)]
    finish(ns, suite("throughput", runs, workload=workload, peak=peak.to_dict(),
                     env=_env(ns, cfg)))
    return 0


def cmd_latency(ns: argparse.Namespace) -> int:
    from peregrine.bench.latency import run_latency
    cfg = bench_config(ns)
    result = run_latency(cfg, bench_peak(ns, cfg), ns.input_lens, ns.batch_sizes, ns.output_len,
                         ns.decode_prompt_len, ns.iters, ns.seed, ns.warmup)
    result["env"] = _env(ns, cfg)
    finish(ns, result)
    return 0


def cmd_workloads(ns: argparse.Namespace) -> int:
    """llama.cpp's fixed workloads on one engine (ours, or llama.cpp's binaries)."""
    import shlex

    from peregrine.bench.peers.workloads import (parse_workloads, run_llamacpp_workloads,
                                                 run_peregrine_workloads, workloads_suite)
    workloads = parse_workloads(ns.workloads)
    if ns.repetitions < 1:
        raise ValueError(f"--repetitions must be >= 1, got {ns.repetitions}")
    if ns.engine == "peregrine":
        cfg = bench_config(ns)
        peak = bench_peak(ns, cfg)
        runs = run_peregrine_workloads(workloads, cfg, peak, ns.repetitions, ns.seed,
                                       ns.warmup)
    else:
        from peregrine.bench.peers.llamacpp_bin import find_bin_dir
        from peregrine.models.registry import resolve_model
        cfg = None
        source = resolve_model(ns.model)
        if source.format != "gguf":
            raise ValueError("llama.cpp's binaries need a GGUF model with real weights, got "
                             f"{source.path} ({source.format})")
        peak = bench_peak(ns)
        runs = run_llamacpp_workloads(workloads, source.path, peak, threads=ns.threads,
                                      repetitions=ns.repetitions, warmup=ns.warmup,
                                      bin_dir=find_bin_dir(ns.build_peers),
                                      extra_args=shlex.split(ns.llamacpp_args))
    finish(ns, workloads_suite(runs, workloads, peak=peak.to_dict(), env=_env(ns, cfg)))
    return 0


def cmd_spec(ns: argparse.Namespace) -> int:
    from peregrine.bench.spec import WORKLOADS, run_spec
    bad = set(ns.workloads) - set(WORKLOADS)
    if bad:
        raise ValueError(f"unknown workloads {sorted(bad)}; choose from {sorted(WORKLOADS)}")
    cfg = bench_config(ns)
    result = run_spec(cfg, ns.proposers, ns.workloads, ns.max_tokens, ns.batch_sizes, ns.k,
                      ns.num_requests)
    result["env"] = _env(ns, cfg)
    finish(ns, result)
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    from peregrine.bench.results import suite
    from peregrine.bench.serve import parse_goodput
    if (ns.base_url is None) == (ns.launch is None):
        raise ValueError("give exactly one of --base-url (a running server) or --launch")
    slos = parse_goodput(ns.goodput)
    prompts_per_point(ns)  # a bad --num-prompts fails before any server starts
    requests, workload = build_workload(ns, ns.model)
    runs: list[dict[str, Any]] = []
    if ns.base_url:
        runs += serve_points(ns, requests, slos, ns.base_url, "server", ns.extra_body or {})
    else:
        runs += launch_and_serve(ns, requests, slos)
    finish(ns, suite("serve", runs, workload=workload, endpoint=ns.endpoint,
                     env=_env(ns)))
    return 0 if any(not r.get("error") for r in runs) else 1


def serve_points(ns: argparse.Namespace, requests: list, slos: dict[str, float],
                 base_url: str, server: str, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (rate, concurrency) point of the sweep against one server."""
    from peregrine.bench.serve import check_endpoint, discover_model, run_load, serve_metrics
    model = ns.served_model or discover_model(base_url, ns.api_key)
    check_endpoint(base_url, ns.endpoint, model, extra, ns.ignore_eos, ns.api_key)
    runs = []
    for (rate, conc), n in zip(sweep_points(ns), prompts_per_point(ns)):
        results, duration = asyncio.run(run_load(
            base_url, ns.endpoint, model, requests[:n], rate, conc, ns.burstiness, ns.seed,
            ns.ignore_eos, extra, ns.api_key, ns.timeout))
        run = {"server": server, "label": _point_label(server, rate, conc),
               "base_url": base_url, "model": model, "request_rate":
               "inf" if math.isinf(rate) else rate, "max_concurrency": conc,
               "num_prompts": n, "extra_body": extra,
               **serve_metrics(results, duration, slos)}
        print(f"{run['label']}: {run['completed']}/{n} ok, {run['output_throughput']:.1f} "
              f"output tok/s, TTFT median {run['ttft_ms']['median'] or 0:.0f} ms, TPOT "
              f"median {run['tpot_ms']['median'] or 0:.0f} ms", file=sys.stderr, flush=True)
        runs.append(run)
    return runs


def sweep_points(ns: argparse.Namespace) -> list[tuple[float, int | None]]:
    """Every (request rate, max concurrency) pair of the sweep."""
    return [(rate, conc) for rate in ns.request_rate for conc in ns.max_concurrency]


def prompts_per_point(ns: argparse.Namespace) -> list[int]:
    """How many requests each sweep point sends."""
    points, counts = sweep_points(ns), ns.num_prompts
    if len(counts) == 1:
        return counts * len(points)
    if len(counts) != len(points):
        raise ValueError(f"--num-prompts has {len(counts)} values for {len(points)} sweep "
                         "points; give one, or one per point")
    return counts


def _point_label(server: str, rate: float, conc: int | None) -> str:
    load = f"{conc} concurrent" if conc else "unbounded"
    return f"{server}, {load}, " + ("all at once" if math.isinf(rate) else f"{rate} req/s")


def launch_and_serve(ns: argparse.Namespace, requests: list, slos: dict[str, float]
                     ) -> list[dict[str, Any]]:
    """Start each --launch server in turn and run the sweep against it."""
    import shlex

    from peregrine.bench.launch import (ServerProcess, free_port, server_spec,
                                        unavailable_reason)
    eos = workload_tokenizer(ns.model, tokenizer=ns.tokenizer).eos_token_ids
    concurrencies = [c for c in ns.max_concurrency if c]
    parallel = ns.llamacpp_parallel or (max(concurrencies) if len(concurrencies) ==
                                        len(ns.max_concurrency) else 32)
    runs: list[dict[str, Any]] = []
    for server in [s.strip() for s in ns.launch.split(",") if s.strip()]:
        reason = unavailable_reason(server, build=ns.build_peers)
        if reason:
            print(f"{server}: skipped: {reason}", file=sys.stderr)
            runs += [{"server": server, "label": _point_label(server, r, c), "request_rate":
                      "inf" if math.isinf(r) else r, "max_concurrency": c, "error": reason,
                      "threads": ns.threads}
                     for r, c in sweep_points(ns)]
            continue
        port = free_port()
        spec = server_spec(server, port, model=ns.model, threads=ns.threads,
                           max_model_len=ns.max_model_len, eos_token_ids=eos,
                           engine_args=shlex.split(ns.server_args), parallel=parallel,
                           llamacpp_args=shlex.split(ns.llamacpp_args))
        log = os.path.join(os.path.dirname(os.path.abspath(ns.output)) if ns.output
                           else tempfile.gettempdir(), f"server-{server}.log")
        with ServerProcess(spec, port, log) as srv:
            extra = {**spec.extra_body, **(ns.extra_body or {})}
            for run in serve_points(ns, requests, slos, srv.base_url, server, extra):
                run["threads"] = ns.threads
                run["server_command"] = " ".join(spec.command)
                run["server_notes"] = spec.notes
                runs.append(run)
    return runs


def engine_flags(ns: argparse.Namespace) -> list[str]:
    """The engine flags of `ns` that differ from EngineConfig's defaults, as argv."""
    argv = []
    for f in dataclasses.fields(EngineConfig):
        if f.name in (*OWN_FLAGS, "extra") or not hasattr(ns, f.name):
            continue
        value = getattr(ns, f.name)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv


def cmd_compare(ns: argparse.Namespace) -> int:
    """Run ours and the peers on one workload, each in its own process, and join them."""
    from peregrine.bench.launch import module_available
    from peregrine.bench.results import load_json, suite
    os.makedirs(ns.output_dir, exist_ok=True)
    if ns.workloads:
        return compare_workloads(ns)
    shared = ["--num-prompts", str(ns.num_prompts), "--input-len", ns.input_len,
              "--output-len", ns.output_len, "--seed", str(ns.seed), "--threads",
              str(ns.threads), "--prompt-format", "token_ids",
              "--hf-batch-size", str(ns.hf_batch_size)]
    if ns.dataset_path:
        shared += ["--dataset-path", ns.dataset_path]
    if ns.tokenizer:
        shared += ["--tokenizer", ns.tokenizer]
    shared += _common_flags(ns)
    shared += engine_flags(ns)
    runs, workload, peak = [], None, None
    for item, engine, batching in _engines(ns.engines or DEFAULT_COMPARE):
        name = item.replace(":", "-").replace(".", "")
        path = os.path.join(ns.output_dir, f"throughput-{name}.json")
        if engine == "llama.cpp":
            runs.append({"engine": engine, "label": engine, "error": (
                "llama.cpp's binaries run fixed workloads (--workloads); this random "
                "workload runs on llama.cpp-python")})
            continue
        missing = {"transformers": "transformers", "llama.cpp-python": "llama_cpp"}.get(engine)
        if missing and not module_available(missing):
            runs.append({"engine": engine, "label": engine,
                         "error": f"{missing} is not installed (pip install -e '.[peers]')"})
            continue
        argv = [sys.executable, "-m", "peregrine.cli", "bench", "throughput", "--engine",
                engine, "--output", path, *shared]
        if batching:
            argv += ["--batching", batching]
        print(f"== {item}: {' '.join(argv[3:])}", file=sys.stderr, flush=True)
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            runs.append({"engine": engine, "label": item,
                         "error": f"exit {proc.returncode}: {proc.stderr.strip()[-800:]}"})
            print(proc.stderr, file=sys.stderr)
            continue
        child = load_json(path)
        runs += child["runs"]
        workload, peak = workload or child["workload"], peak or child["peak"]
    result = suite("throughput", runs, workload=workload, peak=peak,
                   env=_env(ns))
    return _save_compare(ns, result, runs)


def _engines(engines: str) -> list[tuple[str, str, str]]:
    """--engines as (item, engine, batching) triples."""
    out = []
    for item in [e.strip() for e in engines.split(",") if e.strip()]:
        engine, _, batching = item.partition(":")
        if engine not in ENGINES:
            raise ValueError(f"--engines: unknown engine {engine!r}; use {ENGINES}")
        out.append((item, engine, batching))
    return out


def _save_compare(ns: argparse.Namespace, result: dict[str, Any],
                  runs: list[dict[str, Any]]) -> int:
    """Save a compare result as compare.json/.md (and --output/--markdown), print it."""
    from peregrine.bench.report import render
    from peregrine.bench.results import save_json
    save_json(result, os.path.join(ns.output_dir, "compare.json"))
    md = render(result)
    with open(os.path.join(ns.output_dir, "compare.md"), "w") as f:
        f.write(md)
    if ns.output:
        save_json(result, ns.output)
    if ns.markdown:
        with open(ns.markdown, "w") as f:
            f.write(md)
    print(md)
    return 0 if any(not r.get("error") for r in runs) else 1


def compare_workloads(ns: argparse.Namespace) -> int:
    """`bench compare --workloads`: `bench workloads` for each engine, each in its own
    process, joined into one table with each engine's ratio to llama.cpp."""
    from peregrine.bench.peers.llamacpp_bin import available
    from peregrine.bench.peers.workloads import parse_workloads, workloads_suite
    from peregrine.bench.results import load_json
    workloads = parse_workloads(ns.workloads)
    shared = ["--workloads", ",".join(w.name for w in workloads), "--repetitions",
              str(ns.repetitions), "--seed", str(ns.seed), "--threads", str(ns.threads)]
    shared += _common_flags(ns)
    runs: list[dict[str, Any]] = []
    peak = None
    for item, engine, batching in _engines(ns.engines or DEFAULT_WORKLOAD_ENGINES):
        def failed(error: str) -> None:
            runs.extend({"engine": engine, "label": item, "workload": w.name, "error": error}
                        for w in workloads)
        if engine not in ("peregrine", "llama.cpp"):
            failed("runs only the random workload (without --workloads)")
            continue
        argv = [sys.executable, "-m", "peregrine.cli", "bench", "workloads", "--engine",
                engine, *shared]
        if engine == "peregrine":
            argv += engine_flags(ns) + (["--batching", batching] if batching else [])
        else:
            reason = available(ns.build_peers)
            if reason:
                failed(reason)
                continue
            if ns.model:
                argv += ["--model", ns.model]
            if ns.llamacpp_args:
                argv.append(f"--llamacpp-args={ns.llamacpp_args}")
        path = os.path.join(ns.output_dir, f"workloads-{item.replace(':', '-').replace('.', '')}"
                                           ".json")
        argv += ["--output", path]
        print(f"== {item}: {' '.join(argv[3:])}", file=sys.stderr, flush=True)
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            failed(f"exit {proc.returncode}: {proc.stderr.strip()[-800:]}")
            continue
        child = load_json(path)
        runs += child["runs"]
        peak = peak or child["peak"]
    return _save_compare(ns, workloads_suite(runs, workloads, peak=peak, env=_env(ns)), runs)


def cmd_plot(ns: argparse.Namespace) -> int:
    from peregrine.bench.plots import plot_result
    from peregrine.bench.results import load_json
    for path in ns.results:
        stem = os.path.splitext(os.path.basename(path))[0]
        for out in plot_result(load_json(path), ns.out_dir, stem):
            print(out)
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from peregrine.bench.report import render, update_doc
    from peregrine.bench.results import load_json
    if ns.doc:
        if not ns.results_dir:
            raise ValueError("--doc needs --results-dir")
        names = update_doc(ns.doc, ns.results_dir)
        print(f"updated {ns.doc}: {', '.join(names) or 'nothing (no matching results)'}")
    for path in ns.results:
        print(render(load_json(path)))
    return 0
