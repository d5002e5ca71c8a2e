"""Test-wide set-up.

TRITON_INTERPRET must be set before anything imports triton: the kernel tests run the real
Triton kernels on CPU tensors through Triton's interpreter, on machines without a GPU.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
