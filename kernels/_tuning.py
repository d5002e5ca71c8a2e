"""How the autotuned kernels pick configs: bucketed keys and pruning by the target's shared memory.

* **Bucketed keys.**  ``triton.autotune`` benchmarks every config for every new value of its key.
  With exact sizes as the key, a Hugging Face ``generate()`` re-tunes for every new prompt length
  and batch size.  ``BucketedAutotuner`` keys on ``bucket(n)`` (the next power of two) for the
  arguments named in ``bucket=`` -- M and the sequence lengths -- and exact values for the rest
  (N, K, head dim), which decide tile fit and vectorisation.  A bucket is tuned once; every size
  in it reuses the winner.
* **Shared-memory pruning.**  A config whose pipeline buffers exceed the GPU's per-block shared
  memory fails at launch with "out of resources".  ``prune_by_shared_memory(estimate)`` drops such
  configs before the autotuner benchmarks them.  ``estimate(config, dtype_bytes, args)`` is an
  upper bound that the compile check (``bench/compile_check.py``) verifies against the compiler's
  own figure for every config it compiles.  The limit is the device's opt-in maximum on a GPU;
  the compile check sets a target's limit with ``target_limit`` (no GPU needed).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import triton
from triton.runtime.autotuner import Autotuner

# Per-block shared memory (opt-in maximum) of the targets the compile check builds for.
SHARED_MEMORY_LIMIT = {90: 232_448, 80: 166_912}

# Set by target_limit() while the compile check enumerates configs for a target it has no GPU of.
_target_limit: int | None = None
_target_arch: int | None = None


def bucket(n: int) -> int:
    """The autotune bucket of a size: the next power of two (0 and 1 stay themselves)."""
    return triton.next_power_of_2(n) if n > 1 else n


@contextlib.contextmanager
def target_limit(limit: int, arch: int | None = None) -> Iterator[None]:
    """Prune against ``limit`` bytes (and the register rules of compute capability ``arch``, e.g.
    90) instead of the current device's: for ahead-of-time compiling."""
    global _target_limit, _target_arch
    previous = _target_limit, _target_arch
    _target_limit, _target_arch = limit, arch
    try:
        yield
    finally:
        _target_limit, _target_arch = previous


def _first_tensor(args: dict) -> torch.Tensor | None:
    return next((v for v in args.values() if isinstance(v, torch.Tensor)), None)


def shared_memory_limit(args: dict) -> int | None:
    """Bytes of shared memory a block may use where these arguments will run; None: no limit known."""
    if _target_limit is not None:
        return _target_limit
    t = _first_tensor(args)
    if t is not None and t.is_cuda:
        return torch.cuda.get_device_properties(t.device).shared_memory_per_block_optin
    return None  # CPU tensors under the interpreter: nothing to fit


def target_arch(args: dict) -> int | None:
    """Compute capability (major * 10 + minor) the arguments will run on; None: not a GPU."""
    if _target_arch is not None:
        return _target_arch
    t = _first_tensor(args)
    if t is not None and t.is_cuda:
        major, minor = torch.cuda.get_device_capability(t.device)
        return 10 * major + minor
    return None


Estimate = Callable[[triton.Config, int, dict], int]


# keep(config, args, arch): a register rule; arch is target_arch() (None under the interpreter,
# where one config runs anyway).  Rules derived from sm_90 compile reports apply to arch None too.
Keep = Callable[[triton.Config, dict, "int | None"], bool]


def prune_by_shared_memory(estimate: Estimate, keep: Keep | None = None) -> Callable:
    """An ``early_config_prune`` that keeps the configs whose ``estimate`` fits the limit and,
    given ``keep``, that ``keep(config, args, arch)`` accepts (a register rule, say).

    If none is left, the smallest one is kept so the error at launch names the real problem.
    """

    def prune(configs: Sequence[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        arch = target_arch(named_args)
        kept = [c for c in configs if keep is None or keep(c, args, arch)] or list(configs)
        limit = shared_memory_limit(named_args)
        if limit is None:
            return kept
        t = _first_tensor(named_args)
        size = t.element_size() if t is not None else 4
        fits = [c for c in kept if estimate(c, size, args) <= limit]
        return fits or [min(kept, key=lambda c: estimate(c, size, args))]

    prune.estimate = estimate  # type: ignore[attr-defined]  # read by bench/compile_check.py
    return prune


class BucketedAutotuner(Autotuner):
    """``Autotuner`` whose cache key uses ``bucket()`` of the arguments named in ``bucketed``.

    The first call in a bucket runs the ordinary autotuner (which benchmarks on a GPU); the config
    it chose is then reused for every later call whose bucketed key matches.
    """

    def __init__(self, *args, bucketed: Sequence[str] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.bucketed = frozenset(bucketed)
        self.bucket_cache: dict[tuple, triton.Config] = {}

    def bucket_key(self, args: tuple, kwargs: dict) -> tuple:
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        key = [bucket(named[k]) if k in self.bucketed else named[k] for k in self.keys if k in named]
        key += [str(v.dtype) for k, v in named.items() if k in self.arg_names and hasattr(v, "dtype")]
        return tuple(key)

    def run(self, *args, **kwargs):
        key = self.bucket_key(args, kwargs)
        config = self.bucket_cache.get(key)
        if config is None:
            ret = super().run(*args, **kwargs)
            self.bucket_cache[key] = self.best_config
            return ret
        self.best_config = config
        if config.pre_hook is not None:
            config.pre_hook({**dict(zip(self.arg_names, args)), **kwargs, **config.all_kwargs()})
        return self.fn.run(*args, **kwargs, **config.all_kwargs())


def autotune(configs, key, bucketed: Sequence[str] = (), shared_memory: Estimate | None = None,
             keep: Keep | None = None):
    """``triton.autotune`` with bucketed keys and, given an estimate, pruning (see above)."""
    prune = {"early_config_prune": prune_by_shared_memory(shared_memory, keep)} if shared_memory else None

    def decorator(fn):
        return BucketedAutotuner(fn, fn.arg_names, configs, key, reset_to_zero=None, restore_value=None,
                                 prune_configs_by=prune, bucketed=bucketed)

    return decorator


def epilogue_fits_registers(config: triton.Config, args: dict, arch: int | None = None) -> bool:
    """The matmul kernels' register rule: a fused activation epilogue on a tile of 128 fp32
    accumulators per thread spills on sm_90 (255 registers and 184-304 bytes of spill stores in
    bench/compile_reports), so those tiles are left to the plain matmul, where they fit."""
    kw = config.kwargs
    per_thread = kw["BLOCK_M"] * kw["BLOCK_N"] // (32 * config.num_warps)
    return args.get("ACTIVATION", "none") == "none" or per_thread < 128
