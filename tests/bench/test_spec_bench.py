"""`peregrine bench spec`: every proposer against no speculation on the same requests, with
acceptance counters and a check that greedy outputs stayed identical."""

from __future__ import annotations

import json

from peregrine.cli import main


def test_spec_bench_compares_proposers_on_the_same_requests(tmp_path):
    out = tmp_path / "spec.json"
    assert main(["bench", "spec", "--proposers", "ngram", "--workloads", "copy",
                 "--batch-sizes", "2", "--max-tokens", "6", "--num-requests", "2",
                 "--kv-cache-memory", "0.2", "--threads", "2", "--output", str(out), "--markdown",
                 str(tmp_path / "spec.md")]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["proposer"], r["workload"], r["batch"]) for r in runs] == [
        ("none", "copy", 2), ("ngram", "copy", 2)]
    none, ngram = runs
    assert none["draft_tokens"] == 0 and none["decode_speedup"] == 1.0
    assert ngram["draft_tokens"] > 0 and ngram["identical_to_baseline"]
    assert ngram["output_tokens"] == none["output_tokens"] == 2 * 6
    assert "| copy | 2 | ngram |" in (tmp_path / "spec.md").read_text()
