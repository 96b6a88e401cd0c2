"""The reference ops against independent oracles: scipy.signal.upfirdn, a pixel loop, per-sample conv."""
import numpy as np
import pytest
import scipy.signal
import torch
from hypothesis import example, given, strategies as st
from torch.testing import assert_close

import kernels
from helpers import modconv_per_sample, rand, upfirdn2d_inputs, upfirdn_loop
from kernels.modconv import modconv_ref
from kernels.upfirdn2d import upfirdn2d_ref

BLUR = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0  # StyleGAN2's normalised [1,3,3,1] filter


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
    x, fy, fx = rand(g, 1, 2, H, W), rand(g, kh), rand(g, kw)
    want = scipy.signal.upfirdn(fy.numpy(), x.numpy(), up=up, down=down, axis=2)
    want = scipy.signal.upfirdn(fx.numpy(), want, up=up, down=down, axis=3)
    got = upfirdn2d_ref(x, torch.outer(fy, fx), up=up, down=down, pad=(kw - 1, kw - up, kh - 1, kh - up))
    assert got.shape == want.shape
    assert_close(got, torch.from_numpy(want))


@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), cin=st.integers(1, 5), cout=st.integers(1, 5),
       H=st.integers(1, 5), k=st.sampled_from([1, 3]), demod=st.booleans(), up=st.sampled_from([1, 2]))
@example(seed=0, B=2, cin=4, cout=3, H=4, k=1, demod=False, up=1)  # ToRGB: 1×1, no demodulation
@example(seed=1, B=2, cin=3, cout=4, H=4, k=3, demod=True, up=2)   # conv0_up from a 4×4 input
def test_modconv_ref_matches_per_sample_conv(seed, B, cin, cout, H, k, demod, up):
    if up == 2 and k != 3:
        return  # StyleGAN2 up-samples only with 3×3 kernels
    g = torch.Generator().manual_seed(seed)
    x, weight, s = rand(g, B, cin, H, H), rand(g, cout, cin, k, k), rand(g, B, cin)
    fir = torch.from_numpy(BLUR * 4)
    got = modconv_ref(x, weight, s, demodulate=demod, up=up, fir=fir)
    assert got.shape == (B, cout, H * up, H * up)
    assert_close(got, modconv_per_sample(x, weight, s, demod, up, fir))


def test_gradients_flow_through_both_ops():
    g = torch.Generator().manual_seed(0)
    x = rand(g, 2, 3, 4, 4).requires_grad_()
    s = rand(g, 2, 3).requires_grad_()
    weight, fir = rand(g, 2, 3, 3, 3), torch.from_numpy(BLUR * 4)
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
