"""Train a tiny GPT with any mix of data, tensor and pipeline parallelism on CPU processes.

    python examples/train_gpt.py --dp 2 --tp 2 --pp 1 --steps 20
    python examples/train_gpt.py --pp 2 --schedule interleaved_1f1b --microbatches 4 --timeline t.png
    torchrun --nproc-per-node 4 examples/train_gpt.py --tp 2 --pp 2      # uses RANK/WORLD_SIZE
    python examples/train_gpt.py --dp 4 --batch 12 --microbatches 1 --kill-rank 2 --at-step 5   # loses a rank
    python examples/train_gpt.py --plan auto --nprocs 4        # the planner picks the shape (see below)

Without RANK in the environment it starts its own dp*tp*pp local processes (pycomm.launch.run).
Global rank 0 prints ``step N loss X``.  With the same seed in float32 every parallel shape
trains the same model on the same data, so the losses match the single-process run (dp=tp=pp=1)
at every step up to float32 rounding (the tests check 1e-4 relative).

Composition, one function per parallelism, applied in this order (see docs/parallel.md):

1. ``build_layers``: the model as a flat list of layers [embedding, blocks..., head], built
   with tensor-parallel layers on the tp group (every rank draws the full initialisation with
   the same seed and keeps its shard, so every shape starts from the same weights);
2. ``apply_pipeline``: keep this pipeline rank's stages (``pipeline.partition``: uneven
   counts allowed) and wrap them in the runtime with the chosen schedule;
3. ``apply_data_parallel``: average gradients over the dp group (``DataParallel``, synced once
   per step after the pipeline's micro-batches), or shard the optimizer with ``--zero``.

Kernels: the norms are ``kernels.nn.LayerNorm``, attention is ``kernels.flash_attention`` and
the MLP's fc1 bias + GELU is ``kernels.bias_gelu`` (inside ``parallel.ParallelSelfAttention`` /
``ParallelMLP``); with tp=1 the loss is ``kernels.softmax_cross_entropy`` (tp>1 keeps
``vocab_parallel_cross_entropy``).  They run Triton on a GPU (or under ``TRITON_INTERPRET=1``)
and their PyTorch fallback on CPU; ``--kernels torch|triton|auto`` sets
``PYCOMM_KERNELS_BACKEND`` for the run.

The planner: ``--plan auto --nprocs N`` asks ``pycomm.parallel.plan`` for the fastest shape of
this model on N local processes (α, β, γ from ``pycomm tune``; this machine's FLOP/s and fixed
time per block pass from ``--plan-flops`` / ``--plan-overhead``, which ``python -m
bench.plan_check`` measures), prints its table and runs the best shape.

Losing a rank (pure data parallelism): ``--kill-rank R --at-step S`` kills rank R (SIGKILL) as
step S starts.  The survivors' gradient all-reduce fails naming it; they call
``pycomm.shrink()``, rebuild the mesh, ``DataParallel.shrink`` re-synchronises the replicas
(model and AdamW state from the new rank 0), and step S is redone on the survivors with the
global batch split over them (so ``--batch`` must split evenly over dp - 1 replicas too).  From step S on, the losses
equal those of a fresh run on dp - 1 ranks resumed (``--resume``) from the checkpoint that
``--save PATH --save-at S-1`` wrote.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from dataclasses import dataclass

import torch
from torch import nn

import pycomm
import pycomm.launch
from pycomm import kernels, parallel
from pycomm.parallel import pipeline


@dataclass
class GPTConfig:
    vocab: int = 64
    """Vocabulary size (a multiple of tp)."""
    seq: int = 16
    """Tokens per sequence."""
    hidden: int = 32
    """Model width."""
    heads: int = 4
    """Query heads (a multiple of tp)."""
    kv_heads: int = 2
    """Key/value heads, grouped-query attention (a multiple of tp)."""
    layers: int = 4
    """Transformer blocks; the pipeline splits blocks + embedding + head."""
    ffn: int = 128
    """MLP hidden width (a multiple of tp)."""
    dropout: float = 0.0
    """Dropout; 0 for runs that must match across shapes."""


@dataclass
class TrainConfig:
    dp: int = 1
    """Data-parallel degree."""
    tp: int = 1
    """Tensor-parallel degree."""
    pp: int = 1
    """Pipeline-parallel degree."""
    schedule: str = "1f1b"
    """Pipeline schedule: a name in ``pipeline.SCHEDULES``."""
    microbatches: int = 4
    """Micro-batches per step, per data-parallel replica."""
    virtual: int = 2
    """Model chunks per pipeline rank, for the schedules that take any number (interleaved_1f1b,
    looped_bfs); the V-shaped ones always hold two."""
    steps: int = 20
    """Optimizer steps."""
    batch: int = 16
    """Global batch (sequences per step), split over dp then micro-batches."""
    lr: float = 3e-3
    """AdamW learning rate."""
    seed: int = 0
    """Seed of the model and the data."""
    zero: bool = False
    """Shard the optimizer state over dp (ZeRO-1) instead of all-reducing gradients."""
    checkpoint: bool = False
    """Activation checkpointing on every pipeline stage."""
    timeline: str | None = None
    """Write the measured pipeline timeline of the last step to this PNG."""
    quiet: bool = False
    """Do not print the per-step lines."""
    kernels: str | None = None
    """PYCOMM_KERNELS_BACKEND for this run (auto, torch, triton); None keeps the environment's."""
    kill_rank: int | None = None
    """Global rank that kills itself (SIGKILL) as step ``at_step`` starts; the others go on."""
    at_step: int = 0
    """The step at which ``kill_rank`` dies."""
    save: str | None = None
    """Write a training checkpoint (model, optimizer, step) here after step ``save_at``."""
    save_at: int = 0
    """The step after which ``save`` is written."""
    resume: str | None = None
    """Start from the training checkpoint at this path (written by ``save``)."""


# ---------------------------------------------------------------------------- model


class Embedding(nn.Module):
    """Token embedding (vocabulary-parallel) plus learned positions (replicated)."""

    def __init__(self, cfg: GPTConfig, group):
        super().__init__()
        self.tok = parallel.VocabParallelEmbedding(cfg.vocab, cfg.hidden, group=group)
        self.pos = nn.Embedding(cfg.seq, cfg.hidden)
        self.dropout = cfg.dropout

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        return parallel.dropout(x, self.dropout, self.training, sharded=False)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig, group):
        super().__init__()
        self.ln1 = kernels.nn.LayerNorm(cfg.hidden)
        self.attn = parallel.ParallelSelfAttention(cfg.hidden, cfg.heads, cfg.kv_heads, attn_dropout=cfg.dropout,
                                                   dropout=cfg.dropout, group=group)
        self.ln2 = kernels.nn.LayerNorm(cfg.hidden)
        self.mlp = parallel.ParallelMLP(cfg.hidden, cfg.ffn, dropout=cfg.dropout, group=group)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final norm and the vocabulary-parallel output projection: logits of this rank's slice."""

    def __init__(self, cfg: GPTConfig, group):
        super().__init__()
        self.ln = kernels.nn.LayerNorm(cfg.hidden)
        self.out = parallel.ColumnParallelLinear(cfg.hidden, cfg.vocab, bias=False, group=group)

    def forward(self, x):
        return self.out(self.ln(x))


def build_layers(cfg: GPTConfig, tp_group) -> list[nn.Module]:
    """[Embedding, Block x layers, Head], in the same order of random draws at every shape."""
    return [Embedding(cfg, tp_group)] + [Block(cfg, tp_group) for _ in range(cfg.layers)] + [Head(cfg, tp_group)]


def batch_for_step(cfg: GPTConfig, step: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic language: each sequence follows ``t -> (a*t + c) mod vocab`` from a random
    start, with 10% of tokens replaced by noise; learnable, and the same on every rank."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    a, c = 5, 3
    start = torch.randint(0, cfg.vocab, (batch, 1), generator=g)
    seq = [start]
    for _ in range(cfg.seq):
        seq.append((a * seq[-1] + c) % cfg.vocab)
    tokens = torch.cat(seq, dim=1)
    noise = torch.rand(tokens.shape, generator=g) < 0.1
    tokens = torch.where(noise, torch.randint(0, cfg.vocab, tokens.shape, generator=g), tokens)
    return tokens[:, :-1], tokens[:, 1:]


# ---------------------------------------------------------------------------- composition


def _virtual(tc: TrainConfig) -> int:
    """Chunks per rank: --virtual for schedules that take any number (the registry says which)."""
    return tc.virtual if pipeline.SCHEDULES[tc.schedule].chunks == "any" else 1


def apply_pipeline(layers, tc: TrainConfig, mesh):
    """This pipeline rank's stages wrapped in the runtime; returns (runtime, local layers by
    global index).  Chimera's two replicas of a part sit on different ranks (``r`` and
    ``p-1-r``), so a rank never holds a layer twice; the runtime keeps the replicas equal and the
    checkpoint gathers either copy."""
    virtual = _virtual(tc)
    sched = pipeline.build_schedule(tc.schedule, mesh.pp, tc.microbatches, virtual)
    ranges = pipeline.partition(len(layers), sched.weight_stages)
    mine = sched.local_stages(mesh.pp_rank)
    stages = {s: nn.Sequential(*[layers[i] for i in ranges[sched.replica_of(s)]]) for s in mine}
    local = nn.ModuleDict({str(i): layers[i] for s in mine for i in ranges[sched.replica_of(s)]})
    tp_group = mesh.tp_group

    def loss_fn(logits, targets):
        if tp_group.size == 1:  # the whole vocabulary on this rank: the fused kernel
            return kernels.softmax_cross_entropy(logits, targets)
        return parallel.vocab_parallel_cross_entropy(logits, targets, tp_group).mean()

    runtime = pipeline.Pipeline(stages, tc.schedule, tc.microbatches, loss_fn, mesh.pp_group,
                                virtual=virtual, checkpoint=tc.checkpoint)
    return runtime, local


def apply_data_parallel(local: nn.Module, tc: TrainConfig, mesh):
    """(module whose gradients get averaged or None, optimizer)."""
    if tc.zero:
        return None, parallel.ZeroRedundancyOptimizer(local.parameters(), torch.optim.AdamW,
                                                      group=mesh.dp_group, lr=tc.lr)
    dp = parallel.DataParallel(local, group=mesh.dp_group)
    return dp, torch.optim.AdamW(local.parameters(), lr=tc.lr)


@contextlib.contextmanager
def kernels_backend(name: str | None):
    """Set ``PYCOMM_KERNELS_BACKEND`` (read by the kernels at every call) inside the block."""
    old = os.environ.get("PYCOMM_KERNELS_BACKEND")
    if name is not None:
        os.environ["PYCOMM_KERNELS_BACKEND"] = name
        kernels.backend()  # refuses an unknown name here, not at the first op
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYCOMM_KERNELS_BACKEND", None)
        else:
            os.environ["PYCOMM_KERNELS_BACKEND"] = old


def train(tc: TrainConfig, cfg: GPTConfig | None = None, load_state: dict | None = None,
          return_state: bool = False) -> dict:
    """Runs on every rank (pycomm initialised); returns the per-step losses and timings.

    ``load_state``: a full (unsharded) state dict to start from, saved at any parallel shape;
    ``return_state``: add the full state dict after training (gathered from every shard)."""
    with kernels_backend(tc.kernels):
        return _train(tc, cfg or GPTConfig(), load_state, return_state)


def _check_fault_options(tc: TrainConfig) -> None:
    """Losing a rank and the training checkpoints are for pure data parallelism: a lost tensor
    or pipeline shard, or ZeRO's optimizer shard, has no copy on the survivors."""
    pure_dp = tc.tp == 1 and tc.pp == 1 and not tc.zero
    if (tc.kill_rank is not None or tc.save or tc.resume) and not pure_dp:
        raise ValueError("--kill-rank, --save and --resume need pure data parallelism (--tp 1 --pp 1, "
                         "no --zero): with sharded state a lost rank takes data no survivor has")
    if tc.kill_rank is not None:
        if not 0 <= tc.kill_rank < tc.dp or tc.dp < 2:
            raise ValueError(f"--kill-rank {tc.kill_rank} must be a rank of --dp {tc.dp} (at least 2)")
        per = tc.microbatches
        if tc.batch % (tc.dp * per) or tc.batch % ((tc.dp - 1) * per):
            raise ValueError(f"--batch {tc.batch} must split into --microbatches {per} equal micro-batches "
                             f"per replica both on {tc.dp} replicas and on the {tc.dp - 1} survivors; use "
                             f"--batch {tc.dp * (tc.dp - 1) * per} (or --microbatches 1 and --batch "
                             f"{tc.dp * (tc.dp - 1)})")


def _go_on_without_lost_ranks(err: pycomm.CommError, step: int, tc: TrainConfig, layers, dp, opt):
    """After a failed step: the survivors shrink the world, rebuild the mesh and the pipeline
    runtime on it, and re-synchronise the replicas (DataParallel.shrink); returns (mesh,
    runtime).  The caller redoes the step."""
    before = pycomm.get_world_size()
    pycomm.shrink()
    mesh = parallel.init_mesh(pycomm.get_world_size(), 1, 1)
    runtime, _ = apply_pipeline(layers, tc, mesh)
    dp.shrink(mesh.dp_group, optimizer=opt)
    if pycomm.get_rank() == 0 and not tc.quiet:
        print(f"step {step}: lost {before - mesh.dp} rank(s) ({err}); going on with {mesh.dp} ranks",
              flush=True)
    return mesh, runtime


def _train(tc: TrainConfig, cfg: GPTConfig, load_state: dict | None, return_state: bool) -> dict:
    torch.set_num_threads(1)  # one core per process: ranks share the machine
    _check_fault_options(tc)
    mesh = parallel.init_mesh(tc.dp, tc.tp, tc.pp)
    parallel.manual_seed(tc.seed, mesh.tp_rank)
    layers = build_layers(cfg, mesh.tp_group)
    runtime, local = apply_pipeline(layers, tc, mesh)
    checkpoint = torch.load(tc.resume, weights_only=True) if tc.resume else None
    if checkpoint is not None:
        load_state = checkpoint["model"]
    if load_state is not None:
        parallel.load_full_state_dict(local, load_state)
    dp, opt = apply_data_parallel(local, tc, mesh)
    if checkpoint is not None:
        opt.load_state_dict(checkpoint["optim"])
    if tc.batch % tc.dp:
        raise ValueError(f"--batch {tc.batch} must be divisible by --dp {tc.dp}")
    losses, times = [], []
    step = checkpoint["step"] + 1 if checkpoint is not None else 1
    while step <= tc.steps:
        if step == tc.at_step and pycomm.get_rank() == tc.kill_rank and mesh.dp == tc.dp:
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.perf_counter()
        per_replica = tc.batch // mesh.dp
        ids, targets = batch_for_step(cfg, step, tc.batch, tc.seed)
        mine = slice(mesh.dp_rank * per_replica, (mesh.dp_rank + 1) * per_replica)
        opt.zero_grad()
        try:
            if dp is not None:
                with dp.no_sync():  # one reduction per step, after all micro-batches
                    stats = runtime.step(ids[mine], targets[mine])
                dp.sync_gradients()
            else:
                stats = runtime.step(ids[mine], targets[mine])
        except pycomm.CommError as e:
            if tc.kill_rank is None:
                raise
            mesh, runtime = _go_on_without_lost_ranks(e, step, tc, layers, dp, opt)
            continue  # redo this step on the survivors
        opt.step()
        loss = torch.tensor([stats.loss], dtype=torch.float64)
        if mesh.dp > 1:
            pycomm.all_reduce(loss, op="avg", group=mesh.dp_group)
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
        if pycomm.get_rank() == 0 and not tc.quiet:
            print(f"step {step} loss {losses[-1]:.6f}", flush=True)
        if tc.save and step == tc.save_at and pycomm.get_rank() == 0:
            torch.save({"model": parallel.full_state_dict(local), "optim": opt.state_dict(), "step": step},
                       tc.save)
        step += 1
    rank0 = pycomm.get_rank() == 0
    result = {"losses": losses, "step_times": times}
    if return_state:
        result["state"] = parallel.full_state_dict(local, mesh.pp_group)
    if tc.timeline:
        measured = runtime.measured(stats)  # collective over the pipeline group
        result["measured_bubble"] = measured.bubble_fraction
        if rank0:
            measured.plot(tc.timeline, title=(
                f"measured: {tc.schedule}, p={tc.pp}, m={tc.microbatches}"
                + (f", v={_virtual(tc)}" if _virtual(tc) > 1 else "")
                + f" (bubble {measured.bubble_fraction:.1%} of device time)"))
            print(f"timeline written to {tc.timeline} (measured bubble fraction "
                  f"{measured.bubble_fraction:.3f})", flush=True)
    return result


def _worker(tc: TrainConfig, cfg: GPTConfig):
    return train(tc, cfg)


# This machine's numbers for the tiny GPT (python -m bench.plan_check, one process, load < 1,
# 2-core CI machine, 2026-11-26); --plan-flops / --plan-overhead override them.
PLAN_FLOPS = 1.5e9
PLAN_OVERHEAD = 1.0e-3


def planned(argv_plan: argparse.Namespace, cfg: GPTConfig):
    """The planner's ranked shapes for ``cfg`` on ``--nprocs`` local processes, among those
    this script runs (full recomputation is --checkpoint; interleaving uses --virtual 2)."""
    model = parallel.planner.model_from(cfg, dtype="fp32", name="tiny")
    cluster = parallel.planner.local_cluster(argv_plan.nprocs, flops=argv_plan.plan_flops,
                                             layer_overhead=argv_plan.plan_overhead)
    plans = parallel.plan(model, cluster, argv_plan.batch, recompute=["none", "full"], virtual=[1, 2],
                          overlap_grad_reduce=False)
    return plans


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--schedule", choices=list(pipeline.SCHEDULES), default="1f1b",
                   help="; ".join(f"{n}: {s.summary}" for n, s in pipeline.SCHEDULES.items()))
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--virtual", type=int, default=2, help="chunks per rank for interleaved_1f1b and looped_bfs")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zero", action="store_true", help="ZeRO-1 optimizer instead of DataParallel")
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing per stage")
    p.add_argument("--timeline", default=None, help="write the measured pipeline timeline PNG here")
    p.add_argument("--kernels", choices=("auto", "torch", "triton"), default=None,
                   help="PYCOMM_KERNELS_BACKEND for this run (default: the environment's, else auto)")
    p.add_argument("--kill-rank", type=int, default=None,
                   help="this rank kills itself as --at-step starts; the others shrink and go on (pure dp)")
    p.add_argument("--at-step", type=int, default=0)
    p.add_argument("--save", default=None, help="write a training checkpoint here after --save-at")
    p.add_argument("--save-at", type=int, default=0)
    p.add_argument("--resume", default=None, help="start from a training checkpoint written by --save")
    p.add_argument("--plan", choices=("auto",), default=None,
                   help="auto: the planner chooses dp, tp, pp, schedule, micro-batches, --checkpoint, --zero")
    p.add_argument("--nprocs", type=int, default=2, help="processes for --plan auto")
    p.add_argument("--plan-flops", type=float, default=PLAN_FLOPS, help="FLOP/s of one process (--plan auto)")
    p.add_argument("--plan-overhead", type=float, default=PLAN_OVERHEAD,
                   help="fixed seconds per block forward (--plan auto)")
    a = p.parse_args(argv)
    options = vars(a)
    plan_args = argparse.Namespace(**{k: options.pop(k) for k in ("plan", "nprocs", "plan_flops", "plan_overhead")},
                                   batch=a.batch)
    tc = TrainConfig(**options)
    if plan_args.plan == "auto":
        plans = planned(plan_args, GPTConfig())
        print(plans.table(5), flush=True)
        best = plans.best
        print(f"running the planner's choice: {best.shape}  (predicted {best.step_time * 1e3:.1f} ms/step)", flush=True)
        tc.dp, tc.tp, tc.pp, tc.microbatches, tc.zero = best.dp, best.tp, best.pp, best.microbatches, bool(best.zero)
        tc.schedule = best.schedule if best.pp > 1 else "1f1b"
        tc.virtual = best.virtual if best.virtual > 1 else tc.virtual
        tc.checkpoint = best.recompute == "full"
    return tc


def main(argv=None) -> None:
    tc = parse_args(argv)
    cfg = GPTConfig()
    if "RANK" in os.environ:  # torchrun (or any launcher that sets RANK/WORLD_SIZE)
        pycomm.init_process_group()
        try:
            train(tc, cfg)
        finally:
            pycomm.destroy_process_group()
        return
    world = tc.dp * tc.tp * tc.pp
    t0 = time.perf_counter()
    may_die = [tc.kill_rank] if tc.kill_rank is not None else []
    pycomm.launch.run(_worker, world, args=(tc, cfg), may_die=may_die)
    print(f"{world} process(es), {tc.steps} steps in {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
