"""Start an OpenAI-compatible server in a subprocess for a benchmark, and stop it after."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from peregrine.models.registry import resolve_model

# llama.cpp: llama-server from llama.cpp's own binaries (parallel slots, continuous
# batching); llama.cpp-python: llama-cpp-python's server (one request at a time).
SERVERS = ("peregrine", "llama.cpp", "llama.cpp-python")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def module_available(name: str) -> bool:
    """Whether `name` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@dataclass
class ServerSpec:
    """How to start one server, and what its requests need on top of the standard body."""

    name: str
    command: list[str]
    extra_body: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    new_session: bool = False  # start it in a session of its own (setsid)


def unavailable_reason(server: str, build: bool = False) -> str | None:
    """Why `server` cannot be started here (None when it can). With `build`, llama.cpp's
    binaries are built when they are missing."""
    if server == "peregrine":
        if not module_available("peregrine.server.app"):
            return "peregrine.server.app is not importable (the server is not built in yet)"
    elif server == "llama.cpp":
        from peregrine.bench.peers.llamacpp_bin import available
        return available(build)
    elif server == "llama.cpp-python":
        missing = [m for m in ("llama_cpp", "llama_cpp.server", "sse_starlette",
                               "starlette_context", "pydantic_settings")
                   if not module_available(m)]
        if missing:
            return (f"llama-cpp-python's server is not installed (missing {missing}); "
                    "pip install -e '.[peers]'")
    else:
        raise ValueError(f"--launch must be one of {SERVERS}, got {server!r}")
    return None


def server_spec(server: str, port: int, *, model: str | None, threads: int,
                max_model_len: int, eos_token_ids: list[int],
                engine_args: list[str] | None = None, parallel: int = 32,
                llamacpp_args: list[str] | None = None) -> ServerSpec:
    """The command line of `server` on `port`, serving `model` with `threads` CPU threads
    (llama-server with `parallel` slots of `max_model_len` tokens each)."""
    if server == "peregrine":
        cmd = [sys.executable, "-m", "peregrine.cli", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--num-threads", str(threads),
               "--max-model-len", str(max_model_len)]
        if model:
            cmd += ["--model", model]
        return ServerSpec("peregrine", cmd + list(engine_args or []),
                          notes="continuous batching; ignore_eos in the body")
    if server == "llama.cpp":
        from peregrine.bench.peers.llamacpp_bin import find_bin_dir, server_command
        source = resolve_model(model)
        if source.format != "gguf":
            raise ValueError("llama-server needs a GGUF model")
        cmd = server_command(find_bin_dir(), source.path, port=port, threads=threads,
                             parallel=parallel, ctx_per_slot=max_model_len,
                             extra=llamacpp_args)
        # llama-server takes ignore_eos in the body (the client sends it) and max_tokens
        # as its n_predict. Started with setsid: in the process group of a Python client
        # it was seen to exit after its first request.
        return ServerSpec("llama.cpp", cmd, new_session=True,
                          notes=f"llama-server: {parallel} parallel slots, continuous "
                                "batching; ignore_eos in the body")
    if server == "llama.cpp-python":
        source = resolve_model(model)
        if source.format != "gguf":
            raise ValueError("the llama.cpp server needs a GGUF model")
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", source.path,
               "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads),
               "--n_threads_batch", str(threads), "--n_ctx", str(max_model_len),
               # By default a new request cuts off the one streaming; queue them instead.
               "--interrupt_requests", "False"]
        # llama-cpp-python has no ignore_eos: a -100 logit bias keeps EOS from being picked.
        bias = {str(t): -100.0 for t in eos_token_ids}
        return ServerSpec("llama.cpp-python", cmd, extra_body={"logit_bias": bias},
                          notes="llama-cpp-python server: one request at a time (the others "
                                "wait), EOS suppressed with logit_bias")
    raise ValueError(f"--launch must be one of {SERVERS}, got {server!r}")


class ServerProcess:
    """A server subprocess that is up (see `_ready`) inside `with`, and stopped (by its pid)
    after."""

    def __init__(self, spec: ServerSpec, port: int, log_path: str,
                 startup_timeout_s: float = 300.0) -> None:
        self.spec = spec
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        import httpx
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.spec.command, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=self.spec.new_session)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.__exit__(None, None, None)
                raise RuntimeError(f"{self.spec.name} server exited with code "
                                   f"{self.proc.returncode} while starting:\n{self.log_tail()}")
            if self._ready(httpx):
                return self
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"{self.spec.name} server did not come up in "
                           f"{self.startup_timeout_s:.0f}s:\n{self.log_tail()}")

    def _ready(self, httpx: Any) -> bool:
        """Up when /v1/models answers 200 and /health (where there is one) too: a server
        may list its model before the model has loaded."""
        try:
            if httpx.get(self.base_url + "/v1/models", timeout=2).status_code != 200:
                return False
            return httpx.get(self.base_url + "/health", timeout=2).status_code in (200, 404)
        except httpx.HTTPError:
            return False

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()

    def log_tail(self, n: int = 30) -> str:
        """The last lines the server printed."""
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    """Block until a peregrine server started as `proc` answers /health with 200;
    RuntimeError (with its stderr) if it exits or the time runs out first."""
    import httpx
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read()[-2000:] if proc.stderr else ""
            raise RuntimeError(f"the server at {url} did not become ready: {err}")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """Stop a server as Ctrl-C does (SIGINT: it drains in-flight requests), killing it if
    it has not exited within `timeout_s`."""
    import signal
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
