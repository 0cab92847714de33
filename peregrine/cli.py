"""The `peregrine` command: serve | generate | chat | bench | quantize | eval | estimate."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import typing
from typing import Any

from peregrine.config import EngineConfig


def add_engine_args(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One --flag per EngineConfig field, except those in `exclude`."""
    hints = typing.get_type_hints(EngineConfig)
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
        if f.name == "extra" or f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = typing.get_args(hint)
        kwargs: dict[str, Any] = {"default": f.default, "dest": f.name}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = list(args)
        else:
            base = next((a for a in (args or (hint,)) if a is not type(None)), str)
            kwargs["type"] = base if base in (int, float, str) else str
        group.add_argument(flag, **kwargs)


def engine_config(ns: argparse.Namespace) -> EngineConfig:
    """The EngineConfig named by parsed engine flags."""
    names = set(EngineConfig.field_names()) - {"extra"}
    kwargs = {k: v for k, v in vars(ns).items() if k in names}
    if kwargs.get("seed") is None:  # generate/chat: --seed is the request's, may be unset
        kwargs.pop("seed", None)
    return EngineConfig(**kwargs)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed (also seeds the engine)")


def _params(ns: argparse.Namespace):
    from peregrine.sampling_params import SamplingParams
    return SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p,
                          top_k=ns.top_k, seed=ns.seed)


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
    return run_server(ns, engine_config(ns))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peregrine", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate one answer and print it")
    p.add_argument("prompt")
    p.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    _sampling_args(p)
    add_engine_args(p, exclude=("seed",))
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the terminal, streaming")
    p.add_argument("--system", default=None, help="system message")
    _sampling_args(p)
    add_engine_args(p, exclude=("seed",))
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a playground")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer <key>")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-queue-len", type=int, default=256,
                   help="waiting requests beyond this get 429")
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)

    from peregrine.bench.cli import add_bench_parser  # here: it imports this module
    add_bench_parser(sub)
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
