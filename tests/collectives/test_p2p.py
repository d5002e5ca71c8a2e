"""Point-to-point messages over shared memory: MPI's matching by (source, tag), receives from
any source, empty messages, size mismatches, dropped handles, dead and silent peers, what a
blocking send waits for, and the same through torch.distributed."""
import gc
import os
import re
import signal
import threading
import time
import weakref

import pytest
import torch
import world

import pycomm

SLOT = 256 * 1024 // 4  # float32 elements in one shared-memory slot (the default 256 KiB)
SMALL, LARGE = 16, 3 * SLOT + 5  # one piece; four pieces (every slot of the lane)


def _value(n: int, sender: int, tag: int, k: int = 0) -> torch.Tensor:
    """A message whose every element says who sent it, with which tag, and which one it was."""
    return torch.arange(n, dtype=torch.float32) + (sender * 1_000_000 + tag * 10_000 + k * 100)


# ------------------------------------------------------------------------ tags


def job_tags_out_of_order(n):
    # Every rank posts two messages of the same size to every other rank, tags 1 then 2, and
    # receives them in the other order.  Without matching by tag they arrive swapped.
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    sends = [pycomm.isend(_value(n, r, tag), peer, tag=tag)
             for peer in range(p) if peer != r for tag in (1, 2)]
    ok = []
    for peer in range(p):
        if peer == r:
            continue
        second, first = torch.empty(n), torch.empty(n)
        pycomm.recv(second, peer, tag=2)  # blocking: tag 1 is in the way on the lane
        pycomm.recv(first, peer, tag=1)
        ok.append(torch.equal(second, _value(n, peer, 2)) and torch.equal(first, _value(n, peer, 1)))
    for w in sends:
        w.wait()
    # Posted receives in the other order, both before either message arrives.
    peer = (r + 1) % p
    src = (r - 1) % p
    s = [pycomm.isend(_value(n, r, tag, 1), peer, tag=tag) for tag in (1, 2)]
    second, first = torch.empty(n), torch.empty(n)
    q2 = pycomm.irecv(second, src, tag=2)
    q1 = pycomm.irecv(first, src, tag=1)
    for w in (q1, q2, *s):
        w.wait()
    ok.append(torch.equal(second, _value(n, src, 2, 1)) and torch.equal(first, _value(n, src, 1, 1)))
    return ok


@pytest.mark.parametrize("size,n", [(2, SMALL), (2, LARGE), (3, SMALL), (3, LARGE)])
def test_tags_match_out_of_order(run, size, n):
    for r, ok in enumerate(run(size, job_tags_out_of_order, n, pg_timeout=20.0)):
        assert all(ok), (r, ok)


def job_many_tags(rounds, tags):
    # Rank 0 sends rounds x tags messages of varied sizes, round by round; rank 1 receives
    # them tag by tag (a shuffled order), each tag's messages in the order they were sent.
    r = pycomm.get_rank()
    sizes = {tag: 1 + (tag * 7919) % 3000 for tag in range(tags)}
    if r == 0:
        works = [pycomm.isend(_value(sizes[tag], 0, tag, k), 1, tag=tag)
                 for k in range(rounds) for tag in range(tags)]
        for w in works:
            w.wait()
        return True
    order = torch.randperm(tags, generator=torch.Generator().manual_seed(1)).tolist()
    good = 0
    for tag in order:
        for k in range(rounds):
            got = torch.empty(sizes[tag])
            pycomm.recv(got, 0, tag=tag)
            good += torch.equal(got, _value(sizes[tag], 0, tag, k))
    return good


def test_many_tags_interleaved_and_one_tag_in_order(run):
    assert run(2, job_many_tags, 3, 12, pg_timeout=20.0)[1] == 36


def job_receive_posted_while_its_message_arrives(n):
    # Rank 1 starts buffering rank 0's large message during an all_reduce (no receive is
    # posted yet), then posts the receive, which takes over the message: what arrived is
    # copied, the rest lands in place.
    r = pycomm.get_rank()
    t = torch.ones(1 << 20)
    if r == 0:
        w = pycomm.isend(_value(n, 0, 1), 1, tag=1)
        pycomm.all_reduce(t)
        w.wait()
        pycomm.barrier()
        return True
    pycomm.all_reduce(t)
    got = torch.empty(n)
    pycomm.recv(got, 0, tag=1)
    pycomm.barrier()
    return torch.equal(got, _value(n, 0, 1))


def test_receive_posted_while_its_message_is_being_buffered(run):
    assert run(2, job_receive_posted_while_its_message_arrives, 64 * SLOT, pg_timeout=20.0) == [True, True]


# ------------------------------------------------------------------------ any source


def job_any_source(n):
    # Ranks 1..p-1 send to rank 0 with tags 1 and 2, with collectives in between; rank 0
    # receives from any source, tag 2 first.  Every message arrives once, from its sender.
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    t = torch.full((1000,), float(r))
    if r != 0:
        w1 = pycomm.isend(_value(n, r, 1), 0, tag=1)
        pycomm.all_reduce(t)
        pycomm.send(_value(n, r, 2), 0, tag=2)
        pycomm.all_gather(torch.empty(p * 10), torch.full((10,), float(r)))
        w1.wait()
        pycomm.send(_value(n, r, 3), 0, tag=3)
        pycomm.barrier()
        return t[0].item()
    pycomm.all_reduce(t)
    seen = []
    for tag in (2, 1):
        for _ in range(p - 1):
            got = torch.empty(n)
            src = pycomm.recv(got, tag=tag)
            seen.append((tag, src, torch.equal(got, _value(n, src, tag))))
        if tag == 2:
            pycomm.all_gather(torch.empty(p * 10), torch.full((10,), 0.0))
    bufs = [torch.empty(n) for _ in range(p - 1)]
    works = [pycomm.irecv(b, tag=3) for b in bufs]
    for b, w in zip(bufs, works):
        w.wait()
        seen.append((3, w.source_rank, torch.equal(b, _value(n, w.source_rank, 3))))
    pycomm.barrier()
    return t[0].item(), seen


@pytest.mark.parametrize("size,n", [(3, SMALL), (3, LARGE)])
def test_receive_from_any_source(run, size, n):
    res = run(size, job_any_source, n, pg_timeout=20.0)
    total, seen = res[0]
    assert total == sum(range(size)) and all(x == total for x in res[1:])
    for tag in (1, 2, 3):
        got = sorted(src for t, src, _ in seen if t == tag)
        assert got == list(range(1, size)), (tag, seen)
    assert all(ok for _, _, ok in seen), seen


def job_any_source_fair(rounds):
    # Two senders keep sending to rank 0 with one tag; a receive from any source serves
    # them in turn rather than draining one sender first.
    r = pycomm.get_rank()
    if r != 0:
        works = [pycomm.isend(_value(4, r, 5, k), 0, tag=5) for k in range(rounds)]
        for w in works:
            w.wait()
        pycomm.barrier()
        return None
    order = []
    for _ in range(2 * rounds):
        got = torch.empty(4)
        src = pycomm.recv(got, tag=5)
        k = int((got[0].item() - _value(4, src, 5)[0].item()) / 100)
        order.append((src, k))
    pycomm.barrier()
    return order


def test_receive_from_any_source_keeps_each_senders_order(run):
    order = run(3, job_any_source_fair, 5, pg_timeout=20.0)[0]
    for src in (1, 2):
        assert [k for s, k in order if s == src] == list(range(5)), order


# ------------------------------------------------------------------------ empty messages


def job_empty_messages():
    r = pycomm.get_rank()
    if r == 0:
        pycomm.send(torch.empty(0), 1, tag=5)
        pycomm.send(torch.arange(4.0), 1, tag=6)
        pycomm.send(torch.empty(0, dtype=torch.int64), 1, tag=7)
        pycomm.send(torch.empty(0), 1, tag=8)
        pycomm.barrier()
        return None
    four = torch.empty(4)
    order = []
    q7 = pycomm.irecv(torch.empty(0, dtype=torch.int64), 0, tag=7)
    q6 = pycomm.irecv(four, 0, tag=6)
    q5 = pycomm.irecv(torch.empty(0), 0, tag=5)
    for name, w in (("7", q7), ("6", q6), ("5", q5)):
        w.wait()
        order.append(name)
    src = pycomm.recv(torch.empty(0), tag=8)
    pycomm.barrier()
    return order, four.tolist(), src


def test_empty_messages_match_by_tag(run):
    order, four, src = run(2, job_empty_messages, pg_timeout=20.0)[1]
    assert order == ["7", "6", "5"] and four == [0.0, 1.0, 2.0, 3.0] and src == 0


def job_empty_chunks_of_collectives():
    # Collectives whose chunks are empty on some ranks keep working next to messages.
    r, p = pycomm.get_rank(), pycomm.get_world_size()
    t = torch.full((2,), float(r + 1))  # fewer elements than ranks: empty ring chunks
    w = pycomm.isend(torch.empty(0), (r + 1) % p, tag=1)
    pycomm.all_reduce(t, algorithm="ring")
    pycomm.recv(torch.empty(0), (r - 1) % p, tag=1)
    w.wait()
    out = torch.empty(0)
    pycomm.all_gather(out, torch.empty(0))
    return t.tolist()


def test_empty_collective_chunks_next_to_messages(run):
    for got in run(3, job_empty_chunks_of_collectives, pg_timeout=20.0):
        assert got == [6.0, 6.0]


# ------------------------------------------------------------------------ size mismatch


def job_size_mismatch():
    r = pycomm.get_rank()
    if r == 0:
        pycomm.send(torch.ones(10), 1, tag=3)  # 40 bytes: eager, returns at once
        after = world.catch(pycomm.barrier)
    else:
        start = time.monotonic()
        first = world.catch(lambda: pycomm.recv(torch.ones(20), 0, tag=3))
        return first, time.monotonic() - start, world.catch(lambda: pycomm.all_reduce(torch.ones(3)))
    return after


def test_size_mismatch_names_sizes_peer_and_tag(run):
    sender, (first, elapsed, later) = run(2, job_size_mismatch, pg_timeout=10.0, fresh=True)
    etype, msg = first
    assert etype == "CommMismatchError", first
    assert "send/recv" in msg and "80 bytes" in msg and "40 bytes" in msg, msg
    assert "rank 0" in msg and "tag 3" in msg, msg
    assert elapsed < 2.0
    # As documented: the group is unusable after the error, and the sender learns why.
    assert later[0] == "CommError" and "failed earlier" in later[1], later
    assert sender[0] == "CommError" and "rank 1 failed" in sender[1] and "80 bytes" in sender[1], sender


# ------------------------------------------------------------------------ dropped handles


def job_dropped_work(n):
    r = pycomm.get_rank()
    if r == 0:
        w = pycomm.isend(torch.full((n,), 7.0), 1, tag=1)  # dropped before anything moved
        del w
        w = pycomm.isend(torch.full((n,), 8.0), 1, tag=2)
        del w
        gc.collect()
        junk = [torch.full((n,), -1.0) for _ in range(8)]
        pycomm.barrier()
        pycomm.send(torch.full((n,), 9.0), 1, tag=3)
        pycomm.barrier()
        return all(bool((j == -1.0).all()) for j in junk)
    kept = torch.zeros(n)
    w = pycomm.irecv(kept, 0, tag=1)  # the handle goes, the tensor stays
    del w
    lost = torch.zeros(n)
    ref = weakref.ref(lost)
    w = pycomm.irecv(lost, 0, tag=2)  # both go
    del w, lost
    gc.collect()
    alive_before = ref() is not None
    others = [torch.zeros(n) for _ in range(8)]
    pycomm.barrier()
    last = torch.zeros(n)
    pycomm.recv(last, 0, tag=3)  # the earlier messages are ahead of it on the lane
    gc.collect()
    alive_after = ref() is not None
    pycomm.barrier()
    return {"kept": bool((kept == 7.0).all()), "last": bool((last == 9.0).all()),
            "others_untouched": all(bool((o == 0.0).all()) for o in others),
            "kept_alive_in_flight": alive_before, "released_after": not alive_after}


@pytest.mark.parametrize("n", [1000, LARGE])
def test_dropped_work_keeps_buffers_until_the_message_completes(run, n):
    sender, receiver = run(2, job_dropped_work, n, pg_timeout=20.0)
    assert sender is True
    assert receiver == {"kept": True, "last": True, "others_untouched": True,
                        "kept_alive_in_flight": True, "released_after": True}, receiver


# ------------------------------------------------------------------------ what send waits for


def job_send_returns_when_the_buffer_is_free(n, delay):
    r = pycomm.get_rank()
    pycomm.barrier()
    if r == 0:
        buf = _value(n, 0, 1)
        start = time.monotonic()
        pycomm.send(buf, 1, tag=1)
        took = time.monotonic() - start
        buf.fill_(-1.0)  # the send has returned: the buffer may be reused
        pycomm.barrier()
        return took
    time.sleep(delay)  # the receive is posted late
    got = torch.empty(n)
    pycomm.recv(got, 0, tag=1)
    pycomm.barrier()
    return torch.equal(got, _value(n, 0, 1))


def test_small_send_returns_before_the_receive_is_posted(run):
    took, ok = run(2, job_send_returns_when_the_buffer_is_free, SMALL, 1.0, pg_timeout=20.0)
    assert ok and took < 0.5, took


def test_large_send_returns_once_the_peer_took_what_did_not_fit(run):
    # 8 slots' worth: the first 4 fit in the lane's slots, the rest wait for the receiver.
    took, ok = run(2, job_send_returns_when_the_buffer_is_free, 8 * SLOT, 1.0, pg_timeout=20.0)
    assert ok and took > 0.5, took


# ------------------------------------------------------------------------ torch.distributed


def job_torch_tags_and_any_source():
    dist = world.gloo()
    g = world.torch_group("pycomm")
    r, p = dist.get_rank(), dist.get_world_size()
    out = {}
    if r == 0:
        a, b = torch.empty(SMALL), torch.empty(SMALL)
        q2 = dist.irecv(b, 1, group=g, tag=2)
        q1 = dist.irecv(a, 1, group=g, tag=1)
        q2.wait()
        q1.wait()
        out["tags"] = torch.equal(a, _value(SMALL, 1, 1)) and torch.equal(b, _value(SMALL, 1, 2))
        sources = []
        for _ in range(p - 1):
            got = torch.empty(SMALL)
            src = dist.recv(got, group=g, tag=3)
            sources.append((src, torch.equal(got, _value(SMALL, src, 3))))
        got = torch.empty(SMALL)
        w = dist.irecv(got, group=g, tag=4)
        w.wait()
        sources.append((w._source_rank(), torch.equal(got, _value(SMALL, 2, 4))))
        out["sources"] = sources
    else:
        if r == 1:
            s = [dist.isend(_value(SMALL, 1, tag), 0, group=g, tag=tag) for tag in (1, 2)]
            for w in s:
                w.wait()
        dist.send(_value(SMALL, r, 3), 0, group=g, tag=3)
        if r == 2:
            dist.send(_value(SMALL, 2, 4), 0, group=g, tag=4)
    dist.barrier(group=g)
    return out


def test_torch_distributed_tags_and_receive_from_any_source(run):
    out = run(3, job_torch_tags_and_any_source, timeout=90)[0]
    assert out["tags"] is True
    assert sorted(out["sources"][:2]) == [(1, True), (2, True)], out
    assert out["sources"][2] == (2, True), out


# ------------------------------------------------------------------------ dead and silent peers


def job_recv_from_silent_peer(delay):
    r = pycomm.get_rank()
    pycomm.barrier()
    if r == 1:
        time.sleep(delay)
        return world.catch(pycomm.barrier)
    start = time.monotonic()
    err = world.catch(lambda: pycomm.recv(torch.empty(100), 1, tag=4))
    return err, time.monotonic() - start


def test_blocking_recv_times_out_saying_how_long_it_waited(run):
    (err, elapsed), late = run(2, job_recv_from_silent_peer, 2.0, pg_timeout=0.7, fresh=True)
    etype, msg = err
    assert etype == "CommTimeoutError", msg
    assert "recv from rank 1" in msg and "tag 4" in msg and "400 bytes" in msg, msg
    assert "waiting for rank 1" in msg, msg
    said = float(re.search(r"timed out after ([0-9.]+) s", msg).group(1))
    assert 0.65 < said < 1.5 and abs(said - elapsed) < 0.2, (said, elapsed, msg)
    # The silent peer learns that rank 0 gave up.
    assert late[0] == "CommError" and "rank 0 failed" in late[1], late


def job_recv_any_times_out():
    r = pycomm.get_rank()
    pycomm.barrier()
    if r == 0:
        return world.catch(lambda: pycomm.recv(torch.empty(3), tag=9))
    time.sleep(1.5)
    return world.catch(pycomm.barrier)


def test_recv_from_any_source_times_out_naming_the_tag(run):
    res = run(2, job_recv_any_times_out, pg_timeout=0.5, fresh=True)
    etype, msg = res[0]
    assert etype == "CommTimeoutError" and "any rank" in msg and "tag 9" in msg, msg


def job_recv_from_dying_peer():
    r = pycomm.get_rank()
    pycomm.barrier()
    if r == 1:
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
        time.sleep(30)
    start = time.monotonic()
    err = world.catch(lambda: pycomm.recv(torch.empty(100), 1, tag=4))
    return err, time.monotonic() - start


def test_blocking_recv_from_a_dead_peer_fails_promptly(run):
    # Last in this file: the pool restarts after a rank died.  Rank 2 waits for rank 1 too.
    results = run(3, job_recv_from_dying_peer, pg_timeout=15.0, fresh=True, may_die=[1], timeout=60)
    for r, res in enumerate(results):
        if r == 1:
            continue
        (etype, msg), elapsed = res
        assert etype == "CommError" and "rank 1" in msg and "exited" in msg, msg
        assert elapsed < 2.0, f"took {elapsed:.2f} s: {msg}"
    assert world.segments() == []


def job_message_posted_while_an_async_collective_waits(n):
    # Rank 0 starts an async all_reduce, then sends; rank 1 joins the all_reduce only after
    # it has the message.  Posting must not wait for the collective (which waits for rank 1).
    r = pycomm.get_rank()
    t = torch.full((n,), float(r + 1))
    x = torch.empty(n)
    if r == 0:
        w = pycomm.all_reduce(t, async_op=True)
        time.sleep(0.05)  # the all_reduce is running (and waiting) on the worker by now
        pycomm.send(torch.full((n,), 7.0), 1)
        w.wait(timeout=20)
    else:
        pycomm.recv(x, 0)
        pycomm.all_reduce(t)
    return t[0].item(), (x[0].item() if r == 1 else None)


@pytest.mark.parametrize("n", [4, 300_000])  # one piece; more than the lane's slots hold
def test_a_message_posted_during_an_async_collective_reaches_its_peer(run, n):
    results = run(2, job_message_posted_while_an_async_collective_waits, n, pg_timeout=30, timeout=90)
    assert results == [(3.0, None), (3.0, 7.0)], results
