"""Quality of the default path against the float path, measured on the shipped held-out text.

The default `quantization="auto"` serves the embedded SmolLM2 GGUF from its own Q4_1/Q8_0
blocks, with int8 activations in the int4 linears and the fused C++ decode step. Issue 14
asks that it keep perplexity within 0.5% of the float path (`quantization="none"`) and
teacher-forced top-1 agreement with float >= 0.97. For each configuration this measures:

  ppl           perplexity (peregrine/quantization/perplexity.py: windows of --context
                tokens, stride = context, run in chunks through the paged KV cache);
  top1          teacher-forced agreement with float: over the same windows, the share of
                positions whose argmax next token equals the float model's;
  decode_*      the same two over the first --decode-tokens tokens, run one token per step
                through the fused decode step (engine/cpu_decode.py) as the engine decodes,
                for configurations where it applies.

Usage: .venv/bin/python scripts/quality_default_path.py [--max-tokens N] [--context N]
Writes docs/bench-results/quality_default_path.json and prints a table."""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from peregrine.bench.env import environment, git_commit
from peregrine.bench.results import save_json
from peregrine.engine.cpu_decode import fused_decode_runner
from peregrine.attention_backend import AttentionMetadata, allocate_kv_pool
from peregrine.models.loader import load_model
from peregrine.quantization.corpus import eval_text
from peregrine.quantization.perplexity import perplexity

CONFIGS = {  # name: (quantization, group size); "auto" is the default of EngineConfig
    "none (float)": ("none", None),
    "auto (default: gguf)": ("auto", None),
    "int4 (group 32)": ("int4", None),
}
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                   "bench-results", "quality_default_path.json")


def windows(n: int, context: int) -> list[tuple[int, int]]:
    """[begin, end) of non-overlapping windows (stride = context), as perplexity() takes
    them: the predictions at positions begin..end-2 of each window are scored."""
    return [(b, min(b + context, n)) for b in range(0, n - 1, context) if min(b + context, n)
            - b >= 2]


@torch.inference_mode()
def teacher_forced(net, ids: torch.Tensor, context: int, rows: int = 256
                   ) -> tuple[torch.Tensor, float]:
    """Argmax next token at every scored position, and the summed NLL of the targets, with
    each window run as one prefill (no cache)."""
    top, nll = [], 0.0
    for b, e in windows(ids.numel(), context):
        w = ids[b:e]
        hidden = net(w, torch.arange(e - b), AttentionMetadata.prefill_only([e - b]))
        for s in range(0, e - b - 1, rows):
            t = min(s + rows, e - b - 1)
            logits = net.compute_logits(hidden[s:t])
            top.append(logits.argmax(-1))
            nll += float(torch.nn.functional.cross_entropy(logits, w[s + 1:t + 1],
                                                           reduction="sum"))
    return torch.cat(top), nll


@torch.inference_mode()
def fused_decode(net, ids: torch.Tensor, block_size: int = 16
                 ) -> tuple[torch.Tensor, float] | None:
    """Argmax and summed NLL of ids[1:] with every token run as one decode step of the
    fused C++ decoder over the paged cache (None where the fused step does not apply)."""
    n = ids.numel()
    num_blocks = -(-n // block_size)
    pool = allocate_kv_pool(net.config, num_blocks, block_size, torch.float32,
                            torch.device("cpu"))
    runner = fused_decode_runner(net, pool)
    if runner is None:
        return None
    table = torch.arange(num_blocks, dtype=torch.int32).unsqueeze(0)
    top, nll = [], 0.0
    for t in range(n - 1):
        meta = AttentionMetadata(
            query_start_loc=[0, 1], seq_lens=[t + 1], num_decodes=1,
            slot_mapping=torch.tensor([t]), block_tables=table,
            query_start_loc_t=torch.tensor([0, 1], dtype=torch.int32),
            seq_lens_t=torch.tensor([t + 1], dtype=torch.int32))
        hidden = runner.run(ids[t:t + 1], torch.tensor([t]), meta)
        logits = net.compute_logits(hidden)
        top.append(logits.argmax(-1))
        nll += float(torch.nn.functional.cross_entropy(logits, ids[t + 1:t + 2],
                                                       reduction="sum"))
    return torch.cat(top), nll


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=16384,
                    help="tokens of the held-out text used (0: all of it)")
    ap.add_argument("--context", type=int, default=1024, help="window length in tokens")
    ap.add_argument("--decode-tokens", type=int, default=512,
                    help="tokens run through the fused decode step (0: skip)")
    ap.add_argument("--output", default=OUT)
    ns = ap.parse_args()

    results: dict[str, dict] = {}
    float_top = float_decode_top = None
    ids = None
    for name, (quant, group) in CONFIGS.items():
        t0 = time.perf_counter()
        loaded = load_model(None, quantization=quant, quant_group_size=group)
        net = loaded.model
        if ids is None:
            all_ids = loaded.tokenizer.encode(eval_text(), add_special_tokens=False)
            ids = all_ids[:ns.max_tokens] if ns.max_tokens else all_ids
            print(f"held-out text: {len(all_ids)} tokens, using {len(ids)}; windows of "
                  f"{ns.context}")
        tokens = torch.tensor(ids)
        ppl = perplexity(net, ids, context=ns.context)
        top, nll = teacher_forced(net, tokens, ns.context)
        row = {"quantization": quant, "ppl": ppl.ppl, "nll": ppl.nll,
               "scored_tokens": ppl.num_tokens,
               "ppl_prefill_only": math.exp(nll / top.numel())}
        if float_top is None:
            float_top = top
        row["top1_agreement"] = float((top == float_top).float().mean())
        if ns.decode_tokens:
            head = tokens[:ns.decode_tokens]
            dec = fused_decode(net, head)
            if quant == "none":  # the float reference of the decode-step comparison
                float_decode_top, _ = teacher_forced(net, head, ns.decode_tokens)
            if dec is not None:
                dtop, dnll = dec
                row["decode_tokens"] = int(dtop.numel())
                row["decode_ppl"] = math.exp(dnll / dtop.numel())
                row["decode_top1_agreement"] = float((dtop == float_decode_top).float().mean())
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = row
        print(f"{name}: {json.dumps(row)}", flush=True)

    ref = results["none (float)"]["ppl"]
    for row in results.values():
        row["ppl_vs_float"] = row["ppl"] / ref - 1
    default = results["auto (default: gguf)"]
    targets = {"ppl_within_0.5pct": default["ppl_vs_float"] <= 0.005,
               "top1_at_least_0.97": default["top1_agreement"] >= 0.97}
    if "decode_top1_agreement" in default:
        targets["decode_top1_at_least_0.97"] = default["decode_top1_agreement"] >= 0.97

    print()
    print("| quantization | ppl | vs float | top-1 agreement | fused decode ppl | "
          "fused decode top-1 |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        dppl = f"{r['decode_ppl']:.4f}" if "decode_ppl" in r else "-"
        dtop = f"{r['decode_top1_agreement']:.4f}" if "decode_top1_agreement" in r else "-"
        print(f"| {name} | {r['ppl']:.4f} | {100 * r['ppl_vs_float']:+.2f}% | "
              f"{r['top1_agreement']:.4f} | {dppl} | {dtop} |")
    print(f"\ntargets (default path): {targets}")

    out = {"model": "SmolLM2-135M-Instruct Q4_1 GGUF (embedded)",
           "text": "peregrine/quantization/corpus.py eval_text() (bundled, held out)",
           "tokens": len(ids), "context": ns.context, "decode_tokens": ns.decode_tokens,
           "results": results, "targets": targets,
           "machine": environment(threads=torch.get_num_threads()),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "peregrine": git_commit()}
    save_json(out, ns.output)
    print(f"wrote {ns.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
