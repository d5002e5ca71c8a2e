"""The CUDA library as a machine without a GPU sees it: built (CI compiles it with nvcc,
PYCOMM_CUDA=1), loadable, every entry point present, and honest about why it cannot run."""
import pytest

import pycomm
from pycomm import _cuda

_needs_lib = pytest.mark.skipif(
    not _cuda.built(), reason="pycomm was built without CUDA (no nvcc or NCCL at build time)")


@_needs_lib
def test_library_loads_with_every_entry_point():
    lib = _cuda._load()  # resolves every symbol of pycomm_cuda.h: a stale build fails here
    assert all(hasattr(lib, name) for name in _cuda._SIGNATURES)
    v = _cuda.versions()
    assert v["cuda_runtime"] >= 12000 and v["nccl"] >= 21800, v


@_needs_lib
def test_status_says_why_cuda_cannot_run(monkeypatch):
    import torch

    ok, why = _cuda.status()
    if torch.cuda.is_available():
        assert ok, why
        return
    assert not ok and ("driver" in why or "device" in why), why
    with pytest.raises(_cuda.CudaUnavailable, match="CUDA tensors need the CUDA transports"):
        _cuda.require()


@_needs_lib
def test_errors_come_back_as_messages():
    # Without a driver every CUDA call fails; the message must name the call.
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: this checks the no-driver path")
    with pytest.raises(pycomm.CommError, match="cudaGetDeviceCount"):
        _cuda._call("pycomm_cuda_device_count", _cuda.ctypes.byref(_cuda._I()))
    with pytest.raises(pycomm.CommError, match="unknown dtype code 10"):  # 9 is bool
        _cuda.reduce(0, 0, 0, 1, 10, 0, 0)


def job_device_errors():
    import torch

    msgs = []
    for call in (lambda: pycomm.all_reduce(torch.ones(4, device="meta")),
                 lambda: pycomm.all_gather(torch.empty(4, device="meta"), torch.ones(4))):
        try:
            call()
            msgs.append("accepted")
        except ValueError as e:
            msgs.append(str(e))
    return msgs


def test_tensors_on_other_devices_are_refused(run):
    meta, mixed = run(1, job_device_errors)[0]
    assert "is on meta" in meta and "CUDA tensor" in meta, meta
    assert "is on meta" in mixed, mixed
