"""Work: the handle of an operation that may still be running (``async_op=True``).

One family for every transport.  A Work keeps the tensors its operation reads and writes
alive (and their storage) until the operation has finished, as torch.distributed does, so
dropping the handle early is safe.  ``result()`` is the operation's output tensors,
``get_future()`` a ``torch.futures.Future`` completed with them (DDP's comm hooks chain on
it), ``add_done_callback`` the hook the torch.distributed adapter completes its own Work
from.  Transports whose operations progress differently subclass it: posted messages on
shared memory (backends/shm.py), CUDA events (backends/cuda.py).
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from pycomm.errors import CommError, CommMismatchError, CommTimeoutError


class Work:
    """Handle of an asynchronous operation."""

    source_rank: int = -1
    """for a receive from any source: the rank the message came from, once completed"""

    def __init__(self, future: concurrent.futures.Future, keep=()):
        self._future = future
        self._keep = keep  # alive until the operation is done (see the module docstring)
        future.add_done_callback(self._release)

    def _release(self, _future) -> None:
        self._keep = ()

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the operation finished; re-raises its error.  The operation's own
        deadline (the group's timeout) bounds the wait; `timeout` (seconds) may shorten it,
        and raises TimeoutError if it expires first."""
        try:
            self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"pycomm: operation not complete within {timeout} s") from None
        return True

    def is_completed(self) -> bool:
        return self._future.done()

    def is_success(self) -> bool:
        return self._future.done() and self._future.exception() is None

    def exception(self) -> BaseException | None:
        return self._future.exception() if self._future.done() else None

    def result(self) -> list[torch.Tensor]:
        """The output tensors (after wait())."""
        out = self._future.result()
        return list(out) if isinstance(out, (list, tuple)) else ([] if out is None else [out])

    def add_done_callback(self, fn: Callable[[Work], None]) -> None:
        """fn(self) once the operation is done: at once if it is, else on the thread that
        completes it."""
        self._future.add_done_callback(lambda _f: fn(self))

    def get_future(self) -> torch.futures.Future:
        """A torch.futures.Future completed with result() (or failed with the error)."""
        fut: torch.futures.Future = torch.futures.Future()

        def done(w: Work):
            e = w.exception()
            if e is not None:
                fut.set_exception(e)
            else:
                fut.set_result(w.result())

        self.add_done_callback(done)
        return fut


_KINDS = {1: CommError, 2: CommTimeoutError, 3: CommMismatchError}


class QueuedWork(Work):
    """An operation on a group's in-order worker (pycomm._C.Worker), done when its
    Completion says so.  A Python job stores its result or its error here; a native job
    (a collective run without the GIL) reports through the Completion."""

    def __init__(self, keep=(), outputs=None):
        self._keep = keep  # alive until the operation is done
        self._ptrs = [(t, t.data_ptr(), t.numel()) for t in keep if isinstance(t, torch.Tensor)]
        self._outputs = outputs
        self._error: BaseException | None = None
        self._completion: Any = None  # set by Group.run right after submitting (a _C.Completion)

    def _done(self) -> bool:
        return self._completion is not None and self._completion.done()

    def wait(self, timeout: float | None = None) -> bool:
        if not self._completion.wait(-1.0 if timeout is None else timeout):
            raise TimeoutError(f"pycomm: operation not complete within {timeout} s")
        err = self.exception()
        if err is not None:
            raise err
        return True

    def is_completed(self) -> bool:
        return self._done()

    def is_success(self) -> bool:
        return self._done() and self.exception() is None

    def exception(self) -> BaseException | None:
        if not self._done():
            return None
        if self._error is None and self._completion.kind:
            self._error = _KINDS.get(self._completion.kind, RuntimeError)(self._completion.message)
        if self._error is None and any(t.data_ptr() != ptr or t.numel() != n for t, ptr, n in self._ptrs):
            self._error = storage_changed()
        self._ptrs = []
        return self._error

    def result(self) -> list[torch.Tensor]:
        self.wait()
        self._keep = ()
        out = self._outputs
        return list(out) if isinstance(out, (list, tuple)) else ([] if out is None else [out])

    def add_done_callback(self, fn: Callable[[Work], None]) -> None:
        self._completion.on_done(lambda: fn(self))


def storage_changed() -> ValueError:
    return ValueError(
        "pycomm: a tensor of this operation got new storage or a new size while the operation "
        "ran (set_(), resize_() or similar); the result went to the storage and shape it had "
        "when the operation was called. Do not change a tensor before its Work has completed")


def completed(outputs=(), error: BaseException | None = None) -> Work:
    """A Work that is already done."""
    f: concurrent.futures.Future = concurrent.futures.Future()
    if error is not None:
        f.set_exception(error)
    else:
        f.set_result(list(outputs))
    return Work(f)


class Driven(Work):
    """A Work whose operation moves only while someone drives it (posted messages):
    ``poll(slice_s)`` drives it for at most that long and says whether it is done.  Waiting
    drives it; a done-callback starts a thread that drives it to the end."""

    def __init__(self, keep=()):
        super().__init__(concurrent.futures.Future(), keep)
        self._driver: threading.Thread | None = None
        self._lock = threading.Lock()

    def poll(self, slice_s: float) -> bool:  # pragma: no cover - subclasses implement it
        raise NotImplementedError

    def _outputs(self) -> list[torch.Tensor]:
        return []

    def _drive(self, slice_s: float) -> bool:
        if self._future.done():
            return True
        try:
            done = self.poll(slice_s)
        except BaseException as e:  # noqa: BLE001 - delivered by wait()/result()
            self._settle(error=e)
            return True
        if done:
            self._settle()
        return done

    def _settle(self, error: BaseException | None = None) -> None:
        with self._lock:
            if self._future.done():
                return
            if error is not None:
                self._future.set_exception(error)
            else:
                self._future.set_result(self._outputs())

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._drive(0.005):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"pycomm: operation not complete within {timeout} s")
        self._future.result()
        return True

    def is_completed(self) -> bool:
        return self._drive(0.0)

    def is_success(self) -> bool:
        return self.is_completed() and self._future.exception() is None

    def exception(self) -> BaseException | None:
        return self._future.exception() if self.is_completed() else None

    def add_done_callback(self, fn: Callable[[Work], None]) -> None:
        super().add_done_callback(fn)
        with self._lock:
            if self._driver is None and not self._future.done():
                self._driver = threading.Thread(target=self._drive_to_end, daemon=True,
                                                name="pycomm-driver")
                self._driver.start()

    def _drive_to_end(self) -> None:
        while not self._drive(0.005):
            pass
