"""The scripts' promises: a run's folder is never lost or half-written, bad flags and inputs are one-line
errors (exit 2) before any work, SIGINT/SIGTERM stop training with a checkpoint, messages name the problem
and the fix. Everything runs on the tiny defaults; each folder is compared byte for byte around a failure."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import align
import cli
import e4e
import eval as ev
import reenact
import stylemask as sm
import train
import weights
from weights import convert, defaults

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--eval-pairs", "1", "--log-every", "1", "--save-every", "2", "--lr", "1e-2"]
EVAL = ["--pairs", "2", "--batch", "2", "--range-samples", "2", "--size", "32", "--grid-pairs", "1"]


@pytest.fixture(autouse=True)
def no_weights(tmp_path, monkeypatch):
    """Every test sees an empty weights/ (the tiny defaults), whatever the checkout holds."""
    monkeypatch.setattr(weights, "DIR", tmp_path / "no-weights")


def snapshot(folder):
    """{relative path: bytes} of every file under folder: what 'left as it was' is checked against."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run(script, argv, capsys):
    """(exit code, stderr) of a script's main as its command line runs it."""
    capsys.readouterr()
    code = cli.run_script(script.main, argv)
    return code, capsys.readouterr().err


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# --- Output safety: the three data-loss cases, and failures that must leave a folder as it was -----------

def test_resume_continues_the_checkpoints_run_in_its_folder_with_its_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out, runs/stylemask, is relative to the working folder
    default = tmp_path / "runs" / "stylemask"
    assert train.main(TRAIN + ["--batch", "1", "--steps", "2"]) == 0  # a finished run in the default folder
    before = snapshot(default)
    x = tmp_path / "runs" / "x"
    assert train.main(TRAIN + ["--batch", "2", "--steps", "2", "--out", str(x)]) == 0
    assert train.main(["--resume", str(x / "checkpoint.safetensors"), "--steps", "3"]) == 0  # no --out
    assert snapshot(default) == before  # the default folder is not touched
    cfg = json.loads((x / "config.json").read_text())
    assert cfg["batch"] == 2 and cfg["steps"] == 3 and cfg["log_every"] == 1  # the checkpoint's flags
    assert [r["step"] for r in log(x)] == [0, 1, 2, 3]  # 0: the untrained masks' held-out loss


def test_resume_refuses_a_flag_that_contradicts_the_run(tmp_path, capsys):
    x = tmp_path / "x"
    assert train.main(TRAIN + ["--batch", "1", "--steps", "2", "--out", str(x)]) == 0
    before = snapshot(x)
    code, err = run(train, ["--resume", str(x / "checkpoint.safetensors"), "--steps", "4", "--batch", "6"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--batch 6 contradicts the run being resumed (--batch 1" in err
    code, err = run(train, ["--resume", str(x / "checkpoint.safetensors")], capsys)  # already at its --steps
    assert code == 2 and "larger --steps" in err
    assert snapshot(x) == before


def test_a_new_run_never_writes_into_a_finished_one(tmp_path, capsys):
    x = tmp_path / "x"
    assert train.main(TRAIN + ["--batch", "1", "--steps", "2", "--out", str(x)]) == 0
    before = snapshot(x)
    code, err = run(train, TRAIN + ["--batch", "1", "--steps", "3", "--out", str(x)], capsys)
    assert code == 2 and err.count("\n") == 1 and "--overwrite" in err and "--resume" in err
    assert snapshot(x) == before
    assert train.main(TRAIN + ["--batch", "1", "--steps", "1", "--out", str(x), "--overwrite"]) == 0
    assert [r["step"] for r in log(x)] == [0, 1] and not (x / "grid_000002.png").exists()  # replaced, not appended


def test_a_failed_eval_leaves_the_folder_as_it_was(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert ev.main(EVAL + ["--out", str(out)]) == 0
    before = snapshot(out)
    code, err = run(ev, EVAL + ["--out", str(out)], capsys)  # holds results: refused
    assert code == 2 and "--overwrite" in err
    code, err = run(ev, EVAL + ["--size", "-1", "--overwrite", "--out", str(out)], capsys)
    assert code == 2 and err.startswith("error: --size -1: must be")

    def boom(*args, **kwargs):
        raise RuntimeError("a fault in the middle of the run")
    monkeypatch.setattr(ev, "evaluate", boom)
    with pytest.raises(RuntimeError):
        ev.main(EVAL + ["--overwrite", "--out", str(out)])
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staged leftovers
    monkeypatch.undo()
    monkeypatch.setattr(weights, "DIR", tmp_path / "no-weights")
    (out / "stale.txt").write_text("from an older run")
    assert ev.main(EVAL + ["--seed", "3", "--overwrite", "--out", str(out)]) == 0
    assert not (out / "stale.txt").exists() and json.loads((out / "results.json").read_text())["settings"]["seed"] == 3
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())  # readable by all


def frames_folder(folder, n, seed=0, size=48):
    folder.mkdir()
    gen = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(gen.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"f{i:02d}.png")
    return folder


def test_reenact_replaces_a_sequence_whole_and_a_failure_changes_nothing(tmp_path):
    out = tmp_path / "out"
    args = ["--aligned", "--size", "32", "--out", str(out)]
    assert reenact.main(["--target", str(frames_folder(tmp_path / "five", 5))] + args) == 0
    assert len(list((out / "frames").iterdir())) == 5
    before = snapshot(out)
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all")
    assert reenact.main(["--target", str(tmp_path / "bad.mp4"), "--overwrite"] + args) == 2
    assert snapshot(out) == before
    assert reenact.main(["--target", str(frames_folder(tmp_path / "three", 3, seed=1)), "--overwrite"] + args) == 0
    assert len(list((out / "frames").iterdir())) == 3  # no stale frames 00003, 00004 from the longer run


def test_stale_staging_folders_of_killed_runs_are_cleaned(tmp_path):
    out = tmp_path / "out"
    dead = 2 ** 22 + 12345  # above the kernel's default pid_max: no such process
    (tmp_path / f".out.tmp{dead}").mkdir()
    (tmp_path / f".out.tmp{dead}" / "table.md").write_text("half written")
    assert ev.main(EVAL + ["--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- Validation up front: one line, exit 2, nothing written ---------------------------------------------

BAD_FLAGS = [
    (train, ["--log-every", "0"], "--log-every 0"), (train, ["--batch", "0"], "--batch 0"),
    (train, ["--batch", "-1"], "--batch -1"), (train, ["--eval-pairs", "0"], "--eval-pairs 0"),
    (train, ["--lr", "-1"], "--lr -1.0"), (train, ["--steps", "-5"], "--steps -5"),
    (train, ["--truncation", "nan"], "--truncation nan"), (train, ["--lambda-id", "inf"], "--lambda-id inf"),
    (ev, ["--size", "-1"], "--size -1"), (ev, ["--grid-pairs", "0"], "--grid-pairs 0"),
    (ev, ["--truncation", "nan"], "--truncation nan"), (ev, ["--range-samples", "1"], "--range-samples 1"),
    (ev, ["--pairs", "-3"], "--pairs -3"),
    (reenact, ["--fps", "0.001"], "--fps 0.001"), (reenact, ["--alpha", "nan"], "--alpha nan"),
    (reenact, ["--truncation", "-0.5"], "--truncation -0.5"), (reenact, ["--device", "tpu:0"], "--device"),
]


@pytest.mark.parametrize("script,argv,message", BAD_FLAGS, ids=[" ".join(a) for _, a, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_errors_before_any_work(script, argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run(script, argv + ["--out", str(out)], capsys)
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_missing_cuda_device_is_named(tmp_path, capsys):
    code, err = run(reenact, ["--device", "cuda", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--device cuda: no such CUDA device here" in err and "--device cpu" in err


@pytest.mark.parametrize("script", [train, ev, reenact])
def test_an_output_folder_that_cannot_be_made_is_one_line(script, tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    code, err = run(script, ["--out", str(tmp_path / "file" / "run")], capsys)
    assert code == 2 and err.count("\n") == 1 and "choose another --out" in err


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    G = defaults.tiny_generator()
    np.save(tmp_path / "nan.npy", np.full((14, 32), np.nan, np.float32))
    code, err = run(reenact, ["--source", str(tmp_path / "nan.npy"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "NaN or Inf" in err and "nan.npy" in err
    M = defaults.tiny_mask()
    torn = M._replace(params={k: v for k, v in M.params.items() if not k.startswith("network_03.")})
    weights.save(torn, tmp_path / "torn.safetensors", "masknet")
    for script, argv in ((ev, EVAL), (reenact, [])):
        code, err = run(script, argv + ["--mask", str(tmp_path / "torn.safetensors"), "--out", str(tmp_path / "o")],
                        capsys)
        assert code == 2 and err.count("\n") == 1 and "torn.safetensors" in err and "network_03" in err, err
    weights.save(G, tmp_path / "g.safetensors", "generator")
    code, err = run(ev, EVAL + ["--mask", str(tmp_path / "g.safetensors"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "not StyleMask mask networks: it holds a StyleGAN2 generator" in err
    code, err = run(ev, EVAL + ["--mask", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "is a folder" in err
    assert not (tmp_path / "o").exists()


# --- Signals ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_the_resumed_run_is_exact(sig, tmp_path, monkeypatch, capsys):
    flags = TRAIN + ["--batch", "1", "--steps", "4", "--save-every", "4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(flags + ["--out", str(straight)]) == 0
    calls, pair_loss = [], train.pair_loss

    def signalled(*args, **kwargs):  # the signal arrives in the middle of the second step (the first call is the
        calls.append(1)               # untrained masks' held-out loss, before step 1)
        if len(calls) == 3:
            signal.raise_signal(sig)
        return pair_loss(*args, **kwargs)
    monkeypatch.setattr(train, "pair_loss", signalled)
    capsys.readouterr()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)  # (SIG_IGN in a background job)
    assert train.main(flags + ["--out", str(split)]) == 128 + sig
    err = capsys.readouterr().err
    assert f"stopped by {signal.Signals(sig).name} at step 2: checkpoint saved" in err and "--resume" in err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    monkeypatch.setattr(train, "pair_loss", pair_loss)
    assert train.main(["--resume", str(split / "checkpoint.safetensors")]) == 0
    a, b = log(straight), log(split)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4] and [r.get("loss") for r in a] == [r.get("loss") for r in b]
    (Ma, sa), (Mb, sb) = (weights.read(d / "checkpoint.safetensors", "checkpoint") for d in (straight, split))
    assert all(torch.equal(Ma.params[k], Mb.params[k]) for k in Ma.params)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# --- Messages -----------------------------------------------------------------------------------------

class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_a_pickle_that_would_run_code_says_so(tmp_path, capsys):
    torch.save({"g_ema": {"style.1.weight": RunsCode()}}, tmp_path / "evil.pt")
    code, err = run(convert, [str(tmp_path / "evil.pt"), str(tmp_path / "g.safetensors")], capsys)
    assert code == 2 and "refused to load: unpickling it would run code" in err and "system" in err
    assert "this must never run" not in capsys.readouterr().out and not (tmp_path / "g.safetensors").exists()


def test_folders_missing_files_and_advice_per_kind(tmp_path, capsys):
    with pytest.raises(sm.StyleMaskError, match="is a folder"):
        weights.read(tmp_path, "generator")
    code, err = run(convert, [str(tmp_path), str(tmp_path / "g.safetensors")], capsys)
    assert code == 2 and "is a folder" in err
    with pytest.raises(sm.StyleMaskError, match="train.py writes checkpoint.safetensors"):
        weights.read(tmp_path / "absent.safetensors", "checkpoint")
    with pytest.raises(sm.StyleMaskError, match="python -m weights.convert deca_model.tar"):
        weights.read(tmp_path / "absent.safetensors", "deca")


def test_a_wrong_shaped_mapping_weight_is_named(tmp_path):
    G = defaults.tiny_generator()
    G["style.1.weight"] = G["style.1.weight"][:16]  # (16, 32): w_dim 16, but the modulations read 32
    weights.save(G, tmp_path / "g.safetensors", "generator")
    with pytest.raises(sm.StyleMaskError, match=r"'style\.1\.weight' has shape \(16, 32\), expected \(32, 32\)"):
        weights.read(tmp_path / "g.safetensors", "generator")


def test_eval_uses_a_ranges_file_given_on_the_defaults(tmp_path):
    ranges = [[-1.0 - i, 1.0 + i] for i in range(54)]
    (tmp_path / "r.json").write_text(json.dumps({"ranges": ranges}))
    assert ev.main(EVAL + ["--ranges", str(tmp_path / "r.json"), "--out", str(tmp_path / "o")]) == 0
    settings = json.loads((tmp_path / "o" / "results.json").read_text())["settings"]
    assert settings["expression_ranges"] == str(tmp_path / "r.json")
    assert not (tmp_path / "o" / "expression_ranges.json").exists()


def test_align_has_a_help_and_one_line_errors(tmp_path):
    r = subprocess.run([sys.executable, "align.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "usage" in r.stdout and "--size" in r.stdout
    r = subprocess.run([sys.executable, "align.py", str(tmp_path / "none.jpg"), str(tmp_path / "a.png")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_files_written_before_kinds_were_stated_still_load(tmp_path):
    """Mask files and checkpoints of the earlier layout: a `masknet` header with no mask kind; global and W+
    masks marked by `ctrl_dims` / `ctrl_index` tensors; checkpoints labelled `masknet` with train.* tensors."""
    from safetensors.torch import save_file
    for kind, space in (("per-layer", "S"), ("global", "S"), ("per-layer", "W")):
        M = sm.init_mask(sm.ARCHS["tiny"], kind=kind, space=space, seed=3)
        old = dict(M.params)
        if kind == "global":
            old["ctrl_dims"] = torch.tensor(M.dims)
        if space == "W":
            old["ctrl_index"] = torch.arange(sum(M.dims))
        save_file(old, str(tmp_path / "m.safetensors"), metadata={"stylemask": "masknet"})
        got = weights.read(tmp_path / "m.safetensors", "masknet")
        assert (got.kind, got.space, got.dims) == (kind, space, M.dims)
        assert got.params.keys() == M.params.keys() and all(torch.equal(got.params[k], M.params[k]) for k in M.params)
    M = defaults.tiny_mask()
    state = {"train.step": torch.tensor(7), "train.rng": torch.Generator().get_state()}
    save_file({**M.params, **state}, str(tmp_path / "ck.safetensors"),
              metadata={"stylemask": "masknet", "config": json.dumps({"batch": 2}), "step": "7"})
    saved, got_state = weights.read(tmp_path / "ck.safetensors", "checkpoint")
    assert saved.dims == M.dims and int(got_state["train.step"]) == 7
    assert json.loads(weights.header(tmp_path / "ck.safetensors", "checkpoint")["config"]) == {"batch": 2}


# --- Video: MP4 at the input's timing, numbering by input frame, a manifest, paste-back, smoothing ---------

def write_video(path, frames, fps):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    H, W, _ = frames[0].shape
    writer = imageio_ffmpeg.write_frames(str(path), (W, H), fps=fps, macro_block_size=1)
    writer.send(None)
    for f in frames:
        writer.send(np.ascontiguousarray(f).tobytes())
    writer.close()


def video_facts(path):
    """(frame count, fps, (W, H)) of a video, as ffmpeg reads it back."""
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    return sum(1 for _ in reader), meta["fps"], tuple(meta["size"])


def test_a_video_gives_an_mp4_with_its_frame_count_and_fps_and_a_manifest(tmp_path):
    gen = np.random.default_rng(4)
    clip = [gen.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(5)]
    write_video(tmp_path / "clip.mp4", clip, fps=6)
    out = tmp_path / "o"
    assert reenact.main(["--target", str(tmp_path / "clip.mp4"), "--aligned", "--size", "32", "--out", str(out)]) == 0
    assert video_facts(out / "reenacted.mp4") == (5, 6.0, (32, 32))
    manifest = json.loads((out / "frames.json").read_text())
    assert manifest["frames"] == 5 and [f["output"] for f in manifest["list"]] == [f"frames/{i:05d}.png" for i in range(5)]
    # --paste-back: full frames of the input's size, in the PNGs and the MP4
    assert reenact.main(["--target", str(tmp_path / "clip.mp4"), "--aligned", "--paste-back", "--out",
                         str(tmp_path / "p")]) == 0
    assert video_facts(tmp_path / "p" / "reenacted.mp4") == (5, 6.0, (64, 48))
    assert Image.open(tmp_path / "p" / "frames" / "00004.png").size == (64, 48)


def test_skipped_frames_keep_the_input_timing_and_are_listed_with_the_reason(tmp_path):
    folder = frames_folder(tmp_path / "f", 4)
    (folder / "f01.png").write_bytes(b"not an image")  # the second frame cannot be read
    out = tmp_path / "o"
    assert reenact.main(["--target", str(folder), "--aligned", "--size", "32", "--fps", "5", "--out", str(out)]) == 0
    manifest = json.loads((out / "frames.json").read_text())
    assert [("output" in f, f["name"]) for f in manifest["list"]] == [(True, "f00.png"), (False, "f01.png"),
                                                                        (True, "f02.png"), (True, "f03.png")]
    assert "not a readable image" in manifest["list"][1]["skipped"]
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["00000.png", "00002.png", "00003.png"]
    assert video_facts(out / "reenacted.mp4")[:2] == (4, 5.0)  # one frame per input frame: the gap is filled
    assert Image.open(out / "reenacted.gif").n_frames == 3  # the preview shows the results only


def test_paste_back_inverts_the_alignment_crop():
    """Crop a parallelogram out of a frame as align() does (PIL's QUAD resampling), paste the crop back: inside,
    the frame again (two bilinear resamplings: ±1 level; half a pixel off would be 2), outside, untouched."""
    H, W = 120, 160
    yy, xx = np.mgrid[0:H, 0:W]
    frame = np.stack([xx * 1.5, yy * 2.0, 128 + 0 * xx], -1).astype(np.uint8)  # ramps: misplacement shows
    c, x, y = np.array([80.0, 60.0]), np.array([30.0, 8.0]), np.array([-8.0, 30.0])
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])  # FFHQ's kind: a rotated square
    crop = np.asarray(Image.fromarray(frame).transform((64, 64), Image.QUAD, (quad + 0.5).flatten(), Image.BILINEAR))
    out = align.paste_back(frame, crop, quad + 0.5)
    st = (np.stack([xx + 0.5, yy + 0.5], -1) - (quad[0] + 0.5)) @ np.linalg.inv(np.stack([x * 2, y * 2], 1)).T
    inside, outside = ((st > 0.15) & (st < 0.85)).all(-1), ((st < -0.02) | (st > 1.02)).any(-1)
    diff = np.abs(out.astype(int) - frame.astype(int))
    assert inside.sum() > 1500 and diff[inside].max() <= 1 and diff[outside].max() == 0
    # and the crop align() itself makes, from landmarks, goes back to its place through crop_corners
    lm = np.full((68, 2), 80.0)
    lm[36:42], lm[42:48], lm[48], lm[54] = (68.0, 52.0), (92.0, 55.0), (70.0, 82.0), (88.0, 84.0)
    crop = align.align(frame, lm, 64)
    out = align.paste_back(frame, crop, align.crop_corners(lm))
    quad = align.crop_corners(lm) - 0.5
    st = (np.stack([xx + 0.5, yy + 0.5], -1) - (quad[0] + 0.5)) @ np.linalg.inv(np.stack([quad[3] - quad[0],
                                                                                       quad[1] - quad[0]], 1)).T
    inside = ((st > 0.15) & (st < 0.85)).all(-1)
    diff = np.abs(out.astype(int) - frame.astype(int))[inside]  # align() resamples twice (4× up, Lanczos down):
    assert inside.sum() > 1500 and diff.max() <= 2 and diff.mean() < 1.2  # ±2 levels; half a pixel off: mean 1.8


def test_the_smoother_steadies_jitter_and_starts_over_after_a_gap():
    gen = np.random.default_rng(0)
    truth = np.tile(np.array([[100.0, 120.0]]), (68, 1))
    smooth, raw, steady = align.Smoother(0.5), [], []
    for _ in range(200):
        lm = truth + gen.normal(0, 2.0, truth.shape)
        raw.append(lm)
        steady.append(smooth(lm))
    assert np.std(np.array(steady[10:]) - truth) < 0.65 * np.std(np.array(raw[10:]) - truth)  # √(1/3) in theory
    smooth.reset()
    assert np.array_equal(smooth(truth + 5), truth + 5)  # no memory of the frames before a skipped one


# --- Batch mode -----------------------------------------------------------------------------------------

def test_batch_mode_reenacts_every_source_with_every_target(tmp_path):
    G = defaults.tiny_generator()
    sources = tmp_path / "sources"
    sources.mkdir()
    gen = torch.Generator().manual_seed(1)
    for name in ("a", "b"):
        np.save(sources / f"{name}.npy", sm.mapping(G, torch.randn(1, 32, generator=gen))[0].numpy())
    (sources / "c.png").write_bytes(b"not an image")  # fails: its pairs are listed with the reason
    targets = frames_folder(tmp_path / "targets", 2, size=64)
    out = tmp_path / "o"
    assert reenact.main(["--source", str(sources), "--target", str(targets), "--aligned", "--size", "32",
                         "--out", str(out)]) == 0
    manifest = json.loads((out / "pairs.json").read_text())
    assert manifest["pairs"] == 6 and manifest["reenacted"] == 4
    assert sorted(p.name for p in (out / "pairs").iterdir()) == ["a_npy__f00_png.png", "a_npy__f01_png.png",
                                                                 "b_npy__f00_png.png", "b_npy__f01_png.png"]
    assert all("not a readable image" in e["skipped"] for e in manifest["list"] if "c.png" in e["source"])
    # one pair by hand: source a (a w), target f01 (its e4e inversion), Eq. 1 with the untrained default mask
    crop = reenact.resize(np.asarray(Image.open(targets / "f01.png")), 256)
    x = torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    w_t = G["latent_avg"] + 0.7 * (e4e.e4e(defaults.tiny_e4e(G=G), x) - G["latent_avg"])
    w_s = torch.from_numpy(np.load(sources / "a.npy"))[None]
    want = cli.to_uint8(torch.nn.functional.adaptive_avg_pool2d(
        sm.synthesis(G, sm.reenact_w(G, w_s, w_t, defaults.tiny_mask())), 32))[0].numpy()
    got = np.asarray(Image.open(out / "pairs" / "a_npy__f01_png.png"))
    assert np.abs(got.astype(int) - want).max() <= 1
    assert reenact.main(["--source", str(sources), "--target", str(targets), "--aligned", "--num-pairs", "3",
                         "--size", "32", "--out", str(tmp_path / "three")]) == 0
    assert json.loads((tmp_path / "three" / "pairs.json").read_text())["pairs"] == 3


@pytest.mark.parametrize("interrupt,code", [(KeyboardInterrupt, 130), (cli.Interrupted, 143)])
def test_ctrl_c_or_sigterm_in_eval_is_one_line_and_leaves_the_folder(interrupt, code, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert ev.main(EVAL + ["--out", str(out)]) == 0
    before = snapshot(out)

    def stopped(*args, **kwargs):
        raise interrupt()
    monkeypatch.setattr(ev, "evaluate", stopped)
    got, err = run(ev, EVAL + ["--overwrite", "--out", str(out)], capsys)
    assert got == code and err.count("\n") == 1 and "interrupted" in err
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # staging removed


def test_two_runs_into_one_folder_never_mix(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text(str(os.getppid()))  # a live process (pytest's parent) holds the folder
    code, err = run(train, TRAIN + ["--batch", "1", "--steps", "1", "--out", str(out)], capsys)
    assert code == 2 and "is writing there now" in err and sorted(p.name for p in out.iterdir()) == [".lock"]
    (out / ".lock").write_text("4200000")  # a killed run's lock: taken over, and removed at the end
    assert train.main(TRAIN + ["--batch", "1", "--steps", "1", "--out", str(out)]) == 0 and not (out / ".lock").exists()
    # eval: another run published results into --out while this one ran: this one's are not published over them
    real_staged, other = cli.staged, tmp_path / "other"

    def meanwhile(folder, overwrite, script):
        ctx = real_staged(folder, overwrite, script)
        tmp = ctx.__enter__()
        (folder).mkdir(parents=True, exist_ok=True)
        (folder / "theirs.txt").write_text("another run's result")
        return _Exit(ctx, tmp)
    monkeypatch.setattr(cli, "staged", meanwhile)
    code, err = run(ev, EVAL + ["--out", str(other)], capsys)
    assert code == 2 and "another run wrote results there" in err
    assert sorted(p.name for p in other.iterdir()) == ["theirs.txt"]


class _Exit:
    """A context manager around an entered one (for swapping what happens inside cli.staged)."""

    def __init__(self, ctx, value):
        self.ctx, self.value = ctx, value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)



# --- What --overwrite may replace, and what a crash must not take with it ---------------------------------

def test_overwrite_replaces_only_a_run_of_the_same_script(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    code, err = run(ev, EVAL + ["--out", str(docs), "--overwrite"], capsys)
    assert code == 2 and "did not write (not a run folder" in err and (docs / "thesis.txt").exists()
    x = tmp_path / "x"
    assert train.main(TRAIN + ["--batch", "1", "--steps", "1", "--out", str(x)]) == 0
    before = snapshot(x)
    code, err = run(ev, EVAL + ["--out", str(x), "--overwrite"], capsys)  # would delete the trained masks
    assert code == 2 and "eval.py did not write (train.py" in err and snapshot(x) == before
    for bad in (".", str(tmp_path / "x" / "..")):
        code, err = run(reenact, ["--out", bad, "--overwrite"], capsys)
        assert code == 2 and "name a folder of its own" in err


def test_a_new_run_that_fails_before_its_first_checkpoint_gives_the_old_run_back(tmp_path, monkeypatch):
    x = tmp_path / "x"
    assert train.main(TRAIN + ["--batch", "1", "--steps", "2", "--out", str(x)]) == 0
    before = snapshot(x)

    def broken(*args, **kwargs):
        raise RuntimeError("a fault in the first step")
    monkeypatch.setattr(train, "pair_loss", broken)
    with pytest.raises(RuntimeError):
        train.main(TRAIN + ["--batch", "1", "--steps", "3", "--seed", "1", "--out", str(x), "--overwrite"])
    assert snapshot(x) == before and sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    assert all((x / n).stat().st_mode & 0o777 == 0o644 for n in ("checkpoint.safetensors", "masknet.safetensors"))


def test_resume_survives_a_cut_log_line_and_rejects_overwrite(tmp_path, capsys):
    x = tmp_path / "x"
    assert train.main(TRAIN + ["--batch", "1", "--steps", "2", "--out", str(x)]) == 0
    with open(x / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a kill in the middle of a write
    code, err = run(train, ["--resume", str(x / "checkpoint.safetensors"), "--steps", "3", "--overwrite"], capsys)
    assert code == 2 and "--overwrite with --resume" in err
    assert train.main(["--resume", str(x / "checkpoint.safetensors"), "--steps", "3", "--lr", "0"]) == 0  # 0: its own
    assert [r["step"] for r in log(x)] == [0, 1, 2, 3]  # 0: the untrained masks' held-out loss


def test_converter_destinations_and_sources_that_cannot_be(tmp_path, capsys):
    G = defaults.tiny_generator()
    weights.save(G, tmp_path / "g.safetensors", "generator")
    (tmp_path / "d.safetensors").mkdir()
    for argv, message in (([str(tmp_path / "g.safetensors"), str(tmp_path / "h.safetensors")], "already a safetensors"),
                          ([str(tmp_path / "g.safetensors"), str(tmp_path / "d.safetensors")], "is a folder"),
                          ([str(tmp_path / "g.safetensors"), str(tmp_path / "no" / "h.safetensors")], "no such folder")):
        code, err = run(convert, argv, capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_batch_outputs_of_same_stem_inputs_do_not_collide(tmp_path):
    sources = frames_folder(tmp_path / "s", 1, size=48)
    os.rename(sources / "f00.png", sources / "a.png")
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(sources / "a.jpg")
    targets = frames_folder(tmp_path / "t", 1, seed=2, size=48)
    assert reenact.main(["--source", str(sources), "--target", str(targets), "--aligned", "--size", "16",
                         "--out", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o" / "pairs").iterdir()) == ["a_jpg__f00_png.png", "a_png__f00_png.png"]


def test_images_too_large_and_memory_running_out_are_one_line(tmp_path, capsys, monkeypatch):
    from PIL import Image as PILImage
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # a 48×48 image then counts as a decompression bomb
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(tmp_path / "big.png")
    code, err = run(reenact, ["--source", str(tmp_path / "big.png"), "--aligned", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "big.png: not a readable image (DecompressionBombError)" in err
    monkeypatch.undo()
    monkeypatch.setattr(weights, "DIR", tmp_path / "no-weights")

    def hungry(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried")
    monkeypatch.setattr(ev, "evaluate", hungry)
    code, err = run(ev, EVAL + ["--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "error: out of memory" in err and err.count("\n") == 1  # (after a progress bar)



def test_an_old_run_left_aside_by_a_killed_run_is_pointed_out(tmp_path, capsys):
    out, aside = tmp_path / "x", tmp_path / ".x.old4200000"  # what a SIGKILL between set-aside and checkpoint leaves
    aside.mkdir()
    (aside / "checkpoint.safetensors").write_bytes(b"the earlier run")
    code, err = run(train, TRAIN + ["--batch", "1", "--steps", "1", "--out", str(out)], capsys)
    assert code == 2 and str(aside) in err and "move them back" in err and aside.is_dir() and not out.exists()
