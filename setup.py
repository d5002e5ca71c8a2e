"""Builds pycomm._C, the C++ collectives, with torch's cpp_extension.

The C++ core (csrc/) includes no torch headers: algorithms and transports work on plain
pointers, and csrc/bindings.cpp exposes them through pybind11.  That keeps a rebuild to
seconds and lets the same sources back the torch.distributed backend later.
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

here = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))

setup(
    ext_modules=[
        CppExtension(
            name="pycomm._C",
            sources=sources,
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"],
            libraries=["rt"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
