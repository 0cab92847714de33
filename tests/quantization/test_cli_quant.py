"""`peregrine quantize` and `peregrine eval ppl` from the command line."""

from __future__ import annotations

import json

from peregrine.cli import main
from tests.conftest import write_hf_checkpoint


def test_quantize_then_eval_ppl(tmp_path, capsys):
    src, _ = write_hf_checkpoint(tmp_path, "llama", hidden_size=64, intermediate_size=128,
                                 vocab_size=49152)
    out = str(tmp_path / "q")
    assert main(["quantize", src, out, "--method", "rtn", "--bits", "8"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "int8" and summary["method"] == "rtn"
    result = str(tmp_path / "ppl.json")
    assert main(["eval", "ppl", "--model", out, "--max-tokens", "64", "--context", "32",
                 "--kv-cache-dtype", "int8", "--json", result]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # two disjoint windows of 32: the first token of each has no history and is not scored
    assert line["tokens"] == 62 and line["windows"] == 2 and line["kv_cache_dtype"] == "int8"
    assert line["ppl"] > 1
    with open(result) as f:
        assert json.load(f)["ppl"] == line["ppl"]


def test_bad_quantize_arguments_are_reported(tmp_path, capsys):
    src, _ = write_hf_checkpoint(tmp_path, "llama", hidden_size=64, intermediate_size=128)
    assert main(["quantize", src, str(tmp_path / "q"), "--group-size", "48"]) == 2
    assert "group_size" in capsys.readouterr().err
