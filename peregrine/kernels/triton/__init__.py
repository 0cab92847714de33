"""Triton kernels of the GPU path (paged attention, KV write); on the CPU they run under
Triton's interpreter (TRITON_INTERPRET=1 set before the first import), which is how CI
checks them against the torch reference backend."""
