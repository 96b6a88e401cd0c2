"""modconv: StyleGAN2's modulated convolution (Karras et al. 2020, Sect. 2.2, Eq. 1–3).

Every synthesis layer is one call: the style s scales the input channels of a shared weight
(modulation), each output channel is renormalised to unit expected variance (demodulation,
skipped by ToRGB), and the up-sampling layers use a stride-2 transposed convolution followed by
the [1,3,3,1] FIR (rosinality's `ModulatedConv2d(upsample=True)`, NVlabs' `conv2d_resample(up=2)`).

In teaching order: `modconv_ref`, the plain-PyTorch specification; `modconv_cpu`, the same math
arranged for a CPU; `_modconv_kernel`, the Triton kernel (an implicit GEMM per sample that modulates
weight tiles on the fly and accumulates the demodulation from the same tiles); its launcher; the
autograd Function; and the public `modconv`.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dispatch import fast_cpu, resolve
from .upfirdn2d import _upfirdn2d_triton, upfirdn2d_ref


def modconv_ref(x, weight, s, demodulate=True, up=1, fir=None, eps=1e-8):
    """Modulated (and optionally demodulated, 2× up-sampled) convolution of a batch.

    Math, per sample b: w'[o,i,:,:] = weight[o,i,:,:] · s[b,i];  with demodulation
    w''[o] = w'[o] / sqrt(Σ_{i,kh,kw} w'[o,i]² + eps);  y = conv(x[b], w'').
    Computed without per-sample weights (NVlabs' non-fused path): scale the activations by s,
    run one ordinary convolution for the whole batch, scale the outputs by the demodulation
    coefficients — equal to the per-sample grouped convolution of the official code.

    Args:
        x: (B, Cin, H, W) activations.
        weight: (Cout, Cin, k, k) weight, with the equalized-lr scale 1/sqrt(Cin·k·k) applied.
        s: (B, Cin) styles.
        demodulate: normalise each output channel (True for convs, False for ToRGB).
        up: 1, or 2 for the up-sampling layer (transposed stride-2 conv, then `fir`).
        fir: (kf, kf) low-pass filter for up=2, already scaled by up² (the checkpoint's
            `convs.{i}.conv.blur.kernel`).
        eps: added under the square root of the demodulation, as in the official code.
    Returns:
        (B, Cout, H*up, W*up)
    """
    k = weight.shape[-1]
    x = x * s[:, :, None, None]  # modulate: (B, Cin, H, W)
    if up == 1:
        y = F.conv2d(x, weight, padding=k // 2)  # (B, Cout, H, W)
    elif up == 2:
        # transposed conv: (B, Cout, 2H + k - 2, 2W + k - 2), then the FIR trims to (2H, 2W)
        y = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
        p = (fir.shape[0] - 2) - (k - 1)
        p0, p1 = (p + 1) // 2 + 1, p // 2 + 1
        y = upfirdn2d_ref(y, fir, pad=(p0, p1, p0, p1))
    else:
        raise ValueError(f"modconv: up must be 1 or 2, got {up}")
    if demodulate:
        # Σ_{i,kh,kw} (weight[o,i] s[b,i])² = Σ_i s[b,i]² · Σ_{kh,kw} weight[o,i]²  -> (B, Cout)
        d = torch.rsqrt(s.square() @ weight.square().sum([2, 3]).t() + eps)
        y = y * d[:, :, None, None]
    return y


# --- Fast CPU variant -------------------------------------------------------------------------------
# modconv_ref's math arranged for oneDNN on a CPU; every choice measured with bench/speed.py (2-core
# AVX2 machine, 1024 config-f). Autograd runs through it as through any PyTorch code.
#  * Modulate the smaller operand. While a sample's activations are smaller than the weights (4²–64²
#    for 512 channels), scale the activations by s and demodulate the output, so that one ordinary
#    convolution serves the batch (NVlabs' non-fused path). Once they outgrow the weights, give each
#    sample its own modulated, demodulated weights (the official formulation, one sample at a time):
#    the big activations are then touched by the convolution only.
#  * Layout follows size: from 32×32 inputs up, activations are channels-last, where oneDNN convolves
#    32–256 channels 1.1–1.2× faster (128²–1024²) and runs the depthwise FIR 2–3× faster; smaller ones
#    stay NCHW, faster there (2.4× at 4², equal at 32²).
#  * Channels-last 2× up-sampling layers run the transposed convolution as its four polyphase
#    convolutions (2×2, 2×1, 1×2 and 1×1 taps of the 3×3 kernel, the same multiply-adds), written
#    straight into the FIR's zero-padded input: no zero-stuffing, ~1.5× faster than oneDNN's
#    channels-last transposed convolution at 512²–1024². Smaller ones use oneDNN's (NCHW).
#  * The [1,3,3,1] FIR as one depthwise 4×4 convolution, the layer's bias in its epilogue.
#  * `gain` and `bias` fused into the weights (or s) and the convolution's bias: synthesis passes the
#    leaky ReLU's gain √2 (lrelu(√2·z) = √2·lrelu(z)) and the layer bias, which then cost no pass.

NHWC = torch.channels_last
NHWC_MIN_PIXELS = 32 * 32  # channels-last from this input size up (equal speed at 32², see above)


def large_activations(x, weight):
    """True when one sample's activations (Cin, H, W) outgrow the weights (Cout, Cin, k, k): H·W > Cout·k²."""
    Cout, _, k, _ = weight.shape
    return x.shape[2] * x.shape[3] > Cout * k * k


def modulates_weights(x, weight, s):
    """True when modconv_cpu modulates the weights of x's samples one by one: large activations.

    Not while autograd records x or s: the backward of a convolution with s-dependent weights computes a
    weight gradient too (2× the forward's multiply-adds); with modulated activations it needs only the
    input gradient, as in modconv_ref.
    """
    if torch.is_grad_enabled() and (x.requires_grad or s.requires_grad):
        return False
    return large_activations(x, weight)


def modconv_cpu(x, weight, s, demodulate=True, up=1, fir=None, eps=1e-8, *, bias=None, gain=1.0, modulate=None):
    """gain · modconv_ref(x, weight, s, ...) + bias, computed the fast way on a CPU (see above).

    Args: as `modconv_ref`, plus
        bias: (Cout,) added to the output, or None.
        gain: multiplies the output (before the bias).
        modulate: None (choose with `modulates_weights`), or force "weights" / "activations"
            (for tests and bench/speed.py).
    Returns:
        (B, Cout, H*up, W*up); channels-last from 32×32 inputs up.
    """
    B, Cin, H, W = x.shape
    Cout, _, k, _ = weight.shape
    if up not in (1, 2):
        raise ValueError(f"modconv: up must be 1 or 2, got {up}")
    if modulate not in (None, "weights", "activations"):
        raise ValueError(f"modconv_cpu: modulate must be None, 'weights' or 'activations', got {modulate!r}")
    if up == 2 and (k != 3 or fir is None or fir.shape[0] < 2):  # shapes StyleGAN2 never uses
        y = gain * modconv_ref(x, weight, s, demodulate, up, fir, eps)
        return y if bias is None else y + bias[:, None, None]
    nhwc = H * W >= NHWC_MIN_PIXELS
    if k > 1:  # (a 1×1 ToRGB reads x in whatever layout the previous layer left it)
        x = x.contiguous(memory_format=NHWC if nhwc else torch.contiguous_format)
    if modulate is None:
        modulate = "weights" if modulates_weights(x, weight, s) else "activations"
    if modulate == "weights":
        if B == 1:
            return _conv_cpu(x, _modulated_weight(weight, s[0], demodulate, gain, eps), bias, up, fir, nhwc)
        return torch.cat([_conv_cpu(x[b:b + 1], _modulated_weight(weight, s[b], demodulate, gain, eps), bias, up,
                                    fir, nhwc) for b in range(B)])
    y = _conv_cpu(x * (s * gain)[:, :, None, None], weight, None, up, fir, nhwc)  # (B, Cout, H*up, W*up)
    if not demodulate:
        return y if bias is None else y + bias[:, None, None]
    d = torch.rsqrt(s.square() @ weight.square().sum([2, 3]).t() + eps)[:, :, None, None]  # (B, Cout, 1, 1)
    return y * d if bias is None else torch.addcmul(bias[:, None, None], y, d)


def _modulated_weight(weight, s, demodulate, gain, eps):
    """(Cout, Cin, k, k) weight of one sample: gain · weight · s, demodulated per output channel (Eq. 1, 3).

    All factors meet in one (Cout, Cin) matrix first, so the big weight is read once and written once.
    """
    scale = s[None, :] * gain  # (1, Cin)
    if demodulate:  # Σ_{i,kh,kw} (weight[o,i] s[i])² = Σ_i s[i]² · Σ_{kh,kw} weight[o,i]², as modconv_ref
        scale = scale * torch.rsqrt(weight.square().sum([2, 3]) @ s.square() + eps)[:, None]  # (Cout, Cin)
    return weight * scale[:, :, None, None]


def _conv_cpu(x, w, bias, up, fir, polyphase):
    """One ordinary convolution (up=1, 'same' padding), or the up-sampling layer (up=2): the transposed
    conv (polyphase, or oneDNN's) and the FIR, with the bias in the last op."""
    if up == 1:
        return F.conv2d(x, w, bias, padding=w.shape[-1] // 2)
    p = fir.shape[0] - 4  # modconv_ref's FIR padding of T (2H + 1, 2W + 1) for k = 3
    p0, p1 = (p + 1) // 2 + 1, p // 2 + 1
    if polyphase:
        return _fir_cpu(_transposed_conv_polyphase(x, w, p0, p1), fir, bias)
    T = F.conv_transpose2d(x, w.transpose(0, 1), stride=2)  # (B, Cout, 2H + 1, 2W + 1)
    return _fir_cpu(T if p0 == p1 else F.pad(T, [p0, p1, p0, p1]), fir, bias, padding=p0 if p0 == p1 else 0)


def _transposed_conv_polyphase(x, w, p0, p1):
    """x (B, Cin, H, W) -> P (B, Cout, 2H + 1 + p0 + p1, 2W + 1 + p0 + p1): the stride-2 transposed 3×3
    conv, zero-padded by (p0, p1) for the FIR, without zero-stuffing; channels-last.

    The transposed conv writes T[2m + ky, 2n + kx] += x[m, n] · w[ky, kx]. Its even rows take taps
    ky = 0, 2 (T[2m] = x[m]·w[0] + x[m−1]·w[2]), its odd rows tap 1 (T[2m+1] = x[m]·w[1]); the same for
    columns. So each of the four phases of T is an ordinary convolution of x with a 2×2, 2×1, 1×2 or 1×1
    slice of w (flipped: conv2d correlates), and the phases interleave into T.
    """
    w = w.flip([2, 3])  # conv2d correlates: the even taps [w0, w2] are used as [w2, w0]
    phases = []  # (2 or 1 taps) × (2 or 1 taps) for (even, odd) rows × (even, odd) columns
    for ky, py in ((slice(0, 3, 2), 1), (slice(1, 2), 0)):
        for kx, px in ((slice(0, 3, 2), 1), (slice(1, 2), 0)):
            phases.append(F.conv2d(x, w[:, :, ky, kx], padding=(py, px)))  # (B, Cout, H + py, W + px)
    return _Interleave.apply(p0, p1, *phases)


def _phase_slices(p0, H, W):
    """Where the (even, odd) rows × (even, odd) columns of T (2H + 1, 2W + 1) sit in P, T at offset p0."""
    rows = (slice(p0, p0 + 2 * H + 1, 2), slice(p0 + 1, p0 + 2 * H, 2))
    cols = (slice(p0, p0 + 2 * W + 1, 2), slice(p0 + 1, p0 + 2 * W, 2))
    return [(r, c) for r in rows for c in cols]


class _Interleave(torch.autograd.Function):
    """Four phases -> one zero-bordered image P; the backward hands each phase its strided view of dP.

    (Slice assignment under autograd would copy the whole of dP once per assignment.)
    """

    @staticmethod
    def forward(ctx, p0, p1, ee, eo, oe, oo):
        B, C, H, W = oo.shape
        P = torch.empty(B, C, 2 * H + 1 + p0 + p1, 2 * W + 1 + p0 + p1, dtype=oo.dtype, memory_format=NHWC)
        P[:, :, :p0], P[:, :, P.shape[2] - p1:] = 0, 0  # the FIR's zero border
        P[:, :, :, :p0], P[:, :, :, P.shape[3] - p1:] = 0, 0
        for (rows, cols), phase in zip(_phase_slices(p0, H, W), (ee, eo, oe, oo)):
            P[:, :, rows, cols] = phase
        ctx.p0, ctx.HW = p0, (H, W)
        return P

    @staticmethod
    def backward(ctx, dP):
        return (None, None) + tuple(dP[:, :, rows, cols] for rows, cols in _phase_slices(ctx.p0, *ctx.HW))


def _fir_cpu(P, fir, bias, padding=0):
    """P (B, C, h, w) -> (B, C, h + 2·padding − kf + 1, ...): the FIR (a true convolution), plus bias."""
    C = P.shape[1]
    f = fir.to(P.dtype).flip([0, 1])[None, None].expand(C, 1, *fir.shape)  # conv2d correlates
    return F.conv2d(P, f, bias, padding=padding, groups=C)


# --- Triton kernel ----------------------------------------------------------------------------------

@triton.jit
def _modconv_kernel(
    x_ptr,                   # activations (B, CIN, H, W), any strides
    w_ptr,                   # weight (COUT, CIN, K, K), equalized-lr scale already applied
    s_ptr,                   # styles (B, CIN): the modulation of Eq. 1 of StyleGAN2
    y_ptr,                   # output (B, COUT, OH, OW), contiguous
    CIN, COUT, H, W, OH, OW,
    sxb, sxc, sxh, sxw,      # strides of x
    swo, swi, swh, sww,      # strides of weight
    ssb, ssi,                # strides of s
    eps,                     # demodulation epsilon (1e-8, as officially)
    K: tl.constexpr,         # kernel size (3 for convs, 1 for ToRGB)
    UP: tl.constexpr,        # 1: 'same' convolution; 2: transposed stride-2 convolution, no padding
    DEMOD: tl.constexpr,     # demodulate (Eq. 3 of StyleGAN2) or not (ToRGB)
    IEEE: tl.constexpr,      # exact fp32 products in tl.dot (no TF32) for fp32 inputs
    BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    # Implicit GEMM per sample b: y[b] (pixels × COUT) = patches(x[b]) (pixels × CIN·K·K) @ w'[b]ᵀ,
    # where w'[b] = weight · s[b] is modulated on the fly, tile by tile. Grid
    # (B, cdiv(OH·OW, BLOCK_P), cdiv(COUT, BLOCK_O)): program (b, tp, to) owns BLOCK_P output pixels
    # × BLOCK_O output channels of sample b and loops over input-channel blocks and the K×K taps.
    # The demodulation Σ_{i,kh,kw} w'[b,o,i,kh,kw]² accumulates over exactly the same tiles.
    # Index math is int64: no overflow at 1024² × large batches.
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,) flat output pixel
    o = tl.program_id(2).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)  # (BLOCK_O,) output channel
    oy, ox = p // OW, p % OW
    p_ok, o_ok = p < OH * OW, o < COUT
    acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    wsq = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for i0 in range(0, CIN, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)  # (BLOCK_I,) input channel
        i_ok = i < CIN
        s = tl.load(s_ptr + b * ssb + i * ssi, mask=i_ok, other=0.0).to(tl.float32)
        for kh in tl.static_range(K):
            for kw in tl.static_range(K):
                if UP == 1:  # y[oy, ox] += x[oy + kh − K//2, ox + kw − K//2] · w[kh, kw]
                    iy, ix = oy + kh - K // 2, ox + kw - K // 2
                    ok = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
                else:        # transposed: y[2·iy + kh, 2·ix + kw] += x[iy, ix] · w[kh, kw]
                    ty, tx = oy - kh, ox - kw
                    iy, ix = ty // 2, tx // 2
                    ok = (ty >= 0) & (tx >= 0) & (ty % 2 == 0) & (tx % 2 == 0) & (iy < H) & (ix < W)
                xv = tl.load(x_ptr + b * sxb + i[None, :] * sxc + iy[:, None] * sxh + ix[:, None] * sxw,
                             mask=(ok & p_ok)[:, None] & i_ok[None, :], other=0.0)   # (BLOCK_P, BLOCK_I)
                wv = tl.load(w_ptr + o[None, :] * swo + i[:, None] * swi + kh * swh + kw * sww,
                             mask=i_ok[:, None] & o_ok[None, :], other=0.0)           # (BLOCK_I, BLOCK_O)
                wv = wv.to(tl.float32) * s[:, None]                                    # modulate
                if DEMOD:
                    wsq += tl.sum(wv * wv, axis=0)
                if IEEE:
                    acc = tl.dot(xv, wv, acc, input_precision="ieee")
                else:
                    acc = tl.dot(xv, wv.to(xv.dtype), acc)
    if DEMOD:
        acc = acc * tl.rsqrt(wsq + eps)[None, :]
    y = y_ptr + b * COUT * OH * OW + o[None, :] * (OH * OW) + p[:, None]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & o_ok[None, :])


# Fixed tiles (pixels, output channels, input channels): GPU-sized, and large for the CPU interpreter,
# whose cost is per operation of a program rather than per element.
MODCONV_BLOCKS = {"cuda": (64, 32, 32), "interpreter": (4096, 32, 32)}


def _modconv_triton(x, weight, s, demodulate, up, fir, eps=1e-8):
    """Check, allocate, launch: the forward of `modconv` on the Triton kernel (+ the FIR for up=2)."""
    B, CIN, H, W = x.shape
    COUT, _, K, _ = weight.shape
    if weight.shape[1] != CIN or s.shape != (B, CIN) or up not in (1, 2):
        raise ValueError(f"modconv: x {tuple(x.shape)}, weight {tuple(weight.shape)}, s {tuple(s.shape)}, up {up}")
    OH, OW = (H, W) if up == 1 else (2 * H + K - 2, 2 * W + K - 2)
    y = torch.empty(B, COUT, OH, OW, device=x.device, dtype=x.dtype)
    weight, s = weight.to(x.dtype), s.to(x.dtype)
    BLOCK_P, BLOCK_O, BLOCK_I = MODCONV_BLOCKS["cuda" if x.is_cuda else "interpreter"]
    grid = (B, triton.cdiv(OH * OW, BLOCK_P), triton.cdiv(COUT, BLOCK_O))
    _modconv_kernel[grid](x, weight, s, y, CIN, COUT, H, W, OH, OW, *x.stride(), *weight.stride(), *s.stride(),
                          eps, K=K, UP=up, DEMOD=bool(demodulate), IEEE=x.dtype == torch.float32,
                          BLOCK_P=BLOCK_P, BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I)
    if up == 2:  # the [1,3,3,1] low-pass that follows the transposed conv: (2H + K − 2) -> 2H
        p = (fir.shape[0] - 2) - (K - 1)
        p0, p1 = (p + 1) // 2 + 1, p // 2 + 1
        y = _upfirdn2d_triton(y, fir, 1, 1, (p0, p1, p0, p1), False, 1.0)
    return y


class _ModConv(torch.autograd.Function):
    """modconv on Triton; the backward runs the transposed reference ops (recomputing the forward)."""

    @staticmethod
    def forward(ctx, x, weight, s, demodulate, up, fir):
        ctx.save_for_backward(x, weight, s, fir)
        ctx.args = (demodulate, up)
        return _modconv_triton(x, weight, s, demodulate, up, fir)

    @staticmethod
    def backward(ctx, dy):
        x, weight, s, fir = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) for t, need in zip((x, weight, s), ctx.needs_input_grad[:3])]
        with torch.enable_grad():
            y = modconv_ref(*inputs, *ctx.args, fir=fir)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, dy) if wanted else [])
        return tuple(next(grads) if t.requires_grad else None for t in inputs) + (None, None, None)


def modconv(x, weight, s, demodulate=True, up=1, fir=None, impl="auto"):
    """Modulated convolution; see `modconv_ref` for the math and shapes (kernels/dispatch.py picks the code)."""
    if resolve(x, impl) == "triton":
        return _ModConv.apply(x, weight, s, demodulate, up, fir)
    if fast_cpu(x, impl):
        return modconv_cpu(x, weight, s, demodulate=demodulate, up=up, fir=fir)
    return modconv_ref(x, weight, s, demodulate=demodulate, up=up, fir=fir)
