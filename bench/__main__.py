"""`python -m bench [collectives|latency|modes|kernels|hf] [options]`; with no sub-command, the collectives."""
import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    which = "collectives"
    if argv and argv[0] in ("collectives", "latency", "modes", "kernels", "hf"):
        which = argv.pop(0)
    if which == "kernels":
        from . import kernels as mod
    elif which == "hf":
        from . import hf as mod
    elif which == "modes":
        from . import modes as mod
    elif which == "latency":
        from . import latency as mod
    else:
        from . import collectives as mod
    return mod.main(argv)


if __name__ == "__main__":
    sys.exit(main())
