"""nccl-tests-style benchmark of pycomm's collectives against torch.distributed's gloo.

    python -m bench [--nprocs 2] [-b 8] [-e 64M] [-f 2] [--dtype float32] [--device cpu|cuda]
                    [--hosts H]
                    [--algorithms ring,tree,auto] [--ops all_reduce,reduce_scatter,all_gather]
                    [--iters N] [--warmup N] [--repeat N] [--anchor mpi] [--no-gloo]
                    [--json PATH] [--plot PATH]

Rows follow nccl-tests: size (bytes of the whole buffer: the all-reduce tensor, the
reduce-scatter input, the all-gather output), count (elements of that buffer), type, redop,
algorithm, time (us, slowest rank, mean over iterations), algbw = size / time and busbw =
algbw x 2(n-1)/n for all-reduce, x (n-1)/n for reduce-scatter and all-gather (GB = 1e9 B),
and #wrong: elements that differ from the exact expected result (inputs are small integers,
so every result is exact).  Gloo runs the same sizes in the same processes, in the same
run, and the last columns give its time, busbw and pycomm's speed-up over it.

On a CPU every row also times one single-threaded memcpy of the buffer (memcpy GB/s, and
bus/mc = busbw / memcpy) and reads the scheduler's counters around the timed loop (wait%:
share of the row's time the slowest rank sat on the run queue, ready but not running;
ivcsw: involuntary context switches per call), so a row that collapses shows whether the
machine took the core away.  --repeat N runs the whole sweep N times, each repeat pycomm,
gloo (row by row) and Open MPI (its sweep), and prints the median busbw with min-max.

With --device cuda the tensors live on the GPU (rank r on GPU r % device_count: several
ranks share one GPU when there are more ranks than GPUs, over CUDA IPC), gloo is left
out, and the anchor is the device's own copy bandwidth, measured in the same run on the
same sizes: a device-to-device copy of the buffer (bytes / time, like algbw), and the
last column is busbw / copy bandwidth.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

from . import mpi as bench_mpi

OPS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "gather", "scatter",
       "all_to_all")
DEFAULT_OPS = OPS
# nccl-tests' bus factors (doc/PERFORMANCE.md): busbw = algbw x factor(n).
BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n,
              "all_gather": lambda n: (n - 1) / n, "broadcast": lambda n: 1.0,
              "reduce": lambda n: 1.0, "gather": lambda n: (n - 1) / n,
              "scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n}
REDUCES = ("all_reduce", "reduce_scatter", "reduce")
ROOT = 0  # rooted collectives run from rank 0, as nccl-tests' default


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in mult:
        return int(float(text[:-1]) * mult[text[-1]])
    return int(text)


def _sizes(begin: int, end: int, factor: float) -> list[int]:
    sizes, s = [], begin
    while s <= end:
        sizes.append(int(s))
        s = s * factor if factor > 1 else s + begin
    return sizes


def _iters_for(nbytes: int, requested: int | None) -> int:
    if requested:
        return requested
    # About 0.1-0.3 s per measurement on a CPU: many iterations for latency-bound sizes.
    return max(3, min(200, int(2e8 / max(nbytes, 1) ** 0.9) // 40))


def _verifiable(op, rank, n_ranks, count, dtype):
    """(input, output, expected) with small-integer values so results are exact; `count` is
    the elements of the row's size (nccl-tests: the biggest buffer).  expected is None where
    this rank's output is not defined (a rooted collective's other ranks)."""
    import torch

    def block(r, n):
        return ((torch.arange(n) * 7 + r * 3) % 17).to(dtype)

    per = count // n_ranks
    if op == "all_reduce":
        inp = block(rank, count)
        return inp, inp, sum(block(r, count).double() for r in range(n_ranks)).to(dtype)
    if op == "reduce":
        inp = block(rank, count)
        want = sum(block(r, count).double() for r in range(n_ranks)).to(dtype)
        return inp, inp, want if rank == ROOT else None
    if op == "broadcast":
        inp = block(rank, count)
        return inp, inp, block(ROOT, count)
    if op == "reduce_scatter":
        total = sum(block(r, count).double() for r in range(n_ranks)).to(dtype)
        return block(rank, count), torch.empty(per, dtype=dtype), total[rank * per:(rank + 1) * per]
    if op == "all_gather":
        return (block(rank, per), torch.empty(count, dtype=dtype),
                torch.cat([block(r, per) for r in range(n_ranks)]))
    if op == "gather":
        want = torch.cat([block(r, per) for r in range(n_ranks)])
        return block(rank, per), torch.empty(count, dtype=dtype), want if rank == ROOT else None
    if op == "scatter":
        inp = torch.cat([block(r, per) for r in range(n_ranks)]) if rank == ROOT else torch.empty(count, dtype=dtype)
        return inp, torch.empty(per, dtype=dtype), block(rank, per)
    # all_to_all: block j of rank r's input goes to rank j
    inp = torch.cat([block(rank * n_ranks + j, per) for j in range(n_ranks)])
    return inp, torch.empty_like(inp), torch.cat([block(j * n_ranks + rank, per) for j in range(n_ranks)])


def _sched() -> tuple[float, float, float, float]:
    """This thread's (cpu ns, run-queue wait ns, voluntary and involuntary context
    switches) from /proc: where a rank's time went while a row was timed.  Waiting on the
    run queue (ready, but another process had the core) is the machine's load, not pycomm's;
    zeros where /proc lacks them."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            cpu, wait, _ = (float(x) for x in f.read().split())
        with open("/proc/thread-self/status") as f:
            fields = dict(line.split(":", 1) for line in f if "ctxt_switches" in line)
        return (cpu, wait, float(fields["voluntary_ctxt_switches"]),
                float(fields["nonvoluntary_ctxt_switches"]))
    except (OSError, ValueError, KeyError):
        return (0.0, 0.0, 0.0, 0.0)


def _memcpy_seconds(nbytes: int, iters: int) -> float:
    """One single-threaded memcpy (libc, through ctypes.memmove) of `nbytes` between two
    buffers already touched: the memory bandwidth one core gets, the anchor of the targets."""
    import ctypes

    import torch

    a = torch.ones(max(nbytes, 1), dtype=torch.uint8)
    b = torch.zeros_like(a)
    for _ in range(2):
        ctypes.memmove(b.data_ptr(), a.data_ptr(), nbytes)
    start = time.perf_counter()
    for _ in range(iters):
        ctypes.memmove(b.data_ptr(), a.data_ptr(), nbytes)
    return (time.perf_counter() - start) / iters


def _reduce_gbps(threads: int, nbytes: int = 64 << 20) -> float:
    """GB/s moved (two reads and a write per element) by the transport's float32 sum on
    `threads` threads, out of cache: what more reduction threads buy on this machine."""
    import torch

    from pycomm import _C
    from pycomm._codes import DTYPES, OPS

    a, b = torch.ones(nbytes // 4), torch.ones(nbytes // 4)
    out, pool = torch.empty_like(a), _C.ReducePool(threads)
    best = float("inf")
    for _ in range(4):
        start = time.perf_counter()
        pool.reduce(out.data_ptr(), a.data_ptr(), b.data_ptr(), a.numel(), DTYPES[torch.float32], OPS["sum"].code)
        best = min(best, time.perf_counter() - start)
    return 3 * nbytes / best / 1e9


def _cma_gbps(nbytes: int = 64 << 20, chunk: int = 1 << 20) -> float | None:
    """GB/s that process_vm_readv (cross-memory attach, the single-copy path) reads from
    another process on this machine, in `chunk`-byte calls; None where the kernel refuses."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "process_vm_readv") or not hasattr(os, "fork"):
        return None

    class IOVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    src = mmap.mmap(-1, nbytes)
    src.write(b"\1" * nbytes)
    remote = ctypes.addressof(ctypes.c_char.from_buffer(src))
    dst = ctypes.create_string_buffer(nbytes)
    local = ctypes.addressof(dst)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the peer: holds its copy of the pages until told to go
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        best = float("inf")
        for _ in range(4):
            start = time.perf_counter()
            for off in range(0, nbytes, chunk):
                n = min(chunk, nbytes - off)
                mine, theirs = IOVec(local + off, n), IOVec(remote + off, n)
                if libc.process_vm_readv(pid, ctypes.byref(mine), 1, ctypes.byref(theirs), 1, 0) != n:
                    return None
            best = min(best, time.perf_counter() - start)
        return nbytes / best / 1e9
    finally:
        os.write(w, b"x")
        os.close(w)
        os.waitpid(pid, 0)


def _pycomm_call(op, inp, out, algorithm):
    """The pycomm call of one row (a callable, timed as is)."""
    import pycomm

    return {
        "all_reduce": lambda: pycomm.all_reduce(inp, algorithm=algorithm),
        "reduce": lambda: pycomm.reduce(inp, ROOT, algorithm=algorithm),
        "broadcast": lambda: pycomm.broadcast(inp, ROOT, algorithm=algorithm),
        "reduce_scatter": lambda: pycomm.reduce_scatter(out, inp, algorithm=algorithm),
        "all_gather": lambda: pycomm.all_gather(out, inp, algorithm=algorithm),
        "gather": lambda: pycomm.gather(out, inp, ROOT, algorithm=algorithm),
        "scatter": lambda: pycomm.scatter(out, inp, ROOT, algorithm=algorithm),
        "all_to_all": lambda: pycomm.all_to_all(out, inp),
    }[op]


def _gloo_call(op, inp, out, n):
    """The same row with torch.distributed (gloo is the default group)."""
    import torch.distributed as dist

    per = out.numel() // n if op == "gather" else inp.numel() // n
    return {
        "all_reduce": lambda: dist.all_reduce(inp),
        "reduce": lambda: dist.reduce(inp, ROOT),
        "broadcast": lambda: dist.broadcast(inp, ROOT),
        "reduce_scatter": lambda: dist.reduce_scatter_tensor(out, inp),
        "all_gather": lambda: dist.all_gather_into_tensor(out, inp),
        "gather": lambda: dist.gather(inp, [out[r * per:(r + 1) * per] for r in range(n)]
                                      if dist.get_rank() == ROOT else None, dst=ROOT),
        "scatter": lambda: dist.scatter(out, [inp[r * per:(r + 1) * per] for r in range(n)]
                                        if dist.get_rank() == ROOT else None, src=ROOT),
        "all_to_all": lambda: dist.all_to_all_single(out, inp),
    }[op]


def _rank_main(cfg: dict):
    """Runs on every rank (pycomm initialised by pycomm.launch); rank 0 returns the rows."""
    import torch
    import torch.distributed as dist

    import pycomm
    from pycomm.backends.shared import SHARED_FROM

    rank, n = pycomm.get_rank(), pycomm.get_world_size()
    dtype = getattr(torch, cfg["dtype"])
    esize = torch.tensor([], dtype=dtype).element_size()
    cuda = cfg["device"] == "cuda"
    dev = torch.device("cpu")
    if cuda:
        dev = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)
    if cfg["gloo"]:
        dist.init_process_group("gloo", init_method=f"file://{cfg['gloo_store']}", rank=rank,
                                world_size=n, timeout=datetime.timedelta(seconds=300))

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        pycomm.all_reduce(t, op="max")
        return t.item()

    counters: dict = {}  # the last timed() call's, worst rank: wait_us, csw (per iteration)

    def timed(fn, iters, warmup):
        for _ in range(warmup):
            fn()
        sync()
        pycomm.barrier()
        before = _sched()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        seconds = time.perf_counter() - start
        after = _sched()
        c = torch.tensor([(b - a) / iters for a, b in zip(before, after)], dtype=torch.float64)
        pycomm.all_reduce(c, op="max")
        counters.update(cpu_us=c[0].item() / 1e3, wait_us=c[1].item() / 1e3, vcsw=c[2].item(),
                        ivcsw=c[3].item())
        return slowest(seconds / iters)

    def copy_seconds(nbytes: int, iters: int) -> float:
        """The anchor on a GPU: one device-to-device copy of the buffer, rank 0 alone."""
        seconds = 0.0
        if rank == 0:
            a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
            b = torch.empty_like(a)
            for _ in range(3):
                b.copy_(a)
            sync()
            start = time.perf_counter()
            for _ in range(iters):
                b.copy_(a)
            sync()
            seconds = (time.perf_counter() - start) / iters
        pycomm.barrier()
        return slowest(seconds)

    # Warm up before the first row (as nccl-tests does): the first collectives of a process
    # pay for page faults, lazy initialisation and gloo's start-up.
    warm = torch.ones(1 << 18, dtype=dtype, device=dev)
    for algorithm in cfg["algorithms"] if cuda else ("ring", "tree"):
        for _ in range(50):
            pycomm.all_reduce(warm[:2], algorithm=algorithm)
        pycomm.all_reduce(warm, algorithm=algorithm)
    sync()
    pycomm.barrier()

    progress = None
    tasks = [(op, size) for op in cfg["ops"] for size in cfg["sizes"]]
    if rank == 0 and cfg["progress"]:
        from rich.progress import Progress

        progress = Progress(transient=True)
        progress.start()
        bar = progress.add_task(f"collectives on {n} ranks", total=len(tasks))
    rows = []
    try:
        for op, size in tasks:
            count = max(size // esize, 1)
            if op != "all_reduce" and op not in ("reduce", "broadcast"):
                count = max(count // n, 1) * n  # whole blocks per rank
            nbytes = count * esize
            iters = _iters_for(nbytes, cfg["iters"])
            inp, out, want = (t.to(dev) if t is not None else None for t in _verifiable(op, rank, n, count, dtype))
            row_gloo, gloo_sched = None, {}
            copy_s = copy_seconds(nbytes, iters) if cuda else None
            memcpy_s = None
            if not cuda:  # on rank 0 alone, the others wait in the barrier
                memcpy_s = slowest(_memcpy_seconds(nbytes, iters) if rank == 0 else 0.0)
                pycomm.barrier()
            if cfg["gloo"]:
                try:
                    row_gloo = timed(_gloo_call(op, inp.clone(), out.clone(), n), iters, cfg["warmup"])
                    gloo_sched = {f"gloo_{k}": v for k, v in counters.items()}
                except RuntimeError as e:  # an op gloo does not implement
                    row_gloo = str(e).splitlines()[0]
            for algorithm in cfg["algorithms"]:
                if op == "all_to_all" and algorithm != cfg["algorithms"][0]:
                    continue  # one algorithm (pairwise)
                # --registered: all_reduce's buffers from pycomm.empty (shared memory from the start).
                registered = cfg.get("registered") and op == "all_reduce" and not cuda

                def fresh(t):
                    if not registered:
                        return t.clone()
                    buf = pycomm.empty(t.shape, dtype=t.dtype)
                    buf.copy_(t)
                    return buf

                seconds = timed(_pycomm_call(op, fresh(inp), out, algorithm), iters, cfg["warmup"])
                sched = dict(counters)
                # Check once, outside the timing, on fresh inputs.
                chk_in, chk_out, chk_want = (t.to(dev) if t is not None else None
                                             for t in _verifiable(op, rank, n, count, dtype))
                chk_in = fresh(chk_in)
                _pycomm_call(op, chk_in, chk_out, algorithm)()
                got = chk_in if op in ("all_reduce", "reduce", "broadcast") else chk_out
                sync()
                wrong = torch.tensor([0 if chk_want is None else int((got != chk_want).sum())],
                                     dtype=torch.int64)
                pycomm.all_reduce(wrong)
                chosen = "pairwise" if op == "all_to_all" else algorithm
                if algorithm == "auto" and op != "all_to_all":
                    chosen = "auto:" + pycomm.get_cost_model().choose(op, nbytes, n)
                    if registered and nbytes >= SHARED_FROM and n > 1:
                        chosen = "auto:registered"
                algbw = nbytes / seconds / 1e9
                row = dict(op=op, size=nbytes, count=count, type=cfg["dtype"],
                           redop="sum" if op in REDUCES else "none", algorithm=chosen,
                           time_us=seconds * 1e6, algbw=algbw, busbw=algbw * BUS_FACTOR[op](n),
                           wrong=int(wrong.item()), iters=iters, **sched)
                if memcpy_s:
                    row.update(memcpy_gbps=nbytes / memcpy_s / 1e9)
                if isinstance(row_gloo, float):
                    row.update(gloo_time_us=row_gloo * 1e6,
                               gloo_busbw=nbytes / row_gloo / 1e9 * BUS_FACTOR[op](n),
                               speedup=row_gloo / seconds, **gloo_sched)
                elif row_gloo is not None:
                    row.update(gloo_error=row_gloo)
                if copy_s:
                    copy_gbps = nbytes / copy_s / 1e9
                    row.update(copy_us=copy_s * 1e6, copy_gbps=copy_gbps,
                               busbw_vs_copy=row["busbw"] / copy_gbps)
                rows.append(row)
            if progress:
                progress.advance(bar)
    finally:
        if progress:
            progress.stop()
        if cfg["gloo"]:
            dist.destroy_process_group()
    return rows if rank == 0 else None


_SPREAD = ("busbw", "gloo_busbw", "mpi_busbw", "memcpy_gbps")


def combine(runs: list[list[dict]]) -> list[dict]:
    """One row per row of the sweep from `runs` (the repeats): the median repeat's
    measurements (by busbw), with min, median and max of every bandwidth, and the ratios
    taken between medians.  #wrong adds up over the repeats."""
    if len(runs) == 1:
        return runs[0]
    out = []
    for same in zip(*runs):
        by_busbw = sorted(same, key=lambda r: r["busbw"])
        row = dict(by_busbw[len(by_busbw) // 2])
        row["wrong"] = sum(r["wrong"] for r in same)
        row["repeats"] = len(same)
        for key in _SPREAD:
            vals = sorted(r[key] for r in same if key in r)
            if vals:
                row.update({f"{key}_min": vals[0], f"{key}_max": vals[-1], f"{key}_runs": vals,
                            key: statistics.median(vals)})
        if "gloo_busbw" in row:
            row["speedup"] = row["busbw"] / row["gloo_busbw"]
        if "mpi_busbw" in row:
            row["vs_mpi"] = row["busbw"] / row["mpi_busbw"]
        out.append(row)
    return out


def format_table(rows: list[dict], nprocs: int) -> str:
    out = []
    for op in OPS:
        sel = [r for r in rows if r["op"] == op]
        if not sel:
            continue
        out.append(f"# {op} on {nprocs} processes ({sel[0]['type']})")
        anchor = ("copy(us)", "GB/s", "bus/cp") if "copy_gbps" in sel[0] else ("gloo(us)", "busbw", "speedup")
        mpi_head = f" | {'mpi(us)':>10} {'busbw':>7} {'vs mpi':>7}" if "mpi_time_us" in sel[0] else ""
        spread = "busbw_min" in sel[0]
        extra_head = f" | {'min-max busbw':>13}" if spread else ""
        if "memcpy_gbps" in sel[0]:
            extra_head += f" | {'memcpy':>7} {'bus/mc':>6} {'wait%':>5} {'ivcsw':>5}"
        out.append(f"#{'size':>11} {'count':>10} {'type':>8} {'redop':>5} {'algo':>10} {'time(us)':>10} "
                   f"{'algbw':>7} {'busbw':>7} {'#wrong':>6} | {anchor[0]:>10} {anchor[1]:>7} {anchor[2]:>7}"
                   f"{mpi_head}{extra_head}")
        for r in sel:
            if "copy_gbps" in r:  # on a GPU: the copy anchor, and busbw as a fraction of it
                gloo = f"{r['copy_us']:10.1f} {r['copy_gbps']:7.1f} {r['busbw_vs_copy']:6.2f}x"
            elif "gloo_time_us" in r:
                gloo = f"{r['gloo_time_us']:10.1f} {r['gloo_busbw']:7.2f} {r['speedup']:6.1f}x"
            else:
                gloo = f"{'n/a':>10} {'':>7} {'':>7}"
            mpi = ""
            if "mpi_time_us" in r:
                mpi = f" | {r['mpi_time_us']:10.1f} {r['mpi_busbw']:7.2f} {r['vs_mpi']:6.2f}x"
            extra = f" | {r['busbw_min']:6.2f}-{r['busbw_max']:<6.2f}" if spread else ""
            if "memcpy_gbps" in r:
                # wait%: the share of the row's time its slowest rank spent ready but not
                # running (another process had the core); ivcsw: involuntary switches per call
                wait = 100 * r.get("wait_us", 0.0) / max(r["time_us"], 1e-9)
                extra += (f" | {r['memcpy_gbps']:7.2f} {r['busbw'] / r['memcpy_gbps']:6.2f} "
                          f"{wait:5.0f} {r.get('ivcsw', 0.0):5.1f}")
            out.append(f" {r['size']:11d} {r['count']:10d} {r['type']:>8} {r['redop']:>5} {r['algorithm']:>10} "
                       f"{r['time_us']:10.1f} {r['algbw']:7.2f} {r['busbw']:7.2f} {r['wrong']:6d} | {gloo}{mpi}"
                       f"{extra}")
        wrong = sum(r["wrong"] for r in sel)
        out.append(f"# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}")
        out.append(f"# Avg bus bandwidth    : {sum(r['busbw'] for r in sel) / len(sel):.3f} GB/s")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    cols = min(4, len(ops))
    nrows = -(-len(ops) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.0 * cols, 4.0 * nrows), squeeze=False)
    for ax in axes.flat[len(ops):]:
        ax.set_visible(False)
    for ax, op in zip(axes.flat, ops):
        sel = [r for r in rows if r["op"] == op]
        for algo in dict.fromkeys(r["algorithm"].split(":")[0] for r in sel):
            mine = [r for r in sel if r["algorithm"].split(":")[0] == algo]
            line, = ax.plot([r["size"] for r in mine], [r["busbw"] for r in mine], marker="o",
                            label=f"pycomm {algo}" + (" (median)" if "busbw_min" in mine[0] else ""))
            if "busbw_min" in mine[0]:  # the spread of the repeats
                ax.fill_between([r["size"] for r in mine], [r["busbw_min"] for r in mine],
                                [r["busbw_max"] for r in mine], color=line.get_color(), alpha=0.2)
        seen = {}
        for r in sel:
            if "gloo_busbw" in r:
                seen[r["size"]] = r["gloo_busbw"]
        if seen:
            ax.plot(list(seen), list(seen.values()), marker="s", color="black", linestyle="--", label="gloo")
        for key, label, style in (("mpi_busbw", "Open MPI", ":"), ("memcpy_gbps", "memcpy (1 thread)", "-.")):
            pts = {r["size"]: r[key] for r in sel if key in r}
            if pts:
                ax.plot(list(pts), list(pts.values()), color="gray", linestyle=style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("size (bytes)")
        ax.set_ylabel("busbw (GB/s)")
        ax.set_title(op)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--nprocs", "-n", type=int, default=2, help="local processes (default 2)")
    p.add_argument("--begin", "-b", type=parse_size, default=8, help="smallest size, e.g. 8, 64K (default 8)")
    p.add_argument("--end", "-e", type=parse_size, default=64 << 20, help="largest size (default 64M)")
    p.add_argument("--factor", "-f", type=float, default=2, help="size multiplier (default 2, as nccl-tests)")
    p.add_argument("--dtype", "-d", default="float32",
                   choices=["float32", "float64", "int32", "int64", "uint8"])
    p.add_argument("--algorithms", "-a", default="ring,tree",
                   help="comma-separated: ring, tree, auto (default ring,tree)")
    p.add_argument("--ops", "-o", default=",".join(OPS), help="comma-separated collectives")
    p.add_argument("--iters", "-i", type=int, default=None, help="iterations per size (default: by size)")
    p.add_argument("--warmup", "-w", type=int, default=3)
    p.add_argument("--repeat", "-r", type=int, default=1,
                   help="run the sweep N times (with gloo and Open MPI interleaved) and print the "
                        "median busbw with min and max (default 1)")
    p.add_argument("--no-gloo", action="store_true", help="skip the gloo baseline")
    p.add_argument("--registered", action="store_true",
                   help="all_reduce pycomm's rows in buffers from pycomm.empty (shared memory from the start)")
    p.add_argument("--anchor", default="", choices=["", "mpi"],
                   help="mpi: also time every row with Open MPI (mpirun + mpi4py) in this run")
    p.add_argument("--hosts", type=int, default=1,
                   help="simulate this many hosts (ranks in blocks, PYCOMM_HOST_ID): all_reduce "
                        "runs hierarchically, the rest over gloo")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the tensors live (cuda: CUDA IPC for 'auto', NCCL for ring/tree)")
    p.add_argument("--json", metavar="PATH", help="write the rows and the machine to a JSON file")
    p.add_argument("--plot", metavar="PATH", default="bench/out/collectives.png",
                   help="PNG of busbw against size (default bench/out/collectives.png; '' for none)")
    p.add_argument("--no-progress", action="store_true")
    return p


def machine() -> dict:
    import torch

    import pycomm

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(host=platform.node(), cpu=cpu, cores=os.cpu_count(), python=platform.python_version(),
                torch=torch.__version__, pycomm=pycomm.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"))


def gpu_topology() -> dict:
    """What the GPU figures depend on and torch does not say: the driver, and for each GPU
    its active NVLink links (pynvml, the `gpu` extra: `pip install ".[gpu]"`)."""
    try:
        import pynvml
    except ImportError:
        return {"topology": "unknown (pip install '.[gpu]' for pynvml)"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return {"topology": f"unknown (NVML: {e})"}
    try:
        out = {"driver": pynvml.nvmlSystemGetDriverVersion()}
        links = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            active = 0
            for link in range(18):  # NVML_NVLINK_MAX_LINKS on Hopper
                try:
                    active += pynvml.nvmlDeviceGetNvLinkState(h, link) == pynvml.NVML_FEATURE_ENABLED
                except pynvml.NVMLError:
                    break
            links.append(active)
        out["nvlink_links_per_gpu"] = links
        return out
    finally:
        pynvml.nvmlShutdown()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import tempfile

    import pycomm.launch

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    bad = [o for o in ops if o not in OPS] + [a for a in algorithms if a not in ("ring", "tree", "auto")]
    if bad:
        print(f"unknown collective or algorithm: {bad}", file=sys.stderr)
        return 2
    if args.device == "cuda" and args.algorithms == "ring,tree":
        algorithms = ["auto"]  # CUDA IPC; ring and tree run over NCCL, one GPU per rank
    info = machine()
    if args.device == "cuda":
        import torch

        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
        from pycomm import _cuda

        info.update(_cuda.versions())
        info.update(gpu_topology())
        info["cpu"] = f"{info['gpu']} (CUDA {info['cuda']})"
    if args.hosts > 1:
        info["hosts"] = args.hosts
    print(f"# pycomm collectives benchmark: {args.nprocs} processes"
          f"{f' as {args.hosts} simulated hosts' if args.hosts > 1 else ''}, {info['cpu']} ({info['cores']} cores), "
          f"torch {info['torch']}, {info['date']}", flush=True)
    if args.device == "cpu":
        from pycomm._rendezvous import reduce_threads
        from pycomm._settings import Settings

        counts = sorted({1, 2, info["cores"]} & set(range(1, info["cores"] + 1)))
        info["reduce_gbps"] = {n: _reduce_gbps(n) for n in counts}
        mine = reduce_threads(Settings.from_env(), args.nprocs)
        print("# reduction (float32 sum, 64 MiB, GB/s moved): "
              + ", ".join(f"{n} thread{'s' if n > 1 else ''} {g:.1f}" for n, g in info["reduce_gbps"].items())
              + f"; each rank reduces on {mine} (PYCOMM_SHM_REDUCE_THREADS)", flush=True)
        info["cma_gbps"], info["memcpy_gbps"] = _cma_gbps(), (64 << 20) / _memcpy_seconds(64 << 20, 4) / 1e9
        cma = f"{info['cma_gbps']:.1f} GB/s" if info["cma_gbps"] else "refused by this kernel"
        print(f"# single copy's read (process_vm_readv of another process, 1 MiB calls, 64 MiB): {cma}; "
              f"memcpy {info['memcpy_gbps']:.1f} GB/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="pycomm-bench-") as tmp:
        cfg = dict(dtype=args.dtype, sizes=_sizes(args.begin, args.end, args.factor), ops=ops,
                   algorithms=algorithms, iters=args.iters, warmup=args.warmup,
                   gloo=not args.no_gloo and args.device == "cpu", device=args.device,
                   registered=args.registered,
                   gloo_store=os.path.join(tmp, "gloo"), progress=not args.no_progress)
        mpi_ok, why = bench_mpi.available() if args.anchor == "mpi" else (False, "")
        if args.anchor == "mpi" and not mpi_ok:
            print(f"# no Open MPI rows: {why}", flush=True)
        runs = []
        # Each repeat is a whole sweep: pycomm and gloo row by row in the same processes,
        # then Open MPI's sweep, so a slow spell of the machine hits all of them alike.
        for rep in range(args.repeat):
            if args.repeat > 1:
                print(f"# repeat {rep + 1} of {args.repeat}", flush=True)
            rows = pycomm.launch.run(_rank_main, args.nprocs, args=(cfg,), collective_timeout=300,
                                     hosts=args.hosts)[0]
            if mpi_ok:
                print("# timing the same rows with Open MPI (mpirun, mpi4py)...", flush=True)
                times = bench_mpi.run(ops, cfg["sizes"], args.nprocs, args.dtype, args.iters,
                                      repeat=1 if args.repeat > 1 else 3)
                for r in rows:
                    t = times.get((r["op"], r["size"]))
                    if t:
                        r.update(mpi_time_us=t * 1e6,
                                 mpi_busbw=r["size"] / t / 1e9 * BUS_FACTOR[r["op"]](args.nprocs),
                                 vs_mpi=t * 1e6 / r["time_us"])
            runs.append(rows)
        if mpi_ok:
            info["mpi"] = bench_mpi.version()
        rows = combine(runs)
    info["repeat"] = args.repeat
    print(format_table(rows, args.nprocs))
    for op in ops:
        for target in (16 << 20, 64 << 20):
            sel = [r for r in rows if r["op"] == op and r["size"] == target and "speedup" in r]
            for r in sel:
                print(f"{op} {target >> 20} MiB {r['algorithm']}: busbw {r['busbw']:.2f} GB/s, "
                      f"{r['speedup']:.1f}x gloo ({r['gloo_busbw']:.2f} GB/s)")
    small = [r for r in rows if r["op"] == "all_reduce" and r["size"] == 8 and "speedup" in r]
    for r in small:
        print(f"all_reduce 8 B {r['algorithm']}: {r['time_us']:.1f} us vs gloo {r['gloo_time_us']:.1f} us "
              f"({r['gloo_time_us'] / r['time_us']:.1f}x lower latency)")
    for r in rows:
        if "copy_gbps" in r and (r["size"] in (8, 1 << 20) or r["size"] == max(x["size"] for x in rows)):
            print(f"{r['op']} {r['size']} B {r['algorithm']}: {r['time_us']:.1f} us, busbw {r['busbw']:.1f} GB/s "
                  f"= {r['busbw_vs_copy']:.2f}x the device copy ({r['copy_gbps']:.1f} GB/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=info, nprocs=args.nprocs, rows=rows), f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot, f"pycomm vs gloo, {args.nprocs} processes, {info['cpu']}")
        print(f"wrote {args.plot}")
    return 0 if all(r["wrong"] == 0 for r in rows) else 1
