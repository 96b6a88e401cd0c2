"""bench/aot.py, the static GPU check: its SASS parser, its JIT specialisation, and a real --quick run.

The quick run compiles the fp16 batch-16 synthesis for sm_90a in a subprocess (this session runs the
Triton interpreter, under which @triton.jit compiles nothing), on the CPU, with no GPU, and holds the
kernels to the issue's gates there: no compile error, no spill, shared memory within the limit, tensor
cores for every 3×3 conv, executed ÷ useful ≤ 1.15, and the whole synthesis within 2× of cuDNN's roofline
and below the reference path's bound.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from bench import aot
from stylemask import StyleMaskError

ROOT = Path(__file__).resolve().parents[1]  # the repository root

# A K-loop as cuobjdump prints it: a forward branch over the loop, two wgmma in the body, the backward
# branch closing it (hex target), an inner backward branch to a label (nvdisasm style), and the trap loop
# every kernel ends with (a branch to itself, not a loop).
SASS = """
        code for sm_90a
                Function : _k
        /*0000*/                   LDC R1, c[0x0][0x28] ;                        /* 0x00000a00ff017b82 */
        /*0010*/              @!P1 BRA 0x100 ;                                   /* 0x0000002800f49947 */
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;              /* 0x0000000402047981 */
.L_x_1:
        /*0030*/                   IMAD R5, R5, 0x2, RZ ;                        /* 0x0000000205057824 */
        /*0040*/              @P0 BRA `(.L_x_1) ;                                /* 0xfffffffc00a80947 */
        /*0050*/                   HGMMA.64x32x16.F32 R24, gdesc[UR8], R24 ;     /* 0x00600000081879f0 */
        /*0060*/                   HGMMA.64x32x16.F32 R24, gdesc[UR8], R24, gsb0 ; /* 0x00600000081879f0 */
        /*0070*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;               /* 0x00000000000079af */
        /*0080*/              @P6 BRA 0x20 ;                                     /* 0xfffffff000b06947 */
        /*0090*/                   STG.E.U16 desc[UR4][R2.64], R4 ;              /* 0x0000000402007986 */
        /*00a0*/                   EXIT ;                                        /* 0x000000000000794d */
        /*00b0*/                   BRA 0xb0;                                     /* 0xfffffffc00fc7947 */
"""


def test_sass_main_loop_is_the_largest_backward_branch():
    ins = aot.sass_instructions(SASS)
    assert len(ins) == 12
    assert (0x40, "BRA", 0x30) in ins  # a label resolves to the address of the instruction after it
    assert aot.main_loop(ins) == (0x20, 0x80)  # not the inner 0x30-0x40 loop, not the 0xb0 trap
    facts = aot.sass_facts(SASS)
    assert facts["mma_opcodes"] == ["HGMMA.64x32x16.F32"]
    assert facts["loop_instr"] == 7 and facts["loop_mma"] == 2 and facts["instr_per_mma"] == 3.5


def test_sass_without_loop_or_mma_has_no_instr_per_mma():
    straight = "\n".join(line for line in SASS.splitlines() if "BRA 0x20" not in line and "BRA `" not in line)
    assert aot.main_loop(aot.sass_instructions(straight)) is None  # the trap loop 0xb0 -> 0xb0 is not a loop
    assert aot.sass_facts(straight)["instr_per_mma"] is None
    no_mma = SASS.replace("HGMMA.64x32x16.F32", "FFMA")
    assert aot.sass_facts(no_mma)["mma_opcodes"] == [] and aot.sass_facts(no_mma)["instr_per_mma"] is None


def _tiny(x_ptr, n, one, m, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + i * one, tl.load(x_ptr + i, mask=i < n) * m, mask=i < n)


# A real JITFunction whatever TRITON_INTERPRET says (triton.jit would return the interpreter's stand-in).
TINY = JITFunction(_tiny)


def _spec(*args, **kwargs):
    """{argument name: (type, specialisation)} of a launch of TINY, as the JIT would specialise it."""
    _, _, _, specialisation, options = aot.specialise(TINY, args, kwargs)
    return dict(zip(TINY.arg_names, specialisation)), options


def test_specialisation_is_the_jits():
    x = torch.empty(64, device="meta")  # fp32
    spec, _ = _spec(x, 32, 1, 17, BLOCK=16)
    assert spec["x_ptr"] == ("*fp32", "D")    # 256-B aligned allocation: divisible by 16
    assert spec["n"] == ("i32", "D")          # 32: tt.divisibility=16
    assert spec["one"] == ("constexpr", 1)    # an int equal to 1 is a constexpr
    assert spec["m"] == ("i32", "")           # 17: a plain runtime int
    assert spec["BLOCK"] == ("constexpr", 16)
    assert _spec(x[1:], 32, 1, 17, BLOCK=16)[0]["x_ptr"] == ("*fp32", "")   # 256 + 4 bytes
    assert _spec(x[4:], 32, 1, 17, BLOCK=16)[0]["x_ptr"] == ("*fp32", "D")  # 256 + 16 bytes
    assert _spec(x.half(), 2**33, 1, 17, BLOCK=16)[0]["n"] == ("i64", "D")


def test_variants_dedupe_like_the_jit_cache_and_keep_launch_options():
    x = torch.empty(64, device="meta")

    def launch(*args, **kwargs):
        return aot.Launch(TINY, (1, 1, 1), args, kwargs, {})

    launches = [launch(x, 32, 1, 17, BLOCK=16), launch(x, 48, 1, 19, BLOCK=16),  # same compiled kernel
                launch(x, 33, 1, 17, BLOCK=16),                                  # n no longer % 16
                launch(x, 32, 1, 17, BLOCK=16, num_warps=8)]                     # a compile option
    variants = aot.variants_of(launches)
    assert [len(v.launches) for v in variants.values()] == [2, 1, 1]
    assert [r.variant for r in launches] == ["tiny.1", "tiny.1", "tiny.2", "tiny.3"]
    assert variants["tiny.3"].options["num_warps"] == 8 and "num_warps" not in variants["tiny.1"].options


def test_refuses_the_interpreter(monkeypatch, capsys):
    import cli
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(StyleMaskError, match="TRITON_INTERPRET"):
        aot.main(["--quick"])
    assert cli.run_script(aot.main, ["--quick"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


VARIANT_KEYS = {"name", "kernel", "is_conv", "target", "dtype", "regs", "spill_bytes", "smem_bytes", "smem_limit",
                "mma_opcodes", "instr_per_mma", "error"}
CONFIG_KEYS = {"dtype", "batch", "lb_us", "cudnn_us", "ref_us", "exec_over_useful", "lb_fwdbwd_us",
               "cudnn_fwdbwd_us", "ref_fwdbwd_us", "torch_bytes", "torch_bytes_bwd"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """(exit status, stdout, JSON) of `python -m bench.aot --quick --layers --json`, compiled for real."""
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "bench.aot", "--quick", "--layers", "--json", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode in (0, 1), r.stderr[-3000:]
    return r.returncode, r.stdout, json.loads(out.read_text())


def test_quick_run_compiles_every_launch(quick):
    rc, stdout, res = quick
    variants, configs, launches = res["variants"], res["configs"], res["launches"]
    assert variants and all(VARIANT_KEYS <= set(v) for v in variants)
    assert {v["target"] for v in variants} == {"sm_90a"} and {v["dtype"] for v in variants} == {"fp16"}
    # every captured launch maps to a compiled variant, and every variant is used
    names = {v["name"] for v in variants}
    assert {r["variant"] for r in launches} == names
    (c,) = configs
    # forward: 17 conv layers (the 8 up-sampling ones as one launch of their 4 phases + 1 FIR) + 9 ToRGB = 34;
    # backward: 17 convs × (activation gradient, input-gradient conv, style gradient) + 8 FIR adjoints, and 9 ToRGB
    # style gradients + 8 skip adjoints = 76
    assert (c["launches_fwd"], c["launches_bwd"]) == (34, 76)
    assert sum(v["launches"] for v in variants) == len(launches) == c["launches_fwd"] + c["launches_bwd"]
    assert {r["kernel"] for r in launches} == {"_modconv_kernel", "_fir_act_kernel", "_torgb_kernel",
                                              "_upfirdn2d_kernel", "_act_grad_kernel", "_style_grad_kernel"}
    assert {r["phase"] for r in launches} == {"fwd", "bwd"} and all(r["layer"] for r in launches)
    for v in variants:
        assert v["error"] is None, v
        assert 0 < v["regs"] <= 255 and v["smem_limit"] == 232448 and v["smem_bytes"] >= 0
        assert v["instr_per_mma"] is None or v["instr_per_mma"] >= 1
        if v["kernel"] == "_modconv_kernel":  # convolutions run on tensor cores (wgmma or mma.sync)
            assert v["mma_opcodes"] and (v["instr_per_mma"] or v["kernel_instr_per_mma"]), v
    assert any(op.startswith("HGMMA") for v in variants for op in v["mma_opcodes"])
    # the exit status is exactly "some variant failed"
    failing = [v for v in variants if v["error"] or v["spill_bytes"] or v["smem_bytes"] > v["smem_limit"]]
    assert rc == (1 if failing else 0)
    assert stdout.count("\nFAIL ") == sum(bool(v["spill_bytes"]) + (v["smem_bytes"] > v["smem_limit"])
                                          for v in variants)
    assert failing == [] and rc == 0  # the gate: no spill, shared memory within the limit


def test_quick_run_model(quick):
    _, stdout, res = quick
    (c,) = res["configs"]
    assert CONFIG_KEYS <= set(c) and (c["dtype"], c["batch"]) == ("fp16", 16)
    # the conv launches within 2× of cuDNN's roofline (the kernels before the redesign: 13×)
    assert 1000 < c["cudnn_us"] < 10000 and c["cudnn_us"] < c["conv_us"] <= 2 * c["cudnn_us"]
    assert 1 <= c["exec_over_useful"] <= 1.15  # padded tiles only: the up-sampling convs run no zero taps
    # every op of each path is counted: the Triton forward = its launches and their gaps + its PyTorch ops (gaps
    # included), and the gaps of all of them are the overhead
    assert c["lb_us"] == pytest.approx(c["triton_us"] + c["launches_fwd"] * aot.LAUNCH_S * 1e6 + c["torch_us"])
    assert c["launch_overhead_us"] == pytest.approx(aot.LAUNCH_S * 1e6 * (
        c["launches_fwd"] + c["launches_bwd"] + c["torch_ops_fwd"] + c["torch_ops_bwd"]))
    assert c["torch_bytes"] > 0 and c["torch_bytes_bwd"] > 0 and c["ref_bytes"] > c["torch_bytes"]
    assert c["ref_ops_fwd"] > 0 and c["ref_ops_bwd"] > 0
    # issue 24's gates at fp16, batch 16: forward <= 0.6x the reference path's bound, forward + backward <= 0.5x,
    # at most 10 GB of PyTorch-op traffic in the backward (before the fused backward kernels: 1.45x and 225 GB)
    assert c["lb_us"] <= 0.6 * c["ref_us"] and c["lb_fwdbwd_us"] <= 0.5 * c["ref_fwdbwd_us"]
    assert c["torch_bytes_bwd"] <= 10e9
    assert c["lb_fwdbwd_us"] > c["lb_us"] and c["ref_fwdbwd_us"] > c["ref_us"] and c["cudnn_fwdbwd_us"] > c["cudnn_us"]
    assert c["not_modelled"] == []
    modelled = [r for r in res["launches"] if r["modelled"]]
    assert len(modelled) == len(res["launches"])
    for r in modelled:
        assert r["lb"] == max(r["t_mma"], r["t_issue"], r["t_hbm"]) > 0 and r["ctas"] >= 1
    assert "estimates from the compiled code" in stdout.lower()


def test_op_counter_counts_bytes_and_flops_of_what_runs():
    """The PyTorch-op counter against sums worked out by hand: an elementwise op reads and writes each tensor
    once (a broadcast operand once), a view and an allocation move nothing, an in-place op reads and writes
    its tensor, a convolution has 2·outputs·Cin·k² FLOPs (its transposed form 2·inputs·Cout·k²)."""
    ops = []
    x = torch.empty(4, 8, 16, 16, device="meta")                  # 32 KiB of fp32
    w = torch.empty(6, 8, 3, 3, device="meta")
    with aot.counting(ops):
        y = x * 2                                                  # read x, write y
        z = x + torch.empty(1, 8, 1, 1, device="meta")             # + a broadcast (8 values) operand
        x.view(4, -1).t()                                          # views: nothing
        y.mul_(3)                                                  # read and write y
        c = torch.nn.functional.conv2d(x, w, padding=1)            # (4, 6, 16, 16)
        torch.nn.functional.conv_transpose2d(c, w, stride=2)       # (4, 8, 33, 33)
    n = 4 * 8 * 16 * 16 * 4
    assert [o.name for o in ops] == ["mul", "add", "mul_", "convolution", "convolution"]
    assert [o.bytes for o in ops[:3]] == [2 * n, 2 * n + 8 * 4, 2 * n]
    assert ops[3].flops == 2 * c.numel() * 8 * 9 and ops[4].flops == 2 * c.numel() * 8 * 9
    assert ops[3].bytes == (x.numel() + w.numel() + c.numel()) * 4 and z.shape == x.shape
