"""Groups, async handles, point-to-point, init methods, the tree shape and the cost model."""
import datetime
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import pycomm
from pycomm import _C, tuning

HERE = os.path.dirname(__file__)


# ------------------------------------------------------------------------ groups


def job_subgroups():
    r = pycomm.get_rank()
    evens = pycomm.new_group([0, 2])
    odd = pycomm.new_group([1])
    everyone = pycomm.new_group(range(3))
    out = {"world": pycomm.get_world_size(), "rank_in_evens": pycomm.get_rank(evens),
           "size_evens": pycomm.get_world_size(evens)}
    if r in (0, 2):
        t = torch.full((5,), float(r + 1))
        pycomm.all_reduce(t, group=evens)
        out["evens_sum"] = t[0].item()
        b = torch.full((3,), float(r))
        pycomm.broadcast(b, src=1, group=evens)  # group rank 1 is global rank 2
        out["evens_bcast"] = b[0].item()
    else:
        try:
            pycomm.all_reduce(torch.ones(2), group=evens)
        except ValueError as e:
            out["non_member_error"] = str(e)
        t = torch.ones(2)
        pycomm.all_reduce(t, group=odd)
        out["odd_sum"] = t[0].item()
    t = torch.ones(4)
    pycomm.all_reduce(t, group=everyone)
    out["everyone"] = t[0].item()
    return out


def test_new_group(run):
    r0, r1, r2 = run(3, job_subgroups)
    assert r0["evens_sum"] == r2["evens_sum"] == 4.0
    assert r0["evens_bcast"] == r2["evens_bcast"] == 2.0
    assert (r0["rank_in_evens"], r1["rank_in_evens"], r2["rank_in_evens"]) == (0, -1, 1)
    assert r0["size_evens"] == 2 and r0["world"] == 3
    assert "not a member" in r1["non_member_error"]
    assert r1["odd_sum"] == 1.0
    assert r0["everyone"] == r1["everyone"] == r2["everyone"] == 3.0


def job_new_group_errors():
    errors = []
    for ranks in ([], [0, 0], [5], 3):
        try:
            pycomm.new_group(ranks)
        except (ValueError, TypeError) as e:
            errors.append(type(e).__name__)
    return errors


def test_new_group_bad_ranks(run):
    assert run(2, job_new_group_errors) == [["ValueError", "ValueError", "ValueError", "TypeError"]] * 2


# ------------------------------------------------------------------------ async


def job_async():
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    tensors = [torch.full((50_000,), float(i + r)) for i in range(6)]
    works = [pycomm.all_reduce(t, async_op=True) for t in tensors[:5]]
    pycomm.all_reduce(tensors[5])  # a blocking call after queued async ones runs after them
    fut = works[0].get_future()
    ok = [w.wait() for w in works]
    done = all(w.is_completed() for w in works)
    sums = [t[0].item() for t in tensors]
    out = torch.empty(p * 3)
    w = pycomm.all_gather(out, torch.full((3,), float(r)), async_op=True)
    w.wait(timeout=30)
    return ok, done, sums, fut.wait()[0][0].item(), out.tolist()


def test_async_handles_complete_in_order(run):
    p = 3
    for ok, done, sums, fut_value, gathered in run(p, job_async):
        assert ok == [True] * 5 and done
        assert sums == [p * i + p * (p - 1) / 2 for i in range(6)]
        assert fut_value == sums[0]
        assert gathered == [float(q) for q in range(p) for _ in range(3)]


# ------------------------------------------------------------------------ point-to-point


def job_p2p():
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    nxt, prv = (r + 1) % p, (r - 1) % p
    # A ring shift where everyone sends and receives at once: batched, so no deadlock even
    # for messages larger than the transport's buffers.
    send = torch.full((3_000_000,), float(r))
    got = torch.empty(3_000_000)
    works = pycomm.batch_isend_irecv([pycomm.P2POp(pycomm.isend, send, nxt),
                                      pycomm.P2POp(pycomm.irecv, got, prv)])
    for w in works:
        w.wait()
    small = torch.empty(4, dtype=torch.int64)
    if r == 0:
        pycomm.send(torch.arange(4), dst=1)
    elif r == 1:
        pycomm.recv(small, src=0)
    return got[0].item(), got[-1].item(), small.tolist() if r == 1 else None


def test_send_recv(run):
    res = run(3, job_p2p)
    for r, (first, last, small) in enumerate(res):
        assert first == last == float((r - 1) % 3)
    assert res[1][2] == [0, 1, 2, 3]


def job_p2p_size_mismatch():
    r = pycomm.get_rank()
    try:
        if r == 0:
            pycomm.send(torch.ones(10), dst=1)
            pycomm.barrier()
        else:
            pycomm.recv(torch.ones(20), src=0)
    except pycomm.CommError as e:
        return type(e).__name__, str(e)
    return None, ""


def test_p2p_size_mismatch_is_reported(run):
    res = run(2, job_p2p_size_mismatch, pg_timeout=10.0, fresh=True)
    assert res[1][0] == "CommMismatchError" and "send/recv" in res[1][1], res


# ------------------------------------------------------------------------ init methods


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_tcp_and_file_single_rank(tmp_path):
    for method in (f"tcp://127.0.0.1:{_free_port()}", f"file://{tmp_path}/store"):
        g = pycomm.init_process_group(0, 1, init_method=method, timeout=datetime.timedelta(seconds=10))
        try:
            t = torch.arange(5.0)
            pycomm.all_reduce(t, op="avg")
            assert torch.equal(t, torch.arange(5.0)) and g.size == 1
            with pytest.raises(RuntimeError, match="already initialised"):
                pycomm.init_process_group(0, 1, init_method=method)
        finally:
            pycomm.destroy_process_group()
    assert not pycomm.is_initialized()


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0, world_size=1, init_method="udp://x:1"), "tcp://"),
    (dict(rank=0, world_size=1, init_method="tcp://nohost"), "host and a port"),
    (dict(rank=3, world_size=2, init_method="file:///tmp/x"), "not in"),
    (dict(rank=0, world_size=1, init_method="file:///tmp/x", timeout=5), "timedelta"),
])
def test_init_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pycomm.init_process_group(**kwargs)


def test_init_without_environment_says_what_to_set(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        pycomm.init_process_group()


def test_torchrun():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(PYCOMM_DEBUG="INFO", PYCOMM_ALGO="allreduce:tree;allgather:ring")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
         str(_free_port()), os.path.join(HERE, "torchrun_job.py")],
        capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 of 2: ok" in proc.stdout and "rank 1 of 2: ok" in proc.stdout
    assert "rank 0 of 2: backend ok" in proc.stdout and "rank 1 of 2: backend ok" in proc.stdout
    # PYCOMM_DEBUG logs each collective's algorithm and transport, from the Python API and
    # from the backend, and PYCOMM_ALGO chose the tree for all-reduce in both.
    log = proc.stdout + proc.stderr
    line = "pycomm: all_reduce of 4004 B on group 0 (rank 1/2): tree over shm"
    assert log.count(line) == 2, log[-3000:]  # the backend runs the same path as the API


# ------------------------------------------------------------------------ the trees


@pytest.mark.parametrize("which", [0, 1])
def test_binary_trees_are_trees(which):
    for p in range(1, 65):
        nodes = [_C.tree(r, p, which) for r in range(p)]
        roots = [r for r, (parent, _, _) in enumerate(nodes) if parent < 0]
        assert len(roots) == 1, (p, nodes)
        for r, (parent, c0, c1) in enumerate(nodes):
            for c in (c0, c1):
                if c >= 0:
                    assert 0 <= c < p and nodes[c][0] == r, (p, r, c)
            if parent >= 0:
                assert r in nodes[parent][1:], (p, r, parent)
        # every rank reaches the root
        for r in range(p):
            seen, x = set(), r
            while x >= 0:
                assert x not in seen
                seen.add(x)
                x = nodes[x][0]
        assert tuning.tree_depth(p) <= (p - 1).bit_length() + 1


def test_double_tree_interior_ranks_are_leaves_in_the_other_tree():
    for p in range(2, 65, 2):  # NCCL's property for even sizes
        for r in range(p):
            interior = [any(c >= 0 for c in _C.tree(r, p, w)[1:]) for w in (0, 1)]
            assert not all(interior), (p, r)


# ------------------------------------------------------------------------ the cost model


def test_cost_model_prefers_tree_small_and_ring_large():
    m = tuning.CostModel()
    assert m.choose("all_gather", 8, 8) == "tree"
    assert m.choose("all_reduce", 1 << 18, 8) == "tree"  # the exchange moves 3 whole buffers
    assert m.choose("all_reduce", 8, 8) == "exchange"  # 3 hops against the double tree's 6
    assert m.choose("all_reduce", 64 << 20, 8) == "ring"
    assert m.choose("all_reduce", 64 << 20, 2) == "ring"
    for coll in tuning.COLLECTIVES:
        for algo in tuning.algorithms(coll):
            assert m.time(coll, algo, 1 << 20, 4) > m.time(coll, algo, 1 << 10, 4) > 0
    assert "alpha" in m.table()
    with pytest.raises(ValueError, match="ring"):
        m.time("all_reduce", "butterfly", 8, 2)


def test_fit_recovers_known_constants():
    truth = tuning.CostModel(alpha=7e-6, beta=1 / 3e9, gamma=1 / 9e9)
    p = 2
    rows = [dict(collective=c, bytes=n, seconds=truth.time(c, "ring", n, p))
            for c in ("all_gather", "all_reduce") for n in (8, 1 << 10, 1 << 16, 1 << 20, 1 << 24)]
    m = tuning.fit(rows, p)
    assert m.alpha == pytest.approx(truth.alpha, rel=1e-6)
    assert m.beta == pytest.approx(truth.beta, rel=1e-6)
    assert m.gamma == pytest.approx(truth.gamma, rel=1e-6)


def test_tune_file_round_trip_and_bad_files(tmp_path):
    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"model": {"alpha": 1e-5, "beta": 1e-9, "gamma": 2e-10}}))
    m = tuning.load(path)
    assert (m.alpha, m.beta, m.gamma, m.source) == (1e-5, 1e-9, 2e-10, str(path))
    assert tuning.CostModel.from_json(m.to_json()) == m
    path.write_text("{not json")
    assert tuning.load(path) == tuning.CostModel()
    path.write_text(json.dumps({"model": {"alpha": -1, "beta": 1e-9, "gamma": 1e-9}}))
    assert tuning.load(path) == tuning.CostModel()


def test_pycomm_tune_command(tmp_path):
    out = tmp_path / "tune.json"
    proc = subprocess.run([sys.executable, "-m", "pycomm.cli", "tune", "--nprocs", "2", "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(out) in proc.stdout
    data = json.loads(out.read_text())
    assert data["nprocs"] == 2 and len(data["measurements"]) >= 10
    m = tuning.load(out)
    assert m.source == str(out) and all(v > 0 for v in (m.alpha, m.beta, m.gamma))
    # the single-copy path has its own constants, fitted to a run forced through it
    assert {"copy_alpha", "copy_beta"} <= set(data["model"]) and len(data["single_copy_measurements"]) >= 10
    assert (m.copy_alpha, m.copy_beta) == (data["model"]["copy_alpha"], data["model"]["copy_beta"])


def job_isend_then_irecv_both_ways(n):
    # Each rank sends 16 MB (16x the transport's in-flight capacity) to the other and only
    # then posts its receive: posted messages progress together, so this cannot deadlock.
    r = pycomm.get_rank()
    peer = 1 - r
    out, got = torch.full((n,), float(r + 1)), torch.empty(n)
    s = pycomm.isend(out, peer)
    q = pycomm.irecv(got, peer)
    q.wait()
    s.wait()
    return got[0].item(), got[-1].item(), s.is_completed() and q.is_completed()


def test_large_isend_irecv_in_either_order_do_not_deadlock(run):
    for r, (first, last, done) in enumerate(run(2, job_isend_then_irecv_both_ways, 4 << 20, timeout=60,
                                                 pg_timeout=20.0)):
        assert first == last == float(2 - r) and done


def job_isend_then_collective():
    # Rank 0 posts a large isend and goes straight into an all_reduce; rank 1 receives first
    # and joins the all_reduce after.  The collective carries the pending message along.
    r = pycomm.get_rank()
    big = torch.arange(3 << 20, dtype=torch.float32)
    t = torch.ones(10)
    if r == 0:
        w = pycomm.isend(big, 1)
        pycomm.all_reduce(t)
        w.wait()
        return t[0].item(), None
    got = torch.empty_like(big)
    pycomm.recv(got, 0)
    pycomm.all_reduce(t)
    return t[0].item(), torch.equal(got, big)


def test_pending_isend_progresses_during_a_collective(run):
    res = run(2, job_isend_then_collective, timeout=60, pg_timeout=20.0)
    assert res[0][0] == res[1][0] == 2.0 and res[1][1] is True
