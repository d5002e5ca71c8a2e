"""The shared-memory transport's two paths for large sends, each forced and exact-tested:
single copy (the receiver reads the sender's buffer with process_vm_readv) and the slots
(PYCOMM_SHM_SINGLE_COPY=never, also the fallback when the start-up probe cannot read a
peer); and a rank killed while its peers read its memory."""
import ctypes

import pytest
import torch
import world

import pycomm
from pycomm import tuning

# Odd sizes: pieces of a partial slot, chunks of unequal length, more than one slot each.
COUNTS = (1, 1001, 70_001, 300_007)
COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce")


def _transport():
    return pycomm.distributed.group_or_world(None).backends["cpu"].transport


def _exact(collective: str, algo: str, count: int) -> bool:
    """One collective on integer-valued float32 data (sums are exact), checked element by
    element against the formula."""
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    base = torch.arange(count, dtype=torch.float32) % 1000
    if collective == "all_reduce":
        t = base + r
        pycomm.all_reduce(t, algorithm=algo)
        return torch.equal(t, base * p + p * (p - 1) / 2)
    if collective == "reduce_scatter":
        inp = torch.cat([base + r + 7 * j for j in range(p)])
        out = torch.empty(count)
        pycomm.reduce_scatter(out, inp, algorithm=algo)
        return torch.equal(out, base * p + p * (p - 1) / 2 + 7 * r * p)
    if collective == "all_gather":
        out = torch.empty(count * p)
        pycomm.all_gather(out, base + r, algorithm=algo)
        return torch.equal(out, torch.cat([base + j for j in range(p)]))
    if collective == "broadcast":
        t = base + 5 if r == 1 else torch.zeros(count)
        pycomm.broadcast(t, src=1, algorithm=algo)
        return torch.equal(t, base + 5)
    t = base * (r + 1)
    pycomm.reduce(t, dst=0, algorithm=algo)
    return r != 0 or torch.equal(t, base * (p * (p + 1) / 2))


def job_exact(path: str):
    with world.scoped_env(PYCOMM_SHM_SINGLE_COPY=path):
        world.restart()
    t = _transport()
    before = t.single_copy_sent
    wrong = [(c, a, n) for c in COLLECTIVES for a in ("ring", "tree") for n in COUNTS
             if not _exact(c, a, n)]
    return wrong, t.single_copy_from, t.can_read_peers, t.single_copy_why, t.single_copy_sent - before


@pytest.mark.parametrize("size,path", [(2, "always"), (3, "always"), (2, "never")])
def test_each_path_is_exact(run, size, path):
    for wrong, start, can_read, why, sent in run(size, job_exact, path, fresh=True):
        assert wrong == [], wrong
        if path == "never":
            assert start == tuning.NEVER and sent == 0
        else:
            # This machine allows cross-memory attach between one user's processes (the
            # probe says why if not); every rank then sends its large pieces single-copy.
            assert can_read, why
            assert start == 1 and sent > 0, (start, sent)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _ptrace_capability(on: bool) -> None:
    """Raises or lowers CAP_SYS_PTRACE (bit 19) in this thread's effective set (a root
    process has it, and it would read even a non-dumpable peer); it stays permitted, so it
    can be raised again."""
    libc = ctypes.CDLL(None, use_errno=True)
    head, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(head), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    bit = 1 << 19
    if on:
        data[0].effective |= bit & data[0].permitted
    else:
        data[0].effective &= ~bit
    if libc.capset(ctypes.byref(head), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def job_probe_refused():
    """Rank 1 forbids reading its memory (not dumpable, as a setuid program or a hardened
    process is) and rank 0 gives up CAP_SYS_PTRACE before the group starts: rank 0's probe
    must fail and fall back to the slots, rank 1 still reads rank 0; results stay exact."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_DUMPABLE = 4
    r = pycomm.get_rank()
    if r == 1:
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    else:
        _ptrace_capability(False)
    try:
        with world.scoped_env(PYCOMM_SHM_SINGLE_COPY="always"):
            world.restart()
        t = _transport()
        before = t.single_copy_sent
        ok = all(_exact(c, "ring", 300_007) for c in ("all_reduce", "all_gather"))
        return ok, t.can_read_peers, t.single_copy_why, t.single_copy_sent - before
    finally:
        if r == 1:
            libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
        else:
            _ptrace_capability(True)


def test_probe_refused_falls_back_to_the_slots(run):
    (ok0, read0, why0, sent0), (ok1, read1, why1, sent1) = run(2, job_probe_refused, fresh=True)
    assert ok0 and ok1
    assert not read0 and "rank 1" in why0 and "process_vm_readv" in why0, why0
    assert read1, why1
    assert sent0 > 0 and sent1 == 0  # rank 1 cannot be read: it sends through the slots


def job_killed_while_read(victim: int, count: int):
    """The victim kills itself during a loop of large single-copy all-reduces, so that its
    peers are reading its memory or waiting for it to take theirs: they must raise naming
    it, well within the timeout."""
    with world.scoped_env(PYCOMM_SHM_SINGLE_COPY="always"):
        world.restart(timeout=10.0)
    t = torch.ones(count)
    pycomm.all_reduce(t)  # everyone is in the group before the clock starts
    etype, msg, noticed = world.until_killed(pycomm.get_rank() == victim,
                                             lambda: pycomm.all_reduce(t, algorithm="ring"))
    sent = _transport().single_copy_sent
    pycomm.destroy_process_group()
    return etype, msg, noticed, sent


@pytest.mark.parametrize("size,victim", [(2, 0), (3, 1)])
def test_rank_killed_mid_transfer_is_named_without_hang_or_leak(run, size, victim):
    results = run(size, job_killed_while_read, victim, 4 << 20, pg_timeout=20.0, fresh=True,
                  may_die=[victim])
    for r, res in enumerate(results):
        if r == victim:
            continue
        etype, msg, noticed, sent = res
        assert sent > 0
        assert etype == "CommError", msg
        assert f"rank {victim} (pid" in msg and "exited" in msg, msg
        assert noticed < 2.0, f"noticed {noticed:.2f} s after the kill (timeout 10 s): {msg}"
    assert world.segments() == []


def test_cost_model_picks_single_copy_by_size():
    m = tuning.CostModel(alpha=4e-6, beta=1 / 4e9, copy_alpha=20e-6, copy_beta=1 / 8e9)
    start = m.single_copy_from()
    # alpha + n beta = copy_alpha + n copy_beta at n = 16e-6 / (1/8e9) = 128000 bytes:
    # single copy from there (the last bit of rounding may put it one byte later)
    assert start in (128_000, 128_001)

    def cheaper(n):
        return m.copy_alpha + n * m.copy_beta < m.alpha + n * m.beta

    assert cheaper(start + 1000) and not cheaper(start - 1000)
    assert tuning.CostModel(copy_beta=1 / 3e9, beta=1 / 4e9).single_copy_from() == tuning.NEVER
    assert tuning.CostModel(copy_alpha=1e-6, alpha=2e-6).single_copy_from() == 1
    again = tuning.CostModel.from_json(m.to_json())
    assert (again.copy_alpha, again.copy_beta) == (m.copy_alpha, m.copy_beta)
