"""e4e inversion (facenets.e4e) against a torch.nn construction of encoder4editing's Encoder4Editing written
here, its input resize against PIL, the tiny default against the tiny generator, and the 'e4e' converter on
checkpoints built from random tensors with the official key names."""
import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch.testing import assert_close

import facenets as fn
import stylemask as sm
from test_facenets import randomize
from weights import convert


# --- The official network as torch.nn modules (official attribute = state-dict names) ----------------

class SEModule(nn.Module):
    """models/encoders/helpers.py SEModule."""

    def __init__(self, c, reduction):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(c // reduction, c, 1, bias=False)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class BottleneckIRSE(nn.Module):
    """helpers.py bottleneck_IR_SE."""

    def __init__(self, in_channel, depth, stride, se):
        super().__init__()
        self.shortcut_layer = nn.MaxPool2d(1, stride) if in_channel == depth else nn.Sequential(
            nn.Conv2d(in_channel, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(nn.BatchNorm2d(in_channel), nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False),
                                       nn.PReLU(depth), nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
                                       nn.BatchNorm2d(depth), SEModule(depth, se))

    def forward(self, x):
        return self.shortcut_layer(x) + self.res_layer(x)


class EqualLinear(nn.Module):
    """rosinality EqualLinear(in, out, lr_mul=1), no activation."""

    def __init__(self, i, o):
        super().__init__()
        self.weight, self.bias, self.scale = nn.Parameter(torch.randn(o, i)), nn.Parameter(torch.zeros(o)), 1 / math.sqrt(i)

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias)


class GradualStyleBlock(nn.Module):
    """psp_encoders.py GradualStyleBlock(in_c, out_c, spatial)."""

    def __init__(self, in_c, out_c, spatial):
        super().__init__()
        mods = [nn.Conv2d(in_c, out_c, 3, 2, 1), nn.LeakyReLU()]
        for _ in range(int(np.log2(spatial)) - 1):
            mods += [nn.Conv2d(out_c, out_c, 3, 2, 1), nn.LeakyReLU()]
        self.convs, self.linear, self.out_c = nn.Sequential(*mods), EqualLinear(out_c, out_c), out_c

    def forward(self, x):
        return self.linear(self.convs(x).view(-1, self.out_c))


IR_SE50 = [(64, 3), (128, 4), (256, 14), (512, 3)]  # get_blocks(50): (depth, num_units)


class Encoder4Editing(nn.Module):
    """psp_encoders.py Encoder4Editing in ProgressiveStage.Inference, and pSp.forward's + latent_avg.

    blocks generalises get_blocks (the depth of each stage); the real one is IR_SE50, 64 stem, 512 styles.
    """

    def __init__(self, blocks=IR_SE50, stem=64, w_dim=512, n_styles=18, se=16):
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.PReLU(stem))
        units, c_in = [], stem
        for depth, n in blocks:
            units += [BottleneckIRSE(c_in, depth, 2, se)] + [BottleneckIRSE(depth, depth, 1, se) for _ in range(n - 1)]
            c_in = depth
        self.body = nn.Sequential(*units)
        ends = np.cumsum([n for _, n in blocks]) - 1
        self.taps = (ends[1], ends[2], ends[3])  # 6, 20, 23 for IR-SE50
        c3 = blocks[3][0]
        self.styles = nn.ModuleList([GradualStyleBlock(c3, w_dim, 16 if i < 3 else 32 if i < 7 else 64)
                                     for i in range(n_styles)])
        self.latlayer1 = nn.Conv2d(blocks[2][0], c3, 1)
        self.latlayer2 = nn.Conv2d(blocks[1][0], c3, 1)
        self.register_buffer("latent_avg", torch.zeros(w_dim))
        self.style_count = n_styles

    def forward(self, x):
        x = self.input_layer(x)
        for i, layer in enumerate(self.body):
            x = layer(x)
            if i == self.taps[0]:
                c1 = x
            elif i == self.taps[1]:
                c2 = x
            elif i == self.taps[2]:
                c3 = x
        w0 = self.styles[0](c3)
        w = w0.repeat(self.style_count, 1, 1).permute(1, 0, 2)
        features = c3
        for i in range(1, self.style_count):
            if i == 3:
                p2 = F.interpolate(c3, size=c2.shape[-2:], mode="bilinear", align_corners=True) + self.latlayer1(c2)
                features = p2
            elif i == 7:
                p1 = F.interpolate(p2, size=c1.shape[-2:], mode="bilinear", align_corners=True) + self.latlayer2(c1)
                features = p1
            w[:, i] += self.styles[i](features)
        return w + self.latent_avg.repeat(w.shape[0], 1, 1)


def build(seed, **kw):
    """Encoder4Editing(**kw) with random weights (He-normal, BN stats random, positive variances), eval mode."""
    with torch.device("meta"):
        module = Encoder4Editing(**kw)
    module = module.to_empty(device="cpu")  # EqualLinear's weights are N(0, 1); so is a latent
    return randomize(module, seed, unit_normal=lambda k: k.endswith("linear.weight") or k == "latent_avg")


def close(got, want):
    """Equal up to float32 rounding at the outputs' scale (random deep IR-SE trunks reach |w| ~ 400)."""
    assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.detach().abs().max()))


def params_of(module):
    return {k: v.clone() for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}


# A reduced e4e: every stage, tap, FPN merge and the 18 progressive style blocks, narrow and shallow.
SMALL = dict(blocks=[(16, 2), (24, 2), (32, 3), (40, 2)], stem=16, w_dim=24, n_styles=18, se=8)


@pytest.fixture(scope="module")
def small():
    return build(0, **SMALL)


# --- The network --------------------------------------------------------------------------------------

def test_e4e_layout_is_the_official_one():
    with torch.device("meta"):
        ref = Encoder4Editing()
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert fn.e4e_shapes(fn.E4E_CONFIGS["ffhq-1024"]) == want
    # 24 IR-SE units, 18 style blocks of 4, 5 or 6 convs: 3·4 + 4·5 + 11·6 = 98 convs, 2 lateral layers
    assert sum(k.startswith("styles.") and k.endswith("weight") and "convs" in k for k in want) == 98
    assert fn._e4e_taps(fn.E4E_CONFIGS["ffhq-1024"]) == (6, 20, 23)  # the official c1, c2, c3


@pytest.mark.parametrize("size", [256, 384])  # StyleMask's aligned crops; any other size is resized first
def test_e4e_matches_the_official_encoder(small, size):
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want = small(fn.e4e_input(x))
        got = fn.e4e(params_of(small), x)
    assert got.shape == (2, 18, 24)
    close(got, want)
    assert fn.e4e_config(params_of(small))["units"] == [16] * 2 + [24] * 2 + [32] * 3 + [40] * 2


@given(seed=st.integers(0, 2 ** 16), n_styles=st.sampled_from([8, 14]), B=st.integers(1, 2))
def test_every_style_count_and_its_gradients(seed, n_styles, B):
    """14 styles: a 256 generator (the tiny default); 8: the fine stage barely entered (row 7 only)."""
    kw = dict(SMALL, blocks=[(8, 1), (12, 1), (16, 1), (20, 1)], stem=8, w_dim=8, n_styles=n_styles, se=4)
    ref = build(seed, **kw)
    x = (torch.rand(B, 3, 256, 256, generator=torch.Generator().manual_seed(seed)) * 2 - 1).requires_grad_()
    got = fn.e4e(params_of(ref), x)
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
    assert_close(fn.e4e_input(x)[0], torch.from_numpy(want), rtol=0, atol=1e-4)
    assert fn.e4e_input(x[..., :256, :256]) is not None and torch.equal(fn.e4e_input(x[..., :256, :256]), x[..., :256, :256])


# --- The tiny default and the checks ------------------------------------------------------------------

def test_tiny_e4e_fits_the_tiny_generator_and_gives_its_kind_of_codes():
    G = sm.tiny_generator()
    E = fn.tiny_e4e(G=G)
    fn.check_e4e(E, G)
    assert fn.e4e_config(E)["n_styles"] == sm.n_ws(G) == 14 and fn.e4e_config(E)["w_dim"] == 32
    gen = torch.Generator().manual_seed(5)
    img = sm.synthesis(G, sm.styles(G, sm.mapping(G, torch.randn(4, 32, generator=gen)))).clamp(-1, 1)
    w_plus = fn.e4e(E, img)  # (4, 14, 32)
    w = sm.mapping(G, torch.randn(256, 32, generator=gen))
    spread, want = (w_plus - G["latent_avg"]).std(), (w - G["latent_avg"]).std()
    assert 0.3 * want < spread < 3 * want  # in the generator's region, not collapsed
    assert (w_plus[0] - w_plus[1]).abs().mean() > 0.05 * want  # different images, different codes
    assert sm.styles(G, w_plus).shape == (4, sum(L.dim for L in sm.style_layout(G)))


def test_check_e4e_refuses_what_does_not_fit(small):
    E = params_of(small)
    with pytest.raises(sm.StyleMaskError, match="W\\+ codes \\(18, 24\\).*\\(14, 32\\)"):
        fn.check_e4e(E, sm.tiny_generator())
    with pytest.raises(sm.StyleMaskError, match="tensors missing"):
        fn.check_e4e({k: v for k, v in E.items() if k != "latlayer2.bias"})
    with pytest.raises(sm.StyleMaskError, match="NaN"):
        fn.check_e4e({**E, "styles.5.linear.bias": E["styles.5.linear.bias"] * float("nan")})
    with pytest.raises(sm.StyleMaskError, match="shape"):
        fn.check_e4e({**E, "latent_avg": torch.zeros(3, 24)})
    fn.check_e4e({**E, "latent_avg": torch.zeros(18, 24)})  # one row per style is pSp's other form


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
    E = fn.load(tmp_path / "e4e.safetensors")
    assert not any(k.startswith(("decoder.", "encoder.")) or "num_batches" in k for k in E)
    assert set(E) == set(params_of(small))
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        close(fn.e4e(E, x), small(x))


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
    E, tiny = fn.default_e4e(tmp_path / "e.safetensors")
    assert not tiny and fn.e4e_config(E)["n_styles"] == 18
    monkeypatch.setattr(sm, "WEIGHTS_DIR", tmp_path / "nothing")
    said = []
    E, tiny = fn.default_e4e(say=said.append)
    assert tiny and "e4e_ffhq_encode.pt" in said[0] and fn.e4e_config(E)["n_styles"] == 14
