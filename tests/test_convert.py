"""weights/convert.py on checkpoints built here from random tensors with the official names and shapes."""
import argparse
import os
import pickle
import subprocess
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import stylemask as sm
import weights
from weights import convert, layout
from helpers import naive_synthesis

ROOT = Path(__file__).resolve().parents[1]  # the repository root


# --- rosinality's Generator.__init__, written out as names and shapes ------------------------------

def rosinality_shapes(size, style_dim=512, n_mlp=8, channel_multiplier=2, channels=None):
    """Every g_ema tensor of rosinality's Generator(size, style_dim, n_mlp, channel_multiplier)."""
    ch = channels or {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier,
                      128: 128 * channel_multiplier, 256: 64 * channel_multiplier,
                      512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    shapes = {}
    for i in range(n_mlp):  # style.0 is PixelNorm
        shapes[f"style.{i + 1}.weight"], shapes[f"style.{i + 1}.bias"] = (style_dim, style_dim), (style_dim,)

    def styled_conv(name, cin, cout, upsample):
        shapes.update({f"{name}.conv.weight": (1, cout, cin, 3, 3), f"{name}.conv.modulation.weight": (cin, style_dim),
                       f"{name}.conv.modulation.bias": (cin,), f"{name}.noise.weight": (1,),
                       f"{name}.activate.bias": (cout,)})
        if upsample:
            shapes[f"{name}.conv.blur.kernel"] = (4, 4)

    def to_rgb(name, cin, upsample):
        shapes.update({f"{name}.conv.weight": (1, 3, cin, 1, 1), f"{name}.conv.modulation.weight": (cin, style_dim),
                       f"{name}.conv.modulation.bias": (cin,), f"{name}.bias": (1, 3, 1, 1)})
        if upsample:
            shapes[f"{name}.upsample.kernel"] = (4, 4)

    shapes["input.input"] = (1, ch[4], 4, 4)
    styled_conv("conv1", ch[4], ch[4], False)
    to_rgb("to_rgb1", ch[4], False)
    log_size = int(np.log2(size))
    for layer_idx in range((log_size - 2) * 2 + 1):
        res = (layer_idx + 5) // 2
        shapes[f"noises.noise_{layer_idx}"] = (1, 1, 2 ** res, 2 ** res)
    in_ch = ch[4]
    for i in range(3, log_size + 1):
        out_ch = ch[2 ** i]
        styled_conv(f"convs.{2 * (i - 3)}", in_ch, out_ch, True)
        styled_conv(f"convs.{2 * (i - 3) + 1}", out_ch, out_ch, False)
        to_rgb(f"to_rgbs.{i - 3}", out_ch, True)
        in_ch = out_ch
    return shapes


def random_state(shapes, seed):
    """Random tensors for the shapes, scaled like a trained model (mapping weights / lr_mul = 0.01)."""
    gen = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    blur = torch.tensor([1.0, 3, 3, 1])
    for k, shape in shapes.items():
        if k.endswith("kernel"):
            sd[k] = torch.outer(blur, blur) / blur.sum() ** 2 * 4
        elif k.startswith("style.") and k.endswith("weight"):
            sd[k] = torch.randn(shape, generator=gen) * 100
        elif "bias" in k or "noise.weight" in k:
            sd[k] = torch.randn(shape, generator=gen) * 0.2 + (1.0 if "modulation" in k else 0.0)
        else:
            sd[k] = torch.randn(shape, generator=gen)
    return sd


SMALL = dict(size=32, style_dim=12, n_mlp=3, channels={4: 8, 8: 8, 16: 6, 32: 4})


@pytest.fixture(scope="module")
def rosinality_ckpt(tmp_path_factory):
    sd = random_state(rosinality_shapes(**SMALL), seed=0)
    latent_avg = torch.randn(1, 12, generator=torch.Generator().manual_seed(1))  # stored (1, w_dim) by some tools
    path = tmp_path_factory.mktemp("ckpt") / "stylegan2-small.pt"
    torch.save({"g_ema": sd, "latent_avg": latent_avg, "args": argparse.Namespace(size=32), "g": sd}, path)
    return path, sd, latent_avg


def test_paper_generator_has_the_official_tensors():
    want = rosinality_shapes(1024)
    ours = layout.generator_shapes(sm.ARCHS["ffhq-1024"])
    assert {k: v for k, v in ours.items() if k != "latent_avg"} == want
    # mapping 8×2, const input, 17 convs × 5, 8 blur kernels, 9 ToRGBs × 4, 8 upsample kernels, 17 noises
    assert len(want) == 16 + 1 + 85 + 8 + 36 + 8 + 17


def test_rosinality_checkpoint_converts_and_renders_the_same(rosinality_ckpt, tmp_path):
    src, sd, latent_avg = rosinality_ckpt
    dst = tmp_path / "g.safetensors"
    assert convert.main([str(src), str(dst)]) == 0
    G = weights.read(dst, "generator")
    assert all(torch.equal(G[k], sd[k]) for k in sd) and torch.equal(G["latent_avg"], latent_avg[0])
    wp = torch.randn(2, sm.n_ws(G), 12, generator=torch.Generator().manual_seed(2))
    ref = dict(sd)
    assert_close(sm.synthesis(G, sm.styles(G, wp)), naive_synthesis(ref, wp, n_blocks=3), rtol=1e-4, atol=1e-4)
    z = torch.randn(2, 12, generator=torch.Generator().manual_seed(3))
    assert_close(sm.mapping(G, z, truncation=0.0), latent_avg.expand(2, -1))


def test_checkpoint_without_latent_avg_gets_a_seeded_mean(tmp_path):
    sd = random_state(rosinality_shapes(**SMALL), seed=4)
    torch.save({"g_ema": sd}, tmp_path / "a.pt")
    G, kind = convert.convert(tmp_path / "a.pt", say=lambda *_: None)
    z = torch.randn(4096, 12, generator=torch.Generator().manual_seed(0))
    assert kind == "generator"
    assert_close(G["latent_avg"], sm.mapping(G, z).mean(0))


# --- StyleMask's mask_net checkpoint ----------------------------------------------------------------

def masknet_state(dims, seed):
    """trainer.py: nn.ModuleDict of network_{ii} = MaskPredictor(d, d, inner_dim=d) (Linear, ReLU, Linear)."""
    gen = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    for i, d in enumerate(dims):
        for fc in (0, 2):
            sd[f"network_{i:02d}.masknet.{fc}.weight"] = torch.randn(d, d, generator=gen) * 0.3
            sd[f"network_{i:02d}.masknet.{fc}.bias"] = torch.randn(d, generator=gen) * 0.3
    return sd


@pytest.mark.parametrize("n", [12, None])  # None: the official trainer then masks all 17 conv layers
def test_stylemask_mask_checkpoint_converts(tmp_path, n):
    conv_dims = [512] * 10 + [256, 256, 128, 128, 64, 64, 32]  # official split_sections
    sd = masknet_state(conv_dims[:n or 17], seed=5)
    torch.save({"mask_net": sd, "num_layers_control": n, "step": 70000}, tmp_path / "mask.pt")
    assert convert.main([str(tmp_path / "mask.pt"), str(tmp_path / "m.safetensors")]) == 0
    M = weights.read(tmp_path / "m.safetensors", "masknet")
    assert sm.ctrl_index(M).numel() == (5632 if n else 6048)
    gen = torch.Generator().manual_seed(6)
    s_s, s_t = torch.randn(2, 9088, generator=gen), torch.randn(2, 9088, generator=gen)
    convs = [L for L in sm.style_layout(sm.ARCHS["ffhq-1024"]) if L.kind == "conv"]
    want = []
    for i, L in enumerate(convs[:n or 17]):  # trainer.get_shifted_image, layer by layer
        ds = s_s[:, L.offset:L.offset + L.dim] - s_t[:, L.offset:L.offset + L.dim]
        h = torch.relu(ds @ sd[f"network_{i:02d}.masknet.0.weight"].T + sd[f"network_{i:02d}.masknet.0.bias"])
        want.append(torch.sigmoid(h @ sd[f"network_{i:02d}.masknet.2.weight"].T + sd[f"network_{i:02d}.masknet.2.bias"]))
    assert_close(sm.mask(M, s_s, s_t), torch.cat(want, 1))


def test_mask_checkpoint_with_wrong_layer_count_is_refused(tmp_path):
    torch.save({"mask_net": masknet_state([8, 8], 0), "num_layers_control": 3}, tmp_path / "m.pt")
    with pytest.raises(sm.StyleMaskError, match="num_layers_control = 3"):
        convert.convert(tmp_path / "m.pt")


# --- NVlabs network pickles, built with a stand-in for torch_utils.persistence ---------------------

@pytest.fixture
def nvlabs_pickler(monkeypatch):
    """A fake `torch_utils.persistence` whose objects pickle exactly like NVlabs' persistent classes."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    exec("def _reconstruct_persistent_obj(meta):\n    raise RuntimeError('never called by the converter')", mod.__dict__)
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)

    class Persistent:
        def __init__(self, class_name, params=(), buffers=(), modules=(), **attrs):
            self.meta = dict(type="class", version=4, class_name=class_name,
                             module_src="raise RuntimeError('pickled source code must never run')",
                             state=dict(training=False, _init_kwargs={}, **attrs,
                                        _parameters=OrderedDict((k, torch.nn.Parameter(v, requires_grad=False)) for k, v in params),
                                        _buffers=OrderedDict(buffers), _modules=OrderedDict(modules)))

        def __reduce__(self):
            return mod._reconstruct_persistent_obj, (self.meta,)
    return Persistent


def nvlabs_generator(P, sd, latent_avg, lr=0.01, conv_clamp=None):
    """The same weights in NVlabs' module tree (training/networks.py names), as legacy.py lays them out."""
    f = sd["convs.0.conv.blur.kernel"] / 4  # NVlabs stores the filter normalised to sum 1

    def fc(W, b, **kw):
        return P("FullyConnectedLayer", params=[("weight", W), ("bias", b)], bias_gain=kw.get("lr", 1.0),
                 weight_gain=np.float32(kw.get("lr", 1.0) / np.sqrt(W.shape[1])), activation="linear")

    def layer(name, noise_i):
        return P("SynthesisLayer", conv_clamp=conv_clamp,
                 params=[("weight", sd[f"{name}.conv.weight"][0]), ("bias", sd[f"{name}.activate.bias"]),
                         ("noise_strength", sd[f"{name}.noise.weight"][0])],
                 buffers=[("resample_filter", f), ("noise_const", sd[f"noises.noise_{noise_i}"][0, 0])],
                 modules=[("affine", fc(sd[f"{name}.conv.modulation.weight"], sd[f"{name}.conv.modulation.bias"]))])

    def torgb(name):
        return P("ToRGBLayer", conv_clamp=conv_clamp,
                 params=[("weight", sd[f"{name}.conv.weight"][0]), ("bias", sd[f"{name}.bias"].reshape(3))],
                 modules=[("affine", fc(sd[f"{name}.conv.modulation.weight"], sd[f"{name}.conv.modulation.bias"]))])

    n_mlp = sum(1 for k in sd if k.startswith("style.") and k.endswith("weight"))
    mapping = P("MappingNetwork", c_dim=0, buffers=[("w_avg", latent_avg.reshape(-1))],
                modules=[(f"fc{i}", fc(sd[f"style.{i + 1}.weight"] * (0.01 / lr), sd[f"style.{i + 1}.bias"] * (0.01 / lr), lr=lr))
                         for i in range(n_mlp)])
    blocks = [("b4", P("SynthesisBlock", architecture="skip", params=[("const", sd["input.input"][0])],
                       buffers=[("resample_filter", f)], modules=[("conv1", layer("conv1", 0)), ("torgb", torgb("to_rgb1"))]))]
    j = 0
    while f"to_rgbs.{j}.bias" in sd:
        blocks.append((f"b{8 * 2 ** j}", P("SynthesisBlock", architecture="skip", buffers=[("resample_filter", f)],
                                           modules=[("conv0", layer(f"convs.{2 * j}", 2 * j + 1)),
                                                    ("conv1", layer(f"convs.{2 * j + 1}", 2 * j + 2)),
                                                    ("torgb", torgb(f"to_rgbs.{j}"))])))
        j += 1
    return P("Generator", modules=[("synthesis", P("SynthesisNetwork", modules=blocks)), ("mapping", mapping)])


@pytest.mark.parametrize("lr,conv_clamp", [(0.01, None), (0.02, 0.5)])
def test_nvlabs_pickle_converts_without_running_its_code(nvlabs_pickler, rosinality_ckpt, tmp_path, lr, conv_clamp):
    _, sd, latent_avg = rosinality_ckpt
    G_ema = nvlabs_generator(nvlabs_pickler, sd, latent_avg, lr=lr, conv_clamp=conv_clamp)
    with open(tmp_path / "network.pkl", "wb") as f:
        pickle.dump(dict(G=G_ema, D=None, G_ema=G_ema, augment_pipe=None,
                         training_set_kwargs=dict(resolution=32, xflip=np.bool_(False))), f)
    G, kind = convert.convert(tmp_path / "network.pkl")
    assert kind == "generator"
    for k in sd:
        assert_close(G[k], sd[k], msg=k)
    wp = torch.randn(2, sm.n_ws(G), 12, generator=torch.Generator().manual_seed(7))
    img = sm.synthesis(G, sm.styles(G, wp))
    if conv_clamp is None:
        assert "conv_clamp" not in G
        assert_close(img, naive_synthesis(dict(sd), wp, n_blocks=3), rtol=1e-4, atol=1e-4)
    else:  # every activation and ToRGB output is clamped, so the image is a blend of clamped parts
        assert float(G["conv_clamp"]) == conv_clamp
        unclamped = sm.synthesis({k: v for k, v in G.items() if k != "conv_clamp"}, sm.styles(G, wp))
        assert img.abs().max() <= conv_clamp * 4 + 1e-5 < unclamped.abs().max()


def test_malicious_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"G_ema": Evil()}, protocol=4))
    with pytest.raises(sm.StyleMaskError, match="refused to unpickle"):
        convert.convert(tmp_path / "evil.pkl")
    assert not (tmp_path / "pwned").exists()


# --- Bad input: one line, non-zero exit, nothing overwritten ---------------------------------------

class Opaque:  # a class torch's weights-only loader does not know
    pass


@pytest.mark.parametrize("make,message", [
    (lambda p, real: p.write_bytes(real.read_bytes()[: real.stat().st_size // 2]), "truncated or corrupt"),
    (lambda p, real: p.write_bytes(os.urandom(4096)), "unknown format"),
    (lambda p, real: torch.save({"state_dict": {"a": torch.zeros(1)}}, p), "unknown checkpoint"),
    (lambda p, real: torch.save({"g_ema": {"a": torch.zeros(1)}}, p), "not a StyleGAN2 generator"),
    (lambda p, real: torch.save({"g_ema": Opaque()}, p), "refused to load"),
])
def test_bad_checkpoints_give_one_line_and_write_nothing(tmp_path, rosinality_ckpt, capsys, make, message):
    src, dst = tmp_path / "bad.pt", tmp_path / "out.safetensors"
    make(src, rosinality_ckpt[0])
    assert convert.main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not dst.exists() and not list(tmp_path.glob(".out.safetensors*"))


def test_existing_output_is_kept_without_force(tmp_path, rosinality_ckpt, capsys):
    dst = tmp_path / "g.safetensors"
    dst.write_text("precious")
    assert convert.main([str(rosinality_ckpt[0]), str(dst)]) == 2
    assert "--force" in capsys.readouterr().err and dst.read_text() == "precious"
    assert convert.main([str(rosinality_ckpt[0]), str(dst), "--force"]) == 0
    weights.read(dst, "generator")


def test_cli_exit_code_and_message(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"\x80\x04garbage")
    r = subprocess.run([sys.executable, "-m", "weights.convert", str(tmp_path / "x.pt"),
                        str(tmp_path / "y.safetensors")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_load_rejects_damaged_safetensors(tmp_path, rosinality_ckpt):
    good = tmp_path / "g.safetensors"
    convert.main([str(rosinality_ckpt[0]), str(good)])
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(sm.StyleMaskError, match="not a readable safetensors"):
        weights.read(tmp_path / "cut.safetensors", "generator")
    G = weights.read(good, "generator")
    G["convs.1.conv.weight"][0, 0, 0, 0, 0] = float("nan")
    weights.save(G, tmp_path / "nan.safetensors", "generator")
    with pytest.raises(sm.StyleMaskError, match="NaN"):
        weights.read(tmp_path / "nan.safetensors", "generator")
    del G["to_rgbs.2.bias"]
    weights.save(G, tmp_path / "missing.safetensors", "generator")
    with pytest.raises(sm.StyleMaskError, match="missing"):
        weights.read(tmp_path / "missing.safetensors", "generator")
    with pytest.raises(sm.StyleMaskError, match="no such file.*convert"):
        weights.read(tmp_path / "absent.safetensors", "generator")
