"""The `peregrine` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peregrine.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_generate_answers_the_capital_of_france():
    res = run_cli("generate", "Name the capital city of France.", "--kv-cache-memory", "0.25")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout
    assert "tok/s" in res.stderr


def test_generate_raw_with_seed_is_reproducible():
    args = ("generate", "--raw", "Once upon a time", "--max-tokens", "12", "--temperature",
            "0.9", "--seed", "7", "--kv-cache-memory", "0.25")
    a, b = run_cli(*args), run_cli(*args)
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()


def test_generate_with_a_json_schema(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"city": {"type": "string", '
                      '"maxLength": 10}}, "required": ["city"], "additionalProperties": false}')
    res = run_cli("generate", "Where is the Eiffel tower? Answer in JSON.", "--json-schema",
                  str(schema), "--max-tokens", "40", "--kv-cache-memory", "0.25")
    assert res.returncode == 0, res.stderr
    answer = json.loads(res.stdout)
    assert list(answer) == ["city"] and len(answer["city"]) <= 10
    res = run_cli("generate", "x", "--regex", "(", "--kv-cache-memory", "0.25")
    assert res.returncode == 2 and "invalid regex" in res.stderr and "Traceback" not in res.stderr


def test_unknown_model_is_a_clear_error():
    res = run_cli("generate", "hi", "--model", "no-such-model")
    assert res.returncode == 2
    assert "unknown model 'no-such-model'" in res.stderr and "Traceback" not in res.stderr


def test_chat_streams_an_answer():
    proc = subprocess.run([sys.executable, "-m", "peregrine.cli", "chat", "--max-tokens", "16",
                           "--kv-cache-memory", "0.25"], input="Name the capital city of France.\n\n",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout and "tok/s" in proc.stdout


def test_serve_ray_refuses_bad_replica_flags_before_starting_anything():
    res = run_cli("serve", "--ray", "--model", "a", "--model", "b", timeout=60)
    assert res.returncode == 2 and "--ray serves one model" in res.stderr
    res = run_cli("serve", "--ray", "--min-replicas", "2", timeout=60)
    assert res.returncode == 2 and "both --min-replicas and --max-replicas" in res.stderr
    assert "Traceback" not in res.stderr
