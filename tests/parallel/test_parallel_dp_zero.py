"""DataParallel (bucketed, overlapped, averaged) and ZeRO-1 on 2 ranks, against one process."""
import torch
from torch import nn

import pycomm
from pycomm import parallel


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def _data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)


def _reference_grads(world):
    model = _model()
    xs, ys = zip(*[_data(r) for r in range(world)])
    nn.functional.mse_loss(model(torch.cat(xs)), torch.cat(ys)).backward()
    return [p.grad.clone() for p in model.parameters()]


def job_dp(bucket_cap_mb, perturb):
    torch.set_num_threads(1)
    mesh = parallel.init_mesh(dp=pycomm.get_world_size())
    model = _model()
    if perturb and mesh.dp_rank == 1:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # construction must broadcast rank 0's weights
    dp = parallel.DataParallel(model, bucket_cap_mb=bucket_cap_mb)
    x, y = _data(mesh.dp_rank)
    nn.functional.mse_loss(dp(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    n_buckets = len(dp.buckets)
    log = dp.bucket_log[-1]
    # no_sync + sync_gradients: accumulate two halves locally, then average once
    model.zero_grad()
    with dp.no_sync():
        for half in (slice(0, 3), slice(3, 6)):
            (nn.functional.mse_loss(dp(x[half]), y[half]) / 2).backward()
    local = [p.grad.clone() for p in model.parameters()]
    dp.sync_gradients()
    synced = [p.grad.clone() for p in model.parameters()]
    return grads, n_buckets, log, local, synced, [p.numel() for p in reversed(list(model.parameters()))]


def job_zero(use_zero):
    torch.set_num_threads(1)
    mesh = parallel.init_mesh(dp=pycomm.get_world_size())
    model = _model()
    if use_zero:
        opt = parallel.ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    else:
        model = parallel.DataParallel(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = _data(mesh.dp_rank)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    if use_zero:
        state = opt.optimizer_state_bytes()
    else:
        state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                    if torch.is_tensor(t) and t.dim() > 0)
    return [p.detach().clone() for p in model.parameters()], state


def test_data_parallel_averages_in_backward_order_buckets(run):
    ref = _reference_grads(2)
    # 1 KB buckets: several buckets, so the order and overlap are visible
    res = run(2, job_dp, 1 / 1024, True)
    for grads, n_buckets, log, local, synced, sizes in res:
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
        assert n_buckets >= 3
        # buckets launched in backward order, the first while gradients were still missing
        assert [b for b, _ in log] == list(range(n_buckets))
        assert log[0][1] > 0 and log[-1][1] == 0
        for g, r in zip(synced, ref):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    # no_sync really skipped communication: the local gradients differ between ranks
    assert any(not torch.equal(a, b) for a, b in zip(res[0][3], res[1][3]))


def test_zero1_matches_data_parallel_and_divides_optimizer_memory(run):
    zero = run(2, job_zero, True)
    ddp = run(2, job_zero, False)
    for (pz, _), (pd, _) in zip(zero, ddp):
        for a, b in zip(pz, pd):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    full_state = ddp[0][1]
    n_params = sum(p.numel() for p in _model().parameters())
    assert full_state == 2 * 4 * n_params  # AdamW: two fp32 moments per parameter
    for _, state in zero:
        # measured: each rank holds the moments (plus a scalar step) of half the parameters
        shard = -(-n_params // 2)
        assert state == 2 * 4 * shard + 4
        assert state <= full_state / 2 + 16
