"""modconv: StyleGAN2's modulated convolution (Karras et al. 2020, Sect. 2.2, Eq. 1–3).

Every synthesis layer is one call: the style s scales the input channels of a shared weight
(modulation), each output channel is renormalised to unit expected variance (demodulation,
skipped by ToRGB), and the up-sampling layers use a stride-2 transposed convolution followed by
the [1,3,3,1] FIR (rosinality's `ModulatedConv2d(upsample=True)`, NVlabs' `conv2d_resample(up=2)`).

This file holds the plain-PyTorch specification `modconv_ref`; the Triton kernel comes beside it
behind the same signature (see kernels/__init__.py for dispatch).
"""
import torch
import torch.nn.functional as F

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
