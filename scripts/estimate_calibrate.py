"""Store a CPU calibration for `peregrine estimate` in peregrine/estimate/devices.json.

    peregrine bench workloads --workloads pp512,tg128 --quantization gguf --threads 2 \
        --output run1.json            # (repeat: several files give a median)
    python scripts/estimate_calibrate.py run1.json [run2.json ...]

Per quantization found in the files: the median tok/s of pp512 (prefill) and tg128
(decode), the roof the runs used, the command, date and ISA, and the RSS of a process that
loaded a tiny random model in that quantization (load overhead), and of one that built
an engine on it and generated (runtime overhead)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections import defaultdict

from peregrine.estimate.devices import DATA_FILE
from peregrine.memory_model import resolve_quantization

RSS_CHILD = """
import json, os, sys, tempfile
from peregrine import LLM, SamplingParams
cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=64,
           intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=256)
path = tempfile.mkdtemp()
json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
if sys.argv[2] == "run":
    llm = LLM(path, load_format="dummy", quantization=sys.argv[1], num_kv_blocks=16,
              num_threads=%d)
    llm.generate([[5] * 40] * 2, SamplingParams(max_tokens=8, ignore_eos=True))
else:  # the loader's peak comes before the engine exists
    from peregrine.models.loader import load_model
    load_model(path, load_format="dummy", quantization=sys.argv[1])
with open("/proc/self/status") as f:
    print(next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS")))
"""


def overhead_rss(quantization: str, threads: int, phase: str) -> int:
    """RSS of a process that loaded a tiny random model (weights of a few hundred KiB), or
    with phase `run` built an engine on it and generated: the interpreter, torch and the
    library pages its load-time (or also compute) paths touch, the tokenizer, the C++
    kernels and the engine. Median of 3 fresh processes."""
    quant = "int4" if quantization == "gguf" else quantization  # same kernels, no file
    runs = [int(subprocess.run([sys.executable, "-c", RSS_CHILD % threads, quant, phase],
                               capture_output=True, text=True, check=True).stdout.split()[-1])
            for _ in range(3)]
    return int(statistics.median(runs))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="`peregrine bench workloads` JSON files")
    p.add_argument("--prefill", default="pp512")
    p.add_argument("--decode", default="tg128")
    ns = p.parse_args()
    groups: dict[str, list[dict]] = defaultdict(list)
    for path in ns.results:
        with open(path) as f:
            suite = json.load(f)
        settings = suite["runs"][0]["settings"]
        quant = resolve_quantization(settings["quantization"], settings["load_format"] == "gguf",
                                     "cpu")
        groups[quant].append(suite)
    with open(DATA_FILE) as f:
        data = json.load(f)
    kept = data.get("cpu_calibrations", [])
    for quant, suites in groups.items():
        def tok_s(workload: str) -> float:
            return statistics.median(r["tokens_per_s"] for s in suites for r in s["runs"]
                                     if r["workload"] == workload)
        first = suites[0]
        env, peak, settings = first["env"], first["peak"], first["runs"][0]["settings"]
        overhead = overhead_rss(quant, env["threads"], "run")
        load_overhead = overhead_rss(quant, env["threads"], "load")
        entry = {"cpu": env["cpu"], "isa": _isa(), "threads": env["threads"],
                 "model": settings["model"], "quantization": quant,
                 "prefill_workload": ns.prefill, "prefill_tok_s": round(tok_s(ns.prefill), 2),
                 "decode_workload": ns.decode, "decode_tok_s": round(tok_s(ns.decode), 2),
                 "peak_flops": peak["flops"], "peak_bandwidth": peak["bandwidth"],
                 "peak_source": peak["source"], "runtime_overhead_bytes": overhead,
                 "load_overhead_bytes": load_overhead,
                 "command": env["command"] + f"  (median of {len(suites)} runs; load "
                 f"average {', '.join(f'{x:.1f}' for x in env['load_average'])})",
                 "date": env["date"]}
        kept = [c for c in kept if not (c["cpu"] == entry["cpu"] and c["quantization"] == quant
                                        and c["threads"] == entry["threads"])]
        kept.append(entry)
        print(json.dumps(entry, indent=1))
    data["cpu_calibrations"] = kept
    with open(DATA_FILE, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    return 0


def _isa() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":")[1].split()
    except (OSError, StopIteration):
        return []
    return [x for x in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "amx_tile")
            if x in flags]


if __name__ == "__main__":
    sys.exit(main())
