"""How good the world's networks are, measured on held-out renders and samples (the build's quality gates).

    encoder_errors(D)        E_flame on held-out renders: head pose (yaw, pitch, roll, degrees, DECA's
                             Euler angles), jaw (degrees), expression, shape and appearance coefficients
    verification(A)          ArcFace: same / different identity on held-out identities, threshold chosen on
                             one half of the pairs, accuracy on the other
    generator_fidelity(G, D) the generator against the world it renders: its samples' parameters as the
                             encoder reads them, against the parameters z names (`sample.from_z`), and its
                             yaw spread against the renders'

Held-out data comes from seeds no training stage uses (`HELD_OUT`).
"""
import math

import torch

import facenets as fn
import stylemask as sm
from world import head, sample

HELD_OUT = 90_210  # seed of every held-out draw


def _deg(aa):
    """(n, 3) axis-angle -> (n, 3) DECA Euler angles in degrees."""
    return fn.axis_angle_to_euler(aa.double()) * 180 / math.pi


@torch.no_grad()
def _encode(D, img, batch=64):
    return {k: torch.cat([fn.deca_params(D, img[i:i + batch])[k] for i in range(0, len(img), batch)])
            for k in ("shape", "tex", "exp", "pose")}


@torch.no_grad()
def encoder_errors(D, n=512, Fl=None):
    """Mean absolute errors of E_flame D on n held-out renders (dict of floats)."""
    Fl = head.flame_head() if Fl is None else Fl
    rng = torch.Generator().manual_seed(HELD_OUT)
    ident, view = sample.identities(n, rng), sample.views(n, rng)
    img, _ = sample.render_views(Fl, ident, view)
    p = _encode(D, img.float())
    ypr = (_deg(p["pose"][:, :3]) - _deg(view["pose"][:, :3])).abs()
    return dict(pose_deg=ypr.mean().item(), yaw_deg=ypr[:, 0].mean().item(), pitch_deg=ypr[:, 1].mean().item(),
                roll_deg=ypr[:, 2].mean().item(),
                jaw_deg=((p["pose"][:, 3] - view["pose"][:, 3]).abs().mean() * 180 / math.pi).item(),
                exp=(p["exp"][:, :len(head.EXPRESSION)] - view["exp"][:, :len(head.EXPRESSION)]).abs().mean().item(),
                shape=(p["shape"][:, :len(head.SHAPE)] - ident["shape"][:, :len(head.SHAPE)]).abs().mean().item(),
                appearance=(p["tex"][:, :len(head.APPEARANCE)] - ident["appearance"]).abs().mean().item())


@torch.no_grad()
def verification(A, n_id=400, Fl=None):
    """Same / different-identity verification of ArcFace A on n_id held-out identities seen twice (independent
    views): n_id same pairs, n_id different pairs (each identity against the next). The threshold on the
    cosine is the best one on the first half of the pairs; the accuracy is that of the second half."""
    Fl = head.flame_head() if Fl is None else Fl
    rng = torch.Generator().manual_seed(HELD_OUT + 1)
    ident = sample.identities(n_id, rng)
    feats = []
    for _ in range(2):
        img, _ = sample.render_views(Fl, ident, sample.views(n_id, rng))
        feats.append(torch.cat([fn.identity(A, img[i:i + 64].float()) for i in range(0, n_id, 64)]))
    same = (feats[0] * feats[1]).sum(1)                               # (n_id,)
    diff = (feats[0] * feats[1].roll(1, 0)).sum(1)                    # (n_id,)
    h = n_id // 2

    def accuracy(t, s, d):
        return ((s > t).float().sum() + (d <= t).float().sum()).item() / (len(s) + len(d))
    cands = torch.cat([same[:h], diff[:h]])
    t = max(cands.tolist(), key=lambda c: accuracy(c, same[:h], diff[:h]))
    return dict(accuracy=accuracy(t, same[h:], diff[h:]), threshold=t, same_cos=same.mean().item(),
                different_cos=diff.mean().item())


@torch.no_grad()
def generator_fidelity(G, D, n=256, Fl=None):
    """The generator's samples (truncation 1) against the heads their latents name, read by E_flame D: mean
    pose error (degrees) and the ratio of the yaw spreads (std) of samples and of renders."""
    Fl = head.flame_head() if Fl is None else Fl
    z = torch.randn(n, sample.Z_DIM, generator=torch.Generator().manual_seed(HELD_OUT + 2))
    img = torch.cat([sm.generate(G, z[i:i + 64])[0] for i in range(0, n, 64)])
    ident, view = sample.from_z(z)
    rend, _ = sample.render_views(Fl, ident, view)
    p_gen, p_rend = _encode(D, img), _encode(D, rend.float())
    e_gen, e_rend = _deg(p_gen["pose"][:, :3]), _deg(p_rend["pose"][:, :3])
    return dict(pose_deg=(e_gen - _deg(view["pose"][:, :3])).abs().mean().item(),
                yaw_spread=(e_gen[:, 0].std() / e_rend[:, 0].std()).item(),
                l1=(img - rend.float()).abs().mean().item(), images=img[:16], renders=rend[:16].float())
