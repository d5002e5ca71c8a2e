"""Test-wide set-up.

TRITON_INTERPRET must be set before anything imports triton: the kernel tests run the real
Triton kernels on CPU tensors through Triton's interpreter, on machines without a GPU.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import world  # noqa: E402  (tests/world.py: the pool of rank processes)


@pytest.fixture(scope="session")
def pools():
    made = {}

    def get(size: int) -> world.Pool:
        if size not in made:
            made[size] = world.Pool(size)
        return made[size]

    yield get
    for p in made.values():
        p.close()


@pytest.fixture
def run(pools):
    """run(size, fn, *args, **kw): fn(*args) on `size` ranks with pycomm initialised, using
    a pool of worker processes shared by all tests (see tests/world.py)."""

    def go(size, fn, *args, **kw):
        return pools(size).run(fn, *args, **kw)

    return go
