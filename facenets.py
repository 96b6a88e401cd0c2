"""The frozen supervision networks of StyleMask: ArcFace IR-SE50 (identity) and DECA's E_flame (3DMM codes).

StyleMask trains its mask networks with losses read off two pretrained, frozen networks (Sect. III-B):
an ArcFace face recogniser for identity, and DECA's coarse encoder for FLAME shape, expression, head
pose and camera. Both are pure functions over flat `dict[str, Tensor]` parameters that keep the
official state-dict names, in eval mode (BatchNorm on running statistics, eps 1e-5; dropout off),
and differentiable with respect to the image.

    ArcFace IR-SE50    pSp/StyleMask `criteria/model_irse.py` Backbone(112, 50, 'ir_se'),
                       `criteria/helpers.py` bottleneck_IR_SE, SEModule, l2_norm
    identity()         `criteria/id_loss.py` IDLoss.extract_feats, the trainer's face_pool to 256
    DECA E_flame       DECA `models/encoders.py` ResnetEncoder, `models/resnet.py` ResNet-50
    deca_params()      StyleMask `utilities/utils.py` calculate_shapemodel, DECA `datasets.py`
                       TestData.get_image_tensor (crop), `deca.py` decompose_code
    Euler angles       DECA `utils/rotation_converter.py` batch_axis2euler, rad2deg
    e4e inversion      encoder4editing `models/encoders/psp_encoders.py` Encoder4Editing, GradualStyleBlock,
                       `helpers.py` _upsample_add, `models/psp.py` pSp (latent_avg); real faces -> W+
    Loading            files written by weights/convert.py (kinds 'arcface', 'deca', 'e4e'); tiny defaults

Shapes: B batch, H, W image size. Generator images are (B, 3, H, W) RGB in [-1, 1].
"""
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import stylemask as sm
from stylemask import StyleMaskError

BN_EPS = 1e-5  # every BatchNorm of both networks uses torch's default (DECA's unused D_detail sets 0.8)


def _bn(P, name, x):
    """Eval-mode BatchNorm1d/2d `name` of P: running statistics, then weight and bias if it has them."""
    return F.batch_norm(x, P[f"{name}.running_mean"], P[f"{name}.running_var"], P.get(f"{name}.weight"),
                        P.get(f"{name}.bias"), training=False, eps=BN_EPS)


def _bn_shapes(name, c, affine=True):
    """The tensors of a BatchNorm over c channels (num_batches_tracked is dropped by the converter)."""
    shapes = {f"{name}.running_mean": (c,), f"{name}.running_var": (c,)}
    if affine:
        shapes.update({f"{name}.weight": (c,), f"{name}.bias": (c,)})
    return shapes


def _check(P, want, what):
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
        if not torch.isfinite(P[k]).all():
            raise StyleMaskError(f"tensor {k!r} contains NaN or Inf: the file is damaged")


# --- ArcFace IR-SE50 --------------------------------------------------------------------------------
# TreB1eN's Backbone, as pSp/StyleMask ship it in `model_ir_se50.pth`:
#   input_layer.{0 conv3×3, 1 BN, 2 PReLU}
#   body.{i}.res_layer.{0 BN, 1 conv3×3, 2 PReLU, 3 conv3×3/stride, 4 BN, 5 SE: fc1, fc2 (1×1, no bias)}
#   body.{i}.shortcut_layer.{0 conv1×1/stride, 1 BN} where the width changes, else MaxPool2d(1, stride)
#   output_layer.{0 BN2d, 1 Dropout, 2 Flatten, 3 Linear(512·7·7, 512), 4 BN1d}, then l2 normalisation.
# get_blocks(50): 3, 4, 14, 3 units of widths 64, 128, 256, 512, each stage's first unit with stride 2.
# A stage starts at unit 0 and wherever the width changes, so the shapes alone give the architecture
# (`arcface_config`) and a smaller network of the same family runs through the same functions.

ARCFACE_CONFIGS = {
    "ir_se50": dict(width=64, units=[64] * 3 + [128] * 4 + [256] * 14 + [512] * 3, se=16, emb=512, affine=True),
    # The embedded default: one unit per stage, narrow; same input size, output and strides.
    "tiny": dict(width=16, units=[16, 32, 48, 64], se=16, emb=512, affine=True),
}
ARCFACE_SIZE = 112
ARCFACE_CROP = (35, 223, 32, 220)  # IDLoss.extract_feats: rows 35:223, columns 32:220 of a 256×256 image


def arcface_config(A):
    """The architecture of A read off its shapes: stem width, unit widths, SE reduction (0: 'ir'), embedding."""
    try:
        n = sum(1 for k in A if k.startswith("body.") and k.endswith(".res_layer.1.weight"))
        units = [int(A[f"body.{i}.res_layer.1.weight"].shape[0]) for i in range(n)]
        se = A.get("body.0.res_layer.5.fc1.weight")
        return dict(width=int(A["input_layer.0.weight"].shape[0]), units=units,
                    se=0 if se is None else units[0] // int(se.shape[0]),
                    emb=int(A["output_layer.3.weight"].shape[0]), affine="output_layer.4.weight" in A)
    except KeyError as e:
        raise StyleMaskError(f"not an ArcFace IR-SE network: tensor {e.args[0]!r} is missing") from None


def _arcface_strides(cfg):
    """Stride of each unit: 2 for a stage's first unit (unit 0, and wherever the width changes), else 1."""
    widths = [cfg["width"]] + cfg["units"]
    return [2 if i == 0 or widths[i] != widths[i + 1] else 1 for i in range(len(cfg["units"]))]


def arcface_shapes(cfg):
    """Every tensor of an IR(-SE) Backbone with architecture cfg, name -> shape, in the official layout."""
    w = cfg["width"]
    shapes = {"input_layer.0.weight": (w, 3, 3, 3), **_bn_shapes("input_layer.1", w), "input_layer.2.weight": (w,)}
    side, c_in = ARCFACE_SIZE, w
    for i, (c, stride) in enumerate(zip(cfg["units"], _arcface_strides(cfg))):
        p = f"body.{i}"
        if c_in != c:
            shapes[f"{p}.shortcut_layer.0.weight"] = (c, c_in, 1, 1)
            shapes.update(_bn_shapes(f"{p}.shortcut_layer.1", c))
        shapes.update(_bn_shapes(f"{p}.res_layer.0", c_in))
        shapes[f"{p}.res_layer.1.weight"] = (c, c_in, 3, 3)
        shapes[f"{p}.res_layer.2.weight"] = (c,)
        shapes[f"{p}.res_layer.3.weight"] = (c, c, 3, 3)
        shapes.update(_bn_shapes(f"{p}.res_layer.4", c))
        if cfg["se"]:
            shapes[f"{p}.res_layer.5.fc1.weight"] = (c // cfg["se"], c, 1, 1)
            shapes[f"{p}.res_layer.5.fc2.weight"] = (c, c // cfg["se"], 1, 1)
        side, c_in = (side + 1) // 2 if stride == 2 else side, c
    shapes.update(_bn_shapes("output_layer.0", c_in))
    shapes["output_layer.3.weight"], shapes["output_layer.3.bias"] = (cfg["emb"], c_in * side * side), (cfg["emb"],)
    shapes.update(_bn_shapes("output_layer.4", cfg["emb"], affine=cfg["affine"]))
    return shapes


def check_arcface(A):
    """Raise StyleMaskError unless A has exactly the tensors and shapes of its IR(-SE) architecture, all finite."""
    cfg = arcface_config(A)
    if not cfg["units"]:
        raise StyleMaskError("not an ArcFace IR-SE network: no body.* units")
    _check(A, arcface_shapes(cfg), "ArcFace IR-SE network")


def _ir_unit(A, name, x, stride, se):
    """(B, Cin, H, W) -> (B, C, H/stride, W/stride): bottleneck_IR_SE, residual branch plus shortcut."""
    if f"{name}.shortcut_layer.0.weight" in A:
        shortcut = _bn(A, f"{name}.shortcut_layer.1", F.conv2d(x, A[f"{name}.shortcut_layer.0.weight"], stride=stride))
    else:
        shortcut = x[:, :, ::stride, ::stride]  # MaxPool2d(1, stride) only subsamples
    r = _bn(A, f"{name}.res_layer.0", x)
    r = F.prelu(F.conv2d(r, A[f"{name}.res_layer.1.weight"], padding=1), A[f"{name}.res_layer.2.weight"])
    r = _bn(A, f"{name}.res_layer.4", F.conv2d(r, A[f"{name}.res_layer.3.weight"], stride=stride, padding=1))
    if se:  # squeeze-and-excitation: channel gates from the global average
        g = F.relu(F.conv2d(r.mean((2, 3), keepdim=True), A[f"{name}.res_layer.5.fc1.weight"]))  # (B, C/16, 1, 1)
        r = r * torch.sigmoid(F.conv2d(g, A[f"{name}.res_layer.5.fc2.weight"]))
    return r + shortcut


def _arcface_trunk(A, x):
    """(B, 3, 112, 112) -> (B, 512, 7, 7): the Backbone's input layer and body."""
    cfg = arcface_config(A)
    x = _bn(A, "input_layer.1", F.conv2d(x, A["input_layer.0.weight"], padding=1))
    x = F.prelu(x, A["input_layer.2.weight"])  # (B, 64, 112, 112)
    for i, stride in enumerate(_arcface_strides(cfg)):
        x = _ir_unit(A, f"body.{i}", x, stride, cfg["se"])
    return x


def _arcface_embed(A, x):
    """(B, 512, 7, 7) -> (B, 512) before l2 normalisation: BN2d, (Dropout: identity in eval), Flatten, Linear, BN1d."""
    x = _bn(A, "output_layer.0", x).flatten(1)  # (B, 512·7·7)
    return _bn(A, "output_layer.4", F.linear(x, A["output_layer.3.weight"], A["output_layer.3.bias"]))


def arcface(A, x):
    """(B, 3, 112, 112) face crop in [-1, 1] -> (B, 512) unit-length identity features (the official Backbone)."""
    x = _arcface_embed(A, _arcface_trunk(A, x))  # (B, 512)
    return x / x.norm(dim=1, keepdim=True)  # l2_norm: no epsilon, as the official


def identity(A, img):
    """(B, 3, H, W) generator images in [-1, 1] -> (B, 512) unit ArcFace features, preprocessed as IDLoss.

    The trainer pools generator output to 256×256 (its face_pool; skipped when already 256); IDLoss crops
    rows 35:223 and columns 32:220 (188×188, the face) and adaptive-average-pools the crop to 112×112.
    """
    if img.shape[-2:] != (256, 256):
        img = F.adaptive_avg_pool2d(img, 256)
    top, bottom, left, right = ARCFACE_CROP
    return arcface(A, F.adaptive_avg_pool2d(img[:, :, top:bottom, left:right], ARCFACE_SIZE))


# --- DECA's coarse encoder E_flame ------------------------------------------------------------------
# DECA's ResnetEncoder, as `deca_model.tar` stores it under 'E_flame':
#   encoder.conv1 (7×7/2), encoder.bn1, ReLU, max-pool 3×3/2,
#   encoder.layer{1..4}.{j}.{conv1 1×1, bn1, conv2 3×3/stride, bn2, conv3 1×1 (×4 width), bn3,
#                            downsample.{0 conv1×1/stride, 1 BN} on a block's first unit}
#   (torchvision's ResNet-50: 3, 4, 6, 3 bottlenecks, the stride on conv2, layer{2,3,4}.0 stride 2),
#   AvgPool2d(7) -> (B, 2048), then layers.{0 Linear(2048, 1024), 1 ReLU, 2 Linear(1024, 236)}; E_flame
#   has no last_op, so the code is the linear output as is.

DECA_CONFIGS = {
    "resnet50": dict(width=64, layers=[(64, 3), (128, 4), (256, 6), (512, 3)], hidden=1024),
    # The embedded default: one narrow bottleneck per layer; same input size, strides and code layout.
    "tiny": dict(width=8, layers=[(4, 1), (8, 1), (16, 1), (32, 1)], hidden=64),
}
DECA_CODE = (("shape", 100), ("tex", 50), ("exp", 50), ("pose", 6), ("cam", 3), ("light", 27))  # param_list
DECA_SIZE = 224
# Default crop (cx, cy, size) in pixels of a 256×256 FFHQ-aligned image, pixel centres at integers. The
# official code runs the FAN landmark detector on every image and crops with TestData.bbox2point('kpt68')
# and scale 1.25 (`deca_crop`). We ship no FAN; these constants apply that rule to an average face: the
# OpenFace/dlib mean 68-point shape, put through FFHQ's alignment (eyes–mouth quad, c = eye_avg +
# 0.1·eye_to_mouth at the centre) at 256×256, has its landmark box at x 54.1..203.3, y 97.3..243.5
# (brows to chin), so size = int(1.25 · 1.1 · (149.3 + 146.3) / 2) = 203 and cy = 170.4; cx = 127.5 is the
# aligned image's axis of symmetry. An approximation: real faces and FAN's landmarks vary by a few pixels.
FFHQ_DECA_CROP = (127.5, 170.4, 203.0)


def deca_config(D):
    """The architecture of D read off its shapes: stem width, (planes, blocks) per layer, hidden width, code size."""
    try:
        layers = []
        for k in range(1, 5):
            n = sum(1 for key in D if key.startswith(f"encoder.layer{k}.") and key.endswith(".conv1.weight"))
            layers.append((int(D[f"encoder.layer{k}.0.conv1.weight"].shape[0]), n))
        return dict(width=int(D["encoder.conv1.weight"].shape[0]), layers=layers,
                    hidden=int(D["layers.0.weight"].shape[0]), n_out=int(D["layers.2.weight"].shape[0]))
    except KeyError as e:
        raise StyleMaskError(f"not a DECA E_flame encoder: tensor {e.args[0]!r} is missing") from None


def deca_shapes(cfg):
    """Every tensor of an E_flame ResnetEncoder with architecture cfg, name -> shape, in the official layout."""
    w = cfg["width"]
    shapes = {"encoder.conv1.weight": (w, 3, 7, 7), **_bn_shapes("encoder.bn1", w)}
    c_in = w
    for k, (planes, n) in enumerate(cfg["layers"], 1):
        for j in range(n):
            p = f"encoder.layer{k}.{j}"
            shapes.update({f"{p}.conv1.weight": (planes, c_in, 1, 1), **_bn_shapes(f"{p}.bn1", planes),
                           f"{p}.conv2.weight": (planes, planes, 3, 3), **_bn_shapes(f"{p}.bn2", planes),
                           f"{p}.conv3.weight": (4 * planes, planes, 1, 1), **_bn_shapes(f"{p}.bn3", 4 * planes)})
            if j == 0 and (k > 1 or c_in != 4 * planes):  # ResNet._make_layer's downsample rule
                shapes[f"{p}.downsample.0.weight"] = (4 * planes, c_in, 1, 1)
                shapes.update(_bn_shapes(f"{p}.downsample.1", 4 * planes))
            c_in = 4 * planes
    n_out = cfg.get("n_out", sum(d for _, d in DECA_CODE))
    shapes.update({"layers.0.weight": (cfg["hidden"], c_in), "layers.0.bias": (cfg["hidden"],),
                   "layers.2.weight": (n_out, cfg["hidden"]), "layers.2.bias": (n_out,)})
    return shapes


def check_deca(D):
    """Raise StyleMaskError unless D is a complete E_flame encoder with the 236-wide code, all finite."""
    cfg = deca_config(D)
    n_code = sum(d for _, d in DECA_CODE)
    if cfg["n_out"] != n_code:
        raise StyleMaskError(f"the encoder outputs {cfg['n_out']} codes, not {n_code} (shape, tex, exp, pose, cam, "
                             f"light): is this E_detail rather than E_flame?")
    if any(n == 0 for _, n in cfg["layers"]):
        raise StyleMaskError("not a DECA E_flame encoder: a ResNet layer has no blocks")
    _check(D, deca_shapes(cfg), "DECA E_flame encoder")


def _bottleneck(D, name, x, stride):
    """(B, Cin, H, W) -> (B, 4·planes, H/stride, W/stride): torchvision's Bottleneck, stride on the 3×3 conv."""
    out = F.relu(_bn(D, f"{name}.bn1", F.conv2d(x, D[f"{name}.conv1.weight"])))
    out = F.relu(_bn(D, f"{name}.bn2", F.conv2d(out, D[f"{name}.conv2.weight"], stride=stride, padding=1)))
    out = _bn(D, f"{name}.bn3", F.conv2d(out, D[f"{name}.conv3.weight"]))
    if f"{name}.downsample.0.weight" in D:
        x = _bn(D, f"{name}.downsample.1", F.conv2d(x, D[f"{name}.downsample.0.weight"], stride=stride))
    return F.relu(out + x)


def deca_encode(D, x):
    """(B, 3, 224, 224) RGB face crop in [0, 1] -> (B, 236) DECA code: E_flame (ResNet-50 + MLP), eval mode."""
    x = F.relu(_bn(D, "encoder.bn1", F.conv2d(x, D["encoder.conv1.weight"], stride=2, padding=3)))  # (B, 64, 112²)
    x = F.max_pool2d(x, 3, stride=2, padding=1)  # (B, 64, 56, 56)
    for k in range(1, 5):
        j = 0
        while f"encoder.layer{k}.{j}.conv1.weight" in D:
            x = _bottleneck(D, f"encoder.layer{k}.{j}", x, stride=2 if k > 1 and j == 0 else 1)
            j += 1
    x = F.avg_pool2d(x, 7, stride=1).flatten(1)  # AvgPool2d(7) of the 7×7 map: (B, 2048)
    if x.shape[1] != D["layers.0.weight"].shape[1]:
        raise StyleMaskError(f"deca_encode: the input must be (B, 3, {DECA_SIZE}, {DECA_SIZE})")
    h = F.relu(F.linear(x, D["layers.0.weight"], D["layers.0.bias"]))  # (B, 1024)
    return F.linear(h, D["layers.2.weight"], D["layers.2.bias"])


def deca_split(code):
    """(B, 236) code -> dict shape (B, 100), tex (B, 50), exp (B, 50), pose (B, 6), cam (B, 3), light (B, 9, 3).

    DECA's decompose_code, in cfg.model.param_list order. pose is the global head rotation [:3] and the
    jaw rotation [3:], both axis-angle; cam is the orthographic (scale, tx, ty); light is 9 SH × RGB.
    """
    out = dict(zip([k for k, _ in DECA_CODE], torch.split(code, [d for _, d in DECA_CODE], dim=1)))
    out["light"] = out["light"].reshape(code.shape[0], 9, 3)
    return out


def axis_angle_to_euler(aa):
    """(B, 3) axis-angle rotations -> (B, 3) Euler angles (yaw, pitch, roll) in radians: DECA's batch_axis2euler.

    DECA turns aa into a unit quaternion, then a rotation matrix R, and reads yaw = asin(R[2,0]),
    pitch = atan2(R[2,1], R[2,2]), roll = atan2(R[1,0], R[0,0]) (each atan2 argument divided by cos(yaw)),
    i.e. R = Rz(roll) · Ry(−yaw) · Rx(pitch): pitch turns about x, roll about z, and yaw about −y (a
    rotation of +30° about y gives yaw −30°). Where the official code differs, we keep what it means:
    - every sample gets its own angles (batch_matrix2euler returns the last sample's, shape (1, 3); DECA
      calls it on one image at a time);
    - at gimbal lock, R[2,0] > 0.998 (< −0.998), the official branch raises NameError (np and atan2 are not
      imported there); here yaw = +90° (−90°), roll = 0, pitch = atan2(∓R[0,1], ∓R[0,2]) as written;
    - gradients are finite everywhere, also for a zero rotation.
    """
    a0, a1, a2 = aa[:, 0:1], aa[:, 1:2], aa[:, 2:3]
    t2 = a0 * a0 + a1 * a1 + a2 * a2  # θ² (B, 1)
    t = t2.clamp_min(1e-30).sqrt()
    nonzero = t2 > 0
    k = torch.where(nonzero, torch.sin(t * 0.5) / t, torch.full_like(t, 0.5))
    q = torch.cat([torch.where(nonzero, torch.cos(t * 0.5), torch.ones_like(t)), aa * k], -1)  # (w, x, y, z)
    w, x, y, z = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
    r00, r01, r02 = w * w + x * x - y * y - z * z, 2 * x * y - 2 * w * z, 2 * w * y + 2 * x * z
    r10 = 2 * w * z + 2 * x * y
    r20, r21, r22 = 2 * x * z - 2 * w * y, 2 * w * x + 2 * y * z, w * w - x * x - y * y + z * z
    regular = r20.abs() <= 0.998
    # Each branch sees safe inputs where it is not selected, so no NaN leaks into the gradients.
    yaw = torch.asin(r20.clamp(-0.998, 0.998))
    c = torch.cos(yaw)
    one, zero = torch.ones_like(r20), torch.zeros_like(r20)
    pitch = torch.atan2(torch.where(regular, r21, zero) / c, torch.where(regular, r22, one) / c)
    roll = torch.atan2(torch.where(regular, r10, zero) / c, torch.where(regular, r00, one) / c)
    s = torch.where(r20 > 0, one, -one)
    pitch_lock = torch.atan2(torch.where(regular, zero, -s * r01), torch.where(regular, one, -s * r02))
    return torch.stack([torch.where(regular, yaw, s * (math.pi / 2)), torch.where(regular, pitch, pitch_lock),
                        torch.where(regular, roll, zero)], -1)


def deca_crop(left, top, right, bottom):
    """A 68-landmark box -> DECA's crop (cx, cy, size), as a (..., 3) tensor: bbox2point('kpt68'), × 1.25, int."""
    left, top, right, bottom = (torch.as_tensor(v, dtype=torch.float64) for v in (left, top, right, bottom))
    old_size = (right - left + bottom - top) / 2 * 1.1
    size = torch.trunc(old_size * 1.25)  # TestData: size = int(old_size * scale)
    return torch.stack([right - (right - left) / 2.0, bottom - (bottom - top) / 2.0, size], -1)


def crop_matrix(crop, out_size=DECA_SIZE):
    """(B, 3) crops (cx, cy, size) -> (B, 2, 3) pixel maps input -> crop: skimage's similarity transform.

    TestData takes three corners of the square (cx ± size/2, cy ± size/2) to (0, 0), (0, 223), (223, 0);
    these pairs are exactly similar, so estimate_transform('similarity') is scale s = 223/size, no rotation.
    """
    cx, cy, size = crop.unbind(-1)
    s = (out_size - 1) / size
    zero = torch.zeros_like(s)
    return torch.stack([torch.stack([s, zero, -s * (cx - size / 2)], -1),
                        torch.stack([zero, s, -s * (cy - size / 2)], -1)], -2)


def warp_affine(x, M, out_size):
    """(B, C, H, W), M (B, 2, 3) pixel map input -> output -> (B, C, S, S): kornia 0.4.1's warp_affine.

    Bilinear, zero padding. kornia 0.4.1 (the version StyleMask pins) normalises pixel coordinates with
    (W − 1), pixel centres at ±1, yet samples with align_corners=False, pixel edges at ±1; we keep that
    mix, so per axis output pixel u reads input position W/(W−1) · M⁻¹((u + ½)(S − 1)/S) − ½.
    """
    B, C, H, W = x.shape

    def to_unit(h, w):  # kornia's normal_transform_pixel: pixels -> [-1, 1] (1, 3, 3)
        return torch.tensor([[[2 / (w - 1), 0, -1], [0, 2 / (h - 1), -1], [0, 0, 1]]], dtype=x.dtype, device=x.device)

    # kornia's chain of products and inverse, in the image's precision, so that the samples agree with it
    M3 = torch.cat([M.to(x), torch.tensor([[[0, 0, 1]]]).to(x).expand(len(M), -1, -1)], 1)
    theta = torch.linalg.inv(to_unit(out_size, out_size) @ (M3 @ torch.linalg.inv(to_unit(H, W))))  # out -> in
    grid = F.affine_grid(theta[:, :2], [B, C, out_size, out_size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def deca_params(D, img, crop=None):
    """(B, 3, H, W) generator images in [-1, 1] -> deca_split's dict plus euler (B, 3): yaw, pitch, roll in degrees.

    As StyleMask's trainer: pool to 256×256 (its face_pool; skipped at 256), calculate_shapemodel's
    [-1, 1] -> [0, 255] (clamp, + 1, / (2 + 1e-5), × 255), TestData.get_image_tensor's similarity crop to
    224×224 (kornia 0.4.1's warp_affine, then / 255), E_flame and decompose_code; euler is
    rad2deg(batch_axis2euler(pose[:, :3])), see axis_angle_to_euler for its axes.
    crop: None for FFHQ_DECA_CROP, set on the pooled 256×256 image, so it fits FFHQ-aligned faces of any
    size; or (cx, cy, size) in pixels of the input image (pixel centres at integers, as landmarks are),
    e.g. deca_crop(*box) of FAN's 68-landmark box as the official code finds it per image; or a (B, 3)
    tensor of per-image crops.
    """
    B, _, H, W = img.shape
    x = img if (H, W) == (256, 256) else F.adaptive_avg_pool2d(img, 256)
    x = (x.clamp(-1, 1) + 1) / (2 + 1e-5) * 255.0
    if crop is None:
        crop = torch.tensor(FFHQ_DECA_CROP, dtype=torch.float64)
    else:  # input pixels -> pixels of the 256×256 image
        crop = torch.as_tensor(crop, dtype=torch.float64).cpu()
        if crop.shape not in ((3,), (1, 3), (B, 3)):
            raise StyleMaskError(f"deca_params: crop must be (cx, cy, size) or ({B}, 3), got shape {tuple(crop.shape)}")
        cx, cy, size = crop.unbind(-1)
        crop = torch.stack([(cx + 0.5) * 256 / W - 0.5, (cy + 0.5) * 256 / H - 0.5, size * 256 / W], -1)
    M = crop_matrix(crop.reshape(-1, 3).expand(B, -1))  # (B, 2, 3)
    x = warp_affine(x, M, DECA_SIZE) / 255.0  # (B, 3, 224, 224) in [0, 1]
    out = deca_split(deca_encode(D, x))
    pi = torch.tensor(math.pi, dtype=img.dtype, device=img.device)  # rad2deg divides by pi in the image's dtype
    out["euler"] = 180.0 * axis_angle_to_euler(out["pose"][:, :3]) / pi
    return out


# --- Loading and the tiny embedded defaults ---------------------------------------------------------

def check_facenet(P):
    """check_arcface, check_deca or check_e4e, whichever P's tensor names call for; else StyleMaskError."""
    if "latlayer1.weight" in P:  # e4e shares ArcFace's input_layer.* and body.* names
        return check_e4e(P)
    if "input_layer.0.weight" in P:
        return check_arcface(P)
    if "encoder.conv1.weight" in P:
        return check_deca(P)
    raise StyleMaskError("not an ArcFace or DECA encoder (neither input_layer.* nor encoder.* tensors)")


def load(path, device="cpu"):
    """Read an ArcFace, DECA or e4e file written by weights/convert.py (kinds 'arcface', 'deca', 'e4e'), checked fully."""
    return sm.load(path, device, check=check_facenet)


def _calibration_images(size, seed):
    """(48, 3, size, size) deterministic random images in [-1, 1], from smooth to saturated and noisy.

    A stand-in for what the tiny networks will see (the tiny generator's images are colourful patterns,
    a quarter of their pixels beyond ±1), used to set their output statistics.
    """
    gen = torch.Generator().manual_seed(seed)
    imgs = []
    for cells in (2, 6, 24, size):  # structure from global colour casts to pixel noise
        field = F.interpolate(torch.randn(12, 3, cells, cells, generator=gen), size=size, mode="bilinear",
                              align_corners=False)
        gain = torch.tensor([0.5, 1.0, 3.0, 10.0]).repeat(3)[:, None, None, None]
        imgs.append(torch.tanh(gain * field + 0.5 * torch.randn(12, 3, 1, 1, generator=gen)))
    return torch.cat(imgs)


def _random_params(shapes, gen):
    """Random weights for the shapes: He-normal convs and linears, PReLU 0.25, mildly random BatchNorms."""
    P = {}
    for k, shape in shapes.items():
        if k.endswith("running_mean") or k.endswith(".bias"):
            P[k] = 0.1 * torch.randn(shape, generator=gen)
        elif k.endswith("running_var"):
            P[k] = 0.75 + 0.5 * torch.rand(shape, generator=gen)
        elif k.endswith("input_layer.2.weight") or k.endswith("res_layer.2.weight"):  # PReLU slopes
            P[k] = 0.25 + 0.05 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:  # BatchNorm weights
            P[k] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:])
            P[k] = torch.randn(shape, generator=gen) * math.sqrt(2 / fan_in)
    return P




def tiny_arcface(seed=0):
    """The embedded default ArcFace: ARCFACE_CONFIGS['tiny'] (4 IR-SE units) with random weights, 512-d output.

    The last BatchNorm1d gets the statistics of the features of 48 random images, so features are
    centred and different images get clearly different unit vectors (cosine well below 1).
    """
    A = _random_params(arcface_shapes(ARCFACE_CONFIGS["tiny"]), torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x = _bn(A, "output_layer.0", _arcface_trunk(A, _calibration_images(ARCFACE_SIZE, seed + 1))).flatten(1)
        h = F.linear(x, A["output_layer.3.weight"], A["output_layer.3.bias"])  # (48, 512) before the BN1d
    A["output_layer.4.running_mean"], A["output_layer.4.running_var"] = h.mean(0), h.var(0)
    return A


# What the tiny DECA's codes look like: centre and half-width per code (cam: scale, tx, ty). Real DECA
# codes are of this order: FLAME's shape/exp coefficients in units of their PCA std, head pose in
# radians, an orthographic scale near 9 for a face filling the 224×224 crop.
TINY_DECA_RANGES = dict(shape=(0.0, 0.4), tex=(0.0, 0.4), exp=(0.0, 0.4), pose=(0.0, 0.15),
                        cam=((9.0, 0.0, 0.0), (0.5, 0.05, 0.05)), light=(0.0, 0.3))


def tiny_deca(seed=0):
    """The embedded default DECA encoder: DECA_CONFIGS['tiny'] with random weights and well-behaved codes.

    The last Linear is rescaled per output so that over 48 random images (smooth to noisy) each code
    sits at the centre of TINY_DECA_RANGES and spans its half-width; head pose thus stays well inside
    ±0.3 rad and shape/exp inside ±1 on typical inputs (checked on the tiny generator's images in the tests).
    """
    D = _random_params(deca_shapes(DECA_CONFIGS["tiny"]), torch.Generator().manual_seed(seed))
    with torch.no_grad():
        code = deca_encode(D, (_calibration_images(DECA_SIZE, seed + 1) + 1) / 2)  # (48, 236)
    centre, half = [], []
    for name, d in DECA_CODE:
        c, h = TINY_DECA_RANGES[name]
        centre.append(torch.as_tensor(c, dtype=torch.float32).expand(d))
        half.append(torch.as_tensor(h, dtype=torch.float32).expand(d))
    centre, half = torch.cat(centre), torch.cat(half)
    mean, spread = code.mean(0), (code - code.mean(0)).abs().amax(0)
    gain = half / spread.clamp_min(1e-6)
    D["layers.2.weight"] = D["layers.2.weight"] * gain[:, None]
    D["layers.2.bias"] = (D["layers.2.bias"] - mean) * gain + centre
    return D


def _default(path, name, tiny, official, say):
    """(params, is_tiny): sm.default_weights with this module's loader."""
    return sm.default_weights(name, tiny, official + " {path}", path, say, loader=load)


def default_arcface(path=None, say=print):
    """(A, is_tiny): the ArcFace at path; with no path weights/arcface.safetensors, else tiny_arcface()."""
    return _default(path, "arcface.safetensors", tiny_arcface, "model_ir_se50.pth", say)


def default_deca(path=None, say=print):
    """(D, is_tiny): the DECA encoder at path; with no path weights/deca.safetensors, else tiny_deca()."""
    return _default(path, "deca.safetensors", tiny_deca, "deca_model.tar", say)


def load_all(generator=None, arcface=None, deca=None, flame=None, say=print):
    """(G, A, D, Fl, tiny): generator, ArcFace, DECA encoder and FLAME, all converted or all tiny.

    Paths given must exist; otherwise weights/<name>.safetensors are used. Some but not all four
    present is an error: real faces scored by random networks (or the reverse) would mean nothing.
    """
    paths = {"generator": generator, "arcface": arcface, "deca": deca, "flame": flame}
    for name, p in paths.items():
        if p and not Path(p).is_file():
            raise StyleMaskError(f"{p}: no such file (--{name}); convert the official weights with "
                                 f"weights/convert.py (see weights/README.md)")
    found = {k: bool(v) or (sm.WEIGHTS_DIR / f"{k}.safetensors").is_file() for k, v in paths.items()}
    if any(found.values()) and not all(found.values()):
        have = ", ".join(k for k, v in found.items() if v)
        lack = ", ".join(f"weights/{k}.safetensors" for k, v in found.items() if not v)
        raise StyleMaskError(f"converted weights found for {have} but not {lack}: convert all four "
                             f"(see weights/README.md), or none for the tiny defaults")
    quiet = (lambda *_: None) if not any(found.values()) else say
    G, tiny = sm.default_generator(generator, say=quiet)
    A, _ = default_arcface(arcface, say=quiet)
    D, _ = default_deca(deca, say=quiet)
    Fl, _ = sm.default_flame(flame, say=quiet)
    if tiny:
        say("note: no converted weights in weights/: using the TINY embedded defaults (random generator, "
            "ArcFace, DECA and 3DMM). This checks the pipeline; it says nothing about faces. See weights/README.md.")
    return G, A, D, Fl, tiny


# --- e4e inversion: real images -> W+ codes ---------------------------------------------------------
# encoder4editing's Encoder4Editing(50, 'ir_se') as pSp wraps it (`models/psp.py`), the `e4e_ffhq_encode.pt`
# StyleMask loads for real images (run_inference.py, libs/models/inversion/). Tensor names are the
# checkpoint's `state_dict` keys with the `encoder.` prefix stripped, exactly as pSp's get_keys(ckpt,
# 'encoder') loads them, plus the top-level `latent_avg`:
#   input_layer.*, body.{0..23}.*       the IR-SE50 trunk of ArcFace above (same units, same names)
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
E4E_CONFIGS = {
    "ffhq-1024": dict(width=64, units=ARCFACE_CONFIGS["ir_se50"]["units"], se=16, w_dim=512, n_styles=18),
    # The embedded default: one narrow IR-SE unit per stage; the tiny generator's w_dim and n_ws.
    "tiny": dict(width=8, units=[8, 16, 24, 32], se=8, w_dim=32, n_styles=14),
}


def e4e_config(E):
    """The architecture of E read off its shapes: trunk (as arcface_config), w_dim, n_styles, FPN width."""
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


def _e4e_taps(cfg):
    """Body-unit indices (c1, c2, c3): the last units of stages 2, 3, 4 (6, 20, 23 for IR-SE50)."""
    starts = [i for i, s in enumerate(_arcface_strides(cfg)) if s == 2]
    if len(starts) != 4:
        raise StyleMaskError(f"an e4e trunk has 4 stages of distinct widths, this one has {len(starts)}")
    return starts[2] - 1, starts[3] - 1, len(cfg["units"]) - 1


def e4e_shapes(cfg):
    """Every tensor of an Encoder4Editing with architecture cfg (plus latent_avg (w_dim,)), name -> shape."""
    trunk = arcface_shapes(dict(cfg, emb=1, affine=True))
    shapes = {k: v for k, v in trunk.items() if not k.startswith("output_layer.")}
    t1, t2, t3 = _e4e_taps(cfg)
    c1, c2, c3 = cfg["units"][t1], cfg["units"][t2], cfg["units"][t3]
    side = E4E_SIZE // 16  # c3's side: four stride-2 stages
    for i in range(cfg["n_styles"]):
        spatial = side if i < E4E_COARSE else 2 * side if i < E4E_MIDDLE else 4 * side  # 16, 32, 64
        c_in = c3
        for k in range(int(math.log2(spatial))):
            shapes[f"styles.{i}.convs.{2 * k}.weight"] = (cfg["w_dim"], c_in, 3, 3)
            shapes[f"styles.{i}.convs.{2 * k}.bias"] = (cfg["w_dim"],)
            c_in = cfg["w_dim"]
        shapes[f"styles.{i}.linear.weight"] = (cfg["w_dim"], cfg["w_dim"])
        shapes[f"styles.{i}.linear.bias"] = (cfg["w_dim"],)
    shapes.update({"latlayer1.weight": (c3, c2, 1, 1), "latlayer1.bias": (c3,),
                   "latlayer2.weight": (c3, c1, 1, 1), "latlayer2.bias": (c3,), "latent_avg": (cfg["w_dim"],)})
    return shapes


def check_e4e(E, G=None):
    """Raise StyleMaskError unless E is a complete e4e encoder, all finite (and its W+ fits generator G)."""
    cfg = e4e_config(E)
    if cfg["n_styles"] < 8 or cfg["n_styles"] % 2:
        raise StyleMaskError(f"an e4e encoder has 2·log2(resolution) − 2 styles (18 at 1024), not {cfg['n_styles']} styles")
    want = e4e_shapes(cfg)
    if "latent_avg" in E and E["latent_avg"].ndim == 2:  # pSp also stores one row per style
        want["latent_avg"] = (cfg["n_styles"], cfg["w_dim"])
    _check(E, want, "e4e encoder")
    if G is not None:
        gen = sm.config(G)
        if (cfg["n_styles"], cfg["w_dim"]) != (sm.n_ws(G), gen["w_dim"]):
            raise StyleMaskError(f"the e4e encoder gives W+ codes ({cfg['n_styles']}, {cfg['w_dim']}), the generator "
                                 f"reads ({sm.n_ws(G)}, {gen['w_dim']}): use the encoder trained for it")


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
    cfg = e4e_config(E)
    taps = _e4e_taps(cfg)
    x = _bn(E, "input_layer.1", F.conv2d(e4e_input(img), E["input_layer.0.weight"], padding=1))
    x = F.prelu(x, E["input_layer.2.weight"])  # (B, 64, 256, 256)
    feats = []
    for i, stride in enumerate(_arcface_strides(cfg)):
        x = _ir_unit(E, f"body.{i}", x, stride, cfg["se"])
        if i in taps:
            feats.append(x)
    c1, c2, c3 = feats  # (B, 128, 64²), (B, 256, 32²), (B, 512, 16²)
    w0 = _gradual_style(E, 0, c3)
    rows, features = [w0], c3
    for i in range(1, cfg["n_styles"]):
        if i == E4E_COARSE:
            p2 = features = _upsample_add(c3, F.conv2d(c2, E["latlayer1.weight"], E["latlayer1.bias"]))
        elif i == E4E_MIDDLE:
            features = _upsample_add(p2, F.conv2d(c1, E["latlayer2.weight"], E["latlayer2.bias"]))
        rows.append(w0 + _gradual_style(E, i, features))  # w[:, i] += delta_i
    return torch.stack(rows, 1) + E["latent_avg"]  # (B, n_styles, w_dim)


def tiny_e4e(seed=0, G=None):
    """The embedded default e4e: E4E_CONFIGS['tiny'] trunk, random weights, W+ sized for generator G.

    G (default sm.tiny_generator()) sets n_styles = sm.n_ws(G), w_dim and latent_avg (its stored one).
    The linears are rescaled so that over 48 random images w0 − latent_avg spreads like mapped w around
    latent_avg does (per-dimension std over 512 z), and each delta at a third of that: codes stay in
    the region the generator was fed, so the inversions render like generated images.
    """
    G = sm.tiny_generator() if G is None else G
    cfg = dict(E4E_CONFIGS["tiny"], w_dim=sm.config(G)["w_dim"], n_styles=sm.n_ws(G))
    gen = torch.Generator().manual_seed(seed)
    E = _random_params({k: v for k, v in e4e_shapes(cfg).items() if k != "latent_avg"}, gen)
    for i in range(cfg["n_styles"]):  # EqualLinear's weights are N(0, 1), its scale is applied at run time
        E[f"styles.{i}.linear.weight"] = torch.randn(cfg["w_dim"], cfg["w_dim"], generator=gen)
    E["latent_avg"] = torch.zeros(cfg["w_dim"])
    with torch.no_grad():
        w = sm.mapping(G, torch.randn(512, sm.config(G)["z_dim"], generator=gen))
        sigma = (w - G["latent_avg"]).std(0)  # (w_dim,)
        codes = e4e(E, _calibration_images(E4E_SIZE, seed + 1))  # (48, n_styles, w_dim)
        out = torch.cat([codes[:, :1], codes[:, 1:] - codes[:, :1]], 1)  # w0 and the deltas
        mean, std = out.mean(0), out.std(0).clamp_min(1e-6)  # (n_styles, w_dim)
    for i in range(cfg["n_styles"]):
        gain = sigma / std[i] * (1.0 if i == 0 else 1 / 3)
        E[f"styles.{i}.linear.weight"] = E[f"styles.{i}.linear.weight"] * gain[:, None]
        E[f"styles.{i}.linear.bias"] = (E[f"styles.{i}.linear.bias"] - mean[i]) * gain
    E["latent_avg"] = G["latent_avg"].clone()
    return E


def default_e4e(path=None, G=None, say=print):
    """(E, is_tiny): the e4e encoder at path; with no path weights/e4e.safetensors, else tiny_e4e(G=G)."""
    return _default(path, "e4e.safetensors", lambda: tiny_e4e(G=G), "e4e_ffhq_encode.pt", say)
