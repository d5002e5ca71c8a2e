"""pycomm: ring and tree collectives for PyTorch, computed by our own C++ algorithms.

    import pycomm
    pycomm.init_process_group()            # torchrun's environment, or rank=, world_size=, init_method=
    pycomm.all_reduce(t, op="sum", algorithm="auto")
    pycomm.reduce_scatter(out, inp); pycomm.all_gather(out, inp); pycomm.broadcast(t, src=0)
    pycomm.destroy_process_group()

`import pycomm` also registers the torch.distributed backend "pycomm".
See README.md for the algorithms, the transport, the cost model and the benchmark.
"""
import torch  # noqa: F401  (loads libtorch, which pycomm._C links against)

from pycomm import _C  # noqa: F401
from pycomm.collectives import (
    P2POp, Work, all_gather, all_reduce, barrier, batch_isend_irecv, broadcast, irecv, isend,
    recv, reduce_scatter, send,
)
from pycomm.distributed import (
    Group, destroy_process_group, get_cost_model, get_rank, get_world_size, init_process_group,
    is_initialized, new_group,
)
from pycomm.errors import CommError, CommMismatchError, CommTimeoutError
from pycomm.tuning import CostModel
from pycomm import backend as _backend

_backend.register()  # torch.distributed.init_process_group("pycomm")

__version__ = "0.1.0"
__all__ = [
    "init_process_group", "destroy_process_group", "new_group", "get_rank", "get_world_size",
    "is_initialized", "get_cost_model", "Group",
    "all_reduce", "reduce_scatter", "all_gather", "broadcast", "barrier",
    "send", "recv", "isend", "irecv", "batch_isend_irecv", "P2POp", "Work",
    "CommError", "CommTimeoutError", "CommMismatchError", "CostModel",
]
