"""Autotuning policy (kernels/_tuning.py): bucketed keys, and pruning by the target's shared memory."""
import importlib

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner

from pycomm import kernels
from pycomm.kernels import _dispatch, _tuning

matmul_mod = importlib.import_module("pycomm.kernels.matmul")
attn_mod = importlib.import_module("pycomm.kernels.flash_attention")


@_tuning.autotune([triton.Config({"BLOCK": 64})], key=["n", "D"], bucketed=["n"])
@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, D, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n * D) * 2.0, mask=offs < n * D)


def _launch(n, D):
    x = torch.arange(n * D, dtype=torch.float32)
    y = torch.empty_like(x)
    _scale_kernel[lambda meta: (triton.cdiv(n * D, meta["BLOCK"]),)](x, y, n, D)
    assert torch.equal(y, x * 2)


def test_bucket():
    assert [_tuning.bucket(n) for n in (0, 1, 2, 3, 5, 64, 65, 1000)] == [0, 1, 2, 4, 8, 64, 128, 1024]


def test_a_new_size_in_a_tuned_bucket_does_not_tune_again(monkeypatch):
    tunes = []
    original = Autotuner.run

    def counting(self, *args, **kwargs):
        tunes.append(args[2:4])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", counting)
    _scale_kernel.bucket_cache.clear()
    _launch(100, 3)
    _launch(120, 3)  # same bucket (128) and same exact D: reuses the config
    _launch(128, 3)
    assert tunes == [(100, 3)]
    _launch(129, 3)  # next bucket
    _launch(100, 5)  # D is exact: a new key
    assert tunes == [(100, 3), (129, 3), (100, 5)]


def _configs(*stages):
    return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=s) for s in stages]


def test_pruning_keeps_what_fits_the_target():
    prune = _tuning.prune_by_shared_memory(matmul_mod._shared_memory)
    a = torch.empty(4, 4, dtype=torch.float16)
    configs = _configs(2, 4, 8)  # 32, 64 and 128 KiB of fp16 tiles
    assert prune(configs, {"a_ptr": a}) == configs  # CPU tensors, no target: nothing to fit
    with _tuning.target_limit(70_000):
        assert [c.num_stages for c in prune(configs, {"a_ptr": a})] == [2, 4]
    with _tuning.target_limit(1_000):  # nothing fits: the smallest is kept, so the launch error is real
        assert [c.num_stages for c in prune(configs, {"a_ptr": a})] == [2]


@pytest.mark.parametrize("arch", sorted(_tuning.SHARED_MEMORY_LIMIT))
def test_fp32_attention_at_head_dim_128_prunes_the_big_tiles(arch):
    # 128x128 tiles at 3 stages need ~393 KB in fp32: over both targets' limits.
    prune = _tuning.prune_by_shared_memory(attn_mod._fwd_shared_memory)
    q = torch.empty(1, dtype=torch.float32)
    with _tuning.target_limit(_tuning.SHARED_MEMORY_LIMIT[arch]):
        kept = prune(attn_mod._fwd_configs(), {"q_ptr": q}, BLOCK_D=128)
    assert kept and all(attn_mod._fwd_shared_memory(c, 4, {"BLOCK_D": 128}) <= _tuning.SHARED_MEMORY_LIMIT[arch]
                        for c in kept)
    assert not any(c.kwargs == {"BLOCK_M": 128, "BLOCK_N": 128} for c in kept)


def test_register_rules_follow_the_target_architecture():
    # The portable dQ kernel's 64x128 tile at 8 warps is clean on sm_90 and spills 152 B on sm_80:
    # pruning for sm_80 drops it, for sm_90 (and on the CPU, no target) keeps it.
    prune = _tuning.prune_by_shared_memory(attn_mod._dq_shared_memory, attn_mod._dq_fits_registers)
    q = torch.empty(1, dtype=torch.float16)

    def has_tile(arch):
        with _tuning.target_limit(_tuning.SHARED_MEMORY_LIMIT[arch], arch):
            kept = prune(attn_mod._bwd_configs(), {"q_ptr": q}, BLOCK_D=64)
        return any(attn_mod._shape(c) == (64, 128, 2, 8) for c in kept)

    assert has_tile(90) and not has_tile(80)
    assert any(attn_mod._shape(c) == (64, 128, 2, 8) for c in prune(attn_mod._bwd_configs(), {"q_ptr": q}, BLOCK_D=64))


# ---------------------------------------------------------------- kernel families (_dispatch.VariantTuner)


def _families(log):
    return {_dispatch.PORTABLE: lambda: log.append("portable") or "p", _dispatch.HOPPER: lambda: log.append("hopper") or "h"}


def test_variant_tuner_times_each_family_once_per_bucket_and_keeps_the_faster(monkeypatch):
    # As on a GPU (no interpreter): the first call of a bucket times both families, later calls
    # in the bucket run the winner without timing.
    monkeypatch.setattr(_dispatch._interpreter, "INTERPRETING", False)
    monkeypatch.delenv(_dispatch.VARIANT_ENV_VAR, raising=False)
    speed = {"portable": 2.0, "hopper": 1.0}
    timed, log = [], []

    def timer(fn):
        fn()
        timed.append(log[-1])
        return speed[log[-1]]

    tuner = _dispatch.VariantTuner("test_op", timer=timer)
    assert tuner.run((128, 64), _families(log)) == "h"
    assert timed == ["portable", "hopper"]
    assert tuner.run((128, 64), _families(log)) == "h" and len(timed) == 2  # cached
    speed.update(portable=0.5)
    assert tuner.run((256, 64), _families(log)) == "p" and len(timed) == 4  # a new bucket is timed
    only_portable = {_dispatch.PORTABLE: _families(log)[_dispatch.PORTABLE]}
    assert tuner.run((128, 64), only_portable) == "p" and len(timed) == 4  # one family: nothing to time
    choices = _dispatch.variant_choices()["test_op"]
    assert [c["variant"] for c in choices] == ["hopper", "portable"]
    assert choices[0]["ms"] == {"portable": 2.0, "hopper": 1.0}


def test_variant_tuner_forced_and_interpreted(monkeypatch):
    log = []
    tuner = _dispatch.VariantTuner("test_op2", timer=lambda fn: pytest.fail("nothing should be timed"))
    monkeypatch.setattr(_dispatch._interpreter, "INTERPRETING", True)
    monkeypatch.delenv(_dispatch.VARIANT_ENV_VAR, raising=False)
    assert tuner.run((1,), _families(log)) == "p"  # interpreter: no timer, the portable family
    monkeypatch.setenv(_dispatch.VARIANT_ENV_VAR, "hopper")
    assert tuner.run((1,), _families(log)) == "h"
    assert tuner.run((1,), {_dispatch.PORTABLE: _families(log)[_dispatch.PORTABLE]}) == "p"  # cannot: portable
    monkeypatch.setenv(_dispatch.VARIANT_ENV_VAR, "portable")
    assert tuner.run((1,), _families(log)) == "p"
    monkeypatch.setenv(_dispatch.VARIANT_ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="PYCOMM_KERNEL_VARIANT='fastest' is not one of"):
        tuner.run((1,), _families(log))


def test_use_variant_forces_a_family_inside_its_block_only(monkeypatch):
    log = []
    tuner = _dispatch.VariantTuner("test_op3", timer=lambda fn: pytest.fail("nothing should be timed"))
    monkeypatch.setenv(_dispatch.VARIANT_ENV_VAR, "portable")
    with kernels.use_variant("hopper"):  # wins over the variable
        assert tuner.run((1,), _families(log)) == "h"
        with kernels.use_variant("portable"):
            assert tuner.run((1,), _families(log)) == "p"
        assert tuner.run((1,), _families(log)) == "h"
    assert tuner.run((1,), _families(log)) == "p"
    with pytest.raises(ValueError, match="pick one of"), kernels.use_variant("fastest"):
        pass
