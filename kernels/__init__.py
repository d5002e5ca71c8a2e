"""pycomm kernels: fused Triton ops with autograd, usable from eager PyTorch and torch.compile."""
from .bias_gelu import bias_gelu
from .fused_add_mul import fused_add_mul
from .swiglu import swiglu
