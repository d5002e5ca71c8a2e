"""Ordinary misuse: never a silent wrong result, a crash or a wait past the timeout.

Each case was reproduced against an earlier pycomm (a wrong result, a SIGSEGV or a hang) and
is checked here on both ranks.
"""
import datetime
import socket
import subprocess
import sys
import time

import pytest
import torch
import world

import pycomm


def _catch(fn):
    try:
        return ("ok", fn())
    except Exception as e:  # noqa: BLE001 - the test looks at the type and the message
        return (type(e).__name__, str(e))


# ------------------------------------------------------------------------ storage changes


def job_storage_changes(how, dtype):
    # bfloat16: a Python job on the worker; float32: native.  Large enough (16-32 MiB, tens of
    # milliseconds on 2 cores) that the change below comes while the operation still runs.
    t = torch.ones(1 << 23, dtype=dtype)
    w = pycomm.all_reduce(t, async_op=True)
    if how == "set_":
        changed = _catch(lambda: t.set_(torch.zeros(10, dtype=dtype)))
    else:
        changed = _catch(lambda: t.resize_(1 << 24))  # larger: the storage would move
    out = _catch(w.wait)
    pycomm.barrier()
    after = _catch(lambda: t.resize_(1 << 21)) if how == "resize_" else None  # free again
    return changed[0], out, after


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_set_during_an_async_collective_is_an_error_not_a_crash(run, dtype):
    for changed, (kind, msg), _ in run(2, job_storage_changes, "set_", dtype):
        assert changed == "ok"
        assert kind == "ValueError" and "new storage or a new size" in msg, (kind, msg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resize_during_an_async_collective_is_refused(run, dtype):
    for changed, out, after in run(2, job_storage_changes, "resize_", dtype):
        assert changed == "RuntimeError"  # torch: "Trying to resize storage that is not resizable"
        # torch's failed resize_ leaves the tensor claiming the new size: the Work says so
        assert out[0] == "ValueError" and "new size" in out[1], out
        assert after[0] == "ok"  # and the storage is resizable again


# ------------------------------------------------------------------------ mismatched calls


def job_mismatch(case):
    r = pycomm.get_rank()
    t = torch.ones(8)
    if case == "sum vs avg":
        fn = lambda: pycomm.all_reduce(t, op="sum" if r == 0 else "avg")
    elif case == "roots":
        fn = lambda: pycomm.broadcast(t, src=r)
    else:  # "empty vs not"
        fn = lambda: pycomm.all_reduce(torch.ones(0 if r == 0 else 10))
    start = time.monotonic()
    out = _catch(fn)
    return out[0], out[1], time.monotonic() - start


@pytest.mark.parametrize("case", ["sum vs avg", "roots", "empty vs not"])
def test_mismatched_calls_fail_on_every_rank(run, case):
    results = run(2, job_mismatch, case, fresh=True, pg_timeout=20)
    for kind, msg, elapsed in results:
        # the rank that finds it raises CommMismatchError; a peer it stops may be told so
        # through the group (CommError, "... failed: pycomm: mismatched collectives ...")
        assert kind in ("CommMismatchError", "CommError"), results
        assert "mismatched" in msg, msg
        assert elapsed < 10, results
    assert any(kind == "CommMismatchError" for kind, _, _ in results), results


# ------------------------------------------------------------------------ ranks and timeouts


def job_bad_roots():
    dist = world.gloo()
    g = world.torch_group("pycomm")
    t = torch.ones(4)
    return {
        "huge src": _catch(lambda: dist.broadcast(t, src=2**32 + 1, group=g, group_src=None)),
        "pycomm huge src": _catch(lambda: pycomm.broadcast(t, src=2**32 + 1)),
        "negative dst": _catch(lambda: pycomm.reduce(t, dst=-1)),
        "bool root": _catch(lambda: pycomm.gather(None, t, dst=True)),
    }


def test_roots_are_range_checked_before_anything_narrows_them(run):
    for res in run(2, job_bad_roots):
        for name, (kind, msg) in res.items():
            assert kind in ("ValueError", "RuntimeError"), (name, kind, msg)
            assert kind == "ValueError" or "rank" in msg.lower(), (name, kind, msg)


def test_timeouts_beyond_the_clock_are_clamped(tmp_path):
    g = pycomm.init_process_group(0, 1, init_method=f"file://{tmp_path}/s",
                                  timeout=datetime.timedelta(days=365 * 300))
    try:
        t = torch.ones(3)
        pycomm.all_reduce(t)
        assert t.tolist() == [1.0] * 3
        assert g.timeout <= 365 * 100 * 86400 + 1
    finally:
        pycomm.destroy_process_group()


def test_negated_and_conjugated_views_are_refused(tmp_path):
    pycomm.init_process_group(0, 1, init_method=f"file://{tmp_path}/s")
    try:
        x = torch.arange(4.0)
        with pytest.raises(ValueError, match="resolve_neg"):
            pycomm.all_reduce(torch._neg_view(x), op="max")
        with pytest.raises(ValueError, match="resolve_conj"):
            pycomm.all_reduce(torch.ones(2, dtype=torch.complex64).conj())
        assert x.tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        pycomm.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_store_start_up_names_the_rank_that_never_came():
    port = _free_port()
    code = (f"import datetime, pycomm\n"
            f"pycomm.init_process_group(0, 3, init_method='tcp://127.0.0.1:{port}', "
            f"timeout=datetime.timedelta(seconds=3))\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "CommTimeoutError" in proc.stderr and "rank 1, rank 2" in proc.stderr, proc.stderr[-2000:]
    assert elapsed < 30, elapsed


def job_mismatched_shm_settings():
    r = pycomm.get_rank()
    with world.scoped_env(PYCOMM_SHM_SLOT_BYTES=65536 if r == 0 else 131072):
        try:
            world.restart(timeout=10)
        except Exception as e:  # noqa: BLE001 - reported to the test
            return type(e).__name__, str(e)
    return None, "started"


def test_mismatched_shm_settings_are_named_on_every_rank(run):
    # Issue 16: ranks started with different PYCOMM_SHM_* settings got a misleading error.
    for etype, msg in run(2, job_mismatched_shm_settings, fresh=True):
        assert etype is not None, msg
        assert "PYCOMM_SHM_SLOT_BYTES=" in msg and "every rank must use the same PYCOMM_SHM_* settings" in msg, msg
