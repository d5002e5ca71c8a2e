"""Exact results, like nccl-tests' verifiable inputs: every input is a small integer, so
sums, products, minima and maxima are exact in every dtype (bfloat16 included) and each
rank's result must equal the expected tensor bit for bit."""
import pytest
import torch
import world
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from verifiable import expected, rank_input

import pycomm

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64,
          torch.uint8]
COUNTS = [0, 1, 2, 7, 1001, 65537]  # empty, tiny, odd, and more than one 256 KiB slot
OPS = ["sum", "avg", "prod", "min", "max"]


def _ops_for(dtype):
    return [op for op in OPS if op != "avg" or dtype.is_floating_point]


def job_all_reduce(algorithm, counts, dtypes):
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    bad, outs = [], []
    for dtype in dtypes:
        for op in _ops_for(dtype):
            for n in counts:
                t = rank_input(r, n, dtype, op)
                pycomm.all_reduce(t, op=op, algorithm=algorithm)
                want = expected(p, n, dtype, op)
                if not torch.equal(t, want):
                    bad.append((str(dtype), op, n, int((t != want).sum())))
                outs.append(t)
    return bad, [o.view(torch.uint8).sum().item() if o.numel() else 0 for o in outs]


def job_reduce_scatter(algorithm, counts, dtypes, in_place):
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    bad = []
    for dtype in dtypes:
        for op in _ops_for(dtype):
            for n in counts:
                inp = rank_input(r, n * p, dtype, op)
                keep = inp.clone()
                out = inp[r * n:(r + 1) * n] if in_place else torch.empty(n, dtype=dtype)
                pycomm.reduce_scatter(out, inp, op=op, algorithm=algorithm)
                want = expected(p, n * p, dtype, op)[r * n:(r + 1) * n]
                if not torch.equal(out, want):
                    bad.append((str(dtype), op, n, "wrong"))
                if not in_place and not torch.equal(inp, keep):
                    bad.append((str(dtype), op, n, "input modified"))
    return bad


def job_all_gather(algorithm, counts, dtypes, in_place):
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    bad = []
    for dtype in dtypes:
        for n in counts:
            block = rank_input(r, n, dtype, "sum")
            out = torch.full((n * p,), 3, dtype=dtype)
            if in_place:
                out[r * n:(r + 1) * n] = block
                inp = out[r * n:(r + 1) * n]
            else:
                inp = block
            pycomm.all_gather(out, inp, algorithm=algorithm)
            want = torch.cat([rank_input(q, n, dtype, "sum") for q in range(p)])
            if not torch.equal(out, want):
                bad.append((str(dtype), n))
    return bad


def job_broadcast(counts, dtypes):
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    bad = []
    for src in range(p):
        for dtype in dtypes:
            for n in counts:
                t = rank_input(r, n, dtype, "sum")
                pycomm.broadcast(t, src=src)
                if not torch.equal(t, rank_input(src, n, dtype, "sum")):
                    bad.append((src, str(dtype), n))
    return bad


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("algorithm", ["ring", "tree", "exchange", "auto"])
def test_all_reduce_exact(run, size, algorithm):
    results = run(size, job_all_reduce, algorithm, COUNTS, DTYPES)
    for rank, (bad, _) in enumerate(results):
        assert not bad, f"rank {rank}: (dtype, op, count, wrong elements): {bad}"
    # Every rank ends with the same bits.
    assert all(sig == results[0][1] for _, sig in results)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("algorithm", ["ring", "tree"])
@pytest.mark.parametrize("in_place", [False, True])
def test_reduce_scatter_exact(run, size, algorithm, in_place):
    for rank, bad in enumerate(run(size, job_reduce_scatter, algorithm, COUNTS[:5], DTYPES, in_place)):
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("algorithm", ["ring", "tree"])
@pytest.mark.parametrize("in_place", [False, True])
def test_all_gather_exact(run, size, algorithm, in_place):
    for rank, bad in enumerate(run(size, job_all_gather, algorithm, COUNTS, DTYPES, in_place)):
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_broadcast_exact(run, size):
    for rank, bad in enumerate(run(size, job_broadcast, [0, 1, 5, 70001], DTYPES)):
        assert not bad, f"rank {rank}: {bad}"


def job_one(collective, algorithm, n, dtype_name, op):
    dtype = getattr(torch, dtype_name)
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    if collective == "all_reduce":
        t = rank_input(r, n, dtype, op)
        pycomm.all_reduce(t, op=op, algorithm=algorithm)
        return torch.equal(t, expected(p, n, dtype, op))
    if collective == "reduce_scatter":
        out = torch.empty(n, dtype=dtype)
        pycomm.reduce_scatter(out, rank_input(r, n * p, dtype, op), op=op, algorithm=algorithm)
        return torch.equal(out, expected(p, n * p, dtype, op)[r * n:(r + 1) * n])
    out = torch.empty(n * p, dtype=dtype)
    pycomm.all_gather(out, rank_input(r, n, dtype, op), algorithm=algorithm)
    return torch.equal(out, torch.cat([rank_input(q, n, dtype, op) for q in range(p)]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.integers(1, 4),
    collective=st.sampled_from(["all_reduce", "reduce_scatter", "all_gather"]),
    algorithm=st.sampled_from(["ring", "tree", "auto"]),
    n=st.integers(0, 200_000),
    dtype=st.sampled_from(["float32", "bfloat16", "int64", "uint8"]),
    op=st.sampled_from(["sum", "max", "prod"]),
)
def test_random_sizes(run, size, collective, algorithm, n, dtype, op):
    assert all(run(size, job_one, collective, algorithm, n, dtype, op))


def job_against_gloo(seed):
    """pycomm against torch.distributed's gloo on random (inexact) float32 data and on int64."""
    dist = world.gloo()
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    gen = torch.Generator().manual_seed(seed * 100 + r)
    report = {}
    for n in [1, 999, 300_001]:
        x = torch.randn(n, generator=gen)
        for algorithm in ["ring", "tree"]:
            a, b = x.clone(), x.clone()
            pycomm.all_reduce(a, algorithm=algorithm)
            dist.all_reduce(b)
            report[("all_reduce", algorithm, n)] = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
        xi = torch.randint(-1000, 1000, (n,), generator=gen)
        a, b = xi.clone(), xi.clone()
        pycomm.all_reduce(a, op="max")
        dist.all_reduce(b, op=dist.ReduceOp.MAX)
        report[("max_int", n)] = float(not torch.equal(a, b))
        out_a, out_b = torch.empty(n * p), torch.empty(n * p)
        pycomm.all_gather(out_a, x)
        dist.all_gather_into_tensor(out_b, x)
        report[("all_gather", n)] = float(not torch.equal(out_a, out_b))
        # The ReduceOp enum is accepted too.
        c = xi.clone()
        pycomm.all_reduce(c, op=dist.ReduceOp.SUM)
        d = xi.clone()
        dist.all_reduce(d)
        report[("reduceop_enum", n)] = float(not torch.equal(c, d))
    return report


@pytest.mark.parametrize("size", [2, 3])
def test_matches_gloo(run, size):
    for report in run(size, job_against_gloo, 1):
        for key, err in report.items():
            assert err < 1e-5, f"{key}: differs from gloo by {err}"


def job_identical_bits(n, algorithm):
    r = pycomm.get_rank()
    x = torch.randn(n, generator=torch.Generator().manual_seed(r)) * (10.0 ** (r % 4))
    pycomm.all_reduce(x, algorithm=algorithm)
    y = torch.randn(n, generator=torch.Generator().manual_seed(r)).to(torch.bfloat16)
    pycomm.all_reduce(y, algorithm=algorithm)
    return x.numpy().tobytes(), y.view(torch.int16).numpy().tobytes()


@pytest.mark.parametrize("algorithm", ["ring", "tree", "exchange"])
def test_identical_bits_on_every_rank(run, algorithm):
    results = run(3, job_identical_bits, 100_003, algorithm)
    assert all(r == results[0] for r in results)


def job_half_accumulates_in_float32():
    # 1 + 2^-9 is not representable in bfloat16 (8 bits of mantissa) but the float32 sum
    # of four such halves, rounded once, is: rounding at every step would lose it.
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    t = torch.tensor([1.0 if r == 0 else 2.0 ** -9], dtype=torch.bfloat16).repeat(5)
    pycomm.all_reduce(t)
    want = torch.tensor([1.0 + (p - 1) * 2.0 ** -9]).to(torch.bfloat16).repeat(5)
    return torch.equal(t, want), t.tolist()


def test_half_types_accumulate_in_float32(run):
    assert all(ok for ok, _ in run(4, job_half_accumulates_in_float32))


def job_all_collectives(counts):
    bad = job_all_reduce("ring", counts, [torch.float32, torch.int64])[0]
    bad += job_all_reduce("tree", counts, [torch.bfloat16, torch.uint8])[0]
    bad += job_all_reduce("exchange", counts, [torch.float64, torch.int32])[0]
    for algorithm in ("ring", "tree"):
        bad += job_reduce_scatter(algorithm, counts, [torch.float32], False)
        bad += job_all_gather(algorithm, counts, [torch.int32], False)
    bad += job_broadcast([3, 70001], [torch.float64])
    return bad


@pytest.mark.parametrize("size", [5, 8])
def test_larger_worlds_exact(pools, size):
    # More ranks than cores (2 here): also shows that waiting ranks yield to the others.
    pool = pools(size)
    try:
        for rank, bad in enumerate(pool.run(job_all_collectives, [1, 7, 4099], timeout=240)):
            assert not bad, f"rank {rank}: {bad}"
    finally:
        pool.close()  # do not keep this many idle processes for the rest of the session
