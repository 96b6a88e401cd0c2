"""The world's supervision networks, trained on its renders with exact labels: a 3DMM encoder in DECA's
E_flame format and an identity network in ArcFace's IR-SE format. Both see images exactly as the scripts
feed them (`facenets.deca_params`, `facenets.identity`: the same pooling and crops), so every script path
is the real one.

E_flame regresses DECA's 236-d code of a render: the head's shape coefficients, its expression, its pose
(global and jaw axis-angle), the fixed camera of the renders, its appearance in the texture slots (tex[:5])
and zero light. ArcFace is trained so that its unit feature of a render is the identity's own unit vector
t = Q·u (u: the identity's standardised shape and appearance parameters, Q: a fixed orthonormal 512×15 map):
a regression, so it generalises to unseen identities, with the cosine of two identities' features that of
their parameter vectors (about 0 for random ones, 1 for the same one in any pose and expression).

BatchNorms train as in torch's training mode (`facenets.batch_statistics`): batch statistics, running
averages kept for evaluation, which then runs exactly as for the official networks.
"""
import math

import torch
import torch.nn.functional as F

import facenets as fn
import stylemask as sm
from weights.defaults import random_params
from weights.layout import arcface_shapes, deca_shapes
from world import fit, head, sample

DECA_ARCH = dict(width=8, layers=[(8, 1), (16, 2), (32, 2), (64, 2)], hidden=256)
ARCFACE_ARCH = dict(width=8, units=[8, 16, 32, 64], se=4, emb=512, affine=True)
N_ID = len(head.SHAPE) + len(head.APPEARANCE)


def _init(shapes, seed):
    """Random He-initialised convs and linears; BatchNorms as torch initialises them (scale 1, shift 0,
    running mean 0, variance 1)."""
    P = random_params(shapes, torch.Generator().manual_seed(seed))
    for k in P:
        if k.endswith("running_mean") or k.endswith(".bias") and k.replace(".bias", ".running_mean") in P:
            P[k] = torch.zeros_like(P[k])
        elif k.endswith("running_var") or k.endswith(".weight") and k.replace(".weight", ".running_mean") in P:
            P[k] = torch.ones_like(P[k])
    return P


def init_deca(seed=0):
    """A fresh E_flame of DECA_ARCH: the linear head's bias set to the mean code (camera scale 8)."""
    P = _init(deca_shapes(DECA_ARCH), seed)
    P["layers.2.weight"] = P["layers.2.weight"] * 0.01
    P["layers.2.bias"] = deca_target(*sample.from_uniforms(torch.full((1, sample.Z_DIM), 0.5)))[0].float()
    return P


def init_arcface(seed=0):
    """A fresh IR-SE network of ARCFACE_ARCH."""
    return _init(arcface_shapes(ARCFACE_ARCH), seed)


def deca_target(ident, view):
    """The exact DECA code (n, 236) of rendered heads: shape, tex (appearance), exp, pose, cam, light."""
    n = ident["shape"].shape[0]
    tex = torch.zeros(n, 50, dtype=torch.float64)
    tex[:, :len(head.APPEARANCE)] = ident["appearance"]
    cam = sm.fixed_camera(n, torch.float64)
    return torch.cat([ident["shape"], tex, view["exp"], view["pose"], cam, torch.zeros(n, 27, dtype=torch.float64)], 1)


# per-output scale of the code (its spread over the world): the loss weighs each output by 1 / scale²
def _code_scale():
    s = torch.full((236,), 0.1)
    off = dict(shape=0, tex=100, exp=150, pose=200, cam=206, light=209)
    # Balanced so that no group's gradient drowns another's in the shared trunk (weight 1 / scale² per output):
    # a chance-level guess costs about 4–5 per output for shape, expression and appearance, and 10–20 for the
    # head pose (eval's Pose column must reach 2°) and the jaw.
    s[off["shape"]:off["shape"] + len(head.SHAPE)] = 0.25
    s[off["tex"]:off["tex"] + len(head.APPEARANCE)] = 0.15
    s[off["exp"]:off["exp"] + len(head.EXPRESSION)] = 0.2
    s[off["pose"]:off["pose"] + 3] = 0.1
    s[off["pose"] + 3] = 0.02
    return s


CODE_SCALE = _code_scale()


def identity_vector(ident):
    """(n, N_ID) standardised identity parameters u: shape in [−1, 1] and appearance, each of unit spread."""
    u = torch.cat([ident["shape"][:, :len(head.SHAPE)], ident["appearance"]], 1).float()
    hl = len(head.SHAPE) + head.APPEARANCE.index("hairline")
    centre = torch.full((N_ID,), 0.5)
    centre[:len(head.SHAPE)] = 0
    centre[hl] = 0
    half = torch.full((N_ID,), 0.5)
    half[:len(head.SHAPE)] = 1
    half[hl] = 1
    return (u - centre) / half * math.sqrt(3)  # uniform on [−1, 1] has spread 1/√3


def identity_basis(seed=0):
    """Q (512, N_ID): fixed orthonormal columns, the map from identity parameters to ArcFace features."""
    q, _ = torch.linalg.qr(torch.randn(512, N_ID, generator=torch.Generator().manual_seed(seed)))
    return q


def identity_target(ident, Q):
    """(n, 512) unit features the identity network is trained to give for these identities."""
    return F.normalize(identity_vector(ident) @ Q.T, dim=1)


def _blur(img, sigma):
    """(B, 3, H, W) images blurred with per-image Gaussian widths sigma (B,) in pixels (0: unchanged)."""
    x = torch.arange(-2, 3, dtype=img.dtype)
    k = torch.exp(-x ** 2 / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    k = k / k.sum(1, keepdim=True)                                     # (B, 5)
    B, C, H, W = img.shape
    y = F.pad(img.reshape(1, B * C, H, W), (2, 2, 2, 2), mode="replicate")
    kk = k.repeat_interleave(C, 0)                                     # (B·C, 5)
    y = F.conv2d(y, kk[:, None, None, :], groups=B * C)
    y = F.conv2d(y, kk[:, None, :, None], groups=B * C)
    return y.reshape(B, C, H, W)


def draw(seed, step, batch, Fl, size=64):
    """One step's renders (B, 3, size, size), from (seed, step) alone, with their identities and views; half the
    batch blurred a little (σ up to 1 px) and all with faint noise, so the networks also read the generator's
    softer images."""
    rng = torch.Generator().manual_seed(seed * 1_000_003 + step)
    ident, view = sample.identities(batch, rng), sample.views(batch, rng)
    img, _ = sample.render_views(Fl, ident, view, size)
    img = img.float()
    sigma = torch.rand(batch, generator=rng) * (torch.rand(batch, generator=rng) < 0.5)
    img = _blur(img, sigma) + 0.02 * torch.randn(img.shape, generator=rng)
    return img, ident, view


def loss(P, data, Q):
    """Both networks' losses on one batch: P holds E_flame's tensors as deca.* and ArcFace's as arcface.*."""
    img, ident, view = data
    D = {k[5:]: v for k, v in P.items() if k.startswith("deca.")}
    A = {k[8:]: v for k, v in P.items() if k.startswith("arcface.")}
    with fn.batch_statistics():
        code = torch.cat([v.reshape(len(img), -1) for k, v in fn.deca_params(D, img).items() if k != "euler"], 1)
        f = fn.identity(A, img)
    l_deca = (((code - deca_target(ident, view).float()) / CODE_SCALE) ** 2).mean()
    l_id = (1 - (f * identity_target(ident, Q)).sum(1)).mean()
    with torch.no_grad():
        pose = (code[:, 200:203] - view["pose"][:, :3].float()).abs().mean() * 180 / math.pi
    return l_deca + l_id, {"deca": l_deca.item(), "id": l_id.item(), "pose_deg_aa": pose.item()}


def job(steps, seed=0, batch=32, lr=1e-3):
    """The encoders' training Job (both networks, one batch of renders per step)."""
    Fl = head.flame_head(torch.float32)
    Q = identity_basis(seed)
    P = {f"deca.{k}": v for k, v in init_deca(seed).items()}
    P.update({f"arcface.{k}": v for k, v in init_arcface(seed + 1).items()})
    rates = {k: lr for k in P if "running_" not in k}
    return fit.Job("encoders", P, rates, lambda k: draw(seed + 7, k, batch, Fl), lambda P, d: loss(P, d, Q), steps,
                   decay=lambda k: min(1.0, 2.0 * (1 - k / steps) + 0.02))


def split(P):
    """The trained parameters -> (E_flame's, ArcFace's) tensors, contiguous."""
    D = {k[5:]: v.detach().contiguous() for k, v in P.items() if k.startswith("deca.")}
    A = {k[8:]: v.detach().contiguous() for k, v in P.items() if k.startswith("arcface.")}
    return D, A


# --- Adaptation to the generator's images --------------------------------------------------------------
# The generator draws softer heads than the renderer. Its images have exact labels too (the head its latents
# name, `world.generator.mixed_uniforms`), so after training on renders the encoders train a little longer on
# batches that are half renders, half generated images (plain and style-mixed, as StyleMask's outputs are):
# they then read the generator's images as well as renders, which is what train.py and eval.py ask of them.


def draw_generated(G, seed, step, batch):
    """One step's generated images (B, 3, 64, 64) from (seed, step) alone, with the identities and views of
    the heads their (mixed) latents name."""
    from world import generator
    z, pick = generator.mixed_latents(seed, step, batch, batch // 2)  # half of them unmixed
    with torch.no_grad():
        img = generator.generate(G, z, pick)
    ident, view = sample.from_uniforms(generator.mixed_uniforms(z, pick))
    return img, ident, view


def _cat(a, b):
    return {k: torch.cat([a[k], b[k]]) for k in a}


def draw_adapt(G, seed, step, batch, Fl):
    """Half renders (`draw`), half generated images (`draw_generated`), from (seed, step) alone."""
    img_r, id_r, v_r = draw(seed, step, batch // 2, Fl)
    img_g, id_g, v_g = draw_generated(G, seed + 1, step, batch - batch // 2)
    return torch.cat([img_r, img_g]), _cat(id_r, id_g), _cat(v_r, v_g)


def adapt_job(P, G, steps, seed=0, batch=32, lr=3e-4):
    """The adaptation Job: the trained encoders P (as `job` names them) on renders and generator G's images,
    at a lower rate decaying to 0."""
    Fl = head.flame_head(torch.float32)
    Q = identity_basis(seed)
    rates = {k: lr for k in P if "running_" not in k}
    return fit.Job("adapt", dict(P), rates, lambda k: draw_adapt(G, seed + 11, k, batch, Fl),
                   lambda P, d: loss(P, d, Q), steps, every=100, decay=lambda k: 1 - k / steps)
