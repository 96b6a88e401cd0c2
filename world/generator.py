"""The world's StyleGAN2 generator: trained to render, from its latent z, the head `world.sample.from_z` reads
off z, so that every generated image has known parameters.

Why reconstruction and not a GAN: on 2 CPU cores a GAN at 64×64 does not converge in the build's time, and
its samples would have no labels. Here z fixes the head exactly (`from_z`), and the generator learns the
deterministic map z -> render by an L1 loss (`loss`): a generated image's pose, expression, shape and
appearance are the ones z names, which is what `eval.py` checks against. The price: regression blurs what
it has not yet placed exactly (small features first), so it needs many steps. Two things make them count:
the mapping network starts fitted to put the head's parameters in w's first coordinates (`fit_mapping`),
and the loss weighs the facial features 5× (`face_weight`). L1 still leaves out what moves few pixels, the
expressions, so a second phase (`expression_job`) trains on pairs of heads that differ in expression alone.

Style mixing, structured: each step draws two latents and, per group of parameters, which of them it comes
from; every style layer reads the w of its group's latent (`BANDS`: pose at 4–8 px, shape at 16 px,
expression at 32 px, appearance at 64 px and in every ToRGB), and the target is the render of the mixed
parameters. So, as in the real StyleGAN2 on faces (coarse layers hold pose, fine ones colour), each style
layer controls one kind of attribute; the mask networks must find which (ideal m: 1 on the pose and
expression layers, 0 on the others), and the ToRGB layers, which StyleMask never mixes, carry identity.

Runs as a stage of `python build_world.py`; the architecture is `ARCH`, the result a generator file in
the official layout (rosinality's names), with the noise strengths 0.
"""
import math

import torch
import torch.nn.functional as F

import stylemask as sm
from weights.defaults import random_generator
from world import fit, head, sample

ARCH = dict(resolution=64, z_dim=sample.Z_DIM, w_dim=128, n_mlp=4, channels={4: 128, 8: 128, 16: 64, 32: 48, 64: 24})
BANDS = {4: "pose", 8: "pose", 16: "shape", 32: "expression", 64: "appearance"}  # conv layers by resolution
ORDER = ("pose", "shape", "expression", "appearance")


def n_conv():
    """The number of conv layers of ARCH (9): the mask networks control all of them."""
    return sm.n_conv_layers(ARCH)


def band(L):
    """The parameter group style layer L controls: by resolution for convs; ToRGB layers: appearance."""
    return "appearance" if L.kind == "torgb" else BANDS[L.res]


def init(seed=0, mapping_steps=1500):
    """A fresh generator of ARCH: the official initialisation (`random_generator`), noise strengths 0, and
    the mapping network fitted to name the head (`fit_mapping`)."""
    G = random_generator(ARCH, seed)
    for k in G:
        if k.endswith("noise.weight"):
            G[k] = torch.zeros_like(G[k])
    return fit_mapping(G, mapping_steps, seed) if mapping_steps else G


N_PARAMS = sample.GROUPS["appearance"].stop   # the coordinates of z that name the head


def named(z):
    """z (B, Z_DIM) -> (B, N_PARAMS): the head's parameters as the mapping network is fitted to give them, each
    uniform in [−√3, √3] (unit spread)."""
    return math.sqrt(3) * (2 * sample.uniforms(z)[:, :N_PARAMS].float() - 1)


def fit_mapping(G, steps, seed=0, batch=512, lr=3.0):
    """G with its mapping network fitted so that w's first N_PARAMS coordinates are the head's parameters
    (`named`; the others stay free): the synthesis layers' affine maps then read every parameter off w
    linearly from the first step. A random mapping network scrambles them (only ~65% of their variance is
    linear in w) and, at its equalised learning rate, unscrambles them too slowly for the build. Adam, the
    rate decaying to 0; about 20 s."""
    names = [k for k in G if k.startswith("style.")]
    P = {k: G[k].clone().requires_grad_(True) for k in names}
    opt = torch.optim.Adam(P.values(), lr=lr, betas=(0.9, 0.99))
    rng = torch.Generator().manual_seed(seed + 101)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * (1 - step / steps)
        z = torch.randn(batch, sample.Z_DIM, generator=rng)
        loss = (sm.mapping(P, z)[:, :N_PARAMS] - named(z)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {**G, **{k: v.detach() for k, v in P.items()}}


def mixed_styles(G, w, pick):
    """w (2, B, w_dim) two latents' w, pick (B, len(ORDER)) 0/1 -> s (B, D): every style layer from the w of
    the latent its band picks."""
    s = []
    for L in sm.style_layout(G):
        g = pick[:, ORDER.index(band(L))]                                    # (B,)
        w_l = torch.where(g[:, None].bool(), w[1], w[0])                     # (B, w_dim)
        A, b = G[f"{L.name}.conv.modulation.weight"], G[f"{L.name}.conv.modulation.bias"]
        s.append(F.linear(w_l, A * (1 / math.sqrt(A.shape[1])), b))
    return torch.cat(s, 1)


def mixed_uniforms(z, pick):
    """z (2, B, Z_DIM), pick (B, len(ORDER)) -> the uniforms (B, Z_DIM) of the mixed head: each group's
    slice from the latent it picks."""
    u = sample.uniforms(z.reshape(-1, z.shape[-1])).reshape(z.shape)
    out = u[0].clone()
    for i, g in enumerate(ORDER):
        sl = sample.GROUPS[g]
        out[:, sl] = torch.where(pick[:, i:i + 1].bool(), u[1][:, sl], u[0][:, sl])
    return out


def mixed_latents(seed, step, batch, unmixed):
    """Two latents per image z (2, B, Z_DIM) and which one each group comes from, pick (B, len(ORDER)), from
    (seed, step) alone; the first `unmixed` images take every group from their first latent."""
    rng = torch.Generator().manual_seed(seed * 1_000_003 + step)
    z = torch.randn(2, batch, sample.Z_DIM, generator=rng)
    pick = (torch.rand(batch, len(ORDER), generator=rng) < 0.5).long()
    pick[:unmixed] = 0
    return z, pick


def generate(G, z, pick):
    """Images (B, 3, H, W) of two latents per image z (2, B, Z_DIM), mixed by pick (`mixed_styles`)."""
    w = sm.mapping(G, z.reshape(-1, z.shape[-1])).reshape(2, z.shape[1], -1)
    return sm.synthesis(G, mixed_styles(G, w, pick))


def draw(seed, step, batch, Fl, size):
    """The data of one step, from (seed, step) alone: latents z (2, B, Z_DIM), picks (B, 4), target renders
    and their loss weights. A quarter of every batch is unmixed: plain samples, as eval draws them."""
    z, pick = mixed_latents(seed, step, batch, batch // 4)
    return (z, pick) + targets(z, pick, Fl, size)


def targets(z, pick, Fl, size):
    """The renders (B, 3, size, size) of the heads latents z (2, B, Z_DIM) mixed by pick (B, 4) name, and their
    loss weights (`face_weight`)."""
    ident, view = sample.from_uniforms(mixed_uniforms(z, pick))
    img, lmk = sample.render_views(Fl, ident, view, size)
    return img.float(), face_weight(lmk.float(), size)


FEATURES = slice(17, 68)   # the landmarks of brows, nose, eyes and lips (all but the jaw contour)
FEATURE_WEIGHT, FEATURE_SIGMA = 4.0, 2.0


def face_weight(lmk, size):
    """Landmarks (B, 68, 2) in pixels -> per-pixel loss weights (B, 1, size, size): 1, plus FEATURE_WEIGHT on
    the facial features (Gaussian bumps of FEATURE_SIGMA px around their landmarks, capped at 1). Eyes, brows
    and lips cover a few per cent of the pixels, so under a plain L1 they carry almost nothing and the
    generator leaves them out; weighted, they carry about 40% of it."""
    c = torch.arange(size, dtype=lmk.dtype) + 0.5                              # pixel centres
    p = lmk[:, FEATURES]                                                        # (B, K, 2)
    gx = torch.exp(-(c[None, None, :] - p[..., :1]) ** 2 / (2 * FEATURE_SIGMA ** 2))   # (B, K, size)
    gy = torch.exp(-(c[None, None, :] - p[..., 1:]) ** 2 / (2 * FEATURE_SIGMA ** 2))   # (B, K, size)
    bumps = torch.einsum("bky,bkx->byx", gy, gx).clamp(max=1)                  # (B, size, size)
    return (1 + FEATURE_WEIGHT * bumps)[:, None]


def image_loss(d, wt):
    """The face-weighted L1 of a generated-minus-rendered difference d (B, 3, H, W), weights wt (B, 1, H, W),
    over a pyramid (full, 1/2, 1/4, 1/8 resolution: the coarse levels still overlap where a feature is a few
    pixels off, so they pull it into place), plus the weighted L1 of its horizontal and vertical differences
    (edges: the small features, eyes and lips, that plain L1 blurs)."""
    def wl1(x, wt):
        return (x.abs() * wt).mean() / wt.mean()
    total = wl1(d, wt) + wl1(d[..., 1:, :] - d[..., :-1, :], wt[..., 1:, :]) \
        + wl1(d[..., :, 1:] - d[..., :, :-1], wt[..., :, 1:])
    for _ in range(3):
        d, wt = F.avg_pool2d(d, 2), F.avg_pool2d(wt, 2)
        total = total + wl1(d, wt)
    return total


def loss(G, data):
    """`image_loss` between the generated and the rendered images."""
    z, pick, target, wt = data
    d = generate(G, z, pick) - target
    return image_loss(d, wt), {"l1": d.abs().mean().item()}


def _rates(G, lr, mapping_lr):
    """The learning rate of each trained tensor: the mapping network's (style.*) and the synthesis network's;
    the noise strengths (kept 0), the blur kernels and latent_avg do not train."""
    return {k: (mapping_lr if k.startswith("style.") else lr) for k in G
            if not (k.endswith("noise.weight") or k.endswith(".kernel") or k.startswith("noises.") or k == "latent_avg")}


def job(steps, seed=0, batch=16, lr=2e-3, mapping_lr=2e-3 / sm.LR_MLP, mapping_steps=1500):
    """The generator's training Job. The mapping network's weights are stored divided by LR_MLP (equalised
    learning rate, as officially: about 1/LR_MLP times larger than the synthesis weights), so its rate is
    raised by 1/LR_MLP to move it as fast, relatively, as synthesis."""
    G = init(seed, mapping_steps)
    Fl = head.flame_head(torch.float32)
    rates = _rates(G, lr, mapping_lr)
    return fit.Job("generator", G, rates, lambda k: draw(seed, k, batch, Fl, ARCH["resolution"]), loss, steps,
                   betas=(0.9, 0.99), decay=lambda k: min(1.0, 2.0 * (1 - k / steps) + 0.05))


def finish(G, seed=0):
    """The trained parameters as a generator file's tensors: latent_avg recomputed, everything contiguous."""
    G = {k: v.detach().clone().contiguous() for k, v in G.items()}
    G["latent_avg"] = sm.mean_latent(G, seed=seed)
    return G


# --- The expression phase --------------------------------------------------------------------------------
# Under the L1 of `loss` the generator learns pose, shape and appearance, which move hundreds of pixels, but
# hardly the expressions, which move a few dozen by a pixel or two: after the 12,000 steps its images change
# with the expression latent by 0.34 of what the renders change, and in other directions (cosine 0.34), so
# the encoder reads generated expressions weakly and StyleMask cannot be seen to transfer them. This phase
# trains on pairs of heads that differ in their expression alone, and weighs the squared error of the pair's
# difference (the generated change against the rendered one): a mean-seeking loss, so a change the generator
# cannot yet place exactly is still drawn, blurred, rather than left out.

EXPRESSION_WEIGHT = 30.0


def draw_pairs(seed, step, batch, Fl, size):
    """As `draw`, but the second half of the batch is the first half's heads with the expression taken from
    their other latent: images i and i + batch/2 differ in their expression alone."""
    z, pick = mixed_latents(seed, step, batch // 2, batch // 8)
    e = ORDER.index("expression")
    other = pick.clone()
    other[:, e] = 1 - other[:, e]
    z, pick = torch.cat([z, z], 1), torch.cat([pick, other])                    # (2, B, Z_DIM), (B, 4)
    return (z, pick) + targets(z, pick, Fl, size)


def pair_loss(G, data, weight=EXPRESSION_WEIGHT):
    """`image_loss` on every image, plus weight × the face-weighted squared error of each pair's change
    (`draw_pairs`) at full, 1/2 and 1/4 resolution."""
    z, pick, target, wt = data
    d = generate(G, z, pick) - target
    h = len(d) // 2
    change, wc = d[:h] - d[h:], torch.maximum(wt[:h], wt[h:])   # generated change minus rendered change
    pair = 0
    for level in range(3):
        if level:
            change, wc = F.avg_pool2d(change, 2), F.avg_pool2d(wc, 2)
        pair = pair + (change.square() * wc).mean() / wc.mean()
    return image_loss(d, wt) + weight * pair, {"l1": d.abs().mean().item(), "pair": pair.item()}


def expression_job(G, steps, seed=0, batch=16, lr=2e-3, weight=EXPRESSION_WEIGHT):
    """The expression phase's Job: the trained generator G, on expression pairs (`pair_loss`), at a rate decaying
    to 0."""
    Fl = head.flame_head(torch.float32)
    return fit.Job("expression", dict(G), _rates(G, lr, lr / sm.LR_MLP),
                   lambda k: draw_pairs(seed + 13, k, batch, Fl, ARCH["resolution"]),
                   lambda G, d: pair_loss(G, d, weight), steps, betas=(0.9, 0.99), decay=lambda k: 1 - k / steps)
