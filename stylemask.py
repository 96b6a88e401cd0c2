"""StyleMask (Bounareli et al., FG 2023): face reenactment by masking and mixing StyleGAN2 style codes.

The model, and only the model, in paper order. Everything is a pure function over a flat
`dict[str, Tensor]` of parameters; tensor names are those of the rosinality-format checkpoint
StyleMask distributes (`style.{k}.weight`, `convs.{i}.conv.modulation.weight`, `noises.noise_{i}`,
...), so every tensor greps back to the official file.

    Glossary        shapes and names used throughout; the generator's architecture tables
    Mapping         Sect. III-A          rosinality `Generator.style`, NVlabs `MappingNetwork`
    Style space     Sect. III-A, Tab. VI StyleMask `encoder` (stylespace_utils.py), S of Wu et al.
    Synthesis       Sect. III-A          rosinality `Generator.forward`, StyleMask `decoder`
    Mask networks   Sect. III-B a, Fig. 7 StyleMask `MaskPredictor`, `Trainer.get_shifted_image`
    Reenact         Eq. 1                StyleMask `generate_new_stylespace`
    3DMM            Eq. 2                DECA `FLAME.py`, `lbs.py`; DECA's camera
    Losses          Eq. 3-8              StyleMask `trainer.py`, `run_trainer.py`

The style code is a first-class value: `styles(G, w)` gives the flat code s (B, D) in StyleSpace
order (conv, ToRGB, conv0_up, conv1, ToRGB, ...), `synthesis(G, s)` renders it. The W+ index of
each layer is the one the official generators use (rosinality and NVlabs agree): the ToRGB of a
block shares its w with the next block's up-sampling conv. (The W+ column of the paper's Table VI
differs from the code for the conv layers; the weights were trained with the code, so we follow it.)

Not here, by design: reading or writing files, default weights and seeded stand-ins (`weights/`),
the supervision networks (`facenets.py`, `e4e.py`, `fid.py`), images and command lines (`cli.py`).
"""
import math
from collections import namedtuple

import torch
import torch.nn.functional as F

import kernels

# --- Glossary ----------------------------------------------------------------------------------
# Shapes: B batch, C channels, H, W image size, D style dims (the width of s); L is one style layer's row.
# z (B, z_dim) latent, w (B, w_dim) or W+ (B, n_ws, w_dim), s (B, D) style code (all layers,
# StyleSpace order), s_s / s_t source / target codes, ds = Δs = s_s − s_t, m (B, D_ctrl) mask over
# the controlled channels, s_r reenacted code (Eq. 1). G generator parameters, M mask networks,
# Fl FLAME; `arch` is a generator's architecture (resolution, dims, channels), read off G's shapes.

SQRT2 = math.sqrt(2.0)
LR_MLP = 0.01  # equalized-lr multiplier of the mapping network (StyleGAN2's lr_mlp / lr_multiplier)


class StyleMaskError(ValueError):
    """A problem with the user's input (file, shape, value) that a one-line message explains."""


# --- Architectures: the official generator's shape tables ----------------------------------------

def stylegan2_channels(resolution, channel_multiplier=2):
    """Channels per resolution of the official StyleGAN2 generator (rosinality's `channels` table)."""
    table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier,
             128: 128 * channel_multiplier, 256: 64 * channel_multiplier,
             512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    return {r: c for r, c in table.items() if r <= resolution}


# Named model sizes, matched exactly by `architecture(G)`.
ARCHS = {
    "ffhq-1024": dict(resolution=1024, z_dim=512, w_dim=512, n_mlp=8, channels=stylegan2_channels(1024)),
    "ffhq-256": dict(resolution=256, z_dim=512, w_dim=512, n_mlp=8, channels=stylegan2_channels(256)),
    # The embedded default: the real architecture at 256×256 (so n = 12 controlled layers exist and
    # images have the size the supervision networks expect), with narrow channels and a short MLP.
    "tiny": dict(resolution=256, z_dim=32, w_dim=32, n_mlp=4,
                 channels={4: 32, 8: 32, 16: 32, 32: 32, 64: 16, 128: 16, 256: 8}),
}


def architecture(G):
    """The architecture of generator G, read off its tensor shapes (resolution, dims, channels)."""
    try:
        if G["style.1.weight"].ndim != 2:
            raise StyleMaskError(f"tensor 'style.1.weight' has shape {tuple(G['style.1.weight'].shape)}, "
                                 f"expected (w_dim, z_dim)")
        w_dim, z_dim = G["style.1.weight"].shape
        depth = n_mlp(G)
        channels = {4: G["input.input"].shape[1]}
        n_blocks = sum(1 for k in G if k.startswith("to_rgbs.") and k.endswith(".conv.weight"))
        for j in range(n_blocks):
            channels[8 * 2 ** j] = G[f"convs.{2 * j}.conv.weight"].shape[1]
    except KeyError as e:
        raise StyleMaskError(f"not a StyleGAN2 generator: tensor {e.args[0]!r} is missing") from None
    return dict(resolution=4 * 2 ** n_blocks, z_dim=int(z_dim), w_dim=int(w_dim), n_mlp=depth,
                channels={r: int(c) for r, c in channels.items()})


def arch_name(arch):
    """The ARCHS name of arch, or 'custom'."""
    return next((n for n, a in ARCHS.items() if a == arch), "custom")


def n_conv_layers(arch):
    """Number of conv (not ToRGB) layers: 17 for 1024×1024."""
    return 2 * int(math.log2(arch["resolution"])) - 3


# --- Mapping network -------------------------------------------------------------------------------

def mapping(G, z, truncation=1.0, w_avg=None):
    """z (B, z_dim) -> w (B, w_dim): pixel norm, n_mlp equalized FC + leaky ReLU, then truncation.

    Truncation moves w toward w_avg (default: the average latent stored in G, `latent_avg`):
    w = w_avg + truncation · (w − w_avg). StyleMask trains and evaluates with truncation 0.7.
    """
    x = z * torch.rsqrt(z.square().mean(1, keepdim=True) + 1e-8)  # PixelNorm
    for k in range(1, n_mlp(G) + 1):
        W, b = G[f"style.{k}.weight"], G[f"style.{k}.bias"]
        x = F.linear(x, W * (LR_MLP / math.sqrt(W.shape[1])))
        x = F.leaky_relu(x + b * LR_MLP, 0.2) * SQRT2  # fused bias + leaky ReLU with gain √2
    if truncation != 1.0:
        w_avg = G["latent_avg"] if w_avg is None else w_avg
        x = w_avg + truncation * (x - w_avg)
    return x


def n_mlp(G):
    """Depth of the mapping network of G."""
    return sum(1 for k in G if k.startswith("style.") and k.endswith(".weight"))


def mean_latent(G, n=4096, seed=0):
    """Average w over n seeded z samples (rosinality's `mean_latent`, made deterministic)."""
    z = torch.randn(n, G["style.1.weight"].shape[1], generator=torch.Generator().manual_seed(seed))
    return mapping(G, z.to(G["style.1.weight"])).mean(0)


# --- Style space S (Table VI) ----------------------------------------------------------------------

Layer = namedtuple("Layer", "name kind res w_index offset dim up")
Layer.__doc__ = """One style layer: official module name, 'conv' | 'torgb', resolution, W+ index,
offset and width of its slice of the flat code s, up-sampling factor (2 for conv0_up)."""


def _arch(G):
    """G's architecture; G may be a generator's parameters or already an architecture."""
    return G if "resolution" in G else architecture(G)


def style_layout(G):
    """The per-layer table of the flat style code (Table VI order); G is a generator or an architecture."""
    ch = _arch(G)["channels"]
    rows = [("conv1", "conv", 4, 0, ch[4], 1), ("to_rgb1", "torgb", 4, 1, ch[4], 1)]
    for j, r in enumerate(sorted(ch)[1:]):
        c_in = ch[r // 2]
        rows += [(f"convs.{2 * j}", "conv", r, 2 * j + 1, c_in, 2),    # conv0_up: widths of res r/2
                 (f"convs.{2 * j + 1}", "conv", r, 2 * j + 2, ch[r], 1),  # conv1
                 (f"to_rgbs.{j}", "torgb", r, 2 * j + 3, ch[r], 1)]     # shares w with next conv0_up
    layout, offset = [], 0
    for name, kind, res, w_index, dim, up in rows:
        layout.append(Layer(name, kind, res, w_index, offset, dim, up))
        offset += dim
    return layout


def n_ws(G):
    """Number of W+ vectors the generator reads: 18 for 1024×1024."""
    return style_layout(G)[-1].w_index + 1


def styles(G, w):
    """w (B, w_dim) or W+ (B, n_ws, w_dim) -> flat style code s (B, D): each layer's affine A."""
    layout = style_layout(G)
    if w.ndim == 2:
        w = w[:, None].expand(-1, layout[-1].w_index + 1, -1)
    if w.ndim != 3 or w.shape[1] != layout[-1].w_index + 1:
        raise StyleMaskError(f"styles: w must be (B, w_dim) or (B, {layout[-1].w_index + 1}, w_dim), "
                             f"got {tuple(w.shape)}")
    s = []
    for L in layout:
        A, b = G[f"{L.name}.conv.modulation.weight"], G[f"{L.name}.conv.modulation.bias"]
        s.append(F.linear(w[:, L.w_index], A * (1 / math.sqrt(A.shape[1])), b))  # (B, dim)
    return torch.cat(s, 1)


# --- Synthesis network ------------------------------------------------------------------------------

def _noise_inputs(G, noise, B, rng):
    """The per-conv-layer noise images: const buffers, fresh seeded draws, zeros or given tensors."""
    n = n_conv_layers(architecture(G))
    const = [G[f"noises.noise_{i}"] for i in range(n)]  # (1, 1, r, r)
    if noise == "const":
        return const
    if noise == "random":
        return [torch.randn((B, 1) + c.shape[2:], generator=rng).to(c) for c in const]
    if noise == "none":
        return [None] * n
    if isinstance(noise, (list, tuple)) and len(noise) == n:
        return list(noise)
    raise StyleMaskError(f"synthesis: noise must be 'const', 'random', 'none' or a list of {n} tensors")


def synthesis(G, s, noise="const", rng=None):
    """s (B, D) -> image (B, 3, H, W) in the official generator's value range (no clamping).

    The 'skip' architecture of config-f: per block a 2× up-sampling modulated conv, a modulated
    conv, and a ToRGB whose output is added to the up-sampled image of the previous block; each
    layer is one `kernels.layer` (reference, fast CPU or Triton: kernels/dispatch.py picks).
    noise: 'const' (the noise buffers in G, as StyleMask uses them), 'random' (drawn from the
    torch.Generator `rng`), 'none', or a list with one (B or 1, 1, r, r) tensor per conv layer.
    """
    layout = style_layout(G)
    D = layout[-1].offset + layout[-1].dim
    if s.ndim != 2 or s.shape[1] != D:
        raise StyleMaskError(f"synthesis: s must be (B, {D}) for this generator, got {tuple(s.shape)}")
    noises = _noise_inputs(G, noise, s.shape[0], rng)
    x = G["input.input"].expand(s.shape[0], -1, -1, -1)  # (B, C, 4, 4)
    return _layers(G, s, layout, noises, x).contiguous()  # (B, 3, H, W), NCHW


def _layers(G, s, layout, noises, x, img=None):
    """The synthesis loop from layout[0] on: one `kernels.layer` per style layer.

    On the fast CPU path, once a conv layer's activations outgrow its weights, each sample runs the
    remaining layers alone (kernels.runs_per_sample), so that every large layer modulates weights, not
    activations, and no batch is ever copied together.
    """
    clamp = float(G["conv_clamp"]) if "conv_clamp" in G else None  # NVlabs-converted files only
    for i, L in enumerate(layout):
        s_l = s[:, L.offset:L.offset + L.dim]  # (B, dim)
        weight = G[f"{L.name}.conv.weight"][0]  # (Cout, Cin, k, k)
        if L.kind == "conv" and kernels.runs_per_sample(x, weight, s_l):
            return torch.cat([_layers(G, s[b:b + 1], layout[i:], [_sample(n, b) for n in noises], x[b:b + 1],
                                      _sample(img, b)) for b in range(s.shape[0])])
        if L.kind == "conv":
            n, noises = noises[0], noises[1:]
            x = kernels.layer(x, weight, s_l, G[f"{L.name}.activate.bias"], up=L.up,
                              fir=G.get(f"{L.name}.conv.blur.kernel"), noise=n,
                              noise_strength=G[f"{L.name}.noise.weight"], clamp=clamp)  # (B, C, r, r)
        else:
            img = kernels.layer(x, weight, s_l, G[f"{L.name}.bias"].flatten(), rgb=True, img=img,
                                img_fir=G.get(f"{L.name}.upsample.kernel"), clamp=clamp)  # (B, 3, r, r)
    return img


def _sample(t, b):
    """Sample b of a batched tensor; None and shared (batch-1) tensors as they are."""
    return t if t is None or t.shape[0] == 1 else t[b:b + 1]


def generate(G, z, truncation=1.0, w_avg=None, noise="const", rng=None):
    """z (B, z_dim) -> (image (B, 3, H, W), s (B, D)): mapping, styles, synthesis in one call."""
    s = styles(G, mapping(G, z, truncation, w_avg))
    return synthesis(G, s, noise=noise, rng=rng), s


# --- Mask networks (Sect. III-B a, Supp. Fig. 7) -----------------------------------------------------
# M is a `Masks`: its kind and space are stated, and `params` holds the official `mask_net` tensors:
# network_{ii}.masknet.{0,2}.{weight,bias} per controlled layer for the per-layer kind (FC -> ReLU ->
# FC -> sigmoid, hidden width = layer width), or one such network `network_global.*` over all controlled
# channels for the global kind (the Table IV ablation).

Masks = namedtuple("Masks", "kind space dims params")
Masks.__doc__ = """Mask networks: kind 'per-layer' | 'global' (Table IV), space 'S' | 'W' (W+ codes, Table III),
dims the widths of the controlled layers in order ([512] * 10 + [256] * 2 for the paper's n = 12),
params the networks' tensors by their official names."""


def init_mask(G, n_layers=12, seed=0, kind="per-layer", space="S"):
    """Fresh mask networks for the first n_layers conv layers of G, initialised as officially.

    Official init: nn.Linear's default bias (uniform ±1/sqrt(fan_in)), weights re-drawn N(0, 0.01²).
    space="W" masks the first n_layers vectors of flattened W+ codes (B, n_ws·w_dim) instead (the
    Table III ablation).
    """
    if space == "W":
        dims = [_arch(G)["w_dim"]] * n_layers
        if not 1 <= n_layers <= n_ws(G):
            raise StyleMaskError(f"init_mask: n_layers must be in 1..{n_ws(G)} for W+ codes, got {n_layers}")
    elif space == "S":
        conv_dims = [L.dim for L in style_layout(G) if L.kind == "conv"]
        if not 1 <= n_layers <= len(conv_dims):
            raise StyleMaskError(f"init_mask: n_layers must be in 1..{len(conv_dims)} for this generator, got {n_layers}")
        dims = conv_dims[:n_layers]
    else:
        raise StyleMaskError(f"init_mask: space must be 'S' or 'W', got {space!r}")
    if kind not in ("per-layer", "global"):
        raise StyleMaskError(f"init_mask: kind must be 'per-layer' or 'global', got {kind!r}")
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for name, d in mask_networks(kind, dims):
        for fc in ("0", "2"):
            params[f"{name}.masknet.{fc}.weight"] = torch.randn(d, d, generator=gen) * 0.01
            params[f"{name}.masknet.{fc}.bias"] = (torch.rand(d, generator=gen) * 2 - 1) / math.sqrt(d)
    return Masks(kind, space, list(dims), params)


def mask_networks(kind, dims):
    """[(name, width)] of the networks of a mask of this kind over layers of these widths."""
    if kind == "global":
        return [("network_global", sum(dims))]
    return [(f"network_{i:02d}", d) for i, d in enumerate(dims)]


def ctrl_index(M):
    """Positions in the flat code of the channels the mask controls (D_ctrl,), in mask order.

    In S the controlled layers are the first n conv layers. In s each ToRGB follows an even-numbered
    conv (conv1 at 4×4, then every block's conv1) and has that conv's width, so the widths alone place
    them. In W the mask controls the first n vectors of the flattened W+ code.
    """
    if M.space == "W":
        return torch.arange(sum(M.dims))
    idx, offset = [], 0
    for i, d in enumerate(M.dims):
        idx.append(torch.arange(offset, offset + d))
        offset += d + (d if i % 2 == 0 else 0)  # skip the ToRGB after an even conv
    return torch.cat(idx)


def _mlp(P, name, x):
    """x (B, d) -> (B, d): FC -> ReLU -> FC -> sigmoid, the official MaskPredictor."""
    h = F.relu(F.linear(x, P[f"{name}.masknet.0.weight"], P[f"{name}.masknet.0.bias"]))
    return torch.sigmoid(F.linear(h, P[f"{name}.masknet.2.weight"], P[f"{name}.masknet.2.bias"]))


def mask(M, s_s, s_t):
    """m (B, D_ctrl) in (0, 1) from Δs = s_s − s_t: one network per controlled layer (or one global)."""
    ds = (s_s - s_t)[:, ctrl_index(M).to(s_s.device)]  # Δs on the controlled channels (B, D_ctrl)
    if M.kind == "global":
        return _mlp(M.params, "network_global", ds)
    return torch.cat([_mlp(M.params, f"network_{i:02d}", ds_i)
                      for i, ds_i in enumerate(torch.split(ds, M.dims, dim=1))], 1)


# --- Reenactment (Eq. 1) --------------------------------------------------------------------------

def reenact(s_s, s_t, M, alpha=1.0):
    """s_r = m ⊙ s_t + (1 − m) ⊙ s_s on the controlled channels; every other channel from s_s.

    The target lends head pose and expression (coarse and middle conv layers), the source keeps its
    identity. alpha scales how much of the target is taken, m -> alpha·m: 0 gives s_s, 1 the paper's
    Eq. 1 (our extension, not the paper's). For W-space masks s_s, s_t are flattened W+ codes (`code`).
    """
    if s_s.shape != s_t.shape or s_s.ndim != 2:
        raise StyleMaskError(f"reenact: s_s and s_t must both be (B, D), got {tuple(s_s.shape)} and {tuple(s_t.shape)}")
    idx = ctrl_index(M).to(s_s.device)
    if idx[-1] >= s_s.shape[1]:
        raise StyleMaskError(f"reenact: the mask controls channels up to {int(idx[-1]) + 1}, "
                             f"but the style code has only D = {s_s.shape[1]}: mask and generator differ")
    m = mask(M, s_s, s_t)  # (B, D_ctrl)
    if alpha != 1.0:
        m = alpha * m
    mixed = m * s_t[:, idx] + (1 - m) * s_s[:, idx]  # Eq. 1
    return s_s.index_copy(1, idx, mixed)


def cycle(M, s_s, s_r, s_t2):
    """Eq. 4: the recurrent cycle's two reenactments with a second target t2, (s_r1, s_r2): the source
    reenacted with t2, and the already reenacted s_r reenacted again with t2 (Eq. 5-7 compare them)."""
    return reenact(s_s, s_t2, M), reenact(s_r, s_t2, M)


def code(G, w, space):
    """w (B, w_dim) or W+ (B, n_ws, w_dim) -> the code a mask of this space mixes: s (B, D) in S, or
    the flattened W+ code (B, n_ws·w_dim) in W (the Table III ablation)."""
    if space not in ("S", "W"):
        raise StyleMaskError(f"code: space must be 'S' or 'W', got {space!r}")
    if space == "S":
        return styles(G, w)
    if w.ndim == 2:
        w = w[:, None].expand(-1, n_ws(G), -1)
    return w.reshape(w.shape[0], -1)


def code_to_s(G, c, space):
    """A code of `code(G, w, space)` -> the style code s (B, D) that synthesis renders."""
    if space not in ("S", "W"):
        raise StyleMaskError(f"code_to_s: space must be 'S' or 'W', got {space!r}")
    return c if space == "S" else styles(G, c.view(c.shape[0], n_ws(G), -1))


def reenact_w(G, w_s, w_t, M, alpha=1.0):
    """Latents w or W+ of source and target -> s_r (B, D): Eq. 1 in the mask's space (S, or W+)."""
    c_r = reenact(code(G, w_s, M.space), code(G, w_t, M.space), M, alpha)
    return code_to_s(G, c_r, M.space)


# --- 3DMM: FLAME shape composition (Eq. 2), articulation and landmarks ----------------------------
# FLAME (Li et al. 2017) as DECA drives it (decalib/models/FLAME.py, lbs.py). Tensors keep the names of
# FLAME's generic_model.pkl (v_template, shapedirs, posedirs, J_regressor, kintree_table, weights, f)
# and of DECA's landmark_embedding.npy (static_/dynamic_/full_lmk_faces_idx, ..._bary_coords).
# a_s (B, n_s) shape and a_e (B, n_e) expression coefficients (DECA: 100 and 50); pose (B, 6) is DECA's
# axis-angle global rotation (3) and jaw rotation (3); neck and eyes stay at rest, as in DECA.

FLAME_N_SHAPE = 300  # shapedirs columns: 300 shape components, then 100 expression components
DECA_SIZE = 224  # DECA's image size, once: its face crops (facenets) and its image space (project)
EYE_PAIRS = [(36, 39), (37, 41), (38, 40), (42, 45), (43, 47), (44, 46)]  # official calculate_eye_loss
MOUTH_PAIRS = [(48, 54), (49, 59), (50, 58), (51, 57), (52, 56), (53, 55), (60, 64), (61, 67), (62, 66), (63, 65)]


def shape_model(Fl, a_s, a_e):
    """Eq. 2: X = X̄ + U_s a_s + U_e a_e, the unposed FLAME mesh (B, V, 3)."""
    U = Fl["shapedirs"]  # (V, 3, 400)
    U_s, U_e = U[:, :, :a_s.shape[1]], U[:, :, FLAME_N_SHAPE:FLAME_N_SHAPE + a_e.shape[1]]
    return Fl["v_template"] + torch.einsum("bl,vkl->bvk", a_s, U_s) + torch.einsum("bl,vkl->bvk", a_e, U_e)


def rodrigues(aa):
    """Axis-angle (N, 3) -> rotation matrices (N, 3, 3), with DECA's epsilon inside the norm."""
    angle = torch.norm(aa + 1e-8, dim=1, keepdim=True)  # (N, 1)
    rx, ry, rz = torch.split(aa / angle, 1, dim=1)
    zeros = torch.zeros_like(rx)
    K = torch.cat([zeros, -rz, ry, rz, zeros, -rx, -ry, rx, zeros], 1).view(-1, 3, 3)  # cross-product matrix
    cos, sin = torch.cos(angle)[:, :, None], torch.sin(angle)[:, :, None]
    return torch.eye(3, dtype=aa.dtype, device=aa.device) + sin * K + (1 - cos) * torch.bmm(K, K)


def _parents(Fl):
    """Kinematic tree: parent joint of each joint (-1 for the root), from kintree_table."""
    parents = Fl["kintree_table"][0].long().clone()
    parents[0] = -1
    return parents.tolist()


def articulate(Fl, X, pose):
    """Pose the mesh X (B, V, 3) by linear blend skinning: global rotation and jaw (DECA's 6-d pose)."""
    B, V, _ = X.shape
    zeros = torch.zeros(B, 3, dtype=X.dtype, device=X.device)
    full_pose = torch.cat([pose[:, :3], zeros, pose[:, 3:], zeros, zeros], 1)  # global, neck, jaw, eyes (B, 15)
    R = rodrigues(full_pose.reshape(-1, 3)).view(B, -1, 3, 3)  # (B, J, 3, 3)
    J = torch.einsum("bvk,jv->bjk", X, Fl["J_regressor"])  # rest joints (B, J, 3)
    # pose-corrective blend shapes, driven by the non-root rotations
    posedirs = Fl["posedirs"].reshape(-1, Fl["posedirs"].shape[-1]).t()  # (36, V·3)
    eye = torch.eye(3, dtype=X.dtype, device=X.device)
    X = X + ((R[:, 1:] - eye).reshape(B, -1) @ posedirs).view(B, V, 3)
    # rigid transform of every joint along the chain, relative to its rest location
    parents = _parents(Fl)
    rel = J.clone()
    rel[:, 1:] = J[:, 1:] - J[:, parents[1:]]
    T_local = torch.cat([torch.cat([R, rel[..., None]], 3),
                         torch.tensor([0, 0, 0, 1.0], dtype=X.dtype, device=X.device).expand(B, R.shape[1], 1, 4)], 2)
    chain = [T_local[:, 0]]
    for j in range(1, len(parents)):
        chain.append(chain[parents[j]] @ T_local[:, j])
    T = torch.stack(chain, 1)  # (B, J, 4, 4) world transforms
    T = T - F.pad(T @ F.pad(J, [0, 1])[..., None], [3, 0])  # remove the rest-pose joint offset
    T = torch.einsum("vj,bjrc->bvrc", Fl["weights"], T)  # per-vertex blended transforms (B, V, 4, 4)
    return (T[..., :3, :3] @ X[..., None])[..., 0] + T[..., :3, 3]


def _lmk(X, faces, faces_idx, bary):
    """Landmarks by barycentric interpolation: faces_idx (B, L), bary (B, L, 3) -> (B, L, 3)."""
    tri = faces[faces_idx]  # (B, L, 3) vertex ids
    corners = torch.gather(X, 1, tri.reshape(X.shape[0], -1, 1).expand(-1, -1, 3)).view(*tri.shape, 3)  # (B, L, 3, 3)
    return torch.einsum("blfi,blf->bli", corners, bary)


def _contour_row(Fl, pose):
    """Row of DECA's dynamic-contour table for the head's yaw: 0..39 for ≥ 0°, 40..78 for < 0°."""
    B = pose.shape[0]
    zeros = torch.zeros(B, 3, dtype=pose.dtype, device=pose.device)
    R = rodrigues(torch.cat([zeros, pose[:, :3]], 0)).view(2, B, 3, 3)  # neck (at rest), then global
    rel = R[1] @ R[0]  # chain neck -> root, as FLAME._find_dynamic_lmk_idx_and_bcoords
    yaw = torch.atan2(-rel[:, 2, 0], torch.sqrt(rel[:, 0, 0] ** 2 + rel[:, 1, 0] ** 2))
    y = torch.round(torch.clamp(yaw * 180.0 / math.pi, max=39)).long()
    return torch.where(y < 0, torch.where(y < -39, torch.full_like(y, 78), 39 - y), y)


def flame(Fl, shape, exp, pose):
    """FLAME mesh and landmarks: dict(vertices (B, V, 3), landmarks2d (B, 68, 3), landmarks3d (B, 68, 3)).

    landmarks2d is DECA's 68-point set whose 17 jaw-contour points follow the head's yaw (the dynamic
    contour), still in 3-D before projection; landmarks3d uses the fixed full embedding.
    """
    X = articulate(Fl, shape_model(Fl, shape, exp), pose)
    B, faces = X.shape[0], Fl["f"].long()
    row = _contour_row(Fl, pose)
    idx = torch.cat([Fl["dynamic_lmk_faces_idx"].long()[row], Fl["static_lmk_faces_idx"].long().expand(B, -1)], 1)
    bary = torch.cat([Fl["dynamic_lmk_bary_coords"][row], Fl["static_lmk_bary_coords"].expand(B, -1, -1)], 1)
    full_idx = Fl["full_lmk_faces_idx"].long().reshape(1, -1).expand(B, -1)
    full_bary = Fl["full_lmk_bary_coords"].reshape(1, -1, 3).expand(B, -1, -1)
    return dict(vertices=X, landmarks2d=_lmk(X, faces, idx, bary.to(X.dtype)),
                landmarks3d=_lmk(X, faces, full_idx, full_bary.to(X.dtype)))


def project(points, cam, image_size=DECA_SIZE):
    """DECA's orthographic camera cam = (s, tx, ty): (B, N, 3) -> image space (B, N, 3), y down, in [0, size].

    x' = s·(x + tx), y' = −s·(y + ty), z' = −s·z, then every coordinate ·size/2 + size/2
    (decalib util.batch_orth_proj and DECA.decode); 2-D landmarks are the first two columns.
    """
    s, t = cam[:, None, :1], cam[:, None, 1:]
    p = s * torch.cat([points[..., :2] + t, points[..., 2:]], -1)
    p = p * torch.tensor([1.0, -1.0, -1.0], dtype=p.dtype, device=p.device)
    return p * (image_size / 2) + image_size / 2


def fixed_camera(B, dtype=torch.float32, device="cpu"):
    """The official trainer's camera for every loss shape: scale 8, no translation."""
    return torch.tensor([8.0, 0.0, 0.0], dtype=dtype, device=device).expand(B, 3)


def shape_and_landmarks(Fl, shape, exp, pose):
    """Projected vertices X (B, V, 3) and 2-D landmarks (B, 68, 2) under the fixed camera (DECA.decode)."""
    out = flame(Fl, shape, exp, pose)
    cam = fixed_camera(shape.shape[0], shape.dtype, shape.device)
    return project(out["vertices"], cam), project(out["landmarks2d"], cam)[..., :2]


def ground_truth_shape(Fl, p_s, p_t):
    """X_t^gt (Sect. III-B): the source's shape coefficients with the target's expression and pose."""
    return shape_and_landmarks(Fl, p_s["shape"], p_t["exp"], p_t["pose"])


# --- Losses (Eq. 3–8) ---------------------------------------------------------------------------------
# Official weights (run_trainer.py): lambda_x = lambda_shape = 1 on the shape, eye and mouth terms,
# lambda_id = 10. Shapes are DECA's projected vertices under the fixed camera; X_gt and the reference
# features are targets (no gradient), as in the official trainer.

LAMBDA_X, LAMBDA_ID = 1.0, 10.0


def loss_shape(X_gt, X_r):
    """L_x = ||X_r − X_t^gt||_1, averaged over vertices and coordinates (Eq. 3, official L1Loss)."""
    return (X_r - X_gt.detach()).abs().mean()


def _pair_distance_loss(l_gt, l_r, pairs):
    """Mean over landmark pairs of the L1 gap between |l[a] − l[b]| of ground truth and reenacted."""
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    d_gt, d_r = (l_gt[:, a] - l_gt[:, b]).abs().detach(), (l_r[:, a] - l_r[:, b]).abs()
    return (d_r - d_gt).abs().mean()  # equal-sized terms: the mean of the per-pair means


def loss_eye(l_gt, l_r):
    """Eye-opening term of the official trainer: distances between upper and lower eyelid landmarks."""
    return _pair_distance_loss(l_gt, l_r, EYE_PAIRS)


def loss_mouth(l_gt, l_r):
    """Mouth-opening term of the official trainer: distances across the outer and inner lips."""
    return _pair_distance_loss(l_gt, l_r, MOUTH_PAIRS)


def loss_id(f_r, f_s):
    """L_id = 1 − cos(F(I_r), F(I_s)), batch mean (ArcFace features; F(I_s) is the fixed reference)."""
    return (1 - F.cosine_similarity(f_r, f_s.detach(), dim=1, eps=1e-6)).mean()


def loss_r(X_gt, X_r, l_gt, l_r, f_r, f_s, lambda_x=LAMBDA_X, lambda_id=LAMBDA_ID, eye=True, mouth=True):
    """Eq. 3: L_r = λ_x L_x + λ_id L_id (+ the official eye and mouth terms, weighted by λ_x) -> (L, terms)."""
    terms = {"shape": lambda_x * loss_shape(X_gt, X_r), "id": lambda_id * loss_id(f_r, f_s)}
    if eye:
        terms["eye"] = lambda_x * loss_eye(l_gt, l_r)
    if mouth:
        terms["mouth"] = lambda_x * loss_mouth(l_gt, l_r)
    return sum(terms.values()), terms


def loss_cycle(X_gt, X_r1, X_r2, l_gt, l_r1, l_r2, f_s, f_r1, f_r2, lambda_x=LAMBDA_X, lambda_id=LAMBDA_ID,
               eye=True, mouth=True, paper_id=False):
    """Eq. 5–7: shape terms of I_r¹ and I_r² against X_t'^gt, identity terms against I_s -> (L, terms).

    The official trainer's identity part is L_id(I_r¹, I_s) + L_id(I_r², I_s); Eq. 7 also has the pair
    (I_r¹, I_r²), added with paper_id=True.
    """
    terms = {"shape": lambda_x * (loss_shape(X_gt, X_r1) + loss_shape(X_gt, X_r2)),
             "id": lambda_id * (loss_id(f_r1, f_s) + loss_id(f_r2, f_s))}
    if paper_id:
        terms["id"] = terms["id"] + lambda_id * (1 - F.cosine_similarity(f_r1, f_r2, dim=1, eps=1e-6)).mean()
    if eye:
        terms["eye"] = lambda_x * (loss_eye(l_gt, l_r1) + loss_eye(l_gt, l_r2))
    if mouth:
        terms["mouth"] = lambda_x * (loss_mouth(l_gt, l_r1) + loss_mouth(l_gt, l_r2))
    return sum(terms.values()), terms


def loss_total(L_r, L_cycle=None):
    """Eq. 8: L = L_r + L_cycle (L_cycle None when the cycle loss is off, the Table V ablation)."""
    return L_r if L_cycle is None else L_r + L_cycle
