"""What ``kernels.patch`` plugs into Hugging Face transformers, without importing it.

transformers is never a dependency of pycomm: ``register_attention`` reaches it through
``importlib`` only when ``patch`` meets a transformers model.

* ``attention``: an implementation for transformers' ``AttentionInterface`` backed by
  ``flash_attention`` (key-padding mask, sliding window, softcap, bottom-right causal alignment
  for decoding against a cache), registered as ``"pycomm"`` (transformers refuses custom names
  containing "flash").
* ``attention_mask``: its ``AttentionMaskInterface`` entry.  Without one, transformers passes no
  mask at all to a custom implementation; this one hands over the 2-D padding mask (``None``
  when nothing is padded), and the attention function applies causality and the sliding window
  itself, so padded batches and sliding windows stay exact.
* ``causal_lm_loss``: the training loss of a causal LM through ``fused_linear_cross_entropy``,
  with transformers' ``ForCausalLMLoss`` semantics (labels shifted by one, -100 ignored, sum /
  ``num_items_in_batch`` under gradient accumulation).
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from . import _amp
from .flash_attention import MAX_HEAD_DIM, flash_attention
from .fused_linear_cross_entropy import fused_linear_cross_entropy

NAME = "pycomm"


def register_attention() -> None:
    """Register ``NAME`` with transformers' attention and attention-mask interfaces (idempotent)."""
    importlib.import_module("transformers.modeling_utils").AttentionInterface.register(NAME, attention)
    importlib.import_module("transformers.masking_utils").AttentionMaskInterface.register(NAME, attention_mask)


def attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask=None, **kwargs):
    """The padding mask ``(B, kv_length)`` bool, True = attend, or None when nothing is padded
    (like transformers' flash-attention mask; causality and windows are the attention's job)."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].bool()
    if not torch.compiler.is_compiling() and mask.shape[-1] == kv_length and bool(mask.all()):
        return None
    return mask


def _dense_allowed(Sq: int, Sk: int, device, causal: bool, window: int | None) -> torch.Tensor:
    """(S_q, S_k) bool: what query i may see, bottom-right aligned (the last query is the last key)."""
    qi = torch.arange(Sq, device=device)[:, None] + (Sk - Sq)
    kj = torch.arange(Sk, device=device)[None, :]
    allowed = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    if causal:
        allowed &= kj <= qi
    if window:
        allowed &= (qi - kj < window) if causal else ((qi - kj).abs() < window)
    return allowed


def _torch_attention(q, k, v, mask, causal, scale, window, softcap, dropout):
    """Eager attention with the same semantics as the kernel path, for what the kernel does not
    take: dropout in training, float64, head dims above MAX_HEAD_DIM, a caller's own 4-D mask."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None and mask.dim() == 4:
        # a caller's own 4-D mask is the whole truth, as in transformers' sdpa path
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    else:
        allowed = _dense_allowed(q.shape[2], k.shape[2], q.device, causal, window)[None, None]
        if mask is not None:
            allowed = allowed & mask[:, None, None, :]
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s.float(), dim=-1).nan_to_num(0.0).to(q.dtype)  # fully masked rows give 0
    if dropout:
        p = F.dropout(p, dropout, training=True)
    return p @ v


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
              softcap=None, is_causal=None, **kwargs):
    """transformers' attention-function contract: (B, H, S, D) in, ((B, S, H, D), None) out."""
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if torch.is_autocast_enabled(query.device.type):
        dt = _amp.matmul_dtype(query, key, value)  # as torch's sdpa under autocast
    else:
        dt = _amp.promoted_dtype(query, key, value) if query.dtype == key.dtype == value.dtype else None
    q, k, v = (query, key, value) if dt is None else _amp.cast(dt, query, key, value)
    window = sliding_window or None
    if (dt is None or dropout or query.shape[-1] > MAX_HEAD_DIM
            or (attention_mask is not None and attention_mask.dim() != 2)):
        out = _torch_attention(q, k, v, attention_mask, causal, scaling, window, softcap, dropout)
    else:
        out = flash_attention(q, k, v, causal=causal, scale=scaling, key_padding_mask=attention_mask,
                              sliding_window=window, causal_alignment="bottom_right", softcap=softcap or None)
    return out.transpose(1, 2).contiguous(), None


def causal_lm_loss(hidden, head, labels, shift_labels=None, num_items_in_batch=None, softcap=None,
                   ignore_index=-100):
    """transformers' ForCausalLMLoss over ``head(hidden)`` without the logits; None if the dtypes
    are not ones the kernels take (the caller then computes the logits as usual)."""
    dt = _amp.matmul_dtype(hidden, head.weight, head.bias)
    if dt is None:
        return None
    h, w, b = _amp.cast(dt, hidden, head.weight, head.bias)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(h.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = fused_linear_cross_entropy(h, w, shift_labels, b, ignore_index=ignore_index, reduction=reduction,
                                      softcap=softcap)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def causal_lm_output(**fields):
    """transformers' ``CausalLMOutputWithPast`` (imported here: transformers is optional)."""
    return importlib.import_module("transformers.modeling_outputs").CausalLMOutputWithPast(**fields)
