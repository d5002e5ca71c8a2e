"""`python -m bench kernels [--json PATH] [--plot PATH] [--quick]`: the kernels benchmark.

On a CUDA GPU: every op timed with ``triton.testing.do_bench`` (median of the (0.5, 0.2, 0.8)
quantiles) at realistic sizes, side by side with torch eager, ``torch.compile``, cuBLAS
(``torch.matmul``) and ``F.scaled_dot_product_attention`` on its flash backend.  Compute-bound
ops report TFLOP/s and % of the device's dense bf16 peak; memory-bound ops report GB/s and % of a
device-to-device copy measured in the same run.  Forward+backward rows also report peak memory.
Every row carries its ratio to the row's anchor (cuBLAS / SDPA / torch eager).

Without CUDA: timings need a GPU, so it says so and runs a correctness pass of every op through
Triton's interpreter instead (max error against a float64 reference, per dtype), in seconds.
Then a CPU memory section: peak memory of loss + backward for ``fused_linear_cross_entropy``
against lm_head + ``F.cross_entropy`` at vocabularies 32k and 128k (``--quick``: 32k only), each
measured in its own subprocess as the resident-set high-water mark above the inputs (see
``_MEM_CHILD``), with the ratio to the unfused anchor.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, by device-name fragment.
_PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="PATH", help="write all rows as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the ratios to each anchor")
    p.add_argument("--quick", action="store_true", help="GPU: smaller sizes and fewer repetitions")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    if not torch.cuda.is_available():
        rc = _cpu_correctness(args)
        _cpu_memory(args)
        return rc
    return _gpu_benchmark(args)


# ==============================================================================================
# CPU: correctness through the interpreter
# ==============================================================================================


def _cpu_correctness(args) -> int:
    print("No CUDA device: kernel timings need a GPU (run this on one for TFLOP/s and GB/s).")
    print("Running a correctness pass of every op through Triton's interpreter instead.\n")
    # Must precede the first import of triton/kernels: Triton picks interpreter vs compiler when
    # the @triton.jit decorators run.
    if "pycomm.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        print("warning: kernels was imported before TRITON_INTERPRET=1 could be set; the torch fallback may run")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch.nn.functional as F

    from pycomm import kernels

    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    target = torch.randint(0, 300, (24,), generator=g)
    target[::5] = -100
    qkv_w = r(4 * 16, 32, scale=32 ** -0.5)

    def qkv_ref(x, w):
        q, k, v = F.linear(x, w).split([32, 16, 16], dim=-1)
        q = q.view(2, 40, 2, 16).transpose(1, 2)
        k, v = (t.view(2, 40, 1, 16).transpose(1, 2) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(2, 40, 32)

    # Masks and rotary tables for the Hugging Face ops: right padding on one batch row (no query
    # row fully masked, where SDPA's answer is NaN and ours 0), a 9-key sliding window; a partial
    # (16 of 32 dims) rotary embedding at positions 3..13.
    kpm = torch.ones(2, 30, dtype=torch.bool)
    kpm[1, 23:] = False
    qi, kj = torch.arange(30)[:, None], torch.arange(30)[None, :]
    window_mask = ((kj <= qi) & (qi - kj < 9))[None, None] & kpm[:, None, None, :]
    emb = torch.outer(torch.arange(3, 14).double(), 1.0 / 10000 ** (torch.arange(0, 16, 2).double() / 16)).repeat(1, 2)
    cos, sin = emb.cos().float(), emb.sin().float()

    def hf_rope(x, c, s_):
        c, s_ = c.to(x.dtype), s_.to(x.dtype)
        xr = x[..., :16]
        return torch.cat((xr * c + torch.cat((-xr[..., 8:], xr[..., :8]), -1) * s_, x[..., 16:]), -1)

    def hopper(fn):
        def run(*args):
            with kernels.use_variant("hopper"):
                return fn(*args)
        return run

    cases = [
        ("fused_add_mul", kernels.fused_add_mul, lambda a, b, c, d: d + (a + b) * c,
         [r(7, 1, 33), r(5, 33), r(33), r(7, 5, 33)]),
        ("bias_gelu", lambda x, b: kernels.bias_gelu(x, b, "tanh"), lambda x, b: F.gelu(x + b, approximate="tanh"),
         [r(37, 129, scale=3), r(129)]),
        ("swiglu", kernels.swiglu, lambda a, b: F.silu(a) * b, [r(37, 129, scale=3), r(37, 129)]),
        ("geglu", kernels.geglu, lambda a, b: F.gelu(a, approximate="tanh") * b, [r(37, 129, scale=3), r(37, 129)]),
        ("rms_norm", kernels.rms_norm, lambda x, w: F.rms_norm(x, (257,), w, 1e-6), [r(37, 257), r(257)]),
        ("add_rms_norm", lambda x, h, w: kernels.add_rms_norm(x, h, w)[0],
         lambda x, h, w: F.rms_norm(x + h, (257,), w, 1e-6), [r(37, 257), r(37, 257), r(257)]),
        ("layer_norm", kernels.layer_norm, lambda x, w, b: F.layer_norm(x, (257,), w, b),
         [r(37, 257) + 2, r(257), r(257)]),
        ("softmax_cross_entropy", lambda x: kernels.softmax_cross_entropy(x, target),
         lambda x: F.cross_entropy(x, target), [r(24, 300, scale=4)]),
        ("matmul(+bias, gelu)", lambda a, b, c: kernels.matmul(a, b, c, "gelu"), lambda a, b, c: F.gelu(a @ b + c),
         [r(70, 90), r(90, 50, scale=0.2), r(50)]),
        ("flash_attention(causal, GQA)", lambda q, k, v: kernels.flash_attention(q, k, v, causal=True),
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
         [r(1, 4, 70, 64), r(1, 2, 70, 64), r(1, 2, 70, 64)]),
        # The Hopper-native family (TMA descriptors; sizes with 16-byte rows so it can take them)
        ("matmul[hopper](+bias, gelu)", hopper(lambda a, w, c: kernels.matmul(a, w.t(), c, "gelu")),
         lambda a, w, c: F.gelu(a @ w.t() + c), [r(70, 96), r(48, 96, scale=0.2), r(48)]),
        ("flash_attention[hopper](causal)", hopper(lambda q, k, v: kernels.flash_attention(q, k, v, causal=True)),
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
         [r(1, 4, 70, 64), r(1, 2, 70, 64), r(1, 2, 70, 64)]),
        ("qkv_attention(GQA)", lambda x, w: kernels.qkv_attention(x, w, num_heads=2, num_kv_heads=1), qkv_ref,
         [r(2, 40, 32), qkv_w]),
        ("flash_attention(pad, window)", lambda q, k, v: kernels.flash_attention(
            q, k, v, True, key_padding_mask=kpm, sliding_window=9), lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=window_mask, enable_gqa=True), [r(2, 4, 30, 32), r(2, 2, 30, 32), r(2, 2, 30, 32)]),
        ("rope(partial)", lambda q, k: torch.cat([o.flatten() for o in kernels.rope(q, k, cos, sin)]),
         lambda q, k: torch.cat([hf_rope(q, cos, sin).flatten(), hf_rope(k, cos, sin).flatten()]),
         [r(2, 4, 11, 32), r(2, 2, 11, 32)]),
        ("fused_linear_cross_entropy", lambda h, w: kernels.fused_linear_cross_entropy(h, w, target, softcap=5.0),
         lambda h, w: F.cross_entropy((5.0 * torch.tanh(F.linear(h, w) / 5.0)).float(), target),
         [r(24, 32, scale=2), r(300, 32, scale=32 ** -0.5)]),
        ("swiglu_mlp", kernels.swiglu_mlp, lambda x, a, b, c: F.linear(F.silu(F.linear(x, a)) * F.linear(x, b), c),
         [r(37, 32), r(45, 32, scale=32 ** -0.5), r(45, 32, scale=32 ** -0.5), r(32, 45, scale=45 ** -0.5)]),
    ]
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    start = time.perf_counter()
    rows, worst = [], 0
    header = (f"{'op':30s} {'dtype':9s} {'fwd max err':>12s} {'torch fwd':>11s} "
              f"{'bwd max err':>12s} {'torch bwd':>11s}  ok")
    print(header)
    print("-" * len(header))
    for name, ours, ref, inputs in cases:
        for dtype in dtypes:
            o_out, o_grads = _fwd_bwd(ours, inputs, dtype)
            t_out, t_grads = _fwd_bwd(ref, inputs, dtype)
            r_out, r_grads = _fwd_bwd(ref, [x.to(dtype).double() for x in inputs], torch.float64)
            fe, tfe = _err(o_out, r_out), _err(t_out, r_out)
            be = max(_err(a, b) for a, b in zip(o_grads, r_grads))
            tbe = max(_err(a, b) for a, b in zip(t_grads, r_grads))
            rounding = max(_err(r_out.to(dtype), r_out), max(_err(b.to(dtype), b) for b in r_grads))
            # The test suite's rule: <= 2x PyTorch's own error in the same dtype (or 2x one rounding).
            ok = fe <= 2 * max(tfe, rounding) + 1e-5 and be <= 2 * max(tbe, rounding) + 1e-5
            worst += not ok
            print(f"{name:30s} {str(dtype)[6:]:9s} {fe:12.3e} {tfe:11.3e} {be:12.3e} {tbe:11.3e}  "
                  f"{'yes' if ok else 'NO'}")
            rows.append(dict(op=name, dtype=str(dtype)[6:], fwd_err=fe, torch_fwd_err=tfe, bwd_err=be,
                             torch_bwd_err=tbe, ok=ok))
    print(f"\n{len(rows)} checks in {time.perf_counter() - start:.1f} s; {worst} outside 2x PyTorch's own error.")
    print("(bf16 tl.dot runs with fp32 operands in the interpreter: see kernels/_interpreter.py)")
    if args.json:
        _write_json(args.json, dict(mode="cpu-interpreter-correctness", rows=rows, env=_env()))
    if args.plot:
        print("--plot: nothing to plot without GPU timings")
    return 0 if worst == 0 else 1


# ==============================================================================================
# CPU: peak memory of the LM-head loss, fused against unfused
# ==============================================================================================

# (tokens, hidden) of the memory comparison: a 1k-token micro-batch and a small model's width,
# so the 128k-vocabulary anchor (its logits alone are 0.5 GiB in fp32) fits a CI machine.
_MEM_TOKENS, _MEM_HIDDEN = 1024, 512
_MEM_VOCABS = (32000, 128256)  # Llama-2 and Llama-3 vocabularies

# Runs in a fresh interpreter per measurement.  torch's CPU allocator takes memory from malloc
# and keeps no cache, so with glibc's mmap threshold pinned at 1 MiB (MALLOC_MMAP_THRESHOLD_ in
# the child's environment, which also switches off glibc's sliding threshold) every tensor of
# the measured step is its own mapping, returned to the OS when freed.  The resident set then
# follows live tensor memory, and the kernel's high-water mark VmHWM, reset through
# /proc/self/clear_refs just before the step, is the step's peak.  Inputs, weights and a full-size
# warm-up step (thread pools, first-call costs; its gradients are dropped again) come before the
# reset and are not counted, so the printed time is that of a warm step.
_MEM_CHILD = r"""
import gc, importlib, json, sys, time
import torch
import torch.nn.functional as F
method, V, N, H, kmod = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
flce = importlib.import_module(kmod).fused_linear_cross_entropy
def fused(h, w, t):
    return flce(h, w, t)
def unfused(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t)
fn = fused if method == "fused" else unfused
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
gen = torch.Generator().manual_seed(0)
hidden = torch.randn(N, H, generator=gen).requires_grad_()
weight = (torch.randn(V, H, generator=gen) * H ** -0.5).requires_grad_()
target = torch.randint(0, V, (N,), generator=gen)
fn(hidden, weight, target).backward()  # warm-up at full size: the measured step is a warm one
hidden.grad = weight.grad = None
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
t0 = time.perf_counter()
loss = fn(hidden, weight, target)
loss.backward()
seconds = time.perf_counter() - t0
print(json.dumps(dict(peak=status("VmHWM") - base, seconds=seconds, loss=loss.item(),
                      grad_norm=weight.grad.norm().item())))
"""


def _mem_measure(method, V, N, H, kmod):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2 ** 20), PYCOMM_KERNELS_BACKEND="torch",
               TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-c", _MEM_CHILD, method, str(V), str(N), str(H), kmod],
                          env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "child failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cpu_memory(args) -> list:
    """Print (and return) the peak-memory table of fused vs unfused LM-head loss on the CPU."""
    from pycomm import kernels

    if not os.path.exists("/proc/self/clear_refs"):
        print("\nmemory section skipped: needs Linux /proc (VmHWM and clear_refs)")
        return []
    N, H = _MEM_TOKENS, _MEM_HIDDEN
    vocabs = _MEM_VOCABS[:1] if args.quick else _MEM_VOCABS
    print(f"\nPeak memory of loss + backward, lm_head + cross-entropy, fp32 on CPU, {N} tokens x hidden {H} "
          "(torch fallback; resident-set high-water mark above the inputs, one subprocess per row)")
    header = f"{'vocab':>7s} {'provider':38s} {'peak MiB':>9s} {'time s':>7s}  ratio vs anchor"
    print(header)
    print("-" * len(header))
    rows = []
    for V in vocabs:
        try:
            base = _mem_measure("unfused", V, N, H, kernels.__name__)
            ours = _mem_measure("fused", V, N, H, kernels.__name__)
        except Exception as e:  # e.g. too little memory for the anchor: report, do not end the run
            print(f"{V:7d} failed: {type(e).__name__}: {str(e)[:100]}")
            continue
        same = abs(base["loss"] - ours["loss"]) <= 1e-4 * abs(base["loss"]) and \
            abs(base["grad_norm"] - ours["grad_norm"]) <= 1e-3 * base["grad_norm"]
        for name, r, anchor in (("lm_head + F.cross_entropy (anchor)", base, True),
                                ("fused_linear_cross_entropy", ours, False)):
            ratio = "" if anchor else f"x{base['peak'] / max(r['peak'], 1):.1f} less memory" + \
                ("" if same else "  (LOSS OR GRADIENT DIFFERS!)")
            print(f"{V:7d} {name:38s} {r['peak'] / 2 ** 20:9.0f} {r['seconds']:7.2f}  {ratio}")
            rows.append(dict(vocab=V, provider=name, peak_mib=r["peak"] / 2 ** 20, seconds=r["seconds"],
                             anchor=anchor, same_result=same))
    if args.json and rows:
        _write_json(os.path.splitext(args.json)[0] + "-memory.json", dict(mode="cpu-memory", rows=rows, env=_env()))
    return rows


def _fwd_bwd(fn, inputs, dtype):
    xs = [x.to(dtype).requires_grad_() for x in inputs]
    out = fn(*xs)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, xs, g)
    return out.detach(), [x.detach() for x in grads]


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _env():
    import triton

    return dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                time=time.strftime("%Y-%m-%dT%H:%M:%S"))


def _write_json(path, payload):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


# ==============================================================================================
# GPU: timings
# ==============================================================================================


class _Runner:
    def __init__(self, quick):
        import triton.testing

        self.do_bench = triton.testing.do_bench
        self.rep = 30 if quick else 100
        self.rows = []
        name = torch.cuda.get_device_name()
        self.peak_flops = next((v for k, v in _PEAK_BF16.items() if k in name), None)
        self.copy_bw = None

    def time_ms(self, fn):
        fn()  # compile / autotune outside the timed region
        torch.cuda.synchronize()
        return self.do_bench(fn, warmup=25, rep=self.rep, quantiles=[0.5, 0.2, 0.8])[0]

    def peak_mem_mb(self, fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20

    def add(self, group, provider, fn, *, flops=None, bytes_=None, anchor=False, memory=False):
        try:
            ms = self.time_ms(fn)
            mem = self.peak_mem_mb(fn) if memory else None
        except Exception as e:  # one failing provider (e.g. torch.compile) must not end the run
            print(f"  {group:44s} {provider:22s} failed: {type(e).__name__}: {str(e)[:80]}")
            return
        row = dict(group=group, provider=provider, ms=ms, peak_mem_mb=mem, anchor=anchor)
        if flops is not None:
            row["tflops"] = flops / ms / 1e9
            row["pct_peak"] = 100 * flops / (ms * 1e-3) / self.peak_flops if self.peak_flops else None
        if bytes_ is not None:
            row["gbps"] = bytes_ / ms / 1e6
            row["pct_copy"] = 100 * row["gbps"] / self.copy_bw if self.copy_bw else None
        self.rows.append(row)

    def print_group(self, group):
        rows = [r for r in self.rows if r["group"] == group]
        anchor = next((r for r in rows if r["anchor"]), rows[0] if rows else None)
        for r in rows:
            r["ratio_vs_anchor"] = anchor["ms"] / r["ms"] if anchor else None
            perf = (f"{r['tflops']:8.1f} TFLOP/s {r['pct_peak'] or 0:5.1f}% peak" if "tflops" in r
                    else f"{r['gbps']:8.0f} GB/s {r['pct_copy'] or 0:6.1f}% copy" if "gbps" in r else "")
            mem = f" {r['peak_mem_mb']:9.0f} MiB" if r["peak_mem_mb"] is not None else ""
            mark = " (anchor)" if r is anchor else f" x{r['ratio_vs_anchor']:.2f} vs {anchor['provider']}"
            print(f"  {group:44s} {r['provider']:22s} {r['ms']:9.3f} ms {perf}{mem}{mark}")


def _fwd_bwd_fn(fn, inputs, grad=None):
    def run():
        for x in inputs:
            x.grad = None
        out = fn()
        out.backward(grad if grad is not None else torch.ones_like(out))
    return run


def _gpu_benchmark(args) -> int:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pycomm import kernels
    from pycomm.kernels import _dispatch

    dev = "cuda"
    bf16 = torch.bfloat16
    R = _Runner(args.quick)
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; bf16 dense peak "
          f"{R.peak_flops / 1e12 if R.peak_flops else float('nan'):.0f} TFLOP/s (spec)")

    # --- the memory-bound anchor: a device-to-device copy measured now, on this device
    src = torch.empty(2 ** 28, dtype=torch.uint8, device=dev)  # 256 MiB
    dst = torch.empty_like(src)
    copy_ms = R.time_ms(lambda: dst.copy_(src))
    R.copy_bw = 2 * src.numel() / copy_ms / 1e6
    print(f"device-to-device copy: {R.copy_bw:.0f} GB/s (read + write), the 100% for memory-bound ops\n")
    del src, dst

    def compiled(fn):
        return torch.compile(fn, fullgraph=True)

    # Matmul and attention have two kernel families; the plain rows run the per-bucket choice
    # (kernels.variant_choices(), printed at the end), the [family] rows force each one.
    families = ["portable", "hopper"] if _dispatch.hopper_capable(torch.empty(0, device=dev)) else []

    def forced(family, fn):
        def run():
            with kernels.use_variant(family):
                return fn()
        return run

    # --- matmul: bf16 4096^3, plain and with a fused bias + GELU epilogue
    n = 2048 if args.quick else 4096
    a, b, bias = (torch.randn(n, n, device=dev, dtype=bf16) / 8, torch.randn(n, n, device=dev, dtype=bf16) / 8,
                  torch.randn(n, device=dev, dtype=bf16))
    flops = 2 * n ** 3
    g = f"matmul bf16 {n}^3"
    R.add(g, "torch.matmul (cuBLAS)", lambda: torch.matmul(a, b), flops=flops, anchor=True)
    R.add(g, "kernels.matmul", lambda: kernels.matmul(a, b), flops=flops)
    for family in families:
        R.add(g, f"kernels.matmul [{family}]", forced(family, lambda: kernels.matmul(a, b)), flops=flops)
    R.add(g, "torch.compile", (lambda f: lambda: f(a, b))(compiled(torch.matmul)), flops=flops)
    R.print_group(g)
    g = f"matmul+bias+gelu bf16 {n}^3"
    R.add(g, "torch eager", lambda: F.gelu(a @ b + bias), flops=flops, anchor=True)
    R.add(g, "kernels.matmul(fused)", lambda: kernels.matmul(a, b, bias, "gelu"), flops=flops)
    for family in families:
        R.add(g, f"kernels.matmul(fused) [{family}]", forced(family, lambda: kernels.matmul(a, b, bias, "gelu")),
              flops=flops)
    fused = compiled(lambda a, b, c: F.gelu(a @ b + c))
    R.add(g, "torch.compile", (lambda f: lambda: f(a, b, bias))(fused), flops=flops)
    R.print_group(g)
    del a, b, bias

    # --- flash attention: bf16 B=4, H=32, S=4096, D=128
    B, H, S, D = (2, 16, 2048, 128) if args.quick else (4, 32, 4096, 128)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=bf16, requires_grad=True) for _ in range(3))
    do = torch.randn(B, H, S, D, device=dev, dtype=bf16)

    def sdpa_flash(causal):
        def f():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return f

    for causal in (False, True):
        fwd_flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
        tag = "causal" if causal else "full"
        g = f"flash_attention fwd {tag} B{B} H{H} S{S} D{D}"
        with torch.no_grad():
            R.add(g, "SDPA flash", sdpa_flash(causal), flops=fwd_flops, anchor=True)
            R.add(g, "kernels.flash_attention", lambda: kernels.flash_attention(q, k, v, causal), flops=fwd_flops)
            for family in families:
                R.add(g, f"kernels.flash_attention [{family}]",
                      forced(family, lambda: kernels.flash_attention(q, k, v, causal)), flops=fwd_flops)
        R.print_group(g)
        g = f"flash_attention fwd+bwd {tag} B{B} H{H} S{S} D{D}"
        # fwd + bwd = 1 + 2.5 forward-equivalents (the backward does 2 matmuls more and recomputes P)
        total = 3.5 * fwd_flops
        R.add(g, "SDPA flash", _fwd_bwd_fn(sdpa_flash(causal), (q, k, v), do), flops=total, anchor=True, memory=True)
        ours = _fwd_bwd_fn(lambda: kernels.flash_attention(q, k, v, causal), (q, k, v), do)
        R.add(g, "kernels.flash_attention", ours, flops=total, memory=True)
        for family in families:
            R.add(g, f"kernels.flash_attention [{family}]", forced(family, ours), flops=total)
        R.print_group(g)
    del q, k, v, do

    # --- merged QKV projection + attention vs three nn.Linear + SDPA, fwd + bwd
    E = H * D
    x = torch.randn(B, S, E, device=dev, dtype=bf16, requires_grad=True)
    w = (torch.randn(3 * E, E, device=dev, dtype=bf16) / math.sqrt(E)).requires_grad_()
    wq, wk, wv = (t.detach().clone().requires_grad_() for t in w.chunk(3))
    gout = torch.randn(B, S, E, device=dev, dtype=bf16)

    def three_linear_sdpa():
        q, k, v = (F.linear(x, wt).view(B, S, H, D).transpose(1, 2) for wt in (wq, wk, wv))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return o.transpose(1, 2).reshape(B, S, E)

    proj_flops = 2 * B * S * E * 3 * E
    total = 3 * proj_flops + 3.5 * 2 * B * H * S * S * D  # proj fwd+bwd (3x) + causal attention
    g = f"qkv_attention fwd+bwd causal B{B} S{S} E{E}"
    R.add(g, "3x nn.Linear + SDPA", _fwd_bwd_fn(three_linear_sdpa, (x, wq, wk, wv), gout), flops=total, anchor=True,
          memory=True)
    R.add(g, "torch.compile(same)", _fwd_bwd_fn(compiled(three_linear_sdpa), (x, wq, wk, wv), gout), flops=total,
          memory=True)
    R.add(g, "kernels.qkv_attention",
          _fwd_bwd_fn(lambda: kernels.qkv_attention(x, w, num_heads=H, causal=True), (x, w), gout), flops=total,
          memory=True)
    R.print_group(g)
    del x, w, wq, wk, wv, gout

    # --- memory-bound ops: GB/s against the copy measured above
    M, N = (8192, 4096) if args.quick else (16384, 8192)
    es = 2  # bf16 bytes

    def t(*shape, grad=False):
        return torch.randn(*shape, device=dev, dtype=bf16, requires_grad=grad)

    x, y, z, w_ = t(M, N, grad=True), t(M, N, grad=True), t(M, N, grad=True), t(M, N, grad=True)
    wn, bn = t(N, grad=True), t(N, grad=True)
    gy = t(M, N)
    ew_cases = [
        ("fused_add_mul", lambda: kernels.fused_add_mul(x, y, z, w_), lambda: w_ + (x + y) * z, 5 * M * N * es,
         (x, y, z, w_)),
        ("bias_gelu", lambda: kernels.bias_gelu(x, bn), lambda: F.gelu(x + bn), 2 * M * N * es, (x, bn)),
        ("swiglu", lambda: kernels.swiglu(x, y), lambda: F.silu(x) * y, 3 * M * N * es, (x, y)),
        ("rms_norm", lambda: kernels.rms_norm(x, wn), lambda: F.rms_norm(x, (N,), wn, 1e-6), 2 * M * N * es, (x, wn)),
        ("add_rms_norm", lambda: kernels.add_rms_norm(x, y, wn)[0],
         lambda: F.rms_norm(x + y, (N,), wn, 1e-6), 4 * M * N * es, (x, y, wn)),
        ("layer_norm", lambda: kernels.layer_norm(x, wn, bn), lambda: F.layer_norm(x, (N,), wn, bn), 2 * M * N * es,
         (x, wn, bn)),
    ]
    for name, ours, ref, nbytes, ins in ew_cases:
        g = f"{name} bf16 {M}x{N} fwd"
        with torch.no_grad():
            R.add(g, "torch eager", ref, bytes_=nbytes, anchor=True)
            R.add(g, "torch.compile", compiled(ref), bytes_=nbytes)
            R.add(g, "kernels", ours, bytes_=nbytes)
        R.print_group(g)
        g = f"{name} bf16 {M}x{N} fwd+bwd"
        # backward moves about twice the forward's bytes (reads g and the inputs, writes grads)
        R.add(g, "torch eager", _fwd_bwd_fn(ref, ins, gy), bytes_=3 * nbytes, anchor=True, memory=True)
        R.add(g, "torch.compile", _fwd_bwd_fn(compiled(ref), ins, gy), bytes_=3 * nbytes, memory=True)
        R.add(g, "kernels", _fwd_bwd_fn(ours, ins, gy), bytes_=3 * nbytes, memory=True)
        R.print_group(g)
    del x, y, z, w_, gy

    V = 32000 if args.quick else 128256
    T = 4096
    logits = t(T, V, grad=True)
    target = torch.randint(0, V, (T,), device=dev)
    g = f"softmax_cross_entropy bf16 {T}x{V} fwd+bwd"
    ce_ref = lambda: F.cross_entropy(logits, target)  # noqa: E731
    R.add(g, "torch eager", _fwd_bwd_fn(ce_ref, (logits,)), bytes_=3 * T * V * es, anchor=True, memory=True)
    R.add(g, "torch.compile", _fwd_bwd_fn(compiled(ce_ref), (logits,)), bytes_=3 * T * V * es, memory=True)
    R.add(g, "kernels", _fwd_bwd_fn(lambda: kernels.softmax_cross_entropy(logits, target), (logits,)),
          bytes_=3 * T * V * es, memory=True)
    R.print_group(g)
    del logits

    # --- LM head + loss: fused_linear_cross_entropy against lm_head + F.cross_entropy (time and peak)
    Hd = 4096
    hid = t(T, Hd, grad=True)
    head = (torch.randn(V, Hd, device=dev, dtype=bf16) / math.sqrt(Hd)).requires_grad_()
    g = f"lm_head+cross_entropy bf16 {T}x{Hd}, V={V} fwd+bwd"
    flops = 3 * 2 * T * Hd * V
    R.add(g, "torch eager", _fwd_bwd_fn(lambda: F.cross_entropy(F.linear(hid, head).float(), target), (hid, head)),
          flops=flops, anchor=True, memory=True)
    R.add(g, "kernels.fused_linear_cross_entropy",
          _fwd_bwd_fn(lambda: kernels.fused_linear_cross_entropy(hid, head, target), (hid, head)), flops=flops,
          memory=True)
    R.print_group(g)
    del hid, head

    # --- rotary embedding (HF layout) and the SwiGLU MLP, fwd + bwd
    B, S, Hq, Hk, D = 4, 4096, 32, 8, 128
    qr, kr = t(B, Hq, S, D, grad=True), t(B, Hk, S, D, grad=True)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=dev).float() / D))
    emb = torch.outer(torch.arange(S, device=dev).float(), inv).repeat(1, 2)
    cos, sin = emb.cos().to(bf16)[None].expand(B, S, D), emb.sin().to(bf16)[None].expand(B, S, D)

    def hf_rope():
        def rot(x):
            return torch.cat((-x[..., D // 2:], x[..., : D // 2]), -1)
        c, s_ = cos[:, None], sin[:, None]
        q2, k2 = qr * c + rot(qr) * s_, kr * c + rot(kr) * s_
        return q2.sum() + k2.sum()

    rope_bytes = 2 * (B * (Hq + Hk) * S * D) * es
    g = f"rope bf16 B{B} S{S} H{Hq}/{Hk} D{D} fwd+bwd"
    R.add(g, "HF apply_rotary_pos_emb", _fwd_bwd_fn(hf_rope, (qr, kr)), bytes_=3 * rope_bytes, anchor=True,
          memory=True)
    R.add(g, "kernels.rope", _fwd_bwd_fn(lambda: sum(o.sum() for o in kernels.rope(qr, kr, cos, sin)), (qr, kr)),
          bytes_=3 * rope_bytes, memory=True)
    R.print_group(g)
    del qr, kr

    E, Inter = 4096, 14336
    xm = t(T, E, grad=True)
    wg, wu, wd = t(Inter, E, grad=True), t(Inter, E, grad=True), t(E, Inter, grad=True)
    gm = t(T, E)
    g = f"swiglu_mlp bf16 {T}x{E}x{Inter} fwd+bwd"
    flops = 3 * 2 * T * E * Inter * 3
    R.add(g, "torch eager", _fwd_bwd_fn(lambda: F.linear(F.silu(F.linear(xm, wg)) * F.linear(xm, wu), wd),
                                        (xm, wg, wu, wd), gm), flops=flops, anchor=True, memory=True)
    R.add(g, "kernels.swiglu_mlp", _fwd_bwd_fn(lambda: kernels.swiglu_mlp(xm, wg, wu, wd), (xm, wg, wu, wd), gm),
          flops=flops, memory=True)
    R.print_group(g)
    del xm, wg, wu, wd, gm

    choices = {op: [dict(c, key=str(c["key"])) for c in cs] for op, cs in kernels.variant_choices().items()}
    print("kernel families chosen per bucket (ms of each when timed):")
    for op, cs in choices.items():
        for c in cs:
            print(f"  {op} {c['key']}: {c['variant']} {c['ms']}")
    payload = dict(mode="gpu-timings", env=_env(), copy_gbps=R.copy_bw, peak_bf16_flops=R.peak_flops, rows=R.rows,
                   variant_choices=choices)
    if args.json:
        _write_json(args.json, payload)
    if args.plot:
        _plot(args.plot, R.rows)
    return 0


def _plot(path, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [r for r in rows if r["provider"].startswith("kernels") and r.get("ratio_vs_anchor")]
    if not ours:
        print("--plot: no rows to plot")
        return
    fig, ax = plt.subplots(figsize=(10, 0.38 * len(ours) + 1.5))
    labels = [r["group"] for r in ours]
    ratios = [r["ratio_vs_anchor"] for r in ours]
    ax.barh(labels, ratios, color=["tab:green" if x >= 1 else "tab:red" for x in ratios])
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xlabel("speed relative to the anchor (cuBLAS / SDPA flash / torch eager); > 1 is faster")
    ax.invert_yaxis()
    ax.set_title(f"pycomm kernels on {torch.cuda.get_device_name()}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
