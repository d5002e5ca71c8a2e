"""Every Triton kernel config compiles for Hopper (sm_90) and Ampere (sm_80), fits its shared memory
and the pruning estimate, and spills no registers in float16 (bench/compile_check.py).

Compiling everything takes far more than the test budget on 2 cores, so this checks the compile
reports committed in bench/compile_reports/ against the current kernel sources and configs
(a missing or stale report is compiled, up to 4; more fail with what to run), and compiles two
reports again to check they still match."""
import os
import pathlib
import subprocess
import sys

import pytest
import triton

ROOT = pathlib.Path(__file__).resolve().parents[2]
REPORTS = ROOT / "bench" / "compile_reports" / f"triton-{triton.__version__}.json"


@pytest.mark.skipif(not REPORTS.exists(), reason=f"no compile reports for triton {triton.__version__} in "
                    "bench/compile_reports/: run `make compile-check` to make them")
def test_every_kernel_config_compiles_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "pycomm.bench.compile_check", "--verify", "2", "--max-compile", "4"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " clean; " in run.stdout
