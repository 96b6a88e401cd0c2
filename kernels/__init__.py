"""StyleGAN2's two heavy ops behind fixed signatures: `modconv` and `upfirdn2d`.

Each op lives in its own file in teaching order: `<op>_ref` (plain PyTorch, the specification),
`_<op>_kernel` (Triton), `_<op>_triton` (launcher), an autograd Function, and the public `<op>`,
which dispatches (kernels/dispatch.py): Triton for CUDA tensors, the reference for CPU tensors,
STYLEMASK_BACKEND=torch|triton to force one. Importing this package compiles nothing and needs no GPU.
"""
from .dispatch import BACKENDS, resolve
from .modconv import modconv, modconv_ref
from .upfirdn2d import upfirdn2d, upfirdn2d_ref

__all__ = ["BACKENDS", "resolve", "modconv", "modconv_ref", "upfirdn2d", "upfirdn2d_ref"]
