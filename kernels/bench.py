"""Time the modulated convolution per layer shape of a StyleGAN2 generator, and the whole synthesis.

    python kernels/bench.py                          # 1024 config-f, batch 1
    python kernels/bench.py --config ffhq-256 --batch 6 --reps 5

Columns: `ref` is `modconv_ref` (activation modulation, one ordinary conv per batch: cuDNN on a GPU);
`grouped` is the official per-sample-weight grouped convolution (rosinality / StyleMask); `triton` is
our kernel (GPU only). On a CPU there is no Triton column (the interpreter is a correctness tool,
not a fast path): the table then times the PyTorch paths and says so. Weights are random, in the
official layout; nothing is downloaded. Exits 0 everywhere.
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402
import stylemask as sm  # noqa: E402
from kernels.modconv import modconv_ref  # noqa: E402


def grouped_modconv(x, weight, s, demodulate=True, up=1, fir=None):
    """The official formulation: per-sample modulated weights, one grouped convolution (rosinality)."""
    B, Cin, H, W = x.shape
    Cout, _, k, _ = weight.shape
    w = weight[None] * s[:, None, :, None, None]  # (B, Cout, Cin, k, k)
    if demodulate:
        w = w * torch.rsqrt(w.square().sum([2, 3, 4]) + 1e-8)[:, :, None, None, None]
    x = x.reshape(1, B * Cin, H, W)
    if up == 1:
        y = F.conv2d(x, w.reshape(B * Cout, Cin, k, k), padding=k // 2, groups=B)
        return y.reshape(B, Cout, H, W)
    w = w.transpose(1, 2).reshape(B * Cin, Cout, k, k)
    y = F.conv_transpose2d(x, w, stride=2, groups=B)
    y = y.reshape(B, Cout, *y.shape[2:])
    return kernels.upfirdn2d_ref(y, fir, pad=(1, 1, 1, 1))


def timeit(fn, reps, device):
    """Median seconds of fn() over reps runs, after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def layer_gflop(L, B, cfg):
    """FLOPs (2 per multiply-add) of one layer: the convolution at input resolution, plus the FIR."""
    k = 1 if L.kind == "torgb" else 3
    c_out = 3 if L.kind == "torgb" else cfg["channels"][L.res]
    r_in = L.res // L.up
    conv = 2 * B * c_out * L.dim * k * k * r_in * r_in
    fir = 2 * B * c_out * 16 * L.res * L.res if L.up == 2 else 0
    return (conv + fir) / 1e9


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="ffhq-1024", choices=sorted(sm.CONFIGS), help="model size (default: ffhq-1024)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions, median reported (default: 3)")
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, B = sm.CONFIGS[a.config], a.batch
    torch.set_grad_enabled(False)
    gen = torch.Generator().manual_seed(0)
    fir = (torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 16).to(device)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'} ({torch.get_num_threads()} threads), "
          f"config {a.config}, batch {B}, float32")
    if device == "cpu":
        print("note: no GPU here, so no Triton column: the Triton kernels run compiled only on CUDA tensors.")
    impls = {"ref": modconv_ref, "grouped": grouped_modconv}
    if device == "cuda":
        impls["triton"] = lambda *args, **kw: kernels.modconv(*args, **kw, impl="triton")
    print(f"{'layer':<10} {'res':>5} {'cin':>4} {'cout':>4} {'up':>2} {'GFLOP':>7} "
          + " ".join(f"{n + ' ms':>11} {'GFLOP/s':>8}" for n in impls))
    shapes_seen = set()
    for L in sm.style_layout(cfg):
        k = 1 if L.kind == "torgb" else 3
        c_out = 3 if L.kind == "torgb" else cfg["channels"][L.res]
        key = (L.kind, L.res, L.dim, c_out, L.up)
        if key in shapes_seen:
            continue  # identical shapes time identically
        shapes_seen.add(key)
        r_in = L.res // L.up
        x = torch.randn(B, L.dim, r_in, r_in, generator=gen).to(device)
        w = (torch.randn(c_out, L.dim, k, k, generator=gen) / math.sqrt(L.dim * k * k)).to(device)
        s = torch.randn(B, L.dim, generator=gen).to(device)
        gf = layer_gflop(L, B, cfg)
        cols = []
        for fn in impls.values():
            t = timeit(lambda: fn(x, w, s, demodulate=L.kind == "conv", up=L.up, fir=fir), a.reps, device)
            cols.append(f"{t * 1e3:>11.2f} {gf / t:>8.1f}")
        print(f"{L.name:<10} {L.res:>5} {L.dim:>4} {c_out:>4} {L.up:>2} {gf:>7.2f} " + " ".join(cols))
    G = {k: v.to(device) for k, v in sm.random_generator(cfg, seed=0).items()}
    s = sm.styles(G, sm.mapping(G, torch.randn(B, cfg["z_dim"], generator=gen).to(device)))
    total = sum(layer_gflop(L, B, cfg) for L in sm.style_layout(cfg))
    backends = ["torch", "triton"] if device == "cuda" else ["torch"]
    for backend in backends:
        os.environ["STYLEMASK_BACKEND"] = backend  # synthesis dispatches every op through kernels/
        t = timeit(lambda: sm.synthesis(G, s), a.reps, device)
        print(f"synthesis [{backend}]: {t:.3f} s per batch of {B} ({t / B:.3f} s/image), {total / t:.1f} GFLOP/s "
              f"over {total:.1f} GFLOP of conv + FIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
