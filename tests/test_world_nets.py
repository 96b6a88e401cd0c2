"""The world's networks and their training pieces: the generator's prior and structured style mixing, the
encoders' exact targets, and training-mode BatchNorm against torch's own."""
import math

import pytest
import torch

import facenets as fn
import stylemask as sm
from world import encoders, generator, head, sample


def test_the_prior_reads_each_group_off_its_own_coordinates_in_range():
    z = torch.randn(256, sample.Z_DIM, generator=torch.Generator().manual_seed(0))
    ident, view = sample.from_z(z)
    yaw, pitch, roll = view["angles"].unbind(1)
    assert yaw.abs().max() <= sample.YAW and yaw.abs().max() > 0.8 * sample.YAW
    assert pitch.abs().max() <= sample.PITCH and roll.abs().max() <= sample.ROLL
    assert ((view["pose"][:, 3] >= 0) & (view["pose"][:, 3] <= sample.JAW)).all()
    assert ident["shape"][:, :len(head.SHAPE)].abs().max() <= 1 and (ident["shape"][:, len(head.SHAPE):] == 0).all()
    # the pose is exactly the view `views` would give for these angles
    want = sample.euler_to_axis_angle(yaw, pitch, roll)
    assert torch.allclose(view["pose"][:, :3], want, atol=1e-12)
    # the pixel norm: scaling z changes nothing (the mapping network sees z / |z|)
    ident2, view2 = sample.from_z(3 * z)
    assert torch.allclose(view2["pose"], view["pose"], atol=1e-9) and torch.allclose(ident2["shape"], ident["shape"])
    # groups are disjoint: changing the shape coordinates moves the shape only
    z2 = z.clone()
    z2[:, sample.GROUPS["shape"]] = -z2[:, sample.GROUPS["shape"]]  # same norm
    i3, v3 = sample.from_z(z2)
    assert torch.allclose(v3["pose"], view["pose"]) and torch.equal(i3["appearance"], ident["appearance"])
    assert not torch.allclose(i3["shape"], ident["shape"])


def test_uniforms_are_close_to_uniform():
    u = sample.uniforms(torch.randn(4096, sample.Z_DIM, generator=torch.Generator().manual_seed(1)))
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005


def test_structured_mixing_takes_every_layer_from_its_bands_latent():
    G = generator.init(seed=3, mapping_steps=0)
    w = torch.randn(2, 5, generator.ARCH["w_dim"], generator=torch.Generator().manual_seed(4))
    for p in range(2):  # all from one latent: the plain styles
        pick = torch.full((5, len(generator.ORDER)), p)
        assert torch.allclose(generator.mixed_styles(G, w, pick), sm.styles(G, w[p]), atol=1e-6)
    pick = torch.tensor([[0, 1, 0, 1]] * 5)   # shape and appearance from latent 1
    s, s0, s1 = generator.mixed_styles(G, w, pick), sm.styles(G, w[0]), sm.styles(G, w[1])
    for L in sm.style_layout(G):
        want = s1 if generator.band(L) in ("shape", "appearance") else s0
        assert torch.allclose(s[:, L.offset:L.offset + L.dim], want[:, L.offset:L.offset + L.dim], atol=1e-6), L.name
    assert {generator.band(L) for L in sm.style_layout(G) if L.kind == "torgb"} == {"appearance"}
    # the target: each group's coordinates from the latent its band picks
    z = torch.randn(2, 5, sample.Z_DIM, generator=torch.Generator().manual_seed(5))
    u = generator.mixed_uniforms(z, pick)
    u0, u1 = sample.uniforms(z[0]), sample.uniforms(z[1])
    for g, i in zip(generator.ORDER, (0, 1, 0, 1)):
        assert torch.equal(u[:, sample.GROUPS[g]], (u1 if i else u0)[:, sample.GROUPS[g]])


def test_the_deca_target_is_the_code_layout():
    rng = torch.Generator().manual_seed(6)
    ident, view = sample.identities(4, rng), sample.views(4, rng)
    code = fn.deca_split(encoders.deca_target(ident, view))
    assert torch.equal(code["shape"], ident["shape"]) and torch.equal(code["exp"], view["exp"])
    assert torch.equal(code["pose"], view["pose"]) and torch.equal(code["tex"][:, :5], ident["appearance"])
    assert torch.equal(code["cam"], sm.fixed_camera(4, torch.float64)) and (code["light"] == 0).all()


def test_identity_targets_have_the_cosines_of_the_identities():
    rng = torch.Generator().manual_seed(7)
    ident = sample.identities(64, rng)
    Q = encoders.identity_basis()
    assert torch.allclose(Q.T @ Q, torch.eye(encoders.N_ID), atol=1e-5)
    t, u = encoders.identity_target(ident, Q), encoders.identity_vector(ident)
    cos_t, cos_u = t @ t.T, torch.nn.functional.normalize(u, dim=1) @ torch.nn.functional.normalize(u, dim=1).T
    assert torch.allclose(cos_t, cos_u, atol=1e-5)
    assert abs(u.std().item() - 1) < 0.1 and u.abs().max() <= math.sqrt(3) + 1e-6  # standardised
    assert cos_u.fill_diagonal_(0).abs().mean() < 0.3  # random identities are far apart


@pytest.mark.parametrize("shape", [(6, 5, 7, 7), (9, 4)])
def test_batch_statistics_is_torchs_training_mode(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(8)) * 3 + 1
    c = shape[1]
    P = {"n.running_mean": torch.zeros(c), "n.running_var": torch.ones(c), "n.weight": torch.rand(c) + 0.5,
         "n.bias": torch.randn(c)}
    ref = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d)(c)
    with torch.no_grad():
        ref.weight.copy_(P["n.weight"])
        ref.bias.copy_(P["n.bias"])
    with fn.batch_statistics():
        y = fn.bn(P, "n", x)
    assert torch.allclose(y, ref.train()(x), atol=1e-5)
    assert torch.allclose(P["n.running_mean"], ref.running_mean) and torch.allclose(P["n.running_var"], ref.running_var)
    assert torch.allclose(fn.bn(P, "n", x), ref.eval()(x), atol=1e-5)  # outside: eval mode again


def test_face_weight_peaks_on_the_feature_landmarks_and_is_one_far_away():
    lmk = torch.full((1, 68, 2), 1000.0)          # every landmark off the image...
    lmk[0, 40] = torch.tensor([20.5, 30.5])       # ...but one eye landmark, at pixel (20, 30)
    lmk[0, 5] = torch.tensor([50.5, 50.5])        # a jaw-contour landmark: not a feature, no weight
    wt = generator.face_weight(lmk, 64)[0, 0]
    assert wt[30, 20].item() == pytest.approx(1 + generator.FEATURE_WEIGHT)
    r = 2.0  # two pixels away: the Gaussian of FEATURE_SIGMA px
    assert wt[30, 22].item() == pytest.approx(1 + generator.FEATURE_WEIGHT * math.exp(-r * r / (2 * generator.FEATURE_SIGMA ** 2)))
    assert wt[50, 50].item() == pytest.approx(1.0) and wt[0, 63].item() == pytest.approx(1.0)


def test_the_generator_loss_is_the_weighted_pyramid_of_l1s():
    G = generator.init(seed=1, mapping_steps=0)
    g = torch.Generator().manual_seed(2)
    z, pick = torch.randn(2, 2, generator.ARCH["z_dim"], generator=g), torch.zeros(2, 4, dtype=torch.long)
    target = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    wt = 1 + 4 * torch.rand(2, 1, 64, 64, generator=g)
    img = sm.synthesis(G, sm.styles(G, sm.mapping(G, z[0])))
    want, d, w_ = 0.0, (img - target).double(), wt.double()
    for level in range(4):  # independent: explicit sums, weights pooled with the differences
        if level:
            d, w_ = torch.nn.functional.avg_pool2d(d, 2), torch.nn.functional.avg_pool2d(w_, 2)
        want += (d.abs() * w_.expand_as(d)).sum() / w_.expand_as(d).sum()
        if level == 0:
            for dx, ww in ((d[..., 1:, :] - d[..., :-1, :], w_[..., 1:, :]), (d[..., :, 1:] - d[..., :, :-1], w_[..., :, 1:])):
                want += (dx.abs() * ww.expand_as(dx)).sum() / ww.expand_as(dx).sum()
    got, logs = generator.loss(G, (z, pick, target, wt))
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert logs["l1"] == pytest.approx((img - target).abs().mean().item(), rel=1e-5)


def test_expression_pairs_differ_in_their_expression_alone():
    Fl = head.flame_head(torch.float32)
    z, pick, img, wt = generator.draw_pairs(seed=4, step=3, batch=8, Fl=Fl, size=32)
    h, e = 4, generator.ORDER.index("expression")
    assert torch.equal(z[:, :h], z[:, h:]) and torch.equal(pick[:h, e], 1 - pick[h:, e])
    others = [i for i in range(len(generator.ORDER)) if i != e]
    assert torch.equal(pick[:h, others], pick[h:, others])
    ident, view = sample.from_uniforms(generator.mixed_uniforms(z, pick))
    for k in ident:
        assert torch.equal(ident[k][:h], ident[k][h:])
    assert torch.equal(view["pose"][:h, :3], view["pose"][h:, :3])          # the head pose is the same
    assert (view["exp"][:h] - view["exp"][h:]).abs().amax(1).min() > 0      # the expression is not
    assert img.shape == (8, 3, 32, 32) and wt.shape == (8, 1, 32, 32)
    assert (img[:h] - img[h:]).abs().amax() > 0.1                           # and the renders show it


def test_the_pair_loss_adds_the_squared_error_of_each_pairs_change(monkeypatch):
    g = torch.Generator().manual_seed(6)
    target = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    wt = 1 + 4 * torch.rand(4, 1, 16, 16, generator=g)
    noise = 0.1 * torch.randn(2, 3, 16, 16, generator=g)
    data = (None, None, target, wt)
    # the same error on both images of a pair: the change is exact, only the image loss remains
    monkeypatch.setattr(generator, "generate", lambda G, z, pick: target + torch.cat([noise, noise]))
    got, logs = generator.pair_loss(None, data, weight=30.0)
    assert logs["pair"] == pytest.approx(0.0, abs=1e-12)
    assert got.item() == pytest.approx(generator.image_loss(torch.cat([noise, noise]), wt).item(), rel=1e-6)
    # the second image of each pair off by a constant δ: the change is off by δ everywhere, 3 levels of δ²
    delta = 0.25
    monkeypatch.setattr(generator, "generate", lambda G, z, pick: target + torch.cat([noise, noise + delta]))
    got, logs = generator.pair_loss(None, data, weight=30.0)
    assert logs["pair"] == pytest.approx(3 * delta ** 2, rel=1e-5)
    image = generator.image_loss(torch.cat([noise, noise + delta]), wt).item()
    assert got.item() == pytest.approx(image + 30.0 * 3 * delta ** 2, rel=1e-5)


def test_generated_adaptation_images_carry_the_labels_of_their_latents():
    G = generator.init(seed=5, mapping_steps=0)
    img, ident, view = encoders.draw_generated(G, seed=3, step=2, batch=4)
    rng = torch.Generator().manual_seed(3 * 1_000_003 + 2)  # the draw's own stream: latents first
    z = torch.randn(2, 4, sample.Z_DIM, generator=rng)
    pick = (torch.rand(4, len(generator.ORDER), generator=rng) < 0.5).long()
    pick[:2] = 0
    plain = sm.synthesis(G, sm.styles(G, sm.mapping(G, z[0, :2])))
    assert torch.allclose(img[:2], plain, atol=1e-5)                     # unmixed half: plain samples of z
    i0, v0 = sample.from_z(z[0, :2])
    assert torch.equal(ident["shape"][:2], i0["shape"]) and torch.equal(view["pose"][:2], v0["pose"])
    u = sample.uniforms(z.reshape(-1, sample.Z_DIM)).reshape(2, 4, -1)  # mixed half: each group from its pick
    for i, g in enumerate(generator.ORDER):
        for b in (2, 3):
            want = u[pick[b, i], b, sample.GROUPS[g]]
            got = generator.mixed_uniforms(z, pick)[b, sample.GROUPS[g]]
            assert torch.equal(got, want)
    i2, v2 = sample.from_uniforms(generator.mixed_uniforms(z, pick)[2:])
    assert torch.equal(ident["appearance"][2:], i2["appearance"]) and torch.equal(view["exp"][2:], v2["exp"])


def test_the_fitted_mapping_network_names_the_head_in_ws_first_coordinates():
    G0 = generator.init(seed=2, mapping_steps=0)
    G = generator.fit_mapping(G0, steps=300, seed=2)
    z = torch.randn(2000, sample.Z_DIM, generator=torch.Generator().manual_seed(77))  # not the fit's draws
    want = generator.named(z)
    assert want.shape == (2000, 24) and want.abs().max() <= math.sqrt(3)
    assert ((want.var(0) - 1).abs() < 0.1).all()                 # unit spread, as documented
    err = lambda G: (sm.mapping(G, z)[:, :generator.N_PARAMS] - want).square().mean().item()  # noqa: E731
    assert err(G0) > 0.5 and err(G) < 0.1, (err(G0), err(G))     # random: scrambled; fitted: read off w
    assert all(torch.equal(G[k], G0[k]) for k in G if not k.startswith("style."))  # synthesis untouched
