"""`python -m bench hf [--steps N] [--batch B] [--seq S] [--vocab V]`: one training step of a small
Llama built from a config (random weights, nothing downloaded), unpatched against
``kernels.patch(model)``: time per step and peak memory of the step, with the ratio to the
unpatched model measured in the same run.

Each variant runs in its own subprocess (same seed, same batch): a warm-up step, ``--steps``
timed steps (median), then one step whose peak memory is read as the resident-set high-water
mark above the resident set before it (Linux ``/proc/self/clear_refs`` + ``VmHWM``; glibc's
``MALLOC_MMAP_THRESHOLD_`` makes large tensors return to the OS when freed, so the mark follows
the live tensors).  On a CUDA device: ``torch.cuda.max_memory_allocated`` and CUDA-synchronised
times instead.

The anchor is Liger-Kernel's published figure for the same kind of patch (its README: about 20%
more training throughput and 60% less memory on LLaMA 3-8B, 8 GPUs); it needs a GPU, so it is
quoted, not run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import json, os, statistics, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from pycomm import kernels
patched = sys.argv[1] == "1"
steps, batch, seq, vocab = map(int, sys.argv[2:6])
dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq)
model = LlamaForCausalLM(cfg).to(dev)
model.set_attn_implementation("sdpa")
if patched:
    kernels.patch(model, verbose=False)
model.train()
ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(dev)
opt = torch.optim.SGD(model.parameters(), lr=1e-3)

def step():
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()

def sync():
    if dev == "cuda":
        torch.cuda.synchronize()

loss = step()
times = []
for _ in range(steps):
    sync(); t = time.perf_counter(); step(); sync(); times.append(time.perf_counter() - t)
if dev == "cuda":
    torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    step(); peak = torch.cuda.max_memory_allocated() - base
else:
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = status("VmRSS")
    step()
    peak = status("VmHWM") - base
print(json.dumps(dict(seconds=statistics.median(times), peak=peak, loss=loss, device=dev,
                      name=torch.cuda.get_device_name() if dev == "cuda" else "cpu")))
"""


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (median; default 3)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    return p.parse_args(argv)


def _run(patched: bool, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2 ** 20))
    env.pop("TRITON_INTERPRET", None)  # CPU: the torch fallback (the interpreter is for tests)
    out = subprocess.run([sys.executable, "-c", _CHILD, "1" if patched else "0", str(args.steps), str(args.batch),
                          str(args.seq), str(args.vocab)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the {'patched' if patched else 'unpatched'} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("python -m bench hf needs transformers (pip install -e '.[test]')")
        return 1
    tokens = args.batch * args.seq
    print(f"One training step (forward, loss, backward, SGD) of a Llama from a config: hidden 256, 4 layers, "
          f"4 heads (2 KV), vocab {args.vocab}, batch {args.batch} x seq {args.seq} = {tokens} tokens")
    base, ours = _run(False, args), _run(True, args)
    print(f"device: {base['name']}; median of {args.steps} steps after one warm-up; peak = memory of one step "
          f"above what was resident before it\n")
    print(f"{'variant':<28}{'s/step':>10}{'tokens/s':>12}{'peak MiB':>12}{'loss':>10}")
    for label, r in (("unpatched (HF, sdpa)", base), ("kernels.patch(model)", ours)):
        print(f"{label:<28}{r['seconds']:>10.3f}{tokens / r['seconds']:>12.0f}{r['peak'] / 2**20:>12.1f}"
              f"{r['loss']:>10.4f}")
    speed, mem = base["seconds"] / ours["seconds"], ours["peak"] / base["peak"]
    print(f"\npatched / unpatched: throughput x{speed:.2f}, peak memory x{mem:.2f} "
          f"({(1 - mem) * 100:.0f}% less)")
    print("anchor, Liger-Kernel's published figure (LLaMA 3-8B, 8 GPUs, not run here): "
          "throughput ~x1.2, peak memory ~x0.4")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(unpatched=base, patched=ours, args=vars(args)), f, indent=1)
    return 0
