"""The torch.distributed backend "pycomm": real clients (DDP, functional collectives, FSDP2)
get the same results as with gloo."""

import pytest
import torch
import world


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
                               torch.nn.ReLU(), torch.nn.Linear(128, 10))


def _train_ddp(group, steps=4):
    dist = world.gloo()
    model = _model()
    # 0.02 MB buckets: the 70 KB of gradients go out as several buckets during backward.
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=group, bucket_cap_mb=0.02)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(steps):
        x, y = torch.randn(16, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    buckets = len(ddp.reducer._get_zeros_tensors()) if hasattr(ddp.reducer, "_get_zeros_tensors") else None
    return [p.detach().clone() for p in model.parameters()], buckets


def job_ddp():
    ours, _ = _train_ddp(world.torch_group("pycomm"))
    theirs, _ = _train_ddp(world.torch_group("gloo"))
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs)), float(sum(p.sum() for p in ours))


def test_ddp_trains_to_the_same_weights_as_gloo(run):
    results = run(2, job_ddp)
    for diff, _ in results:
        assert diff < 1e-6
    assert results[0][1] == results[1][1]  # replicas agree


def job_collectives():
    dist = world.gloo()
    g = world.torch_group("pycomm")
    r, p = dist.get_rank(), dist.get_world_size()
    out = {}
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3) + r
    dist.all_reduce(t, group=g)
    out["all_reduce"] = t.tolist()
    h = torch.full((4,), 1.0 + r, dtype=torch.bfloat16)
    dist.all_reduce(h, op=dist.ReduceOp.AVG, group=g)
    out["avg_bf16"] = h.float().tolist()
    ts = [torch.ones(3) * (r + 1), torch.ones(2, dtype=torch.float32) * r]
    dist.all_reduce_coalesced(ts, group=g)
    out["coalesced"] = [x.tolist() for x in ts]
    lst = [torch.empty(3) for _ in range(p)]
    dist.all_gather(lst, torch.full((3,), float(r)), group=g)
    out["all_gather"] = [x.tolist() for x in lst]
    flat = torch.empty(3 * p)
    dist.all_gather_into_tensor(flat, torch.full((3,), float(r)), group=g)
    out["all_gather_into_tensor"] = flat.tolist()
    rs = torch.empty(2)
    dist.reduce_scatter_tensor(rs, torch.arange(2.0 * p) + r, group=g)
    out["reduce_scatter_tensor"] = rs.tolist()
    rs2 = torch.empty(2)
    dist.reduce_scatter(rs2, [torch.full((2,), float(i + r)) for i in range(p)], group=g)
    out["reduce_scatter"] = rs2.tolist()
    b = torch.full((5,), float(r))
    dist.broadcast(b, src=1, group=g)
    out["broadcast"] = b.tolist()
    nc = torch.zeros(4, 4)[:, 1]  # non-contiguous
    nc += r + 1
    dist.all_reduce(nc, group=g)
    out["non_contiguous"] = nc.tolist()
    dist.barrier(group=g)
    if r == 0:
        dist.send(torch.arange(5.0), dst=1, group=g)
    elif r == 1:
        got = torch.empty(5)
        dist.recv(got, src=0, group=g)
        out["recv"] = got.tolist()
    w = dist.all_reduce(torch.ones(2), group=g, async_op=True)
    fut = w.get_future()
    w.wait()
    out["future"] = fut.value()[0].tolist()
    y = torch.empty(p)
    dist.all_to_all_single(y, torch.arange(p, dtype=torch.float32) + 10 * r, group=g)
    out["all_to_all"] = y.tolist()
    return out


def test_collectives_through_torch_distributed(run):
    res = run(2, job_collectives)
    for r, out in enumerate(res):
        assert out["all_reduce"] == [[1.0, 3.0, 5.0], [7.0, 9.0, 11.0]]
        assert out["avg_bf16"] == [1.5] * 4
        assert out["coalesced"] == [[3.0] * 3, [1.0, 1.0]]
        assert out["all_gather"] == [[0.0] * 3, [1.0] * 3]
        assert out["all_gather_into_tensor"] == [0.0] * 3 + [1.0] * 3
        assert out["reduce_scatter"] == [2.0 * r + 1.0] * 2
        assert out["broadcast"] == [1.0] * 5
        assert out["non_contiguous"] == [3.0] * 4
        assert out["future"] == [2.0, 2.0]
        assert out["all_to_all"] == [10.0 * j + r for j in range(len(res))]
    assert res[1]["recv"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    # reduce_scatter_tensor: rank r gets elements [2r, 2r+1] of sum_q (arange(4) + q)
    assert res[0]["reduce_scatter_tensor"] == [1.0, 3.0]
    assert res[1]["reduce_scatter_tensor"] == [5.0, 7.0]


def job_functional():
    import torch.distributed._functional_collectives as fc

    dist = world.gloo()
    g = world.torch_group("pycomm")
    r = dist.get_rank()
    a = fc.all_reduce(torch.full((3,), float(r + 1)), "sum", g)
    b = fc.all_gather_tensor(torch.full((2,), float(r)), 0, g)
    c = fc.reduce_scatter_tensor(torch.arange(4.0), "sum", 0, g)
    return a.tolist(), b.tolist(), c.tolist()


def test_functional_collectives(run):
    for r, (a, b, c) in enumerate(run(2, job_functional)):
        assert a == [3.0] * 3
        assert b == [0.0, 0.0, 1.0, 1.0]
        assert c == [4.0 * r, 4.0 * r + 2.0]  # rank r's half of 2 * arange(4)


def job_fsdp2():
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    dist = world.gloo()
    results = {}
    for backend in ("pycomm", "gloo"):
        group = world.torch_group(backend)
        mesh = DeviceMesh.from_group(group, "cpu")
        assert type(mesh.get_group()._get_backend(torch.device("cpu"))).__module__.startswith(
            "pycomm" if backend == "pycomm" else "torch")
        model = _model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(dist.get_rank())
        for _ in range(3):
            x, y = torch.randn(8, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        results[backend] = [p.full_tensor().detach() for p in model.parameters()]
    return max((a - b).abs().max().item() for a, b in zip(results["pycomm"], results["gloo"]))


def test_fsdp2_trains_like_gloo(run):
    assert max(run(2, job_fsdp2, timeout=240)) < 1e-6


def job_backend_isend_irecv():
    dist = world.gloo()
    g = world.torch_group("pycomm")
    r = dist.get_rank()
    n = 4 << 20
    out, got = torch.full((n,), float(r + 1)), torch.empty(n)
    s = dist.isend(out, 1 - r, group=g)
    q = dist.irecv(got, 1 - r, group=g)
    q.wait()
    s.wait()
    strided = torch.zeros(6, 2)[:, 0]  # a non-contiguous receive buffer
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.arange(6.0) * (r + 1), 1 - r, g),
                                    dist.P2POp(dist.irecv, strided, 1 - r, g)])
    for w in works:
        w.wait()
    return got[0].item(), strided.tolist()


def test_backend_isend_irecv(run):
    for r, (first, strided) in enumerate(run(2, job_backend_isend_irecv, timeout=60)):
        assert first == float(2 - r)
        assert strided == [float(i * (2 - r)) for i in range(6)]


def _like_gloo_ops(g):
    """What torch's own suite does not run with gloo on the CPU (its all_to_all tests are for
    MPI and NCCL, its bool tests for NCCL) and the issue asks of the backend: every dtype and op
    gloo takes, all_to_all and alltoall, rooted collectives and the object collectives."""
    dist = world.gloo()
    r, p = dist.get_rank(), dist.get_world_size()
    out = {}

    def attempt(key, fn):
        try:
            out[key] = fn()
        except Exception as e:  # noqa: BLE001 - gloo refuses some types; pycomm may not
            out[key] = f"refused: {type(e).__name__}"

    ops = {"sum": dist.ReduceOp.SUM, "prod": dist.ReduceOp.PRODUCT, "min": dist.ReduceOp.MIN,
           "max": dist.ReduceOp.MAX, "band": dist.ReduceOp.BAND, "bor": dist.ReduceOp.BOR,
           "bxor": dist.ReduceOp.BXOR}
    for dt in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float32,
               torch.float64, torch.float16, torch.bfloat16, torch.complex64):
        for name, op in ops.items():
            def reduce_all(dt=dt, op=op):
                t = (torch.tensor([1, 2, 3, 5, 6]) + r).to(dt)
                dist.all_reduce(t, op, group=g)
                return t.tolist()

            attempt(f"all_reduce {dt} {name}", reduce_all)

    def a2a_single():
        ins = [(j + 1) * (r + 1) for j in range(p)]  # uneven: rank r sends (j+1)(r+1) rows to j
        outs = [(r + 1) * (j + 1) for j in range(p)]
        x = torch.arange(float(sum(ins))) + 100 * r
        y = torch.empty(sum(outs))
        dist.all_to_all_single(y, x, outs, ins, group=g)
        return y.tolist()

    def a2a_list():
        ys = [torch.empty(2, dtype=torch.int64) for _ in range(p)]
        dist.all_to_all(ys, [torch.full((2,), 10 * r + j, dtype=torch.int64) for j in range(p)], group=g)
        return [y.tolist() for y in ys]

    def rooted():
        t = torch.arange(4.0) + r
        dist.reduce(t, dst=p - 1, op=dist.ReduceOp.MAX, group=g)
        lst = [torch.empty(3) for _ in range(p)] if r == 0 else None
        dist.gather(torch.full((3,), float(r)), lst, dst=0, group=g)
        s = torch.empty(2)
        dist.scatter(s, [torch.full((2,), 7.0 * j) for j in range(p)] if r == 1 else None, src=1, group=g)
        # torch leaves the non-root tensors of reduce unspecified (gloo writes partial sums there)
        return t.tolist() if r == p - 1 else None, lst and [x.tolist() for x in lst], s.tolist()

    def objects():
        everyone = [None] * p
        dist.all_gather_object(everyone, {"rank": r, "sq": [r] * r}, group=g)
        gathered = [None] * p if r == 0 else None
        dist.gather_object(("x", r), gathered, dst=0, group=g)
        got = [None]
        dist.scatter_object_list(got, [f"to {j}" for j in range(p)] if r == 0 else None, src=0, group=g)
        lst = [r, "b"]
        dist.broadcast_object_list(lst, src=p - 1, group=g)
        return everyone, gathered, got, lst

    def sparse():
        i = torch.tensor([[r, 2], [0, r]])
        t = torch.sparse_coo_tensor(i, torch.tensor([1.0, 2.0 + r]), (4, 4), check_invariants=True)
        dist.all_reduce(t, group=g)
        return t.to_dense().tolist()

    for key, fn in (("all_to_all_single", a2a_single), ("all_to_all", a2a_list), ("rooted", rooted),
                    ("objects", objects), ("sparse", sparse)):
        attempt(key, fn)
    return out


def job_like_gloo():
    return _like_gloo_ops(world.torch_group("gloo")), _like_gloo_ops(world.torch_group("pycomm"))


@pytest.mark.parametrize("size", [2, 3])
def test_what_gloo_takes_pycomm_takes_with_the_same_results(run, size):
    for gloo, ours in run(size, job_like_gloo):
        took = {k: v for k, v in gloo.items() if not isinstance(v, str)}  # what gloo did not refuse
        assert len(took) > 40, gloo
        assert {k: ours[k] for k in took} == took
