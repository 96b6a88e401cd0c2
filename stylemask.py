"""StyleMask (Bounareli et al., FG 2023): face reenactment by masking and mixing StyleGAN2 style codes.

One readable module, in paper order. Everything is a pure function over a flat
`dict[str, Tensor]` read from safetensors; tensor names are those of the rosinality-format
checkpoint StyleMask distributes (`style.{k}.weight`, `convs.{i}.conv.modulation.weight`,
`noises.noise_{i}`, ...), so every tensor greps back to the official file.

    Glossary        shapes: B batch, C channels, H, W image size, D style dims, L style layers
    Mapping         Sect. III-A          rosinality `Generator.style`, NVlabs `MappingNetwork`
    Style space     Sect. III-A, Tab. VI StyleMask `encoder` (stylespace_utils.py), S of Wu et al.
    Synthesis       Sect. III-A          rosinality `Generator.forward`, StyleMask `decoder`
    Mask networks   Sect. III-B a, Fig. 7 StyleMask `MaskPredictor`, `Trainer.get_shifted_image`
    Reenact         Eq. 1                StyleMask `generate_new_stylespace`
    Loading         safetensors I/O, the default weights, the tiny embedded default

The style code is a first-class value: `styles(G, w)` gives the flat code s (B, D) in StyleSpace
order (conv, ToRGB, conv0_up, conv1, ToRGB, ...), `synthesis(G, s)` renders it. The W+ index of
each layer is the one the official generators use (rosinality and NVlabs agree): the ToRGB of a
block shares its w with the next block's up-sampling conv. (The W+ column of the paper's Table VI
differs from the code for the conv layers; the weights were trained with the code, so we follow it.)
"""
import json
import math
import os
from collections import namedtuple
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels

# --- Glossary ----------------------------------------------------------------------------------
# z (B, z_dim) latent, w (B, w_dim) or W+ (B, n_ws, w_dim), s (B, D) style code (all layers,
# StyleSpace order), s_s / s_t source / target codes, ds = Δs = s_s − s_t, m (B, D_ctrl) mask over
# the controlled channels, s_r reenacted code (Eq. 1).

SQRT2 = math.sqrt(2.0)
LR_MLP = 0.01  # equalized-lr multiplier of the mapping network (StyleGAN2's lr_mlp / lr_multiplier)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class StyleMaskError(ValueError):
    """A problem with the user's input (file, shape, value) that a one-line message explains."""


def stylegan2_channels(resolution, channel_multiplier=2):
    """Channels per resolution of the official StyleGAN2 generator (rosinality's `channels` table)."""
    table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier,
             128: 128 * channel_multiplier, 256: 64 * channel_multiplier,
             512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    return {r: c for r, c in table.items() if r <= resolution}


# Named model sizes, matched exactly by `config(G)`.
CONFIGS = {
    "ffhq-1024": dict(resolution=1024, z_dim=512, w_dim=512, n_mlp=8, channels=stylegan2_channels(1024)),
    "ffhq-256": dict(resolution=256, z_dim=512, w_dim=512, n_mlp=8, channels=stylegan2_channels(256)),
    # The embedded default: the real architecture at 256×256 (so n = 12 controlled layers exist and
    # images have the size the supervision networks expect), with narrow channels and a short MLP.
    "tiny": dict(resolution=256, z_dim=32, w_dim=32, n_mlp=4,
                 channels={4: 32, 8: 32, 16: 32, 32: 32, 64: 16, 128: 16, 256: 8}),
}


def config(G):
    """The architecture of generator G, read off its tensor shapes (resolution, dims, channels)."""
    try:
        w_dim, z_dim = G["style.1.weight"].shape
        n_mlp = config_n_mlp(G)
        channels = {4: G["input.input"].shape[1]}
        n_blocks = sum(1 for k in G if k.startswith("to_rgbs.") and k.endswith(".conv.weight"))
        for j in range(n_blocks):
            channels[8 * 2 ** j] = G[f"convs.{2 * j}.conv.weight"].shape[1]
    except KeyError as e:
        raise StyleMaskError(f"not a StyleGAN2 generator: tensor {e.args[0]!r} is missing") from None
    return dict(resolution=4 * 2 ** n_blocks, z_dim=int(z_dim), w_dim=int(w_dim), n_mlp=n_mlp,
                channels={r: int(c) for r, c in channels.items()})


def config_name(cfg):
    """The CONFIGS name of cfg, or 'custom'."""
    return next((n for n, c in CONFIGS.items() if c == cfg), "custom")


def generator_shapes(cfg):
    """Every tensor of a generator with architecture cfg, name -> shape, in the official layout."""
    ch, w_dim = cfg["channels"], cfg["w_dim"]
    shapes = {}
    for k in range(1, cfg["n_mlp"] + 1):
        d_in = cfg["z_dim"] if k == 1 else w_dim
        shapes[f"style.{k}.weight"], shapes[f"style.{k}.bias"] = (w_dim, d_in), (w_dim,)
    shapes["input.input"] = (1, ch[4], 4, 4)
    for L in style_layout(cfg):
        c_out = 3 if L.kind == "torgb" else ch[L.res]
        k = 1 if L.kind == "torgb" else 3
        shapes[f"{L.name}.conv.weight"] = (1, c_out, L.dim, k, k)
        shapes[f"{L.name}.conv.modulation.weight"] = (L.dim, w_dim)
        shapes[f"{L.name}.conv.modulation.bias"] = (L.dim,)
        if L.kind == "conv":
            shapes[f"{L.name}.noise.weight"] = (1,)
            shapes[f"{L.name}.activate.bias"] = (c_out,)
            if L.up == 2:
                shapes[f"{L.name}.conv.blur.kernel"] = (4, 4)
        else:
            shapes[f"{L.name}.bias"] = (1, 3, 1, 1)
            if L.res > 4:
                shapes[f"{L.name}.upsample.kernel"] = (4, 4)
    for i in range(n_conv_layers(cfg)):
        r = 2 ** ((i + 5) // 2)  # rosinality: noise_i sits at resolution 2^((i + 5) // 2)
        shapes[f"noises.noise_{i}"] = (1, 1, r, r)
    shapes["latent_avg"] = (w_dim,)
    return shapes


def n_conv_layers(cfg):
    """Number of conv (not ToRGB) layers: 17 for 1024×1024."""
    return 2 * int(math.log2(cfg["resolution"])) - 3


# --- Mapping network -------------------------------------------------------------------------------

def mapping(G, z, truncation=1.0, w_avg=None):
    """z (B, z_dim) -> w (B, w_dim): pixel norm, n_mlp equalized FC + leaky ReLU, then truncation.

    Truncation moves w toward w_avg (default: the average latent stored in G, `latent_avg`):
    w = w_avg + truncation · (w − w_avg). StyleMask trains and evaluates with truncation 0.7.
    """
    x = z * torch.rsqrt(z.square().mean(1, keepdim=True) + 1e-8)  # PixelNorm
    for k in range(1, config_n_mlp(G) + 1):
        W, b = G[f"style.{k}.weight"], G[f"style.{k}.bias"]
        x = F.linear(x, W * (LR_MLP / math.sqrt(W.shape[1])))
        x = F.leaky_relu(x + b * LR_MLP, 0.2) * SQRT2  # fused bias + leaky ReLU with gain √2
    if truncation != 1.0:
        w_avg = G["latent_avg"] if w_avg is None else w_avg
        x = w_avg + truncation * (x - w_avg)
    return x


def config_n_mlp(G):
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


def style_layout(G):
    """The per-layer table of the flat style code (Table VI order); G is a generator or a config."""
    cfg = G if "resolution" in G else config(G)
    ch = cfg["channels"]
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

def _noise_inputs(G, noise, B, generator):
    """The per-conv-layer noise images: const buffers, fresh seeded draws, zeros or given tensors."""
    n = n_conv_layers(config(G))
    const = [G[f"noises.noise_{i}"] for i in range(n)]  # (1, 1, r, r)
    if noise == "const":
        return const
    if noise == "random":
        return [torch.randn((B, 1) + c.shape[2:], generator=generator).to(c) for c in const]
    if noise == "none":
        return [None] * n
    if isinstance(noise, (list, tuple)) and len(noise) == n:
        return list(noise)
    raise StyleMaskError(f"synthesis: noise must be 'const', 'random', 'none' or a list of {n} tensors")


def synthesis(G, s, noise="const", generator=None):
    """s (B, D) -> image (B, 3, H, W) in the official generator's value range (no clamping).

    The 'skip' architecture of config-f: per block a 2× up-sampling modulated conv, a modulated
    conv, and a ToRGB whose output is added to the up-sampled image of the previous block.
    noise: 'const' (the noise buffers in G, as StyleMask uses them), 'random' (drawn from
    `generator`), 'none', or a list with one (B or 1, 1, r, r) tensor per conv layer.
    """
    layout = style_layout(G)
    D = layout[-1].offset + layout[-1].dim
    if s.ndim != 2 or s.shape[1] != D:
        raise StyleMaskError(f"synthesis: s must be (B, {D}) for this generator, got {tuple(s.shape)}")
    noises = iter(_noise_inputs(G, noise, s.shape[0], generator))
    clamp = float(G["conv_clamp"]) if "conv_clamp" in G else None  # NVlabs-converted files only
    x = G["input.input"].expand(s.shape[0], -1, -1, -1)  # (B, C, 4, 4)
    img = None
    for L in layout:
        s_l = s[:, L.offset:L.offset + L.dim]  # (B, dim)
        weight = G[f"{L.name}.conv.weight"][0]  # (Cout, Cin, k, k)
        weight = weight * (1 / math.sqrt(weight[0].numel()))  # equalized-lr scale 1/sqrt(Cin·k·k)
        if L.kind == "conv":
            x = kernels.modconv(x, weight, s_l, demodulate=True, up=L.up,
                                fir=G.get(f"{L.name}.conv.blur.kernel"))  # (B, C, r, r)
            n = next(noises)
            if n is not None:
                x = x + G[f"{L.name}.noise.weight"] * n
            x = F.leaky_relu(x + G[f"{L.name}.activate.bias"][None, :, None, None], 0.2) * SQRT2
            if clamp is not None:
                x = x.clamp(-clamp, clamp)
        else:
            y = kernels.modconv(x, weight, s_l, demodulate=False) + G[f"{L.name}.bias"]  # (B, 3, r, r)
            if clamp is not None:
                y = y.clamp(-clamp, clamp)
            if img is not None:  # up-sample the running image 2× with the [1,3,3,1] filter
                y = y + kernels.upfirdn2d(img, G[f"{L.name}.upsample.kernel"], up=2, pad=(2, 1, 2, 1))
            img = y
    return img


def generate(G, z, truncation=1.0, w_avg=None, noise="const", generator=None):
    """z (B, z_dim) -> (image (B, 3, H, W), s (B, D)): mapping, styles, synthesis in one call."""
    s = styles(G, mapping(G, z, truncation, w_avg))
    return synthesis(G, s, noise=noise, generator=generator), s


# --- Mask networks (Sect. III-B a, Supp. Fig. 7) -----------------------------------------------------
# Parameters use the official `mask_net` names: network_{ii}.masknet.{0,2}.{weight,bias} for the
# per-layer kind (FC -> ReLU -> FC -> sigmoid, hidden width = layer width). The global kind (Table IV
# ablation) is one such network over all controlled channels, `network_global.*`, plus `ctrl_dims`,
# the widths of the controlled layers (needed to find them in s).

def init_mask(G, n_layers=12, seed=0, kind="per-layer"):
    """Fresh mask networks for the first n_layers conv layers of G, initialised as officially.

    Official init: nn.Linear's default bias (uniform ±1/sqrt(fan_in)), weights re-drawn N(0, 0.01²).
    """
    conv_dims = [L.dim for L in style_layout(G) if L.kind == "conv"]
    if not 1 <= n_layers <= len(conv_dims):
        raise StyleMaskError(f"init_mask: n_layers must be in 1..{len(conv_dims)} for this generator, got {n_layers}")
    dims = conv_dims[:n_layers]
    gen = torch.Generator().manual_seed(seed)
    if kind == "per-layer":
        nets = [(f"network_{i:02d}", d) for i, d in enumerate(dims)]
    elif kind == "global":
        nets = [("network_global", sum(dims))]
    else:
        raise StyleMaskError(f"init_mask: kind must be 'per-layer' or 'global', got {kind!r}")
    M = {}
    for name, d in nets:
        for fc in ("0", "2"):
            M[f"{name}.masknet.{fc}.weight"] = torch.randn(d, d, generator=gen) * 0.01
            M[f"{name}.masknet.{fc}.bias"] = (torch.rand(d, generator=gen) * 2 - 1) / math.sqrt(d)
    if kind == "global":
        M["ctrl_dims"] = torch.tensor(dims, dtype=torch.int64)
    return M


def mask_dims(M):
    """Widths of the controlled conv layers, in order: [512] * 10 + [256] * 2 for the paper's n = 12."""
    if "ctrl_dims" in M:
        return [int(d) for d in M["ctrl_dims"]]
    n = sum(1 for k in M if k.endswith(".masknet.2.bias"))
    return [M[f"network_{i:02d}.masknet.2.bias"].shape[0] for i in range(n)]


def ctrl_index(M):
    """Positions in the flat code s of the channels the mask controls (D_ctrl,), in mask order.

    The controlled layers are the first n conv layers. In s each ToRGB follows an even-numbered conv
    (conv1 at 4×4, then every block's conv1) and has that conv's width, so the widths alone place them.
    """
    idx, offset = [], 0
    for i, d in enumerate(mask_dims(M)):
        idx.append(torch.arange(offset, offset + d))
        offset += d + (d if i % 2 == 0 else 0)  # skip the ToRGB after an even conv
    return torch.cat(idx)


def _mlp(M, name, x):
    """x (B, d) -> (B, d): FC -> ReLU -> FC -> sigmoid, the official MaskPredictor."""
    h = F.relu(F.linear(x, M[f"{name}.masknet.0.weight"], M[f"{name}.masknet.0.bias"]))
    return torch.sigmoid(F.linear(h, M[f"{name}.masknet.2.weight"], M[f"{name}.masknet.2.bias"]))


def mask(M, s_s, s_t):
    """m (B, D_ctrl) in (0, 1) from Δs = s_s − s_t: one network per controlled layer (or one global)."""
    ds = (s_s - s_t)[:, ctrl_index(M).to(s_s.device)]  # Δs on the controlled channels (B, D_ctrl)
    if "network_global.masknet.0.weight" in M:
        return _mlp(M, "network_global", ds)
    return torch.cat([_mlp(M, f"network_{i:02d}", ds_i)
                      for i, ds_i in enumerate(torch.split(ds, mask_dims(M), dim=1))], 1)


# --- Reenactment (Eq. 1) --------------------------------------------------------------------------

def reenact(s_s, s_t, M=None):
    """s_r = m ⊙ s_t + (1 − m) ⊙ s_s on the controlled channels; every other channel from s_s.

    The target lends head pose and expression (coarse and middle conv layers), the source keeps its
    identity. M=None uses the default mask weights (`default_mask()`).
    """
    if s_s.shape != s_t.shape or s_s.ndim != 2:
        raise StyleMaskError(f"reenact: s_s and s_t must both be (B, D), got {tuple(s_s.shape)} and {tuple(s_t.shape)}")
    M = default_mask(s_s.shape[1]) if M is None else M
    idx = ctrl_index(M).to(s_s.device)
    if idx[-1] >= s_s.shape[1]:
        raise StyleMaskError(f"reenact: the mask controls channels up to {int(idx[-1]) + 1}, "
                             f"but the style code has only D = {s_s.shape[1]}: mask and generator differ")
    m = mask(M, s_s, s_t)  # (B, D_ctrl)
    mixed = m * s_t[:, idx] + (1 - m) * s_s[:, idx]  # Eq. 1
    return s_s.index_copy(1, idx, mixed)


# --- Loading, saving, and the embedded default ------------------------------------------------------

def save(params, path, kind=None, **meta):
    """Write params to a safetensors file atomically, with a metadata header describing the model."""
    from safetensors.torch import save_file
    if kind is None:
        kind = "generator" if "style.1.weight" in params else "masknet"
    header = {"stylemask": kind, **{k: str(v) for k, v in meta.items()}}
    if kind == "generator":
        header["config"] = json.dumps(config(params))
    elif kind == "masknet":
        header["ctrl_dims"] = json.dumps(mask_dims(params))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, str(tmp), metadata=header)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load(path, device="cpu"):
    """Read a generator or mask file written by `save` / weights/convert.py, checking it fully."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise StyleMaskError(f"{path}: no such file; convert the official weights with "
                             f"`python weights/convert.py SRC {path}` (see weights/README.md)")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            params = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise StyleMaskError(f"{path}: not a readable safetensors file ({e}); re-convert it with "
                             f"weights/convert.py") from None
    kind = meta.get("stylemask") or ("generator" if "style.1.weight" in params else "masknet")
    check = check_generator if kind == "generator" else check_mask
    try:
        check(params)
    except StyleMaskError as e:
        raise StyleMaskError(f"{path}: {e}") from None
    return params


def check_generator(G):
    """Raise StyleMaskError unless G has exactly the tensors and shapes of its architecture."""
    cfg = config(G)
    want = generator_shapes(cfg)
    missing = [k for k in want if k not in G]
    if missing:
        raise StyleMaskError(f"not a complete generator: {len(missing)} tensors missing, e.g. {missing[0]!r}")
    for k, shape in want.items():
        if tuple(G[k].shape) != shape:
            raise StyleMaskError(f"tensor {k!r} has shape {tuple(G[k].shape)}, expected {shape}")
    for k, v in G.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise StyleMaskError(f"tensor {k!r} contains NaN or Inf: the file is damaged")


def check_mask(M, G=None):
    """Raise StyleMaskError unless M is a consistent per-layer or global mask network (fitting G, if given)."""
    dims = mask_dims(M) if any(k.endswith(".masknet.2.bias") for k in M) else []
    if not dims:
        raise StyleMaskError("not a mask network: no network_*.masknet.* tensors")
    nets = [("network_global", sum(dims))] if "ctrl_dims" in M else \
        [(f"network_{i:02d}", d) for i, d in enumerate(dims)]
    for name, d in nets:
        for fc in ("0", "2"):
            for part, shape in (("weight", (d, d)), ("bias", (d,))):
                k = f"{name}.masknet.{fc}.{part}"
                if k not in M or tuple(M[k].shape) != shape:
                    raise StyleMaskError(f"mask tensor {k!r} missing or not of shape {shape}")
                if not torch.isfinite(M[k]).all():
                    raise StyleMaskError(f"mask tensor {k!r} contains NaN or Inf: the file is damaged")
    if G is not None:
        conv_dims = [L.dim for L in style_layout(G) if L.kind == "conv"]
        if dims != conv_dims[:len(dims)]:
            raise StyleMaskError(f"the mask networks (layer widths {dims[:3]}...) do not fit this generator "
                                 f"(conv widths {conv_dims[:3]}...): use the mask trained for it")


def random_generator(cfg, seed=0):
    """A generator of architecture cfg with deterministic random weights in the official layout.

    Weights N(0, 1) as the official init (mapping weights / lr_mlp); biases, noise strengths and
    style offsets are drawn small but non-zero so that every tensor matters in tests.
    """
    gen = torch.Generator().manual_seed(seed)
    G = {}
    for k, shape in generator_shapes(cfg).items():
        if k.endswith("blur.kernel") or k.endswith("upsample.kernel"):
            f = torch.tensor([1.0, 3.0, 3.0, 1.0])
            G[k] = torch.outer(f, f) / 64 * 4  # [1,3,3,1] ⊗ [1,3,3,1], normalised, × up² (rosinality)
        elif k == "latent_avg":
            continue
        elif k.endswith(".bias") or k.endswith("noise.weight"):
            G[k] = 0.1 * torch.randn(shape, generator=gen) + (1.0 if "modulation" in k else 0.0)
        else:
            G[k] = torch.randn(shape, generator=gen) / (LR_MLP if k.startswith("style.") else 1.0)
    G["latent_avg"] = mean_latent(G, seed=seed)
    return G


def tiny_generator(seed=0):
    """The embedded default generator: CONFIGS['tiny'] with random weights, for CPU runs and tests."""
    return random_generator(CONFIGS["tiny"], seed)


def default_generator(path=None, say=print):
    """(G, is_tiny): the generator at path; with no path weights/generator.safetensors, else the tiny default."""
    if path:  # asked for by name: it must be there
        return load(path), False
    path = WEIGHTS_DIR / "generator.safetensors"
    if path.is_file():
        return load(path), False
    say(f"note: {path} not found: using the TINY random default generator (a pipeline check, not "
        f"faces). For real weights: python weights/convert.py stylegan2-ffhq-config-f.pt {path}")
    return tiny_generator(), True


_DEFAULT_MASKS = {}


def default_mask(D=None, path=None):
    """The default mask networks: weights/masknet.safetensors when present, else the tiny default's.

    D, the width of the style codes they will see, is checked so that a real-size code never meets
    the tiny mask silently.
    """
    path = Path(path) if path else WEIGHTS_DIR / "masknet.safetensors"
    if path not in _DEFAULT_MASKS:
        _DEFAULT_MASKS[path] = load(path) if path.is_file() else init_mask(CONFIGS["tiny"])
    M = _DEFAULT_MASKS[path]
    tiny_D = sum(L.dim for L in style_layout(CONFIGS["tiny"]))
    if D is not None and not path.is_file() and D != tiny_D:
        raise StyleMaskError(f"no mask weights for style codes of width D = {D} ({path} not found); convert "
                             f"StyleMask's checkpoint: python weights/convert.py mask_net.pt {path}")
    return M


# --- Images --------------------------------------------------------------------------------------

def to_uint8(img):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as the official save_image(normalize, range=(-1, 1))."""
    x = (img.detach().float().clamp(-1, 1) + 1) * 127.5
    return (x + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def image_grid(columns, size=None):
    """Columns of (B, 3, H, W) images -> one (B·H, n·W, 3) uint8 grid: row b shows sample b of every column."""
    if size is not None:
        columns = [F.adaptive_avg_pool2d(c, size) if c.shape[-1] != size else c for c in columns]
    cells = torch.stack([to_uint8(c) for c in columns], 1)  # (B, n, H, W, 3)
    B, n, H, W, _ = cells.shape
    return cells.permute(0, 2, 1, 3, 4).reshape(B * H, n * W, 3)


def write_png(path, img):
    """Write an (H, W, 3) uint8 image as an 8-bit RGB PNG, atomically (zlib only, no image library)."""
    import struct
    import zlib

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    H, W, _ = img.shape
    raw = torch.cat([torch.zeros(H, 1, dtype=torch.uint8), img.reshape(H, W * 3)], 1)  # filter 0 per row
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw.numpy().tobytes(), 6)) + chunk(b"IEND", b""))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(png)
    os.replace(tmp, path)
