"""ArcFace IR-SE50 and DECA's E_flame against torch.nn constructions of the official networks (helpers.py),
plus independent oracles for the preprocessing (loop-built pooling, bilinear ramps, F.interpolate), the
Euler angles (rotation matrices built here, scipy's rotation vectors) and the converters."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, strategies as st
from scipy.spatial.transform import Rotation
from torch.testing import assert_close

import facenets as fn
import stylemask as sm
import weights
from weights import convert, defaults, layout
from helpers import Backbone, ResnetEncoder, build, params_of, randomize


TINY_IRSE = dict(blocks=[(16, 1), (32, 1), (48, 1), (64, 1)], stem=16)  # ARCFACE_ARCHS['tiny']
TINY_RESNET = dict(layers=((4, 1), (8, 1), (16, 1), (32, 1)), stem=8)  # DECA_ARCHS['tiny']


@pytest.fixture(scope="module")
def irse50():
    return build(Backbone, seed=0)


@pytest.fixture(scope="module")
def resnet50():
    return build(ResnetEncoder, seed=1)


@pytest.fixture(scope="module")
def A_tiny():
    return defaults.tiny_arcface()


@pytest.fixture(scope="module")
def deca_tiny():
    return defaults.tiny_deca()


# --- ArcFace IR-SE50 ------------------------------------------------------------------------------

def test_irse50_layout_is_the_official_one(irse50):
    want = {k: tuple(v.shape) for k, v in params_of(irse50).items()}
    assert layout.arcface_shapes(fn.ARCFACE_ARCHS["ir_se50"]) == want
    assert len(want) == 6 + 24 * 13 + 3 * 5 + 10  # stem, 24 SE units, 3 conv shortcuts, output layer
    assert fn.arcface_arch(params_of(irse50)) == fn.ARCFACE_ARCHS["ir_se50"]


def test_arcface_matches_the_official_backbone(irse50):
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(fn.arcface(params_of(irse50), x), irse50(x))


@pytest.mark.parametrize("se,affine", [(16, True), (0, False)])  # IR-SE / plain IR, affine BN1d or not (IR_SE_50)
@given(seed=st.integers(0, 2 ** 16), B=st.integers(1, 3))
def test_shallow_ir_networks_run_through_the_same_functions(se, affine, seed, B):
    ref = randomize(Backbone(**TINY_IRSE, se=se, affine=affine), seed)
    A = params_of(ref)
    layout.check_arcface(A)
    x = torch.randn(B, 3, 112, 112, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert_close(fn.arcface(A, x), ref(x))


def adaptive_pool_matrix(n_in, n_out):
    """(n_out, n_in) averaging matrix of AdaptiveAvgPool: window i = [floor(i·n/m), ceil((i+1)·n/m))."""
    P = np.zeros((n_out, n_in))
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        P[i, lo:hi] = 1 / (hi - lo)
    return torch.from_numpy(P).float()


@pytest.mark.parametrize("size", [256, 512, 320])  # as generated; 2× (block means); not a multiple
def test_identity_preprocesses_as_idloss(A_tiny, size):
    img = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size)) * 1.2
    P = adaptive_pool_matrix(size, 256)
    x256 = P @ img @ P.T  # the trainer's face_pool (the identity at 256)
    crop = x256[:, :, 35:223, 32:220]  # IDLoss.extract_feats
    assert crop.shape[-2:] == (188, 188)
    Q = adaptive_pool_matrix(188, 112)
    assert_close(fn.identity(A_tiny, img), fn.arcface(A_tiny, Q @ crop @ Q.T), rtol=1e-4, atol=1e-5)


def test_identity_features_are_unit_and_differentiable(A_tiny):
    gen = torch.Generator().manual_seed(3)
    img = torch.randn(3, 3, 256, 256, generator=gen).requires_grad_(True)
    f = fn.identity(A_tiny, torch.cat([img, img[:1]]))
    assert_close(f.norm(dim=1), torch.ones(4))
    assert_close(f[0] @ f[3], torch.tensor(1.0))  # equal images: cosine 1
    assert (f[:3] @ f[:3].T - torch.eye(3)).abs().max() > 0.05  # different images: different identities
    (f[0] @ f[1]).backward()
    g = img.grad
    assert torch.isfinite(g).all() and g[:2].abs().sum() > 0 and g[2].abs().sum() == 0
    outside = torch.ones(256, 256, dtype=torch.bool)
    outside[35:223, 32:220] = False
    assert g[:, :, outside].abs().max() == 0  # only the 188×188 crop is seen


# --- DECA E_flame ---------------------------------------------------------------------------------

def test_deca_layout_is_the_official_one(resnet50):
    want = {k: tuple(v.shape) for k, v in params_of(resnet50).items()}
    assert layout.deca_shapes(fn.DECA_ARCHS["resnet50"]) == want
    assert want["layers.0.weight"] == (1024, 2048) and want["layers.2.weight"] == (236, 1024)
    assert "encoder.layer1.0.downsample.0.weight" in want and "encoder.layer1.1.downsample.0.weight" not in want


def test_deca_encode_matches_the_official_encoder(resnet50):
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_close(fn.deca_encode(params_of(resnet50), x), resnet50(x))


@given(seed=st.integers(0, 2 ** 16), B=st.integers(1, 3))
def test_tiny_resnet_runs_through_the_same_functions(seed, B):
    ref = randomize(ResnetEncoder(hidden=64, **TINY_RESNET), seed)
    deca = params_of(ref)
    layout.check_deca(deca)
    x = torch.rand(B, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert_close(fn.deca_encode(deca, x), ref(x))


def test_deca_encode_refuses_other_sizes(deca_tiny):
    with pytest.raises(sm.StyleMaskError, match="224"):
        fn.deca_encode(deca_tiny, torch.rand(1, 3, 256, 256))


def test_deca_split_is_decompose_code():
    code = torch.arange(2 * 236, dtype=torch.float32).reshape(2, 236)
    p = fn.deca_split(code)
    assert {k: tuple(v.shape) for k, v in p.items()} == dict(shape=(2, 100), tex=(2, 50), exp=(2, 50), pose=(2, 6),
                                                              cam=(2, 3), light=(2, 9, 3))
    assert p["exp"][1, 0] == 236 + 150 and p["pose"][0, 0] == 200 and p["cam"][0, 2] == 208
    assert_close(p["light"][1], code[1, 209:].reshape(9, 3))


# --- Euler angles (batch_axis2euler) -------------------------------------------------------------

def Rx(a):
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


def Ry(a):
    return np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])


def Rz(a):
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def euler_deg(aa):
    return fn.axis_angle_to_euler(torch.tensor(aa, dtype=torch.float64).reshape(-1, 3))[0] * (180 / math.pi)


def test_elementary_rotations():
    d = math.radians
    assert_close(euler_deg([0, d(-30), 0]), torch.tensor([30.0, 0, 0], dtype=torch.float64))  # yaw is about −y
    assert_close(euler_deg([0, d(30), 0]), torch.tensor([-30.0, 0, 0], dtype=torch.float64))
    assert_close(euler_deg([d(20), 0, 0]), torch.tensor([0, 20.0, 0], dtype=torch.float64))  # pitch about x
    assert_close(euler_deg([0, 0, d(-15)]), torch.tensor([0, 0, -15.0], dtype=torch.float64))  # roll about z
    assert_close(euler_deg([0, 0, 0]), torch.zeros(3, dtype=torch.float64))


@given(yaw=st.floats(-85, 85), pitch=st.floats(-179, 179), roll=st.floats(-179, 179))
@example(yaw=0.0, pitch=0.0, roll=0.0)  # the rest pose
@example(yaw=-60.0, pitch=170.0, roll=-120.0)  # large pitch and roll, where atan2 is near its cut
def test_euler_angles_invert_the_composed_rotation(yaw, pitch, roll):
    R = Rz(math.radians(roll)) @ Ry(-math.radians(yaw)) @ Rx(math.radians(pitch))  # DECA's convention
    aa = Rotation.from_matrix(R).as_rotvec()
    assert_close(euler_deg(aa), torch.tensor([yaw, pitch, roll], dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("sign", [1, -1])
@given(pitch=st.floats(-170, 170))
def test_gimbal_lock_gives_the_intended_branch(sign, pitch):
    R = Ry(-sign * math.pi / 2) @ Rx(math.radians(pitch))  # yaw ±90°: the official code raises NameError here
    aa = Rotation.from_matrix(R).as_rotvec()
    assert_close(euler_deg(aa), torch.tensor([sign * 90.0, pitch, 0.0], dtype=torch.float64), atol=1e-5, rtol=0)


def test_euler_gradients_are_finite_everywhere():
    aa = torch.tensor([[0.0, 0, 0], [0.3, -0.2, 0.1], [0, -math.pi / 2, 0], [1e-20, 0, 0]], requires_grad=True)
    fn.axis_angle_to_euler(aa).sum().backward()
    assert torch.isfinite(aa.grad).all()
    assert_close(aa.grad[0], torch.tensor([1.0, -1.0, 1.0]))  # d(yaw + pitch + roll) at rest: ∂yaw/∂a_y = −1


# --- DECA preprocessing: calculate_shapemodel + TestData crop ------------------------------------

def kornia_source_position(u, S, n, size, c):
    """Input position read by output pixel u (one axis) under kornia 0.4.1's warp of TestData's crop."""
    s = (S - 1) / size
    q = (u + 0.5) * (S - 1) / S  # affine_grid(align_corners=False), un-normalised with (S − 1)
    return n / (n - 1) * (q / s + c - size / 2) - 0.5  # M⁻¹, normalised with (n − 1), grid_sample(False)


@given(cx=st.floats(90, 110), cy=st.floats(90, 110), size=st.floats(60, 150))
@example(cx=99.5, cy=99.5, size=150.0)  # centred on the image: the middle output pixel reads its centre
def test_crop_samples_where_kornia_does(cx, cy, size):
    n, S = 200, 24
    ramp = torch.stack(torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64),
                                      indexing="xy"))[None]  # (1, 2, n, n): channel 0 = x, channel 1 = y
    M = fn.crop_matrix(torch.tensor([[cx, cy, size]], dtype=torch.float64), out_size=S)
    out = fn.warp_affine(ramp, M, S)[0]  # bilinear sampling of a ramp returns the position itself
    u = np.arange(S)
    assert_close(out[0, 0], torch.from_numpy(kornia_source_position(u, S, n, size, cx)), atol=1e-6, rtol=0)
    assert_close(out[1, :, 0], torch.from_numpy(kornia_source_position(u, S, n, size, cy)), atol=1e-6, rtol=0)


def test_a_marked_pixel_lands_where_the_geometry_says():
    img = torch.zeros(1, 1, 256, 256, dtype=torch.float64)
    px, py = 140, 190  # in the default crop
    img[0, 0, py, px] = 1.0
    out = fn.warp_affine(img, fn.crop_matrix(torch.tensor([fn.FFHQ_DECA_CROP], dtype=torch.float64)), 224)[0, 0]
    cx, cy, size = fn.FFHQ_DECA_CROP
    u = np.arange(224)
    tent_x = np.maximum(0, 1 - np.abs(kornia_source_position(u, 224, 256, size, cx) - px))
    tent_y = np.maximum(0, 1 - np.abs(kornia_source_position(u, 224, 256, size, cy) - py))
    assert_close(out, torch.from_numpy(np.outer(tent_y, tent_x)), atol=1e-9, rtol=0)
    v, w = np.unravel_index(int(out.argmax()), out.shape)  # about (py − top) · 223/size
    assert abs(w - (px - (cx - size / 2)) * 223 / size) < 1 and abs(v - (py - (cy - size / 2)) * 223 / size) < 1


def test_crop_maps_testdatas_three_corners():
    crop = torch.tensor([[128.7, 170.4, 203.0]], dtype=torch.float64)
    M = fn.crop_matrix(crop)[0]
    src = torch.tensor([[128.7 - 101.5, 170.4 - 101.5, 1], [128.7 - 101.5, 170.4 + 101.5, 1],
                        [128.7 + 101.5, 170.4 - 101.5, 1]], dtype=torch.float64)
    assert_close(src @ M.T, torch.tensor([[0.0, 0], [0, 223], [223, 0]], dtype=torch.float64))


def test_deca_crop_is_bbox2point_kpt68():
    # left, top, right, bottom = 54, 97, 203, 243: old_size = (149 + 146) / 2 · 1.1 = 162.25
    assert_close(fn.deca_crop(54, 97, 203, 243), torch.tensor([128.5, 170.0, 202.0], dtype=torch.float64))
    boxes = fn.deca_crop(torch.tensor([54.0, 60.0]), torch.tensor([97.0, 80.0]), torch.tensor([203.0, 190.0]),
                         torch.tensor([243.0, 230.0]))
    assert boxes.shape == (2, 3) and boxes[1, 2] == int((130 + 150) / 2 * 1.1 * 1.25)


def test_deca_params_full_frame_crop_is_a_bilinear_resize(deca_tiny):
    # crop (127.5, 127.5, 255) makes kornia's warp exactly F.interpolate(bilinear, align_corners=False)
    img = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(5)) * 1.3
    x = (img.clamp(-1, 1) + 1) / (2 + 1e-5)  # calculate_shapemodel, then / 255 after the warp
    x = F.interpolate(x, size=224, mode="bilinear", align_corners=False)
    want = fn.deca_split(fn.deca_encode(deca_tiny, x))
    got = fn.deca_params(deca_tiny, img, crop=(127.5, 127.5, 255.0))
    for k in want:  # (values of order 1; the official order ×255, warp, ÷255 rounds differently)
        assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)
    assert_close(got["euler"], fn.axis_angle_to_euler(want["pose"][:, :3]) * (180 / math.pi), rtol=1e-4, atol=1e-3)


def test_deca_params_crop_units_and_per_image_crops(deca_tiny):
    img = torch.randn(2, 3, 512, 512, generator=torch.Generator().manual_seed(6))
    P = adaptive_pool_matrix(512, 256)
    a = fn.deca_params(deca_tiny, img, crop=(300.5, 340.5, 400.0))  # input pixels of the 512 image
    b = fn.deca_params(deca_tiny, P @ img @ P.T, crop=(150.0, 170.0, 200.0))  # the same box at 256
    for k in a:
        assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    half = img[:, :, ::2, ::2]  # 256×256
    both = fn.deca_params(deca_tiny, half, crop=torch.tensor([fn.FFHQ_DECA_CROP, (120.0, 140.0, 180.0)]))
    tol = dict(rtol=1e-4, atol=1e-4)  # batch 2 vs 1: convolutions round differently
    assert_close(both["exp"][1:], fn.deca_params(deca_tiny, half[1:], crop=(120.0, 140.0, 180.0))["exp"], **tol)
    assert_close(both["exp"][:1], fn.deca_params(deca_tiny, half[:1])["exp"], **tol)  # the default: FFHQ_DECA_CROP
    with pytest.raises(sm.StyleMaskError, match="crop must be"):
        fn.deca_params(deca_tiny, half, crop=torch.zeros(3, 3))


def test_deca_params_are_differentiable_and_ignore_saturated_pixels(deca_tiny):
    img = (torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(7)) * 1.5).requires_grad_(True)
    p = fn.deca_params(deca_tiny, img)
    (p["exp"].square().sum() + p["euler"].sum()).backward()
    g = img.grad
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert g[img.detach().abs() > 1].abs().max() == 0  # clamp(-1, 1): saturated pixels pass no gradient


def test_tiny_deca_gives_sensible_codes_on_the_tiny_generators_images(deca_tiny):
    G = defaults.tiny_generator()
    z = torch.randn(8, G["style.1.weight"].shape[1], generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        p = fn.deca_params(deca_tiny, sm.generate(G, z, truncation=0.7)[0])
    assert p["pose"].abs().max() < 0.3 and p["shape"].abs().max() < 1 and p["exp"].abs().max() < 1
    assert ((p["cam"][:, 0] > 8) & (p["cam"][:, 0] < 10)).all() and p["exp"].std(0).mean() > 0.01


# --- Converters, loading, defaults ------------------------------------------------------------------

def deca_checkpoint(E_flame):
    """deca_model.tar as DECA's trainer saves it: E_flame, E_detail (ResnetEncoder(128)), D_detail, opt."""
    E_detail = randomize(ResnetEncoder(outsize=128, hidden=64, **TINY_RESNET), 9).state_dict()  # only names matter
    D_detail = {"l1.0.weight": torch.zeros(8192, 181), "l1.0.bias": torch.zeros(8192),
                "conv_blocks.0.running_var": torch.rand(128), "conv_blocks.0.num_batches_tracked": torch.tensor(5)}
    return {"E_flame": E_flame, "E_detail": E_detail, "D_detail": D_detail, "opt": {"lr": 1e-4}}


def test_ir_se50_checkpoint_converts_and_runs_the_same(irse50, tmp_path):
    sd = irse50.state_dict()
    assert "body.0.res_layer.0.num_batches_tracked" in sd
    torch.save(sd, tmp_path / "model_ir_se50.pth")
    assert convert.main([str(tmp_path / "model_ir_se50.pth"), str(tmp_path / "arcface.safetensors")]) == 0
    A = weights.read(tmp_path / "arcface.safetensors", "arcface")
    assert A.keys() == params_of(irse50).keys() and all(torch.equal(A[k], sd[k]) for k in A)
    img = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():  # IDLoss.extract_feats with the official module
        want = irse50(F.adaptive_avg_pool2d(img[:, :, 35:223, 32:220], 112))
    assert_close(fn.identity(A, img), want)


def test_deca_checkpoint_converts_to_e_flame_only(resnet50, tmp_path):
    torch.save(deca_checkpoint(resnet50.state_dict()), tmp_path / "deca_model.tar")
    assert convert.main([str(tmp_path / "deca_model.tar"), str(tmp_path / "deca.safetensors")]) == 0
    deca = weights.read(tmp_path / "deca.safetensors", "deca")
    assert deca.keys() == params_of(resnet50).keys()
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert_close(fn.deca_encode(deca, x), resnet50(x))


def test_legacy_format_deca_tar_converts(tmp_path):
    ref = randomize(ResnetEncoder(hidden=64, **TINY_RESNET), 12)
    torch.save(deca_checkpoint(ref.state_dict()), tmp_path / "deca_model.tar", _use_new_zipfile_serialization=False)
    deca, kind = convert.convert(tmp_path / "deca_model.tar")
    assert kind == "deca" and all(torch.equal(deca[k], v) for k, v in params_of(ref).items())


def _tiny_arcface_sd():
    return randomize(Backbone(**TINY_IRSE), 13).state_dict()


@pytest.mark.parametrize("make,message", [
    (lambda p: torch.save({k: v for k, v in _tiny_arcface_sd().items() if "body.2.res_layer.3" not in k}, p),
     "tensors missing"),
    (lambda p: torch.save({**_tiny_arcface_sd(), "output_layer.3.bias": torch.zeros(7)}, p), "has shape"),
    (lambda p: torch.save({**_tiny_arcface_sd(), "body.1.res_layer.2.weight": torch.full((32,), math.nan)}, p), "NaN"),
    (lambda p: torch.save({**_tiny_arcface_sd(), "head.kernel": torch.zeros(512, 10)}, p), "unexpected tensor"),
    (lambda p: torch.save({"E_detail": {}, "D_detail": {}}, p), "unknown checkpoint"),
    (lambda p: torch.save({"E_flame": torch.zeros(3)}, p), "no 'E_flame' state dict"),
    (lambda p: torch.save(deca_checkpoint(randomize(ResnetEncoder(128, 64, **TINY_RESNET), 0).state_dict()), p),
     "outputs 128 codes"),
])
def test_bad_supervision_checkpoints_give_one_line_and_write_nothing(tmp_path, capsys, make, message):
    src, dst = tmp_path / "bad.pth", tmp_path / "out.safetensors"
    make(src)
    assert convert.main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not dst.exists() and not list(tmp_path.glob(".out.safetensors*"))


def test_kind_can_be_forced_and_must_fit(tmp_path, capsys):
    torch.save(_tiny_arcface_sd(), tmp_path / "ir.pth")
    assert convert.main([str(tmp_path / "ir.pth"), str(tmp_path / "a.safetensors"), "--kind", "arcface"]) == 0
    assert convert.main([str(tmp_path / "ir.pth"), str(tmp_path / "d.safetensors"), "--kind", "deca"]) == 2
    assert "no 'E_flame'" in capsys.readouterr().err


def test_load_checks_the_file_and_defaults_fall_back_to_tiny(tmp_path, monkeypatch):
    A = defaults.tiny_arcface(seed=1)
    weights.save(A, tmp_path / "arcface.safetensors", "arcface")
    assert all(torch.equal(weights.read(tmp_path / "arcface.safetensors", "arcface")[k], A[k]) for k in A)
    weights.save({**A, "input_layer.2.weight": torch.full((16,), math.inf)}, tmp_path / "inf.safetensors", "arcface")
    with pytest.raises(sm.StyleMaskError, match="inf.safetensors: .*NaN or Inf"):
        weights.read(tmp_path / "inf.safetensors", "arcface")
    weights.save(sm.init_mask(sm.ARCHS["tiny"]), tmp_path / "mask.safetensors", "masknet")
    with pytest.raises(sm.StyleMaskError, match="not an ArcFace IR-SE network: it holds StyleMask mask networks"):
        weights.read(tmp_path / "mask.safetensors", "arcface")  # the kind is in the file: named, not guessed
    monkeypatch.setattr(weights, "DIR", tmp_path)
    A2, tiny = weights.load("arcface", say=lambda *_: None)
    assert not tiny and torch.equal(A2["input_layer.0.weight"], A["input_layer.0.weight"])
    notes = []
    deca, tiny = weights.load("deca", say=notes.append)
    assert tiny and "TINY" in notes[0] and "deca_model.tar" in notes[0]
    assert all(torch.equal(deca[k], v) for k, v in defaults.tiny_deca().items())  # deterministic
    with pytest.raises(sm.StyleMaskError, match="no such file"):
        weights.load("deca", tmp_path / "absent.safetensors")


def test_tiny_defaults_are_valid_networks_of_the_official_family(A_tiny, deca_tiny):
    layout.check_arcface(A_tiny)
    layout.check_deca(deca_tiny)
    assert fn.arcface_arch(A_tiny) == fn.ARCFACE_ARCHS["tiny"]
    assert {k: v for k, v in fn.deca_arch(deca_tiny).items() if k != "n_out"} == fn.DECA_ARCHS["tiny"]
