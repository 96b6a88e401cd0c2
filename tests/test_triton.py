"""The Triton kernels against their PyTorch references: forward, gradients, and the whole generator.

On a CPU-only machine they run under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1),
so shapes stay small; on a GPU the same tests run compiled, plus float16/bfloat16.
"""
import sys

import pytest
import torch
from hypothesis import example, given, strategies as st
from torch.testing import assert_close

import kernels
import stylemask as sm
from weights import defaults
from helpers import modconv_per_sample, upfirdn2d_inputs
from kernels.modconv import modconv_ref
from kernels.upfirdn2d import upfirdn2d_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLUR = torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64 * 4  # × up²


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen).to(DEVICE)


@given(seed=st.integers(0, 2**16), B=st.integers(1, 2), C=st.integers(1, 5), H=st.integers(1, 9),
       W=st.integers(1, 9), up=st.integers(1, 3), down=st.integers(1, 3), kh=st.integers(1, 5),
       kw=st.integers(1, 5), pad=st.tuples(*[st.integers(-2, 4)] * 4), flip=st.booleans(),
       gain=st.sampled_from([1.0, 4.0]))
@example(seed=0, B=1, C=3, H=4, W=4, up=2, down=1, kh=4, kw=4, pad=(2, 1, 2, 1), flip=False, gain=1.0)  # ToRGB skip 2× up
@example(seed=1, B=2, C=3, H=9, W=9, up=1, down=1, kh=4, kw=4, pad=(1, 1, 1, 1), flip=False, gain=1.0)  # blur after conv0_up
def test_upfirdn2d_triton_matches_reference(seed, B, C, H, W, up, down, kh, kw, pad, flip, gain):
    case = upfirdn2d_inputs(seed, B, C, H, W, up, kh, kw, pad, rand=_rand)
    if case is None:
        return
    g, x, f = case
    x.requires_grad_()
    args = dict(up=up, down=down, pad=pad, flip_filter=flip, gain=gain)
    y = kernels.upfirdn2d(x, f, **args, impl="triton")
    y_ref = upfirdn2d_ref(x, f, **args)
    assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    dy = torch.randn(y.shape, generator=g).to(DEVICE)  # the backward is upfirdn2d again, on Triton
    assert_close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(y_ref, x, dy)[0], rtol=1e-3, atol=1e-3)


@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), cin=st.integers(1, 40), cout=st.integers(1, 40),
       H=st.integers(1, 7), W=st.integers(1, 7), k=st.sampled_from([1, 3]), demod=st.booleans(),
       up=st.sampled_from([1, 2]))
@example(seed=0, B=2, cin=33, cout=3, H=4, W=4, k=1, demod=False, up=1)  # ToRGB: 1×1, 3 outputs, no demod
@example(seed=1, B=2, cin=17, cout=19, H=4, W=4, k=3, demod=True, up=2)  # conv0_up at 8×8, odd widths
@example(seed=2, B=1, cin=32, cout=32, H=7, W=5, k=3, demod=True, up=1)  # full tiles, non-square
def test_modconv_triton_matches_reference(seed, B, cin, cout, H, W, k, demod, up):
    if up == 2 and k != 3:
        return  # StyleGAN2 up-samples with 3×3 kernels only
    g = torch.Generator().manual_seed(seed)
    x, s = _rand(g, B, cin, H, W).requires_grad_(), _rand(g, B, cin).requires_grad_()
    weight = (_rand(g, cout, cin, k, k) / (cin * k * k) ** 0.5).requires_grad_()
    fir = BLUR.to(DEVICE)
    y = kernels.modconv(x, weight, s, demodulate=demod, up=up, fir=fir, impl="triton")
    y_ref = modconv_ref(x, weight, s, demodulate=demod, up=up, fir=fir)
    assert y.shape == (B, cout, H * up, W * up)
    assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    # the gradients against an independent formulation (per-sample explicit weights), not modconv_ref, whose
    # autograd _ModConv.backward is
    y_oracle = modconv_per_sample(x, weight, s, demod, up, fir, differentiable=True)
    assert_close(y_oracle, y_ref, rtol=1e-4, atol=1e-4)
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    for got, want in zip(torch.autograd.grad(y, (x, weight, s), dy), torch.autograd.grad(y_oracle, (x, weight, s), dy)):
        assert_close(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(DEVICE != "cuda", reason="float16/bfloat16 kernels are checked on a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_gpu(dtype):
    g = torch.Generator().manual_seed(0)
    x, s, weight = _rand(g, 2, 64, 16, 16), _rand(g, 2, 64), _rand(g, 48, 64, 3, 3) / 24
    for up in (1, 2):
        y = kernels.modconv(x.to(dtype), weight.to(dtype), s.to(dtype), up=up, fir=BLUR.to(DEVICE), impl="triton")
        assert y.dtype == dtype
        assert_close(y.float(), modconv_ref(x, weight, s, up=up, fir=BLUR.to(DEVICE)), rtol=3e-2, atol=3e-2)
    y = kernels.upfirdn2d(x.to(dtype), BLUR.to(DEVICE), up=2, pad=(2, 1, 2, 1), impl="triton")
    assert_close(y.float(), upfirdn2d_ref(x, BLUR.to(DEVICE), up=2, pad=(2, 1, 2, 1)), rtol=3e-2, atol=3e-2)


def test_tiny_generator_through_triton_equals_reference(monkeypatch):
    G = {k: v.to(DEVICE) for k, v in defaults.tiny_generator().items()}
    z = torch.randn(1, 32, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    s = sm.styles(G, sm.mapping(G, z, truncation=0.7))
    images, grads = {}, {}
    monkeypatch.setenv("STYLEMASK_FAST", "0")  # "torch" is then the reference path, not the fast CPU one
    for backend in ("torch", "triton"):
        monkeypatch.setenv("STYLEMASK_BACKEND", backend)
        s_in = s.detach().requires_grad_()
        images[backend] = sm.synthesis(G, s_in)
        (images[backend] * torch.linspace(-1, 1, 256, device=DEVICE)).sum().backward()  # a loss with structure
        grads[backend] = s_in.grad
    assert_close(images["triton"], images["torch"], rtol=1e-4, atol=1e-4)
    assert_close(grads["triton"], grads["torch"], rtol=1e-3, atol=1e-3)
    assert images["torch"].shape == (1, 3, 256, 256) and grads["torch"].abs().sum() > 0


@given(seed=st.integers(0, 2**16), B=st.integers(1, 2), cin=st.integers(1, 40), cout=st.integers(1, 24),
       H=st.sampled_from([1, 2, 3, 4, 5, 8]), up=st.sampled_from([1, 2]), noise=st.sampled_from([None, 1, "B"]),
       clamp=st.sampled_from([None, 0.5]))
@example(seed=0, B=2, cin=16, cout=16, H=4, up=1, noise=1, clamp=None)    # the 4×4 layer of a generator
@example(seed=1, B=2, cin=17, cout=19, H=4, up=2, noise="B", clamp=0.5)   # up-sampling layer, odd widths
def test_conv_layer_triton_matches_reference(seed, B, cin, cout, H, up, noise, clamp):
    """The fused conv layer (modconv, demodulation, noise, bias, leaky ReLU·√2, clamp): forward and the
    gradients for x and s against layer_ref."""
    g = torch.Generator().manual_seed(seed)
    x, s = _rand(g, B, cin, H, H).requires_grad_(), _rand(g, B, cin).requires_grad_()
    weight, bias = _rand(g, cout, cin, 3, 3), _rand(g, cout)
    n = None if noise is None else _rand(g, B if noise == "B" else 1, 1, H * up, H * up)
    args = dict(up=up, fir=BLUR.to(DEVICE), noise=n, noise_strength=_rand(g, 1), clamp=clamp)
    y = kernels.layer(x, weight, s, bias, **args, impl="triton")
    y_ref = kernels.layer_ref(x, weight, s, bias, **args)
    assert y.shape == (B, cout, H * up, H * up)
    assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    for got, want in zip(torch.autograd.grad(y, (x, s), dy), torch.autograd.grad(y_ref, (x, s), dy)):
        assert_close(got, want, rtol=1e-3, atol=1e-3)


@given(seed=st.integers(0, 2**16), B=st.integers(1, 2), cin=st.integers(1, 40), H=st.sampled_from([2, 4, 6, 8]),
       skip=st.booleans(), clamp=st.sampled_from([None, 0.5]))
@example(seed=0, B=2, cin=33, H=8, skip=True, clamp=None)  # ToRGB: 3 outputs, odd input width, skip add
def test_torgb_layer_triton_matches_reference(seed, B, cin, H, skip, clamp):
    """ToRGB (1×1 modconv without demodulation, bias, clamp) with the 2× up-FIR of the running image fused."""
    g = torch.Generator().manual_seed(seed)
    x, s = _rand(g, B, cin, H, H).requires_grad_(), _rand(g, B, cin).requires_grad_()
    img = _rand(g, B, 3, H // 2, H // 2).requires_grad_() if skip else None
    weight, bias = _rand(g, 3, cin, 1, 1), _rand(g, 3)
    args = dict(rgb=True, img=img, img_fir=BLUR.to(DEVICE), clamp=clamp)
    y = kernels.layer(x, weight, s, bias, **args, impl="triton")
    y_ref = kernels.layer_ref(x, weight, s, bias, **args)
    assert y.shape == (B, 3, H, H)
    assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    wrt = (x, s) + ((img,) if skip else ())
    for got, want in zip(torch.autograd.grad(y, wrt, dy), torch.autograd.grad(y_ref, wrt, dy)):
        assert_close(got, want, rtol=1e-3, atol=1e-3)


@given(seed=st.integers(0, 2**16), B=st.integers(1, 2), C=st.sampled_from([1, 3, 8, 24]), H=st.integers(1, 9),
       W=st.integers(1, 9), kf=st.integers(2, 4), rank_one=st.booleans(), epilogue=st.booleans(),
       flip=st.booleans())
@example(seed=0, B=2, C=8, H=9, W=7, kf=4, rank_one=True, epilogue=True, flip=False)  # up-sampling layer's blur
@example(seed=1, B=2, C=8, H=9, W=7, kf=4, rank_one=True, epilogue=False, flip=True)  # its adjoint, in backward
def test_fir_act_matches_its_reference(seed, B, C, H, W, kf, rank_one, epilogue, flip):
    """The up-sampling layer's FIR kernel, separable (rows then columns) and direct, with and without the fused
    epilogue (noise, bias, leaky ReLU · √2, clamp), against fir_act_ref (upfirdn2d_ref, then the epilogue)."""
    fir = sys.modules["kernels.fir"]
    g = torch.Generator().manual_seed(seed)
    f = torch.outer(_rand(g, kf), _rand(g, kf)).abs() if rank_one else _rand(g, kf, kf)
    P = _rand(g, B, C, H + kf - 1, W + kf - 1).contiguous(memory_format=torch.channels_last)
    kw = dict(noise=_rand(g, B, H, W), bias=_rand(g, C), act=True, clamp=0.5) if epilogue else {}
    assert_close(fir.fir_act(P, f, **kw, flip=flip), fir.fir_act_ref(P, f, **kw, flip=flip), rtol=1e-4, atol=1e-4)
    if not epilogue:  # the reference's FIR is upfirdn2d_ref itself (scipy-checked in test_kernels.py)
        assert_close(fir.fir_act_ref(P, f, flip=flip), upfirdn2d_ref(P, f.flip([0, 1]) if flip else f), rtol=0, atol=0)


@pytest.mark.parametrize("cin, mid, up", [(8, 8, 1), (8, 16, 2), (5, 4, 2), (16, 4, 1)])
def test_stacked_layers_triton_match_reference(cin, mid, up):
    """Two conv layers in a row, as in synthesis: the second reads the first's zero-bordered output (no
    spatial masks in its loop); forward and the gradients for x and the second layer's s."""
    g = torch.Generator().manual_seed(cin * 100 + mid + up)
    x, s1 = _rand(g, 2, cin, 4, 4).requires_grad_(), _rand(g, 2, cin)
    s2 = _rand(g, 2, mid).requires_grad_()
    w1, w2, b1, b2 = _rand(g, mid, cin, 3, 3), _rand(g, 6, mid, 3, 3), _rand(g, mid), _rand(g, 6)
    out = {}
    for name, layer, kw in (("triton", kernels.layer, dict(impl="triton")), ("ref", kernels.layer_ref, {})):
        h = layer(x, w1, s1, b1, **kw)
        assert name == "ref" or sys.modules["kernels.buffers"].has_halo(h)
        y = layer(h, w2, s2, b2, up=up, fir=BLUR.to(DEVICE), **kw)
        ramp = torch.linspace(-1, 1, y.numel(), device=DEVICE).view(y.shape)
        out[name] = (y,) + torch.autograd.grad((y * ramp).sum(), (x, s2))
    for got, want in zip(out["triton"], out["ref"]):
        assert_close(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("cin, cout, H, up", [(8, 8, 16, 1), (12, 16, 8, 2), (16, 3, 16, 1)])
def test_narrow_layers_modulate_the_weight_tile(cin, cout, H, up):
    """Layers with few output channels against many pixels scale the (smaller) weight tile by s instead of the
    x tile (MOD_W): forward and gradients still equal the reference's."""
    mc = sys.modules["kernels.modconv"]
    BM, BN = mc.modconv_config((H + up - 1) ** 2, cin, cout, torch.float32, DEVICE == "cuda", up)[:2]
    assert BN <= 32 and BM >= 8 * BN  # the launcher's condition for MOD_W
    g = torch.Generator().manual_seed(cin + cout + H)
    x, s = _rand(g, 2, cin, H, H).requires_grad_(), _rand(g, 2, cin).requires_grad_()
    weight, bias = _rand(g, cout, cin, 3, 3), _rand(g, cout)
    args = dict(up=up, fir=BLUR.to(DEVICE), noise=_rand(g, 1, 1, H * up, H * up), noise_strength=_rand(g, 1))
    y = kernels.layer(x, weight, s, bias, **args, impl="triton")
    y_ref = kernels.layer_ref(x, weight, s, bias, **args)
    assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    for got, want in zip(torch.autograd.grad(y, (x, s), dy), torch.autograd.grad(y_ref, (x, s), dy)):
        assert_close(got, want, rtol=1e-3, atol=1e-3)


def _strided(x, how):
    """x laid out as the layers meet it: NCHW, channels-last, or the interior of a zero-bordered buffer."""
    if how == "nchw":
        return x.contiguous()
    if how == "nhwc":
        return x.contiguous(memory_format=torch.channels_last)
    y = sys.modules["kernels.buffers"].halo_empty(*x.shape, x)
    y.copy_(x)
    return y


@given(seed=st.integers(0, 2**16), B=st.integers(1, 2), C=st.integers(1, 40), H=st.integers(1, 9),
       noise=st.sampled_from([None, 1, "B"]), clamp=st.sampled_from([None, 0.5]),
       layout=st.sampled_from(["nchw", "nhwc", "halo"]))
@example(seed=0, B=2, C=33, H=9, noise="B", clamp=0.5, layout="halo")  # odd widths, several pixel blocks
def test_act_grad_against_torch(seed, B, C, H, noise, clamp, layout):
    """The conv layer's pointwise backward: g = dy · lrelu'(pre)·√2 (nothing through a clamp) and its
    Σ_p g·(pre − bias − noise), against the same formulas in PyTorch on y = clamp(lrelu(pre)·√2)."""
    layer = sys.modules["kernels.layer"]
    g = torch.Generator().manual_seed(seed)
    pre, dy, bias = _rand(g, B, C, H, H), _rand(g, B, C, H, H), _rand(g, C)
    nz = None if noise is None else _rand(g, B if noise == "B" else 1, 1, H, H)
    y = torch.nn.functional.leaky_relu(pre, 0.2) * 2 ** 0.5
    y = y if clamp is None else y.clamp(-clamp, clamp)
    slope = torch.where(pre > 0, 2 ** 0.5, 0.2 * 2 ** 0.5)
    want_g = dy * slope * ((y.abs() < clamp) if clamp is not None else 1)
    want_a = (want_g * (pre - bias[None, :, None, None] - (nz if nz is not None else 0))).sum((2, 3))
    out = _strided(torch.empty(B, C, H, H, device=DEVICE), layout)
    got_a = layer.act_grad(_strided(dy, layout), _strided(y, layout), bias, nz, clamp, out)
    assert_close(out, want_g, rtol=1e-5, atol=1e-5)
    assert_close(got_a, want_a, rtol=1e-4, atol=1e-4)


@given(seed=st.integers(0, 2**16), B=st.integers(1, 2), C=st.integers(1, 40), H=st.integers(1, 9),
       rgb=st.booleans(), layout=st.sampled_from(["nchw", "nhwc", "halo"]))
@example(seed=0, B=2, C=33, H=9, rgb=True, layout="halo")  # ToRGB of a halo activation, odd channel count
def test_style_grad_against_torch(seed, B, C, H, rgb, layout):
    """The style's backward: dx = s'·G and Σ_p x·G (for ToRGB with G = wᵀ·dy formed in the kernel), against
    PyTorch."""
    layer = sys.modules["kernels.layer"]
    g = torch.Generator().manual_seed(seed)
    x, s_ = _rand(g, B, C, H, H), _rand(g, B, C)
    w = _rand(g, 3, C) if rgb else None
    G = _rand(g, B, 3, H, H) if rgb else _rand(g, B, C, H, H)
    full = torch.einsum("kc,bkhw->bchw", w, G) if rgb else G
    dx, xG = layer.style_grad(_strided(x, layout), G if rgb else _strided(G, layout), s_, w)
    assert_close(dx, full * s_[:, :, None, None], rtol=1e-5, atol=1e-5)
    assert_close(xG, (x * full).sum((2, 3)), rtol=1e-4, atol=1e-4)


# --- The safety net: a failing or wrong kernel falls back to layer_ref, with one line --------------------------

@pytest.fixture
def net(monkeypatch):
    """kernels.layer with no variant checked yet."""
    layer = sys.modules["kernels.layer"]
    monkeypatch.setattr(layer, "CHECKED", {})
    monkeypatch.setattr(layer, "GRADIENT_CHECKED", set())
    monkeypatch.setattr(layer, "STRICT", {})
    return layer


def _conv_case(seed=0, B=2, cin=8, cout=8, H=4, up=1):
    g = torch.Generator().manual_seed(seed)
    x, s = _rand(g, B, cin, H, H).requires_grad_(), _rand(g, B, cin).requires_grad_()
    args = dict(up=up, fir=BLUR.to(DEVICE), noise=_rand(g, B, 1, H * up, H * up), noise_strength=_rand(g, 1))
    return x, _rand(g, cout, cin, 3, 3), s, _rand(g, cout), args


def test_a_wrong_tile_falls_back_to_the_reference_with_one_line(net, monkeypatch, capsys):
    real = net._layer_triton

    def wrong_tile(*args, **kwargs):
        y = real(*args, **kwargs)
        y[:, :, :2, :2] += 1.0  # one 2×2 tile of every channel off by one
        return y
    monkeypatch.setattr(net, "_layer_triton", wrong_tile)
    x, weight, s, bias, args = _conv_case()
    capsys.readouterr()
    y = net.checked(x, weight, s, bias, **args)
    assert_close(y, net.layer_ref(x, weight, s, bias, **args), rtol=0, atol=0)  # the reference's image, not the wrong one
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "conv 8→8 4×4 float32" in err and "differs from layer_ref by" in err
    net.checked(x, weight, s, bias, **args)  # decided once: the reference path, no second line
    assert capsys.readouterr().err == ""
    with pytest.raises(kernels.KernelCheckError, match="STYLEMASK_BACKEND=triton: no fallback"):
        monkeypatch.setattr(net, "CHECKED", {})
        net.checked(x, weight, s, bias, **args, strict=True)


def test_a_kernel_that_raises_falls_back(net, monkeypatch, capsys):
    def out_of_resources(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")
    monkeypatch.setattr(net, "_layer_triton", out_of_resources)
    x, weight, s, bias, args = _conv_case(up=2)
    capsys.readouterr()
    y = net.checked(x, weight, s, bias, **args)
    assert_close(y, net.layer_ref(x, weight, s, bias, **args), rtol=0, atol=0)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "conv up 8→8" in err and "failed (RuntimeError: out of resource" in err


def test_a_wrong_gradient_falls_back_to_the_references_gradient(net, monkeypatch, capsys):
    real = net._conv_layer_backward
    monkeypatch.setattr(net, "_conv_layer_backward", lambda *a: (lambda dx, ds: (2 * dx, ds))(*real(*a)))
    x, weight, s, bias, args = _conv_case(seed=3)
    y = net.checked(x, weight, s, bias, **args)  # the forward is right
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    capsys.readouterr()
    got = torch.autograd.grad(y, (x, s), dy)
    want = torch.autograd.grad(net.layer_ref(x, weight, s, bias, **args), (x, s), dy)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-4, atol=1e-4)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "its gradient dx differs from layer_ref's by 1 (‖Δ‖ / ‖ref‖" in err


# --- The GPU tile table under the interpreter --------------------------------------------------------------
# On a CPU the launchers pick interpreter tiles; with kernels.dispatch.GPU_TILES they pick the tiles a GPU runs,
# so each kernel class of the GPU table runs here too, on shapes with more than one N tile and K block.

GPU_CASES = [  # (what, B, cin, cout, H, up, rgb, dtype): the tiles modconv_config picks for them on a GPU
    ("256-pixel two-warpgroup conv, weight-modulating (MOD_W), 2 N tiles, 2 K blocks", 2, 40, 40, 16, 1, False,
     torch.float32),
    ("up-sampling phases on 256-pixel tiles, the FIR epilogue", 2, 40, 40, 16, 2, False, torch.float32),
    ("up-sampling phases on small tiles", 2, 40, 40, 8, 2, False, torch.float32),
    ("narrow weight-modulating tiles (MOD_W), 16 channels", 2, 40, 16, 16, 1, False, torch.float32),
    ("4×4 mma.sync tiles", 2, 40, 40, 4, 1, False, torch.float32),
    ("ToRGB with the skip", 2, 40, 3, 16, 1, True, torch.float32),
    ("fp16 256-pixel conv, x-modulating, 2 N tiles, 2 K blocks", 2, 72, 72, 16, 1, False, torch.float16),
    ("fp16 up-sampling phases", 2, 40, 40, 8, 2, False, torch.float16),
]


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the tests above run these tiles")
@pytest.mark.parametrize("what, B, cin, cout, H, up, rgb, dtype", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_tiles_under_the_interpreter(monkeypatch, what, B, cin, cout, H, up, rgb, dtype):
    """Each kernel class of the GPU tile table, forward and the gradients for x and s (the fused backward
    kernels included) against layer_ref, in fp32 and fp16 (the reference in fp32)."""
    monkeypatch.setattr(sys.modules["kernels.dispatch"], "GPU_TILES", True)
    g = torch.Generator().manual_seed(cin + cout + H + up)
    x, s = _rand(g, B, cin, H, H), _rand(g, B, cin)
    weight, bias = _rand(g, cout, cin, 1 if rgb else 3, 1 if rgb else 3), _rand(g, cout)
    if rgb:
        args = dict(rgb=True, img=_rand(g, B, 3, H // 2, H // 2), img_fir=BLUR.to(DEVICE))
    else:
        args = dict(up=up, fir=BLUR.to(DEVICE), noise=_rand(g, B, 1, H * up, H * up), noise_strength=_rand(g, 1))
    # the reference sees the same (rounded) inputs in fp32: what differs is the kernels' own precision
    rounded = lambda t: t.to(dtype).float()  # noqa: E731
    x, s, weight, bias = map(rounded, (x, s, weight, bias))
    args = {k: rounded(v) if isinstance(v, torch.Tensor) and k not in ("fir", "img_fir") else v for k, v in args.items()}
    half = {k: v.to(dtype) if isinstance(v, torch.Tensor) and k not in ("fir", "img_fir") else v
            for k, v in args.items()}
    xt, st_ = x.to(dtype).requires_grad_(), s.to(dtype).requires_grad_()
    xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
    y = kernels.layer(xt, weight.to(dtype), st_, bias.to(dtype), **half, impl="triton")
    y_ref = kernels.layer_ref(xr, weight, sr, bias, **args)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y.float(), y_ref, **tol)
    dy = rounded(torch.randn(y.shape, generator=g).to(DEVICE))
    for got, want in zip(torch.autograd.grad(y, (xt, st_), dy.to(dtype)), torch.autograd.grad(y_ref, (xr, sr), dy)):
        err = float((got.float() - want).abs().max() / want.abs().max())
        assert err <= (1e-3 if dtype == torch.float32 else 3e-2), (what, err)


def test_the_safety_net_holds_for_every_node_and_every_call(net, monkeypatch, capsys):
    """A wrong backward found in one graph node is not returned by the other nodes of its variant; a first ∂L/∂y
    that is zero on sample 0 checks nothing (the next backward is checked); a strict call after a fallback raises."""
    real = net._conv_layer_backward
    monkeypatch.setattr(net, "_conv_layer_backward", lambda *a: (lambda dx, ds: (2 * dx, ds))(*real(*a)))
    x, weight, s, bias, args = _conv_case(seed=5)
    y = net.checked(x, weight, s, bias, **args)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    dy[0] = 0
    torch.autograd.grad(y, (x, s), dy)  # nothing to compare on sample 0: not a check
    assert not net.GRADIENT_CHECKED and capsys.readouterr().err == ""
    y1, y2 = net.checked(x, weight, s, bias, **args), net.checked(x, weight, s, bias, **args)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    (gx,) = torch.autograd.grad((y1 * dy).sum() + (y2 * dy).sum(), (x,))
    (want,) = torch.autograd.grad(2 * (net.layer_ref(x, weight, s, bias, **args) * dy).sum(), (x,))
    assert_close(gx, want, rtol=1e-4, atol=1e-4)  # both nodes: the reference's gradient
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(kernels.KernelCheckError, match="no fallback"):
        net.checked(x, weight, s, bias, **args, strict=True)
