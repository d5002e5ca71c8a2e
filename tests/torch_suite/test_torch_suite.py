"""torch's own distributed test suite with BACKEND=pycomm against BACKEND=gloo: every test
that passes with gloo must pass with pycomm (runner.py runs them, suite_case.py says how the
tests are selected so that pycomm runs exactly the tests gloo runs).

This is the CI part, run by `make test`: a subset of the suite chosen by test name (CI_TESTS
below: the collectives, point-to-point, object collectives, timeouts, subgroups and DDP on CPU;
no test named for CUDA or NCCL), at world sizes 2 and 3, gloo and pycomm in the same run.  It
takes about 4-5 minutes on 2 cores.  `make test-torch-suite` runs all 285 tests.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402

pytest.importorskip("expecttest", reason="torch's test suite needs expecttest (pip install '.[test]')")

# The rule, on names only: tests whose name starts with one of these...
CI_PREFIXES = (
    "test_all_gather", "test_all_reduce", "test_broadcast", "test_reduce", "test_gather", "test_scatter",
    "test_barrier", "test_send_recv", "test_isend", "test_irecv", "test_batch_isend_irecv",
    "test_sparse_all_reduce", "test_get_", "test_Backend_enum", "test_destroy_", "test_new_subgroups",
    "test_monitored_barrier", "test_accumulate_gradients_no_sync", "test_DistributedDataParallelCPU",
    "test_ddp_logging_data_cpu", "test_static_graph_api_cpu",
)
# ...and does not contain one of these (GPU-only tests: they only spawn ranks to skip).
CI_EXCLUDE = ("cuda", "nccl", "gpu")


def ci_tests(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith(CI_PREFIXES) and not any(x in n for x in CI_EXCLUDE)]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("world_size", [2, 3])
def test_pycomm_passes_what_gloo_passes(world_size):
    tests = ci_tests(runner.list_tests())
    assert len(tests) > 80, f"the rule picked only {len(tests)} tests: {tests}"
    report = runner.compare(tests, [world_size], timeout=120, config_timeout=400, start_method="fork")
    text = runner.summary(report)
    print(text)
    gloo = report["configs"][f"gloo/{world_size}"]["counts"]
    # A broken set-up fails every test for both backends, which would show no difference.
    assert gloo[runner.FAIL] == 0 and gloo[runner.PASS] > 50, "gloo itself failed:\n" + text
    wrong = runner.unexplained(report)[f"pycomm/{world_size}"]
    assert not [t for t in wrong if t not in runner.PENDING], text
    if wrong:
        pytest.xfail("only tests that need another branch differ: " +
                     ", ".join(f"{t} ({runner.PENDING[t]})" for t in wrong))
