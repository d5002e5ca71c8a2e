"""Run by test_torchrun: pycomm from torchrun's environment, then on top of torch.distributed."""
import torch
import torch.distributed as dist

import pycomm

pycomm.init_process_group()  # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
r, p = pycomm.get_rank(), pycomm.get_world_size()
t = torch.full((1001,), float(r + 1))
pycomm.all_reduce(t)
assert torch.equal(t, torch.full((1001,), p * (p + 1) / 2)), t
pycomm.destroy_process_group()

dist.init_process_group("gloo")
pycomm.init_process_group()  # reuses torch.distributed's rank, world size and store
assert (pycomm.get_rank(), pycomm.get_world_size()) == (dist.get_rank(), dist.get_world_size())
a = torch.arange(10.0) * (r + 1)
b = a.clone()
pycomm.all_reduce(a, op=dist.ReduceOp.MAX)
dist.all_reduce(b, op=dist.ReduceOp.MAX)
assert torch.equal(a, b)
pycomm.destroy_process_group()
dist.destroy_process_group()
print(f"rank {r} of {p}: ok", flush=True)

# The torch.distributed backend, selected per device as users write it.
dist.init_process_group("cpu:pycomm,cuda:pycomm")
t = torch.full((1001,), float(r + 1))
dist.all_reduce(t)
assert torch.equal(t, torch.full((1001,), p * (p + 1) / 2)), t
dist.destroy_process_group()
print(f"rank {r} of {p}: backend ok", flush=True)
