"""The NCCL transport's schedule, checked on the CPU.

csrc/algorithms/rounds.cpp cuts every rank's plan into bulk-synchronous rounds that the
NCCL transport launches as ncclGroupStart/End groups.  Here the rounds of all ranks are
replayed with NCCL's semantics (within a group every send meets the receive the peer
posted in the same order on that channel; a group ends when all its messages have
moved; reductions run after the group) on numpy buffers, so a schedule that would
deadlock, race or compute the wrong result fails without a GPU.
"""
import numpy as np
import pytest

from pycomm import _C

SEND, RECV_COPY, RECV_REDUCE = 0, 1, 2
COLLS = {"all_reduce": 0, "reduce_scatter": 1, "all_gather": 2, "broadcast": 3, "reduce": 6,
         "gather": 7, "scatter": 8, "all_to_all": 9}
ALGOS = {"ring": 0, "tree": 1, "pairwise": 3, "exchange": 4}
UNTOUCHED = -7777  # what a rank's output holds where the collective must not write


def replay(coll, algo, size, count, piece_bytes, in_place, root=0, dtype=np.int64, combine=None):
    """`combine(a, b)`: the reduction, a the first operand (default a + b); any other
    combine only checks that every rank ends with the same result."""
    es = np.dtype(dtype).itemsize
    in_place = in_place or coll == "broadcast"  # broadcast has one buffer
    ranks = _C.schedule_rounds(COLLS[coll], ALGOS[algo], size, count, es, root, piece_bytes, in_place)
    n_in = {"reduce_scatter": size * count, "scatter": size * count,
            "all_to_all": size * count}.get(coll, count)
    n_out = {"reduce_scatter": count, "scatter": count, "all_gather": size * count,
             "gather": size * count, "all_to_all": size * count}.get(coll, count)
    rng = np.random.default_rng(count * 131 + size)
    inputs = [rng.integers(-1000, 1000, n_in).astype(dtype) for _ in range(size)]
    bufs = []
    for r in range(size):
        out = np.full(max(n_out, n_in if in_place else 0), UNTOUCHED, dtype)
        # Scratch exactly as large as the collective's row asks (a plan that reaches past
        # it fails the bounds check in view()).
        b = {1: inputs[r].copy().view(np.uint8), 2: out.view(np.uint8),
             3: np.zeros(ranks[r]["plan_scratch_bytes"], np.uint8)}
        if in_place:  # the input is the output buffer (or its own chunk of it)
            if coll in ("reduce_scatter", "scatter"):
                b[2] = b[1]  # out = in + rank * count: offsets already carry the rank
            elif coll in ("all_gather", "gather"):
                b[2][r * count * es:(r + 1) * count * es] = b[1]
                b[1] = b[2]
            else:
                b[2][:] = b[1]
                b[1] = b[2]
        bufs.append(b)
    before = [b[2].copy() for b in bufs]  # what a rank with no result must still hold

    def view(r, where, nbytes):
        buf, off = where
        assert off + nbytes <= bufs[r][buf].size, f"rank {r} reads past buffer {buf}"
        return bufs[r][buf][off:off + nbytes]

    for r, plan in enumerate(ranks):
        for dst, src, nbytes in plan["copies"]:
            view(r, dst, nbytes)[:] = view(r, src, nbytes).copy()

    # Channel sequence numbers: the k-th message from a to b on a lane meets the k-th receive.
    seq = []
    for r, plan in enumerate(ranks):
        counters, mine = {}, []
        for round_ in plan["rounds"]:
            s = []
            for kind, peer, lane, *_ in round_:
                key = (kind == SEND, peer, lane)
                s.append(counters.get(key, 0))
                counters[key] = s[-1] + 1
            mine.append(s)
        seq.append(mine)

    idx = [0] * size
    moved = [set() for _ in range(size)]
    scratch = [None] * size
    while any(idx[r] < len(ranks[r]["rounds"]) for r in range(size)):
        progress = False
        for r in range(size):
            if idx[r] >= len(ranks[r]["rounds"]):
                continue
            round_ = ranks[r]["rounds"][idx[r]]
            if scratch[r] is None:
                need = max([o[6] + o[5] for o in round_ if o[0] == RECV_REDUCE], default=0)
                scratch[r] = np.zeros(need, np.uint8)  # the rank posts this round's group
                progress = True
                # No byte is written by this round's receives and also read or written by
                # another of its messages (they run concurrently inside one group).
                written, read = [], []
                for kind, peer, lane, src, dst, nbytes, *_ in round_:
                    if kind == SEND:
                        read.append((src[0], src[1], nbytes))
                    else:
                        written.append((dst[0], dst[1], nbytes))
                        if kind == RECV_REDUCE and src != dst:  # in place: element-wise, fine
                            read.append((src[0], src[1], nbytes))
                ranges = written + read
                for a, (bw, ow, nw) in enumerate(written):
                    for b, (br, orr, nr) in enumerate(ranges):
                        if a != b and bw == br:
                            assert ow + nw <= orr or orr + nr <= ow, f"rank {r} round {idx[r]}: race"
            for i, (kind, peer, lane, src, dst, nbytes, soff, _) in enumerate(round_):
                if kind != SEND or i in moved[r] or idx[peer] >= len(ranks[peer]["rounds"]):
                    continue
                theirs = ranks[peer]["rounds"][idx[peer]]
                for j, (k2, p2, l2, s2, d2, n2, so2, _) in enumerate(theirs):
                    if k2 != SEND and p2 == r and l2 == lane and seq[peer][idx[peer]][j] == seq[r][idx[r]][i]:
                        assert n2 == nbytes, "matched messages differ in size"
                        if scratch[peer] is None:
                            break  # the peer has not opened this round yet: next sweep
                        data = view(r, src, nbytes).copy()
                        if k2 == RECV_COPY:
                            view(peer, d2, nbytes)[:] = data
                        else:
                            scratch[peer][so2:so2 + nbytes] = data
                        moved[r].add(i)
                        moved[peer].add(j)
                        progress = True
                        break
        for r in range(size):
            if idx[r] < len(ranks[r]["rounds"]) and scratch[r] is not None:
                round_ = ranks[r]["rounds"][idx[r]]
                if len(moved[r]) == len(round_):
                    for kind, peer, lane, src, dst, nbytes, soff, received_first in round_:
                        if kind == RECV_REDUCE:
                            got = scratch[r][soff:soff + nbytes].view(dtype)
                            mine = view(r, src, nbytes).view(dtype)
                            a, b = (got, mine) if received_first else (mine, got)
                            view(r, dst, nbytes)[:] = (combine or np.add)(a, b).view(np.uint8)
                    idx[r] += 1
                    moved[r], scratch[r] = set(), None
                    progress = True
        assert progress, f"deadlock: ranks stuck at rounds {idx}"
    for r, plan in enumerate(ranks):  # as nccl.cu does after the last round
        for dst, src, nbytes in plan["copies_after"]:
            view(r, dst, nbytes)[:] = view(r, src, nbytes).copy()

    if combine is not None:
        for r in range(1, size):
            np.testing.assert_array_equal(bufs[r][2], bufs[0][2], err_msg=f"rank {r} differs from rank 0")
        return ranks
    total = sum(inputs)
    for r in range(size):
        b = bufs[r]
        got = b[2].view(dtype)
        if coll == "all_reduce":
            np.testing.assert_array_equal(got[:count], total)
        elif coll == "reduce_scatter":
            got = (b[3] if algo == "tree" else b[2]).view(dtype)
            off = r * count if (algo == "tree" or in_place) else 0
            np.testing.assert_array_equal(got[off:off + count], total[r * count:(r + 1) * count])
        elif coll == "all_gather":
            np.testing.assert_array_equal(got[:size * count], np.concatenate(inputs))
        elif coll == "broadcast":
            np.testing.assert_array_equal(got[:count], inputs[root])
        elif coll in ("reduce", "gather") and r != root:
            # Only the root has a result; the others' output is neither written nor used.
            np.testing.assert_array_equal(b[2], before[r], err_msg=f"{coll} wrote rank {r}'s output")
        elif coll == "reduce":
            np.testing.assert_array_equal(got[:count], total)
        elif coll == "gather":
            np.testing.assert_array_equal(got[:size * count], np.concatenate(inputs))
        elif coll == "scatter":
            off = r * count if in_place else 0
            np.testing.assert_array_equal(got[off:off + count], inputs[root][r * count:(r + 1) * count])
        else:  # all_to_all: block j of rank r's output is block r of rank j's input
            want = np.concatenate([inputs[j][r * count:(r + 1) * count] for j in range(size)])
            np.testing.assert_array_equal(got[:size * count], want)
    return ranks


@pytest.mark.parametrize("coll", ["all_reduce", "reduce_scatter", "all_gather", "broadcast"])
@pytest.mark.parametrize("algo", ["ring", "tree"])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 8])
def test_rounds_compute_the_collective(coll, algo, size):
    for count, piece, in_place in [(0, 64, False), (1, 64, False), (7, 8, False), (37, 16, True),
                                   (37, 1 << 20, False), (100, 64, True)]:
        replay(coll, algo, size, count, piece, in_place, root=size - 1)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 7, 8])
def test_rounds_compute_the_exchange_all_reduce(size):
    for count, piece, in_place in [(0, 64, False), (1, 64, False), (7, 8, False), (37, 16, True),
                                   (37, 1 << 20, False), (100, 64, True)]:
        replay("all_reduce", "exchange", size, count, piece, in_place)


@pytest.mark.parametrize("algo", ["ring", "tree", "exchange"])
@pytest.mark.parametrize("size", [2, 3, 4, 5, 8])
def test_rounds_give_every_rank_the_same_bits(algo, size):
    # A combine where the operands' order shows (a - b is not b - a): every rank must still
    # end with the same values, as NCCL's rounds with pycomm's reduction kernel would.
    for count, piece in [(1, 64), (37, 16)]:
        replay("all_reduce", algo, size, count, piece, False, combine=lambda a, b: a * 3 - b)


@pytest.mark.parametrize("coll", ["reduce", "gather", "scatter"])
@pytest.mark.parametrize("algo", ["ring", "tree"])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 7, 8])
def test_rounds_compute_rooted_collectives(coll, algo, size):
    # Every root; odd counts, below and above the number of ranks; pieces of one element
    # (every chunk cut up, and the rounds' matching tested hardest) and larger than any
    # message; in and out of place.
    cases = [(0, 64, False), (1, 8, False), (3, 8, True), (size + 2, 8, False), (37, 16, True),
             (37, 1 << 20, False)]
    for root in range(size):
        for count, piece, in_place in cases:
            replay(coll, algo, size, count, piece, in_place, root=root)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 7, 8])
def test_rounds_compute_all_to_all(size):
    for count, piece in [(0, 64), (1, 8), (3, 8), (37, 16), (37, 1 << 20)]:
        replay("all_to_all", "pairwise", size, count, piece, False)


def test_all_to_all_has_no_in_place_rounds():
    with pytest.raises(ValueError, match="in-place"):
        _C.schedule_rounds(COLLS["all_to_all"], ALGOS["pairwise"], 2, 4, 8, 0, 64, True)


def test_pieces_pipeline_the_ring():
    # Cutting chunks into pieces must add rounds, not multiply them: a pipelined ring
    # takes about steps + pieces - 1 rounds, a store-and-forward one steps * pieces.
    whole = replay("all_reduce", "ring", 4, 4 * 64, 1 << 20, False)
    cut = replay("all_reduce", "ring", 4, 4 * 64, 64, False)  # 8 pieces per chunk
    steps = 2 * (4 - 1)
    assert len(whole[0]["rounds"]) == steps
    assert len(cut[0]["rounds"]) <= steps + 8 - 1 + 2


def test_scratch_is_bounded_by_pieces():
    ranks = replay("all_reduce", "tree", 5, 1000, 256, False)
    assert 0 < max(r["scratch_bytes"] for r in ranks) <= 4 * 256
