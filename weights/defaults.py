"""The embedded defaults: seeded stand-ins for every network, so that every script runs with no weights.

Each is the real architecture, small (`ARCHS['tiny']` and its kin) with deterministic random weights
from a seed, calibrated so that its outputs look like the real network's (codes in range, features
spread). They check the pipeline end to end on a CPU; they know nothing about faces. `weights.load`
falls back to them, saying so, when no converted file is found; the tests build them directly.

Not here: anything a model needs to run (the model modules), reading and writing files (`weights/`).
"""
import math

import torch
import torch.nn.functional as F

import stylemask as sm
from e4e import E4E_ARCHS, E4E_SIZE, e4e
from facenets import ARCFACE_ARCHS, ARCFACE_SIZE, DECA_ARCHS, DECA_CODE, arcface_trunk, bn, deca_encode
from stylemask import DECA_SIZE
from weights.layout import arcface_shapes, deca_shapes, e4e_shapes, generator_shapes


# --- Generator and mask networks ----------------------------------------------------------------------

def random_generator(arch, seed=0):
    """A generator of architecture arch with deterministic random weights in the official layout.

    Weights N(0, 1) as the official init (mapping weights / lr_mlp); biases, noise strengths and
    style offsets are drawn small but non-zero so that every tensor matters in tests.
    """
    gen = torch.Generator().manual_seed(seed)
    G = {}
    for k, shape in generator_shapes(arch).items():
        if k.endswith("blur.kernel") or k.endswith("upsample.kernel"):
            f = torch.tensor([1.0, 3.0, 3.0, 1.0])
            G[k] = torch.outer(f, f) / 64 * 4  # [1,3,3,1] ⊗ [1,3,3,1], normalised, × up² (rosinality)
        elif k == "latent_avg":
            continue
        elif k.endswith(".bias") or k.endswith("noise.weight"):
            G[k] = 0.1 * torch.randn(shape, generator=gen) + (1.0 if "modulation" in k else 0.0)
        else:
            G[k] = torch.randn(shape, generator=gen) / (sm.LR_MLP if k.startswith("style.") else 1.0)
    G["latent_avg"] = sm.mean_latent(G, seed=seed)
    return G


def tiny_generator(seed=0):
    """The embedded default generator: ARCHS['tiny'] with random weights, for CPU runs and tests."""
    return random_generator(sm.ARCHS["tiny"], seed)


def tiny_mask(seed=0):
    """The embedded default mask networks: UNTRAINED, freshly initialised for the tiny generator (n = 12)."""
    return sm.init_mask(sm.ARCHS["tiny"], seed=seed)


# --- FLAME ---------------------------------------------------------------------------------------------

def face_layout_68():
    """iBUG-68 landmark positions on a unit face (x right, y up): jaw, brows, nose, eyes, lips."""
    pts = [(math.sin(a) * 1.0, -math.cos(a) * 0.9 + 0.1) for a in torch.linspace(-2.0, 2.0, 17).tolist()]  # 0–16 jaw
    pts += [(x, 0.55) for x in (-0.8, -0.65, -0.5, -0.35, -0.2)] + [(x, 0.55) for x in (0.2, 0.35, 0.5, 0.65, 0.8)]
    pts += [(0.0, y) for y in (0.4, 0.27, 0.14, 0.0)] + [(x, -0.1) for x in (-0.25, -0.12, 0.0, 0.12, 0.25)]
    for cx in (-0.45, 0.45):  # eyes: outer corner, two upper, inner corner, two lower (36–41, 42–47)
        pts += [(cx + 0.17 * math.cos(math.radians(a)), 0.35 + 0.07 * math.sin(math.radians(a)))
                for a in (180, 120, 60, 0, -60, -120)]
    for rx, ry, n in ((0.4, 0.18, 12), (0.25, 0.08, 8)):  # outer lips 48–59, inner lips 60–67, from the left corner
        pts += [(-rx * math.cos(2 * math.pi * k / n), -0.5 + ry * math.sin(2 * math.pi * k / n)) for k in range(n)]
    return pts


def tiny_flame(seed=0):
    """The embedded default 3DMM: a small FLAME-like head (640 vertices) with FLAME's and DECA's layout.

    Same tensor names, joints (root, neck, jaw, eyes), coefficient layout (300 + 100 components, DECA uses
    the first 100 and 50) and 68-landmark embedding with a yaw-dependent jaw contour, so training and the
    metrics run end to end. Geometry: an ellipsoid in metres facing +z; the bases are smooth random
    fields (shape) and fields local to mouth, eyes and brows (expression). Not a face model: a test double.
    """
    gen = torch.Generator().manual_seed(seed)
    n_lat, n_lon, lat_deg = 20, 32, (math.radians(-70), math.radians(80))
    lat = torch.linspace(*lat_deg, n_lat)[:, None].expand(n_lat, n_lon)
    lon = (torch.arange(n_lon) * (2 * math.pi / n_lon))[None, :].expand(n_lat, n_lon)
    lon = torch.where(lon > math.pi, lon - 2 * math.pi, lon)  # in (−π, π], 0 = front
    radii = torch.tensor([0.075, 0.1, 0.09])
    unit = torch.stack([lon.sin() * lat.cos(), lat.sin(), lon.cos() * lat.cos()], -1).reshape(-1, 3)  # (V, 3)
    X = unit * radii
    V = X.shape[0]
    faces = []
    for i in range(n_lat - 1):
        for j in range(n_lon):
            a, b, c, d = i * n_lon + j, i * n_lon + (j + 1) % n_lon, (i + 1) * n_lon + j, (i + 1) * n_lon + (j + 1) % n_lon
            faces += [(a, b, c), (b, d, c)]
    f = torch.tensor(faces)
    lat_v, lon_v = lat.reshape(-1), lon.reshape(-1)

    def on_face(x, y):  # unit-face coordinates -> (face, barycentric weights) of the point on the surface
        u = (math.radians(50) * x) % (2 * math.pi) / (2 * math.pi / n_lon)  # grid units along longitude
        t = (math.radians(35) * y + math.radians(5) - lat_deg[0]) / (lat_deg[1] - lat_deg[0]) * (n_lat - 1)
        i, j = int(t), int(u)
        s, t = u - j, t - i  # position inside the grid cell, split into triangles (a, b, c) and (b, d, c)
        if s + t <= 1:
            return 2 * (i * n_lon + j), torch.tensor([1 - s - t, s, t])
        return 2 * (i * n_lon + j) + 1, torch.tensor([1 - t, s + t - 1, 1 - s])

    pts = face_layout_68()
    static = [on_face(x, y) for x, y in pts[17:]]
    rows = []
    for r in range(79):  # DECA's table: rows 0..39 for yaw 0..39°, rows 40..78 for yaw −1..−39°
        yaw = r if r < 40 else 39 - r
        rows.append([on_face(x - yaw / 50.0 * 0.5, y) for x, y in pts[:17]])
    contour0 = rows[0]
    Fl = {"v_template": X, "f": f, "kintree_table": torch.tensor([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]]),
          "static_lmk_faces_idx": torch.tensor([i for i, _ in static]),
          "static_lmk_bary_coords": torch.stack([b for _, b in static]),
          "dynamic_lmk_faces_idx": torch.tensor([[i for i, _ in row] for row in rows]),
          "dynamic_lmk_bary_coords": torch.stack([torch.stack([b for _, b in row]) for row in rows]),
          "full_lmk_faces_idx": torch.tensor([[i for i, _ in contour0 + static]]),
          "full_lmk_bary_coords": torch.stack([b for _, b in contour0 + static])[None]}
    # joints: root and neck under the head, jaw hinge at ear level, eyes behind the eye landmarks
    def mean_of(mask):
        w = mask.float()
        return w / w.sum()
    neck = mean_of(lat_v < math.radians(-60))
    jaw = mean_of((lat_v.abs() < math.radians(12)) & (lon_v.abs() > math.radians(75)) & (lon_v.abs() < math.radians(105)))
    eyes = [mean_of(((lon_v - math.radians(50 * cx)) ** 2 + (lat_v - math.radians(35 * 0.35 + 5)) ** 2) < math.radians(12) ** 2)
            for cx in (-0.45, 0.45)]
    Fl["J_regressor"] = torch.stack([neck, neck, jaw, eyes[0], eyes[1]])
    # skinning: the lower front (chin, lower lip) follows the jaw, the rest of the head the neck joint
    jaw_w = torch.sigmoid((math.radians(-12) - lat_v) / 0.08) * torch.sigmoid((math.radians(70) - lon_v.abs()) / 0.1)
    W = torch.zeros(V, 5)
    W[:, 2], W[:, 1] = jaw_w, 1 - jaw_w
    Fl["weights"] = W
    # bases: smooth random fields along the surface normal (shape), local fields (expression)
    normal = unit / radii ** 2
    normal = normal / normal.norm(dim=1, keepdim=True)
    k = torch.arange(1, 4, dtype=torch.float32)
    feats = torch.cat([torch.sin(k * lat_v[:, None]), torch.cos(k * lat_v[:, None]), torch.sin(k * lon_v[:, None]),
                       torch.cos(k * lon_v[:, None]), torch.ones(V, 1)], 1)  # (V, 13) low-frequency features
    coef_s = torch.randn(13, 300, generator=gen) / (1 + torch.arange(300) / 10.0)
    shapedirs_s = normal[:, :, None] * (feats @ coef_s)[:, None, :] * 2e-3  # (V, 3, 300)
    mouth = torch.exp(-((lon_v / math.radians(25)) ** 2 + ((lat_v - math.radians(-12)) / math.radians(10)) ** 2))
    brows = torch.exp(-((lon_v.abs() - math.radians(25)) / math.radians(15)) ** 2 - ((lat_v - math.radians(24)) / math.radians(6)) ** 2)
    local = torch.stack([mouth, brows], 1)  # (V, 2)
    coef_e = torch.randn(2, 3, 100, generator=gen) / (1 + torch.arange(100) / 5.0)
    shapedirs_e = torch.einsum("vr,rkl->vkl", local, coef_e) * 3e-3  # (V, 3, 100)
    shapedirs_e[:, 1, 0] -= mouth * (lat_v < math.radians(-12)).float() * 4e-3  # component 0 opens the mouth
    Fl["shapedirs"] = torch.cat([shapedirs_s, shapedirs_e], 2)
    Fl["posedirs"] = torch.randn(V, 3, 36, generator=gen) * 1e-4
    return Fl


# --- ArcFace, DECA and e4e ------------------------------------------------------------------------

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


def random_params(shapes, gen):
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
    """The embedded default ArcFace: ARCFACE_ARCHS['tiny'] (4 IR-SE units) with random weights, 512-d output.

    The last BatchNorm1d gets the statistics of the features of 48 random images, so features are
    centred and different images get clearly different unit vectors (cosine well below 1).
    """
    A = random_params(arcface_shapes(ARCFACE_ARCHS["tiny"]), torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x = bn(A, "output_layer.0", arcface_trunk(A, _calibration_images(ARCFACE_SIZE, seed + 1))).flatten(1)
        h = F.linear(x, A["output_layer.3.weight"], A["output_layer.3.bias"])  # (48, 512) before the BN1d
    A["output_layer.4.running_mean"], A["output_layer.4.running_var"] = h.mean(0), h.var(0)
    return A


TINY_DECA_RANGES = dict(shape=(0.0, 0.4), tex=(0.0, 0.4), exp=(0.0, 0.4), pose=(0.0, 0.15),
                        cam=((9.0, 0.0, 0.0), (0.5, 0.05, 0.05)), light=(0.0, 0.3))


def tiny_deca(seed=0):
    """The embedded default DECA encoder: DECA_ARCHS['tiny'] with random weights and well-behaved codes.

    The last Linear is rescaled per output so that over 48 random images (smooth to noisy) each code
    sits at the centre of TINY_DECA_RANGES and spans its half-width; head pose thus stays well inside
    ±0.3 rad and shape/exp inside ±1 on typical inputs (checked on the tiny generator's images in the tests).
    """
    P = random_params(deca_shapes(DECA_ARCHS["tiny"]), torch.Generator().manual_seed(seed))
    with torch.no_grad():
        code = deca_encode(P, (_calibration_images(DECA_SIZE, seed + 1) + 1) / 2)  # (48, 236)
    centre, half = [], []
    for name, d in DECA_CODE:
        c, h = TINY_DECA_RANGES[name]
        centre.append(torch.as_tensor(c, dtype=torch.float32).expand(d))
        half.append(torch.as_tensor(h, dtype=torch.float32).expand(d))
    centre, half = torch.cat(centre), torch.cat(half)
    mean, spread = code.mean(0), (code - code.mean(0)).abs().amax(0)
    gain = half / spread.clamp_min(1e-6)
    P["layers.2.weight"] = P["layers.2.weight"] * gain[:, None]
    P["layers.2.bias"] = (P["layers.2.bias"] - mean) * gain + centre
    return P


def tiny_e4e(seed=0, G=None):
    """The embedded default e4e: E4E_ARCHS['tiny'] trunk, random weights, W+ sized for generator G.

    G (default tiny_generator()) sets n_styles = sm.n_ws(G), w_dim and latent_avg (its stored one).
    The linears are rescaled so that over 48 random images w0 − latent_avg spreads like mapped w around
    latent_avg does (per-dimension std over 512 z), and each delta at a third of that: codes stay in
    the region the generator was fed, so the inversions render like generated images.
    """
    G = tiny_generator() if G is None else G
    arch = dict(E4E_ARCHS["tiny"], w_dim=sm.architecture(G)["w_dim"], n_styles=sm.n_ws(G))
    gen = torch.Generator().manual_seed(seed)
    E = random_params({k: v for k, v in e4e_shapes(arch).items() if k != "latent_avg"}, gen)
    for i in range(arch["n_styles"]):  # EqualLinear's weights are N(0, 1), its scale is applied at run time
        E[f"styles.{i}.linear.weight"] = torch.randn(arch["w_dim"], arch["w_dim"], generator=gen)
    E["latent_avg"] = torch.zeros(arch["w_dim"])
    with torch.no_grad():
        w = sm.mapping(G, torch.randn(512, sm.architecture(G)["z_dim"], generator=gen))
        sigma = (w - G["latent_avg"]).std(0)  # (w_dim,)
        codes = e4e(E, _calibration_images(E4E_SIZE, seed + 1))  # (48, n_styles, w_dim)
        out = torch.cat([codes[:, :1], codes[:, 1:] - codes[:, :1]], 1)  # w0 and the deltas
        mean, std = out.mean(0), out.std(0).clamp_min(1e-6)  # (n_styles, w_dim)
    for i in range(arch["n_styles"]):
        gain = sigma / std[i] * (1.0 if i == 0 else 1 / 3)
        E[f"styles.{i}.linear.weight"] = E[f"styles.{i}.linear.weight"] * gain[:, None]
        E[f"styles.{i}.linear.bias"] = (E[f"styles.{i}.linear.bias"] - mean[i]) * gain
    E["latent_avg"] = G["latent_avg"].clone()
    return E
