"""modconv: StyleGAN2's modulated convolution (Karras et al. 2020, Sect. 2.2, Eq. 1–3).

Every synthesis layer is one call: the style s scales the input channels of a shared weight
(modulation), each output channel is renormalised to unit expected variance (demodulation,
skipped by ToRGB), and the up-sampling layers use a stride-2 transposed convolution followed by
the [1,3,3,1] FIR (rosinality's `ModulatedConv2d(upsample=True)`, NVlabs' `conv2d_resample(up=2)`).

In teaching order: `modconv_ref`, the plain-PyTorch specification; `_modconv_kernel`, the Triton
kernel (an implicit GEMM per sample that modulates weight tiles on the fly and accumulates the
demodulation from the same tiles); its launcher; the autograd Function; and the public `modconv`.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dispatch import resolve
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
    """Modulated convolution; see `modconv_ref` for the math and shapes."""
    if resolve(x, impl) == "triton":
        return _ModConv.apply(x, weight, s, demodulate, up, fir)
    return modconv_ref(x, weight, s, demodulate=demodulate, up=up, fir=fir)
