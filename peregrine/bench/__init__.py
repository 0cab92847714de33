"""Benchmarks: offline throughput, latency, online serving, peers side by side, plots."""
