"""StyleGAN2's heavy ops behind fixed signatures: `layer` (one whole synthesis layer: modconv and its
epilogue, or ToRGB and the skip; kernels/layer.py), `modconv` and `upfirdn2d`.

Each op lives in its own file (kernels/fir.py: the FIR after the up-sampling conv, with the layer's epilogue;
kernels/buffers.py: the channels-last, zero-bordered activation buffers the Triton ops share) in teaching order: `<op>_ref` (plain PyTorch, the specification),
`<op>_cpu` (the same math arranged for CPUs), `_<op>_kernel` (Triton), `_<op>_triton` (launcher), an
autograd Function, and the public `<op>`, which dispatches (kernels/dispatch.py): Triton for CUDA
tensors, the fast CPU variant for CPU tensors (STYLEMASK_FAST=0: the reference), STYLEMASK_BACKEND=
torch|triton to force one. Importing this package compiles nothing and needs no GPU.

Not here: anything of the model (`stylemask`, the networks, `weights`, the scripts): kernels import only
torch and triton, so they can be tested and benchmarked (bench/) alone.
"""
from .dispatch import BACKENDS, fast_cpu, keep_freed_memory, resolve
from .layer import KernelCheckError, layer, layer_cpu, layer_ref, runs_per_sample
from .modconv import modconv, modconv_cpu, modconv_ref, modulates_weights
from .upfirdn2d import upfirdn2d, upfirdn2d_cpu, upfirdn2d_ref

__all__ = ["BACKENDS", "KernelCheckError", "fast_cpu", "keep_freed_memory", "resolve", "layer", "layer_cpu", "layer_ref",
           "runs_per_sample", "modconv", "modconv_cpu", "modconv_ref",
           "modulates_weights", "upfirdn2d", "upfirdn2d_cpu", "upfirdn2d_ref"]
