"""Run time: decoding at use and kernels."""
