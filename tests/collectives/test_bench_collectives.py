"""The collectives benchmark runs end to end: tables, #wrong, JSON and plot."""
import json
import os
import subprocess
import sys

# nccl-tests' bus factors for n = 2 ranks (doc/PERFORMANCE.md)
FACTORS = {"all_reduce": 1.0, "reduce_scatter": 0.5, "all_gather": 0.5, "broadcast": 1.0,
           "reduce": 1.0, "gather": 0.5, "scatter": 0.5, "all_to_all": 0.5}


def test_bench_collectives_end_to_end(tmp_path):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "-n", "2", "-b", "8", "-e", "64K", "-f", "64", "-i", "3",
         "-a", "ring,tree,auto", "--no-progress", "--json", str(js), "--plot", str(png)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for op in FACTORS:
        assert f"# {op} on 2 processes" in proc.stdout
    assert "Out of bounds values : 0 OK" in proc.stdout
    rows = json.loads(js.read_text())["rows"]
    assert {r["op"] for r in rows} == set(FACTORS)
    assert all(r["wrong"] == 0 and r["busbw"] > 0 and "gloo_time_us" in r for r in rows)
    for r in rows:
        assert abs(r["busbw"] - r["algbw"] * FACTORS[r["op"]]) < 1e-9
    assert png.stat().st_size > 10_000


def test_bench_repeat_prints_median_and_spread_with_the_machine_counters(tmp_path):
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "-n", "2", "-o", "all_reduce", "-b", "8", "-e", "4K", "-f", "512",
         "-i", "2", "-a", "ring", "--repeat", "2", "--no-progress", "--json", str(js), "--plot", str(png)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "# repeat 2 of 2" in proc.stdout and "min-max busbw" in proc.stdout and "memcpy" in proc.stdout
    assert "# reduction (float32 sum" in proc.stdout and "single copy's read" in proc.stdout
    data = json.loads(js.read_text())
    assert data["machine"]["repeat"] == 2
    # What more reduction threads and cross-memory attach would give on this machine.
    assert data["machine"]["reduce_gbps"]["1"] > 0 and data["machine"]["memcpy_gbps"] > 0
    assert data["machine"]["cma_gbps"] is None or data["machine"]["cma_gbps"] > 0
    for r in data["rows"]:
        assert r["repeats"] == 2 and len(r["busbw_runs"]) == 2 and len(r["gloo_busbw_runs"]) == 2
        assert r["busbw_min"] <= r["busbw"] <= r["busbw_max"]
        assert r["memcpy_gbps"] > 0 and r["wait_us"] >= 0 and r["ivcsw"] >= 0 and "gloo_wait_us" in r
    assert png.stat().st_size > 10_000


def test_bench_modes_alternates_pycomm_and_open_mpi(tmp_path):
    js = tmp_path / "m.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "modes", "--rounds", "2", "--size", "64K", "--iters", "20",
         "--json", str(js)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rounds = json.loads(js.read_text())["rounds"]
    assert len(rounds) == 2 and all(r["pycomm_us"] > 0 and r["steal_pct"] >= 0 for r in rounds)
    if "no Open MPI" in proc.stdout:
        assert all(r["mpi_us"] is None for r in rounds)
    else:
        assert all(r["mpi_us"] > 0 for r in rounds) and "# Open MPI: median" in proc.stdout


def test_bench_anchor_mpi_adds_rows_or_says_how(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "-n", "2", "-o", "all_reduce,all_to_all", "-b", "8", "-e", "4K",
         "-f", "512", "-i", "3", "-a", "ring", "--no-gloo", "--no-progress", "--plot", "", "--anchor", "mpi"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    if "no Open MPI rows" in proc.stdout:
        assert "apt-get install openmpi-bin" in proc.stdout and "pip install mpi4py" in proc.stdout
    else:
        assert "mpi(us)" in proc.stdout and "vs mpi" in proc.stdout


def test_bench_simulated_hosts_runs_the_hierarchical_all_reduce(tmp_path):
    js = tmp_path / "h.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "-n", "2", "--hosts", "2", "-o", "all_reduce", "-b", "8",
         "-e", "4K", "-f", "512", "-i", "2", "--no-progress", "--plot", "", "--json", str(js)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYCOMM_DEBUG": "INFO"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "as 2 simulated hosts" in proc.stdout and "hierarchical" in proc.stdout
    data = json.loads(js.read_text())
    assert data["machine"]["hosts"] == 2 and all(r["wrong"] == 0 for r in data["rows"])


def test_simulated_hosts_must_divide_the_processes():
    import pytest

    import pycomm.launch

    with pytest.raises(ValueError, match="hosts=2 must divide nprocs=3"):
        pycomm.launch.run(print, 3, hosts=2)
