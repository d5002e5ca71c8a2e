"""``kernels.patch(model)``: swap supported submodules for the kernel-backed ones, in place.

What is swapped (exact types only, so subclasses with custom behaviour are left alone):

* ``nn.Linear`` -> ``kernels.nn.Linear`` (same parameter objects).  Inside an ``nn.Sequential``,
  a Linear directly followed by ``nn.GELU`` (either approximation), ``nn.ReLU`` or ``nn.SiLU``
  becomes one Linear with that activation fused into the matmul epilogue, and the activation
  module becomes ``nn.Identity`` (indices and state-dict keys are unchanged).
* ``nn.LayerNorm`` and ``nn.RMSNorm`` over one (the last) dimension -> ``kernels.nn`` versions.
* batch-first ``nn.MultiheadAttention`` with equal q/k/v dims, no bias_k/bias_v and no
  add_zero_attn -> ``kernels.nn.MultiheadAttention`` (kernels for self-attention calls with
  ``need_weights=False``; torch's computation for other calls).

Returns the model.  What was swapped and what was skipped (with the reason) is printed when
``verbose`` and kept as the list ``model.kernels_patch_report``.
"""
from __future__ import annotations

from collections import Counter

from torch import nn

from . import nn as knn

_FUSABLE = {nn.ReLU: lambda m: "relu", nn.SiLU: lambda m: "silu",
            nn.GELU: lambda m: "gelu_tanh" if m.approximate == "tanh" else "gelu"}


def _replacement(module: nn.Module):
    """(new module, None) if ``module`` is swappable, (None, reason) if it is a near miss, else (None, None)."""
    kind = type(module)
    if kind is nn.Linear:
        return knn.Linear.from_torch(module), None
    if kind is nn.LayerNorm:
        if len(module.normalized_shape) != 1:
            return None, f"normalized_shape {tuple(module.normalized_shape)} spans more than the last dimension"
        return knn.LayerNorm.from_torch(module), None
    if kind is nn.RMSNorm:
        if len(module.normalized_shape) != 1:
            return None, f"normalized_shape {tuple(module.normalized_shape)} spans more than the last dimension"
        return knn.RMSNorm.from_torch(module), None
    if kind is nn.MultiheadAttention:
        if not module.batch_first:
            return None, "batch_first=False (the kernels take (batch, seq, embed))"
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            return None, "kdim/vdim differ from embed_dim, or bias_k/bias_v/add_zero_attn is used"
        return knn.MultiheadAttention(module), None
    return None, None


def _walk(module: nn.Module, prefix: str, report: list) -> None:
    children = list(module.named_children())
    fused_next = set()
    for i, (name, child) in enumerate(children):
        path = f"{prefix}{name}"
        if name in fused_next:
            setattr(module, name, nn.Identity())
            report.append(f"{path}: {type(child).__name__} -> nn.Identity (fused into the Linear before it)")
            continue
        if isinstance(module, nn.Sequential) and type(child) is nn.Linear and i + 1 < len(children):
            nxt_name, nxt = children[i + 1]
            if type(nxt) in _FUSABLE:
                act = _FUSABLE[type(nxt)](nxt)
                setattr(module, name, knn.Linear.from_torch(child, activation=act))
                report.append(f"{path}: Linear + {type(nxt).__name__} -> kernels.nn.Linear(activation={act!r})")
                fused_next.add(nxt_name)
                continue
        new, reason = _replacement(child)
        if new is not None:
            setattr(module, name, new)
            report.append(f"{path}: {type(child).__name__} -> kernels.nn.{type(new).__name__}")
        elif reason is not None:
            report.append(f"{path}: {type(child).__name__} kept ({reason})")
        else:
            _walk(child, path + ".", report)


def patch(model: nn.Module, verbose: bool = True) -> nn.Module:
    """Swap supported submodules of ``model`` for kernel-backed ones in place; return ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects a torch.nn.Module, got {type(model).__name__}")
    report: list[str] = []
    new, reason = _replacement(model)
    if new is not None:
        raise ValueError(
            f"patch swaps submodules in place, but the model itself is a {type(model).__name__}; "
            "wrap it (e.g. nn.Sequential(model)) or use the kernels.nn module directly"
        )
    _walk(model, "", report)
    model.kernels_patch_report = report
    if verbose:
        swapped = Counter(line.split(": ", 1)[1] for line in report if " kept (" not in line)
        print(f"kernels.patch: {sum(swapped.values())} module(s) swapped")
        for what, n in sorted(swapped.items()):
            print(f"  {n} x {what}")
        for line in report:
            if " kept (" in line:
                print(f"  skipped {line}")
    return model
