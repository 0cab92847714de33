"""`peregrine quantize`: load a float model, quantize it (RTN, GPTQ or AWQ), write a
checkpoint directory that `peregrine serve --model DIR` and `LLM(DIR)` load directly."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from peregrine.models.loader import load_model
from peregrine.quantization.apply import QuantSpec, quantize_model
from peregrine.quantization.calibrate import calibrated_quantize, calibration_sequences
from peregrine.quantization.checkpoint import save_quantized
from peregrine.quantization.corpus import calibration_text
from peregrine.quantization.mixed import (REFERENCE, apply_plan, measure, plan, plan_bits,
                                          uniform_bits)

logger = logging.getLogger("peregrine")

ALGORITHMS = ("rtn", "gptq", "awq")


@dataclass
class QuantizeOptions:
    """Everything `peregrine quantize` takes besides the model and the output directory."""

    method: str = "gptq"  # rtn | gptq | awq
    format: str = "int4"  # int4 | int8 | nf4 (| fp8 for rtn)
    group_size: int | None = None  # None: the format's default (see QuantSpec)
    symmetric: bool = False
    act_order: bool = False  # GPTQ only
    damp: float = 0.01  # GPTQ only: fraction of mean(diag H) added to the diagonal
    calib_samples: int = 32
    calib_seq_len: int = 256
    calib_corpus: str | None = None  # None: the bundled corpus' calibration half
    mixed: bool = False  # per-layer formats from measured sensitivity (mixed.py; RTN)
    target_bits: float | None = None  # mixed: bits per weight; None: uniform int4-g128's
    sensitivity_tokens: int = 512  # mixed: calibration tokens each sensitivity is measured on


def quantize_to_dir(model: str | None, out_dir: str, opts: QuantizeOptions) -> dict:
    """Quantize `model` and save it to `out_dir`; returns a summary dict."""
    if opts.method not in ALGORITHMS:
        raise ValueError(f"method must be one of {ALGORITHMS}, got {opts.method!r}")
    if opts.mixed and opts.method != "rtn":
        raise ValueError("--mixed chooses formats per layer with round-to-nearest; use "
                         "--method rtn")
    spec = QuantSpec(opts.format, opts.group_size, opts.symmetric)
    t0 = time.perf_counter()
    loaded = load_model(model, dtype=torch.float32)
    net, tok = loaded.model, loaded.tokenizer
    if opts.mixed and loaded.config.is_moe:
        raise ValueError("--mixed measures linears one by one; a mixture of experts' experts "
                         "are not measured yet: quantize it uniformly (--method rtn)")
    if opts.mixed:
        info = _quantize_mixed(net, tok.encode(calibration_text(opts.calib_corpus)), opts)
        info["source"] = loaded.source.name
        save_quantized(net, loaded.config, tok, out_dir, info)
        return {**{k: v for k, v in info.items() if k != "mixed"}, "out_dir": out_dir,
                "seconds": round(time.perf_counter() - t0, 1),
                "formats": _count(info["mixed"]["plan"])}
    if opts.method == "rtn":
        quantize_model(net, spec)
    else:
        ids = tok.encode(calibration_text(opts.calib_corpus))
        if max(ids) >= loaded.config.vocab_size:
            raise ValueError("the tokenizer produces ids beyond the model's vocabulary "
                             f"({loaded.config.vocab_size}); give the model its tokenizer")
        seqs = calibration_sequences(ids, opts.calib_samples, opts.calib_seq_len)
        logger.info("calibrating %s on %d x %d tokens", opts.method, len(seqs), len(seqs[0]))
        calibrated_quantize(net, seqs, spec, opts.method, opts.act_order, opts.damp)
    info = {"method": opts.method, "format": spec.method, "bits": 8 if spec.method in
            ("int8", "fp8") else 4, "group_size": spec.group_size, "symmetric": spec.symmetric,
            "act_order": opts.act_order, "source": loaded.source.name}
    save_quantized(net, loaded.config, tok, out_dir, info)
    return {**info, "out_dir": out_dir, "seconds": round(time.perf_counter() - t0, 1)}


def _quantize_mixed(net: torch.nn.Module, ids: list[int], opts: QuantizeOptions) -> dict:
    """Measure, plan and apply per-layer formats; the checkpoint's quantization info."""
    stats = measure(net, ids[:opts.sensitivity_tokens], context=opts.calib_seq_len)
    target = opts.target_bits or uniform_bits(stats, REFERENCE)
    choice = plan(stats, target)
    apply_plan(net, choice)
    bits = plan_bits(stats, choice)
    logger.info("mixed: %.3f bits per weight (target %.3f): %s", bits, target, _count(choice))
    return {"method": "rtn", "format": "mixed", "bits": round(bits, 3), "group_size": None,
            "symmetric": False, "act_order": False,
            "mixed": {"target_bits": target, "bits_per_weight": bits, "plan": choice,
                      "sensitivity": {s.name: s.sensitivity for s in stats}}}


def _count(choice: dict[str, str]) -> dict[str, int]:
    """How many linears got each format."""
    out: dict[str, int] = {}
    for fmt in choice.values():
        out[fmt] = out.get(fmt, 0) + 1
    return dict(sorted(out.items()))
