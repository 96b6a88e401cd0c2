"""Time StyleGAN2 synthesis against the machine's own convolution speed, layer by layer.

    python -m bench.speed                              # ffhq-256 and ffhq-1024 at batch 1 and 6
    python -m bench.speed --paths fast,ref             # the same with the reference path beside it (slow)
    python -m bench.speed --config ffhq-1024 --batch 1 # one configuration, with its per-layer table
    python -m bench.speed --config ffhq-1024 --kernels # modconv per layer shape: ref / grouped / cpu / triton

Run from the repository root: there `python -m` finds both this package and the model's modules.

Each configuration runs in a fresh process (so that its peak RSS is its own) and reports seconds per image,
the achieved GFLOP/s over the generator's conv + FIR work, and the GFLOP/s of a calibration convolution
timed in the same process, interleaved with the synthesis runs: one 512→512 3×3 convolution at 64×64 with
the same batch, in whichever memory format (NCHW or NHWC) is faster here. `ratio` is the first over the
second: 1.0 would be the whole generator running as fast as one large, ideal convolution. Times are the
best of --reps runs after a warm-up, for both (on a shared machine other processes only slow runs down).

Paths: `fast` is the default dispatch (the fast CPU ops on a CPU, Triton on a GPU); `ref` is the plain
reference (STYLEMASK_BACKEND=torch STYLEMASK_FAST=0); `triton` forces the Triton kernels. The per-layer
table splits each layer's time into conv (modulation + convolution), FIR (the [1,3,3,1] resampling: the
blur of the up-sampling conv, on the fast path with the interleave of its polyphase outputs, and the 2×
up-FIR of the ToRGB skip) and other (noise, bias, activation, skip add), each piece timed alone on the
layer's shapes. Weights are random, in the official layout; nothing is
downloaded. Torch uses the machine's default thread count. Exits 0 everywhere.
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels
import stylemask as sm
from weights import defaults
from kernels.modconv import NHWC_MIN_PIXELS, _fir_cpu, _Interleave, modconv_ref

ROOT = Path(__file__).resolve().parents[1]  # the repository root: the children run `-m bench.speed` there

PATH_ENV = {"fast": {"STYLEMASK_BACKEND": "auto", "STYLEMASK_FAST": "1"},
            "ref": {"STYLEMASK_BACKEND": "torch", "STYLEMASK_FAST": "0"},
            "triton": {"STYLEMASK_BACKEND": "triton", "STYLEMASK_FAST": "1"}}
NHWC = torch.channels_last


def timeit(fn, reps, device):
    """Best seconds of fn() over reps runs, after one warm-up (other processes only ever slow a run down)."""
    fn()
    return min(_once(fn, device) for _ in range(reps))


def _once(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def layer_gflop(L, B, arch):
    """FLOPs (2 per multiply-add) of one layer: the convolution at input resolution, plus the FIR."""
    k = 1 if L.kind == "torgb" else 3
    c_out = 3 if L.kind == "torgb" else arch["channels"][L.res]
    r_in = L.res // L.up
    conv = 2 * B * c_out * L.dim * k * k * r_in * r_in
    fir = 2 * B * c_out * 16 * L.res * L.res if L.up == 2 else 0
    return (conv + fir) / 1e9


# --- One configuration (runs in its own process) ------------------------------------------------------

def calibration(B, device, reps):
    """(run, GFLOP, layout): the calibration conv, 512→512 3×3 at 64×64 with batch B, in its faster layout."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, 512, 64, 64, generator=gen).to(device)
    w = torch.randn(512, 512, 3, 3, generator=gen).to(device) / 48
    gflop = 2 * B * 512 * 512 * 9 * 64 * 64 / 1e9
    layouts = {"NCHW": x, "NHWC": x.contiguous(memory_format=NHWC)}
    times = {name: timeit(lambda: F.conv2d(xf, w, padding=1), reps, device) for name, xf in layouts.items()}
    name = min(times, key=times.get)
    return (lambda: F.conv2d(layouts[name], w, padding=1)), gflop, name


def run_one(arch_name, B, path, reps, layers):
    """Time synthesis and the calibration conv, interleaved; print the per-layer table; return the row."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.update(PATH_ENV[path])
    torch.set_grad_enabled(False)
    arch = sm.ARCHS[arch_name]
    G = {k: v.to(device) for k, v in defaults.random_generator(arch, seed=0).items()}
    z = torch.randn(B, arch["z_dim"], generator=torch.Generator().manual_seed(0)).to(device)
    s = sm.styles(G, sm.mapping(G, z, truncation=0.7))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cal, cal_gflop, cal_layout = calibration(B, device, 3)
    sm.synthesis(G, s)  # warm-up (oneDNN primitives, allocator)
    t_syn, t_cal = [], []
    for _ in range(reps):  # interleaved, so that both see the same machine
        t_syn.append(_once(lambda: sm.synthesis(G, s), device))
        t_cal.append(_once(cal, device))
    t_syn, t_cal = min(t_syn), min(t_cal)  # best of reps, as timeit
    gflop = sum(layer_gflop(L, B, arch) for L in sm.style_layout(arch))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if layers:
        print_layers(G, arch_name, B, path, device, max(1, reps), t_syn)
    return dict(config=arch_name, batch=B, path=path, device=device, threads=torch.get_num_threads(),
                s_per_image=t_syn / B, gflops=gflop / t_syn, cal_gflops=cal_gflop / t_cal, cal_layout=cal_layout,
                ratio=(gflop / t_syn) / (cal_gflop / t_cal), peak_rss_mib=peak, rss_before_mib=rss_before,
                gflop_per_image=gflop / B)


# --- Per-layer table ----------------------------------------------------------------------------------

def layer_pieces(G, L, x, s_l, img, path):
    """Callables for one layer on the path's ops: {'layer', 'fir', 'other'}; the conv share is layer − fir
    for up-sampling convs (whose FIR runs inside modconv) and layer for the rest."""
    weight = G[f"{L.name}.conv.weight"][0]
    lr = 1 / math.sqrt(weight[0].numel())
    fir = G.get(f"{L.name}.conv.blur.kernel")
    out = {}
    if path == "fast" and x.device.type == "cpu":  # as kernels.layer_cpu
        s_l = s_l * lr
        if L.kind == "conv":
            bias, nw = G[f"{L.name}.activate.bias"] * sm.SQRT2, G[f"{L.name}.noise.weight"] * sm.SQRT2
            out["layer"] = lambda: kernels.modconv_cpu(x, weight, s_l, up=L.up, fir=fir, bias=bias, gain=sm.SQRT2)
            y = out["layer"]()
            n = G[f"noises.noise_{_noise_index(L)}"]

            def other():  # noise, then the leaky ReLU, both in place
                y.add_(n * nw)
                F.leaky_relu_(y, 0.2)
            out["other"] = other
            if L.up == 2 and x.shape[2] * x.shape[3] >= NHWC_MIN_PIXELS:  # interleave of the polyphase convs
                r = L.res // 2                                           # into the padded buffer, FIR
                phases = [torch.randn(y.shape[0], y.shape[1], r + a, r + b).contiguous(memory_format=NHWC)
                          for a in (1, 0) for b in (1, 0)]
                out["fir"] = lambda: _fir_cpu(_Interleave.apply(1, 1, *phases), fir, bias)
            elif L.up == 2:  # the FIR after oneDNN's transposed conv
                t = torch.randn(y.shape[0], y.shape[1], L.res + 1, L.res + 1)
                out["fir"] = lambda: _fir_cpu(t, fir, bias, padding=1)
        else:
            bias = G[f"{L.name}.bias"].flatten()
            out["layer"] = lambda: kernels.modconv_cpu(x, weight, s_l, demodulate=False, bias=bias)
            y = out["layer"]()
            if img is not None:
                k = G[f"{L.name}.upsample.kernel"]
                out["fir"] = lambda: kernels.upfirdn2d_cpu(img, k, up=2, pad=(2, 1, 2, 1))
                up = out["fir"]()
                out["other"] = lambda: y.add_(up)
    else:  # as the loop in stylemask.synthesis, on the reference ops (or Triton)
        w = weight * lr
        impl = {"fast": "auto", "ref": "torch", "triton": "triton"}[path]  # fast on a GPU: Triton
        if L.kind == "conv":
            out["layer"] = lambda: kernels.modconv(x, w, s_l, up=L.up, fir=fir, impl=impl)
            y = out["layer"]()
            n = G[f"noises.noise_{_noise_index(L)}"]
            nw, b = G[f"{L.name}.noise.weight"], G[f"{L.name}.activate.bias"][None, :, None, None]
            out["other"] = lambda: F.leaky_relu((y + nw * n) + b, 0.2) * sm.SQRT2
            if L.up == 2:
                t = torch.randn(y.shape[0], y.shape[1], L.res + 1, L.res + 1, device=y.device)
                out["fir"] = lambda: kernels.upfirdn2d(t, fir, pad=(1, 1, 1, 1), impl=impl)
        else:
            out["layer"] = lambda: kernels.modconv(x, w, s_l, demodulate=False, impl=impl) + G[f"{L.name}.bias"]
            y = out["layer"]()
            if img is not None:
                k = G[f"{L.name}.upsample.kernel"]
                out["fir"] = lambda: kernels.upfirdn2d(img, k, up=2, pad=(2, 1, 2, 1), impl=impl)
                up = out["fir"]()
                out["other"] = lambda: y + up
    return out


def _noise_index(L):
    """The noise buffer of conv layer L: noise_0 for conv1, noise_{i+1} for convs.i."""
    return 0 if L.name == "conv1" else int(L.name.split(".")[1]) + 1


def print_layers(G, arch_name, B, path, device, reps, t_syn):
    """Per layer: conv / FIR / other ms, GFLOP and GFLOP/s, each piece timed alone on the layer's shapes."""
    gen = torch.Generator().manual_seed(2)
    arch = sm.ARCHS[arch_name]
    print(f"\n{arch_name}, batch {B}, path {path}: per layer (ms for the batch; pieces timed alone)")
    print(f"{'layer':<10} {'res':>5} {'cin':>4} {'cout':>4} {'up':>2} {'GFLOP':>7} {'conv':>9} {'FIR':>8} "
          f"{'other':>8} {'total':>9} {'GFLOP/s':>8} {'share':>6}")
    rows, split, nhwc = [], False, False
    for L in sm.style_layout(arch):
        r_in = L.res // L.up
        x = torch.randn(B, L.dim, r_in, r_in, generator=gen).to(device)
        s_l = torch.randn(B, L.dim, generator=gen).to(device) + 1
        img = None  # the running image that the ToRGB's skip up-samples (in the layout of its conv's input)
        if L.kind == "torgb" and L.res > 4:
            img = torch.randn(B, 3, L.res // 2, L.res // 2, generator=gen).to(device)
            img = img.contiguous(memory_format=NHWC if path == "fast" and nhwc else torch.contiguous_format)
        if path == "fast" and device == "cpu":
            weight = G[f"{L.name}.conv.weight"][0]
            if L.kind == "conv":  # the layout modconv_cpu gives its input; ToRGB keeps the last one
                nhwc = r_in * r_in >= NHWC_MIN_PIXELS
            x = x.contiguous(memory_format=NHWC if nhwc else torch.contiguous_format)
            # stylemask._layers runs the rest of the network one sample at a time from the first conv layer
            # whose activations outgrow its weights: time those layers at batch 1, B times
            split = split or (B > 1 and L.kind == "conv" and kernels.modulates_weights(x, weight, s_l))
        n = B if split else 1
        pieces = layer_pieces(G, L, x[:1] if split else x, s_l[:1] if split else s_l,
                              None if img is None else (img[:1] if split else img), path)
        t = {name: n * timeit(fn, reps, device) * 1e3 for name, fn in pieces.items()}
        fir, other = t.get("fir", 0.0), t.get("other", 0.0)
        conv = t["layer"] - fir if L.kind == "conv" else t["layer"]
        total = conv + fir + other
        gf = layer_gflop(L, B, arch)
        rows.append((L, gf, conv, fir, other, total))
    all_ms = sum(r[-1] for r in rows)
    for L, gf, conv, fir, other, total in rows:
        c_out = 3 if L.kind == "torgb" else arch["channels"][L.res]
        print(f"{L.name:<10} {L.res:>5} {L.dim:>4} {c_out:>4} {L.up:>2} {gf:>7.2f} {conv:>9.1f} {fir:>8.1f} "
              f"{other:>8.1f} {total:>9.1f} {gf / total * 1e3:>8.1f} {100 * total / all_ms:>5.1f}%")
    sums = [sum(r[i] for r in rows) for i in range(1, 6)]
    print(f"{'sum':<10} {'':>5} {'':>4} {'':>4} {'':>2} {sums[0]:>7.2f} {sums[1]:>9.1f} {sums[2]:>8.1f} "
          f"{sums[3]:>8.1f} {sums[4]:>9.1f} {sums[0] / sums[4] * 1e3:>8.1f}")
    print(f"whole synthesis measured: {t_syn * 1e3:.1f} ms (the difference to the sum: Python, allocation, caches)")


# --- modconv implementations per layer shape (the kernels table) ----------------------------------------

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


def kernels_table(arch_name, B, reps):
    """modconv per distinct layer shape: the reference, the official grouped formulation, the fast CPU
    variant (CPU) or the Triton kernel (GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    arch = sm.ARCHS[arch_name]
    torch.set_grad_enabled(False)
    gen = torch.Generator().manual_seed(0)
    fir = (torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 16).to(device)
    impls = {"ref": modconv_ref, "grouped": grouped_modconv}
    if device == "cuda":
        impls["triton"] = lambda *args, **kw: kernels.modconv(*args, **kw, impl="triton")
    else:
        impls["cpu"] = kernels.modconv_cpu
    print(f"\nmodconv per layer shape, {arch_name}, batch {B}, {device}"
          + ("" if device == "cuda" else " (no GPU: no Triton column; the interpreter is a correctness tool)"))
    print(f"{'layer':<10} {'res':>5} {'cin':>4} {'cout':>4} {'up':>2} {'GFLOP':>7} "
          + " ".join(f"{n + ' ms':>11} {'GFLOP/s':>8}" for n in impls))
    seen = set()
    for L in sm.style_layout(arch):
        k, c_out = (1, 3) if L.kind == "torgb" else (3, arch["channels"][L.res])
        if (L.kind, L.res, L.dim, c_out, L.up) in seen:
            continue  # identical shapes time identically
        seen.add((L.kind, L.res, L.dim, c_out, L.up))
        r_in = L.res // L.up
        x = torch.randn(B, L.dim, r_in, r_in, generator=gen).to(device)
        w = (torch.randn(c_out, L.dim, k, k, generator=gen) / math.sqrt(L.dim * k * k)).to(device)
        s = torch.randn(B, L.dim, generator=gen).to(device)
        gf = layer_gflop(L, B, arch)
        cols = []
        for name, fn in impls.items():
            xi = x.contiguous(memory_format=NHWC) if name == "cpu" else x
            t = timeit(lambda: fn(xi, w, s, demodulate=L.kind == "conv", up=L.up, fir=fir), reps, device)
            cols.append(f"{t * 1e3:>11.2f} {gf / t:>8.1f}")
        print(f"{L.name:<10} {L.res:>5} {L.dim:>4} {c_out:>4} {L.up:>2} {gf:>7.2f} " + " ".join(cols))


# --- Driver -----------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=["ffhq-256", "ffhq-1024"], choices=sorted(sm.ARCHS),
                   help="model sizes (default: ffhq-256 ffhq-1024)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 6], help="batch sizes (default: 1 6)")
    p.add_argument("--paths", default=None,
                   help="comma-separated: fast, ref, triton (default: fast on a CPU, fast,ref on a GPU)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions, best reported (default: 5)")
    p.add_argument("--layers", action=argparse.BooleanOptionalAction, default=None,
                   help="print the per-layer table (default: when one config and one batch are given)")
    p.add_argument("--kernels", action="store_true", help="also time modconv per layer shape, per implementation")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: CONFIG,BATCH,PATH in this process
    a = p.parse_args(argv)
    if a.one:
        arch_name, B, path = a.one.split(",")
        print("RESULT " + json.dumps(run_one(arch_name, int(B), path, a.reps, a.layers)), flush=True)
        return 0
    gpu = torch.cuda.is_available()
    paths = (a.paths or ("fast,ref" if gpu else "fast")).split(",")
    layers = a.layers if a.layers is not None else (len(a.config) == 1 and len(a.batch) == 1)
    print(f"device: {torch.cuda.get_device_name() if gpu else cpu_name()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, float32")
    rows = []
    for arch_name in a.config:
        for B in a.batch:
            for path in paths:
                row = run_child(arch_name, B, path, a.reps, layers)
                if row:
                    rows.append(row)
    print(f"\n{'config':<10} {'batch':>5} {'path':<6} {'s/image':>8} {'GFLOP/s':>8} {'calib':>7} {'ratio':>6} "
          f"{'peak RSS':>9}")
    for r in rows:
        print(f"{r['config']:<10} {r['batch']:>5} {r['path']:<6} {r['s_per_image']:>8.3f} {r['gflops']:>8.1f} "
              f"{r['cal_gflops']:>7.1f} {r['ratio']:>6.2f} {r['peak_rss_mib']:>6.0f} MiB")
    if rows:
        per_image = sorted({f"{r['config']} {r['gflop_per_image']:.1f}" for r in rows})
        print(f"(GFLOP of conv + FIR per image: {', '.join(per_image)}; calib: one 512→512 3×3 conv at 64×64, "
              f"batch-matched, same process, faster of NCHW/NHWC; peak RSS: ru_maxrss of a fresh process)")
    if a.kernels:
        for arch_name in a.config:
            for B in a.batch:
                kernels_table(arch_name, B, a.reps)
    return 0


def run_child(arch_name, B, path, reps, layers):
    """Run one configuration in a fresh interpreter; echo its output; return its result row (or None)."""
    cmd = [sys.executable, "-m", "bench.speed", "--one", f"{arch_name},{B},{path}", "--reps", str(reps),
           "--layers" if layers else "--no-layers"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    row = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            row = json.loads(line[len("RESULT "):])
        else:
            print(line)
    if proc.returncode != 0 or row is None:
        print(f"{arch_name} batch {B} path {path}: failed ({proc.stderr.strip().splitlines()[-1:]})")
    return row


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())
