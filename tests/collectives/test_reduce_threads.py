"""The shared-memory transport's reduction on several threads (PYCOMM_SHM_REDUCE_THREADS):
the pool itself against torch, bit for bit whatever the split; the automatic choice, which
never gives a rank more threads than its share of the cores; and collectives run with a
forced second thread, exact on both the slot and the single-copy path."""
import dataclasses
import os

import pytest
import torch
import world
from test_single_copy import COLLECTIVES, _exact, _transport

from pycomm import _C
from pycomm._codes import DTYPES, OPS
from pycomm._rendezvous import reduce_threads
from pycomm._settings import Settings


def _reduce(pool, out, a, b, op):
    pool.reduce(out.data_ptr(), a.data_ptr(), b.data_ptr(), out.numel(), DTYPES[out.dtype], OPS[op].code)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.int64, torch.uint8])
@pytest.mark.parametrize("count", [1, 8191, 100_003])
def test_pool_matches_torch(threads, dtype, count):
    g = torch.Generator().manual_seed(count)
    a = (torch.rand(count, generator=g, dtype=torch.float64) * 100).to(dtype)
    b = (torch.rand(count, generator=g, dtype=torch.float64) * 100).to(dtype)
    pool = _C.ReducePool(threads)
    assert pool.threads == threads
    for op, want in (("sum", a + b), ("max", torch.maximum(a, b)), ("min", torch.minimum(a, b))):
        out = torch.full_like(a, 7)
        _reduce(pool, out, a, b, op)
        assert torch.equal(out, want), (op, dtype, count)
    # In place (dst aliases a), as the transport reduces into the caller's buffer.
    inplace = a.clone()
    _reduce(pool, inplace, inplace, b, "sum")
    assert torch.equal(inplace, a + b)


def test_pool_split_is_bitwise_the_single_thread_result():
    """Float sums in any split are the same bits: the pool is elementwise, never a tree."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1 << 20, generator=g), torch.randn(1 << 20, generator=g)
    outs = []
    for threads in (1, 2, 4):
        out = torch.empty_like(a)
        _reduce(_C.ReducePool(threads), out, a, b, "sum")
        outs.append(out)
    assert torch.equal(outs[0].view(torch.int32), outs[1].view(torch.int32))
    assert torch.equal(outs[0].view(torch.int32), outs[2].view(torch.int32))


def test_pool_refuses_a_pair_without_kernel_and_leaves_dst():
    a = torch.ones(1 << 18)
    out = torch.full_like(a, 3.0)
    with pytest.raises(ValueError, match="bxor"):
        _reduce(_C.ReducePool(2), out, a, a, "bxor")
    assert torch.equal(out, torch.full_like(a, 3.0))
    with pytest.raises(ValueError, match="1..256"):
        _C.ReducePool(0)


@pytest.mark.parametrize("cores,procs,want", [(2, 2, 1), (2, 4, 1), (1, 1, 1), (16, 2, 8), (8, 2, 4),
                                              (64, 1, 8), (3, 2, 1)])
def test_auto_never_oversubscribes(cores, procs, want):
    assert reduce_threads(Settings(), procs, cores=cores) == want


def test_setting_overrides_auto(monkeypatch):
    assert reduce_threads(dataclasses.replace(Settings(), shm_reduce_threads=3), 2, cores=2) == 3
    monkeypatch.setenv("PYCOMM_SHM_REDUCE_THREADS", "auto")
    assert Settings.from_env().shm_reduce_threads == 0
    monkeypatch.setenv("PYCOMM_SHM_REDUCE_THREADS", "two")
    with pytest.raises(ValueError, match="PYCOMM_SHM_REDUCE_THREADS"):
        Settings.from_env()


def job_threads(path: str, threads: str):
    with world.scoped_env(PYCOMM_SHM_SINGLE_COPY=path, PYCOMM_SHM_REDUCE_THREADS=threads):
        world.restart()
    t = _transport()
    # Large enough that every 256 KiB piece is split (ReducePool.kSplitFrom per thread).
    wrong = [(c, a, n) for c in COLLECTIVES for a in ("ring", "tree") for n in (1001, 300_007, 1 << 20)
             if not _exact(c, a, n)]
    return wrong, t.reduce_threads


@pytest.mark.parametrize("path", ["never", "always"])
def test_collectives_exact_with_two_reduce_threads(run, path):
    for wrong, threads in run(2, job_threads, path, "2", fresh=True):
        assert wrong == [], wrong
        assert threads == 2


def test_auto_on_this_machine(run):
    """2 ranks on this machine: each gets its share of the cores, reported by the transport."""
    cores = len(os.sched_getaffinity(0))
    for _, threads in run(2, job_threads, "never", "auto", fresh=True):
        assert threads == max(1, min(8, cores // 2))

