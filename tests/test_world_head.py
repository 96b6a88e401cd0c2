"""world.head: the parametric head in FLAME's format runs through stylemask's FLAME code, its named shape
basis is the linearised construction, and its landmarks sit on its rendered features."""
import math

import torch

import stylemask as sm
from weights import defaults
from world import head
from world.render import render


def test_flame_head_has_flames_layout_and_runs_through_stylemask():
    Fl, tiny = head.flame_head(), defaults.tiny_flame()
    assert set(Fl) == set(tiny)
    assert Fl["shapedirs"].shape[1:] == (3, 400) and Fl["J_regressor"].shape == (5, Fl["v_template"].shape[0])
    assert torch.allclose(Fl["weights"].sum(1), torch.ones(Fl["weights"].shape[0]))
    pose = torch.tensor([[0.0, math.radians(20), 0.0, 0.2, 0.0, 0.0]])
    out = sm.flame(Fl, torch.zeros(1, 100), torch.zeros(1, 50), pose)
    assert out["vertices"].shape == (1, Fl["v_template"].shape[0], 3) and out["landmarks2d"].shape == (1, 68, 3)
    assert torch.isfinite(out["landmarks2d"]).all()


def test_shape_basis_is_the_linearised_construction():
    lat, lon = head._grid()
    zero = {k: 0.0 for k in head.SHAPE}
    for k in ("nose_length", "width", "chin"):
        built = head._build(lat, lon, dict(zero, **{k: 0.05}))
        X, _, S, _, _, _ = head.head_model()
        linear = X + 0.05 * S[:, :, head.SHAPE.index(k)]
        assert (built - linear).abs().max() < 2e-6  # metres: second-order terms only
        assert (built - X).abs().max() > 1e-4      # and the parameter does move the head
    tip = int(torch.argmax(head._bump(lat, lon, math.radians(3), 0, 0.05, 0.05)))
    assert head.head_model()[2][tip, 2, head.SHAPE.index("nose_length")] > 0  # a longer nose comes forward


def test_landmarks_sit_on_the_rendered_features():
    Fl = head.flame_head()
    lat, lon = head._grid()
    a = dict(skin=0.3, hair=0.8, eyes=0.2, lips=1.0, hairline=0.0)
    out = sm.flame(Fl, torch.zeros(1, 100), torch.zeros(1, 50), torch.zeros(1, 6))
    size = 128
    img, mask = render(out["vertices"], Fl["f"].long(), head.albedo(lat, lon, a)[None].float(), sm.fixed_camera(1), size)
    lm = sm.project(out["landmarks2d"], sm.fixed_camera(1), size)[0, :, :2].long()
    assert mask[0][lm[:, 1], lm[:, 0]].all()  # every landmark lands on the head
    skin = ((img[0][:, lm[30, 1], lm[30, 0]] + 1) / 2)  # nose tip: skin
    for eye in (range(36, 42), range(42, 48)):
        c = lm[list(eye)].float().mean(0).round().long()
        assert ((img[0][:, c[1], c[0]] + 1) / 2 - skin).abs().max() > 0.1  # the eye centre is painted (iris)
    mouth = lm[list(range(60, 68))].float().mean(0).round().long()
    assert ((img[0][:, mouth[1], mouth[0]] + 1) / 2 - skin).abs().max() > 0.05  # the lips are painted


def test_the_grid_is_densest_at_the_face_and_landmarks_invert_its_warp():
    y = torch.linspace(-math.pi, math.pi, 101, dtype=torch.float64)
    assert (head._warp(head._unwarp(y)) - y).abs().max() < 1e-12
    lat, lon = head._grid()
    lons = lon[:head.N_LON]
    gaps = (lons.diff() % (2 * math.pi))
    assert gaps[0] < 0.65 * (2 * math.pi / head.N_LON) < gaps[head.N_LON // 2 - 1] / 2  # 1.7× / 0.7× the mean
    i, b = head._on_face(math.radians(17), math.radians(22))      # a point's barycentrics reproduce it
    F = head.head_model()[1][i]
    assert abs(float((b * lat[F]).sum()) - math.radians(17)) < 1e-3 and abs(float((b * lon[F]).sum()) - math.radians(22)) < 2e-3


def test_eyes_closed_lowers_the_lids_over_the_eyes():
    Fl = head.flame_head()
    lat, lon = head._grid()
    a = dict(skin=0.2, hair=0.5, eyes=0.0, lips=0.5, hairline=0.0)
    out = sm.flame(Fl, torch.zeros(1, 100), torch.zeros(1, 50), torch.zeros(1, 6))
    lm = sm.project(out["landmarks2d"], sm.fixed_camera(1), 128)[0, :, :2]
    c = lm[36:42].mean(0).round().long()                         # the left eye's centre
    pixel = {}
    for closed in (0.0, 1.0):
        img, _ = render(out["vertices"], Fl["f"].long(), head.albedo(lat, lon, a, closed)[None].float(),
                        sm.fixed_camera(1), 128)
        pixel[closed] = (img[0][:, c[1], c[0]] + 1) / 2
    light = torch.tensor([0.93, 0.76, 0.64]) + (torch.tensor([0.42, 0.28, 0.2]) - torch.tensor([0.93, 0.76, 0.64])) * 0.2
    ratio = pixel[1.0] / light                                     # shut: the lid's skin, shaded alike per channel
    assert ratio.std() < 0.03 and ratio.mean() > 0.5, (pixel, ratio)
    assert pixel[0.0].mean() < 0.3 * pixel[1.0].mean(), pixel      # open: the black pupil
