"""bench/gpu_summary.py turns a `make gpu-check` folder into summary.md: checked on the committed
H200 run, plus a junit file with a failure and the kernel-family choices of a newer run."""
import json
import shutil
import subprocess
import sys

from pycomm.bench import gpu_summary

H200 = gpu_summary.pathlib.Path(__file__).resolve().parents[2] / "bench" / "results" / "2026-11-26-h200"

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="2" tests="10"><testcase classname="t" name="test_ok"/><testcase classname="t" name="test_two_shot">
<failure message="boom"/></testcase></testsuite></testsuites>"""


def test_summary_of_a_gpu_check_folder(tmp_path):
    d = tmp_path / "2026-11-26-h200"
    shutil.copytree(H200, d)
    (d / "test_cuda_ipc.xml").write_text(JUNIT)
    (d / "test_cut_short.xml").write_text("<testsuites><testsuite")  # killed mid-write
    data = json.loads((d / "kernels.json").read_text())
    data["variant_choices"] = {"matmul": [{"key": "(2048, 2048)", "variant": "hopper",
                                           "ms": {"portable": 0.0384, "hopper": 0.0301}}]}
    (d / "kernels.json").write_text(json.dumps(data))
    run = subprocess.run([sys.executable, "-m", "pycomm.bench.gpu_summary", str(d)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    text = (d / "summary.md").read_text()
    assert "NVIDIA H200" in text  # env.txt
    assert "| test_cuda_ipc | 7 | 1 | 2 | test_two_shot |" in text
    assert "| test_cut_short |" in text and "unreadable" in text
    assert "| matmul bf16 2048^3 | torch.matmul (cuBLAS) (anchor) |" in text
    assert "| matmul bf16 2048^3 | kernels.matmul | 0.0384 | 446.8 |  | 0.72x |" in text
    assert "| matmul | (2048, 2048) | hopper | portable 0.0384 ms, hopper 0.0301 ms |" in text
    assert "## Collectives (2 ranks)" in text and "| all_reduce | 16777216 |" in text


def test_summary_leaves_out_steps_not_run(tmp_path):
    (tmp_path / "env.txt").write_text("NVIDIA H100")
    text = gpu_summary.summarize(tmp_path)
    assert "NVIDIA H100" in text and "## Kernels" not in text and "## Tests" not in text
