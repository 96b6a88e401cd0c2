"""modconv: StyleGAN2's modulated convolution (Karras et al. 2020, Sect. 2.2, Eq. 1–3).

Every synthesis layer convolves once: the style s scales the input channels of a shared weight
(modulation), each output channel is renormalised to unit expected variance (demodulation,
skipped by ToRGB), and the up-sampling layers use a stride-2 transposed convolution followed by
the [1,3,3,1] FIR (rosinality's `ModulatedConv2d(upsample=True)`, NVlabs' `conv2d_resample(up=2)`).

In teaching order: `modconv_ref`, the plain-PyTorch specification; `modconv_cpu`, the same math
arranged for a CPU; `_modconv_kernel`, the Triton kernel (a channels-last implicit GEMM that modulates
the x tile as it is loaded, with the layer's epilogue fused; the up-sampling conv as its 4 polyphase
sub-convolutions), its tile table and launcher; the autograd Function and the public `modconv`; and
`up_conv`, the up-sampling conv on Triton: its phases, then the FIR with the layer's epilogue
(kernels/fir.py). The fused synthesis layer built from them is kernels/layer.py; the buffers they share
(channels-last, zero-bordered halos) are kernels/buffers.py.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .buffers import NHWC, channels_last, halo_empty, has_halo, pow2
from .dispatch import fast_cpu, on_gpu, resolve
from .fir import fir_act, fir_input
from .upfirdn2d import upfirdn2d_ref


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
# The GPU formulation (NVlabs' non-fused path, as modconv_ref): the style scales the *activations* as they
# are loaded, so that the weight is one plain GEMM operand shared by the whole batch, and the
# demodulation is a (B, COUT) scale computed once, outside the loop. Activations are channels-last
# (B, H, W, C): a tile of BLOCK_K channels of one pixel is contiguous, so loads are 16-byte vectors.
# The 2× up-sampling layer runs as its four polyphase sub-convolutions (2×2, 2×1, 1×2 and 1×1 taps of
# the 3×3 kernel; no zero taps), each an ordinary convolution writing its phase of the transposed
# output T straight into the FIR's zero-bordered input.

@triton.jit
def _modconv_kernel(
    x_ptr,                   # activations (B, H, W, CIN), channels-last: channel stride 1
    w_ptr,                   # weight as a GEMM operand (K·K taps, CIN, COUT), contiguous
    s_ptr,                   # (B, CIN) modulation (the equalized-lr scale folded in), contiguous
    d_ptr,                   # (B, COUT) output scale: the demodulation (read only if SCALE)
    n_ptr,                   # noise (NB, QH, QW), already times its strength (read only if NOISE)
    bias_ptr,                # (COUT,) bias (read only if BIAS)
    y_ptr,                   # output, channels-last: pixel (qy, qx) of phase (py, px) at
                             #   y_off + b·syb + (UP·qy + py)·syh + (UP·qx + px)·syw
    H, W, CIN, COUT,         # input size and channels
    QH, QW,                  # output grid of phase (0, 0) (UP=1: H, W; UP=2: H + 1, W + 1)
    sxb, sxh, sxw,           # strides of x (elements)
    syb, syh, syw, y_off,    # strides and offset of y (elements)
    snb,                     # batch stride of the noise (0: one noise image for the batch)
    clamp,                   # |output| bound (used only if CLAMP)
    K: tl.constexpr,         # kernel size: 3, or 1 (ToRGB-like)
    UP: tl.constexpr,        # 1: 'same' convolution; 2: the transposed stride-2 conv as its 4 phases
    STRIDE: tl.constexpr, PAD: tl.constexpr,  # UP=1: y[q] += x[STRIDE·q + t − PAD]·w[t] (1, K//2 forward; the
                             #   transposed conv's input gradient is STRIDE=2, PAD=0)
    KB: tl.constexpr,        # channel blocks per tap: cdiv(CIN, BLOCK_K)
    EVEN_K: tl.constexpr,    # CIN % BLOCK_K == 0: no channel masks
    HALO: tl.constexpr,      # x sits inside a zero border of ≥ 1 pixel (`halo_empty`): no spatial masks
    MOD_W: tl.constexpr,     # modulate the weight tile instead of the x tile (narrow layers, see the launcher)
    SCALE: tl.constexpr, NOISE: tl.constexpr, BIAS: tl.constexpr, ACT: tl.constexpr, CLAMP: tl.constexpr,
    PREC: tl.constexpr,      # tl.dot input precision for fp32: "ieee" (exact) or "tf32"
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Implicit GEMM per sample b (and phase): y (pixels × COUT) = Σ_taps x_shifted·s (pixels × CIN) @ w[tap]
    # (CIN × COUT). Grid (B · tiles_m · PHASES · tiles_n,): output-channel tiles, then the 4 phases of the
    # up-sampling conv, are the fastest axes, so the programs that read one x tile run together and share
    # it through L2. Program (b, tm, phase, tn) owns BLOCK_M pixels of one sample (and phase) × BLOCK_N
    # output channels and runs ONE flat loop over (tap, channel block), which Triton software-pipelines.
    # Epilogue: × d, + noise, + bias, leaky ReLU · √2, clamp. Offsets inside a sample are int32; the sample
    # base is int64.
    tiles_n = tl.cdiv(COUT, BLOCK_N)
    tiles_m = tl.cdiv(QH * QW, BLOCK_M)            # (phase (0, 0) has the largest grid)
    pid = tl.program_id(0)
    tn = pid % tiles_n
    if UP == 2:
        ph = (pid // tiles_n) % 4
        py = ph // 2                               # the phase: parity of the output rows / columns
        px = ph % 2
        pid = pid // 4
    else:
        py = 0
        px = 0
    tm = (pid // tiles_n) % tiles_m
    b = pid // (tiles_n * tiles_m)
    QHP = QH - py                                  # this phase's grid: (QH − py) × (QW − px)
    QWP = QW - px
    if tm * BLOCK_M >= QHP * QWP:                  # (the odd phases' grids are a row / column shorter)
        return
    q = tm * BLOCK_M + tl.arange(0, BLOCK_M)       # (BLOCK_M,) pixel of the phase grid
    qy = q // QWP
    qx = q % QWP
    m_ok = q < QHP * QWP
    n = tn * BLOCK_N + tl.arange(0, BLOCK_N)       # (BLOCK_N,) output channel
    n_ok = n < COUT
    kc = tl.arange(0, BLOCK_K)                     # (BLOCK_K,) channel within the block
    qy = qy * STRIDE                               # the input pixel under tap (PAD, PAD)
    qx = qx * STRIDE
    x_rows = x_ptr + b.to(tl.int64) * sxb + (qy * sxh + qx * sxw)[:, None] + kc[None, :]
    s_b = s_ptr + b * CIN + kc
    w_n = w_ptr + kc[:, None] * COUT + n[None, :]
    if UP == 2:  # taps of the phase: 2 (even) or 1 (odd) along each axis
        n_taps = (2 - py) * (2 - px)
    else:
        n_taps = K * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(n_taps * KB):
        t = it // KB
        i0 = (it - t * KB) * BLOCK_K
        if UP == 2:  # T[2q + py] += x[q − ty] · w[py + 2·ty]: tap ty of the phase reads row q − ty
            ty = t >> (1 - px)                     # t = 2·ty + tx on even columns, ty on odd ones
            tx = t & (1 - px)
            dy = -ty
            dx = -tx
            tap = (py + 2 * ty) * 3 + px + 2 * tx
        else:        # y[q] += x[STRIDE·q + t − PAD] · w[t]
            ty = t // K
            tx = t - ty * K
            dy = ty - PAD
            dx = tx - PAD
            tap = t
        if HALO:  # out-of-image taps read the zero border
            ok = m_ok
        else:
            ok = m_ok & ((qy + dy).to(tl.uint32) < H) & ((qx + dx).to(tl.uint32) < W)  # inside the image
        if EVEN_K:
            xv = tl.load(x_rows + (dy * sxh + dx * sxw + i0), mask=ok[:, None], other=0.0)  # (BLOCK_M, BLOCK_K)
            sv = tl.load(s_b + i0)                                                         # (BLOCK_K,)
            wv = tl.load(w_n + (tap * CIN + i0) * COUT, mask=n_ok[None, :], other=0.0)     # (BLOCK_K, BLOCK_N)
        else:
            i_ok = (i0 + kc) < CIN
            xv = tl.load(x_rows + (dy * sxh + dx * sxw + i0), mask=ok[:, None] & i_ok[None, :], other=0.0)
            sv = tl.load(s_b + i0, mask=i_ok, other=0.0)
            wv = tl.load(w_n + (tap * CIN + i0) * COUT, mask=i_ok[:, None] & n_ok[None, :], other=0.0)
        if MOD_W:  # (BLOCK_K, BLOCK_N) is the smaller tile: scale its rows, x goes to the MMA as loaded
            acc = tl.dot(xv, (wv * sv[:, None]).to(xv.dtype), acc, input_precision=PREC)
        else:      # modulate the x tile, then MMA
            acc = tl.dot(xv * sv[None, :], wv, acc, input_precision=PREC)
    if SCALE:
        acc = acc * tl.load(d_ptr + b * COUT + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if NOISE:
        acc = acc + tl.load(n_ptr + b * snb + q, mask=m_ok, other=0.0).to(tl.float32)[:, None]  # (UP=1)
    if BIAS:
        acc = acc + tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ACT:  # leaky ReLU (slope 0.2) times its gain √2
        acc = tl.where(acc > 0, acc, acc * 0.2) * 1.4142135623730951
    if CLAMP:
        acc = tl.minimum(tl.maximum(acc, -clamp), clamp)
    oy = UP * (q // QWP) + py                      # output row / column (phases interleave for UP=2)
    ox = UP * (q % QWP) + px
    y = y_ptr + b.to(tl.int64) * syb + y_off + (oy * syh + ox * syw)[:, None] + n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def modconv_config(pixels, cin, cout, dtype, gpu=True, up=1, exact=False):
    """Tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for one layer class: the shape table.

    pixels: output pixels of one sample (for up=2: of the largest phase). On the GPU:
    - layers of ≥ 256 pixels take 256-pixel M tiles on 8 warps (two warpgroups of 128 rows);
    - N tiles of ≤ 64 channels, ≤ 32 for fp32 and for the up-sampling phases (whose runtime tap decoding
      needs registers): the accumulator and the modulated A fragments stay in registers;
    - K steps of 256 bytes per pixel where the channels allow (128 for 16-bit, 64 for fp32: 2 stages),
      else 3 stages;
    - exact fp32 (TF32 off: FFMA dot products) takes 64×64×8 tiles;
    - 4²–9² grids take M tiles of 16 or 32 pixels on mma.sync (no 64-row minimum, far less loop overhead
      per MMA than a half-empty wgmma; these layers are < 1% of the FLOPs).
    `python -m bench.aot` checks every launch: no spills, the A100's shared memory, SASS per MMA. The CPU
    interpreter costs per operation, not per element: there, few large tiles.
    """
    if not gpu:
        return pow2(pixels, 16, 4096), pow2(cout, 16, 64), pow2(cin, 16, 32), 4, 1
    if exact:  # exact fp32 (TF32 off): FFMA dot products, whose operands live in registers: small tiles
        return pow2(pixels, 16, 64), pow2(cout, 16, 64), 8, 4, 2
    if dtype == torch.float32:  # 4-byte operands: 64-channel K steps (32 for the 64-channel up-sampling
        # phases, which spill on sm_80 otherwise) and 32-channel N tiles (registers)
        bk, bn_max = (64 if cin >= 128 or (cin >= 64 and up == 1) else pow2(cin, 16, 32)), 32
    else:  # (the up-sampling phases' runtime tap decoding needs registers: 32-channel N tiles there)
        bk, bn_max = (128, 64 if up == 1 else 32) if cin >= 128 else (pow2(cin, 16, 64), 64)
    stages = 2 if bk * (4 if dtype == torch.float32 else 2) >= 256 else 3
    if pixels >= 256:
        return 256, pow2(cout, 16, bn_max), bk, 8, stages
    return pow2(pixels, 16, 32), pow2(cout, 16, 128 if dtype != torch.float32 else 64), min(bk, 64), 4, 3


def _precision(dtype):
    """tl.dot precision for fp32: TF32 when PyTorch allows TF32 convolutions (its own switch), else exact."""
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32" if dtype == torch.float32 else "ieee"  # (ignored for fp16 / bf16)


def demodulation(weight, s, eps=1e-8):
    """(B, COUT) demodulation coefficients 1/sqrt(Σ_i s[b,i]² Σ_{kh,kw} weight[o,i]² + eps) (StyleGAN2 Eq. 3)."""
    return torch.rsqrt(s.float().square() @ weight.float().square().sum([2, 3]).t() + eps)


def gemm_weight(weight, dtype):
    """(COUT, CIN, k, k) -> (k·k, CIN, COUT): the weight as the GEMM operand of `_modconv_kernel`."""
    return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[1], weight.shape[0]).to(dtype).contiguous()


def _modconv_triton(x, weight, s, d=None, up=1, out=None, noise=None, bias=None, act=False, clamp=None, stride=1,
                    halo_out=False):
    """Check, allocate, launch `_modconv_kernel`: gain-free modconv with an optional fused epilogue.

    x (B, CIN, H, W) (made channels-last), weight (COUT, CIN, k, k), s (B, CIN); d (B, COUT) scales the
    output (demodulation) or None; up=2 writes the transposed conv's (2H + 1)² result into `out` (the
    channels-last, zero-bordered FIR input) at offset (p0, p0), given as (out, p0). Returns y (B, COUT,
    H, W) channels-last for up=1, the filled `out` for up=2. stride=2 (up=1, no padding): the input gradient
    of the transposed conv, (B, CIN, 2H' + 1, 2W' + 1) -> (B, COUT, H', W'). halo_out: y is a `halo_empty`
    view (for a following 3×3 conv). x inside a halo runs the kernel without spatial masks.
    """
    B, CIN, H, W = x.shape
    COUT, _, K, _ = weight.shape
    halo = stride == 2 or (K == 3 and has_halo(x))  # (a stride-2 conv without padding never leaves x)
    if not has_halo(x):
        x = channels_last(x)
    s = s.to(x.dtype).contiguous()
    wg = gemm_weight(weight, x.dtype)
    if up == 1:
        QH, QW, phases = (H, W, 1) if stride == 1 else ((H - K) // 2 + 1, (W - K) // 2 + 1, 1)
        y = (halo_empty(B, COUT, QH, QW, x) if halo_out else
             torch.empty(B, COUT, QH, QW, device=x.device, dtype=x.dtype, memory_format=NHWC))
        off = 0
    else:
        QH, QW, phases = H + 1, W + 1, 4
        y, p0 = out
        off = p0 * y.stride(2) + p0 * y.stride(3)
    dummy = s
    nz = noise.to(x.dtype).contiguous() if noise is not None else None  # read densely: (NB, 1, H, W)
    prec = _precision(x.dtype)
    BM, BN, BK, warps, stages = modconv_config(QH * QW, CIN, COUT, x.dtype, on_gpu(x), up,
                                               exact=x.dtype == torch.float32 and prec == "ieee")
    # Narrow N tiles (≤ 32 output channels against ≥ 8× as many pixels): the weight tile is ≥ 8× smaller than
    # the x tile, so it is the one scaled by s (bench/aot.py: the loop then stays ≤ 20 SASS per wgmma; the x
    # tile's modulation costs 20–26 there). Everywhere else the x tile is.
    mod_w = BN <= 32 and BM >= 8 * BN
    grid = (B * triton.cdiv(QH * QW, BM) * phases * triton.cdiv(COUT, BN),)
    _modconv_kernel[grid](
        x, wg, s, d if d is not None else dummy, nz if nz is not None else dummy, bias if bias is not None else dummy,
        y, H, W, CIN, COUT, QH, QW, x.stride(0), x.stride(2), x.stride(3), y.stride(0), y.stride(2), y.stride(3),
        off, nz.stride(0) if nz is not None and nz.shape[0] > 1 else 0, float(clamp or 0.0),
        K=K, UP=up, STRIDE=stride, PAD=K // 2 if stride == 1 else 0, KB=triton.cdiv(CIN, BK), EVEN_K=CIN % BK == 0,
        HALO=halo, MOD_W=mod_w, SCALE=d is not None, NOISE=nz is not None, BIAS=bias is not None, ACT=bool(act),
        CLAMP=clamp is not None, PREC=prec, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps,
        num_stages=stages)
    return y


class _ModConv(torch.autograd.Function):
    """modconv on Triton (the op alone; synthesis uses kernels.layer, whose backward is Triton too); the
    backward recomputes modconv_ref and differentiates it, weight gradient included."""

    @staticmethod
    def forward(ctx, x, weight, s, demodulate, up, fir):
        ctx.save_for_backward(x, weight, s, fir)
        ctx.args = (demodulate, up)
        d = demodulation(weight, s) if demodulate else None
        return (_modconv_triton(x, weight, s, d) if up == 1 else up_conv(x, weight, s, d, fir)).contiguous()

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
        if weight.shape[1] != x.shape[1] or s.shape != x.shape[:2] or up not in (1, 2) or (up == 2 and
                                                                                          weight.shape[-1] != 3):
            raise ValueError(f"modconv: x {tuple(x.shape)}, weight {tuple(weight.shape)}, s {tuple(s.shape)}, "
                             f"up {up}")
        return _ModConv.apply(x, weight, s, demodulate, up, fir)
    if fast_cpu(x, impl):
        return modconv_cpu(x, weight, s, demodulate=demodulate, up=up, fir=fir)
    return modconv_ref(x, weight, s, demodulate=demodulate, up=up, fir=fir)


def up_conv(x, weight, s, d, fir, **epilogue):
    """The 2× up-sampling modconv on Triton: the four phases of the transposed conv into the zero-bordered FIR
    input, then the FIR with the layer's epilogue (`fir_act`'s keywords). (B, CIN, H, W) -> (B, COUT, 2H, 2W)."""
    B, _, H, W = x.shape
    P = fir_input(B, weight.shape[0], 2 * H + 1, 2 * W + 1, fir, x)
    _modconv_triton(x, weight, s, d, up=2, out=P)
    return fir_act(P[0], fir, **epilogue)
