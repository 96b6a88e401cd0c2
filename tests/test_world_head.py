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
