"""The reference ops against independent oracles: scipy.signal.upfirdn, a pixel loop, per-sample conv."""
import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F
from hypothesis import example, given, strategies as st
from torch.testing import assert_close

import kernels
from kernels.modconv import modconv_ref
from kernels.upfirdn2d import upfirdn2d_ref

BLUR = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0  # StyleGAN2's normalised [1,3,3,1] filter


def _rand(gen, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=dtype)


def upfirdn_loop(x, f, up, down, pad, flip_filter=False, gain=1.0):
    """The definition, pixel by pixel: zero-insert, pad/crop, convolve, decimate (numpy, slow)."""
    x, f = np.asarray(x, np.float64), np.asarray(f, np.float64) * gain
    if not flip_filter:
        f = f[::-1, ::-1]
    B, C, H, W = x.shape
    x0, x1, y0, y1 = pad
    u = np.zeros((B, C, H * up, W * up))
    u[:, :, ::up, ::up] = x
    Hp, Wp = H * up + y0 + y1, W * up + x0 + x1
    p = np.zeros((B, C, Hp, Wp))
    for yy in range(Hp):          # pixel (yy, xx) of the padded image is u[yy - y0, xx - x0] if inside
        for xx in range(Wp):
            sy, sx = yy - y0, xx - x0
            if 0 <= sy < H * up and 0 <= sx < W * up:
                p[:, :, yy, xx] = u[:, :, sy, sx]
    kh, kw = f.shape
    out = np.zeros((B, C, Hp - kh + 1, Wp - kw + 1))
    for i in range(kh):
        for j in range(kw):
            out += f[i, j] * p[:, :, i:i + out.shape[2], j:j + out.shape[3]]
    return out[:, :, ::down, ::down]


def upfirdn2d_inputs(seed, B, C, H, W, up, kh, kw, pad, rand=_rand):
    """(generator, x, f) for one upfirdn2d case, drawn from rand; None where no output pixel is fully
    covered by the filter (nothing to compare). Shared by the upfirdn2d tests of every variant."""
    x0, x1, y0, y1 = pad
    if H * up + y0 + y1 < kh or W * up + x0 + x1 < kw:
        return None
    g = torch.Generator().manual_seed(seed)
    return g, rand(g, B, C, H, W), rand(g, kh, kw)


@given(seed=st.integers(0, 2**16), B=st.integers(1, 2), C=st.integers(1, 3), H=st.integers(1, 6),
       W=st.integers(1, 6), up=st.integers(1, 3), down=st.integers(1, 3), kh=st.integers(1, 4),
       kw=st.integers(1, 4), pad=st.tuples(*[st.integers(-2, 4)] * 4), flip=st.booleans(),
       gain=st.sampled_from([1.0, 4.0]))
@example(seed=0, B=1, C=2, H=4, W=4, up=2, down=1, kh=4, kw=4, pad=(2, 1, 2, 1), flip=False, gain=1.0)  # skip-image 2× upsample
@example(seed=1, B=2, C=3, H=5, W=5, up=1, down=2, kh=4, kw=4, pad=(1, 1, 1, 1), flip=False, gain=1.0)  # 2× downsample
def test_upfirdn2d_ref_matches_pixel_loop(seed, B, C, H, W, up, down, kh, kw, pad, flip, gain):
    case = upfirdn2d_inputs(seed, B, C, H, W, up, kh, kw, pad)
    if case is None:
        return
    _, x, f = case
    got = upfirdn2d_ref(x, f, up=up, down=down, pad=pad, flip_filter=flip, gain=gain)
    assert_close(got, torch.from_numpy(upfirdn_loop(x, f, up, down, pad, flip, gain)))


@given(seed=st.integers(0, 2**16), H=st.integers(1, 7), W=st.integers(1, 7), up=st.integers(1, 3),
       down=st.integers(1, 3), kh=st.integers(1, 5), kw=st.integers(1, 5))
def test_upfirdn2d_ref_matches_scipy(seed, H, W, up, down, kh, kw):
    # scipy's upfirdn is 1-D: a separable filter fy ⊗ fx is two passes. It returns the full
    # convolution of the zero-stuffed signal, i.e. our op with pad (k - 1, k - up) on each axis.
    g = torch.Generator().manual_seed(seed)
    x, fy, fx = _rand(g, 1, 2, H, W), _rand(g, kh), _rand(g, kw)
    want = scipy.signal.upfirdn(fy.numpy(), x.numpy(), up=up, down=down, axis=2)
    want = scipy.signal.upfirdn(fx.numpy(), want, up=up, down=down, axis=3)
    got = upfirdn2d_ref(x, torch.outer(fy, fx), up=up, down=down, pad=(kw - 1, kw - up, kh - 1, kh - up))
    assert got.shape == want.shape
    assert_close(got, torch.from_numpy(want))


def modconv_per_sample(x, weight, s, demodulate, up, fir):
    """The official formulation: explicit per-sample weights w'' = demod(weight · s), one conv each."""
    outs = []
    for b in range(x.shape[0]):
        w = weight * s[b][None, :, None, None]  # (Cout, Cin, k, k)
        if demodulate:
            w = w / torch.sqrt(w.square().sum([1, 2, 3], keepdim=True) + 1e-8)
        if up == 1:
            y = F.conv2d(x[b:b + 1], w, padding=w.shape[-1] // 2)
        else:  # transposed stride-2 conv, then the blur with rosinality's padding (1, 1) for k = 3
            y = F.conv_transpose2d(x[b:b + 1], w.transpose(0, 1), stride=2)
            y = torch.from_numpy(upfirdn_loop(y, fir, 1, 1, (1, 1, 1, 1)))
        outs.append(y)
    return torch.cat(outs)


@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), cin=st.integers(1, 5), cout=st.integers(1, 5),
       H=st.integers(1, 5), k=st.sampled_from([1, 3]), demod=st.booleans(), up=st.sampled_from([1, 2]))
@example(seed=0, B=2, cin=4, cout=3, H=4, k=1, demod=False, up=1)  # ToRGB: 1×1, no demodulation
@example(seed=1, B=2, cin=3, cout=4, H=4, k=3, demod=True, up=2)   # conv0_up from a 4×4 input
def test_modconv_ref_matches_per_sample_conv(seed, B, cin, cout, H, k, demod, up):
    if up == 2 and k != 3:
        return  # StyleGAN2 up-samples only with 3×3 kernels
    g = torch.Generator().manual_seed(seed)
    x, weight, s = _rand(g, B, cin, H, H), _rand(g, cout, cin, k, k), _rand(g, B, cin)
    fir = torch.from_numpy(BLUR * 4)
    got = modconv_ref(x, weight, s, demodulate=demod, up=up, fir=fir)
    assert got.shape == (B, cout, H * up, H * up)
    assert_close(got, modconv_per_sample(x, weight, s, demod, up, fir))


def test_gradients_flow_through_both_ops():
    g = torch.Generator().manual_seed(0)
    x = _rand(g, 2, 3, 4, 4).requires_grad_()
    s = _rand(g, 2, 3).requires_grad_()
    weight, fir = _rand(g, 2, 3, 3, 3), torch.from_numpy(BLUR * 4)
    assert torch.autograd.gradcheck(lambda x, s: modconv_ref(x, weight, s, up=2, fir=fir), (x, s))
    assert torch.autograd.gradcheck(lambda x: upfirdn2d_ref(x, fir, up=2, pad=(2, 1, 2, 1)), (x,))


def test_dispatch_is_explicit(monkeypatch):
    x = torch.zeros(1, 1, 4, 4)
    monkeypatch.delenv("STYLEMASK_BACKEND", raising=False)
    assert kernels.resolve(x) == "torch"  # auto: PyTorch ops for CPU tensors
    monkeypatch.setenv("STYLEMASK_BACKEND", "triton")
    assert kernels.resolve(x, impl="torch") == "torch"  # an explicit impl wins over the environment
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.upfirdn2d(x, torch.ones(1, 1))  # Triton on CPU tensors without the interpreter: refused
    monkeypatch.setenv("STYLEMASK_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="STYLEMASK_BACKEND"):
        kernels.upfirdn2d(x, torch.ones(1, 1))
