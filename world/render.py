"""Render triangle meshes to images: z-buffered rasterisation and Lambertian shading, plain PyTorch.

The camera is DECA's orthographic one (`stylemask.project`: cam = (s, tx, ty), y down, image space
[0, size]), so a render and the landmarks `stylemask.flame` gives for the same mesh line up pixel for
pixel. Nearer points have smaller projected depth. Pixel (px, py) samples its centre (px + ½, py + ½); a
pixel belongs to the nearest triangle that covers its centre (edges included; equal depths go to the
lower triangle index), so a render is deterministic. No GPU, no OpenGL; at 64×64 and a few thousand
triangles a render takes milliseconds.
"""
import torch
import torch.nn.functional as F

import stylemask as sm


def _edge(a, b, p):
    """Twice the signed area of (a, b, p) for (..., 2) points: > 0 when p is left of a→b."""
    return (b[..., 0] - a[..., 0]) * (p[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (p[..., 0] - a[..., 0])


def barycentric(tri, p):
    """Barycentric coordinates (..., 3) of points p (..., 2) in triangles tri (..., 3, 2); inf-free: a
    degenerate triangle gives NaN, which never counts as inside."""
    v0, v1, v2 = tri.unbind(-2)
    area = _edge(v0, v1, v2)
    w = torch.stack([_edge(v1, v2, p), _edge(v2, v0, p), _edge(v0, v1, p)], -1)
    return w / area[..., None]


def rasterize(pix, faces, size):
    """pix (V, 3) projected vertices (x, y in pixels, z depth) -> (face (size, size) long, −1 where no
    triangle covers the pixel; bary (size, size, 3) barycentric coordinates in that face, 0 elsewhere).
    One image of `rasterize_batch`."""
    face, bary = rasterize_batch(pix[None], faces, size)
    return face[0], bary[0]


def rasterize_batch(pix, faces, size):
    """pix (B, V, 3) projected vertices of B meshes sharing faces -> (face (B, size, size) long, −1 where no
    triangle covers the pixel; bary (B, size, size, 3) barycentric coordinates in that face, 0 elsewhere).

    Every triangle enumerates the pixel centres of its bounding box, keeps the covered ones, and a
    scatter-min over depth, then over face index among the nearest, picks the winner. Triangles go in
    groups of equal box extent (most cover a box of 1–2 pixels a side: padding every box to the largest
    would test ~8× more centres), all B images at once (pixel p of image b is b·size² + p, triangle t of it
    b·T + t); the minima depend on neither the order nor the batch, so neither does the result.
    """
    B, T = pix.shape[0], faces.shape[0]
    dev = pix.device
    tri = pix[:, faces].reshape(B * T, 3, 3)                          # (B·T, 3, 3), image-major
    lo = (tri[..., :2].amin(1) - 0.5).ceil().clamp(0, size - 1).long()   # first pixel whose centre may be in
    hi = (tri[..., :2].amax(1) - 0.5).floor().clamp(-1, size - 1).long()  # last one (may be < lo: none)
    extent = (hi - lo + 1).clamp(min=0).amax(1)                       # (B·T,) the side of each box, padded square
    face = torch.full((B * size * size,), -1, dtype=torch.long, device=dev)
    t_all, p_all, z_all = [], [], []
    for k in extent.unique().tolist():
        if k == 0:
            continue
        t_k = (extent == k).nonzero()[:, 0]                           # (N_k,) the triangles of this extent
        off = torch.arange(k, device=dev)
        px = lo[t_k, None, None, 0] + off[None, None, :]              # (N_k, 1, k)
        py = lo[t_k, None, None, 1] + off[None, :, None]              # (N_k, k, 1)
        px, py = torch.broadcast_tensors(px, py)                      # (N_k, k, k)
        in_box = (px <= hi[t_k, None, None, 0]) & (py <= hi[t_k, None, None, 1])
        centre = torch.stack([px, py], -1).to(pix.dtype) + 0.5        # (N_k, k, k, 2)
        b = barycentric(tri[t_k, None, None, :, :2], centre)          # (N_k, k, k, 3)
        covered = in_box & (b >= 0).all(-1)
        t_idx = t_k[:, None, None].expand_as(px)[covered]
        t_all.append(t_idx)
        p_all.append((t_idx // T) * size * size + (py * size + px)[covered])
        z_all.append((b[covered] * tri[t_idx, :, 2]).sum(-1))         # depth of each covering
    if t_all:
        t_idx, p_idx, z = torch.cat(t_all), torch.cat(p_all), torch.cat(z_all)
        zbuf = torch.full((B * size * size,), float("inf"), dtype=pix.dtype, device=dev)
        zbuf = zbuf.scatter_reduce(0, p_idx, z, "amin")
        nearest = z == zbuf[p_idx]
        face = face.scatter_reduce(0, p_idx[nearest], t_idx[nearest], "amin", include_self=False)
    face = face.view(B, size, size)
    hit = face >= 0
    ys, xs = torch.meshgrid(torch.arange(size, device=dev), torch.arange(size, device=dev), indexing="ij")
    centres = torch.stack([xs, ys], -1).to(pix.dtype) + 0.5           # (size, size, 2)
    bary = torch.zeros(B, size, size, 3, dtype=pix.dtype, device=dev)
    bary[hit] = barycentric(tri[face[hit], :, :2], centres.expand(B, size, size, 2)[hit])
    return torch.where(hit, face - torch.arange(B, device=dev)[:, None, None] * T, face), bary  # image-local ids


def vertex_normals(V, faces):
    """(..., V, 3) unit normals of meshes' vertices: the area-weighted sum of their faces' normals."""
    v0, v1, v2 = V[..., faces, :].unbind(-2)
    n_face = torch.cross(v1 - v0, v2 - v0, dim=-1)                    # (..., T, 3), length 2·area
    n = torch.zeros_like(V).index_add_(-2, faces.reshape(-1), n_face.repeat_interleave(3, -2))
    return F.normalize(n, dim=-1)


def render(V, faces, albedo, cam, size, light=(0.0, 0.3, 1.0), ambient=0.35, background=(-1.0, -1.0, -1.0)):
    """Meshes (B, V, 3) with per-vertex albedo (B, V, 3) in [0, 1] -> images (B, 3, size, size) in [−1, 1]
    (the generator's range), and coverage masks (B, size, size).

    Lambertian shading: albedo · (ambient + (1 − ambient)·max(0, n·l)) with the interpolated vertex normal n
    and the light direction l in the mesh's frame (towards the light; +z faces the camera); background
    pixels take `background`.
    """
    B = V.shape[0]
    pix = sm.project(V, cam, size)                                    # (B, V, 3): x, y in pixels, depth
    l = F.normalize(torch.tensor(light, dtype=V.dtype, device=V.device), dim=0)
    bg = torch.tensor(background, dtype=V.dtype, device=V.device)
    face, bary = rasterize_batch(pix, faces, size)                    # (B, size, size), (B, size, size, 3)
    hit = face >= 0
    tri = faces[face.clamp(min=0)]                                    # (B, size, size, 3) vertex ids
    b_id = torch.arange(B, device=V.device)[:, None, None, None]
    n = F.normalize((vertex_normals(V, faces)[b_id, tri] * bary[..., None]).sum(-2), dim=-1)
    a = (albedo[b_id, tri] * bary[..., None]).sum(-2)                 # (B, size, size, 3)
    shade = ambient + (1 - ambient) * (n @ l).clamp(min=0)
    rgb = (a * shade[..., None]) * 2 - 1                              # [0, 1] -> [−1, 1]
    return torch.where(hit[..., None], rgb, bg).permute(0, 3, 1, 2), hit
