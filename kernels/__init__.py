"""pycomm kernels: fused Triton ops with autograd, usable from eager PyTorch and torch.compile."""
from .add_rms_norm import add_rms_norm
from .bias_gelu import bias_gelu
from .fused_add_mul import fused_add_mul
from .layer_norm import layer_norm
from .rms_norm import rms_norm
from .swiglu import swiglu
from .cross_entropy import softmax_cross_entropy
from .matmul import matmul
from .flash_attention import flash_attention
