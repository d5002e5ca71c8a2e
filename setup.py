"""Builds pycomm's two native libraries.

pycomm._C (always): the C++ collectives, with torch's cpp_extension.  The C++ core
(csrc/) includes no torch headers: algorithms and transports work on plain pointers;
csrc/bindings.cpp exposes them through pybind11 and csrc/torch/ is the c10d backend.

pycomm/_pycomm_cuda.so (when CUDA can be built): the GPU transports, csrc/cuda/*.cu plus
the torch-free algorithms, compiled by nvcc into a plain shared library with a C ABI
(csrc/cuda/pycomm_cuda.h) that pycomm/_cuda.py loads with ctypes.  It needs no CUDA
build of torch and no GPU to compile, only nvcc and NCCL's headers and library, so CI
compiles it on machines without a GPU.  Environment:

    PYCOMM_CUDA=auto   build it if nvcc and NCCL are found, else skip (default)
    PYCOMM_CUDA=1      build it or fail (CI: the compile check)
    PYCOMM_CUDA=0      never build it
    PYCOMM_CUDA_ARCH   compute capabilities, e.g. "90" or "80;90" (default "80;90")
    NCCL_HOME          NCCL's prefix (include/, lib/); default: the nvidia-nccl-cu* wheel
    CUDA_HOME          the CUDA toolkit (for nvcc); default: nvcc on PATH
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

here = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))

# What the CUDA library is made of: its own sources and the torch-free core it executes.
CUDA_SOURCES = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))) + [
    os.path.join("csrc", "common.cpp"),
    os.path.join("csrc", "algorithms", "collectives.cpp"),
    os.path.join("csrc", "algorithms", "cost.cpp"),
    os.path.join("csrc", "algorithms", "pairwise.cpp"),
    os.path.join("csrc", "algorithms", "ring.cpp"),
    os.path.join("csrc", "algorithms", "tree.cpp"),
    os.path.join("csrc", "algorithms", "rounds.cpp"),
]
CUDA_LIB = "_pycomm_cuda.so"


def _find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _find_nccl():
    """(include dir, lib dir) of NCCL: $NCCL_HOME, or the nvidia-nccl-cu* wheel."""
    homes = [os.environ["NCCL_HOME"]] if os.environ.get("NCCL_HOME") else []
    homes += [os.path.join(p, "nvidia", "nccl") for p in sys.path if p]
    for home in homes:
        inc, lib = os.path.join(home, "include"), os.path.join(home, "lib")
        if os.path.exists(os.path.join(inc, "nccl.h")) and glob.glob(os.path.join(lib, "libnccl.so*")):
            return inc, lib
    return None


class BuildWithCuda(BuildExtension.with_options(use_ninja=True)):
    def run(self):
        super().run()
        self._build_cuda()

    def _build_cuda(self):
        mode = os.environ.get("PYCOMM_CUDA", "auto").lower()
        if mode in ("0", "no", "off", "false"):
            return
        nvcc, nccl = _find_nvcc(), _find_nccl()
        missing = [what for what, found in (("nvcc", nvcc), ("NCCL (pip install nvidia-nccl-cu12, "
                                                              "or set NCCL_HOME)", nccl)) if not found]
        if missing:
            msg = "pycomm: not building the CUDA transports: no " + " and no ".join(missing)
            if mode == "auto":
                print(msg, file=sys.stderr)
                return
            raise RuntimeError(msg + " (PYCOMM_CUDA=1 requires them)")
        out_dir = os.path.join(here, "pycomm") if self.inplace else os.path.join(self.build_lib, "pycomm")
        os.makedirs(out_dir, exist_ok=True)
        out = os.path.join(out_dir, CUDA_LIB)
        headers = glob.glob(os.path.join(here, "csrc", "**", "*.h"), recursive=True) + glob.glob(
            os.path.join(here, "csrc", "cuda", "*.cuh"))
        inputs = [os.path.join(here, s) for s in CUDA_SOURCES] + headers + [os.path.abspath(__file__)]
        if os.path.exists(out) and os.path.getmtime(out) > max(map(os.path.getmtime, inputs)):
            return
        inc, lib = nccl
        wanted = os.environ.get("PYCOMM_CUDA_ARCH", "80;90").replace(",", ";")
        archs = [a.strip() for a in wanted.split(";") if a.strip()]
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer GPUs
        cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
               *gencode, "-I", os.path.join(here, "csrc"), "-I", inc,
               *[os.path.join(here, s) for s in CUDA_SOURCES],
               "-L", lib, "-l:libnccl.so.2", "-Xlinker", f"-rpath,{lib}", "-Xlinker", "--no-undefined",
               "-o", out]
        print("pycomm: building the CUDA transports:", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)


# Only `pycomm` is a top-level import: the repository's kernels/ and bench/ folders install as
# pycomm.kernels and pycomm.bench (a top-level `kernels` would shadow Hugging Face's hub-kernels
# package, which transformers imports).  From a checkout, pycomm/_checkout.py maps the same names
# (its FOLDERS table is this one).
PACKAGE_DIRS = {"pycomm.kernels": "kernels", "pycomm.bench": "bench"}

setup(
    packages=find_packages(include=["pycomm", "pycomm.*"]) + list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    ext_modules=[
        CppExtension(
            name="pycomm._C",
            sources=sources,
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"],
            libraries=["rt"],
        )
    ],
    cmdclass={"build_ext": BuildWithCuda},
)
