"""The exchange all-reduce (recursive doubling, csrc/algorithms/pairwise.cpp).  The exact
tests of every collective (test_collectives_exact.py) run it like the ring and the tree on
1-5 and 8 ranks; here: the dtypes and ops they leave out (int8, int16, bool, the bitwise
ops, complex, views, several pieces per step), the same bits on every rank where the order
of the operands shows (max of -0.0 and +0.0, float sums of mixed magnitudes), its cost row
and the cost model's choice."""
import functools

import pytest
import torch
from verifiable import expected, rank_input

import pycomm
from pycomm import _C
from pycomm.tuning import CostModel, algorithm_override

INTS = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]
COUNTS = [0, 1, 7, 1001]
BIG = 65537  # more than one 256 KiB slot of float64 and int64: the steps stream piece by piece
BITWISE = {"band": torch.bitwise_and, "bor": torch.bitwise_or, "bxor": torch.bitwise_xor}


def _bitwise_input(r, n, dtype):
    return ((torch.arange(n) * 5 + r * 11) % 97).to(dtype)


def job_exact(counts, algorithm="exchange"):
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    bad, sigs = [], []

    def check(t, want, what):
        if not torch.equal(t, want):
            bad.append((*what, int((t != want).sum())))
        sigs.append(t.view(torch.uint8).sum().item() if t.numel() else 0)

    for dtype in [torch.int8, torch.int16]:  # the types test_collectives_exact leaves out
        for op in ["sum", "prod", "min", "max"]:
            for n in counts:
                t = rank_input(r, n, dtype, op)
                pycomm.all_reduce(t, op=op, algorithm=algorithm)
                check(t, expected(p, n, dtype, op), (str(dtype), op, n))
    for dtype in INTS:
        for op, fn in BITWISE.items():
            for n in counts[:4]:
                t = _bitwise_input(r, n, dtype)
                pycomm.all_reduce(t, op=op, algorithm=algorithm)
                check(t, functools.reduce(fn, [_bitwise_input(q, n, dtype) for q in range(p)]),
                      (str(dtype), op, n))
    for op, fn in {"sum": torch.logical_or, "max": torch.logical_or, "prod": torch.logical_and,
                   "min": torch.logical_and}.items():
        for n in counts[:5]:
            t = ((torch.arange(n) + r) % 3 == 0)
            pycomm.all_reduce(t, op=op, algorithm=algorithm)
            check(t, functools.reduce(fn, [((torch.arange(n) + q) % 3 == 0) for q in range(p)]),
                  ("bool", op, n))
    for dtype, op in [(torch.float64, "sum"), (torch.int64, "max"), (torch.float32, "prod")]:
        t = rank_input(r, BIG, dtype, op)
        pycomm.all_reduce(t, op=op, algorithm=algorithm)
        check(t, expected(p, BIG, dtype, op), (str(dtype), op, BIG))
    # In place on a view, and complex (summed as pairs of floats).
    big = torch.full((3 * 7,), 100.0)
    view = big[7:14]
    view.copy_(rank_input(r, 7, torch.float32, "sum"))
    pycomm.all_reduce(view, algorithm=algorithm)
    check(view, expected(p, 7, torch.float32, "sum"), ("view", "sum", 7))
    check(big[:7], torch.full((7,), 100.0), ("view untouched", "sum", 7))
    z = torch.complex(rank_input(r, 5, torch.float32, "sum"), -rank_input(r, 5, torch.float32, "sum"))
    pycomm.all_reduce(z, algorithm=algorithm)
    s = expected(p, 5, torch.float32, "sum")
    check(z, torch.complex(s, -s), ("complex64", "sum", 5))
    return bad, sigs


@pytest.mark.parametrize("size", [2, 3])
def test_exchange_exact(run, size):
    # 3: one rank folded into rank 0 and handed the result back.
    results = run(size, job_exact, COUNTS)
    for rank, (bad, _) in enumerate(results):
        assert not bad, f"rank {rank}: (dtype, op, count, wrong elements): {bad}"
    assert all(sig == results[0][1] for _, sig in results)


def job_order(n, algorithm="exchange"):
    r = pycomm.get_rank()
    # max(+0.0, -0.0) is whichever comes first: the ranks hold opposite zeros, so a rank
    # that put its own operand first would end with other bits than its partner.
    z = torch.tensor([0.0, -0.0, 0.0, -0.0]) * (1 if r % 2 == 0 else -1)
    pycomm.all_reduce(z, op="max", algorithm=algorithm)
    w = z.clone()
    pycomm.all_reduce(w, op="min", algorithm=algorithm)
    x = torch.randn(n, generator=torch.Generator().manual_seed(r)) * (10.0 ** (r % 4))
    pycomm.all_reduce(x, algorithm=algorithm)
    y = torch.randn(n, generator=torch.Generator().manual_seed(r)).to(torch.bfloat16)
    pycomm.all_reduce(y, algorithm=algorithm)
    return z.numpy().tobytes(), w.numpy().tobytes(), x.numpy().tobytes(), y.view(torch.int16).numpy().tobytes()


@pytest.mark.parametrize("size", [2, 3, 4])
def test_exchange_identical_bits_on_every_rank(run, size):
    results = run(size, job_order, 100_003)
    assert all(r == results[0] for r in results)


def job_auto_and_setting():
    # algorithm="auto" on 8 bytes: the model picks exchange on 2 ranks (one hop against two).
    t = torch.ones(2)
    pycomm.all_reduce(t)
    u = torch.ones(3, dtype=torch.float16)
    pycomm.all_reduce(u, algorithm="exchange", async_op=True).wait()  # the Python path
    try:
        pycomm.reduce_scatter(torch.empty(1), torch.ones(pycomm.get_world_size()), algorithm="exchange")
        err = ""
    except ValueError as e:
        err = str(e)
    return t.tolist(), u.tolist(), err


def test_auto_and_errors(run):
    for t, u, err in run(2, job_auto_and_setting):
        assert t == [2.0, 2.0] and u == [2.0, 2.0, 2.0]
        assert "unknown algorithm 'exchange'" in err and "'ring', 'tree' or 'auto'" in err


def test_cost_row():
    a, b, g = 3e-6, 1 / 5e9, 1 / 11e9
    coll, algo = _C.COLLECTIVES["all_reduce"], _C.ALGORITHMS["exchange"]
    for p, k, e in [(2, 1, 0), (3, 1, 1), (4, 2, 0), (5, 2, 1), (8, 3, 0), (13, 3, 1)]:
        for n in [0.0, 8.0, 1e6]:
            want = (k + 2 * e) * a + (k + e) * n * (b + g)
            assert _C.predict(coll, algo, n, p, a, b, g) == pytest.approx(want, rel=1e-12, abs=1e-18)
    row = next(r for r in _C.TABLE if r["name"] == "all_reduce")
    assert row["algorithms"] == ["ring", "tree", "exchange"]
    m = CostModel()
    assert m.choose("all_reduce", 8, 2) == "exchange"  # alpha + n(beta+gamma) < 2 alpha + ...
    assert m.choose("all_reduce", 64 << 20, 2) == "ring"
    assert m.choose("all_reduce", 8, 3) == "exchange"  # 3 hops against the tree's 2D = 4
    assert m.choose("all_reduce", 1 << 18, 8) == "tree"  # 3 whole buffers moved: too many
    assert 0 < m.crossover("all_reduce", 2, "exchange") < 1 << 20
    assert "exchange chosen up to" in m.table()


def test_algo_setting():
    assert algorithm_override("all_reduce", "exchange") == "exchange"
    assert algorithm_override("all_reduce", "allreduce:exchange;allgather:ring") == "exchange"
    assert algorithm_override("all_gather", "exchange") is None  # applies where it exists
    with pytest.raises(ValueError, match="all_gather has no exchange algorithm"):
        algorithm_override("all_gather", "allgather:exchange")
