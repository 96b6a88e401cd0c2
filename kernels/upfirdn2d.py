"""upfirdn2d: upsample, FIR-filter, downsample a batch of images, channel by channel.

StyleGAN2 resamples with it: the [1,3,3,1] blur after every up-sampling convolution and the
2× up-sampling of the ToRGB skip image. Semantics follow NVlabs' `upfirdn2d_ref` and
rosinality's `upfirdn2d_native` (the same op): a *true* convolution (filter flipped) unless
`flip_filter=True`, padding given as (x0, x1, y0, y1), negative padding crops.

In teaching order: `upfirdn2d_ref`, the plain-PyTorch specification; `upfirdn2d_cpu`, the same op
without zero-stuffing for CPUs; `_upfirdn2d_kernel`, the Triton kernel (one program per output tile, a
direct loop over the filter taps); its launcher; the autograd Function (the backward is upfirdn2d
again); and the public `upfirdn2d` that dispatches.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dispatch import fast_cpu, on_gpu, resolve


def upfirdn2d_ref(x, f, up=1, down=1, pad=(0, 0, 0, 0), flip_filter=False, gain=1.0):
    """Resample x with the 2-D FIR filter f, like `scipy.signal.upfirdn` on every channel.

    Steps, per channel: 1. insert `up - 1` zeros after every pixel (rows and columns),
    2. pad by (x0, x1, y0, y1) zeros (negative values crop), 3. convolve with f (flipped, i.e. a
    true convolution, unless flip_filter), scaled by `gain`, keeping only fully-covered pixels,
    4. keep every `down`-th pixel.

    Args:
        x: (B, C, H, W) images.
        f: (kh, kw) filter, used as given (StyleGAN2 stores it normalised and pre-scaled by up²).
        up, down: integer factors ≥ 1.
        pad: (x0, x1, y0, y1) padding of the up-sampled image, in pixels.
        flip_filter: False = convolution (the StyleGAN2 default), True = correlation.
        gain: multiplies the output.
    Returns:
        (B, C, (H*up + y0 + y1 - kh) // down + 1, (W*up + x0 + x1 - kw) // down + 1)
    """
    B, C, H, W = x.shape
    x0, x1, y0, y1 = pad
    kh, kw = f.shape
    # 1. zero insertion: (B, C, H, 1, W, 1) -> pad the singleton axes -> (B, C, H*up, W*up)
    if up > 1:
        x = x.reshape(B, C, H, 1, W, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(B, C, H * up, W * up)
    # 2. pad, then crop where the padding is negative
    x = F.pad(x, [max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)])
    x = x[:, :, max(-y0, 0): x.shape[2] - max(-y1, 0), max(-x0, 0): x.shape[3] - max(-x1, 0)]
    # 3. depthwise FIR; F.conv2d correlates, so flip for a true convolution
    w = f.to(x.dtype) * gain
    if not flip_filter:
        w = w.flip([0, 1])
    w = w[None, None].expand(C, 1, kh, kw)  # (C, 1, kh, kw), one copy per channel
    x = F.conv2d(x, w, groups=C)
    # 4. decimate
    return x[:, :, ::down, ::down]


# --- Fast CPU variant -------------------------------------------------------------------------------

def upfirdn2d_cpu(x, f, up=1, down=1, pad=(0, 0, 0, 0), flip_filter=False, gain=1.0):
    """upfirdn2d_ref without zero-stuffing: one depthwise (transposed) convolution per call.

    up = 1: pad, then a depthwise convolution with stride `down`. up > 1: a depthwise *transposed*
    convolution with stride `up` multiplies only the real pixels (its polyphase form: for up = 2 and a
    4-tap filter, 2 taps per phase and axis instead of 4 over mostly zeros); its padding / output_padding
    give the (y0, y1) window when they can, else the full output is padded or cropped. Same args and
    shapes as `upfirdn2d_ref`.
    """
    B, C, H, W = x.shape
    x0, x1, y0, y1 = pad
    kh, kw = f.shape
    f = f.to(x.dtype) * gain
    if up == 1:  # conv2d correlates: flip for a true convolution
        w = (f if flip_filter else f.flip([0, 1]))[None, None].expand(C, 1, kh, kw)
        return F.conv2d(_pad_or_crop(x, x0, x1, y0, y1), w, groups=C, stride=down)
    # conv_transpose2d(stride=up, padding=p) gives y[n] = Σ x[i]·w[t] over n = i·up + t − p: the true
    # convolution of the zero-stuffed x with w when p = k − 1 − y0, and its window ends at y1 when
    # output_padding = y1 − y0 + up − 1 (which must lie in [0, up)).
    w = (f.flip([0, 1]) if flip_filter else f)[None, None].expand(C, 1, kh, kw)
    p, op = (kh - 1 - y0, kw - 1 - x0), (y1 - y0 + up - 1, x1 - x0 + up - 1)
    if min(p) >= 0 and all(0 <= o < up for o in op):
        y = F.conv_transpose2d(x, w, stride=up, padding=p, output_padding=op, groups=C)
    else:  # the full transposed convolution (pad (k − 1, k − up)), then pad or crop to the window
        y = F.conv_transpose2d(x, w, stride=up, groups=C)
        y = _pad_or_crop(y, x0 - (kw - 1), x1 - (kw - up), y0 - (kh - 1), y1 - (kh - up))
    return y[:, :, ::down, ::down] if down > 1 else y


def _pad_or_crop(x, x0, x1, y0, y1):
    """Zero-pad the last two axes by the positive amounts, crop by the negative ones (upfirdn2d_ref's step 2)."""
    x = F.pad(x, [max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)]) if max(x0, x1, y0, y1) > 0 else x
    return x[:, :, max(-y0, 0): x.shape[2] - max(-y1, 0), max(-x0, 0): x.shape[3] - max(-x1, 0)]


# --- Triton kernel ----------------------------------------------------------------------------------

@triton.jit
def _upfirdn2d_kernel(
    x_ptr,                   # input (N, H, W) planes: (B, C, H, W) viewed as B·C planes, any strides
    f_ptr,                   # filter (KH, KW), contiguous, used flipped unless FLIP
    y_ptr,                   # output (N, OH, OW), contiguous
    N, C, H, W, OH, OW,      # planes, channels, input and output plane sizes
    sxb, sxc, sxh, sxw,      # strides of x, in elements
    X0, Y0,                  # left / top padding of the zero-stuffed image (negative: crop)
    gain,                    # output scale
    UP: tl.constexpr, DOWN: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, FLIP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # Grid (cdiv(N, BLOCK_N), cdiv(OH, BLOCK_H), cdiv(OW, BLOCK_W)): each program writes a
    # BLOCK_N × BLOCK_H × BLOCK_W tile (planes × rows × columns). Output pixel (oy, ox) reads tap (i, j)
    # of the window that starts at (oy·DOWN, ox·DOWN) in the padded, zero-stuffed image; that pixel is
    # u = (oy·DOWN + i − Y0, ox·DOWN + j − X0) of the stuffed image, which holds x[u / UP] when u is a
    # multiple of UP and zero otherwise. So only every UP-th tap meets a non-zero (polyphase): row oy runs
    # the taps i = i0 + UP·t, i0 = (Y0 − oy·DOWN) mod UP (and the same for columns), cdiv(KH, UP) of them,
    # each with its own filter value (a gather from the 16-tap filter, cached). Index math is int64.
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) planes
    oy = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)  # (BLOCK_H,) output rows
    ox = tl.program_id(2).to(tl.int64) * BLOCK_W + tl.arange(0, BLOCK_W)  # (BLOCK_W,) output columns
    x_planes = x_ptr + ((n // C) * sxb + (n % C) * sxc)[:, None, None]   # (BLOCK_N, 1, 1)
    n_ok = (n < N)[:, None, None]
    acc = tl.zeros((BLOCK_N, BLOCK_H, BLOCK_W), dtype=tl.float32)
    if UP == 1:  # every tap is live: scalar filter values
        for i in tl.static_range(KH):
            uy = oy * DOWN + i - Y0
            ok_y = (uy >= 0) & (uy < H)
            row = (uy * sxh)[None, :, None]
            for j in tl.static_range(KW):
                ux = ox * DOWN + j - X0
                ok_x = (ux >= 0) & (ux < W)
                # a true convolution meets tap (i, j) with f[KH-1-i, KW-1-j]; correlation with f[i, j]
                if FLIP:
                    tap = tl.load(f_ptr + i * KW + j)
                else:
                    tap = tl.load(f_ptr + (KH - 1 - i) * KW + (KW - 1 - j))
                ok = n_ok & ok_y[None, :, None] & ok_x[None, None, :]
                v = tl.load(x_planes + row + (ux * sxw)[None, None, :], mask=ok, other=0.0)
                acc += v.to(tl.float32) * tap
    else:
        iy0 = ((Y0 - oy * DOWN) % UP + UP) % UP                          # (BLOCK_H,) first live tap row
        ix0 = ((X0 - ox * DOWN) % UP + UP) % UP                          # (BLOCK_W,) first live tap column
        for t in tl.static_range((KH + UP - 1) // UP):
            i = iy0 + UP * t                                             # (BLOCK_H,) tap row
            uy = oy * DOWN + i - Y0                                      # a multiple of UP
            ok_y = (i < KH) & (uy >= 0) & (uy < H * UP)
            row = (uy // UP * sxh)[None, :, None]
            for r in tl.static_range((KW + UP - 1) // UP):
                j = ix0 + UP * r                                         # (BLOCK_W,) tap column
                ux = ox * DOWN + j - X0
                ok_x = (j < KW) & (ux >= 0) & (ux < W * UP)
                if FLIP:
                    f_idx = i[:, None] * KW + j[None, :]
                else:
                    f_idx = (KH - 1 - i)[:, None] * KW + (KW - 1 - j)[None, :]
                tap = tl.load(f_ptr + f_idx, mask=(i < KH)[:, None] & (j < KW)[None, :], other=0.0)  # (H, W)
                ok = n_ok & ok_y[None, :, None] & ok_x[None, None, :]
                v = tl.load(x_planes + row + (ux // UP * sxw)[None, None, :], mask=ok, other=0.0)
                acc += v.to(tl.float32) * tap[None, :, :]
    y = y_ptr + n[:, None, None] * (OH * OW) + oy[None, :, None] * OW + ox[None, None, :]
    out_ok = n_ok & (oy < OH)[None, :, None] & (ox < OW)[None, None, :]
    tl.store(y, (acc * gain).to(y_ptr.dtype.element_ty), mask=out_ok)


# Fixed tiles: small ones for the GPU; large ones for the CPU interpreter, whose cost is per operation
# of a program, not per element (so fewer, larger programs run it many times faster).
UPFIRDN2D_BLOCKS = {"cuda": (1, 32, 32), "interpreter": (16, 64, 64)}


def _upfirdn2d_triton(x, f, up, down, pad, flip_filter, gain):
    """Check, allocate, launch: the forward of `upfirdn2d` on the Triton kernel."""
    B, C, H, W = x.shape
    x0, x1, y0, y1 = pad
    KH, KW = f.shape
    OH, OW = (H * up + y0 + y1 - KH) // down + 1, (W * up + x0 + x1 - KW) // down + 1
    if OH < 1 or OW < 1:
        raise ValueError(f"upfirdn2d: empty output for input {H}×{W}, filter {KH}×{KW}, pad {pad}")
    y = torch.empty(B, C, OH, OW, device=x.device, dtype=x.dtype)
    f = f.to(device=x.device, dtype=torch.float32).contiguous()
    BN, BH, BW = UPFIRDN2D_BLOCKS["cuda" if on_gpu(x) else "interpreter"]
    grid = (triton.cdiv(B * C, BN), triton.cdiv(OH, BH), triton.cdiv(OW, BW))
    _upfirdn2d_kernel[grid](x, f, y, B * C, C, H, W, OH, OW, *x.stride(), x0, y0, float(gain),
                            UP=up, DOWN=down, KH=KH, KW=KW, FLIP=bool(flip_filter),
                            BLOCK_N=BN, BLOCK_H=BH, BLOCK_W=BW)
    return y


class _Upfirdn2d(torch.autograd.Function):
    """upfirdn2d on Triton; its backward is upfirdn2d again (NVlabs' _upfirdn2d_cuda.backward)."""

    @staticmethod
    def forward(ctx, x, f, up, down, pad, flip_filter, gain):
        y = _upfirdn2d_triton(x, f, up, down, pad, flip_filter, gain)
        ctx.save_for_backward(f)
        ctx.args = (x.shape[2:], y.shape[2:], up, down, pad, flip_filter, gain)
        return y

    @staticmethod
    def backward(ctx, dy):
        (f,) = ctx.saved_tensors
        (H, W), (OH, OW), up, down, (x0, x1, y0, y1), flip_filter, gain = ctx.args
        KH, KW = f.shape
        # The adjoint: swap up and down, flip the filter, and pad so that the shapes line up again.
        pad = (KW - x0 - 1, W * up - OW * down + x0 - up + 1, KH - y0 - 1, H * up - OH * down + y0 - up + 1)
        dx = _Upfirdn2d.apply(dy, f, down, up, pad, not flip_filter, gain)
        return dx, None, None, None, None, None, None


def upfirdn2d(x, f, up=1, down=1, pad=(0, 0, 0, 0), flip_filter=False, gain=1.0, impl="auto"):
    """Upsample, FIR-filter, downsample; see `upfirdn2d_ref` for the steps and shapes."""
    if resolve(x, impl) == "triton":
        return _Upfirdn2d.apply(x, f, up, down, tuple(pad), flip_filter, gain)
    if fast_cpu(x, impl):
        return upfirdn2d_cpu(x, f, up=up, down=down, pad=pad, flip_filter=flip_filter, gain=gain)
    return upfirdn2d_ref(x, f, up=up, down=down, pad=pad, flip_filter=flip_filter, gain=gain)
