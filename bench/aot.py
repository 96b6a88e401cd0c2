"""Static GPU check of the Triton kernels: every launch of one synthesis, compiled ahead of time, no GPU.

    python -m bench.aot                      # fp32/fp16/bf16 × batch 1, 16; sm_80 and sm_90a (~5 min cold, 2 cores)
    python -m bench.aot --quick              # fp16, batch 16, sm_90a only (~25 s cold, ~8 s cached)
    python -m bench.aot --layers --json out/aot.json   # plus the per-launch table and every figure as JSON

Run from the repository root (`python -m` then finds this package and the model's modules).

1. Capture. `stylemask.synthesis` of the ffhq-1024 config-f generator runs on *meta* tensors (no memory,
   no maths), forward and backward (`s.grad`, as train.py needs), for fp32 / fp16 / bf16 at batch 1 and 16,
   on the CUDA code path (`gpu_code_path`). `JITFunction.run` is replaced at class level, so every
   @triton.jit launch is recorded (kernel, grid, arguments, options) instead of run, and a TorchDispatchMode
   (`counting`) records every PyTorch op between them that moves memory or computes (its bytes and FLOPs).
   Each is tagged with the synthesis layer whose op (`kernels.layer`) made it and fwd / bwd. The reference
   path (STYLEMASK_BACKEND=torch: plain PyTorch, no launch) is captured the same way.
2. Specialise. Each launch is specialised by Triton's own binder with the CUDA backend, as the JIT does:
   ints equal to 1 become constexpr; ints and pointers divisible by 16 get tt.divisibility=16 (a tensor's
   address is taken as 256-B aligned, as the CUDA caching allocator guarantees, plus its storage offset).
   Launches that would share a compiled kernel are one variant; each variant is compiled for sm_80 (A100)
   and sm_90a (H100/H200) with `triton.compile`, honouring num_warps / num_stages given at the launch.
3. Inspect. Per variant and target: registers and spill bytes (`ptxas -v`, the ptxas binary and flags
   Triton uses, on the variant's PTX), shared memory against the per-block limit (A100 166912 B,
   H100/H200 232448 B: Triton raises OutOfResources at launch above it), num_warps / num_stages,
   tensor-core opcodes in the SASS (HMMA, HGMMA = wgmma, IMMA, ...), and SASS instructions per MMA
   instruction in the main loop (the largest backward-branch interval).
4. Model. An optimistic bound on an H200 per launch, max(MMA time, SASS issue time, HBM time), with
   CTAs per SM from registers and shared memory and wave quantisation, from the sm_90a binaries and the
   per-kernel knowledge in `MODELS`; per PyTorch op max(FLOPs at peak, bytes at HBM bandwidth); plus a
   launch gap (`LAUNCH_S`) per kernel of either kind. Summed over the synthesis, forward and forward +
   backward, for the Triton path and the reference path alike, beside an ideal cuDNN roofline of the same
   convolutions. Peak rates everywhere: a bound that no real run beats, not a prediction of one.
   Kernels without a `MODELS` entry are compiled and reported, and listed as "not modelled".

Output: the variant table, the whole-synthesis table per (dtype, batch) and, with --layers, the per-launch
table. --json PATH writes
  variants: one row per (variant, target): name, kernel, is_conv, target (sm_80 | sm_90a), dtype (fp32 |
    fp16 | bf16), regs, spill_bytes, smem_bytes, smem_limit, mma_opcodes (list), instr_per_mma (main loop;
    null without a loop or MMA), error (null or the compiler's message); and kernel_instr_per_mma (the whole
    kernel's SASS per MMA: the measure for kernels whose short loop was unrolled), num_warps, num_stages,
    spill_stores, spill_loads, mma_count, n_instr, loop_instr, loop_mma, launches, specialisation, used_by.
  configs: one row per (dtype, batch), whole synthesis, µs: lb_us and lb_fwdbwd_us (the Triton path: its
    launches and PyTorch ops), ref_us and ref_fwdbwd_us (the reference path's ops), cudnn_us and
    cudnn_fwdbwd_us (ideal conv roofline); the Triton forward's parts: triton_us (its launches alone;
    mma_us, issue_us, hbm_us), conv_us and conv_over_cudnn, fir_us, torgb_us, torch_us (its PyTorch ops,
    their launch gaps included);
    triton_bwd_us, torch_bwd_us, launch_overhead_us; bytes of PyTorch ops: torch_bytes, torch_bytes_bwd
    (and torch_bytes_bwd_by_op, the 8 largest), ref_bytes, ref_bytes_bwd; exec_over_useful; launches_fwd,
    launches_bwd, torch_ops_fwd, torch_ops_bwd, ref_ops_fwd, ref_ops_bwd, not_modelled.
  launches (with --layers): one row per launch: layer, op, phase, variant, grid and the model's figures.
A new kernel gets its model by an entry in `MODELS` (see there); without one it is still checked.

Exit status 1 when a launched variant fails to compile, spills registers, or needs more shared memory
per block than a target has (each failure printed on one line); 0 otherwise; 2 on a usage error.
Compiled kernels, and what ptxas and cuobjdump said about them, are cached in --cache.
"""
import argparse
import concurrent.futures
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default in Triton 3.9 (silences its warning)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend, get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import cli  # noqa: E402
import kernels  # noqa: E402
import stylemask as sm  # noqa: E402
from stylemask import StyleMaskError  # noqa: E402
from weights import defaults  # noqa: E402

# --- H200 figures of the model (inputs, not measurements) ------------------------------------------------

SMS = 132                 # streaming multiprocessors (H100 / H200 SXM)
CLK = 1.98e9              # boost clock, Hz (67 TF = 132 SMs × 128 FP32 lanes × 2 × 1.98 GHz)
PEAK_TC = 989e12          # dense fp16 / bf16 tensor-core FLOP/s
PEAK_TF32 = 494e12        # dense TF32 tensor-core FLOP/s
PEAK_FFMA = 67e12         # fp32 FLOP/s without tensor cores
HBM = 4.8e12              # bytes/s
L2 = 50 * 2**20           # bytes of L2
REGS_SM, WARPS_SM, CTAS_SM = 65536, 64, 32           # per SM
SMEM_SM, SMEM_CTA_RESERVED = 228 * 1024, 1024        # shared memory per SM, and reserved per CTA
ISSUE_PER_SM = 4 * CLK    # warp-instructions/s per SM: 4 schedulers, 1 warp-instruction per clock each
# Per kernel launch, Triton's or PyTorch's: the GPU-side gap between back-to-back kernels of a stream (launch
# latency plus the tail of a small grid), ~3 µs on Hopper as commonly measured with empty kernels; an
# estimate, not a measurement here. CUDA graphs would remove most of it.
LAUNCH_S = 3e-6

TARGETS = {"sm_80": 80, "sm_90a": 90}
SMEM_LIMIT = {"sm_80": 166912, "sm_90a": 232448}     # opt-in shared memory per block, bytes
MODEL_TARGET = "sm_90a"   # the binaries the H200 model reads
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BATCHES = (1, 16)
ARCH = "ffhq-1024"
OPS = ("layer",)  # the public op synthesis calls, once per layer

# tensor-core instructions in SASS: mma.sync (HMMA/IMMA/DMMA), wgmma (HGMMA/IGMMA/...), tcgen05 (UTC*MMA)
MMA_OPCODE = re.compile(r"^(?:[HIDBQO]MMA|[HIBQ]GMMA|UTC\w*MMA)\b")


# --- 1. Capture every launch ------------------------------------------------------------------------------

@dataclass
class Launch:
    """One recorded @triton.jit launch: what the JIT would have compiled and run, and who asked for it."""
    fn: JITFunction
    grid: tuple               # (g0, g1, g2), callables evaluated as the JIT does
    raw: tuple                # positional arguments as passed
    kwargs: dict              # keyword arguments as passed (constexprs, num_warps, num_stages, ...)
    args: dict                # every kernel argument by name (fn.arg_names), defaults applied
    layer: str = ""           # style_layout name of the layer whose op made the launch
    op: str = ""              # the public op called (modconv, upfirdn2d)
    phase: str = "fwd"        # fwd | bwd
    dtype: str = ""
    batch: int = 0
    variant: str = ""         # name of its Variant

    @property
    def kernel(self):
        return self.fn.__name__

    @property
    def programs(self):
        return math.prod(self.grid)


_BINDERS = {}


def binder(fn):
    """Triton's own argument binder and specialiser for fn, for the CUDA backend (what JITFunction.run calls)."""
    if fn not in _BINDERS:
        _BINDERS[fn] = create_function_from_signature(fn.signature, fn.params, CUDABackend)
    return _BINDERS[fn]


@contextmanager
def recording(log):
    """Within: every @triton.jit launch appends a Launch to log instead of compiling and running."""
    real = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        bound, _, _ = binder(self)(*args, **kwargs)
        grid = grid(bound) if callable(grid) else grid
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        log.append(Launch(self, grid, args, kwargs, dict(bound)))

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = real


class TorchOp:
    """One PyTorch (aten) op that launches GPU work, recorded on the meta run: its HBM bytes (every tensor it
    reads and writes, broadcast dimensions counted once), its FLOPs (convolutions and matrix products) and the
    peak those FLOPs run at, tagged like a launch."""
    __slots__ = ("name", "bytes", "flops", "peak", "layer", "op", "phase", "dtype", "batch")

    def __init__(self, name, bytes_, flops, peak):
        self.name, self.bytes, self.flops, self.peak = name, bytes_, flops, peak
        self.layer, self.op, self.phase, self.dtype, self.batch = "", "", "fwd", "", 0

    @property
    def seconds(self):
        """Its optimistic time on an H200: max(FLOPs at peak, bytes at HBM bandwidth) plus one launch gap."""
        return max(self.flops / self.peak if self.flops else 0.0, self.bytes / HBM) + LAUNCH_S


aten = torch.ops.aten
ALLOCATING = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
              aten.new_empty_strided.default, aten.scalar_tensor.default, aten.lift_fresh.default}  # no traffic
WRITE_ONLY = {aten.copy_.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default}  # self not read


def _touched(t):
    """Bytes of tensor t that a kernel touches: every element once, broadcast (stride-0) dimensions once."""
    return math.prod(n for n, st in zip(t.shape, t.stride()) if st != 0) * t.element_size()


def _is_view(func):
    """True for ops whose outputs alias an input without writing it (views, reshapes, detach): no traffic."""
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


def _dense_peak(dtype):
    """FLOP/s of a dense convolution or matrix product in dtype: tensor cores, TF32 for fp32 unless PyTorch's
    switch turns TF32 off (--exact), then FFMA."""
    if dtype != torch.float32:
        return PEAK_TC
    return PEAK_TF32 if torch.backends.cudnn.allow_tf32 else PEAK_FFMA


def _flops(func, args, out):
    """(FLOPs, peak FLOP/s) of convolutions and matrix products; (0, 0) for everything else."""
    if func in (aten.convolution.default, aten.convolution_backward.default):
        x, w = (args[0], args[1]) if func is aten.convolution.default else (args[1], args[2])
        transposed, groups = (args[6], args[8]) if func is aten.convolution.default else (args[7], args[9])
        side = x if transposed else (out if func is aten.convolution.default else args[0])
        flops = 2 * side.numel() * w.shape[1] * math.prod(w.shape[2:])
        if func is aten.convolution_backward.default:
            flops *= sum(bool(m) for m in args[10][:2])  # input and weight gradients, as asked
        peak = _dense_peak(x.dtype) if groups == 1 else PEAK_FFMA
        return flops, peak
    if func in (aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default):
        a, b = (args[1], args[2]) if func in (aten.addmm.default, aten.baddbmm.default) else (args[0], args[1])
        tf32 = a.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32  # matmuls: their own switch
        return 2 * a.numel() * b.shape[-1], _dense_peak(a.dtype) if tf32 else PEAK_FFMA
    return 0, 0


class counting(torch.utils._python_dispatch.TorchDispatchMode):
    """Within: every aten op that moves memory or computes (not views, not allocations) appends a TorchOp to log."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in ALLOCATING or _is_view(func):
            return out
        flat = lambda tree: [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]  # noqa: E731
        reads = flat([a for i, a in enumerate(args) if not (i == 0 and func in WRITE_ONLY)])
        reads += flat({k: v for k, v in kwargs.items() if k != "out"})
        writes = flat(out)
        bytes_ = sum(_touched(t) for t in reads + writes)
        flops, peak = _flops(func, args, out)
        if bytes_ or flops:
            self.log.append(TorchOp(str(func.overloadpacket.__name__), bytes_, flops, peak))
        return out


@contextmanager
def reference_code_path():
    """Within: the kernels take their reference (plain PyTorch) path on meta tensors: what runs on a GPU with
    STYLEMASK_BACKEND=torch, the path the Triton kernels are measured against."""
    backend = os.environ.get("STYLEMASK_BACKEND")
    os.environ["STYLEMASK_BACKEND"] = "torch"
    try:
        yield
    finally:
        if backend is None:
            os.environ.pop("STYLEMASK_BACKEND")
        else:
            os.environ["STYLEMASK_BACKEND"] = backend


@contextmanager
def gpu_code_path():
    """Within: the kernels take their CUDA code path on meta tensors: `resolve` answers "triton" in every
    module that bound it (the launchers already pick their GPU tiles for meta tensors: kernels.dispatch.on_gpu).
    """
    modules = [m for name, m in sys.modules.items() if name == "kernels" or name.startswith("kernels.")]
    real_resolve = kernels.dispatch.resolve
    saved = []  # (module dict, key, old value)
    for m in modules:
        if getattr(m, "resolve", None) is real_resolve:
            saved.append((vars(m), "resolve", real_resolve))
            m.resolve = lambda x, impl="auto": "triton"
    backend = os.environ.get("STYLEMASK_BACKEND")
    os.environ["STYLEMASK_BACKEND"] = "triton"
    try:
        yield
    finally:
        for where, key, old in reversed(saved):
            where[key] = old
        if backend is None:
            os.environ.pop("STYLEMASK_BACKEND")
        else:
            os.environ["STYLEMASK_BACKEND"] = backend


@contextmanager
def tagging(logs, layout):
    """Within: records (launches, PyTorch ops) appended to any of logs inside an op of `OPS` are tagged with its
    layer; in the backward, with the layer of the op whose output gradient autograd reached last (a hook on each
    op's output). Records outside any op keep the layer "" (the synthesis' own ops, e.g. slicing s)."""
    names = iter([L.name for L in layout])
    state = dict(layer="", op="", phase="fwd", seen=[0] * len(logs))
    real = {op: getattr(kernels, op) for op in OPS}

    def tag_new():
        for i, log in enumerate(logs):
            for r in log[state["seen"][i]:]:
                r.layer, r.op, r.phase = state["layer"], state["op"], state["phase"]
            state["seen"][i] = len(log)

    def wrap(op):
        def call(*args, **kwargs):
            tag_new()
            if op == OPS[0]:
                state["layer"] = next(names, "?")
            state["op"] = op
            out = real[op](*args, **kwargs)
            tag_new()
            if out.requires_grad:
                out.register_hook(backward_of(state["layer"], op))
            return out
        return call

    def backward_of(layer, op):
        def hook(grad):  # autograd reached the op's output: its backward runs next
            tag_new()
            state.update(layer=layer, op=op, phase="bwd")
        return hook

    for op in OPS:
        setattr(kernels, op, wrap(op))
    try:
        yield tag_new
    finally:
        for op, f in real.items():
            setattr(kernels, op, f)


_GENERATOR = {}


def generator():
    """The ffhq-1024 config-f generator with random weights (its values never matter: it goes to meta)."""
    if "G" not in _GENERATOR:
        _GENERATOR["G"] = defaults.random_generator(sm.ARCHS[ARCH], seed=0)
    return _GENERATOR["G"]


def capture(dtype, batch, path="triton"):
    """(Triton launches, PyTorch ops) of synthesis(G, s) and of its backward w.r.t. s, at batch `batch`, on meta
    tensors, on the Triton code path (`gpu_code_path`) or the reference path ("ref": no launch, PyTorch ops only).
    The loss's own ops are not counted: the backward starts from a given ∂L/∂img."""
    G = {k: v.to("meta", DTYPES[dtype]) for k, v in generator().items()}
    layout = sm.style_layout(G)
    s = torch.empty(batch, layout[-1].offset + layout[-1].dim, device="meta", dtype=DTYPES[dtype],
                    requires_grad=True)  # (B, D)
    log, ops = [], []
    code_path = gpu_code_path() if path == "triton" else reference_code_path()
    with code_path, recording(log), tagging([log, ops], layout) as tag_new:
        with counting(ops):
            img = sm.synthesis(G, s)  # (B, 3, 1024, 1024)
        tag_new()
        forward, dimg = len(ops), torch.ones_like(img)  # ∂L/∂img of some loss
        with counting(ops):
            img.backward(dimg)
        tag_new()
    for r in ops[forward:]:  # (the output's own backward runs before any layer's hook says "bwd")
        r.phase = "bwd"
    for r in log + ops:
        r.dtype, r.batch = dtype, batch
    return log, ops


# --- 2. Specialise like the JIT -----------------------------------------------------------------------------

ALLOCATOR_ALIGNMENT = 256  # bytes: every block of the CUDA caching allocator starts 256-B aligned


class _Address:
    """A tensor as Triton's specialiser sees it: its dtype and a device address (base + storage offset)."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._ptr = ALLOCATOR_ALIGNMENT + t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._ptr


def specialise(fn, args, kwargs):
    """Triton's JIT specialisation of one launch: (key, bound args, specialisation, options).

    key is equal for two launches exactly when the JIT would run the same compiled kernel for both.
    """
    addr = lambda a: _Address(a) if isinstance(a, torch.Tensor) else a  # noqa: E731
    kwargs = dict({k: addr(v) for k, v in kwargs.items()}, debug=kwargs.get("debug", fn.debug) or
                  triton.knobs.runtime.debug, instrumentation_mode=triton.knobs.compilation.instrumentation_mode)
    if hasattr(triton.knobs.compilation, "fpsan_homomorphic_casts"):  # as JITFunction.run (Triton 3.9; 3.7 has none)
        kwargs["fpsan_homomorphic_casts"] = triton.knobs.compilation.fpsan_homomorphic_casts
    bound, specialisation, options = binder(fn)(*map(addr, args), **kwargs)
    key = (fn.__module__, fn.__qualname__, repr(specialisation), repr(sorted(options.items())))
    return key, kwargs, bound, specialisation, options


@dataclass
class Variant:
    """One distinct compiled kernel: a JIT specialisation, the launches that use it, its compile results."""
    key: tuple
    fn: JITFunction
    name: str                 # e.g. modconv.3
    dtype: str                # of the synthesis run whose launches use it
    kwargs: dict
    bound: dict
    specialisation: list
    options: dict
    launches: list = field(default_factory=list)
    results: dict = field(default_factory=dict)  # target -> compile result (see `inspect_variant`)

    @property
    def kernel(self):
        return self.fn.__name__

    def describe(self):
        """The constexprs (ints equal to 1 included) and the divisible-by-16 arguments, in one line."""
        cx = [f"{n}={self.bound[n]!r}" for n, (ty, _) in zip(self.fn.arg_names, self.specialisation)
              if ty == "constexpr"]
        d16 = [n for n, (ty, sp) in zip(self.fn.arg_names, self.specialisation) if sp == "D"]
        return " ".join(str(c).replace("True", "1").replace("False", "0") for c in cx) + f" | %16: {','.join(d16)}"


def variants_of(launches):
    """Launches -> {name: Variant}, in order of first use; each launch's `variant` set to its name."""
    by_key, count = {}, Counter()
    for r in launches:
        key, kwargs, bound, specialisation, options = specialise(r.fn, r.raw, r.kwargs)
        if key not in by_key:
            count[r.kernel] += 1
            short = r.kernel.strip("_").removesuffix("_kernel")
            by_key[key] = Variant(key, r.fn, f"{short}.{count[r.kernel]}", r.dtype, kwargs, bound, specialisation,
                                  options)
        by_key[key].launches.append(r)
        r.variant = by_key[key].name
    return {v.name: v for v in by_key.values()}


# --- 3. Compile and inspect ------------------------------------------------------------------------------------

def compile_variant(v, target):
    """triton.compile of variant v for target ('sm_80' | 'sm_90a'), with the options the launch gives."""
    backend = CUDABackend(GPUTarget("cuda", TARGETS[target], 32))
    options, signature, constexprs, attrs = v.fn._pack_args(backend, dict(v.kwargs), v.bound, v.specialisation,
                                                            dict(v.options))
    return triton.compile(ASTSource(v.fn, signature, constexprs, attrs), target=backend.target,
                          options=options.__dict__)


def ptxas_usage(ptx, cc, options):
    """Registers and spill bytes from `ptxas -v`: the binary and flags of Triton's own make_cubin."""
    ptxas = get_ptxas(cc).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        knobs = triton.knobs
        debug = (["-lineinfo", "-suppress-debug-info"] if knobs.compilation.disable_line_info else
                 ["-g"] if knobs.nvidia.disable_ptxas_opt else ["-lineinfo"])
        cmd = [ptxas, *debug, *([] if options.enable_fp_fusion else ["--fmad=false"]), "-v",
               *(["--opt-level", "0"] if knobs.nvidia.disable_ptxas_opt else []), "--regAllocOptLevel=2",
               *(options.ptx_options.split() if options.ptx_options else []),
               f"--gpu-name={sm_arch_from_capability(cc)}", src, "-o", os.path.join(d, "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, log)) else 0  # noqa: E731
    return dict(regs=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"), ptxas=os.path.basename(ptxas))


SASS_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)"
                              r"\s*([^;]*);")
SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):", re.MULTILINE)


def sass_instructions(text):
    """cuobjdump / nvdisasm SASS text -> [(address, opcode with modifiers, branch target or None)]."""
    labels = {}  # label -> address of the instruction that follows it
    pending = []
    for line in text.splitlines():
        if (m := SASS_LABEL.match(line)):
            pending.append(m.group(1))
        elif (m := SASS_INSTRUCTION.search(line)):
            for name in pending:
                labels[name] = int(m.group(1), 16)
            pending = []
    out = []
    for m in SASS_INSTRUCTION.finditer(text):
        addr, opcode, operands = int(m.group(1), 16), m.group(2), m.group(3)
        target = None
        if opcode.split(".")[0] in ("BRA", "JMP", "BRX"):
            if (t := re.search(r"`\((\.L_x_\d+)\)", operands)):
                target = labels.get(t.group(1))
            elif (t := re.match(r"\s*(0x[0-9a-f]+)", operands)):
                target = int(t.group(1), 16)
        out.append((addr, opcode, target))
    return out


def main_loop(instructions):
    """(first, last) address of the largest backward-branch interval (the main loop), or None."""
    loop = None
    for addr, _, target in instructions:
        if target is not None and target < addr and (loop is None or addr - target > loop[1] - loop[0]):
            loop = (target, addr)
    return loop


def sass_facts(text):
    """Tensor-core opcodes, instruction counts, and main-loop instructions per MMA of a kernel's SASS."""
    ins = sass_instructions(text)
    is_mma = lambda op: bool(MMA_OPCODE.match(op))  # noqa: E731
    loop = main_loop(ins)
    body = [op for addr, op, _ in ins if loop and loop[0] <= addr <= loop[1]]
    loop_mma = sum(map(is_mma, body))
    return dict(mma_opcodes=sorted({op for _, op, _ in ins if is_mma(op)}),
                mma_count=sum(is_mma(op) for _, op, _ in ins), n_instr=len(ins), loop_instr=len(body),
                loop_mma=loop_mma, instr_per_mma=round(len(body) / loop_mma, 2) if loop_mma else None,
                kernel_instr_per_mma=round(len(ins) / n_mma, 2) if (n_mma := sum(is_mma(op) for _, op, _ in ins))
                else None)


def disassemble(cubin):
    """cuobjdump -sass of a cubin (the cuobjdump shipped with Triton)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout


def inspect_variant(v, target):
    """Compile v for target and read its binary: a plain dict (error set, or every compile fact)."""
    t0 = time.time()
    try:
        k = compile_variant(v, target)
    except Exception as e:  # the compiler's own message, first line (a failure is a result here)
        lines = f"{type(e).__name__}: {e}".strip().splitlines()
        return dict(error=next((s for s in lines if s.strip()), "")[:300], compile_s=time.time() - t0)
    # ptxas -v and cuobjdump take ~2 s a variant: their facts are kept beside Triton's cache, per binary
    # and per version of the code that reads them
    cached = os.path.join(os.environ["TRITON_CACHE_DIR"], "aot-facts", f"{k.hash}-{target}-{_reader_hash()}.json")
    if os.path.exists(cached):
        with open(cached) as f:
            res = json.load(f)
    else:
        md = k.metadata
        res = dict(smem_bytes=md.shared, num_warps=md.num_warps, num_stages=md.num_stages,
                   **ptxas_usage(k.asm["ptx"], TARGETS[target], md), **sass_facts(disassemble(k.asm["cubin"])))
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        write_json(cached, res)
    return dict(res, error=None, smem_limit=SMEM_LIMIT[target], spill_bytes=res["spill_stores"] + res["spill_loads"],
                compile_s=time.time() - t0)


def _reader_hash():
    """A hash of the functions that read a binary's facts: cached facts go stale when they change."""
    readers = (inspect_variant, ptxas_usage, sass_facts, sass_instructions, main_loop, disassemble)
    text = "".join(inspect.getsource(f) for f in readers) + MMA_OPCODE.pattern + SASS_INSTRUCTION.pattern
    return hashlib.sha1(text.encode()).hexdigest()[:12]


_JOBS = []  # (Variant, target), read by forked workers


def _inspect_job(i):
    return inspect_variant(*_JOBS[i])


def compile_all(variants, targets, workers):
    """Fill v.results[target] for every variant and target, `workers` forked processes at a time."""
    _JOBS[:] = [(v, t) for v in variants.values() for t in targets]
    if workers > 1:
        ctx = multiprocessing.get_context("fork")  # the kernels (JITFunctions) are inherited, not pickled
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            results = list(pool.map(_inspect_job, range(len(_JOBS))))
    else:
        results = [_inspect_job(i) for i in range(len(_JOBS))]
    for (v, t), res in zip(_JOBS, results):
        v.results[t] = res


def failures(variants, targets):
    """One line per compile error, spill, or shared memory over the per-block limit."""
    bad = []
    for v in variants.values():
        for t in targets:
            res = v.results[t]
            if res["error"]:
                bad.append(f"{v.name} {t}: compile error: {res['error']}")
                continue
            if res["spill_bytes"]:
                bad.append(f"{v.name} {t}: spills ({res['spill_stores']} B stored, {res['spill_loads']} B loaded)")
            if res["smem_bytes"] > res["smem_limit"]:
                bad.append(f"{v.name} {t}: shared memory {res['smem_bytes']} B > {res['smem_limit']} B per block")
    return bad


# --- 4. H200 model --------------------------------------------------------------------------------------------

ELEMENT = {"fp32": 4, "fp16": 2, "bf16": 2}


def conv_bounds(B, Cin, Cout, H, W, k, up, demod, dtype):
    """The ideal cuDNN roofline of the same convolution, in seconds, and its FLOPs: max(FLOPs at the
    tensor-core peak, x + y + weight once through HBM); fp32 at TF32, PyTorch's default for convolutions (FFMA
    with --exact).
    (The reference path is not modelled here: its own ops are counted, `counting`.)"""
    e = ELEMENT[dtype]
    flops = 2 * B * Cout * Cin * k * k * H * W
    x, w = B * Cin * H * W * e, Cout * Cin * k * k * e
    y = B * Cout * (H * up + (k - 1 if up == 2 else 0)) * (W * up + (k - 1 if up == 2 else 0)) * e
    peak = _dense_peak(DTYPES[dtype])
    return dict(cudnn_s=max(flops / peak, (x + y + w) / HBM), flops=flops)


def _model_modconv(r):
    """_modconv_kernel: implicit GEMM over (tap, channel block); a program runs BLOCK_M × BLOCK_N × BLOCK_K MACs
    per iteration, K²·KB iterations; for the up-sampling conv one launch runs all 4 phases (4, 2, 2 and 1
    taps: 2.25·KB iterations per program on average; programs past an odd phase's shorter grid return)."""
    a = r.args
    x = a["x_ptr"]
    B, K, UP, KB = x.shape[0], a["K"], a["UP"], a["KB"]
    BM, BN, BK = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"]
    QH, QW, H_in, W_in = a["QH"], a["QW"], a["H"], a["W"]
    tiles_n = math.ceil(a["COUT"] / BN)
    if UP == 2:  # Σ over phases (py, px) of programs × taps
        work = sum(B * math.ceil((QH - py) * (QW - px) / BM) * tiles_n * (2 - py) * (2 - px) * KB
                   for py in (0, 1) for px in (0, 1))
        iters = work / r.programs
        out_pixels = (2 * H_in + 1) * (2 * W_in + 1)
    else:
        iters = K * K * KB
        out_pixels = QH * QW
    e = ELEMENT[r.dtype]
    useful = 2 * B * a["COUT"] * a["CIN"] * K * K * (H_in * W_in if UP == 2 else QH * QW)
    bytes_ = (B * a["CIN"] * H_in * W_in + B * a["COUT"] * out_pixels + K * K * a["CIN"] * a["COUT"]) * e
    what = "4 phases" if UP == 2 else f"stride {a['STRIDE']}" if a["STRIDE"] > 1 else ""
    return dict(iters=iters, exec_flops=2 * BM * BN * BK * iters, useful_flops=useful, bytes=bytes_, is_conv=True,
                conv=conv_bounds(B, a["CIN"], a["COUT"], H_in, W_in, K, UP, bool(a["SCALE"]), r.dtype),
                shape=f"{a['CIN']}→{a['COUT']} {K}×{K} {H_in}×{W_in}→{2 * H_in + 1 if UP == 2 else QH}×"
                      f"{2 * W_in + 1 if UP == 2 else QW} {what}".rstrip())


def _model_fir_act(r):
    """_fir_act_kernel: the up-sampling conv's KF×KF FIR with the layer's epilogue; straight-line code, FFMAs
    (their cost is in the SASS issue time); reads the FIR input and writes the output once."""
    a = r.args
    P = a["p_ptr"]
    e = ELEMENT[r.dtype]
    B, C, PH, PW = P.shape
    out = B * C * a["OH"] * a["OW"]
    return dict(iters=0, exec_flops=0, useful_flops=2 * out * a["KF"] ** 2, bytes=(B * C * PH * PW + out) * e,
                is_conv=False, shape=f"FIR {C} ch {PH}×{PW}→{a['OH']}×{a['OW']}")


def _model_torgb(r):
    """_torgb_kernel: 1×1 modconv to 3 colours as fp32 FMAs (no MMA, no padding) + the fused skip up-FIR."""
    a = r.args
    x = a["x_ptr"]
    B, CIN, H, W = x.shape
    e = ELEMENT[r.dtype]
    flops = 2 * B * 3 * CIN * H * W
    per_program = 2 * a["BLOCK_P"] * 3 * math.ceil(CIN / a["BLOCK_K"]) * a["BLOCK_K"]
    return dict(iters=math.ceil(CIN / a["BLOCK_K"]), exec_flops=per_program, useful_flops=flops,
                bytes=(B * CIN * H * W + B * 3 * H * W * (2 if a["SKIP"] else 1)) * e, is_conv=True,
                conv=conv_bounds(B, CIN, 3, H, W, 1, 1, False, r.dtype), shape=f"ToRGB {CIN}→3 {H}²")


def _model_upfirdn2d(r):
    """_upfirdn2d_kernel: straight-line code per output tile, no MMA; reads the input and writes the output once."""
    a = r.args
    e = ELEMENT[r.dtype]
    return dict(iters=0, exec_flops=0, useful_flops=2 * a["N"] * a["OH"] * a["OW"] * a["KH"] * a["KW"],
                bytes=(a["N"] * a["H"] * a["W"] + a["N"] * a["OH"] * a["OW"]) * e, is_conv=False,
                shape=f"{a['N']} planes {a['H']}²→{a['OH']}² up{a['UP']} down{a['DOWN']}")


def _model_act_grad(r):
    """_act_grad_kernel: pointwise on the layer's output: reads dy and y (and the noise plane), writes g and a
    (B, NP, C) fp32 partial sum; straight-line code, no MMA."""
    a = r.args
    B, C, H, W = a["y_ptr"].shape
    e = ELEMENT[r.dtype]
    return dict(iters=0, exec_flops=0, useful_flops=6 * B * C * H * W,
                bytes=3 * B * C * H * W * e + (a["n_ptr"].numel() * e if a["NOISE"] else 0) + B * a["NP"] * C * 4,
                is_conv=False, shape=f"act grad {C} ch {H}²")


def _model_style_grad(r):
    """_style_grad_kernel: pointwise on the layer's input: reads x and G (ToRGB: the 3-colour dy), writes dx and a
    (B, NP, C) fp32 partial sum; straight-line code, no MMA."""
    a = r.args
    B, C, H, W = a["x_ptr"].shape
    e = ELEMENT[r.dtype]
    g = 3 * B * H * W if a["RGB"] else B * C * H * W
    return dict(iters=0, exec_flops=0, useful_flops=(8 if a["RGB"] else 3) * B * C * H * W,
                bytes=(2 * B * C * H * W + g) * e + B * a["NP"] * C * 4, is_conv=False,
                shape=f"style grad {C} ch {H}²" + (" (ToRGB)" if a["RGB"] else ""))


# kernel name -> model(launch) -> dict with
#   iters        trip count of the main loop per program (0: straight-line code)
#   exec_flops   tensor-core (or FFMA-dot) FLOPs one program executes, padding included
#   useful_flops the launch's own multiply-adds ×2 (for a conv: the convolution's)
#   bytes        bytes moved through HBM by the whole launch
#   is_conv      whether the launch computes a convolution; then also
#   conv         conv_bounds(B, Cin, Cout, H, W, k, up, demod, dtype) of that convolution
#   shape        a short human-readable shape
MODELS = {
    "_modconv_kernel": _model_modconv,
    "_fir_act_kernel": _model_fir_act,
    "_torgb_kernel": _model_torgb,
    "_upfirdn2d_kernel": _model_upfirdn2d,
    "_act_grad_kernel": _model_act_grad,
    "_style_grad_kernel": _model_style_grad,
}


def ctas_per_sm(res):
    """Co-resident programs per SM, from registers (allocated per warp in units of 256) and shared memory."""
    regs = math.ceil(max(res["regs"], 1) / 8) * 8 * 32 * res["num_warps"]
    smem = SMEM_SM // (res["smem_bytes"] + SMEM_CTA_RESERVED)
    return max(0, min(REGS_SM // regs, smem, CTAS_SM, WARPS_SM // res["num_warps"]))


def wave_time(programs, per_program, ctas):
    """The busiest SM's time: full waves of `ctas` co-resident programs sharing it, then the tail."""
    full, rest = divmod(programs, SMS * ctas)
    return full * ctas * per_program + math.ceil(rest / SMS) * per_program


def dot_peak(res):
    """FLOP/s of the kernel's dot products on an H200, read off its SASS: fp16/bf16 or TF32 MMA, else FFMA."""
    if not res["mma_opcodes"]:
        return PEAK_FFMA
    return PEAK_TF32 if any("TF32" in op for op in res["mma_opcodes"]) else PEAK_TC


def model_launch(r, variants):
    """The H200 lower bound of one launch (dict of seconds and counts), or None when it cannot be modelled."""
    res = variants[r.variant].results.get(MODEL_TARGET)
    if r.kernel not in MODELS or not res or res["error"]:
        return None
    m = MODELS[r.kernel](r)
    ctas = ctas_per_sm(res)
    if ctas == 0:
        return None
    P = r.programs
    instr = res["num_warps"] * (res["n_instr"] + max(m["iters"] - 1, 0) * res["loop_instr"])
    t_mma = wave_time(P, m["exec_flops"] / (dot_peak(res) / SMS), ctas)
    t_issue = wave_time(P, instr / ISSUE_PER_SM, ctas)
    t_hbm = m["bytes"] / HBM
    lb, bound = max((t_mma, "mma"), (t_issue, "issue"), (t_hbm, "hbm"))
    return dict(m, programs=P, ctas=ctas, waves=math.ceil(P / (SMS * ctas)), instr_per_program=instr,
                t_mma=t_mma, t_issue=t_issue, t_hbm=t_hbm, lb=lb, bound=bound)


def bytes_by_op(ops, n=8):
    """{aten op name: HBM bytes} of the n ops that move the most, summed over their calls."""
    total = Counter()
    for o in ops:
        total[o.name] += o.bytes
    return dict(total.most_common(n))


def summarise(launches, models, ops, ref_ops, dtype, batch):
    """Whole-synthesis figures for one (dtype, batch), microseconds: optimistic bounds of every op of a path.

    Triton path (`lb_*`): each Triton launch's bound (`model_launch`) plus each PyTorch op it runs between them
    (`TorchOp.seconds`), every launch plus `LAUNCH_S`. Reference path (`ref_*`): its own PyTorch ops, counted the
    same way. Forward, and forward + backward (the gradient w.r.t. s that training needs). cuDNN: the ideal
    roofline of the forward's convolutions (2× for forward + backward: the input gradient's convolution has
    the forward's FLOPs and bytes). The conv, FIR, ToRGB and PyTorch-op parts of the Triton forward beside.
    """
    rows = [(r, m) for r, m in zip(launches, models) if r.dtype == dtype and r.batch == batch]
    fwd, bwd = [(r, m) for r, m in rows if r.phase == "fwd"], [(r, m) for r, m in rows if r.phase == "bwd"]
    mine = [o for o in ops if o.dtype == dtype and o.batch == batch]
    ref = [o for o in ref_ops if o.dtype == dtype and o.batch == batch]
    t_fwd, t_bwd = [o for o in mine if o.phase == "fwd"], [o for o in mine if o.phase == "bwd"]
    r_fwd, r_bwd = [o for o in ref if o.phase == "fwd"], [o for o in ref if o.phase == "bwd"]
    convs = [m for _, m in fwd if m and m["is_conv"]]
    us = lambda seq: sum(seq) * 1e6  # noqa: E731
    launched = lambda part: us((m["lb"] if m else 0.0) + LAUNCH_S for _, m in part)  # noqa: E731
    kernel_us = lambda part, names: us(m["lb"] for r, m in part if m and r.kernel in names)  # noqa: E731
    useful = sum(m["useful_flops"] for m in convs)
    triton_fwd = us(m["lb"] for _, m in fwd if m)
    lb_fwd = launched(fwd) + us(o.seconds for o in t_fwd)
    lb_bwd = launched(bwd) + us(o.seconds for o in t_bwd)
    ref_fwd, ref_bwd = us(o.seconds for o in r_fwd), us(o.seconds for o in r_bwd)
    cudnn = us(m["conv"]["cudnn_s"] for m in convs)
    conv_us = kernel_us(fwd, ("_modconv_kernel", "_torgb_kernel"))
    return dict(dtype=dtype, batch=batch, launches_fwd=len(fwd), launches_bwd=len(bwd),
                torch_ops_fwd=len(t_fwd), torch_ops_bwd=len(t_bwd), ref_ops_fwd=len(r_fwd), ref_ops_bwd=len(r_bwd),
                lb_us=lb_fwd, lb_fwdbwd_us=lb_fwd + lb_bwd, ref_us=ref_fwd, ref_fwdbwd_us=ref_fwd + ref_bwd,
                cudnn_us=cudnn, cudnn_fwdbwd_us=2 * cudnn,
                triton_us=triton_fwd, triton_bwd_us=us(m["lb"] for _, m in bwd if m),
                conv_us=conv_us, conv_over_cudnn=conv_us / cudnn if cudnn else None,
                fir_us=kernel_us(fwd, ("_fir_act_kernel", "_upfirdn2d_kernel")),
                torgb_us=kernel_us(fwd, ("_torgb_kernel",)),
                torch_us=us(o.seconds for o in t_fwd), torch_bwd_us=us(o.seconds for o in t_bwd),
                launch_overhead_us=us([LAUNCH_S] * (len(fwd) + len(bwd) + len(mine))),
                torch_bytes=sum(o.bytes for o in t_fwd), torch_bytes_bwd=sum(o.bytes for o in t_bwd),
                ref_bytes=sum(o.bytes for o in r_fwd), ref_bytes_bwd=sum(o.bytes for o in r_bwd),
                torch_bytes_bwd_by_op=bytes_by_op(t_bwd),
                exec_over_useful=sum(m["exec_flops"] * m["programs"] for m in convs) / useful if useful else None,
                mma_us=us(m["t_mma"] for _, m in fwd if m), issue_us=us(m["t_issue"] for _, m in fwd if m),
                hbm_us=us(m["t_hbm"] for _, m in fwd if m),
                useful_tflops_at_lb=useful / triton_fwd / 1e6 if triton_fwd else None,
                not_modelled=sorted({r.kernel for r, m in rows if m is None}))


# --- 5. Report ---------------------------------------------------------------------------------------------

def print_variants(variants, targets):
    """The variant table: one row per compiled variant, one column group per target."""
    head = " | ".join(f"{t:<6} {'regs':>4} {'spill':>5} {'smem':>6} {'w/s':>3} {'MMA':<22} {'i/mma':>5}"
                      for t in targets)
    print(f"\n{'variant':<12} {'dtype':<5} {'n':>3}  {head}  specialisation")
    for v in variants.values():
        cells = []
        for t in targets:
            res = v.results[t]
            if res["error"]:
                cells.append(f"{t:<6} COMPILE ERROR: {res['error'][:60]}")
                continue
            mma = (",".join(sorted({op.split('.')[0] for op in res["mma_opcodes"]})) + f" x{res['mma_count']}"
                   if res["mma_opcodes"] else "-")
            smem = f"{res['smem_bytes']}" + ("!" if res["smem_bytes"] > res["smem_limit"] else "")
            ipm = f"{res['instr_per_mma']:.1f}" if res["instr_per_mma"] else "-"
            cells.append(f"{t:<6} {res['regs']:>4} {res['spill_bytes']:>5} {smem:>6} "
                         f"{res['num_warps']}/{res['num_stages']} {mma:<22} {ipm:>5}")
        print(f"{v.name:<12} {v.dtype:<5} {len(v.launches):>3}  {' | '.join(cells)}  {v.describe()}")
    print("(n: launches; spill: ptxas -v spill bytes (stores + loads); smem: bytes per block, '!' over the limit "
          f"({', '.join(f'{t} {SMEM_LIMIT[t]}' for t in targets)}); w/s: num_warps/num_stages; MMA: tensor-core "
          "opcodes × static count; i/mma: SASS instructions per MMA instruction in the main loop)")


def print_layers(launches, models):
    """The per-launch table: each launch's layer, variant, shape, occupancy and model figures."""
    f = lambda t: f"{t * 1e6:.1f}"  # noqa: E731
    key = None
    for r, m in zip(launches, models):
        if (r.dtype, r.batch) != key:
            key = (r.dtype, r.batch)
            print(f"\n{r.dtype}, batch {r.batch} (H200 model, µs)")
            print(f"{'ph':<3} {'layer':<11} {'op':<9} {'variant':<12} {'shape':<30} {'progs':>6} {'cta':>3} "
                  f"{'waves':>5} {'t_mma':>8} {'t_issue':>8} {'t_hbm':>7} {'LB':>8} {'bound':<5} {'cuDNN':>7}")
        if m is None:
            print(f"{r.phase:<3} {r.layer:<11} {r.op:<9} {r.variant:<12} not modelled")
            continue
        conv = m.get("conv")
        print(f"{r.phase:<3} {r.layer:<11} {r.op:<9} {r.variant:<12} {m['shape']:<30} {m['programs']:>6} "
              f"{m['ctas']:>3} {m['waves']:>5} {f(m['t_mma']):>8} {f(m['t_issue']):>8} {f(m['t_hbm']):>7} "
              f"{f(m['lb']):>8} {m['bound']:<5} {f(conv['cudnn_s']) if conv else '-':>7}")


def print_summary(configs):
    """The per-(dtype, batch) table of whole-synthesis figures."""
    print("\nH200 model, whole synthesis, optimistic bounds (µs; every op of each path, launch gaps included)")
    print(f"{'dtype':<5} {'B':>3} {'ops':>10} {'Triton':>8} {'ref':>8} {'T/ref':>5} {'conv':>7} {'/cuDNN':>6} "
          f"{'FIR':>6} {'ToRGB':>6} {'torch':>6} | {'Triton':>8} {'ref':>8} {'T/ref':>5} {'torch GB':>8}")
    for c in configs:
        ops = f"{c['launches_fwd'] + c['torch_ops_fwd']}+{c['launches_bwd'] + c['torch_ops_bwd']}"
        print(f"{c['dtype']:<5} {c['batch']:>3} {ops:>10} {c['lb_us']:>8.0f} {c['ref_us']:>8.0f} "
              f"{c['lb_us'] / c['ref_us']:>5.2f} {c['conv_us']:>7.0f} {c['conv_over_cudnn'] or math.nan:>6.2f} "
              f"{c['fir_us']:>6.0f} {c['torgb_us']:>6.0f} {c['torch_us']:>6.0f} | {c['lb_fwdbwd_us']:>8.0f} "
              f"{c['ref_fwdbwd_us']:>8.0f} {c['lb_fwdbwd_us'] / c['ref_fwdbwd_us']:>5.2f} "
              f"{c['torch_bytes_bwd'] / 1e9:>8.1f}")
        if c["not_modelled"]:
            print(f"      not modelled (no MODELS entry, or no {MODEL_TARGET} binary): {', '.join(c['not_modelled'])}")
    print(f"(Estimates from the compiled code; the compile facts above are not. Left: forward; right: forward + "
          f"backward w.r.t. s. Triton: the Triton path, each launch max(MMA time of the executed tiles (FFMA where "
          f"the SASS has no MMA), SASS issue at 1 warp-instruction/clock/scheduler, HBM bytes / 4.8 TB/s) with CTAs/SM "
          f"from regs + smem, wave-quantised, plus every PyTorch op it runs at max(FLOPs at peak, bytes / 4.8 TB/s); "
          f"ref: the reference path's own PyTorch ops, the same way; both plus {LAUNCH_S * 1e6:.0f} µs per launch "
          f"(an estimate). conv: the Triton conv and ToRGB launches; /cuDNN: over the ideal roofline of the same "
          f"convs (fp32 at TF32). FIR, ToRGB, torch: the forward's FIR launches, ToRGB launches and PyTorch ops. "
          f"torch GB: the backward's PyTorch-op bytes. Bounds assume peak rates: no real time is predicted.)")


def variant_rows(variants, targets):
    """The JSON rows: one per (variant, target)."""
    rows = []
    for v in variants.values():
        is_conv = any(MODELS[v.kernel](r)["is_conv"] for r in v.launches[:1]) if v.kernel in MODELS else False
        for t in targets:
            res = v.results[t]
            rows.append(dict(name=v.name, kernel=v.kernel, is_conv=is_conv, target=t, dtype=v.dtype,
                             regs=res.get("regs"), spill_bytes=res.get("spill_bytes"), smem_bytes=res.get("smem_bytes"),
                             smem_limit=SMEM_LIMIT[t], mma_opcodes=res.get("mma_opcodes", []),
                             instr_per_mma=res.get("instr_per_mma"),
                             kernel_instr_per_mma=res.get("kernel_instr_per_mma"), error=res["error"],
                             num_warps=res.get("num_warps"), num_stages=res.get("num_stages"),
                             spill_stores=res.get("spill_stores"), spill_loads=res.get("spill_loads"),
                             mma_count=res.get("mma_count"), n_instr=res.get("n_instr"),
                             loop_instr=res.get("loop_instr"), loop_mma=res.get("loop_mma"),
                             launches=len(v.launches), specialisation=v.describe(),
                             used_by=sorted({f"{r.dtype}/B{r.batch}/{r.phase}/{r.layer}" for r in v.launches})))
    return rows


def launch_rows(launches, models):
    """The JSON rows of --layers: one per launch."""
    rows = []
    for r, m in zip(launches, models):
        row = dict(dtype=r.dtype, batch=r.batch, phase=r.phase, layer=r.layer, op=r.op, kernel=r.kernel,
                   variant=r.variant, grid=list(r.grid), modelled=m is not None)
        if m:
            row.update({k: v for k, v in m.items() if k != "conv"}, **({"conv": m["conv"]} if "conv" in m else {}))
        rows.append(row)
    return rows


def write_json(path, obj):
    """obj as JSON at path, atomically."""
    cli.write_text(path, json.dumps(obj, indent=1))


def main(argv=None):
    """Capture, specialise, compile, inspect, model, report; the exit status says whether every variant is fit."""
    p = argparse.ArgumentParser(prog="python -m bench.aot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fp16, batch 16, sm_90a only (under a minute)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="compile processes in parallel (default: os.cpu_count())")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "stylemask-aot"),
                   help="folder for Triton's compile cache (TRITON_CACHE_DIR = CACHE/triton; default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help='write {"variants": [...], "configs": [...]} (and "launches" with '
                   "--layers) to PATH: one variant row per compiled variant and target, one config row per "
                   "(dtype, batch)")
    p.add_argument("--layers", action="store_true", help="print the per-launch table (layer, shape, model figures)")
    p.add_argument("--exact", action="store_true",
                   help="fp32 with TF32 off (torch.backends.cudnn.allow_tf32 = False): the exact IEEE path "
                        "(FFMA dot products) instead of PyTorch's default TF32")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise StyleMaskError("bench.aot compiles real kernels: unset TRITON_INTERPRET (the interpreter replaces "
                             "@triton.jit and compiles nothing)")
    if a.workers < 1:
        raise StyleMaskError(f"--workers must be at least 1, got {a.workers}")
    if a.json and not os.path.isdir(os.path.dirname(os.path.abspath(a.json))):
        raise StyleMaskError(f"--json {a.json}: no such folder")
    os.makedirs(a.cache, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = os.path.join(a.cache, "triton")
    dtypes, batches = (["fp16"], [16]) if a.quick else (list(DTYPES), list(BATCHES))
    if a.exact:  # the launchers read PyTorch's TF32 switch for fp32 convolutions
        torch.backends.cudnn.allow_tf32 = False
        dtypes = ["fp32"]
    targets = ["sm_90a"] if a.quick else list(TARGETS)
    t0 = time.time()

    launches, ops, ref_ops = [], [], []
    for dt in dtypes:
        for B in batches:
            log, torch_ops = capture(dt, B)
            launches += log
            ops += torch_ops
            ref_ops += capture(dt, B, path="ref")[1]
    variants = variants_of(launches)
    per = Counter((r.dtype, r.batch, r.phase) for r in launches)
    print(f"triton {triton.__version__}; {ARCH} synthesis on meta tensors: {len(launches)} launches ("
          + ", ".join(f"{d} B{b}: {per[d, b, 'fwd']} fwd + {per[d, b, 'bwd']} bwd" for d in dtypes for b in batches)
          + f") -> {len(variants)} distinct variants × {len(targets)} targets")
    compile_all(variants, targets, a.workers)
    t_compile = time.time() - t0

    print_variants(variants, targets)
    models = [model_launch(r, variants) for r in launches]
    if a.layers:
        print_layers(launches, models)
    configs = [summarise(launches, models, ops, ref_ops, dt, B) for dt in dtypes for B in batches]
    print_summary(configs)
    bad = failures(variants, targets)
    if a.json:
        out = dict(triton=triton.__version__, arch=ARCH, targets=targets, variants=variant_rows(variants, targets),
                   configs=configs, failures=bad)
        if a.layers:
            out["launches"] = launch_rows(launches, models)
        write_json(a.json, out)
        print(f"\nwrote {a.json}")
    print(f"\n{time.time() - t0:.0f} s ({t_compile:.0f} s capture + compile, {a.workers} workers)")
    for line in bad:
        print(f"FAIL {line}")
    if bad:
        return 1
    print("OK: every launched variant compiles for every target, fits shared memory and does not spill")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_script(main))
