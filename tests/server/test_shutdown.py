"""`peregrine serve` stops cleanly on SIGTERM / Ctrl-C: no new requests, in-flight ones
finish within --shutdown-timeout (the rest are aborted), exit status 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(url: str, max_tokens: int, out: dict, first: threading.Event) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    events = []
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first.set()
    except httpx.HTTPError as e:
        out["error"] = repr(e)
    out["events"] = events


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_short_requests_aborts_long_ones_and_exits_0(sig):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "peregrine.cli", "serve", "--port", str(port),
         "--kv-cache-memory", "0.1", "--shutdown-timeout", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        banner = ""
        deadline = time.monotonic() + 240
        while "OpenAI API" not in banner and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            banner += line
        assert f"playground:  {url}/" in banner

        short, long = {}, {}
        first_short, first_long = threading.Event(), threading.Event()
        threads = [threading.Thread(target=_stream, args=(url, 3, short, first_short)),
                   threading.Thread(target=_stream, args=(url, 2000, long, first_long))]
        for t in threads:
            t.start()
        assert first_short.wait(120) and first_long.wait(120), (short, long)
        proc.send_signal(sig)
        time.sleep(0.5)
        # No new requests once stopping: refused, or (when the kernel had already queued
        # the connection on the listening socket) reset as the socket closes.
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.get(url + "/health", timeout=5)
        for t in threads:
            t.join(120)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "shutting down" in stderr
    assert short["events"][-1] == "[DONE]"  # finished within the grace period
    finish = [json.loads(e)["choices"][0]["finish_reason"] for e in short["events"][:-1]]
    assert finish[-1] == "length"
    # The long one was aborted at the timeout, and its stream still ended properly.
    assert long["events"][-1] == "[DONE]"
    assert json.loads(long["events"][-2])["choices"][0]["finish_reason"] == "abort"
    assert len(long["events"]) < 2000  # aborted long before its 2,000 tokens
