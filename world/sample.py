"""Draw the world's identities, poses and expressions, and render them: the data every world network
learns from, with exact labels. Deterministic from a torch.Generator.

An identity is its head shape (the first len(head.SHAPE) FLAME shape coefficients) and its appearance
(head.APPEARANCE); a view adds a pose (yaw ±45°, pitch ±20°, roll ±15°, jaw opening) and an expression
(head.EXPRESSION coefficients). Poses are FLAME's axis-angle (DECA's 6-d pose: global, jaw).
"""
import math

import torch

import stylemask as sm
from world import head
from world.render import render

YAW, PITCH, ROLL, JAW = math.radians(45), math.radians(20), math.radians(15), 0.3


def _uniform(rng, n, k, lo, hi):
    return lo + (hi - lo) * torch.rand(n, k, generator=rng, dtype=torch.float64)


def identities(n, rng):
    """n identities: dict(shape (n, 100), appearance (n, 5)); shape coefficients in [−1, 1] on the named
    components, appearance in [0, 1] (the hairline in [−1, 1])."""
    shape = torch.zeros(n, 100, dtype=torch.float64)
    shape[:, :len(head.SHAPE)] = _uniform(rng, n, len(head.SHAPE), -1, 1)
    app = _uniform(rng, n, len(head.APPEARANCE), 0, 1)
    app[:, head.APPEARANCE.index("hairline")] = app[:, head.APPEARANCE.index("hairline")] * 2 - 1
    return dict(shape=shape, appearance=app)


def euler_to_axis_angle(yaw, pitch, roll):
    """(n,) angles -> (n, 3) axis-angle of R = R_y(yaw) · R_x(pitch) · R_z(roll) (angles below π)."""
    def rot(axis, a):
        aa = torch.zeros(a.shape[0], 3, dtype=a.dtype)
        aa[:, axis] = a
        return sm.rodrigues(aa)
    R = rot(1, yaw) @ rot(0, pitch) @ rot(2, roll)
    angle = torch.acos(((R.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1))  # (n,)
    w = torch.stack([R[:, 2, 1] - R[:, 1, 2], R[:, 0, 2] - R[:, 2, 0], R[:, 1, 0] - R[:, 0, 1]], -1)
    scale = torch.where(angle > 1e-8, angle / (2 * torch.sin(angle).clamp(min=1e-12)), torch.full_like(angle, 0.5))
    return w * scale[:, None]


def views(n, rng):
    """n views: dict(pose (n, 6) FLAME axis-angle, angles (n, 3) yaw/pitch/roll in radians, exp (n, 50))."""
    ypr = _uniform(rng, n, 3, -1, 1) * torch.tensor([YAW, PITCH, ROLL], dtype=torch.float64)
    jaw = _uniform(rng, n, 1, 0, JAW)
    pose = torch.cat([euler_to_axis_angle(*ypr.unbind(1)), jaw, torch.zeros(n, 2, dtype=torch.float64)], 1)
    exp = torch.zeros(n, 50, dtype=torch.float64)
    exp[:, :len(head.EXPRESSION)] = _uniform(rng, n, len(head.EXPRESSION), -1, 1).clamp(min=-0.3)
    return dict(pose=pose, angles=ypr, exp=exp)


def render_views(Fl, ident, view, size=64):
    """Images (n, 3, size, size) in [−1, 1] and 2-D landmarks (n, 68, 2) in pixels of identities × views
    (matching rows), with the fixed camera of the losses (`stylemask.fixed_camera`); each albedo from its identity's
    appearance and its view's eyes_closed coefficient (the lids)."""
    dtype = Fl["v_template"].dtype
    out = sm.flame(Fl, ident["shape"].to(dtype), view["exp"].to(dtype), view["pose"].to(dtype))
    lat, lon = head._grid()
    names = head.APPEARANCE
    closed = view["exp"][:, head.EXPRESSION.index("eyes_closed")].tolist()
    albedo = torch.stack([head.albedo(lat, lon, dict(zip(names, a.tolist())), c)
                          for a, c in zip(ident["appearance"], closed)])
    cam = sm.fixed_camera(out["vertices"].shape[0], dtype=dtype)
    img, _ = render(out["vertices"], Fl["f"].long(), albedo.to(dtype), cam, size)
    return img, sm.project(out["landmarks2d"], cam, size)[..., :2]


# --- The generator's prior: world parameters as a function of its latent z ------------------------------
# The world generator is trained to render from z exactly the head that these functions read off z, so
# every generated image has known parameters. The mapping network first pixel-normalises z (sm.mapping),
# so the parameters are read off the normalised z̃ = z·√d/|z|, whose coordinates are close to N(0, 1):
# Φ(z̃_i) is close to uniform in (0, 1) and spans each parameter's range as `identities` / `views` do.
# Groups of coordinates: pose (yaw, pitch, roll), expression (jaw, then the EXPRESSION coefficients),
# shape (the SHAPE coefficients) and appearance (APPEARANCE); the rest of z only adds variety to the norm.

Z_DIM = 32
GROUPS = {"pose": slice(0, 3), "expression": slice(3, 4 + len(head.EXPRESSION)),
          "shape": slice(4 + len(head.EXPRESSION), 4 + len(head.EXPRESSION) + len(head.SHAPE)),
          "appearance": slice(4 + len(head.EXPRESSION) + len(head.SHAPE),
                              4 + len(head.EXPRESSION) + len(head.SHAPE) + len(head.APPEARANCE))}


def uniforms(z):
    """z (n, Z_DIM) -> (n, Z_DIM) in (0, 1): Φ of the pixel-normalised latent (as the mapping network sees it)."""
    z = z.double()
    zn = z * torch.rsqrt(z.square().mean(1, keepdim=True) + 1e-8)
    return 0.5 * (1 + torch.erf(zn / math.sqrt(2)))


def from_z(z):
    """z (n, Z_DIM) -> (identity, view) dicts of `identities` / `views`: the head the world generator draws for z."""
    return from_uniforms(uniforms(z))


def from_uniforms(u):
    """u (n, Z_DIM) in (0, 1), as `uniforms` gives -> (identity, view) dicts (each group read off its slice)."""
    n = u.shape[0]
    ypr = (2 * u[:, GROUPS["pose"]] - 1) * torch.tensor([YAW, PITCH, ROLL], dtype=torch.float64)
    e = u[:, GROUPS["expression"]]
    pose = torch.cat([euler_to_axis_angle(*ypr.unbind(1)), JAW * e[:, :1], torch.zeros(n, 2, dtype=torch.float64)], 1)
    exp = torch.zeros(n, 50, dtype=torch.float64)
    exp[:, :len(head.EXPRESSION)] = (2 * e[:, 1:] - 1).clamp(min=-0.3)
    shape = torch.zeros(n, 100, dtype=torch.float64)
    shape[:, :len(head.SHAPE)] = 2 * u[:, GROUPS["shape"]] - 1
    app = u[:, GROUPS["appearance"]].clone()
    hl = head.APPEARANCE.index("hairline")
    app[:, hl] = app[:, hl] * 2 - 1
    return dict(shape=shape, appearance=app), dict(pose=pose, angles=ypr, exp=exp)
