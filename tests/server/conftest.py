"""Real servers for the server tests: uvicorn in a background thread on a free port."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from peregrine.config import EngineConfig
from peregrine.engine.async_engine import AsyncLLMEngine
from peregrine.server.app import ServerArgs, create_app


SMALL_KV = dict(kv_cache_memory=0.25)


@dataclass
class RunningServer:
    """A live server: its base URL, its app and its async engine."""

    url: str
    app: FastAPI
    engine: AsyncLLMEngine
    uvicorn: uvicorn.Server
    args: ServerArgs

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def metrics(self) -> dict[str, float]:
        """The /metrics text as {name{labels}: value} (labels stripped of model_name)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return parse_metrics(text)

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """Poll /metrics until nothing runs or waits and no KV block is held."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m.get("peregrine:num_requests_running") == 0
                    and m.get("peregrine:num_requests_waiting") == 0
                    and m.get("peregrine:kv_cache_usage") == 0)
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.05)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name' or 'name{label="v"}' (model_name dropped): value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$', line)
        if not m:
            continue
        name, labels, value = m.groups()
        kept = [lab for lab in re.findall(r'\w+="[^"]*"', labels or "")
                if not lab.startswith("model_name=")]
        key = name + ("{" + ",".join(kept) + "}" if kept else "")
        out[key] = out.get(key, 0.0) + float(value)
    return out


@contextlib.contextmanager
def serve(args: ServerArgs, config: EngineConfig | None = None, app: FastAPI | None = None,
          wait_loaded: bool = True) -> Iterator[RunningServer]:
    """Start a server (of `config`, or a prebuilt `app`) on a free port in a background
    thread; stop it on exit."""
    app = app or create_app(args, config or EngineConfig(**SMALL_KV))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    state = app.state.peregrine
    if wait_loaded:
        state.engine.wait_ready(timeout=300)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", app, state.engine, server, args)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    """The default server: SmolLM2-135M-Instruct, a small KV pool, no API key."""
    with serve(ServerArgs(max_queue_len=64), EngineConfig(**SMALL_KV)) as s:
        yield s


@pytest.fixture(scope="session")
def strict_server() -> Iterator[RunningServer]:
    """A server that runs one sequence at a time, queues one more, and wants an API key."""
    args = ServerArgs(api_key="sk-test-key", max_queue_len=1, served_model_name="smol")
    with serve(args, EngineConfig(kv_cache_memory=0.05, max_num_seqs=1)) as s:
        yield s


@pytest.fixture
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client
