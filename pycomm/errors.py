"""Errors raised by pycomm's collectives.

``CommError`` (a ``RuntimeError``) is raised when communication fails; its subclasses say
why.  After any of them the group's communicator is unusable (its channels may hold half a
collective): destroy the process group and create a new one.  Bad arguments raise
``ValueError`` or ``TypeError`` before anything is sent, and leave the group usable.
"""
from pycomm._C import CommError, CommMismatchError, CommTimeoutError

__all__ = ["CommError", "CommTimeoutError", "CommMismatchError"]
