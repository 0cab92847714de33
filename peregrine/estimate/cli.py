"""The `peregrine estimate` subcommand: flags, the human table and --json."""

from __future__ import annotations

import argparse
import json
from typing import Any

from peregrine.config import EngineConfig, add_engine_args, field_docs
from peregrine.estimate.compare import compare_api, output_capacity, render_comparison
from peregrine.estimate.core import EstimateOptions, estimate

# Engine flags that change nothing estimate computes.
IGNORED_ENGINE_FLAGS = ("tokenizer", "load_format", "seed", "num_kv_blocks", "kv_cache_memory",
                        "enable_prefix_caching", "batching", "batch_wait_ms",
                        "attention_backend", "max_logprobs", "speculative",
                        "num_speculative_tokens", "ngram_min", "ngram_max",
                        "quantization_symmetric", "power_source", "power_watts",
                        # its own --tensor-parallel-size (None: the fewest devices that fit)
                        "tensor_parallel_size", "pipeline_parallel_size", "distributed_timeout")


def add_estimate_parser(sub: Any) -> None:
    """Register `peregrine estimate`."""
    p = sub.add_parser("estimate", help="memory, fitting devices and predicted speed of a model "
                       "(docs/estimate.md)")
    docs = field_docs(EstimateOptions)
    p.add_argument("--tensor-parallel-size", type=int, default=None,
                   help=docs["tensor_parallel_size"])
    p.add_argument("--prompt-len", type=int, default=None, help=docs["prompt_len"])
    p.add_argument("--output-len", type=int, default=None, help=docs["output_len"])
    p.add_argument("--request-rate", type=float, default=None, help=docs["request_rate"])
    p.add_argument("--devices", default=None,
                   help="comma-separated device names to report, e.g. H100,L4,CPU (default: all)")
    p.add_argument("--compare-api", type=float, default=None, metavar="USD_PER_MTOK",
                   help="compare self-hosting (--price-per-hour per device) with an API "
                        "charging this many USD per million output tokens: cost per million "
                        "at traffic levels and the break-even traffic (docs/cost.md)")
    p.add_argument("--measured-tok-s", type=float, default=None,
                   help="with --compare-api: the device's output tokens/s measured (e.g. "
                        "`peregrine bench throughput`) instead of the predicted capacity")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    add_engine_args(p, exclude=IGNORED_ENGINE_FLAGS)
    p.set_defaults(func=cmd_estimate)


def cmd_estimate(ns: argparse.Namespace) -> int:
    names = set(EngineConfig.field_names()) - {"extra", "tensor_parallel_size"}
    config = EngineConfig(**{k: v for k, v in vars(ns).items() if k in names})
    opts = EstimateOptions(tensor_parallel_size=ns.tensor_parallel_size,
                           prompt_len=ns.prompt_len, output_len=ns.output_len,
                           request_rate=ns.request_rate,
                           devices=ns.devices.split(",") if ns.devices else None)
    result = estimate(config, opts)
    if ns.compare_api is not None:
        result["compare_api"] = api_comparisons(result, opts, ns.compare_api,
                                                config.price_per_hour, ns.measured_tok_s)
    text = render(result)
    if "compare_api" in result:
        text += "\n\nself-hosted vs API (cost of the device-hours only; docs/cost.md):\n"
        text += "\n".join(line for c in result["compare_api"]
                          for line in render_comparison(c["device"], c))
    print(json.dumps(result, indent=2) if ns.json else text)
    return 0


def api_comparisons(result: dict[str, Any], opts: EstimateOptions, api_usd_per_mtok: float,
                    price_per_hour: float, measured_tok_s: float | None
                    ) -> list[dict[str, Any]]:
    """One comparison per fitting device (its count x --price-per-hour an hour, capacity
    predicted from its decode and prefill speeds), or one of the measured speed."""
    max_len = result["max_model_len"]
    prompt = opts.prompt_len or max(max_len // 2, 1)
    output = opts.output_len or max(max_len - prompt, 1)
    if measured_tok_s is not None:
        return [{"device": "measured", **compare_api(
            api_usd_per_mtok, price_per_hour, measured_tok_s, output, "measured")}]
    out = []
    for d in result["devices"]:
        if not d["fits"] or d["decode_tok_s"] <= 0 or d["prefill_tok_s"] <= 0:
            continue
        capacity = output_capacity(d["decode_tok_s"], d["prefill_tok_s"], prompt, output)
        out.append({"device": f"{d['count']} x {d['name']}", **compare_api(
            api_usd_per_mtok, d["count"] * price_per_hour, capacity, output,
            f"predicted: batch {d['decode_batch']} decode, prompt {prompt} / output "
            f"{output}")})
    if not out:
        raise ValueError("--compare-api: the model fits none of the devices")
    return out


def _gib(x: float) -> str:
    return f"{x / 2**30:,.2f} GiB"


def render(r: dict[str, Any]) -> str:
    """The human-readable report of an estimate."""
    w = r["weights"]
    lines = [
        f"{r['model']} ({r['architecture']}, {r['params'] / 1e9:.2f}B params), "
        f"{r['quantization']} weights, {r['dtype']} compute, KV {r['kv_cache_dtype']}, "
        f"{r['max_num_seqs']} x {r['max_model_len']} tokens"
        + (f", sliding window {r['sliding_window']}" if r["sliding_window"] else ""),
        f"breakdown for a {'GPU' if r['device_kind'] == 'cuda' else 'CPU'} "
        "(one device; --device cpu|cuda picks):",
        f"  weights      {_gib(r['weights_bytes'])}  (linears {_gib(w['linears'])}, "
        f"LM head {_gib(w['lm_head'])}, embedding {_gib(w['embedding'])}, "
        f"norms/biases {_gib(w['norms_biases'])}, rotary {_gib(w['rotary'])}; "
        f"formats {', '.join(f'{k} x{v}' for k, v in w['formats'].items())})",
        f"  KV cache     {_gib(r['kv_cache_bytes'])}  ({r['kv_cache_bytes_per_token']:,.0f} "
        f"B/token, {r['kv_blocks_per_sequence']} blocks of {r['block_size']} per sequence, "
        f"{r['kv_blocks']} blocks)",
        f"  activations  {_gib(r['activation_bytes'])}  (largest step: "
        f"{r['activation_step_tokens']} tokens)",
        f"  runtime      {_gib(r['runtime_overhead_bytes'])}",
        f"  total        {_gib(r['total_bytes'])}   (serving)",
        f"  peak         {_gib(r['peak_total_bytes'])}   (the larger of serving and loading: "
        f"the loader's peak is {_gib(r['load_peak_bytes'])} + overhead, float model before "
        "quantizing)",
        "",
        f"{'device':<34} {'count':>5} {'fits':>5} {'max batch':>9} {'max ctx':>8} "
        f"{'decode tok/s':>13} {'prefill tok/s':>14}",
    ]
    for d in r["devices"]:
        fits = "yes" if d["fits"] else ("load" if d["fits_serving"] else "no")
        lines.append(f"{d['name'][:34]:<34} {d['count']:>5} {fits:>5} {d['max_batch']:>9} "
                     f"{d['max_context']:>8} {d['decode_tok_s']:>13,.1f} "
                     f"{d['prefill_tok_s']:>14,.1f}")
        if d["traffic"]:
            t = d["traffic"]
            lines.append(f"{'':<6}at {t['request_rate']} req/s: concurrency "
                         f"{t['concurrency']}, latency {t['latency_s']} s, "
                         f"{'keeps up' if t['keeps_up'] else 'does NOT keep up'}")
    lines += ["", "decode tok/s: batch of min(max_num_seqs, max batch) at context prompt + "
              "output/2; prefill: one prompt of --prompt-len (default max_model_len/2).",
              "fits 'load': serving fits but loading does not (the loader builds the float "
              "model before quantizing it).", "max ctx: tokens per sequence at max_num_seqs "
              "sequences (at most the model's context).", *r["notes"]]
    cpu = next((d for d in r["devices"] if d["kind"] == "cpu"), None)
    if cpu:
        lines.append(f"CPU efficiencies: {cpu['efficiency_source']}")
    return "\n".join(lines)

