"""Groups across hosts (pycomm/backends/hierarchy.py), on one machine: each rank gets a host identity
from PYCOMM_HOST_ID, so start-up sees several hosts and builds hierarchical groups.

Each job re-initialises pycomm for its layout and runs with fresh=True, so the pool's next
job starts a plain single-host group again.  Inputs are small integers (nccl-tests'
verifiable inputs, from tests/verifiable.py), so every result is checked bit for bit."""
import contextlib
import datetime
import io
import os
import threading
import time

import pytest
import torch
import world
from verifiable import expected, rank_input

import pycomm
from pycomm.backends import hierarchy
from pycomm.backends.shm import ShmBackend

LAYOUTS = {
    "2x2": ["node0", "node0", "node1", "node1"],
    "2x2-interleaved": ["node0", "node1", "node0", "node1"],
    "3x1": ["node0", "node1", "node2"],
    "2+1": ["node0", "node0", "node1"],
}
DTYPES = [torch.float32, torch.float64, torch.int32, torch.int64, torch.bfloat16, torch.float16]
COUNTS = [0, 1, 2, 7, 1001, 65537]  # empty, tiny, odd, not divisible by 2 or 3, > one shm slot
OPS = ["sum", "avg", "prod", "min", "max"]


def _as_hosts(layout, timeout=30.0):
    """In a worker: restarts pycomm as if rank r ran on host layout[r]."""
    pycomm.destroy_process_group()
    os.environ["PYCOMM_HOST_ID"] = layout[world._rank]
    try:
        return pycomm.init_process_group(world._rank, world._size,
                                         init_method=f"file://{world._store_dir}/hosts-{world._epoch}",
                                         timeout=datetime.timedelta(seconds=timeout))
    finally:
        del os.environ["PYCOMM_HOST_ID"]


def _run(run, layout_name, fn, *args, **kw):
    layout = LAYOUTS[layout_name]
    return run(len(layout), fn, layout, *args, fresh=True, **kw)


class _GlooCounter:
    """Counts the gloo groups pycomm builds (patched over pycomm.backends.hierarchy._gloo)."""

    def __init__(self):
        self.made, self._real = 0, hierarchy._gloo

    def __call__(self, *args):
        self.made += 1
        return self._real(*args)


# ------------------------------------------------------------------------ exact results


def job_exact(layout):
    g = _as_hosts(layout)
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    assert isinstance(g.backends["cpu"], hierarchy.HierarchyBackend)
    bad = []
    for dtype in DTYPES:
        for op in OPS:
            if op == "avg" and not dtype.is_floating_point:
                continue
            for n in COUNTS:
                if n == 65537 and dtype not in (torch.float32, torch.bfloat16):
                    continue  # one slot-crossing size per reduce type is enough
                t = rank_input(r, n, dtype, op).reshape(-1, 1) if n else rank_input(r, n, dtype, op)
                pycomm.all_reduce(t, op=op)
                want = expected(p, n, dtype, op)
                if not torch.equal(t.reshape(-1), want):
                    bad.append((str(dtype), op, n, t.reshape(-1)[:8].tolist(), want[:8].tolist()))
    for algorithm in ("ring", "tree"):  # the shared-memory stages, pinned
        t = rank_input(r, 1001, torch.float32, "sum")
        pycomm.all_reduce(t, algorithm=algorithm)
        if not torch.equal(t, expected(p, 1001, torch.float32, "sum")):
            bad.append(("float32", "sum", 1001, algorithm))
    return bad, g.backends["cpu"].per_host


@pytest.mark.parametrize("layout, per_host", [("2x2", 2), ("2x2-interleaved", 2), ("3x1", 1), ("2+1", None)])
def test_all_reduce_is_exact(run, layout, per_host):
    for bad, got_per_host in _run(run, layout, job_exact):
        assert got_per_host == per_host
        assert bad == []


def job_against_gloo(layout):
    _as_hosts(layout)
    dist = world.gloo()  # torch.distributed with gloo over the same ranks
    r = pycomm.get_rank()
    gen = torch.Generator().manual_seed(1234 + r)
    out = {}
    for n in (1, 1000, 12345):
        a = torch.randn(n, dtype=torch.float64, generator=gen)
        b = a.clone()
        pycomm.all_reduce(a)
        dist.all_reduce(b)
        out[n] = (a, (a - b).abs().max().item() / b.abs().max().item())
    for op, dop in (("max", dist.ReduceOp.MAX), ("min", dist.ReduceOp.MIN)):
        a = torch.randn(777, dtype=torch.float64, generator=gen)
        b = a.clone()
        pycomm.all_reduce(a, op=op)
        dist.all_reduce(b, op=dop)
        out[op] = torch.equal(a, b)
    return out


@pytest.mark.parametrize("layout", ["2x2", "2x2-interleaved", "2+1"])
def test_all_reduce_matches_gloo_on_random_inputs(run, layout):
    results = _run(run, layout, job_against_gloo)
    for res in results:
        assert res["max"] and res["min"]
        for n in (1, 1000, 12345):
            a, rel = res[n]
            assert rel < 1e-14, (n, rel)
            assert torch.equal(a, results[0][n][0]), "ranks differ"  # bitwise identical


def job_async(layout):
    _as_hosts(layout)
    r = pycomm.get_rank()
    ts = [torch.full((1000 + i,), float(r + i)) for i in range(4)]
    works = [pycomm.all_reduce(t, async_op=True) for t in ts]
    last = torch.full((5,), float(r))
    pycomm.all_reduce(last, op="max")  # sync, after the queued ones, in call order
    for w in works:
        assert w.wait() and w.is_completed() and w.is_success()
    fut = pycomm.all_reduce(torch.ones(3), async_op=True).get_future()
    return [t[0].item() for t in ts], last[0].item(), fut.wait()[0].tolist()


@pytest.mark.parametrize("layout", ["2x2", "3x1"])
def test_async_all_reduce(run, layout):
    for sums, last, fut in _run(run, layout, job_async):
        p = len(LAYOUTS[layout])
        assert sums == [p * i + p * (p - 1) / 2 for i in range(4)]
        assert last == p - 1
        assert fut == [float(p)] * 3


# ------------------------------------------------------------------------ subgroups


def job_new_group(layout):
    _as_hosts(layout)
    r = pycomm.get_rank()
    counter = _GlooCounter()
    hierarchy._gloo = counter
    try:
        made = {}
        groups = {}
        for name, ranks in [("node0", [0, 1]), ("node1", [2, 3]), ("pair", [0, 3]),
                            ("three", [1, 2, 3]), ("all", [0, 1, 2, 3])]:
            before = counter.made
            groups[name] = pycomm.new_group(ranks)
            made[name] = counter.made - before
    finally:
        hierarchy._gloo = counter._real
    out = {}
    for name, g in groups.items():
        if g.rank < 0:
            continue
        t = torch.full((1001,), float(r + 1))
        pycomm.all_reduce(t, group=g)
        shm = isinstance(g.backends["cpu"], ShmBackend)
        out[name] = (t[0].item(), t[-1].item(), shm, shm, made[name])
    return out


def test_new_group_across_hosts_and_inside_one(run):
    results = _run(run, "2x2", job_new_group)
    members = {"node0": [0, 1], "node1": [2, 3], "pair": [0, 3], "three": [1, 2, 3], "all": [0, 1, 2, 3]}
    for r, out in enumerate(results):
        for name, ranks in members.items():
            if r not in ranks:
                assert name not in out
                continue
            s = float(sum(x + 1 for x in ranks))
            first, last, pure_shm, has_comm, gloo_groups = out[name]
            assert first == last == s, (name, out[name])
            if name in ("node0", "node1"):
                # A group on one host is the single-host fast path: no gloo group at all.
                assert pure_shm and has_comm and gloo_groups == 0, (name, out[name])
            else:
                assert not pure_shm and not has_comm and gloo_groups >= 1, (name, out[name])
        # the pair (one rank per host) and the unequal group need only the whole-group gloo
        if r in members["pair"]:
            assert out["pair"][4] == 1
        if r in members["three"]:
            assert out["three"][4] == 1
        assert out["all"][4] == 2  # cross-host and whole-group


# ------------------------------------------------------------------------ the other collectives


def job_other_collectives(layout):
    _as_hosts(layout)
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        n = 7
        inp = torch.cat([torch.arange(n) * (i + 1) + r for i in range(p)]).to(dtype)
        o = torch.empty(n, dtype=dtype)
        pycomm.reduce_scatter(o, inp)
        out[("rs", str(dtype))] = o.tolist()
        inp2 = inp.clone()
        pycomm.reduce_scatter(inp2[r * n:(r + 1) * n], inp2, op="max")  # in place
        out[("rs_max", str(dtype))] = inp2[r * n:(r + 1) * n].tolist()
        ag = torch.empty(p * n, dtype=dtype)
        pycomm.all_gather(ag, (torch.arange(n) + 10 * r).to(dtype))
        out[("ag", str(dtype))] = ag.tolist()
        ag2 = torch.zeros(p * n, dtype=dtype)
        ag2[r * n:(r + 1) * n] = (torch.arange(n) + 10 * r).to(dtype)
        pycomm.all_gather(ag2, ag2[r * n:(r + 1) * n])  # in place
        out[("ag_in_place", str(dtype))] = ag2.tolist()
    rs = torch.empty(3, dtype=torch.bfloat16)
    pycomm.reduce_scatter(rs, torch.full((3 * p,), float(r + 1), dtype=torch.bfloat16), op="avg")
    out["rs_avg"] = rs.tolist()
    for src in range(p):
        b = torch.full((5,), float(10 * r + src))
        pycomm.broadcast(b, src=src)
        out[("bc", src)] = b.tolist()
    pycomm.barrier()
    # point-to-point: a ring of sends, then posted messages both ways, then a batch
    nxt, prv = (r + 1) % p, (r - 1) % p
    x = torch.empty(4, dtype=torch.int64)
    if r % 2 == 0:
        pycomm.send(torch.arange(4) + 100 * r, nxt)
        pycomm.recv(x, prv)
    else:
        pycomm.recv(x, prv)
        pycomm.send(torch.arange(4) + 100 * r, nxt)
    out["ring"] = x.tolist()
    big = torch.full((300_000,), float(r))
    got = torch.empty(300_000)
    ws = pycomm.isend(big, nxt)
    wr = pycomm.irecv(got, prv)
    wr.wait()
    ws.wait()
    out["isend"] = (got[0].item(), got[-1].item())
    a, b = torch.empty(2), torch.empty(0)
    works = pycomm.batch_isend_irecv([
        pycomm.P2POp(pycomm.isend, torch.full((2,), float(r)), nxt),
        pycomm.P2POp(pycomm.irecv, a, prv),
        pycomm.P2POp(pycomm.isend, torch.empty(0), nxt),
        pycomm.P2POp(pycomm.irecv, b, prv),
    ])
    for w in works:
        w.wait()
    out["batch"] = a.tolist()
    return out


@pytest.mark.parametrize("layout", ["2x2-interleaved", "2+1"])
def test_other_collectives_across_hosts_are_exact(run, layout):
    results = _run(run, layout, job_other_collectives)
    p, n = len(LAYOUTS[layout]), 7
    for r, out in enumerate(results):
        for dtype in ("torch.float32", "torch.bfloat16", "torch.int64"):
            assert out[("rs", dtype)] == [(k * (r + 1) * p + p * (p - 1) // 2) for k in range(n)]
            assert out[("rs_max", dtype)] == [k * (r + 1) + p - 1 for k in range(n)]
            want = [k + 10 * q for q in range(p) for k in range(n)]
            assert out[("ag", dtype)] == want and out[("ag_in_place", dtype)] == want
        assert out["rs_avg"] == [(p + 1) / 2] * 3
        for src in range(p):
            assert out[("bc", src)] == [10.0 * src + src] * 5
        prv = (r - 1) % p
        assert out["ring"] == [100 * prv + k for k in range(4)]
        assert out["isend"] == (prv, prv)
        assert out["batch"] == [prv, prv]


# ------------------------------------------------------------------------ the log line


def job_debug_log(layout, algorithm):
    with world.scoped_env(PYCOMM_DEBUG="INFO"):  # read when the groups are built
        g = _as_hosts(layout)
        sub = pycomm.new_group([0, 1])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        pycomm.all_reduce(torch.ones(1000), algorithm=algorithm)
        if sub.rank >= 0:
            pycomm.all_reduce(torch.ones(10), group=sub)
        pycomm.all_gather(torch.empty(4 * g.size), torch.ones(4))
    return buf.getvalue()


def test_debug_log_says_hierarchical(run):
    for r, log in enumerate(_run(run, "2x2", job_debug_log, "ring")):
        assert (f"pycomm: all_reduce of 4000 B on group 0 (rank {r}/4): hierarchical: reduce_scatter "
                "ring over shm (2 ranks) + all_reduce over gloo (2 hosts) + all_gather ring over shm") in log, log
        # a subgroup inside one host logs the plain shared-memory line (40 B on 2 ranks: the
        # cost model's exchange)
        assert (f"pycomm: all_reduce of 40 B on group 1 (rank {r}/2): exchange over shm" in log) == (r < 2), log
        assert f"pycomm: all_gather of 64 B on group 0 (rank {r}/4): over gloo (2 hosts)" in log, log
        assert log.count("pycomm:") == (3 if r < 2 else 2), log


def test_debug_log_says_when_not_hierarchical(run):
    logs = _run(run, "2+1", job_debug_log, "auto")
    assert "over gloo (2 hosts with 2, 1 ranks: unequal, so not hierarchical)" in logs[0], logs[0]


# ------------------------------------------------------------------------ failures


def job_peer_skips(layout, timeout, late):
    _as_hosts(layout, timeout=timeout)
    r = pycomm.get_rank()
    threads_before = {t.name for t in threading.enumerate()}
    if r == 3:
        return None  # never calls all_reduce
    if r in (0, 1):
        time.sleep(late)
    start = time.monotonic()
    try:
        pycomm.all_reduce(torch.ones(1000))
        first = (None, "no error", time.monotonic() - start)
    except pycomm.CommError as e:
        first = (type(e).__name__, str(e), time.monotonic() - start)
    if r == 2:
        time.sleep(timeout)  # keeps its group: only the failure itself may tell rank 0
    try:
        pycomm.all_reduce(torch.ones(10))
        again = "no error"
    except pycomm.CommError as e:
        again = str(e)
    start = time.monotonic()
    pycomm.destroy_process_group()
    left = {t.name for t in threading.enumerate()} - threads_before
    return first, again, time.monotonic() - start, sorted(left)


def test_peer_that_never_calls_is_named_in_time(run):
    # 2 hosts x 2; rank 3 never calls all_reduce; ranks 0 and 1 call it `late` s after rank 2.
    timeout, late = 3.0, 1.5
    results = _run(run, "2x2", job_peer_skips, timeout, late)
    assert results[3] is None
    for r, ((etype, msg, elapsed), again, destroy_s, left) in enumerate(results[:3]):
        assert etype in ("CommTimeoutError", "CommError"), msg
        assert elapsed < timeout + 1.5, f"rank {r} took {elapsed:.1f} s: {msg}"
        assert "group 0 across hosts" in msg and f"on rank {r}" in msg, msg
        assert "failed earlier" in again, again
        assert destroy_s < 2.0 and left == [], (destroy_s, left)
    # Rank 2 waited for rank 3 on their host's shared memory (stage 1); rank 1 waited for
    # rank 3 in the gloo stage (its partner across hosts); both name it.
    e2, m2, _ = results[2][0]
    assert e2 == "CommTimeoutError" and "stage 1/3" in m2 and "shared memory" in m2 and "1 = rank 3" in m2, m2
    e1, m1, _ = results[1][0]
    assert e1 == "CommTimeoutError" and "stage 2/3" in m1 and "gloo among global ranks [1, 3]" in m1, m1
    # Rank 2 gave up and said so by closing its gloo connections: rank 0, waiting for it
    # across hosts, fails then (a closed connection, not a time-out: rank 2 keeps its group
    # for a whole time-out after failing), naming the ranks of the stage.
    e0, m0, t0 = results[0][0]
    assert e0 == "CommError" and "gloo among global ranks [0, 2] failed" in m0, m0
    assert t0 < timeout, f"rank 0 took {t0:.1f} s: {m0}"
    assert world.segments() == []
