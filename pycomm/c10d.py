"""The torch.distributed backend "pycomm", registered when pycomm is imported.

    import pycomm
    torch.distributed.init_process_group("pycomm")     # under torchrun, or with init_method=

Each process group torch creates gets a pycomm group built by the same code as
``pycomm.init_process_group``'s (pycomm.distributed.Context): shared memory on one host,
the hierarchy across hosts, CUDA IPC or NCCL for CUDA tensors.  The C++ side
(csrc/torch/backend.cpp) is a thin c10d adapter: every operation c10d routes to a backend
comes here as an :class:`Adapter` method call with plain arguments, is mapped onto pycomm's
public functions (async, so it runs in call order on the group's worker while the caller
goes on), and returns a pycomm Work that completes the c10d Work.

What c10d hands a backend and pycomm's API does not take directly is adapted here: lists
of tensors (one collective on their concatenation, or one per tensor), non-contiguous
tensors (staged through a contiguous copy), uneven all_gather/gather/scatter blocks, sparse
all_reduce (gather indices and values, sum, coalesce, as gloo does), and receives from any
source.  The timeout is the process group's (or $PYCOMM_TIMEOUT).
"""
from __future__ import annotations

import concurrent.futures
import datetime
import time

import torch
import torch.distributed as dist

from pycomm import _C
from pycomm import collectives as C
from pycomm._settings import Settings, clamp_timeout
from pycomm.distributed import Context
from pycomm.group import Group
from pycomm.work import Work, completed

NAME = "pycomm"


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


class _Staged:
    """Contiguous stand-ins for (possibly non-contiguous) tensors, copied back when the
    operation completes."""

    def __init__(self, tensors):
        self.user = list(tensors)
        self.bufs = [_contiguous(t) for t in self.user]

    def copy_back(self) -> None:
        for u, b in zip(self.user, self.bufs):
            if b is not u:
                u.copy_(b)


def _chain(work: Work | None, outputs: list, then=None, source=None) -> Work:
    """A Work that completes with `outputs` after `work` (None: already done) and then().
    `source(work)`: its source_rank, set before it completes (the c10d Work reads it in a
    done-callback)."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    result = Work(future, tuple(outputs))

    def done(w: Work | None):
        try:
            if w is not None:
                w.wait()
            if then is not None:
                then()
            if source is not None:
                result.source_rank = source(w)
            future.set_result(outputs)
        except BaseException as e:  # noqa: BLE001 - delivered through the c10d Work
            future.set_exception(e)

    if work is None:
        done(None)
    else:
        work.add_done_callback(done)
    return result


class Adapter:
    """What csrc/torch/backend.cpp calls: one method per c10d operation."""

    def __init__(self, group: Group, ctx: Context, store=None, prefix: str = "pycomm/"):
        self.group, self.ctx = group, ctx
        self.rank, self.size = group.rank, group.size
        self.store, self.prefix = store, prefix
        self._monitored = 0  # monitored barriers so far (their store keys)

    # ------------------------------------------------------------------ collectives

    def allreduce(self, tensors, op: str, timeout):
        if any(t.layout == torch.sparse_coo for t in tensors):
            return self.allreduce_sparse(tensors, op, timeout)  # c10d routes sparse tensors here too
        if len(tensors) == 1 and tensors[0].is_contiguous():
            return C.all_reduce(tensors[0], op, async_op=True, group=self.group)
        return self.allreduce_coalesced(tensors, op, timeout)

    def allreduce_coalesced(self, tensors, op: str, timeout):
        if not tensors:
            return completed([])
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) > 1:
            raise TypeError(f"pycomm backend: allreduce_coalesced needs tensors of one dtype, got "
                            f"{sorted(map(str, dtypes))}")
        flat = torch.cat([t.reshape(-1) for t in tensors])
        w = C.all_reduce(flat, op, async_op=True, group=self.group)

        def scatter_back():
            off = 0
            for t in tensors:
                t.copy_(flat[off:off + t.numel()].view(t.shape))
                off += t.numel()

        return _chain(w, list(tensors), scatter_back)

    def allreduce_sparse(self, tensors, op: str, timeout):
        """As gloo does: gather every rank's indices and values, sum, coalesce."""
        if op not in ("sum", "avg"):
            raise ValueError(f"pycomm backend: sparse all_reduce supports sum (and avg), not {op!r}")
        for t in tensors:
            if t.layout != torch.sparse_coo:
                raise TypeError("pycomm backend: allreduce_sparse takes sparse COO tensors")
            s = t.coalesce()
            idx, val = s.indices(), s.values()
            ndim, per = idx.shape[0], max(1, val[0].numel()) if val.dim() > 1 else 1
            counts = torch.empty(self.size, dtype=torch.int64)
            C.all_gather(counts, torch.tensor([idx.shape[1]], dtype=torch.int64), group=self.group)
            nnz = [int(c) for c in counts]
            got_idx = self._all_gather_v(idx.t().contiguous().view(-1), [c * ndim for c in nnz])
            got_val = self._all_gather_v(val.contiguous().view(-1), [c * per for c in nnz])
            total = torch.sparse_coo_tensor(got_idx.view(-1, ndim).t(),
                                            got_val.view((-1,) + tuple(val.shape[1:])), t.shape).coalesce()
            t.copy_(total / self.size if op == "avg" else total)
        return completed(list(tensors))

    def _all_gather_v(self, flat: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every rank's `flat` (counts[j] elements from rank j), concatenated in rank order."""
        out = torch.empty(sum(counts), dtype=flat.dtype, device=flat.device)
        C.all_to_all(out, flat.repeat(self.size), counts, [flat.numel()] * self.size, group=self.group)
        return out

    def broadcast(self, tensors, root: int, root_tensor: int, timeout):
        st = _Staged(tensors)
        works = [C.broadcast(b, root, async_op=True, group=self.group) for b in st.bufs]
        return _chain(works[-1] if works else None, st.user, st.copy_back)

    def reduce(self, tensors, root: int, root_tensor: int, op: str, timeout):
        st = _Staged(tensors)
        works = [C.reduce(b, root, op, async_op=True, group=self.group) for b in st.bufs]
        return _chain(works[-1] if works else None, st.user, st.copy_back if self.rank == root else None)

    def allgather(self, outputs, inputs, timeout):
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError("pycomm backend: allgather takes one input and one output list per process")
        outs, inp = outputs[0], _contiguous(inputs[0])
        if len(outs) != self.size:
            raise ValueError(f"pycomm backend: allgather needs {self.size} output tensors, got {len(outs)}")
        for o in outs:
            if o.dtype != inp.dtype:
                raise TypeError(f"pycomm backend: allgather output dtype {o.dtype} differs from the "
                                f"input's {inp.dtype}")
        if all(o.numel() == inp.numel() for o in outs):
            flat = torch.empty(self.size * inp.numel(), dtype=inp.dtype, device=inp.device)
            w = C.all_gather(flat, inp.reshape(-1), async_op=True, group=self.group)
        else:  # uneven blocks: every rank sends its input to every rank
            counts = [o.numel() for o in outs]
            if counts[self.rank] != inp.numel():
                raise ValueError(f"pycomm backend: allgather output {self.rank} has {counts[self.rank]} "
                                 f"elements but this rank's input has {inp.numel()}")
            flat = torch.empty(sum(counts), dtype=inp.dtype, device=inp.device)
            w = C.all_to_all(flat, inp.reshape(-1).repeat(self.size), counts, [inp.numel()] * self.size,
                             async_op=True, group=self.group)

        def split():
            off = 0
            for o in outs:
                o.copy_(flat[off:off + o.numel()].view(o.shape))
                off += o.numel()

        return _chain(w, list(outs), split)

    def allgather_base(self, output, input, timeout):
        if output.is_contiguous():
            return C.all_gather(output, _contiguous(input), async_op=True, group=self.group)
        st = _Staged([output])
        w = C.all_gather(st.bufs[0], _contiguous(input), async_op=True, group=self.group)
        return _chain(w, [output], st.copy_back)

    def allgather_coalesced(self, outputs, inputs, timeout):
        if len(outputs) != 1:
            # c10d passes one list of size * len(inputs) outputs
            outs = [o for lst in outputs for o in lst]
        else:
            outs = outputs[0]
        if len(outs) != self.size * len(inputs):
            raise ValueError(f"pycomm backend: allgather_coalesced needs world_size x {len(inputs)} "
                             f"outputs, got {len(outs)}")
        works = []
        for i, inp in enumerate(inputs):
            per = [outs[r * len(inputs) + i] for r in range(self.size)]
            works.append(self.allgather([per], [inp], timeout))
        return _chain(works[-1] if works else None, outs)

    def allgather_into_tensor_coalesced(self, outputs, inputs, timeout):
        works = [self.allgather_base(o, i, timeout) for o, i in zip(outputs, inputs)]
        return _chain(works[-1] if works else None, list(outputs))

    def gather(self, outputs, inputs, root: int, timeout):
        if len(inputs) != 1:
            raise ValueError("pycomm backend: gather takes one input tensor per process")
        inp = _contiguous(inputs[0])
        if self.rank != root:
            if outputs and outputs[0]:
                raise ValueError(f"pycomm backend: gather: only the destination rank ({root}) passes "
                                 "an output list")
            return C.gather(None, inp, root, async_op=True, group=self.group)
        outs = outputs[0]
        if len(outs) != self.size:
            raise ValueError(f"pycomm backend: gather needs {self.size} output tensors on the "
                             f"destination, got {len(outs)}")
        flat = torch.empty(self.size * inp.numel(), dtype=inp.dtype, device=inp.device)
        w = C.gather(flat, inp.reshape(-1), root, async_op=True, group=self.group)

        def split():
            for r, o in enumerate(outs):
                o.copy_(flat[r * inp.numel():(r + 1) * inp.numel()].view(o.shape))

        return _chain(w, list(outs), split)

    def scatter(self, outputs, inputs, root: int, timeout):
        if len(outputs) != 1:
            raise ValueError("pycomm backend: scatter takes one output tensor per process")
        st = _Staged(outputs)
        out = st.bufs[0]
        if self.rank == root:
            ins = inputs[0] if inputs else []
            if len(ins) != self.size:
                raise ValueError(f"pycomm backend: scatter needs {self.size} input tensors on the "
                                 f"source, got {len(ins)}")
            flat = torch.cat([i.reshape(-1) for i in ins])
        else:
            if inputs and inputs[0]:
                raise ValueError(f"pycomm backend: scatter: only the source rank ({root}) passes an "
                                 "input list")
            flat = None
        w = C.scatter(out.view(-1), flat, root, async_op=True, group=self.group)
        return _chain(w, st.user, st.copy_back)

    def reduce_scatter(self, outputs, inputs, op: str, timeout):
        if len(outputs) != 1 or len(inputs) != 1 or len(inputs[0]) != self.size:
            raise ValueError("pycomm backend: reduce_scatter takes one output and world_size inputs")
        flat = torch.cat([t.reshape(-1) for t in inputs[0]])
        return self.reduce_scatter_base(outputs[0], flat, op, timeout)

    def reduce_scatter_base(self, output, input, op: str, timeout):
        st = _Staged([output])
        w = C.reduce_scatter(st.bufs[0].view(-1), _contiguous(input).view(-1), op, async_op=True,
                             group=self.group)
        return _chain(w, [output], st.copy_back)

    def reduce_scatter_tensor_coalesced(self, outputs, inputs, op: str, timeout):
        works = [self.reduce_scatter_base(o, i, op, timeout) for o, i in zip(outputs, inputs)]
        return _chain(works[-1] if works else None, list(outputs))

    def alltoall_base(self, output, input, output_splits, input_splits, timeout):
        st = _Staged([output])
        w = C.all_to_all(st.bufs[0], _contiguous(input), list(output_splits) or None,
                         list(input_splits) or None, async_op=True, group=self.group)
        return _chain(w, [output], st.copy_back)

    def alltoall(self, outputs, inputs, timeout):
        if len(outputs) != self.size or len(inputs) != self.size:
            raise ValueError(f"pycomm backend: alltoall needs {self.size} input and output tensors")
        dtypes = {t.dtype for t in [*outputs, *inputs]}
        if len(dtypes) > 1:
            raise TypeError("pycomm backend: alltoall needs tensors of one dtype")
        flat_in = torch.cat([t.reshape(-1) for t in inputs])
        flat_out = torch.empty(sum(t.numel() for t in outputs), dtype=flat_in.dtype, device=flat_in.device)
        w = C.all_to_all(flat_out, flat_in, [t.numel() for t in outputs], [t.numel() for t in inputs],
                         async_op=True, group=self.group)

        def split():
            off = 0
            for o in outputs:
                o.copy_(flat_out[off:off + o.numel()].view(o.shape))
                off += o.numel()

        return _chain(w, list(outputs), split)

    def barrier(self, timeout):
        cpu = self.group.backends["cpu"]

        def run():
            cpu._barrier()
            return []

        work = self.group.run(run, True)
        assert work is not None  # async_op=True always returns the Work
        return work

    def monitored_barrier(self, timeout, wait_all_ranks: bool) -> None:
        """ProcessGroup.monitored_barrier, as gloo's: every rank reports to rank 0, which waits
        at most `timeout` (default: the group's) and names the ranks that did not arrive, then
        releases them.  Through the store, so that a rank that never comes is found without
        disturbing the group's channels.  Blocking; raises RuntimeError with gloo's wording.
        (torch.distributed.monitored_barrier itself refuses every backend but gloo.)"""
        limit = self.group.timeout if timeout is None else timeout
        key = f"{self.prefix}monitored/{self._monitored}/"
        self._monitored += 1
        if self.rank != 0:
            self.store.set(f"{key}{self.rank}", b"1")
            try:
                self.store.wait([f"{key}release"], datetime.timedelta(seconds=self.group.timeout))
            except Exception as e:  # noqa: BLE001 - reported with gloo's wording
                raise RuntimeError(
                    f"Rank {self.rank} successfully reached monitoredBarrier, but received errors while "
                    f"waiting for send/recv from rank 0. Please check rank 0 logs for faulty rank.\n"
                    f" Original exception: \n{e}") from e
            return
        ms = int(limit * 1000)
        start = time.monotonic()
        failed: list[int] = []
        passed: list[int] = []
        for r in range(1, self.size):
            left = limit - (time.monotonic() - start)
            if left <= 0 and not wait_all_ranks:
                done = ", ".join(map(str, passed))
                raise RuntimeError(f"Rank 0 timed out in monitoredBarrier after {ms} ms.\n" + (
                    f"Successfully processed ranks: {done}" if passed else
                    "No ranks successfully processed in monitoredBarrier."))
            try:
                self.store.wait([f"{key}{r}"], datetime.timedelta(seconds=max(left, 0.001)))
                passed.append(r)
            except Exception as e:  # noqa: BLE001 - the store's timeout
                if not wait_all_ranks:
                    raise RuntimeError(f"[Rank 0]: Rank {r} failed to pass monitoredBarrier in {ms} ms\n"
                                       f" Original exception: \n{e}") from e
                failed.append(r)
        if failed:
            raise RuntimeError(f"[Rank 0]: Ranks {', '.join(map(str, failed))} failed to pass "
                               f"monitoredBarrier in {ms} ms")
        self.store.set(f"{key}release", b"1")

    # ------------------------------------------------------------------ messages

    def send(self, tensors, dst: int, tag: int):
        st = _Staged(tensors)
        return C.isend(st.bufs[0], dst, self.group, tag)

    def recv(self, tensors, src: int, tag: int):
        """src -1: from any source (recvAnysource); the Work's source_rank says who sent it."""
        st = _Staged(tensors)
        w = C.irecv(st.bufs[0], None if src < 0 else src, self.group, tag)
        return _chain(w, st.user, st.copy_back, (lambda done: done.source_rank) if src < 0 else (lambda _: src))

    # ------------------------------------------------------------------ lifetime

    def abort(self) -> None:
        # Peers (and this rank's own operations in flight) stop now; then the resources go.
        self.ctx.leave("abort")
        self.ctx.close("abort")

    def shutdown(self) -> None:
        self.ctx.close("destroy_process_group")


def _create(store, rank: int, size: int, timeout: datetime.timedelta) -> _C.TorchBackend:
    settings = Settings.from_env()
    seconds = settings.timeout if settings.timeout is not None else clamp_timeout(
        timeout.total_seconds(), "the process group's timeout")
    # torch hands every group its own prefixed store; count start-ups in it so that a
    # re-created group gets fresh keys.
    generation = (store.add("pycomm/backend-starts", 1) - 1) // size
    ctx = Context.start(store, f"pycomm/backend/{generation}/", rank, size, seconds, settings)
    try:
        group = ctx.group(tuple(range(size)))
    except BaseException:
        ctx.close()
        raise
    backend = _C.TorchBackend(rank, size, Adapter(group, ctx, store, f"pycomm/backend/{generation}/"))
    if group.native is not None:
        # Plain all-reduces of CPU tensors skip Python entirely (csrc/torch/native.h).
        backend.enable_native(group.native)
    return backend


def register() -> None:
    if NAME.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(NAME, _create, devices=["cpu", "cuda"])
