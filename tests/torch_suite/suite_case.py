"""torch's own distributed test suite, as torch's test/distributed/test_distributed_spawn.py
runs it, for BACKEND=pycomm and BACKEND=gloo alike: the test case class that runner.py
loads (one process per backend and world size, since torch reads both at import).

Selection: pycomm runs exactly the tests that gloo runs
---------------------------------------------------------
torch decides most skips when it imports distributed_test.py, from the BACKEND it reads
then: ``skip_but_pass_in_sandcastle_if(BACKEND != "gloo", ...)``, ``BACKEND in
DistTestCases.skip_collective[...]`` / ``backend_feature[...]``,
``require_backend_is_available({"gloo"})``.  Left alone, BACKEND=pycomm would skip 119 tests
at import that gloo does not skip, 26 of which gloo runs on a machine without a GPU (sparse
all_reduce, all_reduce_coalesced, barrier timeouts, batched and tagged p2p, object collectives,
monitored barriers, DDP on CPU); the others need GPUs.
So this module imports distributed_test.py with BACKEND=gloo, which evaluates every
import-time decorator exactly as for gloo, and only then points the module's BACKEND at the
backend under test, before any test runs.  ``_run`` (each rank's start-up) and the test bodies
read that module-global at run time, so the process group is the backend under test
(``init_process_group(backend=BACKEND)``, and the bodies' re-initialisations), and checks like
``dist.get_backend() == BACKEND`` compare pycomm with pycomm.  For gloo nothing changes.

Run-time skips (GPU counts, world sizes) are decorators that run inside the test and do not
look at the backend, except for "mpi", so they apply to both alike.

What the bodies decide at run time from the backend's name, and what this module does:

- ``PROFILING_SUPPORTED_BACKENDS``, ``CUDA_PROFILING_SUPPORTED_BACKENDS`` and
  ``SEND_RECV_PROFILING_SUPPORTED_BACKENDS`` list gloo; a body checks the profiler's events
  ("<backend>:all_reduce", ...) only for backends listed.  The backend under test is added
  wherever gloo is, so pycomm's profiling is checked as gloo's is.
- ``DistTestCases.skip_collective`` / ``backend_feature``: the backend under test is put in
  exactly the sets gloo is in (they are read at import, so this changes nothing there, but a
  body or helper that consults them later sees the same answer as for gloo).
- ``_test_accumulate_gradients_no_sync`` picks its model with ``if BACKEND == "mpi" or
  BACKEND == "gloo"`` (CPU) / ``if BACKEND == "nccl"`` (CUDA); for any other name it picks
  neither and fails with a NameError.  It is the one body that branches on the module's
  BACKEND towards gloo (the others test for "nccl"/"mpi", which pycomm is not, as gloo is not):
  it runs with BACKEND read as "gloo", i.e. on the CPU model, over the process group already
  built with the backend under test.
- ``ddp_logging_data["backend_name"]`` is ProcessGroup::getBackendName(), which torch writes
  as "custom" for every plugin backend; the gloo-only fields after it are read only when it
  says "gloo".  Nothing to adapt: the check against dist.get_backend() fails for any plugin
  (README: what torch blocks).

Processes: torch's runner spawns each rank ("spawn": a fresh interpreter that imports torch,
about 17 s per test on the 2-core CI machine).  runner.py forks them by default
(``--start-method spawn`` for torch's way), after this module is imported: about 1 s per test,
and every test body runs the same way (14 tests of every kind, run both ways for both backends,
had the same outcomes).  A forked rank re-reads INIT_METHOD, which torch's per-test set-up sets in the
environment and a spawned rank would read when it imports the module.

Timeouts: DISTRIBUTED_TESTS_DEFAULT_TIMEOUT (torch's per-test limit, read at import; runner.py
sets it) ends a hung test: its ranks are killed and it fails.
"""
from __future__ import annotations

import os

_BACKEND = os.environ["BACKEND"]  # the backend under test
if _BACKEND == "pycomm":
    import pycomm  # noqa: F401  (registers the "pycomm" backend)

os.environ["BACKEND"] = "gloo"  # import-time decorators: evaluated as for gloo
try:
    import torch
    import torch.distributed as dist
    from torch.testing._internal import common_distributed
    from torch.testing._internal.common_distributed import DistTestCases
    from torch.testing._internal.distributed import distributed_test as dt
    from torch.testing._internal.distributed.distributed_test import DistributedTest, TestDistBackend
finally:
    os.environ["BACKEND"] = _BACKEND

dt.BACKEND = _BACKEND

if _BACKEND != "gloo":
    for _name in ("PROFILING_SUPPORTED_BACKENDS", "CUDA_PROFILING_SUPPORTED_BACKENDS",
                  "SEND_RECV_PROFILING_SUPPORTED_BACKENDS"):
        _lst = getattr(dt, _name)
        if dist.Backend.GLOO in _lst and _BACKEND not in _lst:
            _lst.append(_BACKEND)
    for _table in (DistTestCases.skip_collective, DistTestCases.backend_feature):
        for _backends in _table.values():
            if "gloo" in _backends:
                _backends.add(_BACKEND)

START_METHOD = os.environ.get("PYCOMM_TORCH_SUITE_START", "fork")


class TestDistBackendWithSpawn(TestDistBackend, DistributedTest._DistTestBase):
    """test/distributed/test_distributed_spawn.py's class."""

    def setUp(self):
        super().setUp()
        if START_METHOD == "spawn":
            self._spawn_processes()
        else:
            self._start_processes(torch.multiprocessing.get_context(START_METHOD).Process)
        torch.backends.cudnn.flags(enabled=True, allow_tf32=False).__enter__()

    @classmethod
    def _run(cls, rank, test_name, file_name, pipe, **kwargs):
        # What a spawned rank reads when it imports distributed_test (set by this test's setUp).
        dt.INIT_METHOD = os.getenv("INIT_METHOD", "env://")
        super()._run(rank, test_name, file_name, pipe, **kwargs)

    def _test_accumulate_gradients_no_sync(self, *args, **kwargs):
        # The body's CPU branch is spelled `BACKEND == "gloo"` (see the module docstring).
        saved, dt.BACKEND = dt.BACKEND, "gloo"
        try:
            return super()._test_accumulate_gradients_no_sync(*args, **kwargs)
        finally:
            dt.BACKEND = saved


def all_tests() -> list[str]:
    """Every test of the suite, in name order (as unittest's loader lists them)."""
    return sorted(n for n in dir(TestDistBackendWithSpawn) if n.startswith("test_"))


__all__ = ["TestDistBackendWithSpawn", "all_tests", "common_distributed"]
