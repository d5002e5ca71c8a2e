"""Runs torch's distributed test suite (DistributedTest._DistTestBase from the installed
torch) for pycomm and for gloo, and compares them.

    python tests/torch_suite/runner.py                      # all tests, gloo and pycomm, world sizes 2 and 3
    python tests/torch_suite/runner.py -k all_gather -k reduce --world-sizes 2
    python tests/torch_suite/runner.py --tests test_scatter,test_gather --json out.json
    python tests/torch_suite/runner.py one --backend pycomm --world-size 2 --json r.jsonl --tests test_x,...

The comparison runs each (backend, world size) in its own Python process (torch reads BACKEND
and WORLD_SIZE when it imports the suite; suite_case.py says how pycomm is made to run exactly
the tests gloo runs), collects every test's outcome, prints run/passed/failed/skipped per
backend and world size, and lists the tests that pass with gloo and not with pycomm.  It exits
1 if there is any, except those that torch itself fails for every plugin backend (TORCH_BLOCKS,
listed with the reason).  `make test-torch-suite` runs all of it (about 8 minutes on 2 cores).

Every test has a limit (--timeout, torch's DISTRIBUTED_TESTS_DEFAULT_TIMEOUT): a hung test's
ranks are killed and it counts as failed.  A whole configuration also has one (--config-timeout):
if it is passed, the tests that did not report are counted as failed ("no result").
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))

# Tests that pass with gloo and that torch itself fails for every plugin backend: reported,
# and not counted against pycomm.  (README, "The torch.distributed backend".)
TORCH_BLOCKS = {
    "test_ddp_logging_data_cpu":
        "DDP logs ProcessGroup::getBackendName(), which torch writes as \"custom\" for every plugin "
        "backend, and the test expects dist.get_backend()'s \"pycomm\"",
    "test_monitored_barrier_gloo":
        "torch.distributed.monitored_barrier() raises ValueError for every backend but gloo "
        "(ProcessGroup.monitored_barrier() reaches pycomm's: test_monitored_barrier_gloo_rank_0_timeout)",
    "test_monitored_barrier_gloo_subgroup":
        "torch.distributed.monitored_barrier() raises ValueError for every backend but gloo",
}

# Tests that need pycomm's point-to-point engine to receive from any source, which another
# branch (p2p) brings; they fail here until it is merged, and count as failures.
PENDING = {
    t: "receive from any source: pycomm's point-to-point engine (branch p2p)"
    for t in ("test_send_recv_any_source", "test_send_recv_any_source_autograd_profiler",
              "test_send_recv_any_source_torch_profiler")
}
BACKENDS = ("gloo", "pycomm")
PASS, FAIL, SKIP = "passed", "failed", "skipped"


# ---------------------------------------------------------------------------- one configuration


class _Recorder(unittest.TextTestResult):
    """Writes each outcome to a JSON-lines file as soon as it is known (a configuration that is
    killed still leaves the outcomes so far)."""

    def __init__(self, stream, descriptions, verbosity, out=None):
        super().__init__(stream, descriptions, verbosity)
        self.out = out
        self.started = 0.0

    def startTest(self, test):
        self.started = time.monotonic()
        super().startTest(test)

    def _record(self, test, status, detail=""):
        name = test.id().rsplit(".", 1)[-1]
        rec = {"test": name, "status": status, "seconds": round(time.monotonic() - self.started, 2),
               "detail": detail[-3000:]}
        self.out.write(json.dumps(rec) + "\n")
        self.out.flush()

    def addSuccess(self, test):
        super().addSuccess(test)
        self._record(test, PASS)

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._record(test, FAIL, self.failures[-1][1])

    def addError(self, test, err):
        super().addError(test, err)
        self._record(test, FAIL, self.errors[-1][1])

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._record(test, SKIP, reason)

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._record(test, PASS, "expected failure")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._record(test, FAIL, "unexpected success")


def run_one(backend: str, world_size: int, tests: list[str], out_path: str, timeout: int,
            start_method: str) -> int:
    """In this process: the named tests for one backend and world size; outcomes to out_path
    (JSON lines).  Must run in a fresh interpreter (see the module docstring)."""
    tmp = tempfile.mkdtemp(prefix="torch-suite-")
    os.environ.update({
        "BACKEND": backend, "WORLD_SIZE": str(world_size), "TEMP_DIR": tmp,
        "INIT_METHOD": "file://" + os.path.join(tmp, "init_file"),
        "DISTRIBUTED_TESTS_DEFAULT_TIMEOUT": str(timeout),
        "PYCOMM_TORCH_SUITE_START": start_method, "PYTORCH_PRINT_REPRO_ON_FAILURE": "0",
    })
    os.makedirs(os.path.join(tmp, "barrier"), exist_ok=True)
    sys.path.insert(0, HERE)
    import suite_case

    known = set(suite_case.all_tests())
    unknown = [t for t in tests if t not in known]
    if unknown:
        raise SystemExit(f"not tests of torch's suite: {unknown}")
    loader = unittest.TestLoader()
    suite = unittest.TestSuite(loader.loadTestsFromName(t, suite_case.TestDistBackendWithSpawn)
                               for t in tests)
    with open(out_path, "a") as out:
        runner = unittest.TextTestRunner(stream=sys.stderr, verbosity=2,
                                         resultclass=lambda *a: _Recorder(*a, out=out))
        runner.run(suite)
    return 0


# ---------------------------------------------------------------------------- the comparison


def list_tests() -> list[str]:
    """Every test name (in a child interpreter: importing the suite needs BACKEND set)."""
    code = f"import sys; sys.path.insert(0, {HERE!r}); import suite_case; print('\\n'.join(suite_case.all_tests()))"
    env = dict(os.environ, BACKEND="gloo", WORLD_SIZE="2")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return out.stdout.split()


def select(names: list[str], patterns: list[str]) -> list[str]:
    """Tests whose name contains one of the patterns (all with none)."""
    if not patterns:
        return list(names)
    return [n for n in names if any(p in n for p in patterns)]


def run_config(backend: str, world_size: int, tests: list[str], timeout: int, config_timeout: float,
               start_method: str, log=None) -> dict[str, dict]:
    """The outcome of each test for one backend and world size, from a child interpreter."""
    fd, path = tempfile.mkstemp(prefix=f"torch-suite-{backend}-{world_size}-", suffix=".jsonl")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "one", "--backend", backend,
           "--world-size", str(world_size), "--timeout", str(timeout), "--start-method", start_method,
           "--json", path, "--tests", ",".join(tests)]
    start = time.monotonic()
    # Its own session, so that a configuration that overruns goes down with all its ranks.
    proc = subprocess.Popen(cmd, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        proc.wait(timeout=config_timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:  # past the limit, or interrupted (pytest-timeout, Ctrl-C): no rank outlives it
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    results: dict[str, dict] = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            results[rec.pop("test")] = rec
    os.unlink(path)
    for t in tests:
        if t not in results:
            results[t] = {"status": FAIL, "seconds": 0.0,
                          "detail": f"no result (the configuration exited with {proc.returncode} "
                                    f"after {time.monotonic() - start:.0f} s)"}
    return results


def counts(results: dict[str, dict]) -> dict[str, int]:
    c = {"run": 0, PASS: 0, FAIL: 0, SKIP: 0}
    for r in results.values():
        c[r["status"]] += 1
        c["run"] += r["status"] != SKIP
    return c


def differences(gloo: dict[str, dict], other: dict[str, dict]) -> list[str]:
    """Tests that pass with gloo and do not pass with the other backend."""
    return sorted(t for t, r in gloo.items() if r["status"] == PASS and other.get(t, {}).get("status") != PASS)


def compare(tests: list[str], world_sizes: list[int], timeout: int, config_timeout: float,
            start_method: str, log=None, backends=BACKENDS) -> dict:
    report: dict = {"tests": len(tests), "configs": {}}
    for ws in world_sizes:
        for b in backends:
            t0 = time.monotonic()
            res = run_config(b, ws, tests, timeout, config_timeout, start_method, log)
            report["configs"][f"{b}/{ws}"] = {"backend": b, "world_size": ws, "results": res,
                                              "counts": counts(res), "seconds": round(time.monotonic() - t0, 1)}
    report["differences"] = {}
    for ws in world_sizes:
        if f"gloo/{ws}" in report["configs"]:
            g = report["configs"][f"gloo/{ws}"]["results"]
            for b in backends:
                if b != "gloo":
                    report["differences"][f"{b}/{ws}"] = differences(g, report["configs"][f"{b}/{ws}"]["results"])
    return report


def table(report: dict) -> str:
    rows = ["| backend | world size | run | passed | failed | skipped | seconds |",
            "|---|---|---|---|---|---|---|"]
    for cfg in report["configs"].values():
        c = cfg["counts"]
        rows.append(f"| {cfg['backend']} | {cfg['world_size']} | {c['run']} | {c[PASS]} | {c[FAIL]} | "
                    f"{c[SKIP]} | {cfg['seconds']:.0f} |")
    return "\n".join(rows)


def reason(detail: str) -> str:
    """The last exception line of a failure's traceback (or its last line)."""
    lines = [ln.strip() for ln in detail.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Exit|Interrupt)\b", ln)]
    return (errors or lines or [""])[-1][:300]


def summary(report: dict) -> str:
    lines = [f"torch's distributed suite: {report['tests']} tests", table(report)]
    for key, diff in report["differences"].items():
        blocked = [t for t in diff if t in TORCH_BLOCKS]
        lines.append(f"{key}: {len(diff)} tests pass with gloo and not with {key.split('/')[0]}"
                     f" ({len(blocked)} of them blocked by torch for plugin backends)")
        res = report["configs"][key]["results"]
        for t in diff:
            why = f"torch blocks it: {TORCH_BLOCKS[t]}" if t in TORCH_BLOCKS else (
                f"pending: {PENDING[t]}: " if t in PENDING else "") + reason(res[t]["detail"])
            lines.append(f"  {t}: {res[t]['status']}: {why}")
    return "\n".join(lines)


def unexplained(report: dict) -> dict[str, list[str]]:
    """The differences that torch does not explain: pycomm's to fix (PENDING included)."""
    return {k: [t for t in d if t not in TORCH_BLOCKS] for k, d in report["differences"].items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="compare", choices=["compare", "one"])
    p.add_argument("-k", action="append", default=[], help="run the tests whose name contains this (repeatable)")
    p.add_argument("--tests", dest="test_list", default="", help="comma-separated test names")
    p.add_argument("--backend", choices=BACKENDS, help="mode one: the backend")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--world-size", type=int, help="mode one: the world size")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[2, 3])
    p.add_argument("--timeout", type=int, default=180, help="seconds one test may take (default 180)")
    p.add_argument("--config-timeout", type=float, default=2400,
                   help="seconds one backend and world size may take in all")
    p.add_argument("--start-method", default="fork", choices=["fork", "spawn"])
    p.add_argument("--json", help="where to write the report (mode one: JSON lines)")
    p.add_argument("--log", help="file for the configurations' output (default: discarded)")
    a = p.parse_args(argv)
    if a.mode == "one":
        return run_one(a.backend, a.world_size, [t for t in a.test_list.split(",") if t], a.json, a.timeout,
                       a.start_method)
    names = [t for t in a.test_list.split(",") if t] or select(list_tests(), a.k)
    log = open(a.log, "a") if a.log else None  # noqa: SIM115
    report = compare(names, a.world_sizes, a.timeout, a.config_timeout, a.start_method, log,
                     tuple(a.backends.split(",")))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    print(summary(report))
    return 1 if any(unexplained(report).values()) else 0


if __name__ == "__main__":
    sys.exit(main())
