"""The 3DMM (Eq. 2, FLAME articulation, landmarks, DECA's camera) and the losses (Eq. 3–8) against
references written here: numpy/scipy skinning, hand-computed projections, the equations term by term."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from scipy.spatial.transform import Rotation
from torch.testing import assert_close

import stylemask as sm
import weights
from weights import defaults, layout


@pytest.fixture(scope="module")
def Fl():
    return defaults.tiny_flame()


def _coeffs(seed, B=3, pose_scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 100, generator=g), torch.randn(B, 50, generator=g),
            torch.randn(B, 6, generator=g) * pose_scale)


def naive_flame_vertices(Fl, shape, exp, pose):
    """FLAME by the book, one mesh at a time in float64: blend shapes, joints, pose correctives,
    forward kinematics with scipy rotations, then each vertex blended from its joints' transforms."""
    out = []
    v_t, U = Fl["v_template"].double().numpy(), Fl["shapedirs"].double().numpy()
    Jr, W = Fl["J_regressor"].double().numpy(), Fl["weights"].double().numpy()
    P = Fl["posedirs"].double().numpy()  # (V, 3, 36)
    parents = [-1] + Fl["kintree_table"][0, 1:].tolist()
    for b in range(shape.shape[0]):
        X = v_t + U[:, :, :100] @ shape[b].double().numpy() + U[:, :, 300:350] @ exp[b].double().numpy()
        J = Jr @ X
        rotvecs = [pose[b, :3], torch.zeros(3), pose[b, 3:], torch.zeros(3), torch.zeros(3)]
        R = [Rotation.from_rotvec(r.double().numpy()).as_matrix() for r in rotvecs]
        X = X + P @ np.concatenate([(r - np.eye(3)).ravel() for r in R[1:]])
        G = []
        for j, p in enumerate(parents):
            local = np.eye(4)
            local[:3, :3], local[:3, 3] = R[j], J[j] - (J[p] if p >= 0 else 0)
            G.append(local if p < 0 else G[p] @ local)
        G = [g - np.pad((g @ np.append(J[j], 0))[:, None], ((0, 0), (3, 0))) for j, g in enumerate(G)]
        T = np.einsum("vj,jrc->vrc", W, np.stack(G))
        out.append(np.einsum("vrc,vc->vr", T[:, :3, :3], X) + T[:, :3, 3])
    return torch.from_numpy(np.stack(out)).float()


@given(seed=st.integers(0, 2**16))
def test_flame_matches_naive_skinning(Fl, seed):
    shape, exp, pose = _coeffs(seed)
    assert_close(sm.flame(Fl, shape, exp, pose)["vertices"], naive_flame_vertices(Fl, shape, exp, pose),
                 rtol=1e-4, atol=1e-6)


def test_eq2_is_affine_with_the_mean_at_zero(Fl):
    a1, e1, _ = _coeffs(1)
    a2, e2, _ = _coeffs(2)
    zero_s, zero_e = torch.zeros_like(a1), torch.zeros_like(e1)
    X0 = sm.shape_model(Fl, zero_s, zero_e)
    assert torch.equal(X0, Fl["v_template"].expand_as(X0))
    lhs = sm.shape_model(Fl, 2 * a1 - a2, 0.5 * e1 + e2) - X0
    rhs = 2 * (sm.shape_model(Fl, a1, zero_e) - X0) - (sm.shape_model(Fl, a2, zero_e) - X0) \
        + 0.5 * (sm.shape_model(Fl, zero_s, e1) - X0) + (sm.shape_model(Fl, zero_s, e2) - X0)
    assert_close(lhs, rhs, rtol=1e-4, atol=1e-7)
    # DECA uses the first 100 shape and the first 50 expression components (columns 300..349)
    U = Fl["shapedirs"]
    one = torch.zeros(1, 50)
    one[0, 7] = 1.0
    assert_close(sm.shape_model(Fl, torch.zeros(1, 100), one)[0] - Fl["v_template"], U[:, :, 307])


def test_zero_pose_is_the_identity_and_global_pose_is_rigid(Fl):
    shape, exp, _ = _coeffs(3)
    X = sm.shape_model(Fl, shape, exp)
    assert_close(sm.articulate(Fl, X, torch.zeros(3, 6)), X, rtol=0, atol=1e-7)
    pose = torch.zeros(3, 6)
    pose[:, :3] = torch.tensor([[0.0, 0.4, 0.0], [0.2, -0.3, 0.1], [-0.5, 0.0, 0.2]])
    J0 = torch.einsum("bvk,v->bk", X, Fl["J_regressor"][0])[:, None]  # the root joint
    R = torch.from_numpy(Rotation.from_rotvec(pose[:, :3].numpy()).as_matrix()).float()
    assert_close(sm.articulate(Fl, X, pose), (X - J0) @ R.transpose(1, 2) + J0, rtol=1e-4, atol=1e-6)


def test_jaw_moves_only_the_jaw(Fl):
    shape, exp, _ = _coeffs(4)
    pose = torch.zeros(3, 6)
    pose[:, 3] = 0.3  # open the jaw
    jaw = Fl["weights"][:, 2] > 0.5
    W = torch.zeros_like(Fl["weights"])
    W[:, 2], W[:, 1] = jaw.float(), (~jaw).float()  # hard skinning: every vertex on the jaw or the neck
    Fl0 = dict(Fl, posedirs=torch.zeros_like(Fl["posedirs"]), weights=W)  # and no pose correctives
    X = sm.shape_model(Fl0, shape, exp)
    moved = (sm.articulate(Fl0, X, pose) - X).norm(dim=2) > 1e-7
    assert torch.equal(moved, jaw.expand_as(moved)) and jaw.any()


def test_landmarks_are_barycentric_and_the_contour_follows_yaw(Fl):
    shape, exp, pose = _coeffs(5, B=4)
    pose[:, :3] = 0
    pose[:, 1] = torch.tensor([math.radians(20), math.radians(-20), math.radians(60), math.radians(-60)])
    out = sm.flame(Fl, shape, exp, pose)
    X = out["vertices"]
    rows = [20, 59, 39, 78]  # DECA's table: yaw 20° -> 20, −20° -> 39 + 20, clamped at ±39°
    for b, row in enumerate(rows):
        idx = torch.cat([Fl["dynamic_lmk_faces_idx"][row], Fl["static_lmk_faces_idx"]])
        bary = torch.cat([Fl["dynamic_lmk_bary_coords"][row], Fl["static_lmk_bary_coords"]])
        want = torch.stack([(bary[l][:, None] * X[b, Fl["f"][idx[l]]]).sum(0) for l in range(68)])
        assert_close(out["landmarks2d"][b], want)
        full = Fl["full_lmk_faces_idx"][0]
        want3d = torch.stack([(Fl["full_lmk_bary_coords"][0, l][:, None] * X[b, Fl["f"][full[l]]]).sum(0) for l in range(68)])
        assert_close(out["landmarks3d"][b], want3d)


def test_decas_orthographic_camera():
    p = torch.tensor([[[0.0, 0.0, 0.0], [0.1, 0.05, -0.02]]])
    cam = torch.tensor([[8.0, 0.01, -0.02]])
    want = torch.tensor([[[8 * 0.01 * 112 + 112, -8 * -0.02 * 112 + 112, 112.0],
                          [8 * 0.11 * 112 + 112, -8 * 0.03 * 112 + 112, 8 * 0.02 * 112 + 112]]])
    assert_close(sm.project(p, cam), want)
    assert_close(sm.fixed_camera(2), torch.tensor([[8.0, 0, 0], [8.0, 0, 0]]))


def test_ground_truth_takes_source_shape_and_target_expression_and_pose(Fl):
    s_shape, s_exp, s_pose = _coeffs(6)
    t_shape, t_exp, t_pose = _coeffs(7)
    p_s = dict(shape=s_shape, exp=s_exp, pose=s_pose)
    p_t = dict(shape=t_shape, exp=t_exp, pose=t_pose)
    X_gt, l_gt = sm.ground_truth_shape(Fl, p_s, p_t)
    X, l = sm.shape_and_landmarks(Fl, s_shape, t_exp, t_pose)
    assert torch.equal(X_gt, X) and torch.equal(l_gt, l) and l.shape == (3, 68, 2)
    other = sm.ground_truth_shape(Fl, dict(p_s, exp=t_exp * 3, pose=t_pose * 2), dict(p_t, shape=s_shape * 5))
    assert torch.equal(other[0], X_gt)  # nothing of the source's expression/pose or the target's shape


# --- Losses against the equations written term by term ----------------------------------------------

def _rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def ref_l1(a, b):
    return sum(abs(x - y) for x, y in zip(a.flatten().tolist(), b.flatten().tolist())) / a.numel()


def ref_pairs(l_gt, l_r, pairs):
    total = 0.0
    for a, b in pairs:  # official calculate_eye_loss / calculate_mouth_loss, pair by pair
        total += ref_l1((l_gt[:, a] - l_gt[:, b]).abs(), (l_r[:, a] - l_r[:, b]).abs())
    return total / len(pairs)


def ref_id(f1, f2):
    return float(np.mean([1 - np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-6)
                          for a, b in zip(f1.numpy(), f2.numpy())]))


def test_each_loss_against_its_equation():
    X_gt, X_r = _rand(0, 2, 30, 3) * 50, _rand(1, 2, 30, 3) * 50
    l_gt, l_r = _rand(2, 2, 68, 2) * 30, _rand(3, 2, 68, 2) * 30
    f1, f2 = _rand(4, 2, 16), _rand(5, 2, 16)
    assert sm.loss_shape(X_gt, X_r).item() == pytest.approx(ref_l1(X_gt, X_r), rel=1e-5)
    assert sm.loss_eye(l_gt, l_r).item() == pytest.approx(ref_pairs(l_gt, l_r, sm.EYE_PAIRS), rel=1e-5)
    assert sm.loss_mouth(l_gt, l_r).item() == pytest.approx(ref_pairs(l_gt, l_r, sm.MOUTH_PAIRS), rel=1e-5)
    assert sm.loss_id(f1, f2).item() == pytest.approx(ref_id(f1, f2), rel=1e-5)
    L, terms = sm.loss_r(X_gt, X_r, l_gt, l_r, f1, f2)
    want = ref_l1(X_gt, X_r) + 10 * ref_id(f1, f2) + ref_pairs(l_gt, l_r, sm.EYE_PAIRS) + ref_pairs(l_gt, l_r, sm.MOUTH_PAIRS)
    assert L.item() == pytest.approx(want, rel=1e-5) and set(terms) == {"shape", "id", "eye", "mouth"}
    L_plain, _ = sm.loss_r(X_gt, X_r, l_gt, l_r, f1, f2, lambda_x=2.0, lambda_id=0.5, eye=False, mouth=False)
    assert L_plain.item() == pytest.approx(2 * ref_l1(X_gt, X_r) + 0.5 * ref_id(f1, f2), rel=1e-5)


def test_cycle_loss_against_eq_5_to_7():
    X_gt, X_1, X_2 = (_rand(i, 2, 30, 3) for i in (10, 11, 12))
    l_gt, l_1, l_2 = (_rand(i, 2, 68, 2) for i in (13, 14, 15))
    f_s, f_1, f_2 = (_rand(i, 2, 16) for i in (16, 17, 18))
    L, terms = sm.loss_cycle(X_gt, X_1, X_2, l_gt, l_1, l_2, f_s, f_1, f_2, eye=False, mouth=False)
    official = ref_l1(X_gt, X_1) + ref_l1(X_gt, X_2) + 10 * (ref_id(f_1, f_s) + ref_id(f_2, f_s))
    assert L.item() == pytest.approx(official, rel=1e-5)
    L7, _ = sm.loss_cycle(X_gt, X_1, X_2, l_gt, l_1, l_2, f_s, f_1, f_2, eye=False, mouth=False, paper_id=True)
    assert L7.item() == pytest.approx(official + 10 * ref_id(f_1, f_2), rel=1e-5)
    L_all, terms = sm.loss_cycle(X_gt, X_1, X_2, l_gt, l_1, l_2, f_s, f_1, f_2)
    eye_mouth = sum(ref_pairs(l_gt, l, p) for l in (l_1, l_2) for p in (sm.EYE_PAIRS, sm.MOUTH_PAIRS))
    assert L_all.item() == pytest.approx(official + eye_mouth, rel=1e-5)
    assert sm.loss_total(L, L_all).item() == pytest.approx(L.item() + L_all.item()) and sm.loss_total(L) is L


def test_identity_loss_is_zero_for_identical_features_and_symmetric():
    f1, f2 = _rand(20, 4, 32), _rand(21, 4, 32)
    assert sm.loss_id(f1, f1.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert sm.loss_id(f1, f2).item() == pytest.approx(sm.loss_id(f2, f1).item(), rel=1e-6)
    assert 0 <= sm.loss_id(f1, f2).item() <= 2


def test_shape_losses_are_differentiable_through_flame(Fl):
    shape, exp, pose = _coeffs(8)
    p_s = dict(shape=shape, exp=exp, pose=pose)
    t_shape, t_exp, t_pose = _coeffs(9)
    X_gt, l_gt = sm.ground_truth_shape(Fl, p_s, dict(shape=t_shape, exp=t_exp, pose=t_pose))
    r_exp, r_pose = exp.clone().requires_grad_(), pose.clone().requires_grad_()
    X_r, l_r = sm.shape_and_landmarks(Fl, shape, r_exp, r_pose)
    L = sm.loss_shape(X_gt, X_r) + sm.loss_eye(l_gt, l_r) + sm.loss_mouth(l_gt, l_r)
    L.backward()
    assert r_exp.grad.abs().sum() > 0 and r_pose.grad.abs().sum() > 0
    assert torch.isfinite(r_exp.grad).all() and torch.isfinite(r_pose.grad).all()
    X_same, l_same = sm.shape_and_landmarks(Fl, shape, t_exp, t_pose)
    assert sm.loss_shape(X_gt, X_same).item() == 0 and sm.loss_eye(l_gt, l_same).item() == 0


def test_tiny_flame_is_a_valid_model():
    Fl = defaults.tiny_flame()
    layout.check_flame(Fl)
    assert all(torch.equal(v, defaults.tiny_flame()[k]) for k, v in Fl.items())
    bad = dict(Fl, f=Fl["f"][:, :2])
    with pytest.raises(sm.StyleMaskError, match="'f'"):
        layout.check_flame(bad)


# --- The converter: FLAME's Python-2 pickle with chumpy/scipy objects, DECA's pickled .npy -----------

@pytest.fixture
def chumpy_module(monkeypatch):
    """A stand-in `chumpy.ch.Ch`: pickles like chumpy (class reference + state dict holding the array as x)."""
    import sys
    import types
    pkg, mod = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x, self.label = x, None

        def __getstate__(self):
            return {"x": self.x, "label": self.label, "_dirty_vars": set()}

        def __setstate__(self, state):
            raise RuntimeError("chumpy code must never run while converting")
    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    mod.Ch, pkg.ch = Ch, mod
    monkeypatch.setitem(sys.modules, "chumpy", pkg)
    monkeypatch.setitem(sys.modules, "chumpy.ch", mod)
    return Ch


def write_official_flame(tmp_path, Fl, Ch):
    """generic_model.pkl and landmark_embedding.npy as FLAME and DECA ship them, from Fl's tensors."""
    import pickle
    import scipy.sparse
    model = {"v_template": Fl["v_template"].double().numpy(), "f": Fl["f"].numpy().astype(np.uint32),
             "shapedirs": Ch(Fl["shapedirs"].double().numpy()), "posedirs": Fl["posedirs"].double().numpy(),
             "J_regressor": scipy.sparse.csc_matrix(Fl["J_regressor"].double().numpy()),
             "kintree_table": Fl["kintree_table"].numpy().astype(np.int64), "weights": Fl["weights"].double().numpy(),
             "J": np.zeros((5, 3)), "bs_style": "lbs", "bs_type": "lrotmin"}
    (tmp_path / "generic_model.pkl").write_bytes(pickle.dumps(model, protocol=2))
    emb = {"static_lmk_faces_idx": Fl["static_lmk_faces_idx"].numpy(),
           "static_lmk_bary_coords": np.asfortranarray(Fl["static_lmk_bary_coords"].numpy()),  # Fortran order
           "dynamic_lmk_faces_idx": Fl["dynamic_lmk_faces_idx"].clone(),  # torch tensors, as DECA ships them
           "dynamic_lmk_bary_coords": Fl["dynamic_lmk_bary_coords"].clone(),
           "full_lmk_faces_idx": Fl["full_lmk_faces_idx"].numpy(), "full_lmk_bary_coords": Fl["full_lmk_bary_coords"].numpy()}
    np.save(tmp_path / "landmark_embedding.npy", emb, allow_pickle=True)
    return tmp_path / "generic_model.pkl", tmp_path / "landmark_embedding.npy"


def test_flame_files_convert_without_chumpy_and_give_the_same_model(tmp_path, chumpy_module, Fl):
    from weights import convert
    pkl, npy = write_official_flame(tmp_path, Fl, chumpy_module)
    dst = tmp_path / "flame.safetensors"
    assert convert.main([str(pkl), str(dst), "--landmarks", str(npy)]) == 0
    Fl2 = weights.read(dst, "flame")
    for k, v in Fl.items():
        assert_close(Fl2[k], v.to(Fl2[k].dtype), msg=k)
    shape, exp, pose = _coeffs(10)
    assert_close(sm.flame(Fl2, shape, exp, pose)["landmarks2d"], sm.flame(Fl, shape, exp, pose)["landmarks2d"])


def test_flame_conversion_refuses_code_and_missing_parts(tmp_path, chumpy_module, Fl, capsys):
    import os
    import pickle
    from weights import convert
    pkl, npy = write_official_flame(tmp_path, Fl, chumpy_module)
    assert convert.main([str(pkl), str(tmp_path / "a.safetensors")]) == 2
    assert "--landmarks" in capsys.readouterr().err

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)
    evil = tmp_path / "evil_model.pkl"
    evil.write_bytes(pickle.dumps({"v_template": Evil()}, protocol=2))
    assert convert.main([str(evil), str(tmp_path / "b.safetensors"), "--landmarks", str(npy)]) == 2
    err = capsys.readouterr().err
    assert "refused to unpickle" in err and err.count("\n") == 1 and not (tmp_path / "pwned").exists()
    np.save(tmp_path / "evil.npy", np.array({"x": Evil()}, dtype=object), allow_pickle=True)
    with pytest.raises(sm.StyleMaskError, match="refused to unpickle"):
        convert.read_npy_object(tmp_path / "evil.npy")
    assert not (tmp_path / "pwned").exists()
    half = tmp_path / "half.pkl"
    half.write_bytes(pkl.read_bytes()[: pkl.stat().st_size // 2])
    assert convert.main([str(half), str(tmp_path / "c.safetensors"), "--landmarks", str(npy), "--kind", "flame"]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.safetensors"))
