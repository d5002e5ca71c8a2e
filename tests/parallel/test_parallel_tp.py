"""Tensor-parallel layers against their dense counterparts on 2 ranks (and the mesh layout).

The blocks use the kernels; these jobs pin their PyTorch fallback (the suite's TRITON_INTERPRET=1
would run them in Triton's interpreter), see test_parallel_train_gpt.py for the Triton run."""
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pycomm
from pycomm import parallel
from pycomm.parallel import cross_entropy as ce_mod
from pycomm.parallel import mappings as map_mod


def _full_grad(mod, name):
    return mod.gather_full(name, getattr(mod, name).grad)


# ----------------------------------------------------------------------------- jobs (run on ranks)


def job_mesh(dp, tp, pp):
    m = parallel.init_mesh(dp, tp, pp)
    r = pycomm.get_rank()
    return (m.dp_rank, m.tp_rank, m.pp_rank, m.dp_group.ranks, m.tp_group.ranks, m.pp_group.ranks,
            m.dp_group.rank, m.tp_group.rank, m.pp_group.rank, m.rank_of(m.dp_rank, m.tp_rank, m.pp_rank) == r)


def job_mesh_error(dp, tp, pp):
    with pytest.raises(ValueError) as e:
        parallel.init_mesh(dp, tp, pp)
    return str(e.value)


@mock.patch.dict(os.environ, PYCOMM_KERNELS_BACKEND="torch")
def job_mlp():
    torch.set_num_threads(1)
    mesh = parallel.init_mesh(1, 2, 1)
    torch.manual_seed(0)
    dense = parallel.MLP(8, 24)
    par = parallel.ParallelMLP.from_dense(dense, mesh.tp_group)
    torch.manual_seed(0)
    direct = parallel.ParallelMLP(8, 24)  # same seed: same shard as slicing the dense block
    same_init = all(torch.equal(a, b) for a, b in zip(par.parameters(), direct.parameters()))
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    xd, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    dense(xd).square().sum().backward()

    calls = []
    real = map_mod.pycomm.all_reduce

    def counting(t, *a, **k):
        calls.append(tuple(t.shape))
        return real(t, *a, **k)

    map_mod.pycomm.all_reduce = counting
    try:
        y = par(xp)
        n_fwd = len(calls)
        y.square().sum().backward()
        n_bwd = len(calls) - n_fwd
    finally:
        map_mod.pycomm.all_reduce = real
    out_err = (y - dense(x)).abs().max().item()
    gx_err = (xp.grad - xd.grad).abs().max().item()
    w_err = max((_full_grad(par.fc1, "weight") - dense.fc1.weight.grad).abs().max().item(),
                (_full_grad(par.fc1, "bias") - dense.fc1.bias.grad).abs().max().item(),
                (_full_grad(par.fc2, "weight") - dense.fc2.weight.grad).abs().max().item(),
                (par.fc2.bias.grad - dense.fc2.bias.grad).abs().max().item())
    return same_init, n_fwd, n_bwd, out_err, gx_err, w_err, tuple(par.fc1.weight.shape)


@mock.patch.dict(os.environ, PYCOMM_KERNELS_BACKEND="torch")
def job_attention(heads, kv_heads):
    torch.set_num_threads(1)
    mesh = parallel.init_mesh(1, 2, 1)
    torch.manual_seed(0)
    dense = parallel.SelfAttention(16, heads, kv_heads)
    par = parallel.ParallelSelfAttention.from_dense(dense, mesh.tp_group)
    torch.manual_seed(0)
    direct = parallel.ParallelSelfAttention(16, heads, kv_heads)
    same_init = all(torch.equal(a, b) for a, b in zip(par.parameters(), direct.parameters()))
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    xd, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    yd = dense(xd)
    yd.square().sum().backward()
    yp = par(xp)
    yp.square().sum().backward()
    return (same_init, (yp - yd).abs().max().item(), (xp.grad - xd.grad).abs().max().item(),
            (_full_grad(par.qkv, "weight") - dense.qkv.weight.grad).abs().max().item(),
            (_full_grad(par.proj, "weight") - dense.proj.weight.grad).abs().max().item(),
            (par.local_heads, par.local_kv_heads))


def job_attention_errors():
    parallel.init_mesh(1, 2, 1)
    msgs = []
    for kw in (dict(hidden=12, num_heads=3), dict(hidden=16, num_heads=4, num_kv_heads=1)):
        with pytest.raises(ValueError) as e:
            parallel.ParallelSelfAttention(**kw)
        msgs.append(str(e.value))
    with pytest.raises(ValueError) as e:
        parallel.ColumnParallelLinear(4, 7)
    msgs.append(str(e.value))
    with pytest.raises(ValueError) as e:
        parallel.RowParallelLinear(5, 4)
    msgs.append(str(e.value))
    with pytest.raises(ValueError) as e:
        parallel.VocabParallelEmbedding(11, 4)
    msgs.append(str(e.value))
    return msgs


def job_vocab():
    torch.set_num_threads(1)
    parallel.init_mesh(1, 2, 1)
    torch.manual_seed(0)
    emb = nn.Embedding(10, 6)
    head = nn.Linear(6, 10)
    pemb = parallel.VocabParallelEmbedding.from_dense(emb)
    phead = parallel.ColumnParallelLinear.from_dense(head)
    ids = torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(2))
    tgt = torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(3))
    ref = F.cross_entropy(head(emb(ids)).view(-1, 10) * 3, tgt.view(-1), reduction="none").view(3, 5)
    ref.mean().backward()

    sizes = []
    real = ce_mod.pycomm.all_reduce

    def counting(t, *a, **k):
        sizes.append(tuple(t.shape))
        return real(t, *a, **k)

    logits = phead(pemb(ids)) * 3  # large logits exercise the max shift
    ce_mod.pycomm.all_reduce = counting
    try:
        loss = parallel.vocab_parallel_cross_entropy(logits, tgt)
    finally:
        ce_mod.pycomm.all_reduce = real
    loss.mean().backward()
    return ((loss - ref).abs().max().item(), sizes, tuple(logits.shape),
            (_full_grad(pemb, "weight") - emb.weight.grad).abs().max().item(),
            (_full_grad(phead, "weight") - head.weight.grad).abs().max().item())


def job_dropout(seed):
    torch.set_num_threads(1)
    parallel.init_mesh(1, 2, 1)
    parallel.manual_seed(seed)
    x = torch.ones(4, 64)
    sharded = parallel.dropout(x, 0.5, True, sharded=True)
    replicated = parallel.dropout(x, 0.5, True, sharded=False)
    return sharded, replicated


# ----------------------------------------------------------------------------- tests


def test_mesh_layout_tp_innermost(run):
    dp_tp = run(2, job_mesh, 1, 2, 1)
    assert [r[:3] for r in dp_tp] == [(0, 0, 0), (0, 1, 0)]
    assert dp_tp[0][4] == (0, 1) and dp_tp[0][3] == (0,)
    pp = run(2, job_mesh, 1, 1, 2)
    assert [r[:3] for r in pp] == [(0, 0, 0), (0, 0, 1)] and pp[1][5] == (0, 1)
    for res in dp_tp + pp:
        assert res[6:9] == res[0:3] and res[9]  # group ranks are the mesh coordinates


def test_mesh_wrong_world_size(run):
    msg = run(2, job_mesh_error, 2, 2, 1)[0]
    assert "dp*tp*pp = 2*2*1 = 4" in msg and "world size is 2" in msg


def test_parallel_mlp_matches_dense_with_one_all_reduce_each_way(run):
    for same_init, n_fwd, n_bwd, out_err, gx_err, w_err, shape in run(2, job_mlp):
        assert same_init
        assert (n_fwd, n_bwd) == (1, 1)
        assert shape == (12, 8)
        assert out_err < 1e-5 and gx_err < 1e-5 and w_err < 1e-5


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_parallel_attention_matches_dense(run, heads, kv_heads):
    for same_init, y_err, gx_err, qkv_err, proj_err, local in run(2, job_attention, heads, kv_heads):
        assert same_init
        assert local == (heads // 2, kv_heads // 2)
        assert max(y_err, gx_err, qkv_err, proj_err) < 1e-5


def test_tp_errors_name_the_values(run):
    heads, kv, col, row, vocab = run(2, job_attention_errors)[0]
    assert "num_heads=3" in heads and "tensor-parallel size 2" in heads
    assert "num_kv_heads=1" in kv and "tensor-parallel size 2" in kv
    assert "out_features=7" in col and "multiple of 2" in col
    assert "in_features=5" in row
    assert "num_embeddings=11" in vocab


def test_vocab_parallel_embedding_and_cross_entropy(run):
    for loss_err, sizes, shape, emb_err, head_err in run(2, job_vocab):
        assert shape == (3, 5, 5)  # each rank holds half of the vocabulary
        assert loss_err < 1e-5 and emb_err < 1e-6 and head_err < 1e-6
        # three all-reduces, each on one value per token: never the logits
        assert sizes == [(3, 5)] * 3


def test_dropout_reproducible_per_tp_rank(run):
    a = run(2, job_dropout, 7)
    b = run(2, job_dropout, 7)
    for r in range(2):
        assert torch.equal(a[r][0], b[r][0]) and torch.equal(a[r][1], b[r][1])
    assert not torch.equal(a[0][0], a[1][0])  # sharded activations: a mask per rank
    assert torch.equal(a[0][1], a[1][1])      # replicated activations: one mask
    assert set(a[0][0].unique().tolist()) == {0.0, 2.0}
