"""Every `peregrine bench` command once, at a tiny size: the plumbing from flags to saved
JSON, markdown and plots (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from peregrine.bench.launch import module_available
from peregrine.cli import main

PEAK_FLAGS = ["--peak-flops", "1e11", "--peak-bandwidth", "1e10"]  # no CPU measurement


def tiny_flags(tiny_model_dir: str) -> list[str]:
    return ["--model", tiny_model_dir, "--load-format", "dummy", "--num-kv-blocks", "256",
            "--block-size", "4", *PEAK_FLAGS]


def run_json(argv: list[str], path) -> dict:
    assert main(argv + ["--output", str(path)]) == 0
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def throughput_result(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "throughput.json"
    md = out.with_suffix(".md")
    data = run_json(["bench", "throughput", "--num-prompts", "3", "--input-len", "4-12",
                     "--output-len", "2-4", "--batching", "continuous,static",
                     "--markdown", str(md), *tiny_flags(tiny_model_dir)], out)
    return data, out, md


def test_throughput_command_saves_json_and_markdown(throughput_result):
    data, _, md = throughput_result
    assert data["kind"] == "throughput"
    assert {"workload", "peak", "env", "runs", "ratios"} <= set(data)
    assert [r["label"] for r in data["runs"]] == ["peregrine (continuous)", "peregrine (static)"]
    assert data["ratios"][0]["output_tokens_per_s"] == 1.0
    ratio = data["runs"][1]["output_tokens_per_s"] / data["runs"][0]["output_tokens_per_s"]
    assert data["ratios"][1]["output_tokens_per_s"] == pytest.approx(ratio)
    w = data["workload"]
    for run in data["runs"]:
        assert run["prompt_tokens"] == w["prompt_tokens"]
        assert run["output_tokens"] == w["output_tokens"]
        assert run["total_tokens"] == run["prompt_tokens"] + run["output_tokens"]
        assert run["settings"]["threads"] == os.cpu_count()
    assert data["peak"]["source"] == "given on the command line"
    assert data["env"]["torch"] and data["env"]["cores"] == os.cpu_count()
    text = md.read_text()
    assert "| peregrine (static) |" in text and "peregrine bench throughput" in text


def test_file_workload(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_token_ids": [5, 6, 7], "max_tokens": 3}\n'
                       '{"prompt_token_ids": [9, 9], "max_tokens": 2}\n')
    data = run_json(["bench", "throughput", "--dataset-path", str(prompts),
                     *tiny_flags(tiny_model_dir)], tmp_path / "t.json")
    run = data["runs"][0]
    assert (run["prompt_tokens"], run["output_tokens"]) == (5, 5)
    assert data["workload"]["dataset"].startswith("file ")


def test_bad_batching_is_a_clear_error(tiny_model_dir, capsys):
    assert main(["bench", "throughput", "--batching", "continuous,eager",
                 *tiny_flags(tiny_model_dir)]) == 2
    assert "--batching takes continuous, dynamic or static, got 'eager'" in capsys.readouterr().err


def test_latency_command(tiny_model_dir, tmp_path):
    data = run_json(["bench", "latency", "--input-lens", "4,40", "--batch-sizes", "1,3",
                     "--output-len", "3", "--decode-prompt-len", "6", "--iters", "2",
                     *tiny_flags(tiny_model_dir)], tmp_path / "lat.json")
    assert data["kind"] == "latency"
    assert [t["prompt_len"] for t in data["ttft"]] == [4, 40]
    assert [d["batch_size"] for d in data["decode"]] == [1, 3]
    for t in data["ttft"]:
        assert t["ttft_ms"]["median"] > 0 and t["steps_per_request"] >= 1
    for d in data["decode"]:
        assert d["decode_steps"] >= 1 and d["tokens_per_s"] > 0
        assert d["tokens_per_s"] == pytest.approx(d["batch_size"] * d["tokens_per_s_per_seq"])
        e = d["energy"]  # this machine's meter (the model where RAPL cannot be read)
        assert e["source"] in ("rapl", "model") and e["joules"] > 0
        assert e["joules_per_output_token"] == pytest.approx(e["joules"] / (d["batch_size"] * 3))


def test_plot_and_report_commands(throughput_result, tmp_path, capsys):
    _, path, _ = throughput_result
    assert main(["bench", "plot", str(path), "--out-dir", str(tmp_path / "img")]) == 0
    png = tmp_path / "img" / "throughput.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n<!-- BEGIN bench:throughput -->\nold\n"
                   "<!-- END bench:throughput -->\nprose stays\n"
                   "<!-- BEGIN bench:missing -->\nkept\n<!-- END bench:missing -->\n")
    assert main(["bench", "report", "--doc", str(doc), "--results-dir", str(path.parent)]) == 0
    text = doc.read_text()
    assert "old" not in text and "| peregrine (continuous) |" in text
    assert "prose stays" in text and "kept" in text
    assert "updated" in capsys.readouterr().out


def test_compare_runs_each_engine_in_its_own_process(tiny_model_dir, tmp_path):
    engines = "peregrine:continuous,transformers" if module_available("transformers") \
        else "peregrine:continuous"
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [sys.executable, "-m", "peregrine.cli", "bench", "compare", "--engines",
         engines + ",llama.cpp,llama.cpp-python", "--num-prompts", "2", "--input-len",
         "4-8", "--output-len", "2-3", "--hf-batch-size", "2", "--output-dir", str(out), *tiny_flags(tiny_model_dir)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "compare.json").read_text())
    runs = {r["engine"]: r for r in data["runs"]}
    assert not runs["peregrine"].get("error")
    assert "fixed workloads" in runs["llama.cpp"]["error"]  # the binaries: --workloads
    assert runs["llama.cpp-python"]["error"]  # not installed, or no GGUF for it here
    if "transformers" in engines:
        assert runs["transformers"]["output_tokens"] == runs["peregrine"]["output_tokens"]
        assert runs["transformers"]["prompt_tokens"] == runs["peregrine"]["prompt_tokens"]
    assert (out / "compare.md").read_text().count("\n| ") >= 3


def test_compare_workloads_runs_peregrine_and_reports_llamacpp_errors(tiny_model_dir,
                                                                      tmp_path):
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [sys.executable, "-m", "peregrine.cli", "bench", "compare", "--workloads",
         "pp8,tg3,batch2x4x3", "--engines", "peregrine,llama.cpp,transformers",
         "--repetitions", "2", "--output-dir", str(out), *tiny_flags(tiny_model_dir)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "compare.json").read_text())
    assert data["kind"] == "workloads"
    assert [w["name"] for w in data["workloads"]] == ["pp8", "tg3", "batch2x4x3"]
    ours = [r for r in data["runs"] if r["engine"] == "peregrine"]
    assert [r["workload"] for r in ours] == ["pp8", "tg3", "batch2x4x3"]
    for r in ours:
        assert not r.get("error") and r["tokens_per_s"] > 0 and r["mfu"] > 0
    assert ours[0]["repetitions"] == 2 and ours[2]["repetitions"] == 1
    assert ours[2]["decode"]["tokens"] + ours[2]["prefill"]["tokens"] >= 2 * 3
    others = [r for r in data["runs"] if r["engine"] != "peregrine"]
    assert len(others) == 6 and all(r["error"] for r in others)  # dummy weights: no GGUF
    assert "| tg3 | peregrine |" in (out / "compare.md").read_text()


def test_throughput_points_llamacpp_to_its_workloads(tiny_model_dir, capsys):
    assert main(["bench", "throughput", "--engine", "llama.cpp",
                 *tiny_flags(tiny_model_dir)]) == 2
    assert "bench workloads --engine llama.cpp" in capsys.readouterr().err
