"""Verifiable inputs, as nccl-tests' verifiable/: every rank's input is small integers, so
sums, products, minima and maxima are exact in every dtype (bfloat16 included) and results
can be compared bit for bit.  Shared by the CPU and the GPU collectives tests."""
import torch


def rank_input(rank: int, count: int, dtype, op: str) -> torch.Tensor:
    """Rank r's verifiable input: small integers whose reductions are exact in any dtype."""
    i = torch.arange(count, dtype=torch.int64)
    if op == "prod":
        v = (i + rank) % 2 + 1  # 1 or 2: a product over <= 8 ranks is at most 256
    elif dtype == torch.uint8:
        v = (i * 7 + rank * 3) % 17
    else:
        v = (i * 7 + rank * 3) % 17 - 8
    return v.to(dtype)


def expected(size: int, count: int, dtype, op: str) -> torch.Tensor:
    xs = torch.stack([rank_input(r, count, torch.float64, op) for r in range(size)])
    if dtype == torch.uint8 and op != "prod":
        xs = torch.stack([rank_input(r, count, torch.uint8, op).double() for r in range(size)])
    if op in ("sum", "avg"):
        out = xs.sum(0)
    elif op == "prod":
        out = xs.prod(0)
    elif op == "min":
        out = xs.min(0).values
    else:
        out = xs.max(0).values
    if op == "avg":
        # pycomm's avg: the exact float32 (or float64) sum divided by the group size,
        # rounded once to the tensor's dtype.
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return (out.to(acc) / size).to(dtype)
    return out.to(dtype)
