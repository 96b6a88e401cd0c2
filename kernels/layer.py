"""layer: one StyleGAN2 synthesis layer as one op, so that `stylemask.synthesis` is one loop.

A conv layer is modconv → demodulation → noise → bias → leaky ReLU · √2 → clamp; a ToRGB layer is
modconv without demodulation → bias → clamp → + the 2× up-FIR of the running image (the 'skip'
architecture of config-f). Three implementations compute the same function behind one signature:
`layer_ref` (the plain-PyTorch specification: the official loop body), `layer_cpu` (the same math
arranged for a CPU), and `_layer_triton` (the GPU: `_modconv_kernel` with the whole epilogue fused,
the up-sampling layer's FIR with the epilogue fused, and ToRGB with the skip add fused), wrapped in an
autograd Function; the public `layer` dispatches (kernels/dispatch.py), the Triton path behind a safety net
(`checked`: each variant checked once against layer_ref, falling back to it).

Arguments shared by all three (shapes as in kernels/modconv.py):
    x (B, CIN, H, W) activations; weight (COUT, CIN, k, k) as stored in the checkpoint (the
    equalized-lr scale 1/sqrt(CIN·k·k) is applied here); s (B, CIN) styles; bias (COUT,);
    up 1 or 2 and fir (the conv's blur kernel) for the up-sampling conv; noise (B or 1, 1, H·up, W·up)
    and noise_strength (1,) or None; clamp (NVlabs' conv_clamp) or None;
    rgb=True for ToRGB, with img (B, 3, H/2, W/2) the running image or None and img_fir its 2× up filter.
"""
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .buffers import NHWC, bordered_empty, channels_last, halo_empty, has_halo, pow2
from .dispatch import fast_cpu, keep_freed_memory, on_gpu, resolve
from .fir import epilogue_ref, fir_act, fir_input_pad
from .modconv import _modconv_triton, demodulation, modconv_cpu, modconv_ref, modulates_weights, up_conv
from .upfirdn2d import upfirdn2d, upfirdn2d_cpu, upfirdn2d_ref

SQRT2 = math.sqrt(2.0)
SKIP_PAD = (2, 1, 2, 1)  # the ToRGB skip's 2× up-FIR padding (4-tap filter)


def layer_ref(x, weight, s, bias, up=1, fir=None, noise=None, noise_strength=None, clamp=None, rgb=False, img=None,
              img_fir=None):
    """One synthesis layer, the specification: the loop body of the official synthesis (module docstring)."""
    weight = weight * (1 / math.sqrt(weight[0].numel()))  # equalized-lr scale 1/sqrt(Cin·k·k)
    if not rgb:
        x = modconv_ref(x, weight, s, demodulate=True, up=up, fir=fir)  # (B, COUT, H·up, W·up)
        return epilogue_ref(x, None if noise is None else noise_strength * noise, bias, act=True, clamp=clamp)
    y = modconv_ref(x, weight, s, demodulate=False) + bias[None, :, None, None]  # (B, 3, H, W)
    if clamp is not None:
        y = y.clamp(-clamp, clamp)
    if img is not None:  # up-sample the running image 2× with the [1,3,3,1] filter
        y = y + upfirdn2d_ref(img, img_fir, up=2, pad=SKIP_PAD)
    return y


def layer_cpu(x, weight, s, bias, up=1, fir=None, noise=None, noise_strength=None, clamp=None, rgb=False, img=None,
              img_fir=None):
    """layer_ref computed the fast way on a CPU (modconv_cpu), the same function up to rounding.

    Each difference is exact in real arithmetic and measured in bench/speed.py: the equalized-lr scale
    multiplies s, not the weight; the layer bias and the activation gain √2 go into the convolution
    (lrelu(√2·z) = √2·lrelu(z)); noise and leaky ReLU update the fresh conv output in place;
    activations from 32×32 up are channels-last.
    """
    s = s * (1 / math.sqrt(weight[0].numel()))  # (B, CIN): (w·c)·s = w·(c·s)
    if not rgb:
        x = modconv_cpu(x, weight, s, up=up, fir=fir, bias=bias * SQRT2, gain=SQRT2)  # (B, COUT, H·up, W·up)
        if noise is not None:  # (not addcmul_(n, w): its three-way broadcast is 2× slower here)
            x.add_(noise * (noise_strength * SQRT2))
        F.leaky_relu_(x, 0.2)  # = √2 · lrelu(conv + noise + bias)
        return x if clamp is None else x.clamp(-clamp, clamp)  # not in place: lrelu's backward reads its output
    y = modconv_cpu(x, weight, s, demodulate=False, bias=bias)
    if clamp is not None:
        y = y.clamp(-clamp, clamp)
    if img is not None:  # the 2× up-FIR of the running image, as one depthwise transposed conv
        y.add_(upfirdn2d_cpu(img, img_fir, up=2, pad=SKIP_PAD))
    return y


def runs_per_sample(x, weight, s, impl="auto"):
    """True where a batch should run the rest of the synthesis one sample at a time: the fast CPU path,
    once a conv layer's activations outgrow its weights (modconv_cpu then modulates weights per sample,
    and no batch is ever copied together)."""
    return x.shape[0] > 1 and fast_cpu(x, impl) and modulates_weights(x, weight, s)


# --- Triton: ToRGB with the skip add fused ----------------------------------------------------------

@triton.jit
def _torgb_kernel(
    x_ptr,                   # activations (B, H, W, CIN): channels contiguous, pixels at strides sxh, sxw
    w_ptr,                   # weight (3, CIN), fp32, contiguous, equalized-lr scale applied
    s_ptr,                   # (B, CIN) styles, contiguous
    bias_ptr,                # (3,) bias, fp32
    img_ptr,                 # running image (B, 3, H/2, W/2), contiguous (read only if SKIP)
    f_ptr,                   # skip filter (4, 4), fp32: a true convolution after 2× zero-insertion
    y_ptr,                   # output image (B, 3, H, W), contiguous
    H, W, CIN,
    sxb, sxh, sxw,           # strides of x
    clamp,
    SKIP: tl.constexpr, CLAMP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Grid (B · tiles_p,): program (b, tp) writes BLOCK_P pixels × 3 colours. Three output channels are too
    # few for a tensor-core tile, so each is a dot product of the modulated x row with one weight row
    # (fp32 FMAs: no padding, exact). The skip: output pixel (oy, ox) of the 2× up-FIR reads only the 2×2
    # low-res pixels whose zero-inserted position meets the 4×4 filter: rows m + r + a − 1, a ∈ {0, 1},
    # with oy = 2m + r, against filter row 3 − r − 2a (and the same for columns).
    tiles_p = tl.cdiv(H * W, BLOCK_P)
    b = tl.program_id(0) // tiles_p
    p = (tl.program_id(0) % tiles_p) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    p_ok = p < H * W
    oy = p // W
    ox = p % W
    kc = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + b.to(tl.int64) * sxb + (oy * sxh + ox * sxw)[:, None] + kc[None, :]
    r0 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    r1 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    r2 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for i0 in range(0, CIN, BLOCK_K):
        i_ok = (i0 + kc) < CIN
        xv = tl.load(x_rows + i0, mask=p_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)  # (P, K)
        sv = tl.load(s_ptr + b * CIN + i0 + kc, mask=i_ok, other=0.0).to(tl.float32)             # (K,)
        r0 += tl.sum(xv * (sv * tl.load(w_ptr + i0 + kc, mask=i_ok, other=0.0))[None, :], axis=1)
        r1 += tl.sum(xv * (sv * tl.load(w_ptr + CIN + i0 + kc, mask=i_ok, other=0.0))[None, :], axis=1)
        r2 += tl.sum(xv * (sv * tl.load(w_ptr + 2 * CIN + i0 + kc, mask=i_ok, other=0.0))[None, :], axis=1)
    r0 += tl.load(bias_ptr)
    r1 += tl.load(bias_ptr + 1)
    r2 += tl.load(bias_ptr + 2)
    if CLAMP:
        r0 = tl.minimum(tl.maximum(r0, -clamp), clamp)
        r1 = tl.minimum(tl.maximum(r1, -clamp), clamp)
        r2 = tl.minimum(tl.maximum(r2, -clamp), clamp)
    IH = H // 2
    IW = W // 2
    if SKIP:
        img_b = img_ptr + b.to(tl.int64) * 3 * IH * IW
        ry = oy % 2
        rx = ox % 2
        for a in tl.static_range(2):
            u = oy // 2 + ry + a - 1
            for c in tl.static_range(2):
                v = ox // 2 + rx + c - 1
                ok = p_ok & (u >= 0) & (u < IH) & (v >= 0) & (v < IW)
                tap = tl.load(f_ptr + (3 - ry - 2 * a) * 4 + (3 - rx - 2 * c))  # (BLOCK_P,) gathered, 16 values
                src = img_b + u * IW + v
                r0 += tap * tl.load(src, mask=ok, other=0.0).to(tl.float32)
                r1 += tap * tl.load(src + IH * IW, mask=ok, other=0.0).to(tl.float32)
                r2 += tap * tl.load(src + 2 * IH * IW, mask=ok, other=0.0).to(tl.float32)
    y = y_ptr + b.to(tl.int64) * 3 * H * W + p
    tl.store(y, r0.to(y_ptr.dtype.element_ty), mask=p_ok)
    tl.store(y + H * W, r1.to(y_ptr.dtype.element_ty), mask=p_ok)
    tl.store(y + 2 * H * W, r2.to(y_ptr.dtype.element_ty), mask=p_ok)


def _torgb_triton(x, weight, s, bias, img, img_fir, clamp):
    """Check, allocate, launch `_torgb_kernel`: (B, CIN, H, W) -> the image (B, 3, H, W), contiguous."""
    B, CIN, H, W = x.shape
    if x.stride(1) != 1:  # the kernel reads channels as vectors; pixel strides it takes as they are (a halo view)
        x = channels_last(x)
    w = (weight.reshape(weight.shape[0], CIN) * (1 / math.sqrt(CIN))).float().contiguous()  # (3, CIN)
    y = torch.empty(B, 3, H, W, device=x.device, dtype=x.dtype)
    if img is not None:
        img = img.to(x.dtype).contiguous()
        if img.shape != (B, 3, H // 2, W // 2) or img_fir is None or img_fir.shape != (4, 4):
            raise ValueError(f"layer: running image {tuple(img.shape)} and skip filter do not fit a {H}×{W} ToRGB")
        f = img_fir.to(device=x.device, dtype=torch.float32).contiguous()
    else:
        f = w
    BP, BK = (128, pow2(CIN, 16, 32)) if on_gpu(x) else (pow2(H * W, 16, 4096), pow2(CIN, 16, 64))
    grid = (B * triton.cdiv(H * W, BP),)
    _torgb_kernel[grid](x, w, s.contiguous(), bias.float().contiguous(), img if img is not None else y, f, y,
                        H, W, CIN, x.stride(0), x.stride(2), x.stride(3), float(clamp or 0.0),
                        SKIP=img is not None, CLAMP=clamp is not None, BLOCK_P=BP, BLOCK_K=BK, num_warps=4)
    return y


def _layer_triton(x, weight, s, bias, up=1, fir=None, noise=None, noise_strength=None, clamp=None, rgb=False,
                  img=None, img_fir=None):
    """The forward of `layer` on the Triton kernels: a conv layer is one launch (up=1) or four phase launches
    and one FIR launch (up=2); ToRGB is one launch. Activations are returned channels-last."""
    if rgb:
        return _torgb_triton(x, weight, s, bias, img, img_fir, clamp)
    if weight.shape[-1] != 3 and up == 2:
        raise ValueError("layer: the up-sampling conv needs a 3×3 kernel")
    s = s * (1 / math.sqrt(weight[0].numel()))   # (B, CIN): the equalized-lr scale folded into s
    d = demodulation(weight, s)                  # (B, COUT), fp32, once per sample and output channel
    nz = None if noise is None else noise_strength * noise  # (B or 1, 1, H·up, W·up)
    if up == 1:
        return _modconv_triton(x, weight, s, d, noise=nz, bias=bias, act=True, clamp=clamp, halo_out=True)
    return up_conv(x, weight, s, d, fir, noise=nz, bias=bias, act=True, clamp=clamp, halo_out=True)


# --- Triton: the layer's backward ---------------------------------------------------------------------
# Training needs ∂L/∂x and ∂L/∂s of every layer (the generator is frozen). Besides the input-gradient convolution
# (`_modconv_kernel` again), a layer's backward is pointwise work and per-channel reductions over its
# activations; two kernels do all of it in one pass each, in the activation dtype with fp32 arithmetic, and write
# per-program partial sums that a small sum finishes (deterministic: no atomics):
#   `_act_grad_kernel`   g = ∂L/∂pre from dy and y (the leaky ReLU's slope; nothing through a clamp), and
#                        Σ_p g·(pre − bias − noise) per (sample, channel), the demodulation's share;
#   `_style_grad_kernel` dx = s'·G and Σ_p x·G per (sample, input channel), the style's gradient; for ToRGB it
#                        first forms G = wᵀ·dy from the 3 colour gradients (a 1×1 conv to CIN channels).

@triton.jit
def _act_grad_kernel(
    dy_ptr, y_ptr,           # ∂L/∂y and the layer's output y (B, C, H, W), any strides
    n_ptr,                   # noise · strength (NB, H, W), contiguous (read only if NOISE)
    bias_ptr,                # (C,) bias
    g_ptr,                   # out: g = ∂L/∂pre (B, C, H, W), any strides (the input of the gradient conv)
    a_ptr,                   # out: (B, NP, C) fp32, Σ over each program's pixels of g · (pre − bias − noise)
    HW, W, C, NP,
    sdb, sdc, sdh, sdw,      # strides of dy
    syb, syc, syh, syw,      # strides of y
    sgb, sgc, sgh, sgw,      # strides of g
    snb,                     # batch stride of the noise (0: shared)
    clamp,
    NOISE: tl.constexpr, CLAMP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Grid (B · NP, cdiv(C, BLOCK_C)): program (b, pixel block pb, channel block) reads BLOCK_P pixels × BLOCK_C
    # channels of dy and y once. y > 0 ⇔ pre > 0, and pre = y / slope: no forward value is stored but y.
    b = tl.program_id(0) // NP
    pb = tl.program_id(0) % NP
    q = pb * BLOCK_P + tl.arange(0, BLOCK_P)                  # (BLOCK_P,) pixels
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)    # (BLOCK_C,) channels
    q_ok, c_ok = q < HW, c < C
    ok = q_ok[:, None] & c_ok[None, :]
    oy, ox = q // W, q % W
    bb = b.to(tl.int64)
    dy = tl.load(dy_ptr + bb * sdb + (oy * sdh + ox * sdw)[:, None] + (c * sdc)[None, :], mask=ok, other=0.0)
    y = tl.load(y_ptr + bb * syb + (oy * syh + ox * syw)[:, None] + (c * syc)[None, :], mask=ok, other=0.0)
    dy, y = dy.to(tl.float32), y.to(tl.float32)
    slope = tl.where(y > 0, 1.4142135623730951, 0.28284271247461906)  # leaky ReLU (0.2) times its gain √2
    g = dy * slope
    if CLAMP:
        g = tl.where(tl.abs(y) < clamp, g, 0.0)
    tl.store(g_ptr + bb * sgb + (oy * sgh + ox * sgw)[:, None] + (c * sgc)[None, :], g.to(g_ptr.dtype.element_ty),
             mask=ok)
    lin = y / slope - tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]  # d·Z: pre − bias
    if NOISE:
        lin -= tl.load(n_ptr + b * snb + q, mask=q_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(a_ptr + (b * NP + pb) * C + c, tl.sum(tl.where(ok, g * lin, 0.0), axis=0), mask=c_ok)


@triton.jit
def _style_grad_kernel(
    x_ptr,                   # the layer's input x (B, C, H, W), any strides
    g_ptr,                   # G = ∂L/∂(x·s') (B, C, H, W), any strides; RGB: the colour gradient dy (B, 3, H, W)
    w_ptr,                   # RGB: the ToRGB weight (3, C), fp32, contiguous, equalized-lr scale applied
    s_ptr,                   # (B, C) s', fp32, contiguous
    dx_ptr,                  # out: dx = s'·G (B, C, H, W), any strides
    ds_ptr,                  # out: (B, NP, C) fp32, Σ over each program's pixels of x · G
    HW, W, C, NP,
    sxb, sxc, sxh, sxw,      # strides of x
    sgb, sgc, sgh, sgw,      # strides of G (RGB: of dy)
    sob, soc, soh, sow,      # strides of dx
    RGB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Grid (B · NP, cdiv(C, BLOCK_C)): program (b, pixel block pb, channel block) reads BLOCK_P pixels × BLOCK_C
    # channels of x and G (RGB: 3 colours of dy) once and writes dx once.
    b = tl.program_id(0) // NP
    pb = tl.program_id(0) % NP
    q = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    q_ok, c_ok = q < HW, c < C
    ok = q_ok[:, None] & c_ok[None, :]
    oy, ox = q // W, q % W
    bb = b.to(tl.int64)
    if RGB:  # G[p, c] = Σ_k dy[k, p] · w[k, c]
        dy_p = g_ptr + bb * sgb + oy * sgh + ox * sgw
        G = tl.load(dy_p, mask=q_ok, other=0.0).to(tl.float32)[:, None] * \
            tl.load(w_ptr + c, mask=c_ok, other=0.0)[None, :]
        G += tl.load(dy_p + sgc, mask=q_ok, other=0.0).to(tl.float32)[:, None] * \
            tl.load(w_ptr + C + c, mask=c_ok, other=0.0)[None, :]
        G += tl.load(dy_p + 2 * sgc, mask=q_ok, other=0.0).to(tl.float32)[:, None] * \
            tl.load(w_ptr + 2 * C + c, mask=c_ok, other=0.0)[None, :]
    else:
        G = tl.load(g_ptr + bb * sgb + (oy * sgh + ox * sgw)[:, None] + (c * sgc)[None, :], mask=ok,
                    other=0.0).to(tl.float32)
    x = tl.load(x_ptr + bb * sxb + (oy * sxh + ox * sxw)[:, None] + (c * sxc)[None, :], mask=ok,
                other=0.0).to(tl.float32)
    sv = tl.load(s_ptr + b * C + c, mask=c_ok, other=0.0)
    tl.store(dx_ptr + bb * sob + (oy * soh + ox * sow)[:, None] + (c * soc)[None, :],
             (G * sv[None, :]).to(dx_ptr.dtype.element_ty), mask=ok)
    tl.store(ds_ptr + (b * NP + pb) * C + c, tl.sum(tl.where(ok, x * G, 0.0), axis=0), mask=c_ok)


def _reduction_tiles(HW, C, like):
    """(BLOCK_P, BLOCK_C, NP, num_warps) of the backward's pointwise-and-reduce kernels: 64 × 64 tiles on 8 warps
    on the GPU (16 values of each tensor per thread: no spills on Triton 3.7 or 3.9, bench.aot), few large
    programs under the interpreter."""
    if on_gpu(like):
        return 64, pow2(C, 16, 64), triton.cdiv(HW, 64), 8
    BP = pow2(HW, 16, 1024)
    return BP, pow2(C, 16, 64), triton.cdiv(HW, BP), 4


def act_grad(dy, y, bias, nz, clamp, out):
    """g = ∂L/∂pre of a conv layer into out (B, C, H, W) (any strides: a zero-bordered buffer's interior), and
    A' = Σ_p g·(pre − bias − noise) (B, C) fp32: the gradient w.r.t. the demodulation times d."""
    B, C, H, W = y.shape
    BP, BC, NP, warps = _reduction_tiles(H * W, C, y)
    part = torch.empty(B, NP, C, device=y.device, dtype=torch.float32)
    n = nz.reshape(nz.shape[0], H * W).contiguous() if nz is not None else part
    _act_grad_kernel[(B * NP, triton.cdiv(C, BC))](
        dy, y, n, bias, out, part, H * W, W, C, NP, *dy.stride(), *y.stride(), *out.stride(),
        n.stride(0) if nz is not None and nz.shape[0] > 1 else 0, float(clamp or 0.0),
        NOISE=nz is not None, CLAMP=clamp is not None, BLOCK_P=BP, BLOCK_C=BC, num_warps=warps)
    return part.sum(1)


def style_grad(x, G, s_, w=None):
    """(dx = s'·G (B, C, H, W) channels-last, Σ_p x·G (B, C) fp32) from G = ∂L/∂(x·s'); w (3, C): ToRGB, where
    G is the colour gradient dy (B, 3, H, W) and the kernel forms wᵀ·dy itself."""
    B, C, H, W = x.shape
    BP, BC, NP, warps = _reduction_tiles(H * W, C, x)
    part = torch.empty(B, NP, C, device=x.device, dtype=torch.float32)
    dx = torch.empty(B, C, H, W, device=x.device, dtype=x.dtype, memory_format=NHWC)
    _style_grad_kernel[(B * NP, triton.cdiv(C, BC))](
        x, G, w if w is not None else part, s_.float().contiguous(), dx, part, H * W, W, C, NP,
        *x.stride(), *G.stride(), *dx.stride(), RGB=w is not None, BLOCK_P=BP, BLOCK_C=BC, num_warps=warps)
    return dx, part.sum(1)


def _conv_layer_backward(x, weight, s, bias, nz, y, up, fir, clamp, dy):
    """(dx, ds) of a conv layer from its output y, on the Triton kernels: what training needs (frozen generator).

    With s' = c·s (c the equalized-lr scale), Z = conv(x·s', w) (for up=2: FIR of the transposed conv T),
    d = demodulation(w, s') and pre = d·Z + noise + bias, y = clamp(lrelu(pre)·√2):
      g = ∂L/∂pre               from y alone (y > 0 ⇔ pre > 0; clamped outputs pass nothing): `act_grad`;
      G = ∂L/∂(x·s')            the conv's input gradient of g·d: `_modconv_kernel` with the weight flipped and
                                transposed and d as the modulation (up=2: the FIR's adjoint, then a stride-2 conv);
      dx = s'·G;  ∂L/∂s' = Σ_p x·G − s'·((A·d³) @ Σ_k w²),  A = ∂L/∂d = Σ_p g·Z  (StyleGAN2 Eq. 3's chain rule):
                                `style_grad`, then the (B, CIN) correction.
    """
    c = 1 / math.sqrt(weight[0].numel())
    s_ = s * c                                                    # (B, CIN)
    d = demodulation(weight, s_)                                  # (B, COUT), fp32
    B, COUT, OH, OW = y.shape
    if up == 1:  # g is the input of a stride-1 3×3 conv: inside a 1-pixel zero border, no spatial masks
        g = halo_empty(B, COUT, OH, OW, y)
    else:  # the FIR's adjoint correlates g padded by t before and KF − t after: write g inside that border
        KF = fir.shape[0]
        t = KF - 1 - fir_input_pad(fir)
        g = bordered_empty(B, COUT, OH, OW, t, KF - t, y)
    A = act_grad(dy, y, bias, nz, clamp, out=g) / d               # (B, COUT): ∂L/∂d
    if up == 1:
        G = _modconv_triton(g, weight.transpose(0, 1).flip([2, 3]), d)  # (B, CIN, H, W)
    else:
        dT = fir_act(g._base, fir, flip=True)                     # (B, COUT, 2H + 1, 2W + 1)
        G = _modconv_triton(dT, weight.transpose(0, 1), d, stride=2)  # (B, CIN, H, W)
    dx, xG = style_grad(x, G, s_)
    ds_ = xG - s_.float() * ((A * d.pow(3)) @ weight.float().square().sum([2, 3]))
    return dx, (ds_ * c).to(s.dtype)


def _torgb_backward(x, weight, s, img, img_fir, dy):
    """(dx, ds, dimg) of ToRGB without clamp: a 1×1 conv to 3 channels, its input gradient formed, scaled and
    reduced in one pass (`style_grad`), and the skip's adjoint, upfirdn2d again (2× down, flipped filter)."""
    c = 1 / math.sqrt(weight[0].numel())
    w = (weight.reshape(3, -1) * c).float().contiguous()          # (3, CIN), the scale folded in
    dx, xG = style_grad(x, dy, s.float(), w)                     # G = wᵀ·dy is ∂L/∂(x·s) here
    dimg = None
    if img is not None:  # adjoint of upfirdn2d(img, f, up=2, pad=(2, 1, 2, 1)) for a 4-tap filter
        dimg = upfirdn2d(dy, img_fir, up=1, down=2, pad=(1, 1, 1, 1), flip_filter=True)
    return dx, xG.to(s.dtype), dimg


class _Layer(torch.autograd.Function):
    """layer on Triton. The backward computes the gradients for x, s (and the running image) on the Triton
    kernels (`_conv_layer_backward`, `_torgb_backward`); when a generator tensor asks for a gradient too (or
    ToRGB clamps), it recomputes layer_ref and differentiates that. variant: the safety net's key (`checked`):
    the first backward of each variant is checked on its first sample, and falls back to layer_ref's gradient."""

    @staticmethod
    def forward(ctx, x, weight, s, bias, noise_strength, img, up, fir, noise, clamp, rgb, img_fir, variant=None):
        ctx.args = dict(up=up, fir=fir, noise=noise, clamp=clamp, rgb=rgb, img_fir=img_fir)
        ctx.variant, ctx.strict = variant, STRICT.get(variant, False)
        y = _layer_triton(x, weight, s, bias, up, fir, noise, noise_strength, clamp, rgb, img, img_fir)
        ctx.save_for_backward(x, weight, s, bias, noise_strength, img, y)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, s, bias, strength, img, y = ctx.saved_tensors
        need = ctx.needs_input_grad
        a, inputs = ctx.args, (x, weight, s, bias, strength, img)
        if not any(need[i] for i in (1, 3, 4)) and not (a["rgb"] and a["clamp"] is not None):
            try:
                if a["rgb"]:
                    dx, ds, dimg = _torgb_backward(x, weight, s, img, a["img_fir"], dy)
                else:
                    nz = None if a["noise"] is None else (strength * a["noise"]).to(y.dtype)
                    (dx, ds), dimg = _conv_layer_backward(x, weight, s, bias, nz, y, a["up"], a["fir"], a["clamp"],
                                                          dy), None
                grads = (dx, ds, dimg)
                why = None if ctx.variant is None else _gradient_check(ctx.variant, inputs, a, dy, grads)
            except _NOT_KERNEL_FAULTS:
                raise
            except Exception as e:  # a compile, resource or launch error of a backward kernel
                if ctx.variant is None:
                    raise
                why = f"its backward failed ({_one_line(e)})"
            if why is None and ctx.variant is not None and CHECKED.get(ctx.variant) is not None:
                why = CHECKED[ctx.variant]  # another node of this variant failed its check: no Triton gradient
            if why is None:
                return (dx if need[0] else None, None, ds if need[2] else None, None, None,
                        dimg if need[5] else None) + (None,) * 7
            if CHECKED.get(ctx.variant) is None or ctx.strict:  # (said once per variant)
                _fall_back(ctx.variant, why, ctx.strict)
        return _ref_grads(inputs, need, a, dy) + (None,) * 7


def _ref_grads(inputs, need, args, dy):
    """The gradients of layer_ref at inputs (x, weight, s, bias, noise_strength, img) for the ones asked (need)."""
    inputs = [t if t is None else t.detach().requires_grad_(n) for t, n in zip(inputs, need[:6])]
    with torch.enable_grad():
        out = layer_ref(inputs[0], inputs[1], inputs[2], inputs[3], noise_strength=inputs[4], img=inputs[5], **args)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, dy) if wanted else [])
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in inputs)


# --- The safety net: each Triton layer variant is checked once per process against layer_ref --------------
# A kernel that fails to compile or launch on a user's GPU (CompilationError, OutOfResources), or that computes
# a wrong tile, must not end a run in a traceback or a silently wrong image. So the first call of each variant
# (device, dtype, Triton version, shapes, epilogue options) compares its first sample with layer_ref's, forward
# and, on its first backward, the gradients; a failure or a mismatch prints one line naming the variant and the
# measured error, and the variant runs on layer_ref for the rest of the process. STYLEMASK_BACKEND=triton (or
# impl="triton") makes it a KernelCheckError instead: benchmarks and the GPU check must not fall back. The cost:
# layer_ref in fp32 on one sample of each variant, its forward, then forward + backward, once: about the fp32
# reference synthesis at batch 1 twice (bench.aot's model, ffhq-1024 on an H200: ~3.3 + 7.4 ms).

CHECKED = {}          # variant -> None (checked, it matched) or why it now runs on layer_ref
GRADIENT_CHECKED = set()
STRICT = {}           # variant -> whether a failure raises (STYLEMASK_BACKEND=triton) rather than falls back


class KernelCheckError(RuntimeError):
    """A Triton layer variant failed its check while the Triton backend was asked for explicitly."""


# Not a fault of the kernels on this GPU: re-raised as they are (layer_ref would need more memory, not less; a bad
# argument is the caller's)
_NOT_KERNEL_FAULTS = (torch.OutOfMemoryError, ValueError, TypeError)


def _variant(x, weight, up, noise, clamp, rgb, img):
    """What the safety net checks once: the layer class a set of compiled kernels serves."""
    return (str(x.device), str(x.dtype), triton.__version__, bool(torch.backends.cudnn.allow_tf32), has_halo(x),
            tuple(x.shape[1:]),
            tuple(weight.shape), up, rgb, None if noise is None else noise.shape[0] > 1, clamp is not None,
            img is not None)


def describe(variant):
    device, dtype, version, tf32, _, (C, H, W), w, up, rgb, noise, clamp, img = variant
    what = "ToRGB" if rgb else f"conv{' up' if up == 2 else ''} {w[1]}→{w[0]}"
    return f"{what} {H}×{W} {dtype.replace('torch.', '')}{' TF32' if tf32 and dtype == 'torch.float32' else ''} on " \
           f"{device} (triton {version})"


def tolerance(dtype):
    """The largest max |Δ| / max |reference| a variant may show: float rounding, not a wrong tile (which is O(1))."""
    if dtype == torch.float32:
        return 2e-2 if torch.backends.cudnn.allow_tf32 else 1e-4  # TF32 rounds operands to 10 mantissa bits
    return 3e-2 if dtype == torch.float16 else 6e-2


def gradient_tolerance(dtype):
    """The largest ‖Δ‖ / ‖reference‖ a variant's gradient may show. Normwise, because the leaky ReLU's and the
    clamp's kinks make a few pixels' gradients differ by design: where the two computations round pre (or y)
    to opposite sides of 0 (of the clamp), the slope differs 5×. A wrong 64×64 tile of a 1024² layer is 0.06."""
    return max(tolerance(dtype), 1e-2)


def _norm_error(got, want):
    """‖got − want‖ / ‖want‖ (inf for a NaN)."""
    got, want = got.detach().float(), want.detach().float()
    e = float((got - want).norm() / want.norm().clamp_min(1e-30))
    return e if e == e else math.inf


def _error(got, want):
    """max |got − want| / max |want| (inf for a NaN)."""
    got, want = got.detach().float(), want.detach().float()
    e = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    return e if e == e else math.inf


def _one_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:120]}" if text else type(e).__name__


def _fall_back(variant, why, strict):
    """Record that variant runs on layer_ref from now on, and say so in one line; strict: raise instead."""
    line = f"Triton layer {describe(variant)}: {why}"
    if strict:
        raise KernelCheckError(f"{line} (STYLEMASK_BACKEND=triton: no fallback)")
    CHECKED[variant] = why
    print(f"warning: {line}; it runs on the reference path (layer_ref) for the rest of this process",
          file=sys.stderr)


def _first(t):
    """Sample 0 of a batched tensor (batch-1 and None as they are), in fp32: the check's slice, for a reference
    that computes the exact math (a half-precision reference would add its own rounding to the error measured)."""
    return t if t is None else (t if t.shape[0] == 1 else t[:1]).float()


def _fp32(t):
    return t if t is None else t.float()


def _reference_args(args):
    """A layer's keyword arguments for the check's reference: the first sample of the batched ones (noise, img),
    every tensor in fp32."""
    return {k: _first(v) if k in ("noise", "img") else _fp32(v) if isinstance(v, torch.Tensor) else v
            for k, v in args.items()}


def _gradient_check(variant, inputs, args, dy, grads):
    """None if the Triton gradients (dx, ds, dimg) of the first sample match layer_ref's (checked once per
    variant), else why not."""
    if variant in GRADIENT_CHECKED or dy.device.type == "meta" or not bool(_first(dy).any()):
        return None  # (a zero ∂L/∂y on the first sample checks nothing: the next backward is checked)
    GRADIENT_CHECKED.add(variant)
    x, weight, s, bias, strength, img = inputs
    first = (_first(x), _fp32(weight), _first(s), _fp32(bias), _fp32(strength), _first(img))
    need = (True, False, True, False, False, img is not None)
    want = _ref_grads(first, need, _reference_args(args), _first(dy))
    # ∂s sums x·G over the pixels: a ∂s that vanishes at that scale (a one-channel demodulated conv is invariant
    # to its style) is float noise on both sides, and is not compared
    ds_scale = float(first[0].detach().abs().max() * _first(dy).abs().max()) * dy[0, 0].numel()
    for name, got, ref in (("dx", grads[0], want[0]), ("ds", grads[1], want[2]), ("dimg", grads[2], want[5])):
        if got is not None and ref is not None and not (name == "ds" and float(ref.abs().max()) < 1e-6 * ds_scale):
            err = _norm_error(_first(got), ref)
            if not err <= gradient_tolerance(x.dtype):
                return f"its gradient {name} differs from layer_ref's by {err:.2g} (‖Δ‖ / ‖ref‖, " \
                       f"tolerance {gradient_tolerance(x.dtype):g})"
    return None


def checked(x, weight, s, bias, up=1, fir=None, noise=None, noise_strength=None, clamp=None, rgb=False, img=None,
            img_fir=None, strict=False):
    """The Triton layer behind the safety net (above): layer_ref for a variant that failed its check."""
    args = dict(up=up, fir=fir, noise=noise, noise_strength=noise_strength, clamp=clamp, rgb=rgb, img=img,
                img_fir=img_fir)
    variant = _variant(x, weight, up, noise, clamp, rgb, img)
    STRICT[variant] = strict
    if CHECKED.get(variant) is not None:
        if strict:
            _fall_back(variant, CHECKED[variant], strict)
        return layer_ref(x, weight, s, bias, **args)
    strength = noise_strength if noise is not None else None
    try:
        y = _Layer.apply(x, weight, s, bias, strength, img, up, fir, noise, clamp, rgb, img_fir, variant)
    except (KernelCheckError, *_NOT_KERNEL_FAULTS):
        raise
    except Exception as e:  # CompilationError, OutOfResources, a launch failure: the variant cannot run here
        _fall_back(variant, f"failed ({_one_line(e)})", strict)
        return layer_ref(x, weight, s, bias, **args)
    if variant not in CHECKED and x.device.type != "meta":
        with torch.no_grad():
            want = layer_ref(_first(x), _fp32(weight), _first(s), _fp32(bias), **_reference_args(args))
        err = _error(_first(y), want)
        if not err <= tolerance(x.dtype):
            _fall_back(variant, f"differs from layer_ref by {err:.2g} (max |Δ| / max |ref| on its first sample, "
                                f"tolerance {tolerance(x.dtype):g})", strict)
            return layer_ref(x, weight, s, bias, **args)
        CHECKED[variant] = None
    return y


def layer(x, weight, s, bias, up=1, fir=None, noise=None, noise_strength=None, clamp=None, rgb=False, img=None,
          img_fir=None, impl="auto"):
    """One synthesis layer (module docstring); dispatch: Triton on CUDA (behind the safety net, `checked`), the
    fast CPU op on CPU tensors."""
    backend = resolve(x, impl)
    args = dict(up=up, fir=fir, noise=noise, noise_strength=noise_strength, clamp=clamp, rgb=rgb, img=img,
                img_fir=img_fir)
    if backend == "triton":
        strict = impl == "triton" or os.environ.get("STYLEMASK_BACKEND") == "triton"
        return checked(x, weight, s, bias, **args, strict=strict)
    if fast_cpu(x, impl):
        keep_freed_memory()  # large activations reuse the heap instead of fresh zero-filled pages (once per process)
        return layer_cpu(x, weight, s, bias, **args)
    return layer_ref(x, weight, s, bias, **args)
