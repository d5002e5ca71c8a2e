"""`python -m bench.gpu_summary DIR`: the markdown table of one `make gpu-check` run.

Reads what bench/gpu_check.sh left in DIR -- env.txt, the pytest junit files (``test_*.xml``),
kernels.json (``bench kernels``) and collectives.json (``bench --device cuda``) -- and writes
DIR/summary.md: the machine, one line per test file, every kernel row with its ratio to the
anchor timed in the same run, the kernel families each autotune bucket chose, and the
collectives at three message sizes against the device copy.  Parts whose files are missing
(a step not run yet) are left out, so it can run after every step.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import xml.etree.ElementTree as ET

COLLECTIVE_SIZES = (8, 1 << 20, 16 << 20)  # latency, mid and bandwidth regimes of the quick run


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def _num(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _tests(d: pathlib.Path) -> list[str]:
    rows = []
    for f in sorted(d.glob("test_*.xml")):
        try:
            root = ET.parse(f).getroot()
        except ET.ParseError:
            rows.append([f.stem, "", "", "", "unreadable junit file (killed at its time limit?)"])
            continue
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        failed = [f"{c.get('name')}" for c in root.iter("testcase") if c.find("failure") is not None
                  or c.find("error") is not None]
        passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
        rows.append([f.stem, passed, n["failures"] + n["errors"], n["skipped"], ", ".join(failed[:5])])
    if not rows:
        return []
    return ["## Tests", ""] + _table(["file", "passed", "failed", "skipped", "failing tests"], rows)


def _kernels(d: pathlib.Path) -> list[str]:
    path = d / "kernels.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if data.get("mode") != "gpu-timings":
        return ["## Kernels", "", f"kernels.json holds a {data.get('mode')} run, not GPU timings.", ""]
    rows = [[r["group"], r["provider"] + (" (anchor)" if r.get("anchor") else ""), _num(r.get("ms"), ".4f"),
             _num(r.get("tflops"), ".1f"), _num(r.get("gbps"), ".0f"), _num(r.get("ratio_vs_anchor"), ".2f") + "x",
             _num(r.get("peak_mem_mb"), ".0f")] for r in data["rows"]]
    out = ["## Kernels", "", f"Device copy: {data.get('copy_gbps', 0):.0f} GB/s (read + write). Ratios are to "
           "the anchor of each group, timed in the same run; > 1 is faster.", ""]
    out += _table(["group", "provider", "ms", "TFLOP/s", "GB/s", "vs anchor", "peak MiB"], rows)
    choices = data.get("variant_choices") or {}
    rows = [[op, c["key"], c["variant"], ", ".join(f"{k} {v:.4f} ms" for k, v in c["ms"].items())]
            for op, cs in choices.items() for c in cs]
    if rows:
        out += ["Kernel families chosen per autotune bucket:", ""]
        out += _table(["op", "bucket key", "chosen", "timed"], rows)
    return out


def _collectives(d: pathlib.Path) -> list[str]:
    path = d / "collectives.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    rows = [[r["op"], r["size"], r.get("type", ""), r.get("algorithm", ""), _num(r.get("time_us"), ".1f"),
             _num(r.get("busbw"), ".2f"), _num(r.get("busbw_vs_copy"), ".3f"), r.get("wrong", "")]
            for r in data.get("rows", []) if r.get("size") in COLLECTIVE_SIZES]
    return [f"## Collectives ({data.get('nprocs')} ranks)", ""] + _table(
        ["op", "bytes", "type", "algorithm", "time us", "busbw GB/s", "busbw / copy", "wrong"], rows)


def summarize(d: pathlib.Path) -> str:
    env = (d / "env.txt").read_text().strip() if (d / "env.txt").exists() else "(no env.txt)"
    lines = [f"# GPU check: {d.name}", "", "```", env, "```", ""]
    lines += _tests(d) + _kernels(d) + _collectives(d)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_summary", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=pathlib.Path)
    args = p.parse_args(argv)
    text = summarize(args.dir)
    (args.dir / "summary.md").write_text(text + "\n")
    print(f"wrote {args.dir / 'summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
