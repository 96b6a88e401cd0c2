"""The GPU check: Triton against the reference (cuDNN) on a real GPU, correctness first, then speed.

    python -m bench.gpu                   # ffhq-1024 at batch 1 and 16: checks, per-layer and whole-synthesis times
    python -m bench.gpu --quick           # ffhq-256, batch 1 and 4 (a minute)
    python -m bench.gpu --device cpu      # the checks on the Triton interpreter (TRITON_INTERPRET=1), tiny, no bf16

Run from the repository root. Needs CUDA (or --device cpu with TRITON_INTERPRET=1, for CI). Designed to
finish within 5 minutes on one GPU.

1. Correctness, each a PASS/FAIL line with the measured error: the whole synthesis on Triton against the
   reference path (STYLEMASK_FAST=0, PyTorch ops on cuDNN) in fp32 with exact dot products (TF32 off on both
   sides: |Δ| ≤ 1e-4 of the image range), in fp16 and bf16 against the fp32 reference (relative error of
   the image ≤ 2e-2 for fp16, ≤ 5e-2 for bf16: the inputs and outputs of every layer round to 11 / 8 bits),
   and the gradient of a structured loss with respect to s (fp32: relative error ≤ 1e-3).
2. Speed: per layer (forward, the layer op alone on its real input) and for the whole synthesis (forward,
   and forward + backward w.r.t. s), Triton vs reference, fp32 (TF32 allowed, PyTorch's default) / fp16 /
   bf16, batch 1 and 16: CUDA-event times, median of --reps after warm-up. One table.

Exit status: 1 if any correctness check fails, else 0.
"""
import argparse
import math
import os
import sys
import time

import torch

import kernels
import stylemask as sm
from cli import run_script
from weights import defaults

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}  # fp32: absolute, exact dots; half: relative to the image's RMS
GRAD_TOL = 1e-3


def backend(name):
    """Select the Triton path ('triton') or the plain reference ('ref') for everything that follows."""
    os.environ["STYLEMASK_BACKEND"] = "triton" if name == "triton" else "torch"
    os.environ["STYLEMASK_FAST"] = "1" if name == "triton" else "0"


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps):
    """Median seconds of fn() over reps runs after two warm-ups (CUDA events on a GPU)."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def styles(G, arch, B, device, seed=0):
    z = torch.randn(B, arch["z_dim"], generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        return sm.styles(G, sm.mapping(G, z, truncation=0.7))


def image_loss(img):
    """A loss with structure (a ramp over the pixels), so that its gradient is not a constant."""
    ramp = torch.linspace(-1, 1, img[0].numel(), device=img.device, dtype=torch.float32).view(img.shape[1:])
    return (img.float() * ramp).sum()


def synth(G, s, name, grad=False):
    backend(name)
    if not grad:
        with torch.no_grad():
            return sm.synthesis(G, s), None
    s = s.detach().requires_grad_()
    img = sm.synthesis(G, s)
    image_loss(img).backward()
    return img.detach(), s.grad


def check(G32, s32, device):
    """The correctness lines; returns the number of failures."""
    fails = 0
    allow = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # exact fp32 on both sides
    try:
        ref, g_ref = synth(G32, s32, "ref", grad=True)
        out, g_out = synth(G32, s32, "triton", grad=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = allow
    err = (out - ref).abs().max().item()
    gerr = ((g_out - g_ref).norm() / g_ref.norm()).item()
    for what, e, tol in (("fp32 image, exact dots: max |Δ|", err, TOL["fp32"]),
                         ("fp32 ∂loss/∂s: relative error", gerr, GRAD_TOL)):
        ok = e <= tol and math.isfinite(e)
        fails += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {what} = {e:.2e} (≤ {tol:.0e})")
    rms = ref.float().square().mean().sqrt().item()
    for dt in ("fp16", "bf16") if device == "cuda" else ("fp16",):  # the interpreter has no bf16 (numpy)
        G = {k: v.to(DTYPES[dt]) if v.is_floating_point() else v for k, v in G32.items()}
        out, _ = synth(G, s32.to(DTYPES[dt]), "triton")
        e = ((out.float() - ref).square().mean().sqrt() / rms).item()
        ok = e <= TOL[dt] and math.isfinite(e)
        fails += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {dt} image vs fp32 reference: relative RMS error = {e:.2e} (≤ {TOL[dt]:.0e})")
    return fails


def layer_inputs(G, s):
    """(L, inputs) per style layer: the real activations each layer receives (from the reference path)."""
    layout = sm.style_layout(G)
    backend("ref")
    x = G["input.input"].expand(s.shape[0], -1, -1, -1)
    img, out, n_conv = None, [], 0
    with torch.no_grad():
        for L in layout:
            args = layer_args(G, L, s, x, img, n_conv)
            n_conv += L.kind == "conv"
            out.append((L, args))
            y = kernels.layer(**args)
            if L.kind == "conv":
                x = y
            else:
                img = y
    return out


def layer_args(G, L, s, x, img, i):
    """The keyword arguments of kernels.layer for layer L (i: its index among the conv layers), as synthesis."""
    weight = G[f"{L.name}.conv.weight"][0]
    args = dict(x=x, weight=weight, s=s[:, L.offset:L.offset + L.dim])
    if L.kind == "conv":
        args.update(bias=G[f"{L.name}.activate.bias"], up=L.up, fir=G.get(f"{L.name}.conv.blur.kernel"),
                    noise=G[f"noises.noise_{i}"], noise_strength=G[f"{L.name}.noise.weight"])
    else:
        args.update(bias=G[f"{L.name}.bias"].flatten(), rgb=True, img=img, img_fir=G.get(f"{L.name}.upsample.kernel"))
    return args


def speed(G32, arch, batches, dtypes, device, reps, per_layer):
    rows = []
    for dt in dtypes:
        G = {k: v.to(DTYPES[dt]) if v.is_floating_point() else v for k, v in G32.items()}
        for B in batches:
            s = styles(G32, arch, B, device).to(DTYPES[dt])
            t = {}
            for name in ("ref", "triton"):
                t[name] = timed(lambda: synth(G, s, name), device, reps)
                t[name + "_bwd"] = timed(lambda: synth(G, s, name, grad=True), device, max(1, reps // 2))
            rows.append((dt, B, "synthesis", t))
            if per_layer:
                for L, args in layer_inputs(G, s):
                    t = {}
                    for name in ("ref", "triton"):
                        backend(name)
                        with torch.no_grad():
                            t[name] = timed(lambda: kernels.layer(**args), device, reps)
                    rows.append((dt, B, f"{L.name} {L.res}²", t))
    print(f"\n{'dtype':<5} {'B':>3} {'what':<26} {'ref ms':>9} {'triton ms':>10} {'ref/triton':>10} "
          f"{'ref f+b ms':>11} {'triton f+b':>11} {'ratio':>6}")
    for dt, B, what, t in rows:
        fb = (f"{t['ref_bwd'] * 1e3:>11.3f} {t['triton_bwd'] * 1e3:>11.3f} {t['ref_bwd'] / t['triton_bwd']:>6.2f}"
              if "ref_bwd" in t else "")
        print(f"{dt:<5} {B:>3} {what:<26} {t['ref'] * 1e3:>9.3f} {t['triton'] * 1e3:>10.3f} "
              f"{t['ref'] / t['triton']:>10.2f} {fb}")
    print("(median CUDA-event times; ref = the plain PyTorch path on cuDNN, fp32 with TF32 allowed as PyTorch's "
          "default; f+b = forward + backward w.r.t. s)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="ffhq-256 at batch 1 and 4 instead of ffhq-1024 at 1 and 16")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default), or cpu to run the checks on the Triton interpreter (tiny generator)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per measurement (median)")
    p.add_argument("--no-layers", action="store_true", help="whole-synthesis times only")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.gpu: no CUDA device here; on a CPU run `TRITON_INTERPRET=1 python -m bench.gpu "
                         "--device cpu` (the checks only), or run the static check `python -m bench.aot`")
    if a.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("bench.gpu: --device cpu runs the Triton interpreter: set TRITON_INTERPRET=1")
    if a.device == "cpu":
        arch_name, batches, dtypes = "tiny", (1, 2), ("fp32",)
    else:
        arch_name, batches, dtypes = ("ffhq-256", (1, 4)) if a.quick else ("ffhq-1024", (1, 16)), ("fp32", "fp16", "bf16")
        arch_name, batches = arch_name
    arch = sm.ARCHS[arch_name]
    G32 = {k: v.to(a.device) for k, v in defaults.random_generator(arch, seed=0).items()}
    name = torch.cuda.get_device_name() if a.device == "cuda" else "CPU (Triton interpreter)"
    print(f"bench.gpu: {arch_name} on {name}, torch {torch.__version__}")
    t0 = time.time()
    fails = check(G32, styles(G32, arch, 2, a.device), a.device)
    if a.device == "cuda":
        speed(G32, arch, batches, dtypes, a.device, a.reps, not a.no_layers)
    print(f"\n{time.time() - t0:.0f} s; " + (f"{fails} check(s) FAILED" if fails else "all checks passed"))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(run_script(main))
