"""Compute kernels: torch reference ops (CPU) and Triton kernels (GPU), same signatures."""
