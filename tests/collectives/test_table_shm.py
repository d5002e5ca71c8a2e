"""reduce, gather, scatter and all_to_all of the collective table, exactly, over the real
shared-memory transport.

The rows are called through pycomm._C directly (ShmTransport + Communicator.collective),
not through the Python layer, so what is checked is the table and its plans: every world
size 1-5 and 8, every root, both algorithms, int64 and float32 (with values whose sums
float32 holds exactly), odd counts from 0 up to counts that cross many 4 KiB slots, and
all_to_all with uneven per-rank counts including zeros.  Ranks that the collective gives no
result must find their output untouched.

One set of 8 processes (spawned: torch costs seconds to import on a small machine) runs
every world size in turn; a group of k ranks is ranks 0..k-1 on segments of its own.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import secrets
import time
import traceback

import numpy as np
import pytest

SIZES = (1, 2, 3, 4, 5, 8)
PROCS = max(SIZES)
TIMEOUT = 30.0  # seconds any one collective, or the set-up, may wait for a peer
SENTINEL = -7777  # what an output holds where the collective must not write
SLOT_BYTES, SLOTS = 4096, 2  # small slots, so that large counts cross many pieces


def _values(case: int, rank: int, n: int, dtype) -> np.ndarray:
    """Rank `rank`'s input of case `case`: small integers, so float32 sums are exact."""
    i = np.arange(n, dtype=np.int64)
    return (((i * 7 + rank * 13 + case * 5) % 31) - 15).astype(dtype)


def _uneven(case: int, size: int) -> list[list[int]]:
    """counts[i][j]: elements rank i sends rank j; about a third are zero."""
    return [[((i * 3 + j * 5 + case) % 3) * ((i + 2 * j + case) % 7) for j in range(size)]
            for i in range(size)]


def _cases(size: int) -> list[tuple]:
    """(coll, algo, dtype, count, root, op, in_place, counts) for a group of `size`."""
    cases = []
    for root in range(size):
        for algo in ("ring", "tree"):
            for dtype in ("int64", "float32"):
                for count in (0, 1, 2 * size + 1, 3001):
                    for coll in ("reduce", "gather", "scatter"):
                        in_place = coll == "reduce" and count % 2 == 1  # out is in, on every rank
                        cases.append((coll, algo, dtype, count, root, "sum", in_place, None))
                cases.append(("reduce", algo, dtype, 37, root, "max" if dtype == "int64" else "min",
                              False, None))
    for dtype in ("int64", "float32"):
        for count in (0, 1, 5, 1001):
            cases.append(("all_to_all", "pairwise", dtype, count, -1, "none", False, None))
        for k in range(3):
            counts = _uneven(k, size)
            if k == 2:  # some blocks of many slots
                counts = [[c * 300 for c in row] for row in counts]
            cases.append(("all_to_all", "pairwise", dtype, 0, -1, "none", False, counts))
    return cases


def _run_case(_C, comm, rank: int, size: int, case: int, spec: tuple) -> str | None:
    """Runs one case on this rank; returns what was wrong, or None."""
    coll, algo, dtype, count, root, op, in_place, counts = spec
    np_dtype = np.dtype(dtype)
    code, algo_code = _C.COLLECTIVES[coll], _C.ALGORITHMS[algo]
    dt, op_code = _C.DTYPES[dtype], _C.OPS[op]
    kw = {}
    if coll == "reduce":
        inp = _values(case, rank, count, np_dtype)
        out = inp if in_place else np.full(count, SENTINEL, np_dtype)
        fold = {"sum": np.add, "max": np.maximum, "min": np.minimum}[op]
        want = _values(case, 0, count, np_dtype)
        for q in range(1, size):
            want = fold(want, _values(case, q, count, np_dtype))
        if rank != root:  # not written: out keeps what it held (the input, in place)
            want = out.copy()
    elif coll == "gather":
        inp = _values(case, rank, count, np_dtype)
        out = np.full(size * count, SENTINEL, np_dtype)
        if rank == root:
            want = np.concatenate([_values(case, q, count, np_dtype) for q in range(size)])
        else:
            want = out.copy()
    elif coll == "scatter":
        # Only the root's input is read; the others pass a buffer of the same size.
        inp = _values(case, root, size * count, np_dtype) if rank == root else \
            np.full(size * count, SENTINEL, np_dtype)
        out = np.full(count, SENTINEL, np_dtype)
        want = _values(case, root, size * count, np_dtype)[rank * count:(rank + 1) * count]
    else:  # all_to_all
        sends = counts[rank] if counts else [count] * size
        recvs = [counts[q][rank] for q in range(size)] if counts else [count] * size
        inp = _values(case, rank, sum(sends), np_dtype)
        out = np.full(sum(recvs), SENTINEL, np_dtype)
        parts = []
        for q in range(size):
            theirs = counts[q] if counts else [count] * size
            start = sum(theirs[:rank])
            parts.append(_values(case, q, sum(theirs), np_dtype)[start:start + theirs[rank]])
        want = np.concatenate(parts)
        if counts:
            kw = {"send_counts": sends, "recv_counts": recvs}
    inp_before = inp.copy()
    comm.collective(code, algo_code, out.ctypes.data, inp.ctypes.data, count, dt, op_code, root,
                    TIMEOUT, **kw)
    what = f"{coll} {algo} {dtype} count={count} root={root} op={op} in_place={in_place} " \
           f"counts={counts} on rank {rank} of {size}"
    if not np.array_equal(out, want):
        bad = np.flatnonzero(out != want)[:5]
        return f"{what}: wrong output at {bad.tolist()}: got {out[bad].tolist()}, want {want[bad].tolist()}"
    if not in_place and not np.array_equal(inp, inp_before):
        return f"{what}: the input changed"
    return None


def _worker(rank: int, store_path: str, token: str, results) -> None:
    try:
        import torch.distributed as dist

        from pycomm import _C

        store = dist.FileStore(store_path, PROCS)
        for size in SIZES:
            if rank >= size:
                continue
            started = time.monotonic()
            names = [f"/pycomm-{token}-tshm{size}-r{r}" for r in range(size)]
            transport = _C.ShmTransport(rank, size, names[rank], slot_bytes=SLOT_BYTES, slots=SLOTS,
                                        lanes=3)
            try:
                for step in ("created", "attached"):
                    if step == "attached":
                        transport.attach(names, TIMEOUT)
                    store.set(f"{size}/{step}/{rank}", "1")
                    store.wait([f"{size}/{step}/{r}" for r in range(size)],
                               datetime.timedelta(seconds=TIMEOUT))
            finally:
                transport.unlink()  # mapped by everyone, or failed: either way the name goes
            comm = _C.Communicator(transport)
            failures = []
            for case, spec in enumerate(_cases(size)):
                wrong = _run_case(_C, comm, rank, size, case, spec)
                if wrong:
                    failures.append(wrong)
            del comm, transport
            results.put((rank, size, failures, time.monotonic() - started))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put((rank, None, [f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"], 0.0))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{size: (failures, seconds)} from one run of all world sizes."""
    token = secrets.token_hex(8)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = str(tmp_path_factory.mktemp("table_shm") / "store")
    procs = [ctx.Process(target=_worker, args=(r, store, token, results), daemon=True)
             for r in range(PROCS)]
    for p in procs:
        p.start()
    expected = sum(SIZES)  # one report per (rank, size)
    got: dict[int, tuple[list[str], float]] = {s: ([], 0.0) for s in SIZES}
    crashed: list[str] = []
    deadline = time.monotonic() + 240
    reports = 0
    try:
        while reports < expected:
            try:
                rank, size, failures, seconds = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                crashed.append(f"no report from some ranks within 240 s ({reports} of {expected} arrived)")
                break
            reports += 1
            if size is None:
                crashed += failures
                break
            got[size][0].extend(failures)
            got[size] = (got[size][0], max(got[size][1], seconds))
    finally:
        for p in procs:
            p.join(timeout=10 if not crashed else 1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        left = [n for n in os.listdir("/dev/shm") if token in n]
        for n in left:
            os.unlink(os.path.join("/dev/shm", n))
    return got, crashed, left, [p.exitcode for p in procs]


@pytest.mark.parametrize("size", SIZES)
def test_table_rows_exact_over_shared_memory(outcomes, size):
    got, crashed, left, exitcodes = outcomes
    assert not crashed, "\n".join(crashed)
    failures, _ = got[size]
    assert not failures, f"{len(failures)} wrong results, first ones:\n" + "\n".join(failures[:10])


def test_processes_exit_and_leave_no_segment(outcomes):
    got, crashed, left, exitcodes = outcomes
    assert not crashed, "\n".join(crashed)
    assert exitcodes == [0] * PROCS
    assert not left, f"segments left in /dev/shm: {left}"


def test_wrong_arguments_say_what_to_do():
    # One rank in this process: the plans' own checks, which no transport gets to see.
    from pycomm import _C

    name = f"/pycomm-{secrets.token_hex(8)}-targs-r0"
    transport = _C.ShmTransport(0, 1, name, slot_bytes=SLOT_BYTES, slots=SLOTS, lanes=3)
    try:
        transport.attach([name], TIMEOUT)
    finally:
        transport.unlink()
    comm = _C.Communicator(transport)
    buf = np.zeros(8, np.int64)
    a2a, i64 = _C.COLLECTIVES["all_to_all"], _C.DTYPES["int64"]
    with pytest.raises(ValueError, match="overlaps the input; pass separate buffers"):
        comm.collective(a2a, _C.ALGORITHMS["pairwise"], buf.ctypes.data, buf.ctypes.data + 8, 4,
                        i64, _C.OPS["none"], -1, TIMEOUT)
    with pytest.raises(ValueError, match="send and receive counts for itself must be equal"):
        comm.collective(a2a, _C.ALGORITHMS["pairwise"], buf.ctypes.data, buf.ctypes.data + 32, 0,
                        i64, _C.OPS["none"], -1, TIMEOUT, send_counts=[2], recv_counts=[3])
    with pytest.raises(ValueError, match="root 1 is not a rank of this group of 1"):
        comm.collective(_C.COLLECTIVES["gather"], _C.ALGORITHMS["tree"], buf.ctypes.data,
                        buf.ctypes.data, 1, i64, _C.OPS["none"], 1, TIMEOUT)
    with pytest.raises(ValueError, match="all_to_all has no ring algorithm"):
        comm.collective(a2a, _C.ALGORITHMS["ring"], buf.ctypes.data, buf.ctypes.data + 32, 1,
                        i64, _C.OPS["none"], -1, TIMEOUT)
    # A refused call is not a failed transport, and takes no sequence number (which would
    # put this rank one collective ahead of its peers).
    assert comm.seq == 0
    out = np.full(4, -1, np.int64)
    comm.collective(a2a, _C.ALGORITHMS["pairwise"], out.ctypes.data, buf.ctypes.data, 4, i64,
                    _C.OPS["none"], -1, TIMEOUT)
    np.testing.assert_array_equal(out, buf[:4])
    assert comm.seq == 1
