"""Fixtures of the quantization tests: the compiled kernels (built once, cached on disk)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def quant_ops():
    """The C++ kernels; the first build compiles (~1 min), later sessions load the cache."""
    from peregrine.kernels.cpu import cpu_supports_kernels, quant_ops
    if not cpu_supports_kernels():
        pytest.skip("this CPU has no AVX2/FMA: the C++ kernels do not apply")
    ops = quant_ops()
    assert ops is not None, "the C++ kernels failed to build (see the logged warning)"
    return ops
