"""pycomm: collectives for PyTorch computed by our own ring and tree algorithms.

    import pycomm
    pycomm.init_process_group()            # torchrun's environment, or rank=, world_size=, init_method=
    pycomm.all_reduce(t, op="sum", algorithm="auto")
    pycomm.reduce_scatter(out, inp); pycomm.all_gather(out, inp); pycomm.broadcast(t, src=0)
    pycomm.reduce(t, dst=0); pycomm.gather(out, inp, dst=0); pycomm.scatter(out, inp, src=0)
    pycomm.all_to_all(out, inp, output_split_sizes, input_split_sizes)
    pycomm.destroy_process_group()
    group = pycomm.shrink()                # after a CommError: go on without the lost ranks

`import pycomm` also registers the torch.distributed backend "pycomm" (pycomm.c10d).
See README.md for the algorithms, the transports, the cost model and the benchmark, and
docs/collectives.md for how the layers fit together.
"""
import importlib

import torch  # noqa: F401  (loads libtorch, which pycomm._C links against)

from pycomm import (
    _C,  # noqa: F401
    _checkout,  # noqa: F401  (pycomm.kernels and pycomm.bench from a source checkout)
)
from pycomm import c10d as _c10d
from pycomm.collectives import (
    P2POp,
    all_gather,
    all_reduce,
    all_to_all,
    barrier,
    batch_isend_irecv,
    broadcast,
    empty,
    gather,
    irecv,
    isend,
    recv,
    reduce,
    reduce_scatter,
    scatter,
    send,
)
from pycomm.distributed import (
    destroy_process_group,
    get_cost_model,
    get_rank,
    get_world_size,
    init_process_group,
    is_initialized,
    new_group,
    shrink,
)
from pycomm.errors import CommError, CommMismatchError, CommTimeoutError
from pycomm.group import Group
from pycomm.tuning import CostModel
from pycomm.work import Work

_c10d.register()  # torch.distributed.init_process_group("pycomm")



def __getattr__(name: str):
    # `import pycomm; pycomm.kernels.patch(...)`: the kernels (and triton) load on first use only.
    if name in ("kernels", "bench"):
        return importlib.import_module(f"pycomm.{name}")
    raise AttributeError(f"module 'pycomm' has no attribute {name!r}")


__version__ = "0.2.0"
__all__ = [
    "init_process_group", "destroy_process_group", "new_group", "get_rank", "get_world_size",
    "is_initialized", "get_cost_model", "Group", "shrink",
    "all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "gather", "scatter",
    "all_to_all", "barrier", "empty", "send", "recv", "isend", "irecv", "batch_isend_irecv", "P2POp",
    "Work", "CommError", "CommTimeoutError", "CommMismatchError", "CostModel",
]
