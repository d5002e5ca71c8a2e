"""pycomm kernels: fused Triton ops with forward and backward kernels, registered as
``torch.library`` custom ops (autograd, ``torch.compile(fullgraph=True)``).

Each op runs its Triton kernels on CUDA tensors (or on CPU tensors under Triton's interpreter,
``TRITON_INTERPRET=1``) and a PyTorch fallback otherwise; ``PYCOMM_KERNELS_BACKEND`` overrides
the choice (see ``kernels/_dispatch.py`` and docs/kernels.md).  Where an op has a Hopper-native
kernel family beside the portable one (matmul, attention), the faster one is chosen per autotune
bucket on the GPU; ``PYCOMM_KERNEL_VARIANT`` or ``use_variant()`` forces one, and
``variant_choices()`` shows what was chosen.
"""
import importlib as _importlib
import sys as _sys

if __name__ != "pycomm.kernels":
    # This folder found under the name `kernels` because a checkout's root is on sys.path
    # (`python -m pytest`, or transformers probing for Hugging Face's `kernels`, which imports
    # whatever it finds).  A second copy would register every torch.library op again over the
    # first one's (seen as segfaults and "vector::reserve" in later op calls): hand out the one
    # copy instead.
    _sys.modules[__name__] = _importlib.import_module("pycomm.kernels")
else:
    from . import nn
    from ._dispatch import backend, use_variant, variant_choices
    from .add_rms_norm import add_rms_norm
    from .bias_gelu import bias_gelu
    from .cross_entropy import softmax_cross_entropy
    from .flash_attention import flash_attention, flash_attention_varlen
    from .fused_add_mul import fused_add_mul
    from .fused_linear_cross_entropy import fused_linear_cross_entropy
    from .layer_norm import layer_norm
    from .matmul import matmul
    from .patch import patch
    from .qkv_attention import qkv_attention
    from .rms_norm import rms_norm
    from .rope import rope
    from .swiglu import geglu, swiglu
    from .swiglu_mlp import geglu_mlp, swiglu_mlp

    __all__ = [
        "add_rms_norm", "backend", "bias_gelu", "flash_attention", "flash_attention_varlen", "fused_add_mul",
        "fused_linear_cross_entropy", "geglu", "geglu_mlp", "layer_norm", "matmul", "nn", "patch", "qkv_attention",
        "rms_norm", "rope", "softmax_cross_entropy", "swiglu", "swiglu_mlp", "use_variant", "variant_choices",
    ]
