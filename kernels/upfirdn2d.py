"""upfirdn2d: upsample, FIR-filter, downsample a batch of images, channel by channel.

StyleGAN2 resamples with it: the [1,3,3,1] blur after every up-sampling convolution and the
2× up-sampling of the ToRGB skip image. Semantics follow NVlabs' `upfirdn2d_ref` and
rosinality's `upfirdn2d_native` (the same op): a *true* convolution (filter flipped) unless
`flip_filter=True`, padding given as (x0, x1, y0, y1), negative padding crops.

This file holds the plain-PyTorch specification `upfirdn2d_ref`; the Triton kernel comes beside it
behind the same signature (see kernels/__init__.py for dispatch).
"""
import torch
import torch.nn.functional as F


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
