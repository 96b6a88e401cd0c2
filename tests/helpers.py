"""Shared independent references for the tests: what the tests compare the package against.

Written from the definitions and the official code, never from stylemask/facenets/fid/kernels: a pixel-loop
upfirdn2d and a per-sample modulated conv, a naive one-sample-at-a-time StyleGAN2, torch.nn rebuilds of the
official networks (ArcFace IR-SE, DECA's ResNet encoder, e4e's Encoder4Editing, pytorch-fid's Inception) with
the official state-dict names, and the random weights they are built with. Imported by the test modules
(`from helpers import ...`); pytest fixtures live in conftest.py. No tests here: nothing named test_*.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# === (a) Kernel oracles: upfirdn2d by its definition, modconv as the official per-sample formulation ========

def rand(gen, *shape, dtype=torch.float64):
    """Standard normal float64 (default) values from gen: the kernel tests' inputs."""
    return torch.randn(*shape, generator=gen, dtype=dtype)


def upfirdn_loop(x, f, up, down, pad, flip_filter=False, gain=1.0):
    """The definition, pixel by pixel: zero-insert, pad/crop, convolve, decimate (numpy, slow)."""
    x, f = np.asarray(x, np.float64), np.asarray(f, np.float64) * gain
    if not flip_filter:
        f = f[::-1, ::-1]
    B, C, H, W = x.shape
    x0, x1, y0, y1 = pad
    u = np.zeros((B, C, H * up, W * up))
    u[:, :, ::up, ::up] = x
    Hp, Wp = H * up + y0 + y1, W * up + x0 + x1
    p = np.zeros((B, C, Hp, Wp))
    for yy in range(Hp):          # pixel (yy, xx) of the padded image is u[yy - y0, xx - x0] if inside
        for xx in range(Wp):
            sy, sx = yy - y0, xx - x0
            if 0 <= sy < H * up and 0 <= sx < W * up:
                p[:, :, yy, xx] = u[:, :, sy, sx]
    kh, kw = f.shape
    out = np.zeros((B, C, Hp - kh + 1, Wp - kw + 1))
    for i in range(kh):
        for j in range(kw):
            out += f[i, j] * p[:, :, i:i + out.shape[2], j:j + out.shape[3]]
    return out[:, :, ::down, ::down]


def upfirdn2d_inputs(seed, B, C, H, W, up, kh, kw, pad, rand=rand):
    """(generator, x, f) for one upfirdn2d case, drawn from rand; None where no output pixel is fully
    covered by the filter (nothing to compare). Shared by the upfirdn2d tests of every variant."""
    x0, x1, y0, y1 = pad
    if H * up + y0 + y1 < kh or W * up + x0 + x1 < kw:
        return None
    g = torch.Generator().manual_seed(seed)
    return g, rand(g, B, C, H, W), rand(g, kh, kw)


def modconv_per_sample(x, weight, s, demodulate, up, fir, differentiable=False):
    """The official formulation: explicit per-sample weights w'' = demod(weight · s), one conv each.
    differentiable: the blur as a depthwise F.conv2d of the flipped filter (a true convolution, by definition)
    instead of the numpy loop, so that autograd gives the gradients of this formulation."""
    outs = []
    for b in range(x.shape[0]):
        w = weight * s[b][None, :, None, None]  # (Cout, Cin, k, k)
        if demodulate:
            w = w / torch.sqrt(w.square().sum([1, 2, 3], keepdim=True) + 1e-8)
        if up == 1:
            y = F.conv2d(x[b:b + 1], w, padding=w.shape[-1] // 2)
        else:  # transposed stride-2 conv, then the blur with rosinality's padding (1, 1) for k = 3
            y = F.conv_transpose2d(x[b:b + 1], w.transpose(0, 1), stride=2)
            if differentiable:
                taps = fir.flip([0, 1])[None, None].expand(y.shape[1], 1, *fir.shape).to(y)
                y = F.conv2d(F.pad(y, (1, 1, 1, 1)), taps, groups=y.shape[1])
            else:
                y = torch.from_numpy(upfirdn_loop(y, fir, 1, 1, (1, 1, 1, 1)))
        outs.append(y)
    return torch.cat(outs)


# === (b) The naive generator: rosinality's Generator.forward, one sample at a time ==========================

# A small custom architecture: every code path of config-f, fast enough for naive loops.
SMALL = dict(resolution=32, z_dim=16, w_dim=12, n_mlp=3, channels={4: 8, 8: 8, 16: 6, 32: 4})


def naive_mapping(G, z, n_mlp, lr_mul=0.01):
    x = z / torch.sqrt((z * z).mean() + 1e-8)
    for k in range(1, n_mlp + 1):
        W, b = G[f"style.{k}.weight"], G[f"style.{k}.bias"]
        x = W @ x * (lr_mul / math.sqrt(W.shape[1])) + b * lr_mul
        x = torch.where(x >= 0, x, 0.2 * x) * math.sqrt(2)
    return x


def naive_layer(G, name, x, w, up=False, demod=True, noise=None):
    """ModulatedConv2d + NoiseInjection + FusedLeakyReLU (or ToRGB without activation) for one sample."""
    A, b = G[f"{name}.conv.modulation.weight"], G[f"{name}.conv.modulation.bias"]
    style = A @ w / math.sqrt(A.shape[1]) + b  # (Cin,)
    weight = G[f"{name}.conv.weight"][0]  # (Cout, Cin, k, k)
    weight = weight / math.sqrt(weight[0].numel()) * style[None, :, None, None]
    if demod:
        weight = weight / torch.sqrt((weight ** 2).sum([1, 2, 3], keepdim=True) + 1e-8)
    if up:
        y = F.conv_transpose2d(x[None], weight.transpose(0, 1), stride=2)
        y = torch.from_numpy(upfirdn_loop(y, G[f"{name}.conv.blur.kernel"], 1, 1, (1, 1, 1, 1))).float()[0]
    else:
        y = F.conv2d(x[None], weight, padding=weight.shape[-1] // 2)[0]
    if not demod:  # ToRGB: bias, no activation
        return y + G[f"{name}.bias"][0]
    y = y + G[f"{name}.noise.weight"] * noise[0]
    y = y + G[f"{name}.activate.bias"][:, None, None]
    return torch.where(y >= 0, y, 0.2 * y) * math.sqrt(2)


def naive_synthesis(G, wp, n_blocks):
    """rosinality's forward: conv1 w0, to_rgb1 w1; block j: convs w(2j+1), w(2j+2), to_rgb w(2j+3)."""
    imgs = []
    for b in range(wp.shape[0]):
        lat = wp[b]
        x = G["input.input"][0]
        x = naive_layer(G, "conv1", x, lat[0], noise=G["noises.noise_0"][0])
        img = naive_layer(G, "to_rgb1", x, lat[1], demod=False)
        for j in range(n_blocks):
            x = naive_layer(G, f"convs.{2 * j}", x, lat[2 * j + 1], up=True, noise=G[f"noises.noise_{2 * j + 1}"][0])
            x = naive_layer(G, f"convs.{2 * j + 1}", x, lat[2 * j + 2], noise=G[f"noises.noise_{2 * j + 2}"][0])
            skip = upfirdn_loop(img[None], G[f"to_rgbs.{j}.upsample.kernel"], 2, 1, (2, 1, 2, 1))
            img = naive_layer(G, f"to_rgbs.{j}", x, lat[2 * j + 3], demod=False) + torch.from_numpy(skip).float()[0]
        imgs.append(img)
    return torch.stack(imgs)


# === (c) The official networks as torch.nn modules, with the official attribute (= state-dict) names ========

# --- ArcFace IR-SE (criteria/model_irse.py) and its units, shared with e4e's trunk ----------------------

class SEModule(nn.Module):
    """criteria/helpers.py SEModule (encoder4editing's models/encoders/helpers.py has the same one)."""

    def __init__(self, channels, reduction):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class BottleneckIRSE(nn.Module):
    """criteria/helpers.py bottleneck_IR_SE (bottleneck_IR without the SE module when se = 0); also e4e's units,
    as encoder4editing's models/encoders/helpers.py bottleneck_IR_SE is the same class."""

    def __init__(self, in_channel, depth, stride, se=16):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channel, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        res = [nn.BatchNorm2d(in_channel), nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
               nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth)]
        self.res_layer = nn.Sequential(*res, *([SEModule(depth, se)] if se else []))

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


IR_SE50_BLOCKS = [(64, 3), (128, 4), (256, 14), (512, 3)]  # helpers.get_blocks(50): (depth, num_units)


class Backbone(nn.Module):
    """criteria/model_irse.py Backbone(input_size=112, mode='ir_se'), as IDLoss builds it (affine BN1d)."""

    def __init__(self, blocks=IR_SE50_BLOCKS, stem=64, se=16, affine=True):
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.PReLU(stem))
        units, c = [], stem
        for depth, n in blocks:  # get_block: the first unit of every block has stride 2
            for i in range(n):
                units.append(BottleneckIRSE(c, depth, 2 if i == 0 else 1, se))
                c = depth
        self.body = nn.Sequential(*units)
        side = 112 // 2 ** len(blocks)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(c), nn.Dropout(0.6), nn.Flatten(),
                                          nn.Linear(c * side * side, 512), nn.BatchNorm1d(512, affine=affine))

    def forward(self, x):
        x = self.output_layer(self.body(self.input_layer(x)))
        return x / torch.norm(x, 2, 1, True)  # helpers.l2_norm


# --- DECA's E_flame: ResNet-50 encoder (models/resnet.py, models/encoders.py) --------------------------

class Bottleneck(nn.Module):
    """DECA models/resnet.py Bottleneck (torchvision's: the stride on conv2)."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.relu, self.downsample = nn.ReLU(), downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """DECA models/resnet.py ResNet(Bottleneck, [3, 4, 6, 3]) without fc: (B, 3, 224, 224) -> (B, 2048)."""

    def __init__(self, layers=((64, 3), (128, 4), (256, 6), (512, 3)), stem=64):
        super().__init__()
        self.inplanes = stem
        self.conv1, self.bn1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem)
        self.relu, self.maxpool = nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        for k, (planes, n) in enumerate(layers, 1):
            setattr(self, f"layer{k}", self._make_layer(planes, n, stride=1 if k == 1 else 2))
        self.avgpool = nn.AvgPool2d(7, stride=1)

    def _make_layer(self, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        return nn.Sequential(*layers, *[Bottleneck(self.inplanes, planes) for _ in range(1, blocks)])

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).view(x.size(0), -1)


class ResnetEncoder(nn.Module):
    """DECA models/encoders.py ResnetEncoder(outsize) (E_flame: outsize 236, no last_op)."""

    def __init__(self, outsize=236, hidden=1024, **resnet):
        super().__init__()
        self.encoder = ResNet(**resnet)
        self.layers = nn.Sequential(nn.Linear(self.encoder.inplanes, hidden), nn.ReLU(), nn.Linear(hidden, outsize))

    def forward(self, x):
        return self.layers(self.encoder(x))


# --- encoder4editing's Encoder4Editing (models/encoders/psp_encoders.py), on the IR-SE units above -----

class EqualLinear(nn.Module):
    """rosinality EqualLinear(in, out, lr_mul=1), no activation."""

    def __init__(self, i, o):
        super().__init__()
        self.weight, self.bias, self.scale = nn.Parameter(torch.randn(o, i)), nn.Parameter(torch.zeros(o)), 1 / math.sqrt(i)

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias)


class GradualStyleBlock(nn.Module):
    """psp_encoders.py GradualStyleBlock(in_c, out_c, spatial)."""

    def __init__(self, in_c, out_c, spatial):
        super().__init__()
        mods = [nn.Conv2d(in_c, out_c, 3, 2, 1), nn.LeakyReLU()]
        for _ in range(int(np.log2(spatial)) - 1):
            mods += [nn.Conv2d(out_c, out_c, 3, 2, 1), nn.LeakyReLU()]
        self.convs, self.linear, self.out_c = nn.Sequential(*mods), EqualLinear(out_c, out_c), out_c

    def forward(self, x):
        return self.linear(self.convs(x).view(-1, self.out_c))


class Encoder4Editing(nn.Module):
    """psp_encoders.py Encoder4Editing in ProgressiveStage.Inference, and pSp.forward's + latent_avg.

    blocks generalises get_blocks (the depth of each stage); the real one is IR_SE50_BLOCKS, 64 stem, 512 styles.
    """

    def __init__(self, blocks=IR_SE50_BLOCKS, stem=64, w_dim=512, n_styles=18, se=16):
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.PReLU(stem))
        units, c_in = [], stem
        for depth, n in blocks:
            units += [BottleneckIRSE(c_in, depth, 2, se)] + [BottleneckIRSE(depth, depth, 1, se) for _ in range(n - 1)]
            c_in = depth
        self.body = nn.Sequential(*units)
        ends = np.cumsum([n for _, n in blocks]) - 1
        self.taps = (ends[1], ends[2], ends[3])  # 6, 20, 23 for IR-SE50
        c3 = blocks[3][0]
        self.styles = nn.ModuleList([GradualStyleBlock(c3, w_dim, 16 if i < 3 else 32 if i < 7 else 64)
                                     for i in range(n_styles)])
        self.latlayer1 = nn.Conv2d(blocks[2][0], c3, 1)
        self.latlayer2 = nn.Conv2d(blocks[1][0], c3, 1)
        self.register_buffer("latent_avg", torch.zeros(w_dim))
        self.style_count = n_styles

    def forward(self, x):
        x = self.input_layer(x)
        for i, layer in enumerate(self.body):
            x = layer(x)
            if i == self.taps[0]:
                c1 = x
            elif i == self.taps[1]:
                c2 = x
            elif i == self.taps[2]:
                c3 = x
        w0 = self.styles[0](c3)
        w = w0.repeat(self.style_count, 1, 1).permute(1, 0, 2)
        features = c3
        for i in range(1, self.style_count):
            if i == 3:
                p2 = F.interpolate(c3, size=c2.shape[-2:], mode="bilinear", align_corners=True) + self.latlayer1(c2)
                features = p2
            elif i == 7:
                p1 = F.interpolate(p2, size=c1.shape[-2:], mode="bilinear", align_corners=True) + self.latlayer2(c1)
                features = p1
            w[:, i] += self.styles[i](features)
        return w + self.latent_avg.repeat(w.shape[0], 1, 1)


# --- pytorch-fid's FID Inception-v3 ---------------------------------------------------------------------
# torchvision's Inception3 blocks as fid_inception_v3() patches them; tf=False gives torchvision's own pools
# (average pools counting the padding, an average pool in Mixed_7c), to show that the tests see the difference.

class BasicConv2d(nn.Module):
    def __init__(self, c_in, c_out, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x, tf):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=not tf)


class InceptionA(nn.Module):
    def __init__(self, c, pool_features, tf):
        super().__init__()
        self.tf = tf
        self.branch1x1 = BasicConv2d(c, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(c, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool(x, self.tf))], 1)


class InceptionB(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.branch3x3 = BasicConv2d(c, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):
    def __init__(self, c, c7, tf):
        super().__init__()
        self.tf = tf
        self.branch1x1 = BasicConv2d(c, 192, 1)
        self.branch7x7_1 = BasicConv2d(c, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(avg_pool(x, self.tf))], 1)


class InceptionD(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(c, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    def __init__(self, c, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(c, 320, 1)
        self.branch3x3_1 = BasicConv2d(c, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c, 192, 1)

    def forward(self, x):
        y = self.branch3x3_1(x)
        z = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(y), self.branch3x3_2b(y),
                          self.branch3x3dbl_3a(z), self.branch3x3dbl_3b(z), self.branch_pool(self.pool(x))], 1)


class FIDInception(nn.Module):
    """fid_inception_v3() run as InceptionV3([3]) without its preprocessing: (B, 3, H, W) in [-1, 1] -> (B, 2048)."""

    def __init__(self, tf=True):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = (InceptionA(192, 32, tf), InceptionA(256, 64, tf),
                                                       InceptionA(288, 64, tf))
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128, tf), InceptionC(768, 160, tf)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160, tf), InceptionC(768, 192, tf)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, lambda x: avg_pool(x, tf))
        self.Mixed_7c = InceptionE(2048, (lambda x: F.max_pool2d(x, 3, 1, 1)) if tf else (lambda x: avg_pool(x, tf)))
        self.fc = nn.Linear(2048, 1008)  # in the state dict; FID stops at the pool

    def forward(self, x):
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, 2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


# === (d) Random parameters: every tensor from a seed; build*: no torch initialisation to overwrite ==========

def randomize(module, seed, unit_normal=lambda key: False):
    """Random weights for every tensor of module (He-normal weights, positive running_var; N(0, 1) for
    the keys unit_normal picks), eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in module.state_dict().items():
            if k.endswith("num_batches_tracked"):
                v.fill_(70000)
            elif k.endswith("running_var"):
                v.copy_(0.5 + torch.rand(v.shape, generator=gen))
            elif unit_normal(k):
                v.copy_(torch.randn(v.shape, generator=gen))
            elif v.ndim > 1:
                v.copy_(torch.randn(v.shape, generator=gen) * math.sqrt(2 / v[0].numel()))
            else:
                v.copy_(torch.randn(v.shape, generator=gen) * 0.2 + (1.0 if k.endswith("weight") else 0.0))
    return module.eval()


def params_of(module):
    """The module's state dict as our flat params: official names, num_batches_tracked dropped."""
    return {k: v.clone() for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}


def build(cls, seed, **kw):
    """cls(**kw) with randomize's weights, skipping torch's own (slow, overwritten) initialisation."""
    with torch.device("meta"):
        module = cls(**kw)
    return randomize(module.to_empty(device="cpu"), seed)


def build_e4e(seed, **kw):
    """Encoder4Editing(**kw) with random weights (He-normal, BN stats random, positive variances), eval mode."""
    with torch.device("meta"):
        module = Encoder4Editing(**kw)
    module = module.to_empty(device="cpu")  # EqualLinear's weights are N(0, 1); so is a latent
    return randomize(module, seed, unit_normal=lambda k: k.endswith("linear.weight") or k == "latent_avg")


def build_inception(seed=0, tf=True):
    """FIDInception(tf) with randomize's weights (He-normal, positive running_var, BatchNorm weights around 1),
    skipping torch's own initialisation: overwritten anyway."""
    with torch.device("meta"):
        module = FIDInception(tf)
    return randomize(module.to_empty(device="cpu"), seed)
