"""The activation buffers the Triton ops share: channels-last layout, zero-bordered halos, power-of-two tiles.

Activations between Triton layers live inside a zeroed 1-pixel border: the tensor a layer returns is the
interior view of a (B, C, H + 2, W + 2) channels-last buffer, so the next 3×3 conv's taps that leave the
image read zeros and its loop needs no spatial masks. Only buffers made here count (a registry of them).
"""
import weakref

import torch
import triton

NHWC = torch.channels_last


def pow2(n, lo, hi):
    """The power of two ≥ n, clipped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def channels_last(x):
    """x in channels-last memory order (a no-op when it already is)."""
    return x.contiguous(memory_format=NHWC)


_HALOS = weakref.WeakValueDictionary()  # id(buffer) -> buffer


def bordered_empty(B, C, H, W, lo, hi, like):
    """(B, C, H, W) channels-last activations inside a zeroed border, lo pixels before and hi after in each
    spatial dimension: the interior view of a (B, C, H + lo + hi, W + lo + hi) buffer (its `_base`)."""
    base = torch.empty(B, C, H + lo + hi, W + lo + hi, device=like.device, dtype=like.dtype, memory_format=NHWC)
    base[:, :, :lo], base[:, :, lo + H:], base[:, :, :, :lo], base[:, :, :, lo + W:] = 0, 0, 0, 0
    return base[:, :, lo:lo + H, lo:lo + W]


def halo_empty(B, C, H, W, like):
    """(B, C, H, W) channels-last activations with a zeroed 1-pixel border around them (the view's parent)."""
    x = bordered_empty(B, C, H, W, 1, 1, like)
    _HALOS[id(x._base)] = x._base
    return x


def has_halo(x):
    """True when x is the interior of a `halo_empty` buffer (so its 1-pixel border is zero)."""
    b = x._base
    return (b is not None and _HALOS.get(id(b)) is b and b.shape[:2] == x.shape[:2]
            and b.shape[2:] == (x.shape[2] + 2, x.shape[3] + 2) and x.stride() == b.stride()
            and x.storage_offset() == b.storage_offset() + b.stride(2) + b.stride(3))
