"""The `peregrine` command: serve | generate | chat | bench | quantize | eval | estimate."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

from peregrine.config import EngineConfig, add_dataclass_args, add_engine_args, field_docs
from peregrine.server.args import ServerArgs
from peregrine.server.ray_args import RayArgs


def engine_config(ns: argparse.Namespace) -> EngineConfig:
    """The EngineConfig named by parsed engine flags."""
    names = set(EngineConfig.field_names()) - {"extra"}
    kwargs = {k: v for k, v in vars(ns).items() if k in names}
    if kwargs.get("seed") is None:  # generate/chat: --seed is the request's, may be unset
        kwargs.pop("seed", None)
    return EngineConfig(**kwargs)


# SamplingParams fields with flags, and their defaults here: greedy, longer answers.
SAMPLING_FLAGS = {"max_tokens": 256, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "seed": None}


def _sampling_args(p: argparse.ArgumentParser) -> None:
    from peregrine.sampling_params import SamplingParams
    docs = field_docs(SamplingParams)
    for name, default in SAMPLING_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), default=default, help=docs[name],
                       type=float if isinstance(default, float) else int)


def _structured_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("structured outputs (at most one)").add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="FILE", help="answer as JSON valid for this schema")
    g.add_argument("--json-object", action="store_true", help="answer as any JSON object")
    g.add_argument("--regex", help="answer matching this regular expression")
    g.add_argument("--choice", action="append", metavar="TEXT",
                   help="answer exactly one of these (repeat the flag)")
    g.add_argument("--grammar", metavar="FILE", help="answer in this EBNF (GBNF) grammar")


def _structured(ns: argparse.Namespace):
    """The StructuredOutputs of the generate flags, or None."""
    from peregrine.structured import StructuredOutputs

    def read(path: str, flag: str) -> str:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise ValueError(f"{flag}: cannot read {path}: {e.strerror}") from None
    if getattr(ns, "json_schema", None):
        return StructuredOutputs(json=read(ns.json_schema, "--json-schema"))
    if getattr(ns, "json_object", False):
        return StructuredOutputs(json_object=True)
    if getattr(ns, "regex", None):
        return StructuredOutputs(regex=ns.regex)
    if getattr(ns, "choice", None):
        return StructuredOutputs(choice=ns.choice)
    if getattr(ns, "grammar", None):
        return StructuredOutputs(grammar=read(ns.grammar, "--grammar"))
    return None


def _params(ns: argparse.Namespace):
    from peregrine.sampling_params import SamplingParams
    return SamplingParams(**{name: getattr(ns, name) for name in SAMPLING_FLAGS},
                          structured=_structured(ns))


def cmd_generate(ns: argparse.Namespace) -> int:
    from peregrine.llm import LLM
    cfg = engine_config(ns)
    t0 = time.perf_counter()
    llm = LLM(**dataclasses.asdict(cfg))
    load = time.perf_counter() - t0
    params = _params(ns)
    t0 = time.perf_counter()
    if ns.raw:
        out = llm.generate(ns.prompt, params)[0]
    else:
        out = llm.chat([{"role": "user", "content": ns.prompt}], params)[0]
    elapsed = time.perf_counter() - t0
    print(out.outputs[0].text)
    n = len(out.outputs[0].token_ids)
    print(f"[{n} tokens in {elapsed:.2f}s, {n / elapsed:.1f} tok/s; load {load:.1f}s]",
          file=sys.stderr)
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    from peregrine.llm import LLM
    llm = LLM(**dataclasses.asdict(engine_config(ns)))
    tok = llm.get_tokenizer()
    messages: list[dict[str, str]] = []
    if ns.system:
        messages.append({"role": "system", "content": ns.system})
    print(f"peregrine chat with {llm.engine.loaded.source.name}; empty line or Ctrl-D quits.")
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            return 0
        messages.append({"role": "user", "content": line})
        rid = llm.add_request({"prompt_token_ids": tok.encode_chat(messages)}, _params(ns))
        shown = 0
        t0 = time.perf_counter()
        text, n = "", 0
        try:
            while True:
                outs = [o for o in llm.step() if o.request_id == rid]
                if not outs:
                    continue
                out = outs[-1].outputs[0]
                print(out.text[shown:], end="", flush=True)
                shown, text, n = len(out.text), out.text, len(out.token_ids)
                if outs[-1].finished:
                    break
        except KeyboardInterrupt:
            llm.abort(rid)
        dt = time.perf_counter() - t0
        print(f"\n[{n} tokens, {n / dt:.1f} tok/s]")
        messages.append({"role": "assistant", "content": text})


def cmd_serve(ns: argparse.Namespace) -> int:
    from peregrine.server.app import run_server
    from peregrine.server.model_entries import entries_from_file, entries_from_flags
    given: list[str] = ns.model or []
    models: list[str | None] = [*given] or [None]
    ns.model = models[0]
    config = engine_config(ns)
    if ns.ray:
        return _serve_on_ray(ns, config, len(models))
    if len(models) == 1 and not ns.models_config:
        return run_server(ns, config)
    entries = entries_from_flags(models, config, ns.served_model_name) if given else []
    if ns.models_config:
        entries += entries_from_file(ns.models_config, config)
    return run_server(ns, config, entries)


def _serve_on_ray(ns: argparse.Namespace, config: EngineConfig, num_models: int) -> int:
    """`peregrine serve --ray`: replicas of one model on Ray Serve."""
    if num_models > 1 or ns.models_config:
        raise ValueError("--ray serves one model (replicas of it); drop the extra --model / "
                         "--models-config")
    RayArgs.from_namespace(ns)  # refuse bad flags before importing Ray
    try:
        from peregrine.server.ray_serve import run
    except ImportError as e:
        print(f"peregrine: error: --ray needs Ray Serve ({e}); install it with "
              "pip install 'peregrine[ray]'", file=sys.stderr)
        return 2
    return run(ns, config)


def cmd_quantize(ns: argparse.Namespace) -> int:
    import json

    from peregrine.quantization.quantize import QuantizeOptions, quantize_to_dir
    fmt = ns.format or {4: "int4", 8: "int8"}[ns.bits]
    method = ns.method or ("rtn" if ns.mixed else "gptq")
    opts = QuantizeOptions(method=method, format=fmt, group_size=ns.group_size,
                           symmetric=ns.symmetric, act_order=ns.act_order, damp=ns.damp,
                           calib_samples=ns.calib_samples, calib_seq_len=ns.calib_seq_len,
                           calib_corpus=ns.calib_corpus, mixed=ns.mixed,
                           target_bits=ns.target_bits,
                           sensitivity_tokens=ns.sensitivity_tokens)
    model = None if ns.model in (None, "default") else ns.model
    print(json.dumps(quantize_to_dir(model, ns.out_dir, opts), indent=2))
    return 0


def cmd_eval_ppl(ns: argparse.Namespace) -> int:
    import json

    from peregrine.models.loader import load_model
    from peregrine.quantization.corpus import eval_text
    from peregrine.quantization.perplexity import perplexity
    cfg = engine_config(ns)
    loaded = load_model(cfg.model, load_format=cfg.load_format, dtype=cfg.torch_dtype,
                        device=cfg.torch_device, tokenizer=cfg.tokenizer,
                        quantization=cfg.quantization,
                        quant_group_size=cfg.quantization_group_size,
                        quant_symmetric=cfg.quantization_symmetric)
    ids = loaded.tokenizer.encode(eval_text(ns.corpus), add_special_tokens=False)
    ids = ids[:ns.max_tokens]
    res = perplexity(loaded.model, ids, context=ns.context or len(ids), stride=ns.stride,
                     kv_cache_dtype=cfg.kv_cache_dtype, chunk=ns.chunk)
    out = {"model": loaded.source.name, "quantization": cfg.quantization,
           "kv_cache_dtype": cfg.kv_cache_dtype, "corpus": ns.corpus or "bundled britannica",
           "ppl": round(res.ppl, 4), "nll": round(res.nll, 6), "tokens": res.num_tokens,
           "windows": res.num_windows, "context": ns.context or len(ids),
           "seconds": round(res.seconds, 1)}
    print(json.dumps(out))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def cmd_eval_quant_table(ns: argparse.Namespace) -> int:
    from peregrine.quantization.bench import run_table
    return run_table(ns)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peregrine", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate one answer and print it")
    p.add_argument("prompt")
    p.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    _sampling_args(p)
    _structured_args(p)
    add_engine_args(p, exclude=("seed",))
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the terminal, streaming")
    p.add_argument("--system", default=None, help="system message")
    _sampling_args(p)
    add_engine_args(p, exclude=("seed",))
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a playground")
    add_dataclass_args(p, ServerArgs, "server")
    add_dataclass_args(p, RayArgs, "replicas on Ray Serve (docs/distributed.md)")
    add_engine_args(p, exclude=("model",))
    p.add_argument("--model", action="append", help=field_docs(EngineConfig)["model"]
                   + " Repeat to serve several (docs/multi_model.md).")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("quantize", help="quantize a model (RTN, GPTQ, AWQ) into a checkpoint "
                       "directory that serve/generate load")
    p.add_argument("model", help="model to quantize (`default` for the embedded SmolLM2)")
    p.add_argument("out_dir")
    p.add_argument("--method", choices=["rtn", "gptq", "awq"], default=None,
                   help="default: gptq (rtn with --mixed)")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--format", choices=["int4", "int8", "nf4", "fp8"], default=None,
                   help="weight format (default: int4 for --bits 4, int8 for --bits 8)")
    p.add_argument("--group-size", type=int, default=None,
                   help="weights per scale (default: 128 int4, 64 nf4, per-channel int8)")
    p.add_argument("--symmetric", action="store_true", help="int4: symmetric levels")
    p.add_argument("--act-order", action="store_true", help="GPTQ: columns by Hessian diagonal")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ: Hessian damping")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--calib-corpus", default=None,
                   help="calibration text file (default: the bundled corpus' second half)")
    p.add_argument("--mixed", action="store_true",
                   help="per-layer formats (int4 groups 32-256, int8) chosen from each "
                        "linear's measured sensitivity to fit --target-bits (RTN)")
    p.add_argument("--target-bits", type=float, default=None,
                   help="--mixed: bits per weight, scales included (default: uniform "
                        "int4 with groups of 128)")
    p.add_argument("--sensitivity-tokens", type=int, default=512,
                   help="--mixed: calibration tokens each sensitivity is measured on")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="quality and speed evaluations")
    esub = p.add_subparsers(dest="eval_command", required=True)
    e = esub.add_parser("ppl", help="sliding-window perplexity on held-out text")
    e.add_argument("--corpus", default=None,
                   help="text file (.txt/.gz); default: the bundled corpus' first half")
    e.add_argument("--max-tokens", type=int, default=4096, help="tokens of the corpus used")
    e.add_argument("--context", type=int, default=None,
                   help="window length (default: all --max-tokens in one window)")
    e.add_argument("--stride", type=int, default=None, help="window step (default: context)")
    e.add_argument("--chunk", type=int, default=128,
                   help="tokens per forward pass inside a window (through the KV cache)")
    e.add_argument("--json", default=None, help="also write the result to this file")
    add_engine_args(e)
    e.set_defaults(func=cmd_eval_ppl)
    e = esub.add_parser("quant-table", help="weight memory, perplexity and decode speed of "
                        "every quantization method (docs/quantization.md)")
    e.add_argument("--out", default="docs/bench-results/quantization",
                   help="directory for the JSON and markdown results")
    e.add_argument("--methods", default=None,
                   help="comma-separated subset of the table's rows (default: all)")
    e.add_argument("--ppl-tokens", type=int, default=4096)
    e.add_argument("--decode-tokens", type=int, default=64)
    e.add_argument("--batch", type=int, default=32, help="streams of the throughput column")
    e.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: all cores; 1 gives steadier numbers on a "
                   "busy machine)")
    e.add_argument("--work-dir", default=None,
                   help="where GPTQ/AWQ checkpoints are written (default: a temp dir)")
    e.set_defaults(func=cmd_eval_quant_table)

    from peregrine.bench.cli import add_bench_parser
    add_bench_parser(sub)
    from peregrine.estimate.cli import add_estimate_parser
    add_estimate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ns = build_parser().parse_args(argv)
    ns.argv = argv  # benchmarks save the command line that made their numbers
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from peregrine.models.errors import ModelLoadError
    try:
        return ns.func(ns)
    except (ModelLoadError, ValueError) as e:
        print(f"peregrine: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
