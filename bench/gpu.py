"""The GPU check: Triton against the reference (cuDNN) on a real GPU, correctness first, then speed.

    python -m bench.gpu                   # ffhq-1024 at batch 1 and 16: checks, per-layer and whole-synthesis times
    python -m bench.gpu --quick           # ffhq-256, batch 1 and 4 (a minute)
    python -m bench.gpu --device cpu      # the checks on the Triton interpreter (TRITON_INTERPRET=1), tiny, no bf16

Run from the repository root. Needs CUDA (or --device cpu with TRITON_INTERPRET=1, for CI). Designed to
finish within 5 minutes on one GPU.

1. Correctness, each a PASS/FAIL line with the measured errors (`CASES`): the whole synthesis on Triton
   against the reference path in exact fp32 (STYLEMASK_FAST=0, PyTorch ops on cuDNN, TF32 off): exact fp32,
   the default path (fp32 with TF32), fp16 and bf16, at batch 1, 6 and 16 (--quick: 1 and 4); a generator
   with conv_clamp (a binding one in exact fp32, NVlabs' 256 in fp16) and per-sample noise at the largest
   batch. Per row the image's relative RMS error, its worst pixel (max |Δ| / max |ref|, which one wrong
   tile cannot hide from), and the gradient of a structured loss w.r.t. s (relative norm error), each
   against a tolerance of the dtype's rounding. Every row runs, whatever failed before it; each Triton
   layer variant is also checked by the safety net (kernels/layer.py), strictly (STYLEMASK_BACKEND=triton).
2. Speed: per layer (forward, the layer op alone on its real input) and for the whole synthesis (forward,
   and forward + backward w.r.t. s), Triton vs reference, fp32 (TF32 allowed, PyTorch's default) / fp16 /
   bf16, batch 1 and 16: CUDA-event times, median of --reps after warm-up. One table.

The first line says what it ran on (GPU, capability, driver, CUDA, torch, triton); --json PATH writes that,
every check row and every timing. Exit status: 1 if any correctness check fails, else 0.
"""
import argparse
import math
import os
import sys
import time

import torch

import triton

import cli
import kernels
import stylemask as sm
from cli import run_script
from weights import defaults

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


# --- 1. Correctness on the default path ----------------------------------------------------------------------
# Each case: the whole synthesis on Triton against the reference path in exact fp32 (TF32 off), image and the
# gradient of a structured loss w.r.t. s. Two metrics on the image: the relative RMS error, and the worst pixel
# (max |Δ| / max |ref|), which a single wrong tile cannot hide from; the gradient by its relative norm error.
# Tolerances (image RMS, image worst pixel, gradient): float rounding of each dtype, not a wrong tile (O(1)).

CASES = {  # name -> (dtype, TF32 allowed, tolerances)
    "fp32 exact": ("fp32", False, (1e-6, 1e-4, 1e-3)),
    "fp32 TF32 (default)": ("fp32", True, (1e-2, 3e-2, 1e-2)),
    "fp16": ("fp16", True, (2e-2, 6e-2, 5e-2)),
    "bf16": ("bf16", True, (5e-2, 1.2e-1, 1e-1)),
}


def with_clamp(G, clamp):
    """G as NVlabs-converted generators come (conv_clamp), with a clamp low enough to act."""
    return dict(G, conv_clamp=torch.tensor(float(clamp), device=G["input.input"].device))


def synth_case(G, s, name, noise_seed):
    """(image, ∂loss/∂s) of one path; per-sample noise drawn from noise_seed (the same draws on both paths)."""
    backend(name)
    s = s.detach().requires_grad_()
    rng = None if noise_seed is None else torch.Generator(device=s.device).manual_seed(noise_seed)
    img = sm.synthesis(G, s, noise="random" if rng is not None else "const", rng=rng)
    image_loss(img).backward()
    return img.detach().float(), s.grad.float()


def check_one(G32, s32, case, clamp=None, noise_seed=None):
    """One row of the check: the metrics, the tolerances and PASS/FAIL (an exception is a FAIL with its line)."""
    dt, tf32, (tol_rms, tol_max, tol_grad) = CASES[case]
    row = dict(case=case, dtype=dt, batch=s32.shape[0], clamp=clamp, noise="per-sample" if noise_seed is not None
               else "const", tolerances=dict(rms=tol_rms, max=tol_max, grad=tol_grad))
    allow = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        G32c = with_clamp(G32, clamp) if clamp is not None else G32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the reference: exact fp32
        ref, g_ref = synth_case(G32c, s32, "ref", noise_seed)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        G = {k: v.to(DTYPES[dt]) if v.is_floating_point() else v for k, v in G32c.items()}
        out, g_out = synth_case(G, s32.to(DTYPES[dt]), "triton", noise_seed)
        row.update(rms=((out - ref).square().mean().sqrt() / ref.square().mean().sqrt()).item(),
                   max=((out - ref).abs().max() / ref.abs().max()).item(),
                   grad=((g_out - g_ref).norm() / g_ref.norm()).item())
        row["ok"] = all(math.isfinite(row[k]) and row[k] <= row["tolerances"][k] for k in ("rms", "max", "grad"))
    except Exception as e:  # report it and go on: the check must say everything that failed
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e) else ''}")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = allow
    what = (f"{case:<20} B{row['batch']:<3}" + (f" clamp {clamp}" if clamp is not None else "")
            + (" noise per sample" if noise_seed is not None else ""))
    if "error" in row:
        print(f"FAIL  {what}: {row['error']}")
    else:
        print(f"{'PASS' if row['ok'] else 'FAIL'}  {what}: image RMS {row['rms']:.1e} (≤ {tol_rms:.0e}), worst pixel "
              f"{row['max']:.1e} (≤ {tol_max:.0e}), ∂s {row['grad']:.1e} (≤ {tol_grad:.0e})")
    return row


def check(G32, arch, batches, device):
    """Every correctness row: each dtype of the default path (and exact fp32) at each batch; a conv_clamp
    generator and per-sample noise at the largest batch. -> the rows."""
    cases = ["fp32 exact", "fp32 TF32 (default)", "fp16"] + (["bf16"] if device == "cuda" else [])  # (numpy: no bf16)
    rows = [check_one(G32, styles(G32, arch, B, device), c) for B in batches for c in cases]
    B = max(batches)
    s = styles(G32, arch, B, device, seed=1)
    rows.append(check_one(G32, s, "fp32 exact", clamp=0.5))  # a clamp that binds: the clamp's own logic
    # fp16 at NVlabs' conv_clamp (256): the clamping kernels in half precision. (A binding clamp in fp16 is a test
    # of rounding luck, not of the kernels: outputs piled up at ±clamp, and those that round onto it, pass no
    # gradient on one side and do on the other.)
    rows.append(check_one(G32, s, "fp16", clamp=256))
    rows.append(check_one(G32, s, "fp32 exact", noise_seed=7))
    return rows


def environment(device):
    """What the check ran on: the device, its driver and CUDA, torch and triton."""
    env = dict(torch=torch.__version__, triton=triton.__version__, device=device)
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())),
                   cuda=torch.version.cuda, driver=_driver())
    else:
        env.update(gpu="none: the Triton interpreter on the CPU")
    return env


def _driver():
    try:
        import subprocess
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:  # no nvidia-smi: the driver's CUDA version, from torch
        return f"CUDA {torch._C._cuda_getDriverVersion() if hasattr(torch._C, '_cuda_getDriverVersion') else '?'}"


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
    return [dict(dtype=dt, batch=B, what=what, **{f"{k}_s": v for k, v in t.items()}) for dt, B, what, t in rows]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="ffhq-256 at batch 1 and 4 instead of ffhq-1024 at 1 and 16")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default), or cpu to run the checks on the Triton interpreter (tiny generator)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per measurement (median)")
    p.add_argument("--no-layers", action="store_true", help="whole-synthesis times only")
    p.add_argument("--json", metavar="PATH", help="also write the environment, every check row and every timing here")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.gpu: no CUDA device here; on a CPU run `TRITON_INTERPRET=1 python -m bench.gpu "
                         "--device cpu` (the checks only), or run the static check `python -m bench.aot`")
    if a.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("bench.gpu: --device cpu runs the Triton interpreter: set TRITON_INTERPRET=1")
    if a.device == "cpu":
        arch_name, batches, check_batches, dtypes = "tiny", (1, 2), (1, 2), ("fp32",)
    else:
        arch_name, batches = ("ffhq-256", (1, 4)) if a.quick else ("ffhq-1024", (1, 16))
        check_batches, dtypes = (1, 6, 16) if not a.quick else (1, 4), ("fp32", "fp16", "bf16")
    arch = sm.ARCHS[arch_name]
    G32 = {k: v.to(a.device) for k, v in defaults.random_generator(arch, seed=0).items()}
    env = dict(environment(a.device), arch=arch_name)
    print("bench.gpu: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    t0 = time.time()
    rows = check(G32, arch, check_batches, a.device)
    fails = sum(not r["ok"] for r in rows)
    timings = speed(G32, arch, batches, dtypes, a.device, a.reps, not a.no_layers) if a.device == "cuda" else []
    if a.json:
        import json
        cli.write_text(a.json, json.dumps(dict(environment=env, checks=rows, timings=timings), indent=1) + "\n")
    print(f"\n{time.time() - t0:.0f} s; " + (f"{fails} of {len(rows)} check(s) FAILED" if fails else
                                              f"all {len(rows)} checks passed"))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(run_script(main))
