"""Which implementation runs an op: explicit, and never silent.

impl="auto" defers to STYLEMASK_BACKEND (auto | torch | triton, default auto); "auto" then means the
Triton kernel for CUDA tensors and PyTorch ops for CPU tensors. "triton" on CPU tensors runs the Triton
interpreter, which exists only with TRITON_INTERPRET=1 set before `kernels` is imported.

The PyTorch backend has two variants: on CPU tensors the fast CPU ops (`modconv_cpu`, `upfirdn2d_cpu`,
and `kernels.layer_cpu` built on them), and everywhere else, or with STYLEMASK_FAST=0, the plain
references (`modconv_ref`, `upfirdn2d_ref`). Both compute the same function; the tests hold them to it.
"""
import ctypes
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


GPU_TILES = False  # tests only: launchers pick their GPU tiles for CPU tensors too (the interpreter runs them)


def on_gpu(x):
    """True for CUDA tensors and for meta tensors: bench/aot.py plans the GPU launches on meta tensors, so
    launchers pick their GPU tiles for both (and, with GPU_TILES, the interpreter tests for CPU tensors)."""
    return x.is_cuda or x.device.type == "meta" or GPU_TILES


def fast_cpu(x, impl="auto"):
    """True when an op on x runs the fast CPU variant: the torch backend, a CPU tensor, STYLEMASK_FAST not 0."""
    fast = os.environ.get("STYLEMASK_FAST", "1") not in ("0", "")
    return fast and x.device.type == "cpu" and resolve(x, impl) == "torch"


_KEEP_FREED_MEMORY = []


def keep_freed_memory():
    """Let glibc's malloc reuse freed large blocks instead of returning them to the OS (once per process).

    By default every tensor over 32 MiB is a fresh mmap: the kernel zero-fills it page by page on first
    touch, ~0.3 ms per MiB here, which is ~25% of a 1024×1024 synthesis on two cores. Raising malloc's
    mmap and trim thresholds keeps freed blocks in the heap for the next layer. Peak memory is unchanged
    (freed blocks are reused, not added), but the process keeps its peak heap after the call.
    A no-op where libc is not glibc. Called by the fast CPU `layer`; STYLEMASK_FAST=0 never calls it.
    """
    if _KEEP_FREED_MEMORY:
        return
    _KEEP_FREED_MEMORY.append(True)
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)        # blocks up to 1 GiB from the heap, not mmap
        libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)  # never shrink the heap on free
    except (OSError, AttributeError):
        pass
