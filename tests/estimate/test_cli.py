"""`peregrine estimate` on the command line."""

from __future__ import annotations

import json

from peregrine.cli import main


def test_json_output(capsys):
    assert main(["estimate", "--model", "llama-2-7b", "--max-model-len", "2048",
                 "--max-num-seqs", "4", "--devices", "L4,H100,RTX 4090", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model"] == "llama-2-7b" and r["kv_cache_bytes_per_token"] == 2 * 32 * 4096 * 2
    assert [d["name"] for d in r["devices"]] == ["L4", "H100", "RTX 4090"]


def test_table_output(capsys):
    assert main(["estimate", "--model", "llama-3-70b", "--quantization", "int4",
                 "--max-model-len", "4096", "--max-num-seqs", "8", "--devices", "H100"]) == 0
    out = capsys.readouterr().out
    assert "weights" in out and "KV cache" in out and "H100" in out


def test_errors_exit_2(capsys):
    assert main(["estimate", "--model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["estimate", "--model", "llama-2-7b", "--prompt-len", "-3"]) == 2
    assert "prompt_len" in capsys.readouterr().err
