"""The fault battery: soak, kill, stop, give-up and corruption, bounded for CI.

Every scenario is small by default (the file runs in about a minute on 2 cores);
``PYCOMM_SOAK=N`` (``make soak``) multiplies the soak's operations and the trials of the
others by N, to run by hand.

- soak: a few hundred mixed operations (every collective, point-to-point, ring/tree/auto,
  several sizes and dtypes, async operations in flight): no wrong result, and no growth in
  /dev/shm names, shared-memory mappings, threads or child processes;
- SIGKILL mid-collective at 2, 3 and 4 ranks: the survivors raise CommError naming the rank
  at once; shrink, and destroy + init, work afterwards;
- SIGSTOP mid-collective at 3 and 4 ranks: every survivor's error names the stopped rank
  (not a healthy rank blocked on it), in every trial; SIGCONT afterwards, nothing left stopped;
- give-up: a rank that destroys its group (pycomm's or torch.distributed's) or exits is
  noticed at once; one that finished its part and leaves fails nobody;
- corruption: a peer whose memory breaks the protocol is named.
"""
import datetime
import glob
import os
import random
import signal
import threading
import time

import pytest
import torch
import world

import pycomm

SCALE = max(1, int(os.environ.get("PYCOMM_SOAK", "1")))


def _pids() -> list[int]:
    """Every rank's pid (an all_gather: the ranks learn each other's processes)."""
    p = pycomm.get_world_size()
    out = torch.zeros(p, dtype=torch.int64)
    pycomm.all_gather(out, torch.tensor([os.getpid()]))
    return out.tolist()


def _collective_timeout(seconds: float) -> None:
    """The world group's collectives wait at most `seconds` from now on.  Start-up keeps the
    pool's generous timeout: on a loaded machine, ranks of a fresh pool start seconds apart."""
    g = pycomm.distributed.group_or_world(None)
    g.timeout = g.backends["cpu"].timeout = seconds


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


# ------------------------------------------------------------------------ soak

OPS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "gather", "scatter",
       "all_to_all", "barrier", "send/recv")
DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64, torch.bfloat16)
SIZES = (1, 7, 1000, 20_000, 150_000)  # 150k float32 is three 256 KiB pieces
ALGOS = ("ring", "tree", "auto")


def _op(i: int, r: int, p: int, async_op: bool):
    """Operation i of the soak, the same on every rank: returns (works, [(result, expected)]).
    Values are small integers, so every dtype (bfloat16 included) reduces them exactly."""
    rng = random.Random(i)
    name = OPS[i % len(OPS)]
    dtype, n, algo = rng.choice(DTYPES), rng.choice(SIZES), rng.choice(ALGOS)
    root = rng.randrange(p)

    def base(k):
        return ((torch.arange(k) + i) % 7).to(dtype)

    b, tri = base(n), p * (p + 1) // 2
    kw = {"async_op": async_op}
    if name == "all_reduce":
        red = rng.choice(("sum", "max", "min"))
        t = b * (r + 1)
        w = pycomm.all_reduce(t, op=red, algorithm=algo, **kw)
        return [w], [(t, b * {"sum": tri, "max": p, "min": 1}[red])]
    if name == "reduce_scatter":
        full = base(p * n)
        out = torch.empty(n, dtype=dtype)
        w = pycomm.reduce_scatter(out, full * (r + 1), algorithm=algo, **kw)
        return [w], [(out, full[r * n:(r + 1) * n] * tri)]
    if name == "all_gather":
        out = torch.empty(p * n, dtype=dtype)
        w = pycomm.all_gather(out, b * (r + 1), algorithm=algo, **kw)
        return [w], [(out, torch.cat([b * (j + 1) for j in range(p)]))]
    if name == "broadcast":
        t = b * (root + 1) if r == root else torch.zeros(n, dtype=dtype)
        w = pycomm.broadcast(t, root, algorithm=algo, **kw)
        return [w], [(t, b * (root + 1))]
    if name == "reduce":
        t = b * (r + 1)
        w = pycomm.reduce(t, root, algorithm=algo, **kw)
        return [w], [(t, b * tri if r == root else b * (r + 1))]
    if name == "gather":
        out = torch.empty(p * n, dtype=dtype) if r == root else None
        w = pycomm.gather(out, b * (r + 1), root, algorithm=algo, **kw)
        return [w], ([(out, torch.cat([b * (j + 1) for j in range(p)]))] if r == root else [])
    if name == "scatter":
        inp = torch.cat([b * (j + 1) for j in range(p)]) if r == root else None
        out = torch.empty(n, dtype=dtype)
        w = pycomm.scatter(out, inp, root, algorithm=algo, **kw)
        return [w], [(out, b * (r + 1))]
    if name == "all_to_all":
        inp = torch.cat([b * (r * p + j + 1) for j in range(p)])
        out = torch.empty(p * n, dtype=dtype)
        w = pycomm.all_to_all(out, inp, **kw)
        return [w], [(out, torch.cat([b * (j * p + r + 1) for j in range(p)]))]
    if name == "barrier":
        pycomm.barrier()
        return [], []
    got = torch.empty(n, dtype=dtype)
    works = [pycomm.isend(b * (r + 1), (r + 1) % p), pycomm.irecv(got, (r - 1) % p)]
    return works, [(got, b * ((r - 1) % p + 1))]


def _resources() -> dict:
    """What a leak would grow in this process."""
    tasks = os.listdir("/proc/self/task")
    children = 0
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/children") as f:
                children += len(f.read().split())
        except OSError:
            pass
    with open("/proc/self/maps") as f:
        maps = sum("/pycomm-" in line for line in f)
    return {"threads": len(tasks), "children": children, "shm mappings": maps}


def _soak(first: int, count: int) -> list[str]:
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    wrong, inflight = [], []

    def drain():
        for works, checks, i in inflight:
            for w in works:
                if w is not None:
                    w.wait()
            for got, want in checks:
                if not torch.equal(got, want):
                    wrong.append(f"op {i} ({OPS[i % len(OPS)]}, {got.dtype}, {got.numel()}): wrong result")
        inflight.clear()

    for i in range(first, first + count):
        async_op = random.Random(-i).random() < 0.4 and OPS[i % len(OPS)] not in ("barrier", "send/recv")
        works, checks = _op(i, r, p, async_op)
        inflight.append((works, checks, i))
        if len(inflight) >= 4 or not async_op:
            drain()
    drain()
    return wrong


def job_soak(count):
    _soak(0, 20)  # warm-up: the group's worker thread exists from here on
    before = _resources()
    wrong = _soak(20, count)
    pycomm.barrier()
    return wrong, before, _resources()


def _pycomm_names():
    return {n for n in os.listdir("/dev/shm") if n.startswith("pycomm-")}


def test_soak_mixed_operations_gives_right_results_and_leaks_nothing(run):
    before = _pycomm_names()
    results = run(3, job_soak, 240 * SCALE, timeout=120 + 60 * SCALE, pg_timeout=60.0, fresh=True)
    for r, (wrong, res0, res1) in enumerate(results):
        assert wrong == [], f"rank {r}: {wrong[:5]}"
        assert res1 == res0, f"rank {r} grew: {res0} -> {res1}"
    new = _pycomm_names() - before
    for _ in range(100):  # names of another job on this host come and go within milliseconds
        if not new:
            break
        time.sleep(0.01)
        new &= _pycomm_names()
    assert not new, f"left in /dev/shm: {sorted(new)}"


# ------------------------------------------------------------------------ SIGKILL


def job_killed_mid_collective(victim, count):
    """The victim kills itself during an all-reduce; the survivors must raise quickly, then
    go on with shrink, and start over with destroy + init."""
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    sub = pycomm.new_group(range(1, p)) if p == 4 else None  # a subgroup that loses a member too
    t = torch.ones(count)
    etype, msg, noticed = world.until_killed(r == victim, lambda: pycomm.all_reduce(t, algorithm="ring"))
    in_sub = None
    if sub is not None and sub.rank >= 0:  # its survivors shrink it alone: same gid, ranks renumbered
        s = pycomm.shrink(sub)
        z = torch.ones(5)
        pycomm.all_reduce(z, group=s)
        in_sub = (s.gid == sub.gid, s.ranks, z[0].item())
    pycomm.shrink()
    x = torch.full((1000,), float(pycomm.get_rank() + 1))
    pycomm.all_reduce(x)
    shrunk = (pycomm.get_rank(), pycomm.get_world_size(), x[0].item())
    if p > 2:  # new_group numbers ranks in the new world
        pair = pycomm.new_group([0, 1])
        y = torch.ones(3)
        if pair.rank >= 0:
            pycomm.all_reduce(y, group=pair)
        shrunk += (y[0].item() if pair.rank >= 0 else None,)
    me = pycomm.get_rank()
    pycomm.destroy_process_group()
    pycomm.init_process_group(me, p - 1, init_method=f"file://{world._store_dir}/after-kill-{world._epoch}",
                              timeout=datetime.timedelta(seconds=20))
    y = torch.ones(10)
    pycomm.all_reduce(y)
    return etype, msg, noticed, shrunk, in_sub, y[0].item()


@pytest.mark.parametrize("size,victim", [(2, 1), (3, 0), (4, 2)])
def test_killed_rank_is_named_at_once_and_the_survivors_go_on(run, size, victim):
    for trial in range(SCALE):
        results = run(size, job_killed_mid_collective, victim, 1 << 20, pg_timeout=20.0, fresh=True,
                      may_die=[victim])
        survivors = [res for r, res in enumerate(results) if r != victim]
        n = size - 1
        for etype, msg, noticed, (rank, new_size, value, *pair), in_sub, again in survivors:
            assert etype == "CommError", msg
            assert f"rank {victim} (pid" in msg and "exited" in msg, msg
            assert noticed < 2.0, f"noticed {noticed:.2f} s after the kill: {msg}"
            assert new_size == n and value == n * (n + 1) / 2, (rank, new_size, value)
            assert pair in ([], [2.0 if rank < 2 else None])
            assert in_sub in (None, (True, (1, 3), 2.0)), in_sub
            assert again == n
        assert sorted(res[3][0] for res in survivors) == list(range(n))
        if size == 4:  # global ranks 1 and 3 shrank the subgroup [1, 2, 3] to [1, 3]
            assert [res[4] for res in survivors] == [None, (True, (1, 3), 2.0), (True, (1, 3), 2.0)]
        assert world.segments() == []


# ------------------------------------------------------------------------ SIGSTOP


def job_stopped_mid_collective(victim, stopper, algo, trial, then_shrink, timeout):
    """`stopper` stops `victim` (SIGSTOP) during an all-reduce loop, waits until every other
    rank has failed, then resumes it (SIGCONT).  With then_shrink the survivors shrink before
    it is resumed (a stopped rank is left out at once), and the victim learns it was left out."""
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    pids = _pids()
    _collective_timeout(timeout)
    flags = f"{world._store_dir}/stop-{world._epoch}-{trial}"
    os.makedirs(flags, exist_ok=True)
    t = torch.ones(1 << 20)
    if r == stopper:
        threading.Timer(0.3, lambda: os.kill(pids[victim], signal.SIGSTOP)).start()
    start = time.monotonic()
    while True:
        etype, msg = world.catch(lambda: pycomm.all_reduce(t, algorithm=algo))
        if etype or time.monotonic() - start > 30:
            break
    failed_after = time.monotonic() - start - 0.3
    shrunk = None
    if r != victim:
        open(f"{flags}/failed-{r}", "w").close()
        deadline = time.monotonic() + 20
        while len(glob.glob(f"{flags}/failed-*")) < p - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        if then_shrink:
            g = pycomm.shrink()
            x = torch.ones(100)
            pycomm.all_reduce(x)
            shrunk = (g.size, x[0].item())
        if r == stopper:
            os.kill(pids[victim], signal.SIGCONT)
    elif then_shrink:
        shrunk = world.catch(pycomm.shrink)
    return etype, msg, failed_after, shrunk


STOPS = [(3, 2, 0, "ring"), (3, 1, 2, "tree"), (4, 1, 3, "ring"), (4, 3, 0, "tree")]


@pytest.mark.parametrize("size,victim,stopper,algo", STOPS)
def test_stopped_rank_is_blamed_by_every_survivor(run, pools, size, victim, stopper, algo):
    timeout = 1.5
    for trial in range(SCALE):
        results = run(size, job_stopped_mid_collective, victim, stopper, algo, trial, False, timeout,
                      pg_timeout=30.0, fresh=True)
        for r, (etype, msg, failed_after, _) in enumerate(results):
            if r == victim:  # resumed after the others failed: it learns why
                assert etype == "CommError" and f"rank {victim} (pid" in msg, msg
                continue
            assert etype in ("CommTimeoutError", "CommError"), msg
            assert f"rank {victim} (pid" in msg and "is stopped" in msg, f"rank {r} blames: {msg}"
            assert failed_after < timeout + 3, failed_after
        assert all(_state(pid) not in ("T", "t") for pid in pools(size).pids())


def test_stopped_rank_is_shrunk_away_and_told_it_was_left_out(run):
    results = run(3, job_stopped_mid_collective, 2, 0, "ring", "shrink", True, 1.5, pg_timeout=30.0,
                  fresh=True)
    for r, (etype, msg, _, shrunk) in enumerate(results[:2]):
        assert "rank 2 (pid" in msg and "is stopped" in msg, msg
        assert shrunk == (2, 2.0), shrunk
    etype, msg = results[2][3]
    assert etype == "CommTimeoutError" and "was left out" in msg and "[0, 1]" in msg, msg


# ------------------------------------------------------------------------ giving up


def job_gives_up(victim, how):
    r = pycomm.get_rank()
    t = torch.ones(1000)
    pycomm.all_reduce(t)
    if r == victim:
        if how == "destroy":
            pycomm.destroy_process_group()
        else:  # what the atexit hook runs as the process exits
            pycomm.distributed._leave_at_exit()
        time.sleep(0.5)  # alive: only the flag can tell the others
        return None, 0.0
    time.sleep(0.2)
    start = time.monotonic()
    failure = world.catch(lambda: pycomm.all_reduce(t))
    return failure, time.monotonic() - start


@pytest.mark.parametrize("how,reason", [("destroy", "destroy_process_group"), ("exit", "process exit")])
def test_rank_that_gives_up_is_noticed_at_once(run, how, reason):
    results = run(3, job_gives_up, 1, how, pg_timeout=30.0, fresh=True)
    for r, (failure, elapsed) in enumerate(results):
        if r == 1:
            continue
        etype, msg = failure
        assert etype == "CommError", msg
        assert f"rank 1 left the group ({reason})" in msg, msg
        assert elapsed < 1.0, f"took {elapsed:.2f} s of a 30 s timeout"
    assert "while rank 0 waited in all_reduce #2" in results[0][0][1] or \
        "while rank 2 waited in all_reduce #2" in results[2][0][1], results


def job_gives_up_torch(victim, how):
    dist = world.gloo()
    pg = dist.new_group(list(range(world._size)), backend="pycomm")
    t = torch.ones(100)
    dist.all_reduce(t, group=pg)
    if dist.get_rank() == victim:
        if how == "destroy":
            dist.destroy_process_group(pg)
        else:
            dist.distributed_c10d._abort_process_group(pg)
        time.sleep(0.5)
        return None, 0.0
    time.sleep(0.2)
    start = time.monotonic()
    failure = world.catch(lambda: dist.all_reduce(t, group=pg))
    elapsed = time.monotonic() - start
    dist.destroy_process_group(pg)
    return failure, elapsed


@pytest.mark.parametrize("how,reason", [("destroy", "destroy_process_group"), ("abort", "abort")])
def test_torch_backend_rank_that_gives_up_is_noticed_at_once(run, how, reason):
    results = run(3, job_gives_up_torch, 1, how, pg_timeout=30.0, fresh=True)
    for r, (failure, elapsed) in enumerate(results):
        if r != 1:
            assert f"rank 1 left the group ({reason})" in failure[1], failure
            assert elapsed < 1.0, elapsed


def job_leaves_after_its_part(trial):
    """Rank 0 broadcasts (ring: 0 -> 1 -> 2) and destroys its group as soon as its part is
    done, while rank 2 is stopped for 0.3 s, so rank 1 waits (on rank 2) after rank 0 left:
    rank 1 no longer needs rank 0, whose last pieces are in its slots, and must not fail."""
    r = pycomm.get_rank()
    pids = _pids()
    t = torch.full((4 << 20,), 7.0) if r == 0 else torch.zeros(4 << 20)
    pycomm.barrier()
    if r == 1:
        os.kill(pids[2], signal.SIGSTOP)
        threading.Timer(0.3, lambda: os.kill(pids[2], signal.SIGCONT)).start()
    failure = world.catch(lambda: pycomm.broadcast(t, 0, algorithm="ring"))
    if r == 0:
        pycomm.destroy_process_group()
    return failure, bool((t == 7).all())


def test_rank_that_finished_its_part_can_leave_without_failing_a_slower_peer(run):
    for trial in range(2 * SCALE):
        for r, (failure, right) in enumerate(run(3, job_leaves_after_its_part, trial, pg_timeout=30.0,
                                                 fresh=True)):
            assert failure == (None, ""), f"rank {r}: {failure}"
            assert right


# ------------------------------------------------------------------------ corruption


def job_corrupted(what):
    def go():
        t = torch.ones(100_000)
        pycomm.all_reduce(t)  # healthy; rank 0 may still read it when rank 1 damages its memory
        if pycomm.get_rank() == 1:
            pycomm.distributed.group_or_world(None).backends["cpu"].transport._corrupt_for_test(what)
            time.sleep(0.3)  # rank 0 waits, so it checks its peers (every 5 ms of a wait)
        pycomm.all_reduce(t)

    return world.catch(go)


@pytest.mark.parametrize("what", ["counter", "pid"])
def test_corrupted_peer_is_named(run, what):
    etype, msg = run(2, job_corrupted, what, pg_timeout=30.0, fresh=True)[0]
    assert etype == "CommError" and "rank 1's shared memory corrupted" in msg, msg
