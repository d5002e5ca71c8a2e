"""Per-device memory of one parallel shape: weights, gradients, optimizer state, activations.

Contract: :func:`activation_bytes_per_layer` is Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", Table 2): per block and micro-batch of ``b``
sequences, 16-bit activations,

* no recomputation: ``s·b·h·(34 + 5·a·s/h)``; with tensor parallelism ``t`` (no sequence
  parallelism) ``s·b·h·(10 + 24/t + 5·a·s/(h·t))``; with sequence parallelism all of it ``/t``;
* selective recomputation (attention's s x s part recomputed): ``s·b·h·(10 + 24/t)``, ``34·s·b·h/t``
  with sequence parallelism;
* full recomputation: the block's input only, ``2·s·b·h`` (``/t`` with sequence parallelism).

The 34 counts 2-byte tensors and 1-byte dropout masks; fp32 training doubles it (the masks
are a small part).  :func:`memory` adds the stage's weights and optimizer state
(mixed precision: 2 + 2 bytes of weight and gradient, 12 of fp32 master, momentum and variance;
fp32: 4 + 4 + 8) — ZeRO-1 divides the optimizer part by ``dp`` — and multiplies activations by
the micro-batches the schedule keeps in flight on the stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .model import Model

__all__ = ["activation_bytes_per_layer", "Memory", "memory"]


def activation_bytes_per_layer(model: Model, micro_batch: int, tp: int, recompute: str,
                               sequence_parallel: bool = False) -> float:
    """Bytes one block keeps for the backward of one micro-batch (formulas in the module doc)."""
    s, b, h, a, t = model.seq, micro_batch, model.hidden, model.heads, tp
    sbh = s * b * h
    scale = model.dtype_bytes / 2
    if recompute == "full":
        per = 2 * sbh / (t if sequence_parallel else 1)
    elif recompute == "selective":
        per = 34 * sbh / t if sequence_parallel else sbh * (10 + 24 / t)
    elif recompute == "none":
        attn = 5 * a * s / h
        per = sbh * (34 + attn) / t if sequence_parallel else sbh * (10 + 24 / t + attn / t)
    else:
        raise ValueError(f"recompute must be 'none', 'selective' or 'full', got {recompute!r}")
    return per * scale


@dataclass(frozen=True)
class Memory:
    """Bytes on the most loaded device."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    in_flight: float
    """Micro-batches (in full-stage units) whose activations the stage holds at the peak."""

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def stage_params(model: Model, pp: int, tp: int) -> float:
    """Parameters on one device of the heaviest stage: ceil(l/pp) blocks plus the embedding
    (first stage) or the output layer (last), whichever is larger, split over tp."""
    blocks = math.ceil(model.layers / pp) * model.layer_params()
    ends = model.embedding_params() + (model.head_params() if pp == 1 else 0)
    ends = max(ends, model.head_params())
    return (blocks + ends) / tp


def memory(model: Model, *, tp: int, pp: int, dp: int, micro_batch: int, recompute: str,
           zero: int, in_flight: float, sequence_parallel: bool = False) -> Memory:
    """Per-device bytes; ``in_flight`` micro-batches held by the stage (schedule-dependent)."""
    n = stage_params(model, pp, tp)
    mixed = model.dtype_bytes == 2
    w, g, o = (2, 2, 12) if mixed else (4, 4, 8)
    opt = n * o / (dp if zero >= 1 else 1)
    layers = math.ceil(model.layers / pp)
    per_layer = activation_bytes_per_layer(model, micro_batch, tp, recompute, sequence_parallel)
    act = in_flight * layers * per_layer
    if recompute == "full":
        # the backward recomputes one block at a time: one block's full activations at once
        act += activation_bytes_per_layer(model, micro_batch, tp, "none", sequence_parallel)
    # fp32 logits of one micro-batch on the last stage (the loss needs them whole)
    act += 4.0 * micro_batch * model.seq * model.vocab / tp
    return Memory(weights=n * w, gradients=n * g, optimizer=opt, activations=act, in_flight=in_flight)
