"""The fast CPU path against the reference path: every new op, and the whole generator.

`modconv_cpu` and `upfirdn2d_cpu` (kernels/) against `modconv_ref` and `upfirdn2d_ref`, forward and
gradients for hypothesis-drawn shapes (float64, so that any difference is a bug, not rounding), on both
of modconv_cpu's formulations; then `synthesis` on the fast path (the default on CPU) against
STYLEMASK_FAST=0 for the tiny and a small custom generator, at batch 1 and batch > 1 (which take
different code paths), with and without autograd. Timings live in bench/speed.py, not here.
"""
import importlib
from contextlib import contextmanager

import pytest
import torch
from hypothesis import example, given, strategies as st
from torch.testing import assert_close

import kernels
import stylemask as sm
from helpers import rand, upfirdn2d_inputs
from kernels.modconv import modconv_cpu, modconv_ref
from kernels.upfirdn2d import upfirdn2d_cpu, upfirdn2d_ref

BLUR = torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])).double() / 64 * 4  # × up²


def _grads(y, inputs, dy):
    return torch.autograd.grad(y, inputs, dy)


@contextmanager
def _layout(name):
    """Run modconv_cpu's channels-last code (polyphase up-sampling) or its NCHW code at any size."""
    module = importlib.import_module("kernels.modconv")  # (kernels.modconv is the function)
    old = module.NHWC_MIN_PIXELS
    module.NHWC_MIN_PIXELS = 1 if name == "nhwc" else 10**9
    try:
        yield
    finally:
        module.NHWC_MIN_PIXELS = old


# --- upfirdn2d_cpu ----------------------------------------------------------------------------------

@given(seed=st.integers(0, 2**16), B=st.integers(1, 2), C=st.integers(1, 3), H=st.integers(1, 6),
       W=st.integers(1, 6), up=st.integers(1, 3), down=st.integers(1, 3), kh=st.integers(1, 4),
       kw=st.integers(1, 4), pad=st.tuples(*[st.integers(-2, 4)] * 4), flip=st.booleans(),
       gain=st.sampled_from([1.0, 4.0]))
@example(seed=0, B=1, C=3, H=4, W=4, up=2, down=1, kh=4, kw=4, pad=(2, 1, 2, 1), flip=False, gain=1.0)  # ToRGB skip 2× up
@example(seed=1, B=2, C=3, H=9, W=9, up=1, down=1, kh=4, kw=4, pad=(1, 1, 1, 1), flip=False, gain=1.0)  # blur after conv0_up
@example(seed=2, B=1, C=2, H=3, W=5, up=2, down=1, kh=3, kw=2, pad=(4, -1, 0, 3), flip=True, gain=4.0)  # window beyond
# what conv_transpose2d's padding can express: the full output, then pad/crop
def test_upfirdn2d_cpu_matches_reference(seed, B, C, H, W, up, down, kh, kw, pad, flip, gain):
    case = upfirdn2d_inputs(seed, B, C, H, W, up, kh, kw, pad)
    if case is None:
        return
    g, x, f = case
    x.requires_grad_()
    args = dict(up=up, down=down, pad=pad, flip_filter=flip, gain=gain)
    y, y_ref = upfirdn2d_cpu(x, f, **args), upfirdn2d_ref(x, f, **args)
    assert_close(y, y_ref)
    dy = rand(g, *y.shape)
    assert_close(_grads(y, x, dy)[0], _grads(y_ref, x, dy)[0])


# --- modconv_cpu -------------------------------------------------------------------------------------

@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), cin=st.integers(1, 6), cout=st.integers(1, 6),
       H=st.integers(1, 6), W=st.integers(1, 6), k=st.sampled_from([1, 3]), demod=st.booleans(),
       up=st.sampled_from([1, 2]), modulate=st.sampled_from(["weights", "activations"]),
       layout=st.sampled_from(["nchw", "nhwc"]), fused=st.booleans())
@example(seed=0, B=2, cin=4, cout=3, H=4, W=4, k=1, demod=False, up=1, modulate="weights", layout="nhwc",
         fused=True)  # ToRGB + bias, one sample at a time
@example(seed=1, B=1, cin=3, cout=4, H=4, W=4, k=3, demod=True, up=2, modulate="weights", layout="nhwc",
         fused=True)  # conv0_up at batch 1: polyphase transposed conv, FIR with the bias, gain √2 in the weights
@example(seed=2, B=3, cin=5, cout=2, H=1, W=1, k=3, demod=True, up=2, modulate="activations", layout="nhwc",
         fused=False)  # 1×1 input: every phase of the polyphase transposed conv touches the FIR's zero border
@example(seed=3, B=2, cin=2, cout=5, H=2, W=5, k=3, demod=True, up=2, modulate="activations", layout="nchw",
         fused=True)  # batched: oneDNN's transposed conv, demodulation and bias in one addcmul, non-square
def test_modconv_cpu_matches_reference(seed, B, cin, cout, H, W, k, demod, up, modulate, layout, fused):
    if up == 2 and k != 3:
        return  # StyleGAN2 up-samples with 3×3 kernels only
    g = torch.Generator().manual_seed(seed)
    x, s = rand(g, B, cin, H, W).requires_grad_(), rand(g, B, cin).requires_grad_()
    weight = rand(g, cout, cin, k, k) / (cin * k * k) ** 0.5
    bias, gain = (rand(g, cout), 2 ** 0.5) if fused else (None, 1.0)
    with _layout(layout):
        y = modconv_cpu(x, weight, s, demodulate=demod, up=up, fir=BLUR, bias=bias, gain=gain, modulate=modulate)
    y_ref = gain * modconv_ref(x, weight, s, demodulate=demod, up=up, fir=BLUR)
    y_ref = y_ref if bias is None else y_ref + bias[:, None, None]
    assert y.shape == (B, cout, H * up, W * up)
    assert_close(y, y_ref)
    dy = rand(g, *y.shape)
    for got, want in zip(_grads(y, (x, s), dy), _grads(y_ref, (x, s), dy)):
        assert_close(got, want)


def test_modconv_cpu_chooses_the_smaller_operand():
    s = torch.zeros(6, 512)
    w512, w64, rgb = torch.zeros(512, 512, 3, 3), torch.zeros(64, 64, 3, 3), torch.zeros(3, 32, 1, 1)
    for B in (1, 6):  # the same rule at any batch size
        assert not kernels.modulates_weights(torch.zeros(B, 512, 64, 64), w512, s[:B])  # 64² < 512·3²
        assert kernels.modulates_weights(torch.zeros(B, 64, 512, 512), w64, s[:B, :64])
        assert kernels.modulates_weights(torch.zeros(B, 32, 8, 8), rgb, s[:B, :32])  # ToRGB: 3 outputs
    x = torch.zeros(1, 64, 512, 512)
    assert not kernels.modulates_weights(x, w64, s[:1, :64].requires_grad_())  # autograd: the cheaper backward


def test_modconv_cpu_gradcheck_of_the_up_layer():
    # The polyphase transposed conv has its own autograd Function (_Interleave): check it numerically,
    # on the formulation autograd uses (the test above holds both formulations' gradients to modconv_ref).
    g = torch.Generator().manual_seed(0)
    x, s, weight = rand(g, 2, 2, 2, 3).requires_grad_(), rand(g, 2, 2).requires_grad_(), rand(g, 2, 2, 3, 3)
    with _layout("nhwc"):
        assert torch.autograd.gradcheck(lambda x, s: modconv_cpu(x, weight, s, up=2, fir=BLUR, modulate="activations"),
                                        (x, s), fast_mode=True)


# --- Dispatch ------------------------------------------------------------------------------------

def test_fast_path_is_the_cpu_default_and_one_flag_away(monkeypatch):
    x = torch.zeros(1, 1, 4, 4)
    monkeypatch.delenv("STYLEMASK_BACKEND", raising=False)
    monkeypatch.delenv("STYLEMASK_FAST", raising=False)
    assert kernels.fast_cpu(x)
    assert not kernels.fast_cpu(x, impl="triton")
    monkeypatch.setenv("STYLEMASK_FAST", "0")
    assert not kernels.fast_cpu(x)
    monkeypatch.setenv("STYLEMASK_FAST", "1")
    monkeypatch.setenv("STYLEMASK_BACKEND", "triton")
    assert not kernels.fast_cpu(x)


# --- The whole generator: fast path vs STYLEMASK_FAST=0 ---------------------------------------------

def _both_paths(monkeypatch, G, s, grad, noise="const"):
    """(image, ds) from the fast path and from the reference path; ds: gradient of a structured loss."""
    out = []
    for fast in ("1", "0"):
        monkeypatch.setenv("STYLEMASK_FAST", fast)
        s_in = s.detach().clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            img = sm.synthesis(G, s_in, noise=noise, rng=torch.Generator().manual_seed(6))
            ds = None
            if grad:
                (img * torch.linspace(-1, 1, img.shape[-1])).sum().backward()  # a loss with structure
                ds = s_in.grad
        out.append((img.detach(), ds))
    return out


@pytest.mark.parametrize("B", [1, 3])    # batch 1: weights modulated everywhere; 3: batched, then per sample
@pytest.mark.parametrize("grad", [False, True])  # with autograd: activations modulated (cheaper backward)
@pytest.mark.parametrize("name", ["tiny", "G"])
def test_synthesis_fast_path_equals_reference(monkeypatch, request, name, B, grad):
    G = request.getfixturevalue(name)
    z = torch.randn(B, G["style.1.weight"].shape[1], generator=torch.Generator().manual_seed(B))
    s = sm.styles(G, sm.mapping(G, z, truncation=0.7))
    (img, ds), (img_ref, ds_ref) = _both_paths(monkeypatch, G, s, grad)
    assert img.is_contiguous() and img.shape == img_ref.shape
    assert (img - img_ref).abs().max() <= 1e-4
    if grad:
        assert_close(ds, ds_ref, rtol=1e-3, atol=1e-3 * ds_ref.abs().max().item())


@pytest.mark.parametrize("noise", ["random", "none", "list"])
def test_synthesis_fast_path_noise_modes_per_sample(monkeypatch, G, noise):
    # At batch > 1 the fast path runs the high-res layers one sample at a time: per-sample noise must follow.
    B = 3
    s = sm.styles(G, sm.mapping(G, torch.randn(B, 16, generator=torch.Generator().manual_seed(5))))
    if noise == "list":
        noise = [torch.randn(B, 1, *G[f"noises.noise_{i}"].shape[2:], generator=torch.Generator().manual_seed(i))
                 for i in range(7)]
    (img, _), (img_ref, _) = _both_paths(monkeypatch, G, s, False, noise=noise)
    assert (img - img_ref).abs().max() <= 1e-4


def test_synthesis_fast_path_with_conv_clamp(monkeypatch, G):
    G = dict(G, conv_clamp=torch.tensor(0.5))  # NVlabs-converted generators clamp every layer
    s = sm.styles(G, sm.mapping(G, torch.randn(2, 16, generator=torch.Generator().manual_seed(7))))
    for grad in (False, True):
        (img, ds), (img_ref, ds_ref) = _both_paths(monkeypatch, G, s, grad)
        assert (img - img_ref).abs().max() <= 1e-4 and img.abs().max() <= 0.5 + 2 * 0.5 * 1.1
        if grad:
            assert_close(ds, ds_ref, rtol=1e-3, atol=1e-4)
