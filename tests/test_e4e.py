"""e4e inversion (facenets.e4e) against a torch.nn construction of encoder4editing's Encoder4Editing
(helpers.py), its input resize against PIL, the tiny default against the tiny generator, and the 'e4e'
converter on checkpoints built from random tensors with the official key names."""
import argparse

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from torch.testing import assert_close

import e4e
import stylemask as sm
import weights
from weights import convert, defaults, layout
from helpers import Encoder4Editing, build_e4e, params_of


def close(got, want):
    """Equal up to float32 rounding at the outputs' scale (random deep IR-SE trunks reach |w| ~ 400)."""
    assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.detach().abs().max()))


# A reduced e4e: every stage, tap, FPN merge and the 18 progressive style blocks, narrow and shallow.
SMALL = dict(blocks=[(16, 2), (24, 2), (32, 3), (40, 2)], stem=16, w_dim=24, n_styles=18, se=8)


@pytest.fixture(scope="module")
def small():
    return build_e4e(0, **SMALL)


# --- The network --------------------------------------------------------------------------------------

def test_e4e_layout_is_the_official_one():
    with torch.device("meta"):
        ref = Encoder4Editing()
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert layout.e4e_shapes(e4e.E4E_ARCHS["ffhq-1024"]) == want
    # 24 IR-SE units, 18 style blocks of 4, 5 or 6 convs: 3·4 + 4·5 + 11·6 = 98 convs, 2 lateral layers
    assert sum(k.startswith("styles.") and k.endswith("weight") and "convs" in k for k in want) == 98
    assert e4e.e4e_taps(e4e.E4E_ARCHS["ffhq-1024"]) == (6, 20, 23)  # the official c1, c2, c3


@pytest.mark.parametrize("size", [256, 384])  # StyleMask's aligned crops; any other size is resized first
def test_e4e_matches_the_official_encoder(small, size):
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want = small(e4e.e4e_input(x))
        got = e4e.e4e(params_of(small), x)
    assert got.shape == (2, 18, 24)
    close(got, want)
    assert e4e.e4e_arch(params_of(small))["units"] == [16] * 2 + [24] * 2 + [32] * 3 + [40] * 2


@given(seed=st.integers(0, 2 ** 16), n_styles=st.sampled_from([8, 14]), B=st.integers(1, 2))
def test_every_style_count_and_its_gradients(seed, n_styles, B):
    """14 styles: a 256 generator (the tiny default); 8: the fine stage barely entered (row 7 only)."""
    kw = dict(SMALL, blocks=[(8, 1), (12, 1), (16, 1), (20, 1)], stem=8, w_dim=8, n_styles=n_styles, se=4)
    ref = build_e4e(seed, **kw)
    x = (torch.rand(B, 3, 256, 256, generator=torch.Generator().manual_seed(seed)) * 2 - 1).requires_grad_()
    got = e4e.e4e(params_of(ref), x)
    want = ref(x)
    close(got, want)
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed + 1))
    close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0])


def test_resize_is_pils_bilinear():
    """e4e_input at other sizes = transforms.Resize((256, 256)) on a PIL image: PIL's antialiased bilinear."""
    from PIL import Image
    x = torch.rand(1, 3, 300, 517, generator=torch.Generator().manual_seed(3)) * 2 - 1
    want = np.stack([np.asarray(Image.fromarray(c.numpy(), mode="F").resize((256, 256), Image.BILINEAR))
                     for c in x[0]])
    assert_close(e4e.e4e_input(x)[0], torch.from_numpy(want), rtol=0, atol=1e-4)
    assert e4e.e4e_input(x[..., :256, :256]) is not None and torch.equal(e4e.e4e_input(x[..., :256, :256]), x[..., :256, :256])


# --- The tiny default and the checks ------------------------------------------------------------------

def test_tiny_e4e_fits_the_tiny_generator_and_gives_its_kind_of_codes():
    G = defaults.tiny_generator()
    E = defaults.tiny_e4e(G=G)
    layout.check_e4e(E, G)
    assert e4e.e4e_arch(E)["n_styles"] == sm.n_ws(G) == 14 and e4e.e4e_arch(E)["w_dim"] == 32
    gen = torch.Generator().manual_seed(5)
    img = sm.synthesis(G, sm.styles(G, sm.mapping(G, torch.randn(4, 32, generator=gen)))).clamp(-1, 1)
    w_plus = e4e.e4e(E, img)  # (4, 14, 32)
    w = sm.mapping(G, torch.randn(256, 32, generator=gen))
    spread, want = (w_plus - G["latent_avg"]).std(), (w - G["latent_avg"]).std()
    assert 0.3 * want < spread < 3 * want  # in the generator's region, not collapsed
    assert (w_plus[0] - w_plus[1]).abs().mean() > 0.05 * want  # different images, different codes
    assert sm.styles(G, w_plus).shape == (4, sum(L.dim for L in sm.style_layout(G)))


def test_check_e4e_refuses_what_does_not_fit(small):
    E = params_of(small)
    with pytest.raises(sm.StyleMaskError, match="W\\+ codes \\(18, 24\\).*\\(14, 32\\)"):
        layout.check_e4e(E, defaults.tiny_generator())
    with pytest.raises(sm.StyleMaskError, match="tensors missing"):
        layout.check_e4e({k: v for k, v in E.items() if k != "latlayer2.bias"})
    with pytest.raises(sm.StyleMaskError, match="NaN"):
        layout.check_e4e({**E, "styles.5.linear.bias": E["styles.5.linear.bias"] * float("nan")})
    with pytest.raises(sm.StyleMaskError, match="shape"):
        layout.check_e4e({**E, "latent_avg": torch.zeros(3, 24)})
    layout.check_e4e({**E, "latent_avg": torch.zeros(18, 24)})  # one row per style is pSp's other form


# --- The converter ------------------------------------------------------------------------------------

def e4e_checkpoint(module, opts, latent_avg_shape=(1, None)):
    """What encoder4editing's Coach saves: state_dict of the whole pSp (encoder.* and decoder.*), latent_avg, opts."""
    sd = {f"encoder.{k}": v for k, v in module.state_dict().items() if k != "latent_avg"}
    gen = torch.Generator().manual_seed(9)
    sd.update({"decoder.style.1.weight": torch.randn(24, 24, generator=gen),  # the generator copy: dropped
               "decoder.convs.0.conv.weight": torch.randn(1, 8, 8, 3, 3, generator=gen),
               "decoder.noises.noise_0": torch.randn(1, 1, 4, 4, generator=gen)})
    w_dim = module.latent_avg.shape[0]
    rows = latent_avg_shape[0]
    avg = module.latent_avg[None].expand(rows, w_dim).clone() if rows else module.latent_avg.clone()
    return {"state_dict": sd, "latent_avg": avg, "opts": opts}


@pytest.mark.parametrize("opts,rows", [
    (argparse.Namespace(encoder_type="Encoder4Editing", output_size=1024, start_from_latent_avg=True), 1),
    ({"encoder_type": "Encoder4Editing", "output_size": 1024}, 18),  # a dict, latent_avg per style
    (None, 0)])  # no opts, latent_avg (512,)
def test_e4e_checkpoint_converts_and_runs_the_same(small, tmp_path, opts, rows):
    torch.save(e4e_checkpoint(small, opts, (rows, None)), tmp_path / "e4e_ffhq_encode.pt")
    assert convert.main([str(tmp_path / "e4e_ffhq_encode.pt"), str(tmp_path / "e4e.safetensors")]) == 0
    E = weights.read(tmp_path / "e4e.safetensors", "e4e")
    assert not any(k.startswith(("decoder.", "encoder.")) or "num_batches" in k for k in E)
    assert set(E) == set(params_of(small))
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        close(e4e.e4e(E, x), small(x))


def test_missing_latent_avg_is_zeros_as_psp_adds_nothing(small):
    ckpt = e4e_checkpoint(small, None)
    del ckpt["latent_avg"]
    said = []
    E = convert.from_e4e(ckpt, say=said.append)
    assert torch.equal(E["latent_avg"], torch.zeros(24)) and "no latent_avg" in said[0]


@pytest.mark.parametrize("make,message", [
    (lambda ck: {"latent_avg": ck["latent_avg"]}, "unknown checkpoint"),  # no state_dict at all
    (lambda ck: {**ck, "opts": {"encoder_type": "GradualStyleEncoder"}}, "not e4e's Encoder4Editing"),  # pSp
    (lambda ck: {**ck, "state_dict": {k: v for k, v in ck["state_dict"].items() if k != "encoder.styles.9.convs.2.weight"}},
     "tensors missing"),  # a hole in a style block
    (lambda ck: {**ck, "state_dict": {k: v for k, v in ck["state_dict"].items() if ".styles.17." not in k}},
     "17 styles"),  # an odd count fits no generator
    (lambda ck: {**ck, "state_dict": {**ck["state_dict"], "encoder.latlayer1.weight": torch.zeros(1)}}, "shape"),
])
def test_bad_e4e_checkpoints_give_one_line_and_write_nothing(small, tmp_path, capsys, make, message):
    torch.save(make(e4e_checkpoint(small, argparse.Namespace(encoder_type="Encoder4Editing"))), tmp_path / "bad.pt")
    assert convert.main([str(tmp_path / "bad.pt"), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_forced_kind_and_defaults(small, tmp_path, monkeypatch):
    torch.save(e4e_checkpoint(small, None), tmp_path / "e.pt")
    assert convert.main([str(tmp_path / "e.pt"), str(tmp_path / "e.safetensors"), "--kind", "e4e"]) == 0
    assert convert.main([str(tmp_path / "e.pt"), str(tmp_path / "a.safetensors"), "--kind", "arcface"]) == 2
    E, tiny = weights.load("e4e", tmp_path / "e.safetensors")
    assert not tiny and e4e.e4e_arch(E)["n_styles"] == 18
    monkeypatch.setattr(weights, "DIR", tmp_path / "nothing")
    said = []
    E, tiny = weights.load("e4e", say=said.append)
    assert tiny and "e4e_ffhq_encode.pt" in said[0] and e4e.e4e_arch(E)["n_styles"] == 14
