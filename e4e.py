"""e4e inversion: real, FFHQ-aligned faces -> W+ codes, so that StyleMask can reenact photos and videos.

encoder4editing's Encoder4Editing(50, 'ir_se') as pSp wraps it, a pure function over its parameters:

    e4e()              encoder4editing `models/encoders/psp_encoders.py` Encoder4Editing, GradualStyleBlock,
                       `helpers.py` _upsample_add, `models/psp.py` pSp (latent_avg)
    e4e_input()        the official inference's transforms.Resize((256, 256))

The IR-SE trunk is ArcFace's (`facenets.ir_se_unit`). Not here: the checkpoint layout, its check and
the seeded stand-in (`weights/`), alignment (`align.py`). Shapes: B batch, H, W image size.
"""
import math

import torch
import torch.nn.functional as F

from facenets import ARCFACE_ARCHS, bn, ir_se_strides, ir_se_unit
from stylemask import StyleMaskError

# --- e4e inversion: real images -> W+ codes ---------------------------------------------------------
# encoder4editing's Encoder4Editing(50, 'ir_se') as pSp wraps it (`models/psp.py`), the `e4e_ffhq_encode.pt`
# StyleMask loads for real images (run_inference.py, libs/models/inversion/). Tensor names are the
# checkpoint's `state_dict` keys with the `encoder.` prefix stripped, exactly as pSp's get_keys(ckpt,
# 'encoder') loads them, plus the top-level `latent_avg`:
#   input_layer.*, body.{0..23}.*       the IR-SE50 trunk of ArcFace (facenets.py) (same units, same names)
#   styles.{i}.convs.{2k}.{weight,bias} GradualStyleBlock i: log2(spatial) 3×3/2 convs, each + LeakyReLU(0.01)
#   styles.{i}.linear.{weight,bias}     its EqualLinear(512, 512, lr_mul=1): weight scaled by 1/sqrt(512)
#   latlayer1.*, latlayer2.*            1×1 convs 256 -> 512 and 128 -> 512 (the FPN's lateral layers)
#   latent_avg                          (512,) or (n_styles, 512): added to every code (pSp.forward)
# Forward (ProgressiveStage.Inference): c1, c2, c3 are the ends of stages 2, 3, 4 (body units 6, 20, 23:
# 128×64², 256×32², 512×16² at 256×256 input); w0 = styles[0](c3) is copied to all n_styles rows;
# rows 1, 2 add styles[i](c3), rows 3..6 add styles[i](p2) with p2 = up(c3) + latlayer1(c2), rows 7..
# add styles[i](p1) with p1 = up(p2) + latlayer2(c1) (up: bilinear, align_corners=True, _upsample_add).
# n_styles = 2·log2(resolution) − 2 = the generator's n_ws (18 at 1024). The trunk widths, the style
# width and n_styles are read off the shapes, so the tiny default (w_dim 32, 14 styles) runs the same code.

E4E_SIZE = 256  # the official inference resizes (or crops) every face to 256×256
E4E_COARSE, E4E_MIDDLE = 3, 7  # Encoder4Editing.coarse_ind, middle_ind
E4E_ARCHS = {
    "ffhq-1024": dict(width=64, units=ARCFACE_ARCHS["ir_se50"]["units"], se=16, w_dim=512, n_styles=18),
    # The embedded default: one narrow IR-SE unit per stage; the tiny generator's w_dim and n_ws.
    "tiny": dict(width=8, units=[8, 16, 24, 32], se=8, w_dim=32, n_styles=14),
}


def e4e_arch(E):
    """The architecture of E read off its shapes: trunk (as arcface_arch), w_dim, n_styles, FPN width."""
    try:
        n = sum(1 for k in E if k.startswith("body.") and k.endswith(".res_layer.1.weight"))
        units = [int(E[f"body.{i}.res_layer.1.weight"].shape[0]) for i in range(n)]
        se = E.get("body.0.res_layer.5.fc1.weight")
        n_styles = sum(1 for k in E if k.startswith("styles.") and k.endswith(".linear.weight"))
        return dict(width=int(E["input_layer.0.weight"].shape[0]), units=units,
                    se=0 if se is None else units[0] // int(se.shape[0]),
                    w_dim=int(E["styles.0.linear.weight"].shape[0]), n_styles=n_styles)
    except (KeyError, IndexError) as e:
        raise StyleMaskError(f"not an e4e encoder: tensor {e.args[0]!r} is missing") from None


def e4e_taps(arch):
    """Body-unit indices (c1, c2, c3): the last units of stages 2, 3, 4 (6, 20, 23 for IR-SE50)."""
    starts = [i for i, s in enumerate(ir_se_strides(arch)) if s == 2]
    if len(starts) != 4:
        raise StyleMaskError(f"an e4e trunk has 4 stages of distinct widths, this one has {len(starts)}")
    return starts[2] - 1, starts[3] - 1, len(arch["units"]) - 1


def e4e_input(img):
    """(B, 3, H, W) RGB in [-1, 1] -> (B, 3, 256, 256): bilinear, antialiased resize (PIL's, as
    transforms.Resize((256, 256)) in e4e's inference); 256×256 input (StyleMask's aligned crop) passes as is."""
    if img.shape[-2:] == (E4E_SIZE, E4E_SIZE):
        return img
    return F.interpolate(img, size=(E4E_SIZE, E4E_SIZE), mode="bilinear", align_corners=False, antialias=True)


def _gradual_style(E, i, x):
    """(B, C, s, s) -> (B, w_dim): GradualStyleBlock i: log2(s) 3×3/2 convs with LeakyReLU(0.01), EqualLinear."""
    k = 0
    while f"styles.{i}.convs.{k}.weight" in E:
        x = F.leaky_relu(F.conv2d(x, E[f"styles.{i}.convs.{k}.weight"], E[f"styles.{i}.convs.{k}.bias"],
                                  stride=2, padding=1), 0.01)
        k += 2
    x = x.reshape(-1, x.shape[1])  # (B, w_dim): the convs end at 1×1
    W = E[f"styles.{i}.linear.weight"]
    return F.linear(x, W * (1 / math.sqrt(W.shape[1])), E[f"styles.{i}.linear.bias"])  # EqualLinear, lr_mul 1


def _upsample_add(x, y):
    """FPN merge: x bilinearly up-sampled (align_corners=True) to y's size, plus y."""
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


def e4e(E, img):
    """(B, 3, H, W) aligned face in [-1, 1] -> W+ (B, n_styles, w_dim): Encoder4Editing + latent_avg (pSp.forward).

    Any size is resized to 256×256 first (e4e_input). sm.styles(G, e4e(E, img)) is the style code.
    """
    arch = e4e_arch(E)
    taps = e4e_taps(arch)
    x = bn(E, "input_layer.1", F.conv2d(e4e_input(img), E["input_layer.0.weight"], padding=1))
    x = F.prelu(x, E["input_layer.2.weight"])  # (B, 64, 256, 256)
    feats = []
    for i, stride in enumerate(ir_se_strides(arch)):
        x = ir_se_unit(E, f"body.{i}", x, stride, arch["se"])
        if i in taps:
            feats.append(x)
    c1, c2, c3 = feats  # (B, 128, 64²), (B, 256, 32²), (B, 512, 16²)
    w0 = _gradual_style(E, 0, c3)
    rows, features = [w0], c3
    for i in range(1, arch["n_styles"]):
        if i == E4E_COARSE:
            p2 = features = _upsample_add(c3, F.conv2d(c2, E["latlayer1.weight"], E["latlayer1.bias"]))
        elif i == E4E_MIDDLE:
            features = _upsample_add(p2, F.conv2d(c1, E["latlayer2.weight"], E["latlayer2.bias"]))
        rows.append(w0 + _gradual_style(E, i, features))  # w[:, i] += delta_i
    return torch.stack(rows, 1) + E["latent_avg"]  # (B, n_styles, w_dim)
