"""world.render against independent oracles: a per-pixel, per-triangle loop with a linear-solve
barycentric, a sphere's silhouette area, and the shading of a flat square."""
import math

import numpy as np
import pytest
import torch

import stylemask as sm
from world.render import rasterize, rasterize_batch, render


def _oracle(pix, faces, size):
    """Nearest covering triangle per pixel centre (ties: lower index), by brute force in float64 numpy."""
    P, Fc = pix.double().numpy(), faces.numpy()
    face = -np.ones((size, size), dtype=np.int64)
    bary = np.zeros((size, size, 3))
    margin = np.full((size, size), np.inf)  # distance of the winner's centre from its triangle's edges
    for py in range(size):
        for px in range(size):
            c = np.array([px + 0.5, py + 0.5])
            best = (np.inf, -1)
            for t, (a, b, d) in enumerate(Fc):
                M = np.stack([P[b, :2] - P[a, :2], P[d, :2] - P[a, :2]], 1)
                if abs(np.linalg.det(M)) < 1e-12:
                    continue
                b1, b2 = np.linalg.solve(M, c - P[a, :2])
                w = np.array([1 - b1 - b2, b1, b2])
                if (w >= 0).all():
                    z = w @ P[[a, b, d], 2]
                    if z < best[0]:
                        best = (z, t)
                        bary[py, px], margin[py, px] = w, w.min()
            face[py, px] = best[1]
    return face, bary, margin


@pytest.mark.parametrize("seed", range(4))
def test_rasterize_matches_a_per_pixel_loop(seed):
    g = torch.Generator().manual_seed(seed)
    size, T = 12, 7
    pix = torch.rand(3 * T, 3, generator=g, dtype=torch.float64) * torch.tensor([size + 4, size + 4, 1.0]) - 2
    faces = torch.arange(3 * T).view(T, 3)
    face, bary = rasterize(pix, faces, size)
    want_face, want_bary, margin = _oracle(pix, faces, size)
    clear = margin > 1e-9  # pixel centres on an edge may go either way in floating point
    assert clear.sum() > 0.8 * size * size
    assert (face.numpy()[clear] == want_face[clear]).all()
    assert np.allclose(bary.numpy()[clear], want_bary[clear], atol=1e-9)
    assert (face >= 0).any() and (face < 0).any()


def _sphere(n_lat=24, n_lon=48, r=1.0):
    """A closed UV sphere: (V, 3) vertices, (T, 3) faces (outward winding is irrelevant: no culling)."""
    lat = torch.linspace(0, math.pi, n_lat + 1, dtype=torch.float64)[1:-1]
    lon = torch.linspace(0, 2 * math.pi, n_lon + 1, dtype=torch.float64)[:-1]
    la, lo = torch.meshgrid(lat, lon, indexing="ij")
    ring = torch.stack([la.sin() * lo.cos(), la.cos(), la.sin() * lo.sin()], -1).reshape(-1, 3)
    V = torch.cat([torch.tensor([[0.0, 1, 0]], dtype=torch.float64), ring,
                   torch.tensor([[0.0, -1, 0]], dtype=torch.float64)]) * r
    idx = lambda i, j: 1 + i * n_lon + j % n_lon  # noqa: E731
    F = [(0, idx(0, j), idx(0, j + 1)) for j in range(n_lon)]
    for i in range(n_lat - 2):
        for j in range(n_lon):
            F += [(idx(i, j), idx(i + 1, j), idx(i + 1, j + 1)), (idx(i, j), idx(i + 1, j + 1), idx(i, j + 1))]
    last = len(V) - 1
    F += [(last, idx(n_lat - 2, j + 1), idx(n_lat - 2, j)) for j in range(n_lon)]
    return V, torch.tensor(F)


def test_sphere_silhouette_has_the_disc_area():
    V, faces = _sphere(r=0.5)
    size, s = 64, 1.5
    img, mask = render(V[None], faces, torch.full_like(V, 0.5)[None], torch.tensor([[s, 0.0, 0.0]], dtype=V.dtype),
                       size)
    R = 0.5 * s * size / 2  # projected radius in pixels
    assert abs(mask.sum().item() / (math.pi * R * R) - 1) < 0.02
    assert img.shape == (1, 3, size, size) and img.min() >= -1 and img.max() <= 1


def test_flat_square_facing_the_light_is_evenly_lit():
    V = torch.tensor([[[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.5, 0.5, 0.0], [-0.5, 0.5, 0.0]]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    albedo = torch.tensor([0.8, 0.4, 0.2]).expand(1, 4, 3)
    img, mask = render(V, faces, albedo, sm.fixed_camera(1) / 8, 32, light=(0, 0, 1), ambient=0.3)
    inside = img[0][:, mask[0]]                                   # (3, pixels)
    assert mask[0].sum() == 16 * 16                               # the square spans half the image width
    assert torch.allclose(inside, (albedo[0, 0] * 2 - 1)[:, None].expand_as(inside), atol=1e-6)
    assert (img[0][:, ~mask[0]] == -1).all()                      # background
    again, _ = render(V, faces, albedo, sm.fixed_camera(1) / 8, 32, light=(0, 0, 1), ambient=0.3)
    assert torch.equal(img, again)


def test_a_batch_rasterises_each_image_as_the_oracle_does():
    """Images of one batch do not see each other's triangles: each matches the brute-force oracle alone."""
    g = torch.Generator().manual_seed(11)
    size, T, B = 12, 7, 3
    faces = torch.arange(3 * T).view(T, 3)
    pix = torch.rand(B, 3 * T, 3, generator=g, dtype=torch.float64) * torch.tensor([size + 4, size + 4, 1.0]) - 2
    pix[1, :, :2] = pix[1, :, :2] * 0.3 + 4     # small triangles in a corner: a different mix of box sizes
    face, bary = rasterize_batch(pix, faces, size)
    assert face.shape == (B, size, size) and bary.shape == (B, size, size, 3)
    for b in range(B):
        want_face, want_bary, margin = _oracle(pix[b], faces, size)
        clear = margin > 1e-9
        assert (face[b].numpy()[clear] == want_face[clear]).all()
        assert np.allclose(bary[b].numpy()[clear], want_bary[clear], atol=1e-9)
    assert len({int((face[b] >= 0).sum()) for b in range(B)}) == B  # three different coverages
