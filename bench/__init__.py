"""pycomm's microbenchmarks: `python -m bench` (collectives) and `python -m bench kernels`."""
