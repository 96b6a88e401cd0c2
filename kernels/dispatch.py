"""Which implementation runs an op: explicit, and never silent.

impl="auto" defers to STYLEMASK_BACKEND (auto | torch | triton, default auto); "auto" then means the
Triton kernel for CUDA tensors and the PyTorch reference for CPU tensors. "triton" on CPU tensors runs
the Triton interpreter, which exists only with TRITON_INTERPRET=1 set before `kernels` is imported.
"""
import os

BACKENDS = ("auto", "torch", "triton")


def resolve(x, impl="auto"):
    """'torch' or 'triton' for an op on tensor x, or a one-line error saying what to set."""
    if impl == "auto":
        impl = os.environ.get("STYLEMASK_BACKEND", "auto") or "auto"
    if impl not in BACKENDS:
        raise ValueError(f"unknown backend {impl!r}: use one of {', '.join(BACKENDS)} (STYLEMASK_BACKEND)")
    if impl == "auto":
        return "triton" if x.is_cuda else "torch"
    if impl == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton kernels need CUDA tensors; on the CPU run them under the interpreter "
                           "with TRITON_INTERPRET=1 set before import, or use STYLEMASK_BACKEND=torch")
    return impl
