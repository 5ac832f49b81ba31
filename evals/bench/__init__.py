"""Benchmarks and profilers of the kernels and the whole model (run on a GPU; most have a CPU
smoke mode)."""
