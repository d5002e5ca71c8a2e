"""Another local user against a running job, and memory that breaks the protocol.

The attack these tests replay (README, "Security"): a second user on the host reads the
job's token from the rendezvous store (the TCP store has no authentication), creates
shared-memory segments under the names the ranks will use, with mode 0666 and a payload of
its own, and overwrites the store keys that used to carry segment names.  pycomm must never
map such a segment: the job either runs unaffected or fails with an error that says why,
and no rank crashes.  The intruder is a real second user, created with useradd; where that
is impossible (not root, no useradd) the tests say so and skip.
"""
from __future__ import annotations

import json
import mmap
import os
import pickle
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import pycomm
from pycomm import _rendezvous, distributed

INTRUDER = "pycomm-intruder"
# csrc/transport/shm.cpp's header: what an attacker who read the source would write.
MAGIC = 0x32306D6D6F637970  # "pycomm02" (csrc/transport/shm.cpp)


def _intruder() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("acting as a second local user needs root (to create it with useradd and "
                    "switch to it); run the suite as root to include these tests")
    try:
        return pwd.getpwnam(INTRUDER)
    except KeyError:
        pass
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed, so no second user can be created")
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    INTRUDER], check=True, capture_output=True)
    return pwd.getpwnam(INTRUDER)


def _as(user: pwd.struct_passwd, fn, *args, timeout: float = 60.0):
    """fn(*args) in a child process running as `user` (uid, gid, no supplementary groups);
    returns its result or re-raises its error as AssertionError."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            out = (True, fn(*args))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = (False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            code = 1
        try:
            with os.fdopen(w, "wb") as f:
                pickle.dump(out, f)
        finally:
            os._exit(code)
    os.close(w)
    deadline = time.monotonic() + timeout
    with os.fdopen(r, "rb") as f:
        while time.monotonic() < deadline:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.02)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the intruder did not finish within {timeout} s")
        ok, value = pickle.load(f)
    if not ok:
        raise AssertionError("intruder failed: " + value)
    return value


# ------------------------------------------------------------------------ the file store


def _try_read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except PermissionError as e:
        return f"refused: {e}"


def test_file_store_is_private_to_the_job_user():
    user = _intruder()
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)  # others may enter the folder: the file's own mode must protect it
        path = os.path.join(d, "store")
        store = _rendezvous.make_store(0, 1, f"file://{path}", timedelta(seconds=10))
        store.set("pycomm/0/token", "0123456789abcdef")
        assert os.stat(path).st_mode & 0o777 == 0o600
        seen = _as(user, _try_read, path)
        assert isinstance(seen, str) and seen.startswith("refused"), seen
        del store


def _plant_file(path):
    with open(path, "w") as f:
        f.write("")
    os.chmod(path, 0o666)


def test_file_store_planted_by_another_user_is_refused():
    user = _intruder()
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o1777)  # like /tmp: everyone may create files here
        path = os.path.join(d, "store")
        _as(user, _plant_file, path)
        with pytest.raises(PermissionError, match=f"owned by uid {user.pw_uid}.*mode 0666"):
            _rendezvous.make_store(0, 1, f"file://{path}", timedelta(seconds=10))


def test_file_store_in_a_missing_folder_fails_at_once():
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="does not exist"):
        pycomm.init_process_group(0, 1, init_method="file:///nonexistent-pycomm-dir/store",
                                  timeout=timedelta(seconds=3))
    assert time.monotonic() - t0 < 2


# ------------------------------------------------------------------------ segment injection

VICTIM = r"""
import json, os, sys, torch, pycomm
rank = int(os.environ["RANK"])
try:
    pycomm.init_process_group()
    t = torch.full((1000,), float(rank + 1))
    pycomm.all_reduce(t)
    out = {"ok": True, "values": sorted(set(t.tolist()))}
except Exception as e:
    out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
finally:
    pycomm.destroy_process_group()
print("RESULT " + json.dumps(out), flush=True)
"""


def _victim(rank: int, port: int) -> subprocess.Popen:
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="true", PYCOMM_TIMEOUT="15")
    return subprocess.Popen([sys.executable, "-c", VICTIM], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _result(p: subprocess.Popen) -> dict:
    out, _ = p.communicate(timeout=90)
    assert p.returncode >= 0, f"a rank died of signal {-p.returncode}:\n{out}"
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no result:\n{out}"
    return json.loads(lines[-1][len("RESULT "):])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _segment_bytes(slot_bytes=256 * 1024, slots=4, lanes=3, size=2):
    # csrc/transport/shm.cpp: header page, channels (128 B each), slots with 64-byte headers
    nch = size * lanes
    return 4096 + nch * 128 + nch * slots * (64 + slot_bytes)


def _inject(port: int, mode: str, garbage: bool):
    """As the intruder: read the job's token from its TCP store, then take the names both
    ranks will use ("names"), or take rank 1's and tell rank 0 through the store that it is
    ready ("peer"), or point the store keys that once carried segment names at a segment of
    our own ("keys").  Fills the segments with 1000.0 and a header that looks right (or
    random bytes, `garbage`)."""
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60),
                          use_libuv=True)
    store.wait(["pycomm/0/token"])
    token = store.get("pycomm/0/token").decode()
    names = {"names": [f"/pycomm-{token}-g0-r{r}" for r in (1, 0)],
             "peer": [f"/pycomm-{token}-g0-r1"],
             "keys": [f"/pycomm-{token}-evil-r1"]}[mode]
    nbytes = _segment_bytes()
    made = []
    for name in names:
        try:
            fd = os.open("/dev/shm" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
        except FileExistsError:
            continue  # the rank was faster
        os.fchmod(fd, 0o666)
        os.ftruncate(fd, nbytes)
        with mmap.mmap(fd, nbytes) as m:
            if garbage:
                m[:] = os.urandom(nbytes)
            else:
                m[:] = struct.pack("<f", 1000.0) * (nbytes // 4)
                rank = int(name.rsplit("-r", 1)[1])
                m[0:48] = struct.pack("<Qiiiiqqq", MAGIC, rank, 2, 3, 4, 256 * 1024, os.getpid(), 0)
                m[64:68] = b"\0\0\0\0"  # not aborted
        os.close(fd)
        made.append(name)
    if mode == "keys":
        for r in (0, 1):
            store.set(f"pycomm/0/g0/created/{r}", names[0])
    if mode == "peer":
        store.set("pycomm/0/g0/created/1", "1")
    return token, made


@pytest.mark.parametrize("mode,garbage", [("names", False), ("peer", False), ("peer", True),
                                          ("keys", False)])
def test_another_user_cannot_inject_into_a_job(mode, garbage):
    user = _intruder()
    port = _free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=90), use_libuv=True)
    planted = []
    rank0 = _victim(0, port)
    try:
        token, planted = _as(user, _inject, port, mode, garbage)
        rank1 = _victim(1, port)
        results = [_result(rank0), _result(rank1)]
    finally:
        for p in (rank0,):
            if p.poll() is None:
                p.kill()
        for name in planted:
            try:
                os.unlink("/dev/shm" + name)
            except FileNotFoundError:
                pass
        del master
    for r, res in enumerate(results):
        if res["ok"]:
            assert res["values"] == [3.0], f"rank {r} computed {res['values']}: data was injected"
        else:
            # A clear refusal that names the cause, never a wrong result or a crash.
            assert "CommError" in res["error"] or "CommTimeoutError" in res["error"], res
            assert ("owned by uid" in res["error"] or "exists already" in res["error"]
                    or "failed" in res["error"]), res
    if mode == "keys":
        # Names come from the token, not the store: the job does not even notice.
        assert all(res["ok"] for res in results), results
    else:
        assert planted, "the intruder was too late: the test did not test anything"
        assert not any(res["ok"] for res in results), results
        assert f"uid {user.pw_uid}" in results[1]["error"], results  # rank 1: name taken
        if mode == "peer":  # rank 0 was pointed at the planted segment and refused it
            assert "refusing rank 1's shared-memory segment" in results[0]["error"], results


# ------------------------------------------------------------------------ corrupted memory


def job_corrupt(what):
    g = distributed.group_or_world(None)
    t = torch.ones(100000)
    try:
        pycomm.all_reduce(t)  # healthy first (rank 0 may still be reading when rank 1 returns)
        if pycomm.get_rank() == 1:
            g.backends["cpu"].transport._corrupt_for_test(what)
            time.sleep(0.3)  # rank 0 waits, so it checks its peers (every 5 ms of a wait)
        pycomm.all_reduce(t)
        return ("ok", t[0].item())
    except pycomm.CommError as e:
        return ("CommError", str(e))


@pytest.mark.parametrize("what", ["counter", "pid", "abort"])
def test_corrupted_peer_memory_gives_an_error_naming_the_peer(run, what):
    results = run(2, job_corrupt, what, fresh=True, timeout=60, pg_timeout=10)
    kind, msg = results[0]
    assert kind == "CommError", results
    assert "rank 1" in msg, msg
    if what != "abort":
        assert "rank 1's shared memory corrupted" in msg, msg
    else:
        assert "x" * 100 in msg and len(msg) < 2000, msg[:200]
    assert results[1][0] == "CommError" or what == "pid", results


def _plant_stale(name):
    fd = os.open("/dev/shm" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, 4096)
    with mmap.mmap(fd, 4096) as m:  # a header whose process is long gone
        m[0:48] = struct.pack("<Qiiiiqqq", MAGIC, 0, 2, 3, 4, 256 * 1024, 2**22 + 12345, 0)
    os.close(fd)


def test_start_up_never_removes_another_users_segments():
    user = _intruder()
    name = "/pycomm-0000000000000bad-g0-r0"
    _as(user, _plant_stale, name)
    try:
        _rendezvous.reap_stale_segments()
        assert os.path.exists("/dev/shm" + name)
    finally:
        os.unlink("/dev/shm" + name)
