"""`python -m bench [collectives|latency|kernels] [options]`; with no sub-command, the collectives."""
import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    which = "collectives"
    if argv and argv[0] in ("collectives", "latency", "kernels"):
        which = argv.pop(0)
    if which == "kernels":
        from bench import kernels as mod
    elif which == "latency":
        from bench import latency as mod
    else:
        from bench import collectives as mod
    return mod.main(argv)


if __name__ == "__main__":
    sys.exit(main())
