"""fir_act: the FIR that follows StyleGAN2's up-sampling conv, with the layer's epilogue fused (Triton).

The 2× up-sampling modconv (kernels/modconv.py) writes its transposed conv into a zero-bordered input P
(`fir_input`); `fir_act` low-passes P with the [1,3,3,1] ⊗ [1,3,3,1] blur and applies the layer's
epilogue in the same pass: + noise, + bias, leaky ReLU · √2, clamp. Its backward is `fir_act` again with
the filter flipped (kernels/layer.py).

In teaching order: `epilogue_ref` and `fir_act_ref` (the specification: `upfirdn2d_ref`, then the epilogue;
`layer_ref` uses the same epilogue), the kernel and its
row helper, the separability check, and the launcher `fir_act`.
"""
import math
import weakref

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .buffers import NHWC, halo_empty, pow2
from .dispatch import on_gpu
from .upfirdn2d import upfirdn2d_ref


def epilogue_ref(y, noise=None, bias=None, act=False, clamp=None):
    """A conv layer's epilogue on its result y (B, C, H, W): + noise (NB, [1,] H, W), + bias (C,), leaky ReLU
    (slope 0.2) · √2 if act, clamped to ±clamp if given (StyleGAN2's StyledConv after its conv)."""
    if noise is not None:
        y = y + noise.reshape(noise.shape[0], 1, *y.shape[2:])
    if bias is not None:
        y = y + bias[None, :, None, None]
    if act:
        y = F.leaky_relu(y, 0.2) * math.sqrt(2.0)
    return y if clamp is None else y.clamp(-clamp, clamp)


def fir_act_ref(P, fir, noise=None, bias=None, act=False, clamp=None, flip=False):
    """P (B, C, PH, PW) -> FIR(P) (B, C, PH − kf + 1, PW − kf + 1) (with fir flipped if flip), then the
    epilogue: what `fir_act` computes, in plain PyTorch."""
    return epilogue_ref(upfirdn2d_ref(P, fir.flip([0, 1]) if flip else fir), noise, bias, act, clamp)


def fir_input_pad(fir):
    """p0: the top/left zero border of the FIR input after the 3×3 transposed conv (1 for the 4-tap blur)."""
    return (fir.shape[0] - 4 + 1) // 2 + 1


def fir_input(B, C, TH, TW, fir, like):
    """(P, p0): the channels-last FIR input for a (TH, TW) transposed-conv result, its border zeroed.

    The [1,3,3,1] low-pass after the transposed conv pads T by p0 = p1 = (kf − 2 − (3 − 1) + 1)//2 + 1
    (modconv_ref's padding, 1 for kf = 4); only the border is written here, the phases fill the rest.
    """
    p0 = fir_input_pad(fir)
    p1 = fir.shape[0] - 2 - p0
    P = torch.empty(B, C, TH + p0 + p1, TW + p0 + p1, device=like.device, dtype=like.dtype, memory_format=NHWC)
    P[:, :, :p0], P[:, :, P.shape[2] - p1:] = 0, 0
    P[:, :, :, :p0], P[:, :, :, P.shape[3] - p1:] = 0, 0
    return P, p0


# --- Triton FIR with the layer's epilogue ---------------------------------------------------------
# StyleGAN2's blur is separable ([1,3,3,1] ⊗ [1,3,3,1]): a program filters rows first, then columns, streaming
# the KF + ROWS − 1 input rows its ROWS output rows need once (each input row is loaded KF times, shifted,
# for the row filter; its result feeds up to KF output rows). Per output ~(KF·(ROWS + KF − 1)/ROWS + KF)
# FMAs and (ROWS + KF − 1)·KF/ROWS loads instead of KF² of each. Filters that are not rank one run the
# direct KF×KF loop (SEPARABLE=False).

@triton.jit
def _fir_epilogue(acc, n_ptr, bias_ptr, y_ptr, b, oy, ox, c, ok, OW, snb, syb, syh, syw, clamp,
                  NOISE: tl.constexpr, BIAS: tl.constexpr, ACT: tl.constexpr, CLAMP: tl.constexpr):
    """+ noise, + bias, leaky ReLU · √2, clamp, store: the layer's epilogue on one (pixels, channels) tile."""
    if NOISE:
        acc = acc + tl.load(n_ptr + b * snb + oy * OW + ox, mask=ok, other=0.0).to(tl.float32)[:, None]
    if BIAS:
        acc = acc + tl.load(bias_ptr + c, mask=c >= 0, other=0.0).to(tl.float32)[None, :]
    if ACT:
        acc = tl.where(acc > 0, acc, acc * 0.2) * 1.4142135623730951
    if CLAMP:
        acc = tl.minimum(tl.maximum(acc, -clamp), clamp)
    y = y_ptr + b.to(tl.int64) * syb + (oy * syh + ox * syw)[:, None] + c[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=tl.broadcast_to(ok[:, None], acc.shape))


@triton.jit
def _fir_row(src, spw, h0, h1, h2, h3, ok, KF: tl.constexpr):
    """Σ_j h_j · P[row, ox + j] for one input row (src: its (pixels, channels) pointers at tap 0), fp32."""
    r = tl.load(src, mask=ok, other=0.0).to(tl.float32) * h0
    r += tl.load(src + spw, mask=ok, other=0.0).to(tl.float32) * h1
    if KF > 2:
        r += tl.load(src + 2 * spw, mask=ok, other=0.0).to(tl.float32) * h2
    if KF > 3:
        r += tl.load(src + 3 * spw, mask=ok, other=0.0).to(tl.float32) * h3
    return r


@triton.jit
def _fir_act_kernel(
    p_ptr,                   # FIR input P (B, PH, PW, C), channels-last, zero-bordered
    f_ptr,                   # filter (KF, KF), fp32, contiguous; a true convolution (used flipped; FLIP: a
                             # correlation, the convolution with the flipped filter: the FIR's adjoint)
    fv_ptr, fh_ptr,          # (KF,) fp32: its factors, f = fv ⊗ fh (read only if SEPARABLE)
    n_ptr,                   # noise (NB, OH, OW), times its strength (read only if NOISE)
    bias_ptr,                # (C,) bias (read only if BIAS)
    y_ptr,                   # output (B, OH, OW, C), channels-last
    OH, OW, C,
    spb, sph, spw,           # strides of P
    syb, syh, syw,           # strides of y
    snb,                     # batch stride of the noise (0: shared)
    clamp,
    KF: tl.constexpr, SEPARABLE: tl.constexpr, NOISE: tl.constexpr, BIAS: tl.constexpr, ACT: tl.constexpr,
    CLAMP: tl.constexpr, FLIP: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Grid (B · cdiv(OH, 4) · cdiv(OW, BLOCK_W), cdiv(C, BLOCK_C)): program (b, row block, column block, tc)
    # writes 4 output rows × BLOCK_W pixels × BLOCK_C channels. C must be a multiple of BLOCK_C (the launcher
    # picks it so): channel loads are unmasked 16-byte vectors.
    tiles_w = tl.cdiv(OW, BLOCK_W)
    tiles_h = tl.cdiv(OH, 4)
    pid = tl.program_id(0)
    b = pid // (tiles_h * tiles_w)
    oy0 = (pid // tiles_w) % tiles_h * 4
    ox = (pid % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)               # (BLOCK_W,)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)              # (BLOCK_C,)
    x_ok = ox < OW
    src = p_ptr + b.to(tl.int64) * spb + oy0 * sph + (ox * spw)[:, None] + c[None, :]  # row oy0, tap 0
    ld = tl.broadcast_to(x_ok[:, None], (BLOCK_W, BLOCK_C))
    yy = oy0 + tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.int32)  # (row tests as tensors: the interpreter
    yw = oy0 + tl.zeros((BLOCK_W,), dtype=tl.int32)           #  cannot mask with tensor & scalar)
    if SEPARABLE:  # flipped factors: the convolution meets tap i with f[KF − 1 − i]
        h0 = tl.load(fh_ptr + (0 if FLIP else KF - 1))
        h1 = tl.load(fh_ptr + (1 if FLIP else KF - 2))
        h2 = tl.load(fh_ptr + ((2 if FLIP else KF - 3) if KF > 2 else 0))
        h3 = tl.load(fh_ptr + ((3 if FLIP else KF - 4) if KF > 3 else 0))
        v0 = tl.load(fv_ptr + (0 if FLIP else KF - 1))
        v1 = tl.load(fv_ptr + (1 if FLIP else KF - 2))
        v2 = tl.load(fv_ptr + ((2 if FLIP else KF - 3) if KF > 2 else 0))
        v3 = tl.load(fv_ptr + ((3 if FLIP else KF - 4) if KF > 3 else 0))
        # input row oy0 + k feeds output row oy0 + r with vertical tap k − r (0 ≤ k − r < KF)
        r = _fir_row(src, spw, h0, h1, h2, h3, ld & (yy < OH + KF - 1), KF)
        a0 = r * v0
        r = _fir_row(src + sph, spw, h0, h1, h2, h3, ld & (yy + 1 < OH + KF - 1), KF)
        a0 += r * v1
        a1 = r * v0
        r = _fir_row(src + 2 * sph, spw, h0, h1, h2, h3, ld & (yy + 2 < OH + KF - 1), KF)
        if KF > 2:
            a0 += r * v2
        a1 += r * v1
        a2 = r * v0
        r = _fir_row(src + 3 * sph, spw, h0, h1, h2, h3, ld & (yy + 3 < OH + KF - 1), KF)
        if KF > 3:
            a0 += r * v3
        if KF > 2:
            a1 += r * v2
        a2 += r * v1
        a3 = r * v0
        r = _fir_row(src + 4 * sph, spw, h0, h1, h2, h3, ld & (yy + 4 < OH + KF - 1), KF)
        if KF > 3:
            a1 += r * v3
        if KF > 2:
            a2 += r * v2
        a3 += r * v1
        if KF > 2:
            r = _fir_row(src + 5 * sph, spw, h0, h1, h2, h3, ld & (yy + 5 < OH + KF - 1), KF)
            if KF > 3:
                a2 += r * v3
            a3 += r * v2
        if KF > 3:
            r = _fir_row(src + 6 * sph, spw, h0, h1, h2, h3, ld & (yy + 6 < OH + KF - 1), KF)
            a3 += r * v3
    else:
        a0 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        a1 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        a2 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        a3 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        for i in tl.static_range(KF):
            for j in tl.static_range(KF):
                tap = tl.load(f_ptr + ((i * KF + j) if FLIP else ((KF - 1 - i) * KF + (KF - 1 - j))))
                a0 += tl.load(src + i * sph + j * spw, mask=ld & (yy < OH), other=0.0).to(tl.float32) * tap
                a1 += tl.load(src + (i + 1) * sph + j * spw, mask=ld & (yy + 1 < OH), other=0.0).to(tl.float32) * tap
                a2 += tl.load(src + (i + 2) * sph + j * spw, mask=ld & (yy + 2 < OH), other=0.0).to(tl.float32) * tap
                a3 += tl.load(src + (i + 3) * sph + j * spw, mask=ld & (yy + 3 < OH), other=0.0).to(tl.float32) * tap
    _fir_epilogue(a0, n_ptr, bias_ptr, y_ptr, b, oy0, ox, c, x_ok & (yw < OH), OW, snb, syb, syh, syw, clamp,
                  NOISE, BIAS, ACT, CLAMP)
    _fir_epilogue(a1, n_ptr, bias_ptr, y_ptr, b, oy0 + 1, ox, c, x_ok & (yw + 1 < OH), OW, snb, syb, syh, syw,
                  clamp, NOISE, BIAS, ACT, CLAMP)
    _fir_epilogue(a2, n_ptr, bias_ptr, y_ptr, b, oy0 + 2, ox, c, x_ok & (yw + 2 < OH), OW, snb, syb, syh, syw,
                  clamp, NOISE, BIAS, ACT, CLAMP)
    _fir_epilogue(a3, n_ptr, bias_ptr, y_ptr, b, oy0 + 3, ox, c, x_ok & (yw + 3 < OH), OW, snb, syb, syh, syw,
                  clamp, NOISE, BIAS, ACT, CLAMP)


_SEPARABLE = {}  # id(filter) -> (weak reference to it, its version, (fv, fh) or None)


def separable(fir):
    """(fv, fh) with fir = outer(fv, fh) (fp32), or None when fir is not rank one; checked once per filter tensor
    (StyleGAN2's blur is [1,3,3,1] ⊗ [1,3,3,1]: the check is a single host sync per filter, then cached)."""
    hit = _SEPARABLE.get(id(fir))
    if hit is not None and hit[0]() is fir and hit[1] == fir._version:
        return hit[2]
    f = fir.detach().float()
    out = None
    if fir.device.type != "meta" and f.shape[0] >= 2 and f[0, 0].item() > 0:
        fh = f[0] / f[0, 0].sqrt()
        fv = f[:, 0] / f[0, 0].sqrt()
        if torch.allclose(torch.outer(fv, fh), f, rtol=1e-6, atol=1e-7):
            out = (fv.contiguous(), fh.contiguous())
    elif fir.device.type == "meta":  # planning (bench/aot.py): StyleGAN2's blur is separable
        out = (f[:, 0].contiguous(), f[0].contiguous())
    _SEPARABLE[id(fir)] = (weakref.ref(fir), fir._version, out)
    return out


def fir_act(P, fir, noise=None, bias=None, act=False, clamp=None, halo_out=False, flip=False):
    """P (B, C, PH, PW) channels-last -> FIR(P) (B, C, PH − kf + 1, PW − kf + 1) (+ noise, bias, act, clamp);
    halo_out: the result is a `halo_empty` view; flip: filter with fir flipped (the FIR's adjoint), reading the
    same filter tensor, so its separability is checked once, not once per backward."""
    B, C, PH, PW = P.shape
    KF = fir.shape[0]
    OH, OW = PH - KF + 1, PW - KF + 1
    y = (halo_empty(B, C, OH, OW, P) if halo_out else
         torch.empty(B, C, OH, OW, device=P.device, dtype=P.dtype, memory_format=NHWC))
    f = fir.to(device=P.device, dtype=torch.float32).contiguous()
    sep = separable(fir) if KF <= 4 else None
    fv, fh = (t.to(P.device) for t in sep) if sep is not None else (f, f)
    nz = noise.to(P.dtype).contiguous() if noise is not None else None
    BC = math.gcd(C, 64 if on_gpu(P) else 128)  # a divisor of C: unmasked channel vectors
    BW = 32 if on_gpu(P) else pow2(OW, 16, 256)
    grid = (B * triton.cdiv(OH, 4) * triton.cdiv(OW, BW), C // BC)
    _fir_act_kernel[grid](P, f, fv, fh, nz if nz is not None else f, bias if bias is not None else f, y, OH, OW, C,
                          P.stride(0), P.stride(2), P.stride(3), y.stride(0), y.stride(2), y.stride(3),
                          nz.stride(0) if nz is not None and nz.shape[0] > 1 else 0, float(clamp or 0.0),
                          KF=KF, SEPARABLE=sep is not None, NOISE=nz is not None, BIAS=bias is not None,
                          ACT=bool(act), CLAMP=clamp is not None, FLIP=bool(flip), BLOCK_W=BW, BLOCK_C=BC,
                          num_warps=4)
    return y
