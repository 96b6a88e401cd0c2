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

Not here: checkpoint layouts, checks, loading and the seeded stand-ins (`weights/`); e4e, which
inverts real faces and supervises nothing (`e4e.py`, built on the IR-SE trunk below).

Shapes: B batch, H, W image size. Generator images are (B, 3, H, W) RGB in [-1, 1]. A holds ArcFace's
parameters, P DECA's E_flame parameters (named `deca` in the scripts).
"""
import contextlib
import math

import torch
import torch.nn.functional as F

from stylemask import DECA_SIZE, StyleMaskError

BN_EPS = 1e-5  # every BatchNorm of both networks uses torch's default (DECA's unused D_detail sets 0.8)
_BATCH_STATISTICS = [False]  # True inside `batch_statistics()`


def bn(P, name, x):
    """Eval-mode BatchNorm1d/2d `name` of P: running statistics, then weight and bias if it has them
    (inside `batch_statistics()`: training mode)."""
    return F.batch_norm(x, P[f"{name}.running_mean"], P[f"{name}.running_var"], P.get(f"{name}.weight"),
                        P.get(f"{name}.bias"), training=_BATCH_STATISTICS[0], momentum=0.1, eps=BN_EPS)


@contextlib.contextmanager
def batch_statistics():
    """Within it, every BatchNorm runs as in torch's training mode: it normalises by the batch's statistics
    and updates its running ones in place (momentum 0.1). For training networks of these formats (the
    synthetic world's encoders, world/encoders.py); everything else runs in eval mode, as officially."""
    _BATCH_STATISTICS[0] = True
    try:
        yield
    finally:
        _BATCH_STATISTICS[0] = False


# --- ArcFace IR-SE50 --------------------------------------------------------------------------------
# TreB1eN's Backbone, as pSp/StyleMask ship it in `model_ir_se50.pth`:
#   input_layer.{0 conv3×3, 1 BN, 2 PReLU}
#   body.{i}.res_layer.{0 BN, 1 conv3×3, 2 PReLU, 3 conv3×3/stride, 4 BN, 5 SE: fc1, fc2 (1×1, no bias)}
#   body.{i}.shortcut_layer.{0 conv1×1/stride, 1 BN} where the width changes, else MaxPool2d(1, stride)
#   output_layer.{0 BN2d, 1 Dropout, 2 Flatten, 3 Linear(512·7·7, 512), 4 BN1d}, then l2 normalisation.
# get_blocks(50): 3, 4, 14, 3 units of widths 64, 128, 256, 512, each stage's first unit with stride 2.
# A stage starts at unit 0 and wherever the width changes, so the shapes alone give the architecture
# (`arcface_arch`) and a smaller network of the same family runs through the same functions.

ARCFACE_ARCHS = {
    "ir_se50": dict(width=64, units=[64] * 3 + [128] * 4 + [256] * 14 + [512] * 3, se=16, emb=512, affine=True),
    # The embedded default: one unit per stage, narrow; same input size, output and strides.
    "tiny": dict(width=16, units=[16, 32, 48, 64], se=16, emb=512, affine=True),
}
ARCFACE_SIZE = 112
ARCFACE_CROP = (35, 223, 32, 220)  # IDLoss.extract_feats: rows 35:223, columns 32:220 of a 256×256 image


def arcface_arch(A):
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


def ir_se_strides(arch):
    """Stride of each unit: 2 for a stage's first unit (unit 0, and wherever the width changes), else 1."""
    widths = [arch["width"]] + arch["units"]
    return [2 if i == 0 or widths[i] != widths[i + 1] else 1 for i in range(len(arch["units"]))]


def ir_se_unit(A, name, x, stride, se):
    """(B, Cin, H, W) -> (B, C, H/stride, W/stride): bottleneck_IR_SE, residual branch plus shortcut."""
    if f"{name}.shortcut_layer.0.weight" in A:
        shortcut = bn(A, f"{name}.shortcut_layer.1", F.conv2d(x, A[f"{name}.shortcut_layer.0.weight"], stride=stride))
    else:
        shortcut = x[:, :, ::stride, ::stride]  # MaxPool2d(1, stride) only subsamples
    r = bn(A, f"{name}.res_layer.0", x)
    r = F.prelu(F.conv2d(r, A[f"{name}.res_layer.1.weight"], padding=1), A[f"{name}.res_layer.2.weight"])
    r = bn(A, f"{name}.res_layer.4", F.conv2d(r, A[f"{name}.res_layer.3.weight"], stride=stride, padding=1))
    if se:  # squeeze-and-excitation: channel gates from the global average
        g = F.relu(F.conv2d(r.mean((2, 3), keepdim=True), A[f"{name}.res_layer.5.fc1.weight"]))  # (B, C/16, 1, 1)
        r = r * torch.sigmoid(F.conv2d(g, A[f"{name}.res_layer.5.fc2.weight"]))
    return r + shortcut


def arcface_trunk(A, x):
    """(B, 3, 112, 112) -> (B, 512, 7, 7): the Backbone's input layer and body."""
    arch = arcface_arch(A)
    x = bn(A, "input_layer.1", F.conv2d(x, A["input_layer.0.weight"], padding=1))
    x = F.prelu(x, A["input_layer.2.weight"])  # (B, 64, 112, 112)
    for i, stride in enumerate(ir_se_strides(arch)):
        x = ir_se_unit(A, f"body.{i}", x, stride, arch["se"])
    return x


def _arcface_embed(A, x):
    """(B, 512, 7, 7) -> (B, 512) before l2 normalisation: BN2d, (Dropout: identity in eval), Flatten, Linear, BN1d."""
    x = bn(A, "output_layer.0", x).flatten(1)  # (B, 512·7·7)
    return bn(A, "output_layer.4", F.linear(x, A["output_layer.3.weight"], A["output_layer.3.bias"]))


def arcface(A, x):
    """(B, 3, 112, 112) face crop in [-1, 1] -> (B, 512) unit-length identity features (the official Backbone)."""
    x = _arcface_embed(A, arcface_trunk(A, x))  # (B, 512)
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

DECA_ARCHS = {
    "resnet50": dict(width=64, layers=[(64, 3), (128, 4), (256, 6), (512, 3)], hidden=1024),
    # The embedded default: one narrow bottleneck per layer; same input size, strides and code layout.
    "tiny": dict(width=8, layers=[(4, 1), (8, 1), (16, 1), (32, 1)], hidden=64),
}
DECA_CODE = (("shape", 100), ("tex", 50), ("exp", 50), ("pose", 6), ("cam", 3), ("light", 27))  # param_list
# Default crop (cx, cy, size) in pixels of a 256×256 FFHQ-aligned image, pixel centres at integers. The
# official code runs the FAN landmark detector on every image and crops with TestData.bbox2point('kpt68')
# and scale 1.25 (`deca_crop`). We ship no FAN; these constants apply that rule to an average face: the
# OpenFace/dlib mean 68-point shape, put through FFHQ's alignment (eyes–mouth quad, c = eye_avg +
# 0.1·eye_to_mouth at the centre) at 256×256, has its landmark box at x 54.1..203.3, y 97.3..243.5
# (brows to chin), so size = int(1.25 · 1.1 · (149.3 + 146.3) / 2) = 203 and cy = 170.4; cx = 127.5 is the
# aligned image's axis of symmetry. An approximation: real faces and FAN's landmarks vary by a few pixels.
FFHQ_DECA_CROP = (127.5, 170.4, 203.0)


def deca_arch(P):
    """The architecture of P read off its shapes: stem width, (planes, blocks) per layer, hidden width, code size."""
    try:
        layers = []
        for k in range(1, 5):
            n = sum(1 for key in P if key.startswith(f"encoder.layer{k}.") and key.endswith(".conv1.weight"))
            layers.append((int(P[f"encoder.layer{k}.0.conv1.weight"].shape[0]), n))
        return dict(width=int(P["encoder.conv1.weight"].shape[0]), layers=layers,
                    hidden=int(P["layers.0.weight"].shape[0]), n_out=int(P["layers.2.weight"].shape[0]))
    except KeyError as e:
        raise StyleMaskError(f"not a DECA E_flame encoder: tensor {e.args[0]!r} is missing") from None


def _bottleneck(P, name, x, stride):
    """(B, Cin, H, W) -> (B, 4·planes, H/stride, W/stride): torchvision's Bottleneck, stride on the 3×3 conv."""
    out = F.relu(bn(P, f"{name}.bn1", F.conv2d(x, P[f"{name}.conv1.weight"])))
    out = F.relu(bn(P, f"{name}.bn2", F.conv2d(out, P[f"{name}.conv2.weight"], stride=stride, padding=1)))
    out = bn(P, f"{name}.bn3", F.conv2d(out, P[f"{name}.conv3.weight"]))
    if f"{name}.downsample.0.weight" in P:
        x = bn(P, f"{name}.downsample.1", F.conv2d(x, P[f"{name}.downsample.0.weight"], stride=stride))
    return F.relu(out + x)


def deca_encode(P, x):
    """(B, 3, 224, 224) RGB face crop in [0, 1] -> (B, 236) DECA code: E_flame (ResNet-50 + MLP), eval mode."""
    x = F.relu(bn(P, "encoder.bn1", F.conv2d(x, P["encoder.conv1.weight"], stride=2, padding=3)))  # (B, 64, 112²)
    x = F.max_pool2d(x, 3, stride=2, padding=1)  # (B, 64, 56, 56)
    for k in range(1, 5):
        j = 0
        while f"encoder.layer{k}.{j}.conv1.weight" in P:
            x = _bottleneck(P, f"encoder.layer{k}.{j}", x, stride=2 if k > 1 and j == 0 else 1)
            j += 1
    x = F.avg_pool2d(x, 7, stride=1).flatten(1)  # AvgPool2d(7) of the 7×7 map: (B, 2048)
    if x.shape[1] != P["layers.0.weight"].shape[1]:
        raise StyleMaskError(f"deca_encode: the input must be (B, 3, {DECA_SIZE}, {DECA_SIZE})")
    h = F.relu(F.linear(x, P["layers.0.weight"], P["layers.0.bias"]))  # (B, 1024)
    return F.linear(h, P["layers.2.weight"], P["layers.2.bias"])


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


def deca_params(P, img, crop=None):
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
    out = deca_split(deca_encode(P, x))
    pi = torch.tensor(math.pi, dtype=img.dtype, device=img.device)  # rad2deg divides by pi in the image's dtype
    out["euler"] = 180.0 * axis_angle_to_euler(out["pose"][:, :3]) / pi
    return out
