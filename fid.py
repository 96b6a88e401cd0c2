"""FID: the TensorFlow-compatible Inception-v3 of pytorch-fid and the Fréchet distance, as pure functions.

The paper reports FID (Heusel et al., 2017) between reenacted and real faces. The number depends on the
exact network, so this is pytorch-fid's (mseitzer/pytorch-fid, `inception.py`, `fid_score.py`), which
ports the 2015 TensorFlow graph, with its weights `pt_inception-2015-12-05-6726825d.pth`:

    inception()           `fid_inception_v3()` (torchvision's Inception3 with FIDInceptionA, C, E_1, E_2),
                          run as `InceptionV3([3])`: blocks 0-3, up to the 2048-d average pool (pool3)
    features()            `InceptionV3(resize_input=True, normalize_input=True).forward` on our [-1, 1] images
    statistics()          `calculate_activation_statistics`: mean and np.cov(rowvar=False), float64
    frechet_distance()    `calculate_frechet_distance`: scipy.linalg.sqrtm, the eps fallback, the imaginary check

Where the TensorFlow graph differs from torchvision's Inception-v3 (and pytorch-fid follows it): the
3×3 average pools of the A, C and first E blocks average over valid pixels only (count_include_pad=False),
and the last E block (Mixed_7c) max-pools in its pool branch. Every BasicConv2d is conv (no bias) ->
BatchNorm (eps 1e-3, running statistics) -> ReLU. Parameters are the state dict's tensors with their
official names (`Mixed_6b.branch7x7dbl_3.conv.weight`, `Mixed_7c.branch_pool.bn.running_var`, `fc.weight`),
minus BatchNorm's num_batches_tracked.

Not here: the checkpoint layout, its check and loading (`weights/`; FID has no embedded default, since
a random Inception would give meaningless numbers).

Shapes: B batch, H, W image size, N samples, D feature dims (2048). Generator images are (B, 3, H, W) RGB
in [-1, 1].
"""
import warnings
from collections import namedtuple
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from stylemask import StyleMaskError

BN_EPS = 1e-3  # BasicConv2d's BatchNorm2d(eps=0.001), TensorFlow's
FID_SIZE = 299  # pytorch-fid resizes every input to 299×299
FID_DIMS = 2048  # pool3 features
N_CLASSES = 1008  # the 2015 graph's classifier `fc` (kept in the file, unused by FID)
FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"

# --- The network as a table ----------------------------------------------------------------------------
# Conv: one BasicConv2d. Stem convs carry their own padding; inside the Mixed blocks every stride-1 conv
# pads k // 2 ("same") and every stride-2 conv pads 0 ("valid"), as torchvision's blocks do.
Conv = namedtuple("Conv", "c_in c_out kernel stride padding")

STEM = {  # name: (c_in, c_out, kernel, stride, padding); (B, 3, 299, 299) -> (B, 192, 71, 71), max-pools between
    "Conv2d_1a_3x3": (3, 32, 3, 2, 0), "Conv2d_2a_3x3": (32, 32, 3, 1, 0), "Conv2d_2b_3x3": (32, 64, 3, 1, 1),
    "Conv2d_3b_1x1": (64, 80, 1, 1, 0), "Conv2d_4a_3x3": (80, 192, 3, 1, 0)}

MIXED = (  # (name, block kind, input channels, A: pool_features, C: channels_7x7)
    ("Mixed_5b", "A", 192, 32), ("Mixed_5c", "A", 256, 64), ("Mixed_5d", "A", 288, 64),  # 35×35
    ("Mixed_6a", "B", 288, None),  # -> 17×17
    ("Mixed_6b", "C", 768, 128), ("Mixed_6c", "C", 768, 160), ("Mixed_6d", "C", 768, 160), ("Mixed_6e", "C", 768, 192),
    ("Mixed_7a", "D", 768, None),  # -> 8×8
    ("Mixed_7b", "E_1", 1280, None), ("Mixed_7c", "E_2", 2048, None))


def _block_convs(kind, c, arg):
    """The BasicConv2d layers of one Mixed block over c input channels: branch -> (c_in, c_out, kernel, stride)."""
    if kind == "A":  # 64 + 64 + 96 + pool_features channels out
        return {"branch1x1": (c, 64, 1, 1), "branch5x5_1": (c, 48, 1, 1), "branch5x5_2": (48, 64, 5, 1),
                "branch3x3dbl_1": (c, 64, 1, 1), "branch3x3dbl_2": (64, 96, 3, 1), "branch3x3dbl_3": (96, 96, 3, 1),
                "branch_pool": (c, arg, 1, 1)}
    if kind == "B":  # 384 + 96 + c (max-pool) channels out, stride 2
        return {"branch3x3": (c, 384, 3, 2), "branch3x3dbl_1": (c, 64, 1, 1), "branch3x3dbl_2": (64, 96, 3, 1),
                "branch3x3dbl_3": (96, 96, 3, 2)}
    if kind == "C":  # 4 × 192 channels out; 7×7 factorised into 1×7 and 7×1
        c7 = arg
        return {"branch1x1": (c, 192, 1, 1), "branch7x7_1": (c, c7, 1, 1), "branch7x7_2": (c7, c7, (1, 7), 1),
                "branch7x7_3": (c7, 192, (7, 1), 1), "branch7x7dbl_1": (c, c7, 1, 1),
                "branch7x7dbl_2": (c7, c7, (7, 1), 1), "branch7x7dbl_3": (c7, c7, (1, 7), 1),
                "branch7x7dbl_4": (c7, c7, (7, 1), 1), "branch7x7dbl_5": (c7, 192, (1, 7), 1),
                "branch_pool": (c, 192, 1, 1)}
    if kind == "D":  # 320 + 192 + c (max-pool) channels out, stride 2
        return {"branch3x3_1": (c, 192, 1, 1), "branch3x3_2": (192, 320, 3, 2), "branch7x7x3_1": (c, 192, 1, 1),
                "branch7x7x3_2": (192, 192, (1, 7), 1), "branch7x7x3_3": (192, 192, (7, 1), 1),
                "branch7x7x3_4": (192, 192, 3, 2)}
    # E_1, E_2: 320 + 2·384 + 2·384 + 192 = 2048 channels out
    return {"branch1x1": (c, 320, 1, 1), "branch3x3_1": (c, 384, 1, 1), "branch3x3_2a": (384, 384, (1, 3), 1),
            "branch3x3_2b": (384, 384, (3, 1), 1), "branch3x3dbl_1": (c, 448, 1, 1),
            "branch3x3dbl_2": (448, 384, 3, 1), "branch3x3dbl_3a": (384, 384, (1, 3), 1),
            "branch3x3dbl_3b": (384, 384, (3, 1), 1), "branch_pool": (c, 192, 1, 1)}


def _pair(k):
    return (k, k) if isinstance(k, int) else k


def _all_convs():
    """Every BasicConv2d of the network in forward order: full name -> Conv."""
    convs = {name: Conv(c_in, c_out, _pair(k), s, _pair(p)) for name, (c_in, c_out, k, s, p) in STEM.items()}
    for block, kind, c, arg in MIXED:
        for branch, (c_in, c_out, k, s) in _block_convs(kind, c, arg).items():
            k = _pair(k)
            convs[f"{block}.{branch}"] = Conv(c_in, c_out, k, s, (k[0] // 2, k[1] // 2) if s == 1 else (0, 0))
    return convs


CONVS = _all_convs()  # 94 BasicConv2d layers


# --- The network -------------------------------------------------------------------------------------

def _conv(I, name, x):
    """(B, c_in, H, W) -> (B, c_out, H', W'): BasicConv2d `name`, conv (no bias) -> eval BatchNorm -> ReLU."""
    c = CONVS[name]
    x = F.conv2d(x, I[f"{name}.conv.weight"], stride=c.stride, padding=c.padding)
    x = F.batch_norm(x, I[f"{name}.bn.running_mean"], I[f"{name}.bn.running_var"], I[f"{name}.bn.weight"],
                     I[f"{name}.bn.bias"], training=False, eps=BN_EPS)
    return F.relu(x)


def _branch(I, block, x, *convs):
    """The BasicConv2d layers block.convs[0], block.convs[1], ... applied in turn."""
    for conv in convs:
        x = _conv(I, f"{block}.{conv}", x)
    return x


def _avg_pool_tf(x):
    """3×3 stride-1 average pool over the valid pixels only: TensorFlow's, where torchvision counts the padding."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _mixed_a(I, n, x):
    """(B, C, 35, 35) -> (B, 224 + pool_features, 35, 35): FIDInceptionA."""
    return torch.cat([_branch(I, n, x, "branch1x1"), _branch(I, n, x, "branch5x5_1", "branch5x5_2"),
                      _branch(I, n, x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                      _branch(I, n, _avg_pool_tf(x), "branch_pool")], 1)


def _mixed_b(I, n, x):
    """(B, 288, 35, 35) -> (B, 768, 17, 17): InceptionB (no padding, stride 2; torchvision's as is)."""
    return torch.cat([_branch(I, n, x, "branch3x3"),
                      _branch(I, n, x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                      F.max_pool2d(x, 3, stride=2)], 1)


def _mixed_c(I, n, x):
    """(B, 768, 17, 17) -> (B, 768, 17, 17): FIDInceptionC."""
    return torch.cat([_branch(I, n, x, "branch1x1"), _branch(I, n, x, "branch7x7_1", "branch7x7_2", "branch7x7_3"),
                      _branch(I, n, x, *(f"branch7x7dbl_{i}" for i in range(1, 6))),
                      _branch(I, n, _avg_pool_tf(x), "branch_pool")], 1)


def _mixed_d(I, n, x):
    """(B, 768, 17, 17) -> (B, 1280, 8, 8): InceptionD (no padding, stride 2; torchvision's as is)."""
    return torch.cat([_branch(I, n, x, "branch3x3_1", "branch3x3_2"),
                      _branch(I, n, x, *(f"branch7x7x3_{i}" for i in range(1, 5))),
                      F.max_pool2d(x, 3, stride=2)], 1)


def _mixed_e(I, n, x, pool):
    """(B, C, 8, 8) -> (B, 2048, 8, 8): FIDInceptionE_1 (pool: TF average) or FIDInceptionE_2 (pool: max)."""
    y = _branch(I, n, x, "branch3x3_1")
    z = _branch(I, n, x, "branch3x3dbl_1", "branch3x3dbl_2")
    return torch.cat([_branch(I, n, x, "branch1x1"),
                      _branch(I, n, y, "branch3x3_2a"), _branch(I, n, y, "branch3x3_2b"),
                      _branch(I, n, z, "branch3x3dbl_3a"), _branch(I, n, z, "branch3x3dbl_3b"),
                      _branch(I, n, pool(x), "branch_pool")], 1)


# The last block max-pools: likely a slip in the 2015 graph, but every published FID is computed with it.
_MIXED_FORWARD = {"A": _mixed_a, "B": _mixed_b, "C": _mixed_c, "D": _mixed_d,
                  "E_1": partial(_mixed_e, pool=_avg_pool_tf),
                  "E_2": partial(_mixed_e, pool=partial(F.max_pool2d, kernel_size=3, stride=1, padding=1))}


def inception(I, x):
    """(B, 3, H, W) in [-1, 1], H, W >= 75 -> (B, 2048) pool3 features: pytorch-fid's InceptionV3 blocks 0-3."""
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
        x = _conv(I, name, x)  # (B, 64, 147, 147) at 299
    x = F.max_pool2d(x, 3, stride=2)  # block 0 ends: (B, 64, 73, 73)
    x = _conv(I, "Conv2d_4a_3x3", _conv(I, "Conv2d_3b_1x1", x))  # (B, 192, 71, 71)
    x = F.max_pool2d(x, 3, stride=2)  # block 1 ends: (B, 192, 35, 35)
    for name, kind, _, _ in MIXED:
        x = _MIXED_FORWARD[kind](I, name, x)  # block 2 ends after Mixed_6e: (B, 768, 17, 17)
    return F.adaptive_avg_pool2d(x, 1).flatten(1)  # block 3: (B, 2048, 8, 8) -> (B, 2048)


def features(I, img):
    """(B, 3, H, W) generator images in [-1, 1], any size -> (B, 2048) pool3 features, preprocessed as pytorch-fid.

    pytorch-fid reads image files as [0, 1], resizes to 299×299 (bilinear, align_corners=False, no
    antialiasing) and maps to [-1, 1] by 2x − 1. Bilinear weights sum to one, so the resize commutes with
    that affine map: resizing our [-1, 1] images directly is the same computation up to float rounding.
    Its inputs never leave [0, 1] (they are images), so ours are clamped to [-1, 1] first, as saving them
    would; the 8-bit rounding of a saved file is not applied.
    """
    x = F.interpolate(img.clamp(-1, 1), size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False)
    return inception(I, x)


# --- The Fréchet distance ------------------------------------------------------------------------------

def _float64(a):
    """A numpy float64 array from a tensor (any device) or an array."""
    return np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)


def statistics(feats):
    """(N, D) features -> mu (D,), sigma (D, D) in float64: pytorch-fid's mean and np.cov(rowvar=False)."""
    a = _float64(feats)
    if a.ndim != 2 or a.shape[0] < 2:
        raise StyleMaskError(f"statistics: need (N, D) features with N >= 2, got shape {a.shape}")
    return np.mean(a, axis=0), np.cov(a, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6, say=print):
    """d² = |mu1 − mu2|² + Tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^½): pytorch-fid's calculate_frechet_distance.

    As the official function: scipy's sqrtm of the (non-symmetric) product in float64; if that is not
    finite (a singular product), eps is added to both diagonals and it is taken again (saying so); an
    imaginary part from rounding is dropped unless the diagonal's exceeds 1e-3, which raises.
    """
    mu1, mu2 = np.atleast_1d(_float64(mu1)), np.atleast_1d(_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_float64(sigma1)), np.atleast_2d(_float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise StyleMaskError(f"frechet_distance: means {mu1.shape}, {mu2.shape} and covariances {sigma1.shape}, "
                             f"{sigma2.shape} do not fit together")
    diff = mu1 - mu2
    # Singular products are common (N < D samples): no scipy warning, as the official disp=False (an argument
    # deprecated since scipy 1.16 that changes nothing in the root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            say(f"note: fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise StyleMaskError(f"frechet_distance: the matrix square root has an imaginary component "
                                 f"{np.max(np.abs(covmean.imag)):.3g}: are both covariances positive semi-definite?")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
