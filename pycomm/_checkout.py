"""``pycomm.kernels`` and ``pycomm.bench`` from a source checkout.

The repository keeps ``kernels/`` and ``bench/`` at its top level, beside ``pycomm/``; an install
maps them into the package (pyproject.toml's ``package-dir``), so only ``pycomm`` is a top-level
import and nothing shadows Hugging Face's ``kernels`` package.  When pycomm is imported from the
checkout itself (tests run from the repository root, ``python -m bench``), this finder gives the
two folders the same names the install gives them.  Nothing here runs in an installed wheel,
whose ``pycomm/`` already holds ``kernels/`` and ``bench/``.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_PACKAGE)
# package name -> folder at the repository root (the same table as pyproject.toml's package-dir)
FOLDERS = {"pycomm.kernels": "kernels", "pycomm.bench": "bench"}


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds exactly the packages of ``FOLDERS`` in the checkout; their submodules then resolve
    through the package's ``__path__`` as usual."""

    def find_spec(self, fullname, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        folder = FOLDERS.get(fullname)
        if folder is None:
            return None
        where = os.path.join(_ROOT, folder)
        init = os.path.join(where, "__init__.py")
        if not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[where])


def is_checkout() -> bool:
    """True when this ``pycomm/`` sits in a source tree rather than an installed package."""
    return (os.path.isfile(os.path.join(_ROOT, "pyproject.toml"))
            and not os.path.isdir(os.path.join(_PACKAGE, "kernels")))


# First on the path, before an editable install's finder that may point at another checkout.
if is_checkout() and not any(type(f).__name__ == "CheckoutFinder" for f in sys.meta_path):
    sys.meta_path.insert(0, CheckoutFinder())
