"""`python -m bench.compile_check [--update] [--arch 90 80] [--jobs N]`: every Triton kernel in
``kernels/``, compiled ahead of time for Hopper (sm_90) and Ampere (sm_80) on a machine without a GPU
(both by default; the Hopper-native TMA kernels for sm_90 only).

What it compiles: the op launchers are called with small CPU tensors for every dtype and
constexpr combination in ``MATRIX`` below, with Triton's launch replaced by a recorder; each
autotuned kernel contributes every config its autotuner would consider on that target (after
``kernels/_tuning.py`` prunes by the target's shared memory).  Each record is bound by Triton's own
binder (so pointer alignment and integer specialisation are Triton's) and compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``.

What fails the check (exit status 1, one line per finding):
* a compile error;
* shared memory over the target's per-block limit (``_tuning.SHARED_MEMORY_LIMIT``);
* a config whose shared memory is larger than the kernel's pruning estimate (the pruning would
  let a config through that does not fit);
* a register spill (ptxas's "spill stores") in a 16-bit config the autotuner would consider.

Compiling everything takes far longer than the CI budget on 2 cores (seconds per 16-bit config,
tens of seconds per fp32 one), so results live in a cache committed with the repository:
``bench/compile_reports/triton-<version>.json``, keyed by a hash of the kernel's source (Triton's
``cache_key`` without its line number; it covers the jit functions it calls), the bound signature, constexprs,
alignment attributes, compile options, target and Triton version.  ``make test`` runs
``--verify 2``: every record must have a current entry (a stale or missing one is compiled, up to
``--max-compile``; beyond that the check fails and says to run ``make compile-check``), and two
entries, chosen by the source hash, are compiled again and must match the cache exactly.
``make compile-check`` (``--update``) compiles whatever is missing and rewrites the cache.

Another Triton: run the same command with that Triton's Python, e.g.
``make compile-check PY=/path/to/venv-triton-3.6/bin/python``; it writes its own cache file.
Must run without ``TRITON_INTERPRET`` (the kernels must be built for the compiler).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import pathlib
import re
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("bench.compile_check compiles kernels: run it without TRITON_INTERPRET set")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from pycomm.kernels import _tuning  # noqa: E402

REPORTS = pathlib.Path(__file__).resolve().parent / "compile_reports"
SIXTEEN_BIT = ("*fp16", "*bf16")

# The dtype x constexpr matrix the launchers are driven through.  Shapes are aligned (multiples of
# 16, as model dimensions are); ragged sizes change only Triton's alignment specialisation.
# FULL is every combination the launchers can produce; CI is the subset `make test` keeps current:
# float16 (bfloat16 compiles to the same tiles and instructions with another conversion; float32
# takes 10-90 s a config), the plainest and the heaviest matmul epilogue, causal attention (the
# unmasked path is the same code minus a mask), head dims 64 and 128 (80 pads to 128's tiles;
# 256 is in FULL).
FULL = dict(dtypes=(torch.float16, torch.bfloat16, torch.float32), tf32=True,
            epilogues=[(act, bias, save) for act in ("none", "relu", "gelu", "gelu_tanh", "silu")
                       for bias in (False, True) for save in ((False, True) if act != "none" else (False,))],
            head_dims=(64, 80, 128, 256), causal=(False, True))
CI = dict(FULL, dtypes=(torch.float16,), tf32=False, epilogues=[("none", False, False), ("gelu", True, True)],
          head_dims=(64, 128), causal=(True,))
# 16-bit spills accepted, each with why: (kernel, start of the config's text, constexprs that must
# match, arch, most bytes) -> reason.  Anything else that spills fails the check.
_ROW_REASON = ("a 65,536-wide row held in registers (the launcher's only choice: one row per program, "
               "64 values a thread at 16 warps); rows this wide need a looped two-pass kernel, not written yet")
_TWO_WARP_REASON = ("4 bytes (one register) in a 2-warp tile at 96 registers: ptxas's choice, not register "
                    "pressure; the same tile in the other operand layout does not spill")
EXPLAINED_SPILLS = {
    # sm_90: when B is read K-major (dz @ w in the backward); sm_80: when A is read M-major (a.T @ dz)
    ("_matmul_kernel", "BLOCK_M: 64, BLOCK_N: 32, BLOCK_K: 32, GROUP_M: 8, num_warps: 2", (), 90, 16):
        _TWO_WARP_REASON,
    ("_matmul_kernel", "BLOCK_M: 32, BLOCK_N: 64, BLOCK_K: 32, GROUP_M: 8, num_warps: 2", (), 80, 16):
        _TWO_WARP_REASON,
    ("_rms_norm_bwd_kernel", "", (("HAS_DRES", "False"), ("BLOCK_N", "1024")), 90, 8):
        "8 bytes (two registers) on triton 3.6 only, a 1,024-wide row at 4 warps; triton 3.9 compiles it clean",
    # triton 3.6 on sm_80 only (3.9 compiles these clean, and so does 3.6 for sm_90): two registers
    **{(kernel, config, (("HEAD_DIM", "64"),), 80, 8): "8 bytes (two registers) with triton 3.6 on sm_80 only"
       for kernel, config in (
           ("_attn_fwd_kernel", "BLOCK_M: 128, BLOCK_N: 64, num_warps: 8, num_ctas: 1, num_stages: 3"),
           ("_attn_bwd_dkdv_kernel", "BLOCK_M: 32, BLOCK_N: 64, num_warps: 4, num_ctas: 1, num_stages: 3"),
           ("_attn_bwd_dq_kernel", "BLOCK_M: 64, BLOCK_N: 64, num_warps: 4, num_ctas: 1, num_stages: 2"))},
    # the 65,536-wide rows, on both targets (most bytes: the worst seen on triton 3.6 or 3.9, rounded up)
    **{(kernel, "", (("BLOCK_N", "65536"),), arch, most): _ROW_REASON for arch in (90, 80)
       for kernel, most in (("_rms_norm_fwd_kernel", 512), ("_rms_norm_bwd_kernel", 9216),
                            ("_layer_norm_fwd_kernel", 512), ("_layer_norm_bwd_kernel", 10240))},
}
ROW_WIDTHS = (1024, 8192, 65536)  # row kernels: the three num_warps regimes of row_settings
VOCABS = (32000, 50257)


def _mod(name):
    return importlib.import_module(f"pycomm.kernels.{name}")


def _drive(dtype, matrix, arch):
    """Call every launcher once per constexpr combination of ``matrix`` with CPU tensors of ``dtype``."""
    t = lambda *shape: torch.zeros(shape, dtype=dtype)  # noqa: E731
    mm = _mod("matmul")
    M, K, N = 256, 512, 384
    a, b, bias = t(M, K), t(K, N), t(N)
    for act, has_bias, save in matrix["epilogues"]:
        mm.mm(a, b, bias if has_bias else None, act, save)
        if act != "none":
            mm.activation_bwd(t(M, N), t(M, N), act)
    dz = t(M, N)
    mm.mm(dz, b.t())  # da = dz @ b.T (transposed strides)
    mm.mm(a.t(), dz)  # db = a.T @ dz
    tma = _mod("matmul_tma")
    if arch >= 90 and tma.HAS_DESCRIPTORS:  # the Hopper variant: TMA needs sm_90
        w = t(N, K)
        for act, has_bias, save in matrix["epilogues"]:
            tma.mm_tma(a, w.t(), bias if has_bias else None, act, save)
        tma.mm_tma(a, b)
        tma.mm_tma(a.t(), dz)  # the weight gradient: A read M-major
    fa, fa_tma = _mod("flash_attention"), _mod("flash_attention_tma")
    for d in matrix["head_dims"]:
        q, k, v = t(1, 4, 128, d), t(1, 2, 128, d), t(1, 2, 128, d)
        for causal in matrix["causal"]:
            o = torch.empty_like(q)
            lse = fa.attention_fwd(q, k, v, o, causal, 0.125)
            grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            fa.attention_bwd(q, k, v, o, lse, o, *grads, causal, 0.125)
            if arch >= 90 and tma.HAS_DESCRIPTORS:  # the Hopper variant
                flags = fa._flags(d, dtype)
                fa_tma.attention_fwd_tma(q, k, v, o, lse, causal, 0.125, False, flags)
                fa_tma.attention_bwd_tma(q, k, v, o, lse, lse, *grads, causal, 0.125, False, flags)
    bg, ln, rn = _mod("bias_gelu"), _mod("layer_norm"), _mod("rms_norm")
    for n in ROW_WIDTHS:
        x, w = t(4, n), t(n)
        for act in ("gelu", "gelu_tanh"):
            bg._fwd(x, w, act)
            bg._bwd(x, x, w, act)
        y, mean, rstd = ln._fwd(x, w, w, 1e-5)
        ln._bwd(x, x, w, mean, rstd)
        for res in (None, x):
            y, h, rstd = rn._fwd(x, res, w, 1e-6)
            rn._bwd(x, h, x, w, rstd)
    ce = _mod("cross_entropy")
    for vocab in VOCABS:
        logits, target = t(4, vocab), torch.zeros(4, dtype=torch.long)
        loss, lse = ce._fwd(logits, target, -100)
        ce._bwd(loss, logits, target, lse, -100)
    fam, sw = _mod("fused_add_mul"), _mod("swiglu")
    x = t(8, 256)
    fam._fwd(x, x, x, x)
    fam._bwd(x, x, t(256), x)  # a broadcast operand: fp32 gradient buffers
    for act in sw.GATED:
        sw._fwd(x, x, act)
        sw._bwd(x, x, x, act)


@dataclasses.dataclass
class Job:
    kernel: str
    arch: int
    key: str
    fn: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    config: str  # the autotune config, "" for a kernel launched with fixed parameters
    estimate: int | None  # the pruning estimate of shared memory, when the kernel has one

    @property
    def sixteen_bit(self) -> bool:
        return next(iter(self.signature.values())) in SIXTEEN_BIT


def _job(fn, arch, backend, args, kwargs, config, estimate) -> Job:
    kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    opts = dict(sorted(options.__dict__.items()))
    opts.pop("extern_libs", None)  # a path on this machine, not part of the kernel
    # Triton's cache_key ends with the kernel's first line number: an edit above the kernel in
    # its file would make every entry stale without changing the code, so that suffix is cut.
    source = fn.cache_key[:-len(str(fn.starting_line_number))]
    text = repr((source, sorted(signature.items()), sorted(constexprs.items(), key=str),
                 sorted(attrs.items(), key=str), sorted(opts.items()), arch, triton.__version__))
    key = hashlib.sha256(text.encode()).hexdigest()[:24]
    return Job(fn.__name__, arch, key, fn, signature, constexprs, attrs, options.__dict__, config, estimate)


def collect(arch: int, matrix: dict) -> list[Job]:
    """Every (kernel, config, specialisation) the launchers produce for ``arch``, deduplicated."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    jobs: dict[str, Job] = {}

    def record_jit(self, *args, grid=None, warmup=False, **kwargs):
        job = _job(self, arch, backend, args, kwargs, _CONFIG.get("config", ""), _CONFIG.get("estimate"))
        jobs.setdefault(job.key, job)

    def record_autotuned(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        prune = getattr(self, "early_config_prune", None)
        estimate = getattr(prune, "estimate", None)
        for config in self.prune_configs({k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}):
            _CONFIG["config"] = str(config)
            named = {**self.nargs, **kwargs}
            t = next(v for v in named.values() if isinstance(v, torch.Tensor))
            _CONFIG["estimate"] = estimate(config, t.element_size(), named) if estimate else None
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        _CONFIG.clear()

    saved = (JITFunction.run, Autotuner.run, _tuning.BucketedAutotuner.run)
    JITFunction.run = record_jit
    Autotuner.run = _tuning.BucketedAutotuner.run = record_autotuned
    try:
        with _tuning.target_limit(_tuning.SHARED_MEMORY_LIMIT[arch], arch):
            for dtype in matrix["dtypes"]:
                _drive(dtype, matrix, arch)
            if matrix["tf32"]:
                torch.backends.cuda.matmul.allow_tf32 = True  # fp32 with PRECISION="tf32"
                try:
                    _drive(torch.float32, matrix, arch)
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = False
    finally:
        JITFunction.run, Autotuner.run, _tuning.BucketedAutotuner.run = saved
    return list(jobs.values())


_CONFIG: dict = {}
_JOBS: dict[str, Job] = {}  # filled before forking the compile workers
_PTXAS = {"regs": r"Used (\d+) registers", "spill": r"(\d+) bytes spill stores", "stack": r"(\d+) bytes stack frame"}


def compile_job(key: str) -> dict:
    """Compile one job; its figures (or its error) as a JSON-able dict."""
    job = _JOBS[key]
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its log
    log = io.StringIO()
    start = time.perf_counter()
    out = {"kernel": job.kernel, "arch": job.arch, "config": job.config,
           "dtype": next(iter(job.signature.values())),
           "constexprs": {str(job.fn.arg_names[k[0]]): str(v) for k, v in job.constexprs.items()}}
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(job.fn, job.signature, job.constexprs, job.attrs),
                                      target=GPUTarget("cuda", job.arch, 32), options=job.options)
        out["shared"] = int(compiled.metadata.shared)
        for name, pattern in _PTXAS.items():
            found = re.search(pattern, log.getvalue())
            out[name] = int(found.group(1)) if found else 0
    except Exception as e:  # noqa: BLE001 - a compile error is a finding, reported with its message
        out["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def findings(jobs: list[Job], cache: dict) -> list[str]:
    bad = []
    for job in jobs:
        r = cache[job.key]
        where = f"{job.kernel} sm_{job.arch} {r['dtype']} {r['config'] or 'fixed'} {r['constexprs']}"
        limit = _tuning.SHARED_MEMORY_LIMIT[job.arch]
        if "error" in r:
            bad.append(f"compile error: {where}: {r['error']}")
            continue
        if r["shared"] > limit:
            bad.append(f"shared memory {r['shared']} B > {limit} B: {where}")
        if job.estimate is not None and r["shared"] > job.estimate:
            bad.append(f"shared memory {r['shared']} B > pruning estimate {job.estimate} B: {where}")
        explained = any(job.kernel == k and job.config.startswith(c) and job.arch == a and r["spill"] <= most
                        and all(r["constexprs"].get(n) == v for n, v in match)
                        for k, c, match, a, most in EXPLAINED_SPILLS)
        if job.sixteen_bit and r["spill"] and not explained:
            bad.append(f"{r['spill']} B register spill in a 16-bit config: {where}")
    return bad


def _cache_path() -> pathlib.Path:
    return REPORTS / f"triton-{triton.__version__}.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(_tuning.SHARED_MEMORY_LIMIT))
    p.add_argument("--update", action="store_true", help="compile every missing entry and rewrite the cache")
    p.add_argument("--max-compile", type=int, default=8, help="without --update: most missing entries to compile")
    p.add_argument("--verify", type=int, default=0, help="recompile this many cached entries and compare")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--list", action="store_true", help="print the records and exit")
    p.add_argument("--full", action="store_true", help="every combination the launchers can produce (hours)")
    args = p.parse_args(argv)

    start = time.perf_counter()
    jobs = [j for arch in args.arch for j in collect(arch, FULL if args.full else CI)]
    _JOBS.update({j.key: j for j in jobs})
    path = _cache_path()
    cache = json.loads(path.read_text()) if path.exists() else {}
    # 16-bit first: they compile in seconds, fp32 ones in tens of seconds
    missing = [j.key for j in sorted(jobs, key=lambda j: not j.sixteen_bit) if j.key not in cache]
    print(f"{len(jobs)} kernel specialisations for sm_{'/sm_'.join(map(str, args.arch))} on triton "
          f"{triton.__version__} ({time.perf_counter() - start:.1f} s to enumerate); {len(missing)} not in {path.name}")
    if args.list:
        for j in jobs:
            print(j.kernel, j.arch, j.key, j.config, j.signature.get(next(iter(j.signature))), j.estimate)
        return 0
    if missing and not args.update and len(missing) > args.max_compile:
        print(f"FAIL: {len(missing)} kernel specialisations have no current compile report (kernel source, "
              f"configs or triton changed). Run `make compile-check` and commit bench/compile_reports/{path.name}")
        return 1
    # Re-verified entries: quick ones (under 15 s when recorded), a different pick for every
    # state of the cache.
    quick = sorted(k for k in cache.keys() & _JOBS.keys() if cache[k].get("seconds", 99) < 15)
    salt = hashlib.sha256("".join(quick).encode()).hexdigest()
    sample = sorted(quick, key=lambda k: hashlib.sha256((k + salt).encode()).hexdigest())[:args.verify]
    todo = missing + sample
    if todo:
        ctx = multiprocessing.get_context("fork")  # the workers inherit _JOBS
        with ctx.Pool(max(1, min(args.jobs, len(todo)))) as pool:
            for done, (key, report) in enumerate(zip(todo, pool.imap(compile_job, todo)), 1):
                if key in sample:
                    old = {k: v for k, v in cache[key].items() if k != "seconds"}
                    new = {k: v for k, v in report.items() if k != "seconds"}
                    if old != new:
                        print(f"FAIL: cached report of {key} differs from a fresh compile:\n  {old}\n  {new}")
                        return 1
                cache[key] = report
                if args.update and done % 20 == 0:
                    print(f"  {done}/{len(todo)} compiled", flush=True)
                    _write(path, cache, args.arch)
        if args.update:
            _write(path, cache, args.arch)
    bad = findings(jobs, cache)
    for line in bad:
        print("FAIL:", line)
    total = sum(cache[j.key].get("seconds", 0) for j in jobs)
    print(f"{len(jobs) - len(bad)}/{len(jobs)} clean; compiling all of them took {total:.0f} s of one core; "
          f"this run {time.perf_counter() - start:.0f} s ({len(missing)} compiled, {len(sample)} re-verified)")
    return 1 if bad else 0


def _write(path: pathlib.Path, cache: dict, arches: list[int]) -> None:
    # Entries of the compiled arches that no launcher produces any more are dropped.
    path.parent.mkdir(parents=True, exist_ok=True)
    live = {k: v for k, v in cache.items() if k in _JOBS or v["arch"] not in arches}
    path.write_text(json.dumps(dict(sorted(live.items())), indent=0, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
