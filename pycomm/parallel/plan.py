"""``pycomm.parallel.plan``: call it to plan, run it to plan from the command line.

    pycomm.parallel.plan("gpt-175b", "a100x8", 1536, nodes=128)   # -> planner.Plans
    python -m pycomm.parallel.plan --model gpt-175b --cluster a100x8 --nodes 128 --global-batch 1536

A module cannot be both a function and ``python -m``'s target unless the module itself is
callable: this one's class is a ModuleType whose ``__call__`` is :func:`planner.plan`, so
``pycomm.parallel.plan(...)`` works whether or not ``pycomm.parallel.plan`` was imported as a
module first.  The planner itself lives in ``pycomm.parallel.planner``.
"""
import sys
import types

from .planner import cli
from .planner import plan as _plan

__all__ = ["main"]

main = cli.main


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return _plan(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__call__ = _plan  # what help() and readers find

if __name__ == "__main__":
    sys.exit(main())
