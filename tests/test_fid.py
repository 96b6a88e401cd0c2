"""The FID Inception against a torch.nn construction of pytorch-fid's network (helpers.py), the Fréchet
distance against closed forms and an eigendecomposition oracle, and the converter."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import fid
import stylemask as sm
import weights
from weights import convert, defaults, layout
from helpers import build_inception, params_of


@pytest.fixture(scope="module")
def ref():
    return build_inception(seed=0)


@pytest.fixture(scope="module")
def I(ref):
    return params_of(ref)


def pytorch_fid_preprocess(img01):
    """InceptionV3(resize_input=True, normalize_input=True) on [0, 1] images: resize to 299, then 2x − 1."""
    return 2 * F.interpolate(img01, size=(299, 299), mode="bilinear", align_corners=False) - 1


# --- The network ---------------------------------------------------------------------------------------

def test_layout_is_the_official_one(ref):
    want = {k: tuple(v.shape) for k, v in params_of(ref).items()}
    assert layout.inception_shapes() == want
    assert len(want) == 94 * 5 + 2  # 94 BasicConv2d (conv + 4 BatchNorm tensors), fc
    assert want["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1) and want["fc.weight"] == (1008, 2048)
    layout.check_inception(params_of(ref))


def test_inception_matches_the_official_network_at_299(ref, I):
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want = ref(x)
        got = fid.inception(I, x)
        assert want.shape == (2, 2048) and want.std() > 0.1 and (want > 0).float().mean() > 0.5  # not degenerate
        assert_close(got, want)
        assert torch.equal(fid.features(I, x), got)  # a 299×299 input: the resize is the identity


def test_features_resize_any_size_as_pytorch_fid(ref, I):
    img = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        want = ref(pytorch_fid_preprocess((img + 1) / 2))  # pytorch-fid on the same images read as [0, 1]
        got = fid.features(I, img)
    # resize-then-affine vs resize: equal up to float rounding of the inputs (features ~10)
    assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_features_clamp_as_saved_images(I):
    img = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(3)) * 2  # a third beyond ±1
    with torch.no_grad():
        assert_close(fid.features(I, img), fid.features(I, img.clamp(-1, 1)), rtol=0, atol=0)


def test_the_tensorflow_pools_are_the_ones_used(I):
    x = torch.rand(2, 3, 107, 107, generator=torch.Generator().manual_seed(4)) * 2 - 1  # small: any size >= 75 runs
    torchvision_pools = build_inception(seed=0, tf=False)  # the same weights, torchvision's pools
    with torch.no_grad():
        got = fid.inception(I, x)
        assert_close(got, build_inception(seed=0)(x))
        assert (got - torchvision_pools(x)).abs().max() > 1e-2 * got.abs().max()


# --- The Fréchet distance ------------------------------------------------------------------------------

def sqrt_psd(S):
    """S^½ of a symmetric PSD matrix by eigendecomposition (clipping rounding negatives)."""
    w, V = np.linalg.eigh(S)
    return (V * np.sqrt(np.clip(w, 0, None))) @ V.T


def frechet_eigh(mu1, S1, mu2, S2):
    """The oracle: Tr((S1 S2)^½) = Tr((S1^½ S2 S1^½)^½), the sum of square roots of a symmetric PSD spectrum."""
    R = sqrt_psd(S1)
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(R @ S2 @ R), 0, None)).sum()
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(S1) + np.trace(S2) - 2 * tr)


def random_feats(seed, N=400, D=24):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, D)) @ rng.standard_normal((D, D)) + rng.standard_normal(D)


def test_statistics_are_mean_and_unbiased_covariance():
    feats = torch.from_numpy(random_feats(0)).float()
    mu, sigma = fid.statistics(feats)
    X = feats.double()
    Xc = X - X.mean(0)
    assert mu.dtype == np.float64 and sigma.shape == (24, 24)
    assert_close(torch.from_numpy(mu), X.mean(0))
    assert_close(torch.from_numpy(sigma), Xc.T @ Xc / (len(X) - 1))
    with pytest.raises(sm.StyleMaskError, match="N >= 2"):
        fid.statistics(feats[:1])


def test_a_set_with_itself_is_at_distance_zero():
    mu, S = fid.statistics(random_feats(1))
    assert fid.frechet_distance(mu, S, mu, S) == pytest.approx(0, abs=1e-6 * np.trace(S))


def test_a_mean_shift_costs_its_squared_length():
    mu, S = fid.statistics(random_feats(2))
    delta = np.random.default_rng(3).standard_normal(mu.shape)
    assert fid.frechet_distance(mu, S, mu + delta, S) == pytest.approx(delta @ delta, rel=1e-6, abs=1e-6 * np.trace(S))


def test_diagonal_covariances_have_a_closed_form():
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0.1, 5, 16), rng.uniform(0.1, 5, 16)
    m1, m2 = rng.standard_normal(16), rng.standard_normal(16)
    want = (m1 - m2) @ (m1 - m2) + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(want, rel=1e-12)
    assert fid.frechet_distance(0.5, 4.0, -1.0, 9.0) == pytest.approx(1.5 ** 2 + (2 - 3) ** 2)  # 1-D: Δμ² + Δσ²


def test_general_covariances_match_the_symmetric_oracle_and_are_symmetric():
    (m1, S1), (m2, S2) = fid.statistics(random_feats(5)), fid.statistics(random_feats(6))
    d = fid.frechet_distance(m1, S1, m2, S2)
    assert d == pytest.approx(frechet_eigh(m1, S1, m2, S2), rel=1e-9)
    assert d == pytest.approx(fid.frechet_distance(m2, S2, m1, S1), rel=1e-9)
    t = fid.frechet_distance(torch.from_numpy(m1).float(), torch.from_numpy(S1), torch.from_numpy(m2), S2)
    assert t == pytest.approx(d, rel=1e-6)  # tensors are taken too


def test_a_singular_product_takes_the_eps_fallback():
    # (S1 S2) = [[0, 1], [0, 0]] has no square root (sqrtm gives inf); with eps on both diagonals the
    # product is (1 + eps)·[[eps, 1], [0, eps]], whose square root has the diagonal sqrt(eps (1 + eps)).
    S1, S2, eps, notes = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2), 1e-6, []
    d = fid.frechet_distance(np.zeros(2), S1, np.zeros(2), S2, eps=eps, say=notes.append)
    assert d == pytest.approx(0 + 2 - 4 * math.sqrt(eps * (1 + eps)), rel=1e-9)
    assert len(notes) == 1 and "singular product" in notes[0]


def test_imaginary_parts_are_dropped_when_small_and_refused_when_not():
    # sqrtm(diag(1, -1e-8)) = diag(1, 1e-4 i): below 1e-3, the real part diag(1, 0) is used
    d = fid.frechet_distance(np.zeros(2), np.diag([1.0, -1e-8]), np.zeros(2), np.eye(2))
    assert d == pytest.approx((1 - 1e-8) + 2 - 2 * 1, rel=1e-12)
    with pytest.raises(sm.StyleMaskError, match="imaginary component 1"):  # diag(1, i)
        fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(sm.StyleMaskError, match="do not fit together"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# --- Converter, loading, the default ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def official_sd(ref):
    """pt_inception-2015-12-05-6726825d.pth as a state dict: official names and shapes, num_batches_tracked."""
    sd = ref.state_dict()
    assert "Mixed_5b.branch_pool.bn.num_batches_tracked" in sd
    return sd


@pytest.mark.parametrize("legacy", [False, True])  # the 2019 file predates torch's zip format
def test_pytorch_fid_checkpoint_converts_and_runs_the_same(ref, official_sd, tmp_path, capsys, legacy):
    src = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(official_sd, src, _use_new_zipfile_serialization=not legacy)
    assert convert.main([str(src), str(tmp_path / "inception.safetensors")]) == 0
    assert "FID Inception-v3 (94 BasicConv2d, 2048-d pool3), 472 tensors, 23.9M" in capsys.readouterr().out
    I2 = weights.read(tmp_path / "inception.safetensors", "inception")
    assert I2.keys() == params_of(ref).keys() and all(torch.equal(I2[k], official_sd[k]) for k in I2)
    x = torch.rand(1, 3, 80, 80, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        assert_close(fid.inception(I2, x), ref(x))


@pytest.mark.parametrize("change,message", [
    (lambda sd: sd.pop("Mixed_6c.branch7x7dbl_4.bn.running_var"), "1 tensors missing"),
    (lambda sd: sd.update({"Mixed_5b.branch_pool.conv.weight": torch.zeros(64, 192, 1, 1)}), "has shape"),
    (lambda sd: sd.update({"Conv2d_4a_3x3.bn.weight": torch.full((192,), math.nan)}), "NaN"),
    (lambda sd: sd.update({"AuxLogits.fc.weight": torch.zeros(1000, 768)}), "torchvision's ImageNet Inception"),
    (lambda sd: sd.update({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}), "torchvision's"),
    (lambda sd: sd.update({"head.weight": torch.zeros(3)}), "unexpected tensor 'head.weight'"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("Mixed_7c.branch_pool")], "unknown checkpoint"),
])
def test_bad_inception_checkpoints_give_one_line_and_write_nothing(official_sd, tmp_path, capsys, change, message):
    sd = dict(official_sd)
    change(sd)
    src, dst = tmp_path / "bad.pth", tmp_path / "out.safetensors"
    torch.save(sd, src)
    assert convert.main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not dst.exists() and not list(tmp_path.glob(".out.safetensors*"))


def test_kind_inception_can_be_forced_and_must_fit(tmp_path, capsys):
    torch.save({"input_layer.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "ir.pth")
    assert convert.main([str(tmp_path / "ir.pth"), str(tmp_path / "i.safetensors"), "--kind", "inception"]) == 2
    assert "no 'Mixed_7c.branch_pool.conv.weight'" in capsys.readouterr().err
    assert not (tmp_path / "i.safetensors").exists()


def test_load_checks_the_file_and_the_default_is_none_without_weights(I, tmp_path, monkeypatch):
    weights.save(defaults.tiny_arcface(), tmp_path / "arcface.safetensors", "arcface")
    with pytest.raises(sm.StyleMaskError, match="arcface.safetensors: not the FID Inception-v3"):
        weights.read(tmp_path / "arcface.safetensors", "inception")
    monkeypatch.setattr(weights, "DIR", tmp_path)
    notes = []
    assert weights.load("inception", say=notes.append)[0] is None
    assert len(notes) == 1 and "not computed" in notes[0] and "pt_inception-2015-12-05-6726825d.pth" in notes[0]
    weights.save(I, tmp_path / "inception.safetensors", "inception")
    I2, _ = weights.load("inception", say=notes.append)
    assert len(notes) == 1 and all(torch.equal(I2[k], I[k]) for k in I)
    with pytest.raises(sm.StyleMaskError, match="no such file"):
        weights.load("inception", tmp_path / "absent.safetensors")
