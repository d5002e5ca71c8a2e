"""The CUDA transports' failure paths that are plain logic, run on the CPU with stand-ins
(pycomm/backends/cuda.py): shutting down behind a dead peer, NCCL initialisation polled
against the timeout, and two-shot slices on 16-byte boundaries.  The C++ side of the same
fixes (group depth on error, the caller's device, abort during a call) runs on the mock NCCL
(test_nccl_mock.py)."""
import threading
import time

import pytest

from pycomm.backends import cuda
from pycomm.errors import CommTimeoutError


class Stream:
    def __init__(self, busy_for):
        self.until = time.monotonic() + busy_for

    def query(self):
        return time.monotonic() >= self.until


class Comm:
    def __init__(self, ready_after=None):
        self.calls, self.ready_after, self.polls = [], ready_after, 0

    def ready(self):
        self.polls += 1
        return self.ready_after is not None and self.polls > self.ready_after

    def abort(self):
        self.calls.append("abort")

    def close(self):
        self.calls.append("close")


def test_destroy_behind_a_dead_peer_returns_within_the_timeout_and_aborts():
    st = cuda._State(device=0, stream=Stream(busy_for=3600), nccl=Comm())
    seen_open = []
    # the watchdog must keep running while close() waits: `closed` is set only at the end
    watcher = threading.Thread(target=lambda: (time.sleep(0.1), seen_open.append(not st.closed)))
    watcher.start()
    start = time.monotonic()
    cuda.release(st, timeout=0.5)
    watcher.join()
    assert time.monotonic() - start < 3
    assert st.closed and seen_open == [True]
    assert st.nccl.calls == ["abort", "close"]


def test_destroy_of_an_idle_group_closes_without_aborting():
    st = cuda._State(device=0, stream=Stream(busy_for=0.05), nccl=Comm())
    cuda.release(st, timeout=5)
    assert st.closed and st.nccl.calls == ["close"]


def test_nccl_initialisation_times_out_naming_the_missing_rank():
    comm = Comm(ready_after=None)
    start = time.monotonic()
    with pytest.raises(CommTimeoutError, match=r"within 0\.3 s; ranks that never started it: rank 2\. Check"):
        cuda.wait_ready(comm, 0.3, lambda: [2])
    assert time.monotonic() - start < 3
    assert comm.calls == ["abort", "close"]


def test_nccl_initialisation_polled_until_ready():
    comm = Comm(ready_after=5)
    cuda.wait_ready(comm, 10, lambda: [])
    assert comm.polls == 6 and comm.calls == []


@pytest.mark.parametrize("es", [1, 2, 4, 8])
@pytest.mark.parametrize("parts", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("count", [0, 1, 7, 100, 1000, 4099])
def test_two_shot_slices_start_on_16_byte_boundaries(count, parts, es):
    chunks = cuda._chunks(count, parts, es)
    assert len(chunks) == parts
    assert chunks[0][0] == 0 and chunks[-1][1] == count
    for (a, b), (c, _) in zip(chunks, chunks[1:]):
        assert b == c and a <= b
    assert all(a * es % 16 == 0 for a, _ in chunks if a < count)
    # balanced: no slice is more than one 16-byte unit longer than another (for whole units)
    sizes = [b - a for a, b in chunks]
    if count >= parts * 16:
        assert max(sizes) - min(sizes) <= 16 // es + 16 // es


def test_ipc_needs_peer_access_between_distinct_gpus():
    no_access = lambda a, b: False  # noqa: E731
    assert cuda.ipc_reachable([0, 0, 0], no_access)  # one GPU shared: no peer access needed
    assert not cuda.ipc_reachable([0, 1], no_access)
    pairs = {(0, 1), (1, 0)}
    assert cuda.ipc_reachable([0, 1, 1, 0], lambda a, b: (a, b) in pairs)
    assert not cuda.ipc_reachable([0, 1, 2], lambda a, b: (a, b) in pairs)
