"""Generator, style space, mask networks and reenact against naive references (the generator in helpers.py,
reenact written here). The generators are conftest.py's fixtures: G (helpers.SMALL) and tiny."""
import pytest
import torch
from hypothesis import given, strategies as st
from torch.testing import assert_close

import stylemask as sm
from weights import defaults, layout
from helpers import naive_mapping, naive_synthesis


def test_synthesis_matches_naive_generator_in_W_and_W_plus(G):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 16, generator=gen)
    w = sm.mapping(G, z)
    assert_close(w, torch.stack([naive_mapping(G, zi, 3) for zi in z]), rtol=1e-5, atol=1e-5)
    n = sm.n_ws(G)
    assert n == 8  # 2·log2(32) − 2
    for wp in (w[:, None].expand(-1, n, -1), torch.randn(2, n, 12, generator=gen)):
        img = sm.synthesis(G, sm.styles(G, wp))
        assert img.shape == (2, 3, 32, 32)
        assert_close(img, naive_synthesis(G, wp, n_blocks=3), rtol=1e-4, atol=1e-4)


def test_styles_of_w_equal_styles_of_broadcast_w_plus(G):
    w = torch.randn(3, 12, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sm.styles(G, w), sm.styles(G, w[:, None].expand(-1, sm.n_ws(G), -1)))


def test_layout_of_the_paper_generator():
    layout = sm.style_layout(sm.ARCHS["ffhq-1024"])  # computed from the config, nothing allocated
    convs = [L for L in layout if L.kind == "conv"]
    assert sum(L.dim for L in layout) == 9088 and len(layout) == 26 and len(convs) == 17
    assert sum(L.dim for L in convs[:12]) == 5632  # Supp. A: the n = 12 controlled layers
    assert [L.dim for L in convs] == [512] * 10 + [256, 256, 128, 128, 64, 64, 32]  # official split_sections
    # Table VI: S index of every layer, and the paper's controlled S indices s^0, s^2, s^3, s^5, ...
    assert [layout.index(L) for L in convs[:12]] == [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17]
    assert [L.kind for L in layout[:5]] == ["conv", "torgb", "conv", "conv", "torgb"]
    assert [L.res for L in layout[-3:]] == [1024] * 3 and sm.n_ws(sm.ARCHS["ffhq-1024"]) == 18
    assert [L.dim for L in layout if L.kind == "torgb"] == [512] * 5 + [256, 128, 64, 32]


@pytest.mark.parametrize("name", ["ffhq-1024", "ffhq-256", "tiny"])
def test_mask_finds_the_controlled_layers_in_s(name):
    arch = sm.ARCHS[name]
    M = sm.init_mask(arch, n_layers=12)
    want = torch.cat([torch.arange(L.offset, L.offset + L.dim)
                      for L in [L for L in sm.style_layout(arch) if L.kind == "conv"][:12]])
    assert torch.equal(sm.ctrl_index(M), want)
    G_shapes = layout.generator_shapes(arch)
    assert G_shapes["convs.10.conv.modulation.weight"][0] == M.dims[11]


def test_truncation_zero_gives_w_avg_and_one_is_identity(G):
    z = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    assert_close(sm.mapping(G, z, truncation=0.0), G["latent_avg"].expand(4, -1))
    w_avg = torch.randn(12)
    assert_close(sm.mapping(G, z, truncation=0.0, w_avg=w_avg), w_avg.expand(4, -1))
    w = sm.mapping(G, z)
    assert_close(sm.mapping(G, z, truncation=0.7), G["latent_avg"] + 0.7 * (w - G["latent_avg"]))


def test_tiny_generator_is_deterministic_and_seeded(tiny):
    again = defaults.tiny_generator(seed=0)
    assert all(torch.equal(tiny[k], again[k]) for k in tiny)
    other = defaults.tiny_generator(seed=1)
    assert not torch.equal(tiny["conv1.conv.weight"], other["conv1.conv.weight"])
    z = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    img1, s1 = sm.generate(tiny, z, truncation=0.7)
    img2, s2 = sm.generate(again, z, truncation=0.7)
    assert torch.equal(img1, img2) and torch.equal(s1, s2)
    assert img1.shape == (2, 3, 256, 256) and torch.isfinite(img1).all() and img1.std() > 0.05
    layout.check_generator(tiny)


def test_noise_modes(G):
    s = sm.styles(G, sm.mapping(G, torch.randn(2, 16, generator=torch.Generator().manual_seed(4))))
    const = sm.synthesis(G, s)
    explicit = sm.synthesis(G, s, noise=[G[f"noises.noise_{i}"] for i in range(7)])
    assert torch.equal(const, explicit)
    r1 = sm.synthesis(G, s, noise="random", rng=torch.Generator().manual_seed(5))
    r2 = sm.synthesis(G, s, noise="random", rng=torch.Generator().manual_seed(5))
    assert torch.equal(r1, r2) and not torch.allclose(r1, const)
    zeros = sm.synthesis(G, s, noise=[torch.zeros_like(G[f"noises.noise_{i}"]) for i in range(7)])
    assert_close(sm.synthesis(G, s, noise="none"), zeros)
    with pytest.raises(sm.StyleMaskError, match="noise"):
        sm.synthesis(G, s, noise="sometimes")


def test_synthesis_is_differentiable_in_s(G):
    s = sm.styles(G, sm.mapping(G, torch.randn(1, 16, generator=torch.Generator().manual_seed(6))))
    s = s.double().requires_grad_()
    G64 = {k: v.double() for k, v in G.items()}
    assert torch.autograd.gradcheck(lambda s: sm.synthesis(G64, s)[:, :, ::7, ::7], (s,), eps=1e-6, atol=1e-5)


def test_bad_shapes_give_one_clear_error(G):
    with pytest.raises(sm.StyleMaskError, match=r"\(B, 74\)"):
        sm.synthesis(G, torch.zeros(1, 100))
    with pytest.raises(sm.StyleMaskError, match="styles"):
        sm.styles(G, torch.zeros(1, 3, 12))
    with pytest.raises(sm.StyleMaskError, match="n_layers"):
        sm.init_mask(G, n_layers=12)  # the 32×32 generator has 7 conv layers


# --- Mask networks and Eq. 1 against a naive reference ---------------------------------------------

def naive_reenact(G, M, s_s, s_t, n):
    """Loop over the first n conv layers and over channels: m_i = σ(W2 relu(W1 Δs_i + b1) + b2)."""
    s_r = s_s.clone()
    convs = [L for L in sm.style_layout(G) if L.kind == "conv"][:n]
    for b in range(s_s.shape[0]):
        for i, L in enumerate(convs):
            ds = s_s[b, L.offset:L.offset + L.dim] - s_t[b, L.offset:L.offset + L.dim]
            p = f"network_{i:02d}.masknet."
            h = torch.relu(M.params[p + "0.weight"] @ ds + M.params[p + "0.bias"])
            m = torch.sigmoid(M.params[p + "2.weight"] @ h + M.params[p + "2.bias"])
            for c in range(L.dim):
                s_r[b, L.offset + c] = m[c] * s_t[b, L.offset + c] + (1 - m[c]) * s_s[b, L.offset + c]
    return s_r


def _codes(G, seed, B=2):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(2 * B, G["style.1.weight"].shape[1], generator=gen)
    s = sm.styles(G, sm.mapping(G, z, truncation=0.7))
    return s[:B], s[B:]


def _trained_looking_mask(G, n, seed, kind="per-layer"):
    M = sm.init_mask(G, n_layers=n, seed=seed, kind=kind)
    gen = torch.Generator().manual_seed(seed)
    return M._replace(params={k: v + torch.randn(v.shape, generator=gen) * 0.3 for k, v in M.params.items()})


@given(seed=st.integers(0, 2**16), n=st.integers(1, 7))
def test_reenact_matches_naive_loop(G, seed, n):
    M = _trained_looking_mask(G, n, seed)
    s_s, s_t = _codes(G, seed)
    s_r = sm.reenact(s_s, s_t, M)
    assert_close(s_r, naive_reenact(G, M, s_s, s_t, n))
    ctrl = torch.zeros(s_s.shape[1], dtype=torch.bool)
    ctrl[sm.ctrl_index(M)] = True
    assert torch.equal(s_r[:, ~ctrl], s_s[:, ~ctrl])  # ToRGB and finer layers: exactly the source
    lo, hi = torch.minimum(s_s, s_t), torch.maximum(s_s, s_t)
    assert ((s_r >= lo - 1e-6) & (s_r <= hi + 1e-6)).all()  # channel-wise between source and target
    assert_close(sm.reenact(s_s, s_s, M), s_s, rtol=0, atol=1e-6)  # nothing to take from the target


@pytest.mark.parametrize("kind", ["per-layer", "global"])
def test_saturated_masks_give_source_or_target(G, kind):
    s_s, s_t = _codes(G, 7)
    M = sm.init_mask(G, n_layers=5, kind=kind)
    idx = sm.ctrl_index(M)
    for bias, want in ((-200.0, s_s), (200.0, s_t)):  # σ(−200) = 0, σ(200) = 1 exactly in float32
        Ms = M._replace(params={k: (torch.zeros_like(v) if k.endswith("2.weight") else torch.full_like(v, bias)
                                    if k.endswith("2.bias") else v) for k, v in M.params.items()})
        s_r = sm.reenact(s_s, s_t, Ms)
        assert torch.equal(s_r[:, idx], want[:, idx])


def test_mask_depends_only_on_ds(G):
    M = _trained_looking_mask(G, 7, 8)
    s_s, s_t = _codes(G, 8)
    shift = torch.randn(1, s_s.shape[1], generator=torch.Generator().manual_seed(9))
    assert_close(sm.mask(M, s_s + shift, s_t + shift), sm.mask(M, s_s, s_t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,others_change", [("per-layer", False), ("global", True)])
def test_layer_locality_of_the_mask(G, kind, others_change):
    M = _trained_looking_mask(G, 7, 10, kind=kind)
    s_s, s_t = _codes(G, 10)
    convs = [L for L in sm.style_layout(G) if L.kind == "conv"]
    j = convs[3]  # perturb Δs in one controlled layer only
    s_s2 = s_s.clone()
    s_s2[:, j.offset:j.offset + j.dim] += 1.0
    m1, m2 = sm.mask(M, s_s, s_t), sm.mask(M, s_s2, s_t)
    widths = M.dims
    start = sum(widths[:3])
    changed = (m1 != m2).any(0)
    assert changed[start:start + widths[3]].any()
    others = torch.cat([changed[:start], changed[start + widths[3]:]])
    assert bool(others.any()) == others_change


def test_reenact_refuses_mismatched_mask_and_codes(G, tiny):
    M = sm.init_mask(tiny)
    s_s, s_t = _codes(G, 0)
    with pytest.raises(sm.StyleMaskError, match="mask and generator differ"):
        sm.reenact(s_s, s_t, M)
    with pytest.raises(sm.StyleMaskError, match="D = 74"):
        sm.reenact(s_s, s_t, defaults.tiny_mask())  # the default mask is the tiny one: it must not meet other codes
    with pytest.raises(TypeError):
        sm.reenact(s_s, s_t)  # a pure function: the masks are an argument, never read from a file


def test_default_mask_fits_the_tiny_generator(tiny):
    s_s, s_t = _codes(tiny, 11)
    s_r = sm.reenact(s_s, s_t, defaults.tiny_mask())
    assert s_r.shape == s_s.shape and not torch.equal(s_r, s_s)
    assert sm.mask(defaults.tiny_mask(), s_s, s_t).shape == (2, 320)


@given(seed=st.integers(0, 2**16), alpha=st.floats(0.0, 1.0))
def test_alpha_scales_the_mask(G, seed, alpha):
    M = _trained_looking_mask(G, 5, seed)
    s_s, s_t = _codes(G, seed)
    assert torch.equal(sm.reenact(s_s, s_t, M, alpha=0.0), s_s)  # nothing of the target
    idx = sm.ctrl_index(M)
    m = sm.mask(M, s_s, s_t)
    eq1 = s_s.clone()
    eq1[:, idx] = m * s_t[:, idx] + (1 - m) * s_s[:, idx]  # Eq. 1 written out, every other channel the source's
    assert torch.equal(sm.reenact(s_s, s_t, M, alpha=1.0), eq1)
    assert_close(sm.reenact(s_s, s_t, M, alpha=alpha)[:, idx], s_s[:, idx] + alpha * m * (s_t[:, idx] - s_s[:, idx]))
