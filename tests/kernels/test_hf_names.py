"""Only ``pycomm`` is a top-level import: its kernels and benchmark are ``pycomm.kernels`` and
``pycomm.bench``, so Hugging Face's hub-kernels package (import name ``kernels``) and
transformers' detection of it are not fooled, and both packages import side by side.

The install is reproduced without compiling again: ``pycomm/`` (with the extension already built
in place) plus the folders setup.py's ``package_dir`` maps into it, in a fresh directory that a
``python -S`` subprocess sees instead of the checkout or an editable install.
"""
import ast
import os
import pathlib
import runpy
import shutil
import site
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("transformers")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _package_dirs() -> dict:
    """setup.py's PACKAGE_DIRS, read without running setup()."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PACKAGE_DIRS":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no PACKAGE_DIRS")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    skip = shutil.ignore_patterns("__pycache__", "results")
    shutil.copytree(ROOT / "pycomm", target / "pycomm", ignore=skip)
    for package, folder in _package_dirs().items():
        shutil.copytree(ROOT / folder, target.joinpath(*package.split(".")), ignore=skip)
    return target


def _run(code: str, *path, cwd) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, path), *site.getsitepackages()]))
    env.pop("PYCOMM_KERNELS_BACKEND", None)
    out = subprocess.run([sys.executable, "-S", "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_only_pycomm_installed_then_side_by_side_with_hugging_face_kernels(installed, tmp_path):
    assert sorted(p.name for p in installed.iterdir()) == ["pycomm"]
    hub = tmp_path / "hub"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(hub),
                          "kernels"], capture_output=True, text=True, timeout=240)
    if pip.returncode != 0:
        pytest.skip(f"could not install Hugging Face's kernels from PyPI: {pip.stderr.strip()[-300:]}")
    # one interpreter (importing torch and transformers twice costs 20 s here): pycomm alone, then
    # Hugging Face's package put on the path beside it
    out = _run(f"""
        import importlib, importlib.metadata, importlib.util, sys
        from transformers.utils import import_utils
        import pycomm
        from pycomm import kernels as pk
        assert pk.__name__ == "pycomm.kernels" and callable(pk.patch) and pycomm.kernels is pk
        assert importlib.util.find_spec("kernels") is None and importlib.util.find_spec("bench") is None
        assert import_utils._is_package_available("kernels", return_version=True) == (False, "N/A")
        assert not import_utils.is_kernels_available()
        from pycomm import cli
        try:
            cli.main(["bench", "--help"])      # `pycomm bench`
        except SystemExit as e:
            assert e.code == 0

        sys.path.append({str(hub)!r})
        importlib.invalidate_caches()
        import kernels
        assert callable(kernels.get_kernel) and not hasattr(kernels, "patch")   # Hugging Face's
        assert callable(pk.patch) and pk is not kernels                         # pycomm's, still
        # transformers sees Hugging Face's package and its version, not pycomm's
        assert import_utils._is_package_available("kernels", return_version=True) == (
            True, importlib.metadata.version("kernels"))
        print("ok", pk.__file__, kernels.__file__)
    """, installed, cwd=tmp_path)
    assert "usage: python -m bench" in out
    ok = out.splitlines()[-1].split()
    assert ok[0] == "ok" and ok[1].startswith(str(installed)) and ok[2].startswith(str(hub)), out


def test_bench_from_the_checkout(capsys, monkeypatch):
    # `python -m bench` / `make bench` from the repository root keep working
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setattr(sys, "argv", ["bench", "kernels", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("bench", run_name="__main__")
    assert e.value.code == 0 and "python -m bench kernels" in capsys.readouterr().out


def test_checkout_folder_imported_as_kernels_is_the_one_copy():
    # From a checkout's root the folder is also importable as `kernels` (transformers imports it
    # while probing for Hugging Face's package): that must not register the ops a second time.
    out = subprocess.run([sys.executable, "-c", "import kernels, pycomm.kernels as pk; "
                          "print(kernels is pk, kernels.__name__)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "pycomm.kernels"], out.stdout + out.stderr[-2000:]
