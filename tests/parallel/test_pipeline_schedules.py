"""Pipeline schedules, communication lowering, validator and simulator (pure Python, no torch)."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pycomm import parallel
from pycomm.parallel.pipeline import (
    SCHEDULES,
    Action,
    Batch,
    Kind,
    Schedule,
    ScheduleError,
    add_communication,
    build_schedule,
    find_problems,
    format_program,
    parse_program,
    parse_step,
    simulate,
    simulate_schedule,
    validate,
)
from pycomm.parallel.pipeline.simulate import execute

FEW = settings(max_examples=25, deadline=None)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


# ---------------------------------------------------------------- analytic bubble formulas


@FEW
@given(name=st.sampled_from(["gpipe", "1f1b"]), p=st.integers(1, 8), extra=st.integers(0, 24))
def test_gpipe_and_1f1b_match_formulas(name, p, extra):
    m = p + extra  # 1F1B needs m >= p; GPipe is checked below for m < p too
    r = parallel.pipeline.simulate(name, p, m)
    assert _close(r.bubble_fraction, (p - 1) / (m + p - 1))
    assert _close(r.bubble_overhead, (p - 1) / m)


@FEW
@given(p=st.integers(2, 8), m=st.integers(1, 8))
def test_gpipe_formula_with_fewer_microbatches_than_stages(p, m):
    r = simulate("gpipe", p, m)
    assert _close(r.bubble_fraction, (p - 1) / (m + p - 1))


@FEW
@given(p=st.integers(1, 6), groups=st.integers(1, 5), v=st.integers(1, 4))
def test_interleaved_overhead_is_reduced_by_v(p, groups, v):
    m = p * groups
    r = simulate("interleaved_1f1b", p, m, virtual=v)
    assert _close(r.bubble_overhead, (p - 1) / (v * m))
    # Each chunk costs 1/v of a stage, so a device computes m*(t_f+t_b) whatever v is.
    assert _close(r.busy, p * m * 3.0)


@pytest.mark.parametrize(
    "name,p,m,v,fraction,overhead",
    [
        ("gpipe", 4, 8, 1, 3 / 11, 3 / 8),
        ("1f1b", 4, 8, 1, 3 / 11, 3 / 8),
        ("1f1b", 8, 32, 1, 7 / 39, 7 / 32),
        ("interleaved_1f1b", 4, 8, 2, 3 / 19, 3 / 16),
        ("interleaved_1f1b", 8, 16, 4, 7 / 71, 7 / 64),
    ],
)
def test_known_values(name, p, m, v, fraction, overhead):
    r = simulate(name, p, m, virtual=v)
    assert _close(r.bubble_fraction, fraction) and _close(r.bubble_overhead, overhead)


def test_first_stage_without_input_grad():
    # A chain's first stage has no input to differentiate: its I is empty and W takes the whole
    # backward, as the runtime runs it.  Fused-backward schedules and the total work don't change.
    for name in ("1f1b", "zb_h1", "chimera"):
        paper, runtime = simulate(name, 2, 4), simulate(name, 2, 4, first_stage_input_grad=False)
        assert _close(runtime.busy, paper.busy), name
        first_inputs = [t for t in runtime.timeline[0] if t.action.stage == 0 and t.action.kind.name == "I"]
        assert all(t.end == t.start for t in first_inputs), name
        assert bool(first_inputs) == (name == "zb_h1"), name  # only the split schedule has an I
    # ZB-H1 on 2 ranks: the only I that could fill rank 1's wait is rank 0's, so 1F1B's bubble
    assert _close(simulate("zb_h1", 2, 4).bubble_fraction, 1 / 13)
    assert _close(simulate("zb_h1", 2, 4, first_stage_input_grad=False).bubble_fraction, 1 / 5)
    assert _close(simulate("1f1b", 2, 4, first_stage_input_grad=False).bubble_fraction, 1 / 5)


@FEW
@given(
    name=st.sampled_from(["gpipe", "1f1b", "interleaved_1f1b"]),
    p=st.integers(1, 5),
    groups=st.integers(1, 4),
    v=st.integers(1, 3),
    t_fwd=st.sampled_from([0.5, 1.0, 1.5]),
    t_bwd=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
)
def test_communication_adds_no_bubble(name, p, groups, v, t_fwd, t_bwd):
    # The lowered lists (what the runtime runs) are exactly as fast as the compute-only
    # schedule with an ideal network, for any forward/backward cost ratio.
    v = v if name == "interleaved_1f1b" else 1
    compute = build_schedule(name, p, p * groups, v)
    lowered = add_communication(compute, t_fwd, t_bwd)
    assert lowered.has_communication == (p > 1)
    validate(lowered)
    assert _close(execute(lowered, t_fwd, t_bwd).makespan, execute(compute, t_fwd, t_bwd).makespan)
    r = simulate(name, p, p * groups, v, t_fwd, t_bwd)
    assert _close(r.bubble_overhead, (p - 1) / (v * p * groups))


def test_single_stage_has_no_bubble_and_no_messages():
    r = simulate("interleaved_1f1b", 1, 3, virtual=2)
    assert r.bubble_fraction == 0.0
    assert not r.schedule.has_communication  # chunks 0 and 1 are both on rank 0


# ---------------------------------------------------------------- memory: in-flight activations


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 16), (8, 8)])
def test_peak_activations(p, m):
    assert simulate("gpipe", p, m).peak_activations == (m,) * p
    one = simulate("1f1b", p, m).peak_activations
    assert one[0] == p and max(one) <= p
    assert one == tuple(p - r for r in range(p))


def test_interleaved_peak_activations_follow_megatron_warmup():
    p, m, v = 4, 8, 2
    peak = simulate("interleaved_1f1b", p, m, virtual=v).peak_activations
    assert peak == tuple(min(2 * (p - 1 - r) + (v - 1) * p + 1, m * v) for r in range(p))


# ---------------------------------------------------------------- schedules and text form


def test_examples_p2_m4():
    # The exact lists the runtime consumes; changing them is an interface change.
    expect = {
        ("gpipe", 1): [
            "0F0 0SEND_F0 0F1 0SEND_F1 0F2 0SEND_F2 0F3 0SEND_F3+0RECV_B0 0B0 0RECV_B1 0B1 "
            "0RECV_B2 0B2 0RECV_B3 0B3",
            "1RECV_F0 1F0 1RECV_F1 1F1 1RECV_F2 1F2 1RECV_F3 1F3 1B0 1SEND_B0 1B1 1SEND_B1 1B2 "
            "1SEND_B2 1B3 1SEND_B3",
        ],
        ("1f1b", 1): [
            "0F0 0SEND_F0 0F1 0SEND_F1+0RECV_B0 0B0 0F2 0SEND_F2+0RECV_B1 0B1 0F3 "
            "0SEND_F3+0RECV_B2 0B2 0RECV_B3 0B3",
            "1RECV_F0 1F0 1RECV_F1 1B0 1SEND_B0 1F1 1B1 1SEND_B1+1RECV_F2 1F2 1B2 "
            "1SEND_B2+1RECV_F3 1F3 1B3 1SEND_B3",
        ],
    }
    for (name, v), lines in expect.items():
        s = add_communication(build_schedule(name, 2, 4, v))
        assert [format_program(prog) for prog in s.actions] == lines
    inter = build_schedule("interleaved_1f1b", 2, 4, 2)
    assert format_program(inter.actions[0]) == "0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3"
    assert format_program(inter.actions[1]) == "1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3"


def test_interleaved_wraps_around_from_last_rank_to_rank_0():
    s = add_communication(build_schedule("interleaved_1f1b", 2, 4, 2))
    ops = [op for step in s.actions[0] for op in (step.ops if isinstance(step, Batch) else (step,))]
    wrap = [op for op in ops if op.kind is Kind.RECV_F]
    assert [str(op) for op in wrap] == ["2RECV_F0", "2RECV_F1", "2RECV_F2", "2RECV_F3"]
    assert {s.peer(op) for op in wrap} == {1}
    assert s.peer(Action(3, Kind.SEND_B, 0)) == 0 and s.peer(Action(1, Kind.SEND_F, 0)) == 0


@FEW
@given(
    stage=st.integers(0, 99),
    kind=st.sampled_from(list(Kind)),
    mb=st.integers(0, 999),
)
def test_action_text_round_trip(stage, kind, mb):
    a = Action(stage, kind, mb)
    assert Action.parse(str(a)) == a and parse_step(str(a)) == a


@pytest.mark.parametrize("name,v", [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)])
def test_program_text_round_trip(name, v):
    s = add_communication(build_schedule(name, 4, 8, v))
    assert any(isinstance(step, Batch) for prog in s.actions for step in prog)
    for prog in s.actions:
        assert parse_program(format_program(prog)) == list(prog)
    assert str(parse_step("1SEND_F0+1RECV_B0")) == "1SEND_F0+1RECV_B0"


@pytest.mark.parametrize("text", ["F3", "2X0", "2F", "-1F0", "2SEND0", ""])
def test_bad_action_text(text):
    with pytest.raises(ValueError, match="cannot parse action"):
        parse_step(text)


def test_batch_holds_only_messages():
    with pytest.raises(ValueError, match="two or more messages"):
        Batch((Action(0, Kind.F, 0), Action(0, Kind.SEND_F, 0)))


# ---------------------------------------------------------------- argument errors


def test_1f1b_with_fewer_microbatches_than_stages():
    with pytest.raises(ValueError, match="fewer micro-batches than stages for 1F1B") as e:
        simulate("1f1b", 4, 3)
    assert "microbatches=3" in str(e.value) and "stages=4" in str(e.value)


def test_interleaved_needs_m_divisible_by_p():
    with pytest.raises(ValueError) as e:
        simulate("interleaved_1f1b", 4, 6, virtual=2)
    msg = str(e.value)
    assert "microbatches=6" in msg and "stages=4" in msg and "multiple of 4, e.g. 4 or 8" in msg


@pytest.mark.parametrize(
    "args,pattern",
    [
        (("interleaved_1f1b", 2, 4, 0), "virtual .* must be >= 1, got virtual=0"),
        (("1f1b", 0, 4, 1), "stages must be >= 1.*stages=0"),
        (("gpipe", 2, 0, 1), "microbatches must be >= 1, got microbatches=0"),
        (("gpipe", 2, 4, 2), "one model chunk per device, got virtual=2.*interleaved_1f1b"),
        (("zero_bubble", 2, 4, 1), "unknown pipeline schedule 'zero_bubble'; valid schedules: gpipe, 1f1b, interleaved_1f1b"),
    ],
)
def test_bad_arguments(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        simulate(*args)


def test_bad_durations():
    with pytest.raises(ValueError, match="t_bwd must be a positive finite duration, got 0"):
        simulate("gpipe", 2, 2, t_bwd=0)


# ---------------------------------------------------------------- validator


def _replace_rank(s: Schedule, rank: int, steps) -> Schedule:
    actions = list(s.actions)
    actions[rank] = tuple(steps)
    return dataclasses.replace(s, actions=actions)


def test_validator_catches_dropped_action():
    s = build_schedule("1f1b", 2, 4)
    broken = _replace_rank(s, 1, [a for a in s.actions[1] if str(a) != "1F2"])
    with pytest.raises(ScheduleError, match=r"rank 1: stage 1 micro-batch 2 has no forward; add '1F2' to rank 1's list"):
        validate(broken)


def test_validator_catches_backward_before_forward():
    s = build_schedule("gpipe", 2, 2)  # rank 1: 1F0 1F1 1B0 1B1
    broken = _replace_rank(s, 1, parse_program("1F0 1B1 1F1 1B0"))
    with pytest.raises(ScheduleError, match=r"rank 1, step 1 '1B1' comes before its forward '1F1' \(step 2\)"):
        validate(broken)


def test_validator_catches_duplicate_and_misplaced_actions():
    s = build_schedule("gpipe", 2, 2)
    broken = _replace_rank(s, 0, list(s.actions[0]) + [Action(0, Kind.F, 1), Action(1, Kind.F, 0)])
    problems = find_problems(broken)
    assert any("'0F1' runs 2 times (steps 1, 4)" in p for p in problems)
    assert any("rank 0, step 5 '1F0': stage 1 lives on rank 1" in p for p in problems)


def test_validator_catches_cross_stage_order_cycle():
    # Rank 1 wants micro-batch 1 before rank 0 can produce it (rank 0 first needs 1B0).
    s = build_schedule("1f1b", 2, 2)  # rank 0: 0F0 0F1 0B0 0B1 ; rank 1: 1F0 1B0 1F1 1B1
    broken = _replace_rank(_replace_rank(s, 0, parse_program("0F0 0B0 0F1 0B1")), 1, parse_program("1F1 1F0 1B0 1B1"))
    with pytest.raises(ScheduleError, match=r"(?s)deadlock.*rank 0 waits at step 1 '0B0' for '1B0' on rank 1, but rank 1 is at step 0 '1F1'.*rank 1 waits at step 0 '1F1' for '0F1' on rank 0, but rank 0 is at step 1 '0B0'"):
        validate(broken)


def test_validator_catches_mismatched_send_recv_order():
    s = add_communication(build_schedule("gpipe", 2, 4))
    prog = list(s.actions[1])  # 1RECV_F0 1F0 1RECV_F1 1F1 ...
    prog[0], prog[2] = prog[2], prog[0]
    with pytest.raises(ScheduleError, match=r"mismatched messages from rank 0 to rank 1: rank 0's message #0 is '0SEND_F0' \(step 1\) but rank 1's receive #0 from rank 0 is '1RECV_F1' \(step 0\)"):
        validate(_replace_rank(s, 1, prog))


def test_validator_catches_unmatched_send():
    s = add_communication(build_schedule("gpipe", 2, 2))
    prog = [step for step in s.actions[1] if str(step) != "1RECV_F1"]
    with pytest.raises(ScheduleError, match=r"rank 0, step 3 '0SEND_F1' sends to rank 1, which has no matching receive.*add '1RECV_F1' to rank 1"):
        validate(_replace_rank(s, 1, prog))


def test_validator_catches_message_to_nobody():
    s = add_communication(build_schedule("gpipe", 2, 1))
    with pytest.raises(ScheduleError, match=r"rank 1, step 4 '1SEND_F0': stage 1 has no neighbour stage 2 to exchange with"):
        validate(_replace_rank(s, 1, list(s.actions[1]) + [Action(1, Kind.SEND_F, 0)]))


def _just_in_time(s: Schedule) -> Schedule:
    """The naive lowering: receive right before use, send right after production, batch what
    falls between two computations."""
    last = s.num_model_stages - 1
    out = []
    for prog in s.actions:
        steps, pending = [], []
        for a in prog:
            if a.kind is Kind.F and a.stage > 0:
                pending.append(Action(a.stage, Kind.RECV_F, a.microbatch))
            if a.kind is Kind.B and a.stage < last:
                pending.append(Action(a.stage, Kind.RECV_B, a.microbatch))
            steps += [Batch(tuple(pending))] if len(pending) > 1 else pending
            pending = []
            steps.append(a)
            if a.kind is Kind.F and a.stage < last:
                pending.append(Action(a.stage, Kind.SEND_F, a.microbatch))
            if a.kind is Kind.B and a.stage > 0:
                pending.append(Action(a.stage, Kind.SEND_B, a.microbatch))
        steps += [Batch(tuple(pending))] if len(pending) > 1 else pending
        out.append(steps)
    return dataclasses.replace(s, actions=out)


def test_validator_catches_hang_of_naive_interleaved_lowering():
    # Blocking sends: rank 0 sends 2B0's gradient while rank 1 is two computations away from
    # receiving it, and rank 1 sends 3B1's gradient that rank 0 receives only later.
    naive = _just_in_time(build_schedule("interleaved_1f1b", 2, 4, 2))
    execute(naive)  # with isend semantics it runs ...
    with pytest.raises(ScheduleError) as e:
        validate(naive)  # ... but it can hang when sends block
    msg = str(e.value)
    assert "deadlock" in msg
    assert "rank 0 waits at step 11 '2SEND_B0' for rank 1 to reach step 12" in msg
    assert "rank 1 waits at step 10 '3SEND_B1+1RECV_F2' for rank 0 to reach step 13" in msg


@FEW
@given(
    name=st.sampled_from(["gpipe", "1f1b", "interleaved_1f1b"]),
    p=st.integers(2, 4),
    groups=st.integers(1, 3),
    v=st.integers(1, 3),
    data=st.data(),
)
def test_validator_accepts_generated_and_rejects_any_dropped_computation(name, p, groups, v, data):
    v = v if name == "interleaved_1f1b" else 1
    s = add_communication(build_schedule(name, p, p * groups, v))
    validate(s)
    rank = data.draw(st.integers(0, p - 1))
    computes = [k for k, step in enumerate(s.actions[rank]) if isinstance(step, Action) and step.kind.is_compute]
    k = data.draw(st.sampled_from(computes))
    dropped = s.actions[rank][k]
    broken = _replace_rank(s, rank, s.actions[rank][:k] + s.actions[rank][k + 1:])
    with pytest.raises(ScheduleError, match=f"add '{dropped}' to rank {rank}'s list"):
        validate(broken)


# ---------------------------------------------------------------- drawings


def test_grid_text():
    r = simulate("1f1b", 2, 4)
    lines = r.grid().splitlines()
    assert lines[1].split() == ["rank", "0", "0F0", "0F1", ".", ".", "0B0", "0B0", "0F2", "0B1", "0B1",
                                "0F3", "0B2", "0B2", ".", "0B3", "0B3"]
    assert lines[2].split()[:6] == ["rank", "1", ".", "1F0", "1B0", "1B0"]
    assert "bubble fraction 0.200" in lines[3]


def test_plot_writes_png(tmp_path):
    import matplotlib.image

    path = tmp_path / "sub" / "1f1b.png"
    assert parallel.pipeline.simulate("interleaved_1f1b", 4, 8, virtual=2).plot(str(path)) == str(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 10_000 < len(data) < 2_000_000
    h, w = matplotlib.image.imread(str(path)).shape[:2]
    assert w > 2 * h > 200  # a wide timeline, one row per device


def test_bubble_table():
    text = parallel.pipeline.bubble_table(ps=(2, 4), ms=(2, 4), vs=(1, 2))
    lines = text.splitlines()
    assert lines[0] == ("| p | m | gpipe | 1f1b | interleaved_1f1b v=2 | looped_bfs v=2 | zb_h1 | zb_h2 | zb_v "
                        "| dualpipe_v | chimera | pipedream_2bw |")  # every registry entry
    row = next(line for line in lines if line.startswith("| 2 | 4 |")).split(" | ")
    assert row[2:5] == ["0.200 / 4", "0.200 / 2", "0.111 / 2.5"]
    assert row[6] == "0.077 / 2"  # zb_h1: a lower bubble than 1F1B at the same memory
    assert "| 4 | 2 | 0.600 / 2 | – |" in text
    assert any("1f1b p=4 m=2 v=1: fewer micro-batches than stages for 1F1B" in line for line in lines)


def test_simulate_custom_schedule_reports_schedule_errors():
    s = build_schedule("gpipe", 2, 2)
    with pytest.raises(ScheduleError, match="has no backward"):
        simulate_schedule(_replace_rank(s, 0, s.actions[0][:-1]))


# ---------------------------------------------------------------- every registered schedule

def _virtual(name):
    return 2 if SCHEDULES[name].chunks == "any" else 1


def _sizes(name):
    """(p, m) pairs each schedule accepts, small enough for the test budget."""
    if name == "chimera":
        return [(2, 2), (2, 4), (4, 4), (4, 8)]
    if name == "dualpipe_v":
        return [(2, 4), (2, 6), (4, 8), (3, 7)]
    return [(2, 4), (3, 6), (4, 8), (4, 5)] if name not in ("interleaved_1f1b",) else [(2, 4), (4, 8)]


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_validates_and_communication_adds_no_bubble(name):
    for p, m in _sizes(name):
        compute = build_schedule(name, p, m, _virtual(name))
        validate(compute)
        for t_fwd, t_bwd in ((1.0, 2.0), (1.0, 1.0)):
            lowered = add_communication(compute, t_fwd, t_bwd)
            validate(lowered)
            assert lowered.has_communication
            assert _close(execute(lowered, t_fwd, t_bwd).makespan, execute(compute, t_fwd, t_bwd).makespan), (p, m)
        # every (stage, micro-batch) on its path runs once forward and once backward
        r = simulate(name, p, m, _virtual(name))
        assert _close(r.busy, p * m * 3.0)  # whatever the placement, a device computes m*(t_f+t_b)


@pytest.mark.parametrize("name", [n for n in SCHEDULES if n not in ("gpipe", "1f1b", "interleaved_1f1b")])
def test_new_schedules_reject_a_dropped_computation(name):
    s = add_communication(build_schedule(name, 2, 4, _virtual(name)))
    for rank in range(2):
        computes = [k for k, step in enumerate(s.actions[rank]) if isinstance(step, Action) and step.kind.is_compute]
        k = computes[len(computes) // 2]
        dropped = s.actions[rank][k]
        with pytest.raises(ScheduleError, match=f"add '{dropped}' to rank {rank}'s list"):
            validate(_replace_rank(s, rank, s.actions[rank][:k] + s.actions[rank][k + 1:]))


def test_registry_is_one_mapping():
    assert list(SCHEDULES)[:3] == ["gpipe", "1f1b", "interleaved_1f1b"]  # iterating yields names
    assert {"zb_h1", "zb_h2", "zb_v", "dualpipe_v", "looped_bfs", "chimera", "pipedream_2bw"} <= set(SCHEDULES)
    assert [n for n, s in SCHEDULES.items() if not s.synchronous] == ["pipedream_2bw"]
    with pytest.raises(ValueError, match="'zb_h1' holds one model chunk per device, got virtual=2"):
        build_schedule("zb_h1", 2, 4, 2)
    assert build_schedule("zb_v", 2, 4).virtual == build_schedule("zb_v", 2, 4, 2).virtual == 2


# ---------------------------------------------------------------- I and W, and the papers' numbers


def test_split_backward_kinds_and_text():
    assert Kind.I.info.produces == "gradient" and Kind.W.info.produces is None
    assert Kind.W.info.after == ("F", "I")
    assert str(parse_step("3I2")) == "3I2" and parse_step("0W1") == Action(0, Kind.W, 1)


def test_validator_catches_weight_gradient_before_input_gradient_and_mixed_forms():
    s = build_schedule("zb_h1", 2, 2)  # rank 1: 1F0 1I0 1F1 1I1 1W0 1W1
    prog = [str(a) for a in s.actions[1]]
    i, w = prog.index("1I0"), prog.index("1W0")
    prog[i], prog[w] = prog[w], prog[i]
    with pytest.raises(ScheduleError, match=r"'1W0' comes before its input-gradient '1I0'"):
        validate(_replace_rank(s, 1, parse_program(" ".join(prog))))
    mixed = _replace_rank(s, 1, list(s.actions[1]) + [Action(1, Kind.B, 0)])
    assert any("runs both a fused backward and its halves" in p for p in find_problems(mixed))


def test_durations_per_kind():
    r = simulate("zb_h1", 2, 4, t_fwd=1.0, t_input=1.0, t_weight=0.5)
    assert r.t_input == 1.0 and r.t_weight == 0.5 and r.t_bwd == 1.5
    assert _close(r.busy, 2 * 4 * 2.5)
    assert simulate("1f1b", 2, 4).t_input == 1.0  # half of t_bwd by default
    with pytest.raises(ValueError, match="t_input and t_weight split the backward t_bwd=2"):
        simulate("zb_h1", 2, 4, t_input=2.0)


@pytest.mark.parametrize("p,m", [(4, 8), (4, 16), (8, 16), (8, 32)])
def test_zero_bubble_paper_numbers(p, m):
    # Qi et al. 2024, T_F = T_I = T_W = 1: 1F1B idles (p-1)(T_F+T_B+T_W) per device, ZB-H1
    # (p-1)(T_F+T_B-T_W), a third, at 1F1B's memory; ZB-H2 and ZB-V have no bubble once steps
    # overlap (post-validation), at about twice the memory.
    one = simulate("1f1b", p, m)
    h1, h2, zbv = simulate("zb_h1", p, m), simulate("zb_h2", p, m), simulate("zb_v", p, m)
    assert _close(one.idle / p, 3 * (p - 1))
    assert _close(h1.idle / p, 1 * (p - 1))
    assert _close(h1.idle / one.idle, 1 / 3)
    assert h1.peak_activations == one.peak_activations == tuple(p - r for r in range(p))
    assert h2.steady_bubble_fraction == 0.0 and zbv.steady_bubble_fraction == 0.0
    assert h1.steady_bubble_fraction > 0.0 and one.steady_bubble_fraction > 0.0
    assert h2.peak_activations == tuple(2 * (p - r) - 1 for r in range(p))  # ~2x 1F1B's
    assert max(zbv.peak_stage_activations) == p  # 2p half-stage chunks on every rank
    assert zbv.bubble_fraction < h1.bubble_fraction < one.bubble_fraction


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 12), (4, 16)])
def test_chimera_bubble_formula(p, m):
    # Li and Hoefler 2021, Table 1, with equal forward and backward times:
    # bubble ratio (p-2)/(2m+p-2), against (p-1)/(m+p-1) for 1F1B.  Our greedy Chimera order
    # reaches the formula for p <= 4; at p >= 6 it leaves more (see docs/pipeline.md).
    r = simulate("chimera", p, m, t_fwd=1.0, t_bwd=1.0)
    assert _close(r.bubble_fraction, (p - 2) / (2 * m + p - 2))
    assert r.bubble_fraction < simulate("1f1b", p, m, t_fwd=1.0, t_bwd=1.0).bubble_fraction or p == 2


def test_dualpipe_v_and_looped_bfs():
    p, m = 4, 8
    dual, one = simulate("dualpipe_v", p, m), simulate("1f1b", p, m)
    assert dual.bubble_fraction < one.bubble_fraction / 3
    bfs = simulate("looped_bfs", p, m, virtual=2)
    # breadth first: the interleaved bubble (p-1)/(v*m) of compute, at GPipe's memory
    assert _close(bfs.bubble_overhead, (p - 1) / (2 * m))
    assert bfs.peak_stage_activations == (m,) * p


def test_pipedream_2bw_is_1f1b_within_a_step():
    a, b = build_schedule("pipedream_2bw", 4, 8), build_schedule("1f1b", 4, 8)
    assert a.actions == b.actions and a.name == "pipedream_2bw"


def test_v_placement_hands_over_locally():
    s = add_communication(build_schedule("zb_v", 2, 4))
    assert s.rank_of(0) == s.rank_of(3) == 0 and s.rank_of(1) == s.rank_of(2) == 1
    text = s.to_text()
    assert "1SEND_F" not in text  # stage 1 -> 2: both on rank 1
    assert "2SEND_F" in text and "3RECV_F" in text
