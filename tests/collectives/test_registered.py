"""Registered shared-memory buffers (pycomm.empty): all-reduces that read the peers' buffers
where they lie.  Exact values on every rank and the same bits everywhere, the rest of the
buffer untouched, mismatched calls refused on every rank, nothing left in /dev/shm, a killed
peer named, and torch.distributed on such a buffer still right."""
import pytest
import torch
import world

import pycomm
from pycomm.backends.shared import SHARED_FROM

COUNTS = (1001, 20_001, 300_007)  # below the shared path's threshold, and above it


def _backend():
    return pycomm.distributed.group_or_world(None).backends["cpu"]


def _base(count, dtype):
    return (torch.arange(count, dtype=torch.float64) % 1000).to(dtype)


def job_exact():
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    before = _backend().registered_all_reduces
    wrong, bits = [], []
    for dtype in (torch.float32, torch.float64, torch.int32, torch.int64):
        for count in COUNTS:
            for op in ("sum", "max", "min") + (("avg",) if dtype.is_floating_point else ()):
                t = pycomm.empty(count, dtype=dtype)
                t.copy_(_base(count, dtype) * (r + 1))
                pycomm.all_reduce(t, op=op)
                b = _base(count, torch.float64)
                want = {"sum": b * p * (p + 1) / 2, "max": b * p, "min": b,
                        "avg": b * (p + 1) / 2}[op].to(dtype)
                if not torch.equal(t, want):
                    wrong.append((str(dtype), count, op))
                bits.append(float(t.double().sum()))
    pycomm.barrier()
    return wrong, bits, _backend().registered_all_reduces - before, world.segments()


@pytest.mark.parametrize("size", [2, 3, 4])
def test_exact_on_every_rank(run, size):
    results = run(size, job_exact)
    for wrong, bits, registered, segments in results:
        assert wrong == [], wrong
        assert bits == results[0][1]
        # The sizes above the threshold took the shared path: 4 dtypes, 2 counts, 3 or 4 ops.
        assert registered == 2 * (3 * 4 + 2), registered
        assert segments == []


def job_part_and_float_bits():
    r = pycomm.get_rank()
    g = torch.Generator().manual_seed(r)
    t = pycomm.empty(4, 50_000)
    t.copy_(torch.randn(4, 50_000, generator=g))
    before = t.clone()
    part = t[1:3]  # contiguous rows in the middle
    pycomm.all_reduce(part)
    same = torch.empty(2, 2, 50_000)
    pycomm.all_gather(same.view(-1), part.reshape(-1).clone())
    return (torch.equal(t[0], before[0]) and torch.equal(t[3], before[3]),
            torch.equal(same[0], same[1]), torch.allclose(part, same[0]))


def test_part_of_a_buffer_and_the_same_bits_everywhere(run):
    for untouched, same_bits, _ in run(2, job_part_and_float_bits):
        assert untouched and same_bits


def job_mismatch():
    r = pycomm.get_rank()
    t = pycomm.empty(100_000)
    t.fill_(1.0)
    part = t[r * 10: r * 10 + 50_000]  # a different offset on each rank
    etype, msg = world.catch(lambda: pycomm.all_reduce(part))
    after = world.catch(lambda: pycomm.all_reduce(t))  # the group is still usable
    return etype, msg, after, t[0].item()


def test_different_parts_refused_on_every_rank(run):
    for etype, msg, after, first in run(2, job_mismatch):
        assert etype == "CommError" and "different registered buffers" in msg, msg
        assert after == (None, "") and first in (2.0, 3.0)  # once more: sum over 2 ranks


def job_bad_empty():
    r = pycomm.get_rank()
    sizes = world.catch(lambda: pycomm.empty(1000 + r))
    neg = world.catch(lambda: pycomm.empty(-1))
    kind = world.catch(lambda: pycomm.empty(4, dtype=torch.complex32))
    ok = pycomm.empty((3, 5), dtype=torch.int16)
    pycomm.barrier()  # every rank has unlinked its name (just after the set-up's last barrier)
    return sizes, neg, kind, tuple(ok.shape), ok.dtype == torch.int16, world.segments()


def test_bad_empty_calls(run):
    for sizes, neg, kind, shape, dtype_ok, segments in run(2, job_bad_empty):
        assert sizes[0] == "CommError" and "same size" in sizes[1], sizes
        assert neg[0] == "TypeError" and kind[0] == "TypeError"
        assert shape == (3, 5) and dtype_ok and segments == []


def job_async_and_torch_distributed():
    import torch.distributed as dist
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    t = pycomm.empty(SHARED_FROM)  # floats: four times the threshold in bytes
    t.fill_(r + 1.0)
    before = _backend().registered_all_reduces
    pycomm.all_reduce(t, async_op=True).wait()
    first = t.unique().tolist()
    pg = world.torch_group("pycomm")
    t.fill_(r + 1.0)
    dist.all_reduce(t, group=pg)  # c10d takes the transport's own path: right all the same
    return first, t.unique().tolist(), _backend().registered_all_reduces - before, p


def test_async_and_torch_distributed(run):
    for first, second, registered, p in run(2, job_async_and_torch_distributed):
        assert first == second == [p * (p + 1) / 2]
        assert registered == 1


def job_killed(victim):
    with world.scoped_env():
        world.restart(timeout=10.0)
    t = pycomm.empty(1 << 20)
    t.fill_(1.0)
    pycomm.all_reduce(t)
    return world.until_killed(pycomm.get_rank() == victim, lambda: pycomm.all_reduce(t))


@pytest.mark.parametrize("size,victim", [(2, 1), (3, 0)])
def test_killed_peer_is_named(run, size, victim):
    results = run(size, job_killed, victim, fresh=True, may_die=[victim])
    for r, res in enumerate(results):
        if r == victim:
            continue
        etype, msg, noticed = res
        assert etype == "CommError" and f"rank {victim}" in msg, msg
        assert noticed < 12.0, noticed
    assert world.segments() == []
