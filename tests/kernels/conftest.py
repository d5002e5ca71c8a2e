"""Fixtures of the kernel tests."""
import importlib

import pytest
import torch
from kernel_numerics import DEVICE

from pycomm.kernels import _dispatch

_HOPPER_LAUNCHERS = [("flash_attention_tma", "attention_fwd_tma"), ("flash_attention_tma", "attention_bwd_tma"),
                     ("matmul_tma", "mm_tma")]


@pytest.fixture(params=[_dispatch.PORTABLE, _dispatch.HOPPER])
def variant(request, monkeypatch):
    """Forces a kernel family (PYCOMM_KERNEL_VARIANT); with the Hopper one, checks afterwards that
    one of its kernels really ran (where the device and Triton can run it)."""
    monkeypatch.setenv(_dispatch.VARIANT_ENV_VAR, request.param)
    ran = []
    for module, name in _HOPPER_LAUNCHERS:
        mod = importlib.import_module(f"pycomm.kernels.{module}")
        original = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _f=original, _n=name, **kw: (ran.append(_n), _f(*a, **kw))[1])
    yield request.param
    hopper_can_run = _dispatch.backend() != "torch" and _dispatch.hopper_capable(torch.empty(0, device=DEVICE))
    if request.param == _dispatch.HOPPER and hopper_can_run:
        assert ran, "PYCOMM_KERNEL_VARIANT=hopper but no Hopper kernel ran"
