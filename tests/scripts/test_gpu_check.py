"""scripts/gpu_check.sh: its dry run takes every code path of the GPU check on the CPU and
writes a summary with every field; the summary never holds numbers no part measured;
failed and timed-out parts are recorded as such."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from peregrine.bench.roofline import DevicePeak, ModelCost

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
RESULTS = os.path.join(ROOT, "docs", "bench-results", "gpu")


def load_gpu_bench():
    spec = importlib.util.spec_from_file_location(
        "gpu_bench", os.path.join(ROOT, "scripts", "gpu_bench.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gb = load_gpu_bench()
ENV = {"dry_run": False, "device": "NVIDIA H200", "date": "2026-01-01", "torch": "2.11",
       "triton": "3.6"}


def run_check(*args: str, timeout: float = 400, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **env_vars}
    env.pop("TRITON_INTERPRET", None)  # the script must set it itself
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def results_state() -> dict[str, float]:
    if not os.path.isdir(RESULTS):
        return {}
    return {n: os.path.getmtime(os.path.join(RESULTS, n)) for n in os.listdir(RESULTS)}


def test_dry_run_writes_every_summary_field_and_leaves_the_results_alone(tmp_path):
    before = results_state()
    out = tmp_path / "out"
    res = run_check("--dry-run", "--out", str(out))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert results_state() == before
    assert sorted(os.listdir(out)) == ["gpu_check.log", "summary.json", "summary.md"]
    s = json.loads((out / "summary.json").read_text())
    assert s["dry_run"] is True
    assert s["device"] and s["date"] and s["torch"] and s["triton"]
    assert {p: v["status"] for p, v in s["parts"].items()} == {p: "ok" for p in gb.PARTS}
    assert s["kernel_tests"]["passed"] > 0 and s["kernel_tests"]["failed"] == 0
    # float32 could meet a near-tie on some platform; float64 has none (tests/kernels).
    assert isinstance(s["parity"]["triton_vs_torch_identical"], bool)
    assert s["parity"]["wider_dtype"]["triton_vs_torch_identical"] is True
    assert min(s["parity"]["prefix_cache_hits"].values()) > 0
    assert {r["batch"] for r in s["decode"]} == set(gb.DRY.decode_batches)
    for row in s["decode"]:
        assert row["tok_s"] > 0 and row["mbu"] > 0 and isinstance(row["cuda_graphs"], bool)
    assert [r["tokens"] for r in s["prefill"]] == list(gb.DRY.prefill_tokens)
    assert all(r["mfu"] > 0 for r in s["prefill"])
    off = s["offline"]
    assert off["output_tok_s"] > 0 and off["transformers_output_tok_s"] > 0
    assert 0 < off["roofline_frac"] < 1
    assert off["peregrine"]["output_tokens"] == off["peregrine"]["requested_output_tokens"]
    assert {r["kernel"] for r in s["attention"]} == {"decode", "prefill"}
    assert {r["format"] for r in s["gemm"]} == {"int8", "int4", "fp8"}
    assert all(r["max_rel_error"] < 1e-3 for r in s["gemm"])
    assert set(s["goals"]) == {g[0] for g in gb.GOALS}
    assert "DRY RUN" in (out / "summary.md").read_text()


def test_a_part_out_of_time_is_recorded_and_the_next_part_still_runs(tmp_path):
    """decode needs several seconds even as a dry run (15 s on 2 cores); 2 s stop it."""
    res = run_check("--dry-run", "--out", str(tmp_path), timeout=120,
                    GPU_CHECK_PARTS="decode:2 gemm:60")
    assert res.returncode == 1
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["parts"]["decode"]["status"] == "timeout"
    assert s["parts"]["gemm"]["status"] == "ok" and s["gemm"]
    assert s["parts"]["offline"]["status"] == "not run"
    assert s["offline"]["output_tok_s"] is None


def test_only_names_existing_parts(tmp_path):
    res = run_check("--dry-run", "--only", "gemm,decod", "--out", str(tmp_path), timeout=30)
    assert res.returncode == 2 and "no part named decod" in res.stderr
    assert not os.listdir(tmp_path)


def test_dry_run_refuses_to_write_where_gpu_results_live():
    before = results_state()
    res = run_check("--dry-run", "--out", RESULTS, timeout=30)
    assert res.returncode == 2
    assert "never writes" in res.stderr
    assert results_state() == before


def test_summary_of_missing_failed_and_timed_out_parts_holds_no_numbers():
    statuses = gb.read_statuses_lines(["kernel_tests 1 80.2 80", "decode 124 105.0 105",
                                       "offline 137 100.1 100", "offline_hf skip 0 0",
                                       f"gemm {gb.PARTIAL} 29.0 30"])
    s = gb.build_summary({}, statuses, ENV)
    assert s["kernel_tests"] == {"passed": None, "failed": None}
    assert s["parity"] == {"triton_vs_torch_identical": None}
    assert s["decode"] == [] and s["prefill"] == []
    assert s["offline"]["output_tok_s"] is None and s["offline"]["roofline_frac"] is None
    assert s["offline"]["transformers_output_tok_s"] is None
    assert all(g["value"] is None and g["met"] is None for g in s["goals"].values())
    assert {p: v["status"] for p, v in s["parts"].items()} == {
        "kernel_tests": "failed (rc 1)", "attention": "not run",
        "gemm": "partial (stopped at its time limit)",
        "parity": "not run", "decode": "timeout", "offline": "timeout",
        "offline_hf": "skipped (no time left)"}
    assert "| decode | timeout |" in gb.summary_markdown(s)


def test_summary_takes_goals_from_the_graph_row_at_batch_1_and_prefill_at_2048():
    decode = [{"batch": 1, "tok_s": 50.0, "mbu": 0.5, "cuda_graphs": False, "step_ms": 20.0},
              {"batch": 1, "tok_s": 90.0, "mbu": 0.85, "cuda_graphs": True, "step_ms": 11.0}]
    prefill = [{"tokens": 512, "mfu": 0.3, "tok_s": 1.0, "ms": 1.0},
               {"tokens": 2048, "mfu": 0.55, "tok_s": 1.0, "ms": 1.0}]
    parts = {"decode": {"decode": decode, "prefill": prefill},
             "offline": {"offline": {"output_tok_s": 3000.0, "roofline_frac": 0.3}},
             "offline_hf": {"offline_hf": {"output_tok_s": 500.0}},
             "kernel_tests": {"kernel_tests": {"passed": 40, "failed": 1, "errors": 1,
                                               "skipped": 0, "timed_out": False,
                                               "failures": ["a::b", "c::d"]}}}
    s = gb.build_summary(parts, {}, ENV)
    goals = {k: (g["value"], g["met"]) for k, g in s["goals"].items()}
    assert goals == {"decode_mbu_batch1": (0.85, True), "prefill_mfu_2048": (0.55, False),
                     "offline_roofline_frac": (0.3, False), "offline_vs_transformers": (6.0, True)}
    assert s["kernel_tests"]["failed"] == 2  # errors count as failures
    assert s["offline"]["transformers_output_tok_s"] == 500.0


def test_outcomes_are_counted_from_a_pytest_run_killed_midway():
    output = "\n".join([
        "collecting ... collected 5 items",
        "tests/kernels/test_a.py::test_x[bf16] PASSED [ 20%]",
        "tests/kernels/test_a.py::test_y FAILED [ 40%]",
        "tests/engine/test_cuda_graphs.py::test_z SKIPPED (needs a GPU) [ 60%]",
        "tests/kernels/test_b.py::test_w ERROR [ 80%]",
        "tests/kernels/test_b.py::test_v "])  # killed here
    counts = gb.count_outcomes(output)
    assert counts == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1, "xfailed": 0,
                      "xpassed": 0, "failures": ["tests/kernels/test_a.py::test_y",
                                                 "tests/kernels/test_b.py::test_w"]}


def test_workload_roofline_is_the_longer_of_all_flops_and_all_bytes_at_peak():
    peak = DevicePeak("test", flops=1.0, bandwidth=1.0, source="test")
    # Memory only: 100 weight bytes per pass, 1 KV byte per token read or written.
    cost = ModelCost(layer_params=0, head_params=0, attn_flops_per_pair=0, weight_bytes=100,
                     kv_bytes_per_token=1)
    # (2 prompt, 3 out): prefill reads+writes 2+2, decodes at 2 and 3 touch 4 and 5 -> 13;
    # (1 prompt, 1 out): 1+1 -> 2. At least 3 passes (the longest output) ...
    assert gb.workload_roofline_seconds(cost, [2, 1], [3, 1], 2, peak) == 3 * 100 + 15
    # ... and at least 4 when a pass holds one sequence.
    assert gb.workload_roofline_seconds(cost, [2, 1], [3, 1], 1, peak) == 4 * 100 + 15
    # Compute only: 2 FLOPs per parameter per computed token (2 + 2 and 1 + 0 tokens).
    cost = ModelCost(layer_params=10**6, head_params=0, attn_flops_per_pair=0, weight_bytes=0,
                     kv_bytes_per_token=0)
    assert gb.workload_roofline_seconds(cost, [2, 1], [3, 1], 2, peak) == pytest.approx(1e7)


def test_full_sizes_are_the_issues_workloads_on_shipped_configs():
    from peregrine.models.registry import shipped_configs
    full = gb.FULL
    assert {full.big_model, full.small_model} <= set(shipped_configs())
    assert (full.big_model, full.small_model, full.dtype) == ("llama-3-8b", "llama-3.2-1b",
                                                              "bfloat16")
    assert full.decode_batches == (1, 8, 64, 256)
    assert full.prefill_tokens == (512, 2048, 8192)
    assert (full.offline_requests, full.offline_lens) == (256, (100, 1024))
    assert full.parity_stem + full.parity_suffix[1] > full.parity_budget  # chunked prefill


def test_part_limits_fit_in_eight_minutes():
    text = open(SCRIPT).read()
    parts = text.split('PARTS=${GPU_CHECK_PARTS:-"')[1].split('"')[0].split()
    limits = {p.split(":")[0]: int(p.split(":")[1]) for p in parts}
    assert list(limits) == gb.PARTS
    total = int(text.split("\nTOTAL_S=")[1].split()[0])
    assert sum(limits.values()) <= total <= 8 * 60 - 10  # 10 s for the summary


def test_offline_stops_at_its_time_limit_and_keeps_what_it_has(tmp_path):
    """With a limit shorter than the engine's start, no step runs before the deadline."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_bench.py"),
                          "offline", "--work", str(tmp_path), "--dry-run", "--time-limit", "16"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == gb.PARTIAL, res.stderr[-3000:]
    off = json.loads((tmp_path / "offline.json").read_text())["offline"]
    assert off["completed"] is False
    assert off["output_tokens"] < off["requested_output_tokens"]
    assert off["roofline_frac"] is None  # the workload's bound needs the whole workload
