"""A parametric head in FLAME's format: the synthetic world's 3DMM (issue 15, work in progress).

An ellipsoidal skull in metres, facing +z, with a nose, brow ridge, eye sockets, cheeks, lips, chin and
ears modelled as smooth bumps in (longitude, latitude) on the surface. The shape basis is named: each
component is the linearised displacement of one construction parameter (head width, nose length, ...),
so `stylemask.shape_model` (linear, as FLAME) reproduces the construction to first order. Expressions are
displacement fields local to mouth, brows and eyes; the jaw opens by FLAME's jaw joint. Appearance
(skin, lips, eyes, brows, hair) is a per-vertex albedo from named parameters, and eyes_closed also paints
the upper lids down over the eyes. The grid's nodes are densest at the face (`_warp`). Landmarks follow the
68-point layout of `weights.defaults` at the features' positions.
"""
import math

import torch

from weights import defaults

N_LAT, N_LON = 56, 72
LAT_RANGE = (math.radians(-70), math.radians(82))
RADII = (0.075, 0.1, 0.09)  # half width, half height, half depth (m)
D = math.radians
EYE_LAT, EYE_LON = D(17), D(22)   # the eyes' centres, (EYE_LAT, ±EYE_LON); the brows sit above them

# shape parameters (name, step): each basis column is d(vertices)/d(parameter) at the mean head
SHAPE = ("width", "height", "depth", "jaw_width", "nose_length", "nose_width", "chin", "brow_ridge", "cheeks",
         "ears_up")
EXPRESSION = ("smile", "pucker", "brow_raise", "eyes_closed", "mouth_stretch")


WARP = 0.4  # node density: 1/(1 − WARP) = 1.7× the mean at the face, 1/(1 + WARP) at the back of the head


def _warp(x):
    """Uniform x -> x − WARP·sin x (monotone, fixed at 0 and ±π): nodes 1.7× denser near x = 0."""
    return x - WARP * torch.sin(x)


def _unwarp(y):
    """The inverse of `_warp` (Kepler's equation, by Newton's method; float64-exact)."""
    x = torch.as_tensor(y, dtype=torch.float64).clone()
    for _ in range(30):
        x = x - (_warp(x) - y) / (1 - WARP * torch.cos(x))
    return x


def _lat_of_index(t):
    """Fractional row index t ∈ [0, N_LAT − 1] -> latitude: rows densest at the middle of LAT_RANGE (the face)."""
    x = -math.pi + 2 * math.pi * torch.as_tensor(t, dtype=torch.float64) / (N_LAT - 1)
    return LAT_RANGE[0] + (LAT_RANGE[1] - LAT_RANGE[0]) * (_warp(x) + math.pi) / (2 * math.pi)


def _lon_of_index(u):
    """Fractional column index u ∈ [0, N_LON) -> longitude in [0, 2π): columns densest at 0 (the face)."""
    return _warp(torch.as_tensor(u, dtype=torch.float64) * (2 * math.pi / N_LON))


def _index_of_lat(lat):
    """The inverse of `_lat_of_index`: latitude -> fractional row index (float)."""
    x = _unwarp(2 * math.pi * (lat - LAT_RANGE[0]) / (LAT_RANGE[1] - LAT_RANGE[0]) - math.pi)
    return float((x + math.pi) / (2 * math.pi) * (N_LAT - 1))


def _index_of_lon(lon):
    """The inverse of `_lon_of_index`: longitude (any turn) -> fractional column index in [0, N_LON) (float)."""
    return float(_unwarp(lon % (2 * math.pi)) / (2 * math.pi / N_LON))


def _grid():
    """(lat, lon) of every vertex, (V,) each: a latitude-longitude grid, longitude 0 = the face, its nodes
    warped (`_warp`) so that the face gets the most of them (eyes and lips are a few pixels wide)."""
    lat = _lat_of_index(torch.arange(N_LAT))[:, None].expand(N_LAT, N_LON)
    lon = _lon_of_index(torch.arange(N_LON))[None, :].expand(N_LAT, N_LON)
    lon = torch.where(lon > math.pi, lon - 2 * math.pi, lon)
    return lat.reshape(-1), lon.reshape(-1)


def _bump(lat, lon, lat0, lon0, s_lat, s_lon):
    """A Gaussian bump centred at (lat0, lon0) with widths (s_lat, s_lon), radians: (V,) in [0, 1]."""
    return torch.exp(-((lat - lat0) / s_lat) ** 2 - ((lon - lon0) / s_lon) ** 2)


def _build(lat, lon, p):
    """Vertices (V, 3) of the head with construction parameters p (dict of floats, 0 = the mean head)."""
    rx = RADII[0] * (1 + 0.12 * p["width"]) * (1 + 0.15 * p["jaw_width"] * torch.sigmoid(-lat / 0.15))
    ry = torch.full_like(rx, RADII[1] * (1 + 0.1 * p["height"]))
    rz = torch.full_like(rx, RADII[2] * (1 + 0.1 * p["depth"]))
    unit = torch.stack([lon.sin() * lat.cos(), lat.sin(), lon.cos() * lat.cos()], -1)
    radii = torch.stack([rx, ry, rz], -1)                                     # (V, 3)
    X = unit * radii
    normal = torch.nn.functional.normalize(unit / radii ** 2, dim=-1)
    nose_len = 1 + 0.35 * p["nose_length"]
    nose_w = 1 + 0.35 * p["nose_width"]
    height = (0.013 * nose_len * _bump(lat, lon, D(8), 0, D(9), D(5) * nose_w)             # nose ridge and tip
              + 0.006 * nose_len * _bump(lat, lon, D(3), 0, D(4), D(7) * nose_w)
              + 0.004 * (1 + 0.8 * p["brow_ridge"]) * (_bump(lat, lon, D(24), -EYE_LON, D(4), D(12))
                                                        + _bump(lat, lon, D(24), EYE_LON, D(4), D(12)))
              - 0.005 * (_bump(lat, lon, EYE_LAT, -EYE_LON, D(5), D(9)) + _bump(lat, lon, EYE_LAT, EYE_LON, D(5), D(9)))
              + 0.004 * (1 + 0.8 * p["cheeks"]) * (_bump(lat, lon, D(0), D(-35), D(9), D(12))
                                                    + _bump(lat, lon, D(0), D(35), D(9), D(12)))
              + 0.004 * _bump(lat, lon, D(-12.5), 0, D(4), D(16))                        # lips
              + 0.006 * (1 + 0.8 * p["chin"]) * _bump(lat, lon, D(-32), 0, D(7), D(14))
              + 0.012 * (_bump(lat, lon, D(5 + 8 * p["ears_up"]), D(-90), D(10), D(6))     # ears
                         + _bump(lat, lon, D(5 + 8 * p["ears_up"]), D(90), D(10), D(6))))
    return X + normal * height[:, None]


def _expression_fields(lat, lon, X):
    """(V, 3, 5) displacement fields of the named expressions, in metres per unit coefficient."""
    corner = _bump(lat, lon, D(-12.5), D(-20), D(5), D(7)), _bump(lat, lon, D(-12.5), D(20), D(5), D(7))
    lips = _bump(lat, lon, D(-12.5), 0, D(5), D(18))
    lip_y = X[:, 1] - (RADII[1] * math.sin(D(-12.5)))
    brows = _bump(lat, lon, D(25), -EYE_LON, D(3.5), D(14)) + _bump(lat, lon, D(25), EYE_LON, D(3.5), D(14))
    eyes_l, eyes_r = _bump(lat, lon, EYE_LAT, -EYE_LON, D(5), D(9)), _bump(lat, lon, EYE_LAT, EYE_LON, D(5), D(9))
    E = torch.zeros(X.shape[0], 3, len(EXPRESSION), dtype=X.dtype)
    # Amplitudes: a unit coefficient moves features 4–5 px in a 64×64 render, as a broad smile does a face, so
    # that the world's encoder (and the generator's loss) can tell the expressions apart at that size.
    E[:, 0, 0] = 0.016 * (corner[1] - corner[0])            # smile: corners out and up
    E[:, 1, 0] = 0.014 * (corner[0] + corner[1])
    E[:, 2, 1] = 0.012 * lips                               # pucker: lips forward, together and taller
    E[:, 0, 1] = -0.45 * X[:, 0] * lips
    E[:, 1, 1] = 0.5 * lip_y * lips
    E[:, 1, 2] = 0.02 * brows                               # brow raise
    eye_y = X[:, 1] - (RADII[1] * math.sin(EYE_LAT))
    E[:, 1, 3] = -0.8 * eye_y * (eyes_l + eyes_r)           # eyes closed: the eye region squeezes to its centre
    E[:, 0, 4] = 0.45 * X[:, 0] * lips                      # mouth stretch: lips wider and thinner
    E[:, 1, 4] = -0.4 * lip_y * lips
    return E


def head_model(n_shape=300, n_exp=100):
    """The world's head as a FLAME dict (the tensor names and layout of `weights.defaults.tiny_flame`)."""
    lat, lon = _grid()
    zero = {k: 0.0 for k in SHAPE}
    X = _build(lat, lon, zero)
    step = 1e-3
    cols = [(_build(lat, lon, dict(zero, **{k: step})) - X) / step for k in SHAPE]
    shapedirs_s = torch.zeros(X.shape[0], 3, n_shape, dtype=X.dtype)
    shapedirs_s[:, :, :len(SHAPE)] = torch.stack(cols, -1)
    shapedirs_e = torch.zeros(X.shape[0], 3, n_exp, dtype=X.dtype)
    shapedirs_e[:, :, :len(EXPRESSION)] = _expression_fields(lat, lon, X)
    faces = []
    for i in range(N_LAT - 1):
        for j in range(N_LON):
            a, b = i * N_LON + j, i * N_LON + (j + 1) % N_LON
            c, d = (i + 1) * N_LON + j, (i + 1) * N_LON + (j + 1) % N_LON
            faces += [(a, b, c), (b, d, c)]
    return X, torch.tensor(faces), shapedirs_s, shapedirs_e, lat, lon


APPEARANCE = ("skin", "hair", "eyes", "lips", "hairline")


EYE_H, EYE_W = D(3.6), D(9)   # the painted eyes' half height and half width


def _ellipse(lat, lon, lat0, lon0, h, w):
    """(V,) bool: inside the ellipse of half height h and half width w (radians) centred at (lat0, lon0)."""
    return ((lat - lat0) / h) ** 2 + ((lon - lon0) / w) ** 2 < 1


def albedo(lat, lon, a, eyes_closed=0.0):
    """Per-vertex albedo (V, 3) in [0, 1] from appearance parameters a (dict): skin tone t ∈ [0, 1] (light to
    dark), hair colour h ∈ [0, 1] (blond to black), eye colour e ∈ [0, 1] (blue to brown), lip redness, and
    the hairline height (−1 low … 1 receding); and the view's eyes_closed expression coefficient, which lowers
    the upper lids (skin, with their dark lash line) over the eyes: open at ≤ 0, shut at 1. Features are
    drawn in strong contrast (eye socket shade, white, iris, black pupil, lash line, brows darker than the
    hair, the line between the lips, nostrils): at 64×64 an eye is ~6×3 pixels."""
    light, dark = torch.tensor([0.93, 0.76, 0.64]), torch.tensor([0.42, 0.28, 0.2])
    skin = light + (dark - light) * a["skin"]
    blond, black = torch.tensor([0.85, 0.7, 0.4]), torch.tensor([0.08, 0.06, 0.05])
    hair = blond + (black - blond) * a["hair"]
    blue, brown = torch.tensor([0.25, 0.45, 0.75]), torch.tensor([0.35, 0.2, 0.1])
    iris = blue + (brown - blue) * a["eyes"]
    lip = skin * torch.tensor([0.85, 0.55, 0.55]) + torch.tensor([0.1, 0.0, 0.0]) * a["lips"]
    lash, pupil, white = torch.tensor([0.06, 0.05, 0.05]), torch.tensor([0.02, 0.02, 0.02]), torch.tensor([0.97, 0.97, 0.97])
    hairline = D(36 + 8 * a["hairline"]) - D(55) * torch.sigmoid((lon.abs() - D(95)) / 0.15)  # low at the back
    regions = [(lat > hairline, hair),                                    # painted in order: later ones win
               (_ellipse(lat, lon, D(-12.5), 0, D(4.5), D(19)), lip),
               (_ellipse(lat, lon, D(-12.5), 0, D(1.0), D(16)), lip * 0.45),        # between the lips
               (_ellipse(lat, lon, D(1), D(-4.5), D(1.5), D(2.5)), skin * 0.55),    # nostrils
               (_ellipse(lat, lon, D(1), D(4.5), D(1.5), D(2.5)), skin * 0.55)]
    lid = EYE_LAT + EYE_H - 2 * EYE_H * min(max(eyes_closed, 0.0), 1.0)   # the upper lid's edge
    for lon0 in (-EYE_LON, EYE_LON):
        eye = _ellipse(lat, lon, EYE_LAT, lon0, EYE_H, EYE_W)
        regions += [(_ellipse(lat, lon, EYE_LAT + D(0.5), lon0, D(6.5), D(13)), skin * 0.8),   # socket shade
                    (eye, white),
                    (_ellipse(lat, lon, EYE_LAT, lon0, D(3.0), D(3.6)), iris),
                    (_ellipse(lat, lon, EYE_LAT, lon0, D(1.4), D(1.7)), pupil),
                    (eye & (lat > lid), skin * 0.92),                                   # the upper lid
                    (_ellipse(lat, lon, EYE_LAT, lon0, EYE_H + D(1.2), EYE_W + D(1.5))
                     & (lat > lid - D(0.6)) & (lat < lid + D(1.1)), lash),
                    (_ellipse(lat, lon, D(24.5), lon0, D(2.0), D(11)), hair * 0.45 + 0.02)]   # brow
    c = skin.double().expand(lat.shape[0], 3)
    for mask, colour in regions:
        c = torch.where(mask[:, None], colour.double(), c)
    return c


def _on_face(lat0, lon0):
    """(face index, barycentric weights (3,)) of the surface point at (lat0, lon0) on the grid's triangles."""
    t, u = _index_of_lat(lat0), _index_of_lon(lon0)                # fractional indices of the warped grid
    i, j = int(t), int(u)
    s, t = u - j, t - i  # inside the cell (a, b, c) + (b, d, c): a = (i, j), b = (i, j+1), c = (i+1, j)
    if s + t <= 1:
        return 2 * (i * N_LON + j), torch.tensor([1 - s - t, s, t], dtype=torch.float64)
    return 2 * (i * N_LON + j) + 1, torch.tensor([1 - t, s + t - 1, 1 - s], dtype=torch.float64)


def flame_head(dtype=torch.float32):
    """The world's head as a FLAME dict: the tensor names, joints (root, neck, jaw, eyes), coefficient layout
    (300 shape + 100 expression columns) and 68-landmark embedding with a yaw-dependent jaw contour of
    `weights.defaults.tiny_flame`, so `stylemask.flame` / `project` and the losses run on it unchanged."""
    X, faces, S, E, lat, lon = head_model()
    pts = defaults.face_layout_68()
    to_sphere = lambda x, y: (D(35) * y + D(5), D(50) * x)  # noqa: E731  unit-face coordinates -> (lat, lon)
    static = [_on_face(*to_sphere(x, y)) for x, y in pts[17:]]
    rows = []  # DECA's table: rows 0..39 for yaw 0..39°, rows 40..78 for yaw −1..−39°
    for r in range(79):
        yaw = r if r < 40 else 39 - r
        rows.append([_on_face(*to_sphere(x - yaw / 50.0 * 0.5, y)) for x, y in pts[:17]])
    V = X.shape[0]

    def mean_of(mask):
        return mask.double() / mask.sum()
    neck = mean_of(lat < D(-60))
    jaw = mean_of((lat.abs() < D(8)) & ((lon.abs() - D(90)).abs() < D(12)))
    eyes = [mean_of(((lat - EYE_LAT) ** 2 + (lon - l0) ** 2) < D(6) ** 2) for l0 in (-EYE_LON, EYE_LON)]
    jaw_w = torch.sigmoid((D(-14) - lat) / 0.06) * torch.sigmoid((D(60) - lon.abs()) / 0.1)
    W = torch.zeros(V, 5, dtype=torch.float64)
    W[:, 2], W[:, 1] = jaw_w, 1 - jaw_w
    Fl = {"v_template": X, "f": faces,
          "kintree_table": torch.tensor([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]]),
          "J_regressor": torch.stack([neck, neck, jaw, eyes[0], eyes[1]]), "weights": W,
          "shapedirs": torch.cat([S, E], 2), "posedirs": torch.zeros(V, 3, 36, dtype=torch.float64),
          "static_lmk_faces_idx": torch.tensor([i for i, _ in static]),
          "static_lmk_bary_coords": torch.stack([b for _, b in static]),
          "dynamic_lmk_faces_idx": torch.tensor([[i for i, _ in row] for row in rows]),
          "dynamic_lmk_bary_coords": torch.stack([torch.stack([b for _, b in row]) for row in rows]),
          "full_lmk_faces_idx": torch.tensor([[i for i, _ in rows[0] + static]]),
          "full_lmk_bary_coords": torch.stack([b for _, b in rows[0] + static])[None]}
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in Fl.items()}
