"""What the planner knows about a model: a decoder-only transformer's shape.

Contract: :class:`Model` holds layers, hidden size, heads, key/value heads, MLP width,
vocabulary, sequence length and the training dtype; :data:`MODELS` names presets (the GPT rows
of Megatron-LM's weak-scaling table, GPT-3 175B, and ``tiny``, the GPT of
``examples/train_gpt.py``); :func:`model_from` reads an HF-style config, anything with a
``.config`` (an HF ``nn.Module``), or ``train_gpt.GPTConfig``.  Pure Python.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["Model", "MODELS", "DTYPE_BYTES", "model_from", "get_model"]

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
"""bytes per element of the training dtype (weights, activations, gradients)"""


@dataclass(frozen=True)
class Model:
    """A decoder-only transformer (pre-norm blocks: attention then a two-matrix MLP)."""

    layers: int
    """Transformer blocks."""
    hidden: int
    """Model width h."""
    heads: int
    """Query heads a."""
    vocab: int
    """Vocabulary size V."""
    seq: int
    """Sequence length s (tokens per sample)."""
    kv_heads: int = 0
    """Key/value heads (grouped-query attention); 0 means ``heads`` (multi-head attention)."""
    ffn: int = 0
    """MLP hidden width; 0 means ``4 * hidden``."""
    dtype: str = "bf16"
    """Training dtype: bf16/fp16 (mixed precision: fp32 master weights in the optimizer) or fp32."""
    name: str = "custom"
    """Label for tables."""

    def __post_init__(self) -> None:
        for arg in ("layers", "hidden", "heads", "vocab", "seq"):
            value = getattr(self, arg)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Model: {arg} must be a positive int, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"Model: hidden={self.hidden} must be a multiple of heads={self.heads}")
        if self.kv_heads == 0:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.ffn == 0:
            object.__setattr__(self, "ffn", 4 * self.hidden)
        if self.kv_heads < 1 or self.heads % self.kv_heads:
            raise ValueError(f"Model: kv_heads={self.kv_heads} must divide heads={self.heads}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"Model: dtype {self.dtype!r} unknown; use one of {sorted(DTYPE_BYTES)}")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection: kv_heads * head size."""
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def standard(self) -> bool:
        """Multi-head attention and a 4h MLP: the shape Narayanan et al.'s formula assumes."""
        return self.kv_heads == self.heads and self.ffn == 4 * self.hidden

    def layer_params(self) -> int:
        """Weights and biases of one block: Q, K, V, O, the two MLP matrices and two norms."""
        h, kv, f = self.hidden, self.kv_dim, self.ffn
        return (h * h + 2 * h * kv + h * h) + (h + 2 * kv + h) + 2 * h * f + f + h + 4 * h

    def embedding_params(self) -> int:
        """Token and learned position embeddings (first stage)."""
        return self.vocab * self.hidden + self.seq * self.hidden

    def head_params(self) -> int:
        """Final norm and the (untied) output projection (last stage)."""
        return 2 * self.hidden + self.vocab * self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.embedding_params() + self.head_params()

    def layer_fwd_flops(self, tokens: int) -> float:
        """Forward FLOPs of one block on ``tokens`` tokens (2 per multiply-add): the four
        projections, the MLP and attention's two s x s products.  24·h²·(1 + s/(6h)) per token
        for the standard shape, as in Narayanan et al. 2021."""
        h, kv, f, s = self.hidden, self.kv_dim, self.ffn, self.seq
        return 2.0 * tokens * (2 * h * h + 2 * h * kv + 2 * h * f + 2 * s * h)

    def attention_fwd_flops(self, tokens: int) -> float:
        """The part of a block's forward that selective recomputation repeats: QKᵀ and
        softmax·V (4·s·h per token)."""
        return 4.0 * tokens * self.seq * self.hidden

    def layer_fwd_elementwise_bytes(self, tokens: int, tp: int) -> float:
        """Bytes the element-wise operations of one block's forward read and write, per device:
        two norms (read + write), two dropouts (read, write, mask) and two residual
        adds (2 reads + 1 write) on the replicated ``s·b·h`` activations — 15 per element, not
        split by tensor parallelism — then GELU on the ``ffn`` width (read + write) and the
        fused scale-mask-softmax plus dropout on the ``a·s²`` scores (4.5 per score), split by tp."""
        h, a, s = self.hidden, self.heads, self.seq
        per_token = 15 * h + (2 * self.ffn + 4.5 * a * s) / tp
        return tokens * per_token * self.dtype_bytes

    def head_fwd_flops(self, tokens: int) -> float:
        """The logit layer's forward, 2·h·V per token."""
        return 2.0 * tokens * self.hidden * self.vocab

    def iteration_flops(self, batch: int, recompute: str = "full") -> float:
        """FLOPs of one training iteration on ``batch`` sequences: forward, backward (twice the
        forward) and the recomputation's extra forward.  With ``recompute="full"`` and the
        standard shape this is Narayanan et al.'s ``96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h))``."""
        tokens = batch * self.seq
        layer = self.layer_fwd_flops(tokens)
        extra = {"none": 0.0, "selective": self.attention_fwd_flops(tokens), "full": layer}[recompute]
        return self.layers * (3 * layer + extra) + 3 * self.head_fwd_flops(tokens)

    def describe(self) -> str:
        return (f"{self.name}: {self.params() / 1e9:.2f}B parameters, l={self.layers}, h={self.hidden}, "
                f"a={self.heads}, kv={self.kv_heads}, ffn={self.ffn}, V={self.vocab}, s={self.seq}, {self.dtype}")


def _gpt(name: str, layers: int, hidden: int, heads: int) -> Model:
    return Model(layers=layers, hidden=hidden, heads=heads, vocab=51200, seq=2048, dtype="fp16", name=name)


MODELS: dict[str, Model] = {
    # Narayanan et al. 2021 (SC21), Table 1: vocabulary 51,200, sequence 2048, fp16.
    "gpt-1.7b": _gpt("gpt-1.7b", 24, 2304, 24),
    "gpt-3.6b": _gpt("gpt-3.6b", 30, 3072, 32),
    "gpt-7.5b": _gpt("gpt-7.5b", 36, 4096, 32),
    "gpt-18b": _gpt("gpt-18b", 40, 6144, 48),
    "gpt-39b": _gpt("gpt-39b", 48, 8192, 64),
    "gpt-76b": _gpt("gpt-76b", 60, 10240, 80),
    "gpt-145b": _gpt("gpt-145b", 80, 12288, 96),
    "gpt-310b": _gpt("gpt-310b", 96, 16384, 128),
    "gpt-530b": _gpt("gpt-530b", 105, 20480, 128),
    "gpt-1t": _gpt("gpt-1t", 128, 25600, 160),
    # GPT-3 (Brown et al. 2020): 96 layers, h=12288, 96 heads, s=2048.
    "gpt-175b": _gpt("gpt-175b", 96, 12288, 96),
    # examples/train_gpt.py's GPTConfig defaults, trained in fp32 on CPU processes.
    "tiny": Model(layers=4, hidden=32, heads=4, kv_heads=2, ffn=128, vocab=64, seq=16, dtype="fp32", name="tiny"),
}


def get_model(name: str) -> Model:
    """The preset called ``name``."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; use one of {', '.join(MODELS)} "
                         f"or pass the shape (layers, hidden, heads, ...)") from None


# (our field, names it goes by in HF configs and in train_gpt.GPTConfig)
_FIELDS = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers", "layers"),
    "hidden": ("hidden_size", "n_embd", "d_model", "hidden"),
    "heads": ("num_attention_heads", "n_head", "heads"),
    "kv_heads": ("num_key_value_heads", "kv_heads"),
    "ffn": ("intermediate_size", "n_inner", "ffn_hidden_size", "ffn"),
    "vocab": ("vocab_size", "padded_vocab_size", "vocab"),
    "seq": ("max_position_embeddings", "n_positions", "seq_length", "seq"),
}


def model_from(obj: object, seq: int | None = None, dtype: str | None = None, name: str | None = None) -> Model:
    """A :class:`Model` from a preset name, a Model, an HF-style config (or a dict of one), an
    object with such a ``.config`` (an HF ``nn.Module``), or ``train_gpt.GPTConfig``.
    ``seq`` and ``dtype`` override what the config says."""
    if isinstance(obj, str):
        model = get_model(obj)
    elif isinstance(obj, Model):
        model = obj
    else:
        source = obj if isinstance(obj, dict) else getattr(obj, "config", obj)
        if not isinstance(source, dict):
            source = {k: getattr(source, k) for names in _FIELDS.values() for k in names if hasattr(source, k)}
        values = {}
        for ours, names in _FIELDS.items():
            for n in names:
                if source.get(n) is not None:
                    values[ours] = int(source[n])
                    break
        missing = [k for k in ("layers", "hidden", "heads", "vocab") if k not in values]
        if "seq" not in values and seq is None:
            missing.append("seq")
        if missing:
            raise ValueError(
                f"cannot read a transformer shape from {type(obj).__name__}: missing {missing}; pass a "
                f"planner.Model(layers=..., hidden=..., heads=..., vocab=..., seq=...), a preset name "
                f"({', '.join(MODELS)}), or an HF config")
        if seq is not None:
            values["seq"] = seq
        model = Model(**values, dtype=dtype or "bf16", name=name or type(obj).__name__)
        return model
    changes: dict = {}
    if seq is not None:
        changes["seq"] = seq
    if dtype is not None:
        changes["dtype"] = dtype
    if name is not None:
        changes["name"] = name
    return replace(model, **changes) if changes else model
