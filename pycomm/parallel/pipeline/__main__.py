"""``python -m pycomm.parallel.pipeline table`` prints the bubble table;
``python -m pycomm.parallel.pipeline grid SCHEDULE P M [V]`` prints one schedule's grid and its
per-rank steps (with communication);
``python -m pycomm.parallel.pipeline timelines DIR`` writes one timeline PNG per schedule."""
import sys

from . import bubble_table, simulate
from .table import timelines

USAGE = ("usage: python -m pycomm.parallel.pipeline table | timelines DIR | "
         "grid SCHEDULE STAGES MICROBATCHES [VIRTUAL]")


def main(argv: list[str]) -> int:
    if argv[:1] == ["table"] and len(argv) == 1:
        print(bubble_table())
        return 0
    if argv[:1] == ["timelines"] and len(argv) == 2:
        for path in timelines(argv[1]):
            print(path)
        return 0
    if argv[:1] == ["grid"] and len(argv) in (4, 5):
        r = simulate(argv[1], *(int(a) for a in argv[2:]))
        print(r.grid())
        print()
        print(r.schedule.to_text())
        return 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
