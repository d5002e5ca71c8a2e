"""Check a schedule before it runs.

Contract: :func:`validate` raises :class:`~.schedules.ScheduleError` (a ``ValueError``) whose
message names the rank, the step index and the action, and says what is expected instead;
:func:`find_problems` returns the same static findings as a list of strings without raising.

Checks, in order:

1. shape: one step list per rank; stages and micro-batches in range; each action on the rank
   that owns its stage (``stage % stages``);
2. every (stage, micro-batch) on the micro-batch's path (``Schedule.chain``) has exactly one
   ``F`` and one backward form (``B``, or ``I`` and ``W``: ``actions.BACKWARD_FORMS``), each
   after the kinds its ``KindInfo.after`` names (a backward needs its forward's activations, W
   needs I's);
3. messages (lowered schedules): each names a real neighbour on another rank, and between every
   pair of ranks the k-th send matches the k-th receive (same tensor, same order);
4. execution: the lists are run step by step with blocking sends (a send waits for the matching
   receive) to catch hangs and data used before it arrived: forward of stage ``s+1`` only after
   stage ``s`` produced it, backward of ``s`` only after ``s+1``'s gradient.  A compute-only
   schedule is run with its data dependencies alone, which checks the same cross-stage order.
"""
from __future__ import annotations

from collections import defaultdict

from .actions import BACKWARD_FORMS, Action, Kind, Schedule, ScheduleError, step_ops
from .engine import execute

__all__ = ["validate", "find_problems"]


def find_problems(schedule: Schedule) -> list[str]:
    """Static problems of ``schedule`` (checks 1-2 above), each an actionable sentence."""
    p, m, nstages = schedule.stages, schedule.microbatches, schedule.num_model_stages
    if len(schedule.actions) != p:
        return [
            f"schedule {schedule.name!r} has {len(schedule.actions)} rank lists but stages={p}; "
            f"give exactly one list per rank"
        ]
    problems: list[str] = []
    where: dict[tuple[Kind, int, int], list[tuple[int, int]]] = defaultdict(list)
    for rank, program in enumerate(schedule.actions):
        for k, step in enumerate(program):
            for op in step_ops(step):
                if not 0 <= op.stage < nstages:
                    problems.append(
                        f"rank {rank}, step {k} '{op}': stage {op.stage} is out of range "
                        f"0..{nstages - 1} (stages={p}, virtual={schedule.virtual})"
                    )
                    continue
                if not 0 <= op.microbatch < m:
                    problems.append(
                        f"rank {rank}, step {k} '{op}': micro-batch {op.microbatch} is out of "
                        f"range 0..{m - 1}"
                    )
                    continue
                owner = schedule.rank_of(op.stage)
                if owner != rank:
                    problems.append(
                        f"rank {rank}, step {k} '{op}': stage {op.stage} lives on rank {owner}; "
                        f"move the action to rank {owner}'s list"
                    )
                    continue
                if op.kind.is_compute:
                    where[(op.kind, op.stage, op.microbatch)].append((rank, k))

    for mb in range(m):
        chain = schedule.chain(mb)
        for stage in range(nstages):
            owner = schedule.rank_of(stage)
            present = {kind for kind in Kind if (kind, stage, mb) in where}
            if stage not in chain:
                for kind in present:
                    problems.append(
                        f"rank {owner}: '{Action(stage, kind, mb)}' runs micro-batch {mb} through "
                        f"stage {stage}, which is not on its path (stages {chain.start}.."
                        f"{chain.stop - 1}); remove it"
                    )
                continue
            problems += _completeness(owner, stage, mb, present, where)
    return problems


def _completeness(owner: int, stage: int, mb: int, present: set[Kind],
                  where: dict[tuple[Kind, int, int], list[tuple[int, int]]]) -> list[str]:
    """One (stage, micro-batch): a forward, one backward form, each once, in ``after`` order."""
    problems = []
    forms = [form for form in BACKWARD_FORMS if form & present] or [BACKWARD_FORMS[0]]
    if len(forms) > 1:
        problems.append(
            f"rank {owner}: stage {stage} micro-batch {mb} runs both a fused backward and its "
            f"halves ({', '.join(sorted(str(Action(stage, k, mb)) for k in present - {Kind.F}))}); "
            f"keep either '{Action(stage, Kind.B, mb)}' or the I and W pair"
        )
        return problems
    for kind in sorted({Kind.F} | forms[0], key=list(Kind).index):
        hits = where.get((kind, stage, mb), [])
        act = Action(stage, kind, mb)
        word = kind.info.word if kind is not Kind.B or forms[0] == BACKWARD_FORMS[0] else "backward"
        if not hits:
            problems.append(
                f"rank {owner}: stage {stage} micro-batch {mb} has no {word}; "
                f"add '{act}' to rank {owner}'s list"
            )
        elif len(hits) > 1:
            steps = ", ".join(str(k) for _, k in hits)
            problems.append(
                f"rank {owner}: '{act}' runs {len(hits)} times (steps {steps}); "
                f"each (stage, micro-batch) needs exactly one {word}"
            )
    for kind in present:
        for before in kind.info.after:
            first, then = where.get((Kind(before), stage, mb)), where.get((kind, stage, mb))
            if first and then and len(first) == len(then) == 1 and then[0][1] < first[0][1]:
                kb, kf = then[0][1], first[0][1]
                word = Kind(before).info.word
                problems.append(
                    f"rank {owner}, step {kb} '{Action(stage, kind, mb)}' comes before its "
                    f"{word} '{Action(stage, Kind(before), mb)}' (step {kf}); it needs the "
                    f"{word}'s results, so move it after step {kf}"
                )
    return problems


def validate(schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` unless ``schedule`` is complete, ordered and hang-free."""
    problems = find_problems(schedule)
    if problems:
        raise ScheduleError(
            f"invalid {schedule.name!r} schedule (stages={schedule.stages}, "
            f"microbatches={schedule.microbatches}, virtual={schedule.virtual}):\n  "
            + "\n  ".join(problems)
        )
    # Checks 3-4 run the execution engine.
    execute(schedule, blocking_sends=True)
