"""The NCCL transport's host code (csrc/cuda/nccl.cu), run on the CPU.

nccl.cu is compiled with g++ against host-only stand-ins for CUDA's runtime and NCCL
(tests/cuda/mock/: device memory is host memory, ranks are threads, messages between two
ranks match in posting order as in NCCL), then runs every collective of the table with
ring and tree on 1-5 ranks (reduce, gather and scatter from every root), in and out of
place, with tiny and large pieces, and checks exact int64 results, including that ranks
without a result keep their buffers; every dtype and op through all-reduce and reduce;
and all_to_all with uneven counts through its own entry point.  That exercises the code
that walks the rounds, places pieces in scratch, reduces them and copies the tree
reduce-scatter's chunk out, which the GPU tests cannot reach without a GPU.  The mock
reduces on the CPU (csrc/reduce.cpp): the CUDA kernels themselves are left to the GPU
tests.
"""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = ["csrc/common.cpp", "csrc/reduce.cpp", "csrc/algorithms/collectives.cpp",
           "csrc/algorithms/cost.cpp", "csrc/algorithms/pairwise.cpp", "csrc/algorithms/ring.cpp",
           "csrc/algorithms/tree.cpp", "csrc/algorithms/rounds.cpp"]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_nccl_transport_on_mock_nccl(tmp_path):
    exe = tmp_path / "mock_nccl"
    build = subprocess.run(
        ["g++", "-O1", "-std=c++17", "-I", "tests/cuda/mock", "-I", "csrc",
         "-x", "c++", "tests/cuda/mock/mock.cpp", "csrc/cuda/nccl.cu", "-x", "none", *SOURCES,
         "-lpthread", "-o", str(exe)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "0 failures" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
    assert "checked 3519 cases" in run.stdout
