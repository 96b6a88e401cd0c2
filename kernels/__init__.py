"""StyleGAN2's two heavy ops behind fixed signatures: `modconv` and `upfirdn2d`.

Dispatch is explicit: impl="auto" (or the STYLEMASK_BACKEND environment variable: auto, torch,
triton). Today every path is the PyTorch reference; "triton" raises until the Triton kernels land,
after which "auto" picks Triton for CUDA tensors and the reference for CPU tensors.
Importing this package compiles nothing and needs no GPU.
"""
import os

from .modconv import modconv_ref
from .upfirdn2d import upfirdn2d_ref

BACKENDS = ("auto", "torch", "triton")


def _impl(x, impl):
    """Resolve impl ('auto' | 'torch' | 'triton') for tensor x; never silently."""
    if impl == "auto":
        impl = os.environ.get("STYLEMASK_BACKEND", "auto")
    if impl not in BACKENDS:
        raise ValueError(f"unknown backend {impl!r}: use one of {', '.join(BACKENDS)} (STYLEMASK_BACKEND)")
    if impl == "auto":
        impl = "torch"  # becomes "triton" for CUDA tensors when the Triton kernels land (issue #3)
    if impl == "triton":
        raise NotImplementedError("the Triton kernels are not built yet: use STYLEMASK_BACKEND=torch")
    return impl


def modconv(x, weight, s, demodulate=True, up=1, fir=None, impl="auto"):
    """Modulated convolution; see `modconv_ref` for the math and shapes."""
    _impl(x, impl)
    return modconv_ref(x, weight, s, demodulate=demodulate, up=up, fir=fir)


def upfirdn2d(x, f, up=1, down=1, pad=(0, 0, 0, 0), flip_filter=False, gain=1.0, impl="auto"):
    """Upsample, FIR-filter, downsample; see `upfirdn2d_ref` for the steps and shapes."""
    _impl(x, impl)
    return upfirdn2d_ref(x, f, up=up, down=down, pad=pad, flip_filter=flip_filter, gain=gain)
