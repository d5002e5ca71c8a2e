"""The torch.distributed backend "pycomm", registered when pycomm is imported.

    import pycomm
    torch.distributed.init_process_group("pycomm")                 # under torchrun
    torch.distributed.init_process_group("cpu:pycomm,cuda:nccl")   # CPU tensors on pycomm

Each process group torch creates gets its own pycomm communicator (shared-memory segments
agreed through the group's store, as in pycomm.init_process_group).  The backend is for one
host: a group whose ranks are on several hosts raises CommError at creation, pointing to
"cpu:gloo" (or nccl) across hosts, or to pycomm.init_process_group, whose groups span hosts.  The collectives are
csrc/torch/backend.cpp: allreduce (and allreduce_coalesced), allgather and
all_gather_into_tensor, reduce_scatter and reduce_scatter_tensor, broadcast, barrier, send
and recv, each returning a Work with a future, run in order on the backend's own thread.
Environment: PYCOMM_ALGO picks the algorithm (e.g. "tree", or
"allreduce:tree;allgather:ring"), PYCOMM_DEBUG=INFO logs each collective's algorithm and
transport, PYCOMM_TIMEOUT overrides torch's timeout (seconds).
"""
from __future__ import annotations

import os

import torch.distributed as dist

from pycomm import _C
from pycomm.distributed import _rendezvous, _start

NAME = "pycomm"


def _create(store, rank: int, size: int, timeout) -> "_C.TorchBackend":
    seconds = float(os.environ.get("PYCOMM_TIMEOUT") or timeout.total_seconds())
    # torch hands every group its own prefixed store; count start-ups in it so that a
    # re-created group gets fresh keys.
    generation = (store.add("pycomm/backend-starts", 1) - 1) // size
    key = f"pycomm/backend/{generation}/"
    token, model, _ = _start(store, key, rank, size, seconds, one_host=True)
    comm = _rendezvous(store, key + "shm/", rank, tuple(range(size)), token, seconds, "b")
    debug = os.environ.get("PYCOMM_DEBUG", "").upper() in ("INFO", "DEBUG")
    return _C.TorchBackend(comm, seconds, model.alpha, model.beta, model.gamma,
                           os.environ.get("PYCOMM_ALGO", ""), debug)


def register() -> None:
    if NAME.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(NAME, _create, devices=["cpu", "cuda"])
