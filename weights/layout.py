"""The official checkpoint layouts, and the checks that hold every parameter file to them.

For each kind of parameters, the name and shape of every tensor as the official checkpoint has it
(`<kind>_shapes(arch)`), and `check_<kind>(P)`: raise a one-line StyleMaskError unless P is exactly
that, all finite. The architecture comes from the model modules (`sm.architecture`, `fn.arcface_arch`,
...), which read it off the shapes; this module only compares.

Not here: forward code (the model modules), reading files and default rules (`weights/__init__.py`).
"""
import math

import torch

import stylemask as sm
from e4e import E4E_COARSE, E4E_MIDDLE, E4E_SIZE, e4e_arch, e4e_taps
from facenets import ARCFACE_SIZE, DECA_CODE, arcface_arch, deca_arch, ir_se_strides
from fid import CONVS, FID_DIMS, N_CLASSES
from stylemask import StyleMaskError


def check_exact(P, want, what):
    """Raise StyleMaskError unless P has exactly the tensors in want, with their shapes, all finite."""
    missing = [k for k in want if k not in P]
    if missing:
        raise StyleMaskError(f"not a complete {what}: {len(missing)} tensors missing, e.g. {missing[0]!r}")
    extra = sorted(set(P) - set(want))
    if extra:
        raise StyleMaskError(f"unexpected tensor {extra[0]!r}: not a {what}")
    for k, shape in want.items():
        if tuple(P[k].shape) != shape:
            raise StyleMaskError(f"tensor {k!r} has shape {tuple(P[k].shape)}, expected {shape}")
        if P[k].is_floating_point() and not torch.isfinite(P[k]).all():
            raise StyleMaskError(f"tensor {k!r} contains NaN or Inf: the file is damaged")


def bn_shapes(name, c, affine=True):
    """The tensors of a BatchNorm over c channels (num_batches_tracked is dropped by the converter)."""
    shapes = {f"{name}.running_mean": (c,), f"{name}.running_var": (c,)}
    if affine:
        shapes.update({f"{name}.weight": (c,), f"{name}.bias": (c,)})
    return shapes


# --- StyleGAN2 generator (rosinality's names) --------------------------------------------------------

def generator_shapes(arch):
    """Every tensor of a generator with architecture arch, name -> shape, in the official layout."""
    ch, w_dim = arch["channels"], arch["w_dim"]
    shapes = {}
    for k in range(1, arch["n_mlp"] + 1):
        d_in = arch["z_dim"] if k == 1 else w_dim
        shapes[f"style.{k}.weight"], shapes[f"style.{k}.bias"] = (w_dim, d_in), (w_dim,)
    shapes["input.input"] = (1, ch[4], 4, 4)
    for L in sm.style_layout(arch):
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
    for i in range(sm.n_conv_layers(arch)):
        r = 2 ** ((i + 5) // 2)  # rosinality: noise_i sits at resolution 2^((i + 5) // 2)
        shapes[f"noises.noise_{i}"] = (1, 1, r, r)
    shapes["latent_avg"] = (w_dim,)
    return shapes


def check_generator(G):
    """Raise StyleMaskError unless G has exactly the tensors and shapes of its architecture."""
    arch = sm.architecture(G)  # w_dim and z_dim come from style.1.weight: hold it to the other tensors first
    w_dim = G["conv1.conv.modulation.weight"].shape[-1] if "conv1.conv.modulation.weight" in G else arch["w_dim"]
    z_dim = G["style.1.weight"].shape[-1]
    if G["style.1.weight"].ndim != 2 or arch["w_dim"] != w_dim:
        raise StyleMaskError(f"tensor 'style.1.weight' has shape {tuple(G['style.1.weight'].shape)}, expected "
                             f"{(w_dim, z_dim)} (w_dim {w_dim}, as the style modulations read)")
    want = generator_shapes(arch)
    missing = [k for k in want if k not in G]
    if missing:
        raise StyleMaskError(f"not a complete generator: {len(missing)} tensors missing, e.g. {missing[0]!r}")
    for k, shape in want.items():
        if tuple(G[k].shape) != shape:
            raise StyleMaskError(f"tensor {k!r} has shape {tuple(G[k].shape)}, expected {shape}")
    for k, v in G.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise StyleMaskError(f"tensor {k!r} contains NaN or Inf: the file is damaged")


# --- StyleMask's mask networks (the official `mask_net` names) -----------------------------------------

def mask_shapes(kind, dims):
    """Every tensor of mask networks of this kind over controlled layers of these widths."""
    shapes = {}
    for name, d in sm.mask_networks(kind, dims):
        for fc in ("0", "2"):
            shapes[f"{name}.masknet.{fc}.weight"], shapes[f"{name}.masknet.{fc}.bias"] = (d, d), (d,)
    return shapes


def check_mask(M, G=None):
    """Raise StyleMaskError unless M is a consistent `sm.Masks` of its stated kind and space (fitting G, if given)."""
    if M.kind not in ("per-layer", "global") or M.space not in ("S", "W") or not M.dims:
        raise StyleMaskError(f"not a mask network: kind {M.kind!r}, space {M.space!r}, {len(M.dims)} layers")
    check_exact(M.params, mask_shapes(M.kind, M.dims), f"{M.kind} mask over {len(M.dims)} layers")
    if G is not None and M.space == "W":  # every layer as wide as w
        if M.dims != [sm.architecture(G)["w_dim"]] * len(M.dims) or len(M.dims) > sm.n_ws(G):
            raise StyleMaskError(f"the W+ mask networks (widths {M.dims[:3]}...) do not fit this generator's W+ codes")
    elif G is not None:
        conv_dims = [L.dim for L in sm.style_layout(G) if L.kind == "conv"]
        if M.dims != conv_dims[:len(M.dims)]:
            raise StyleMaskError(f"the mask networks (layer widths {M.dims[:3]}...) do not fit this generator "
                                 f"(conv widths {conv_dims[:3]}...): use the mask trained for it")


# --- FLAME and DECA's landmark embedding ---------------------------------------------------------------

FLAME_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights", "f",
              "static_lmk_faces_idx", "static_lmk_bary_coords", "dynamic_lmk_faces_idx",
              "dynamic_lmk_bary_coords", "full_lmk_faces_idx", "full_lmk_bary_coords")


def check_flame(Fl):
    """Raise StyleMaskError unless Fl is a FLAME model with DECA's landmark embedding, shapes consistent."""
    missing = [k for k in FLAME_KEYS if k not in Fl]
    if missing:
        raise StyleMaskError(f"not a FLAME model: tensor {missing[0]!r} is missing")
    V, J, Fn = Fl["v_template"].shape[0], Fl["J_regressor"].shape[0], Fl["f"].shape[0]
    want = {"v_template": (V, 3), "posedirs": (V, 3, 9 * (J - 1)), "J_regressor": (J, V), "weights": (V, J),
            "kintree_table": (2, J), "f": (Fn, 3), "static_lmk_faces_idx": (51,), "static_lmk_bary_coords": (51, 3),
            "dynamic_lmk_faces_idx": (79, 17), "dynamic_lmk_bary_coords": (79, 17, 3),
            "full_lmk_faces_idx": (1, 68), "full_lmk_bary_coords": (1, 68, 3)}
    for k, shape in want.items():
        if tuple(Fl[k].shape) != shape:
            raise StyleMaskError(f"FLAME tensor {k!r} has shape {tuple(Fl[k].shape)}, expected {shape}")
    if Fl["shapedirs"].ndim != 3 or Fl["shapedirs"].shape[:2] != (V, 3) or Fl["shapedirs"].shape[2] < sm.FLAME_N_SHAPE + 50:
        raise StyleMaskError(f"FLAME shapedirs has shape {tuple(Fl['shapedirs'].shape)}, expected ({V}, 3, 400)")
    for k in ("static_lmk_faces_idx", "dynamic_lmk_faces_idx", "full_lmk_faces_idx"):
        if Fl[k].min() < 0 or Fl[k].max() >= Fn:
            raise StyleMaskError(f"FLAME tensor {k!r} indexes faces outside 0..{Fn - 1}")
    if Fl["f"].min() < 0 or Fl["f"].max() >= V:
        raise StyleMaskError(f"FLAME faces index vertices outside 0..{V - 1}")
    for k, v in Fl.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise StyleMaskError(f"FLAME tensor {k!r} contains NaN or Inf: the file is damaged")


# --- ArcFace IR-SE (TreB1eN's Backbone names) -----------------------------------------------------------

def arcface_shapes(arch):
    """Every tensor of an IR(-SE) Backbone with architecture arch, name -> shape, in the official layout."""
    w = arch["width"]
    shapes = {"input_layer.0.weight": (w, 3, 3, 3), **bn_shapes("input_layer.1", w), "input_layer.2.weight": (w,)}
    side, c_in = ARCFACE_SIZE, w
    for i, (c, stride) in enumerate(zip(arch["units"], ir_se_strides(arch))):
        p = f"body.{i}"
        if c_in != c:
            shapes[f"{p}.shortcut_layer.0.weight"] = (c, c_in, 1, 1)
            shapes.update(bn_shapes(f"{p}.shortcut_layer.1", c))
        shapes.update(bn_shapes(f"{p}.res_layer.0", c_in))
        shapes[f"{p}.res_layer.1.weight"] = (c, c_in, 3, 3)
        shapes[f"{p}.res_layer.2.weight"] = (c,)
        shapes[f"{p}.res_layer.3.weight"] = (c, c, 3, 3)
        shapes.update(bn_shapes(f"{p}.res_layer.4", c))
        if arch["se"]:
            shapes[f"{p}.res_layer.5.fc1.weight"] = (c // arch["se"], c, 1, 1)
            shapes[f"{p}.res_layer.5.fc2.weight"] = (c, c // arch["se"], 1, 1)
        side, c_in = (side + 1) // 2 if stride == 2 else side, c
    shapes.update(bn_shapes("output_layer.0", c_in))
    shapes["output_layer.3.weight"], shapes["output_layer.3.bias"] = (arch["emb"], c_in * side * side), (arch["emb"],)
    shapes.update(bn_shapes("output_layer.4", arch["emb"], affine=arch["affine"]))
    return shapes


def check_arcface(A):
    """Raise StyleMaskError unless A has exactly the tensors and shapes of its IR(-SE) architecture, all finite."""
    arch = arcface_arch(A)
    if not arch["units"]:
        raise StyleMaskError("not an ArcFace IR-SE network: no body.* units")
    check_exact(A, arcface_shapes(arch), "ArcFace IR-SE network")


# --- DECA's E_flame (ResnetEncoder names) ---------------------------------------------------------------

def deca_shapes(arch):
    """Every tensor of an E_flame ResnetEncoder with architecture arch, name -> shape, in the official layout."""
    w = arch["width"]
    shapes = {"encoder.conv1.weight": (w, 3, 7, 7), **bn_shapes("encoder.bn1", w)}
    c_in = w
    for k, (planes, n) in enumerate(arch["layers"], 1):
        for j in range(n):
            p = f"encoder.layer{k}.{j}"
            shapes.update({f"{p}.conv1.weight": (planes, c_in, 1, 1), **bn_shapes(f"{p}.bn1", planes),
                           f"{p}.conv2.weight": (planes, planes, 3, 3), **bn_shapes(f"{p}.bn2", planes),
                           f"{p}.conv3.weight": (4 * planes, planes, 1, 1), **bn_shapes(f"{p}.bn3", 4 * planes)})
            if j == 0 and (k > 1 or c_in != 4 * planes):  # ResNet._make_layer's downsample rule
                shapes[f"{p}.downsample.0.weight"] = (4 * planes, c_in, 1, 1)
                shapes.update(bn_shapes(f"{p}.downsample.1", 4 * planes))
            c_in = 4 * planes
    n_out = arch.get("n_out", sum(d for _, d in DECA_CODE))
    shapes.update({"layers.0.weight": (arch["hidden"], c_in), "layers.0.bias": (arch["hidden"],),
                   "layers.2.weight": (n_out, arch["hidden"]), "layers.2.bias": (n_out,)})
    return shapes


def check_deca(P):
    """Raise StyleMaskError unless P is a complete E_flame encoder with the 236-wide code, all finite."""
    arch = deca_arch(P)
    n_code = sum(d for _, d in DECA_CODE)
    if arch["n_out"] != n_code:
        raise StyleMaskError(f"the encoder outputs {arch['n_out']} codes, not {n_code} (shape, tex, exp, pose, cam, "
                             f"light): is this E_detail rather than E_flame?")
    if any(n == 0 for _, n in arch["layers"]):
        raise StyleMaskError("not a DECA E_flame encoder: a ResNet layer has no blocks")
    check_exact(P, deca_shapes(arch), "DECA E_flame encoder")


# --- e4e's Encoder4Editing (pSp's names, `encoder.` stripped) ------------------------------------------

def e4e_shapes(arch):
    """Every tensor of an Encoder4Editing with architecture arch (plus latent_avg (w_dim,)), name -> shape."""
    trunk = arcface_shapes(dict(arch, emb=1, affine=True))
    shapes = {k: v for k, v in trunk.items() if not k.startswith("output_layer.")}
    t1, t2, t3 = e4e_taps(arch)
    c1, c2, c3 = arch["units"][t1], arch["units"][t2], arch["units"][t3]
    side = E4E_SIZE // 16  # c3's side: four stride-2 stages
    for i in range(arch["n_styles"]):
        spatial = side if i < E4E_COARSE else 2 * side if i < E4E_MIDDLE else 4 * side  # 16, 32, 64
        c_in = c3
        for k in range(int(math.log2(spatial))):
            shapes[f"styles.{i}.convs.{2 * k}.weight"] = (arch["w_dim"], c_in, 3, 3)
            shapes[f"styles.{i}.convs.{2 * k}.bias"] = (arch["w_dim"],)
            c_in = arch["w_dim"]
        shapes[f"styles.{i}.linear.weight"] = (arch["w_dim"], arch["w_dim"])
        shapes[f"styles.{i}.linear.bias"] = (arch["w_dim"],)
    shapes.update({"latlayer1.weight": (c3, c2, 1, 1), "latlayer1.bias": (c3,),
                   "latlayer2.weight": (c3, c1, 1, 1), "latlayer2.bias": (c3,), "latent_avg": (arch["w_dim"],)})
    return shapes


def check_e4e(E, G=None):
    """Raise StyleMaskError unless E is a complete e4e encoder, all finite (and its W+ fits generator G)."""
    arch = e4e_arch(E)
    if arch["n_styles"] < 8 or arch["n_styles"] % 2:
        raise StyleMaskError(f"an e4e encoder has 2·log2(resolution) − 2 styles (18 at 1024), not {arch['n_styles']} styles")
    want = e4e_shapes(arch)
    if "latent_avg" in E and E["latent_avg"].ndim == 2:  # pSp also stores one row per style
        want["latent_avg"] = (arch["n_styles"], arch["w_dim"])
    check_exact(E, want, "e4e encoder")
    if G is not None:
        w_dim = sm.architecture(G)["w_dim"]
        if (arch["n_styles"], arch["w_dim"]) != (sm.n_ws(G), w_dim):
            raise StyleMaskError(f"the e4e encoder gives W+ codes ({arch['n_styles']}, {arch['w_dim']}), the generator "
                                 f"reads ({sm.n_ws(G)}, {w_dim}): use the encoder trained for it")


# --- pytorch-fid's Inception-v3 ------------------------------------------------------------------------

def inception_shapes():
    """Every tensor of the FID Inception, name -> shape, in pytorch-fid's state-dict layout (fc included)."""
    shapes = {}
    for name, c in CONVS.items():
        shapes[f"{name}.conv.weight"] = (c.c_out, c.c_in, *c.kernel)
        shapes.update(bn_shapes(f"{name}.bn", c.c_out))
    shapes["fc.weight"], shapes["fc.bias"] = (N_CLASSES, FID_DIMS), (N_CLASSES,)
    return shapes


def check_inception(I):
    """Raise StyleMaskError unless I has exactly the FID Inception's tensors and shapes, all finite."""
    if "Conv2d_1a_3x3.conv.weight" not in I:
        raise StyleMaskError("not the FID Inception-v3: no Conv2d_1a_3x3.* tensors")
    check_exact(I, inception_shapes(), "FID Inception-v3")


def check_fit(P):
    """Raise StyleMaskError unless P, the network's tensors of a world.fit checkpoint, holds any (the network's
    own check runs on the file it ships as)."""
    if not P:
        raise StyleMaskError("a training checkpoint without parameters: it is damaged; delete it to retrain that stage")
