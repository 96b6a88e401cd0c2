"""Build the synthetic head world: train its generator, its 3DMM encoder and identity network on its renders,
then StyleMask's mask networks with train.py's own loop, and install them as the repository's default.

    python build_world.py                      # the whole build (about 1 h 40 min on 2 CPU cores), resumable
    python build_world.py --stages report      # the quality gates of the installed world only
    python build_world.py --quick --work /tmp/w --no-install    # a few steps of everything (tests)

The generator and the encoders train at the same time (a process each), the generator then its expression
phase (`generator.expression_job`, part of the generator stage); `adapt` then trains the encoders
on a mix of renders and the generator's images, so that they read the generator's softer heads too. Every
stage checkpoints into --work and a killed build, run again with the same flags, continues where it stopped
and ends with the same networks as an uninterrupted one (the data of every step is drawn from the seed and
the step). A work folder holding checkpoints of another build (other training flags, or a changed head,
renderer or sampler: `world_fingerprint`) is refused rather than resumed: each stage's checkpoint is
checked against the flags it depends on, so after changing only --mask-steps, deleting work/masks retrains
the masks alone. `install` copies the trained networks (fp16) and the head's FLAME into weights/world/, with
their SHA-256 and the run defaults the masks were trained with (so that a plain `python train.py` there
repeats the build's mask training) in weights/world/manifest.json; `report` prints the quality gates
(world/quality.py) and eval.py's reenactment gates, and stores them there too.

A script, like train.py and eval.py (it runs both): the world itself (world/) is a library below them.
"""
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

import cli
import eval as evaluation
import train
import weights
from cli import flag
from stylemask import StyleMaskError
from world import encoders, fit, generator, head, quality, sample

STAGES = ("generator", "encoders", "adapt", "masks", "install", "report")
FILES = {"generator": "generator.safetensors", "deca": "deca.safetensors", "arcface": "arcface.safetensors",
         "masknet": "masknet.safetensors", "flame": "flame.safetensors"}


@dataclass
class Config:
    work: str = flag("runs/world", "folder for checkpoints and built files, before they are installed (resumed if "
                                   "it holds this build)")
    stages: str = flag(",".join(STAGES), f"comma-separated stages to run, of {', '.join(STAGES)}")
    seed: int = flag(0, "seed of the whole build")
    gen_steps: int = flag(12000, "generator training steps (batches of 16)")
    expr_steps: int = flag(8000, "steps of the generator's expression phase, on pairs of heads differing in "
                                 "expression alone (batches of 8 pairs; 0: none)")
    enc_steps: int = flag(3000, "E_flame and ArcFace training steps on renders (batches of 32)")
    adapt_steps: int = flag(800, "steps adapting the encoders to the generator's images (half renders, half "
                                 "generated; batches of 32)")
    # A mask step on the world takes about 3 s on 2 cores: 250 keep `python train.py` within 15 minutes, at the
    # tiny defaults' lr for a short run. Installed as train.py's defaults on the world (manifest.json).
    mask_steps: int = flag(250, "mask training steps (train.py, batches of 6)")
    mask_lr: float = flag(1e-2, "mask learning rate")
    quick: bool = flag(False, "a few steps of every stage, to check the build (the result is not a usable world)")
    install: bool = flag(True, "install the built networks into weights/world/ (the defaults of every script)")


MASK_SAVE_EVERY, EVAL_PAIRS = 100, 64  # the masks' checkpoint interval; the pairs of the report's eval.py


def parse_args(argv=None):
    cfg = cli.parse_config(Config, argv, description=__doc__)
    cli.check_flags(cfg, seed=cli.at_least(0), gen_steps=cli.at_least(1), expr_steps=cli.at_least(0),
                    enc_steps=cli.at_least(1), adapt_steps=cli.at_least(0), mask_steps=cli.at_least(1),
                    mask_lr=((lambda v: math.isfinite(v) and v > 0), "a finite number > 0"))
    bad = [s for s in cfg.stages.split(",") if s not in STAGES]
    if bad:
        raise StyleMaskError(f"--stages: unknown stage {bad[0]!r}; stages are {', '.join(STAGES)}")
    if cfg.quick:
        cfg.gen_steps, cfg.expr_steps, cfg.enc_steps, cfg.adapt_steps, cfg.mask_steps = min(cfg.gen_steps, 20), \
            min(cfg.expr_steps, 4), min(cfg.enc_steps, 10), min(cfg.adapt_steps, 4), min(cfg.mask_steps, 4)
    return cfg


def run_defaults(cfg):
    """train.py's and eval.py's defaults on this world (`weights.Origin`): the masks' training as this build ran
    it, untruncated latents (the generator was trained on every latent, each naming a known head), the
    report's pairs."""
    return dict(truncation=1.0, train_steps=cfg.mask_steps, train_lr=cfg.mask_lr,
                save_every=min(MASK_SAVE_EVERY, cfg.mask_steps), eval_pairs=EVAL_PAIRS, range_samples=64)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# what a work folder is a build of
TRAINING = ("seed", "gen_steps", "expr_steps", "enc_steps", "adapt_steps", "mask_steps", "mask_lr", "quick")
# each stage's checkpoint, and the record entries it was trained under (a later stage depends on the earlier ones)
CHECKPOINTS = {"generator.ckpt.safetensors": ("world", "seed", "quick", "gen_steps"),
               "expression.ckpt.safetensors": ("world", "seed", "quick", "gen_steps", "expr_steps"),
               "encoders.ckpt.safetensors": ("world", "seed", "quick", "enc_steps"),
               "adapt.ckpt.safetensors": ("world", "seed", "quick", "gen_steps", "expr_steps", "enc_steps",
                                          "adapt_steps"),
               "masks": ("world",) + TRAINING}


def world_fingerprint():
    """SHA-256 (16 hex digits) of the world the networks learn from: the head (`head.flame_head`) and a batch of
    renders of it. A change to world/head.py, render.py or sample.py changes it, so a work folder's
    checkpoints are never resumed into a different world (~1 s)."""
    h = hashlib.sha256()
    Fl = head.flame_head(torch.float64)
    for k in sorted(Fl):
        h.update(k.encode() + Fl[k].contiguous().numpy().tobytes())
    rng = torch.Generator().manual_seed(0)
    img, lmk = sample.render_views(Fl, sample.identities(4, rng), sample.views(4, rng))
    h.update(img.numpy().tobytes() + lmk.numpy().tobytes())
    return h.hexdigest()[:16]


def check_work(cfg, work):
    """The build's record for work/config.json; a one-line error when work holds a checkpoint trained under
    another record (other training flags, or another world), which resuming would mix into this build."""
    record = {**{k: getattr(cfg, k) for k in TRAINING}, "world": world_fingerprint()}
    path = work / "config.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    for name, keys in CHECKPOINTS.items():
        diff = [k for k in keys if old.get(k) != record[k]]
        if not (work / name).exists() or not diff:
            continue
        what = ", ".join("the world (world/head.py, render.py or sample.py changed)" if k == "world" else
                         f"--{k.replace('_', '-')} {old.get(k)} (now {record[k]})" for k in diff)
        raise StyleMaskError(f"{work / name} was trained under another {'world' if 'world' in diff else 'configuration'}"
                             f": {what}; resuming would mix the two. Delete it to retrain that stage (and the "
                             f"later ones), or use a new --work folder")
    return record


def _half(P):
    """fp16 storage: the shipped files are half the size; `weights.read` gives them back in fp32."""
    return {k: v.half() if v.is_floating_point() else v for k, v in P.items()}


def train_generator(cfg, work, position=None):
    """The generator's two phases: images (`generator.job`), then expressions (`generator.expression_job`, on one
    thread, so that it rounds alike whether or not the encoders train beside it)."""
    G = fit.fit(generator.job(cfg.gen_steps, cfg.seed, mapping_steps=20 if cfg.quick else 1500), work,
                position=position)
    if cfg.expr_steps:
        torch.set_num_threads(1)
        G = fit.fit(generator.expression_job(G, cfg.expr_steps, cfg.seed), work, position=position)
    weights.save(_half(generator.finish(G, cfg.seed)), work / FILES["generator"], "generator",
                 world=f"python build_world.py, {cfg.gen_steps} steps and {cfg.expr_steps} of expression pairs, "
                       f"seed {cfg.seed}")


def train_encoders(cfg, work, position=None):
    torch.set_num_threads(max(1, torch.get_num_threads() // 2) if position else torch.get_num_threads())
    P = fit.fit(encoders.job(cfg.enc_steps, cfg.seed), work, position=position)
    save_encoders(cfg, work, P, f"{cfg.enc_steps} steps on renders")


def save_encoders(cfg, work, P, what):
    D, A = encoders.split(P)
    for kind, P in (("deca", D), ("arcface", A)):
        weights.save(_half(P), work / FILES[kind], kind, world=f"python build_world.py, {what}, seed {cfg.seed}")


def adapt_encoders(cfg, work):
    """The trained encoders (their checkpoint), trained on renders and the trained generator's images."""
    torch.set_num_threads(1)  # as in a full build: float sums round alike whichever stages a run does
    P, _, _ = fit.load(work / "encoders.ckpt.safetensors")
    G = weights.read(work / FILES["generator"], "generator")
    P = fit.fit(encoders.adapt_job(P, G, cfg.adapt_steps, cfg.seed), work)
    save_encoders(cfg, work, P, f"{cfg.enc_steps} steps on renders, {cfg.adapt_steps} adapting to the generator")


def train_both(cfg, work):
    """The generator here and the encoders in a child process at the same time: each is one main thread and
    one data worker, so together they keep 2 cores busy where one alone leaves them half idle."""
    child = multiprocessing.get_context("fork").Process(target=train_encoders, args=(cfg, work, 1))
    child.start()
    try:
        torch.set_num_threads(max(1, torch.get_num_threads() // 2))
        train_generator(cfg, work, position=0)
    except BaseException:  # Ctrl-C or an error: the child stops too (both resume from their checkpoints)
        child.terminate()
        child.join()
        raise
    child.join()
    if child.exitcode:
        raise StyleMaskError(f"the encoders' training stopped (exit {child.exitcode}); run the build again to "
                             f"continue it")


def train_masks(cfg, work):
    """train.py's own main, on one thread: `OMP_NUM_THREADS=1 python train.py` reproduces the masks bit for bit."""
    torch.set_num_threads(1)
    runs = work / "masks"
    ckpt = runs / "checkpoint.safetensors"
    args = ["--resume", str(ckpt)] if ckpt.is_file() else [
        "--out", str(runs), "--generator", str(work / FILES["generator"]), "--deca", str(work / FILES["deca"]),
        "--arcface", str(work / FILES["arcface"]), "--flame", str(work / FILES["flame"]),
        "--n-layers", str(generator.n_conv()), "--lr", str(cfg.mask_lr), "--seed", str(cfg.seed),
        "--truncation", str(run_defaults(cfg)["truncation"]),
        "--save-every", str(run_defaults(cfg)["save_every"])]
    done = ckpt.is_file() and int(weights.header(ckpt, "checkpoint").get("step", 0)) >= cfg.mask_steps
    if not done:
        rc = train.main(args + ["--steps", str(cfg.mask_steps)])
        if rc:
            raise StyleMaskError(f"train.py stopped (exit {rc}); run the build again to continue")
    cli.copy_file(runs / "masknet.safetensors", work / FILES["masknet"])


def install(cfg, work):
    """Copy the built networks and FLAME into weights/world/, with their hashes and the run defaults of this
    world (`run_defaults`) in manifest.json."""
    weights.WORLD.mkdir(exist_ok=True)
    for kind, name in FILES.items():
        weights.read(work / name, kind)  # checked before it ships
        cli.copy_file(work / name, weights.WORLD / name)
    write_manifest(sha256={name: sha256(weights.WORLD / name) for name in FILES.values()}, defaults=run_defaults(cfg))


def write_manifest(**entries):
    """Update weights/world/manifest.json with entries (the files' hashes, the build's measured gates)."""
    path = weights.WORLD / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    manifest.update(entries)
    cli.write_text(path, json.dumps(manifest, indent=2) + "\n")


def report(folder):
    """The quality gates of the networks in folder (printed, and returned as a dict)."""
    G = weights.read(folder / FILES["generator"], "generator")
    D = weights.read(folder / FILES["deca"], "deca")
    A = weights.read(folder / FILES["arcface"], "arcface")
    Fl = head.flame_head()
    out = {"encoder": quality.encoder_errors(D, Fl=Fl), "verification": quality.verification(A, Fl=Fl)}
    fid = quality.generator_fidelity(G, D, Fl=Fl)
    out["generator"] = {k: v for k, v in fid.items() if not torch.is_tensor(v)}
    cli.write_png(folder / "samples.png", cli.image_grid([fid["renders"][:8], fid["images"][:8],
                                                          fid["renders"][8:], fid["images"][8:]],
                                                         titles=["render", "generated", "render", "generated"]))
    e, v, g = out["encoder"], out["verification"], out["generator"]
    print(f"E_flame on held-out renders: pose {e['pose_deg']:.2f}° (yaw {e['yaw_deg']:.2f}, pitch {e['pitch_deg']:.2f}, "
          f"roll {e['roll_deg']:.2f}; gate <= 2), jaw {e['jaw_deg']:.2f}°, expression {e['exp']:.3f}, "
          f"shape {e['shape']:.3f}, appearance {e['appearance']:.3f} (mean |error| of the coefficients)")
    print(f"ArcFace verification on held-out identities: {100 * v['accuracy']:.1f}% (gate >= 95); cosine same "
          f"{v['same_cos']:.3f}, different {v['different_cos']:.3f}")
    print(f"generator: pose {g['pose_deg']:.2f}° from the pose z names, yaw spread {100 * g['yaw_spread']:.0f}% of "
          f"the renders' (gate >= 70), L1 to the renders {g['l1']:.3f}; samples: {folder / 'samples.png'}")
    return out


def reenactment_gates(results):
    """eval.py's table -> the issue's gates on StyleMask: Pose and Expr. against the source row (<= 0.4, <= 0.5)
    and the identity kept, (CSIM - CSIM_target) / (1 - CSIM_target) >= 0.7."""
    r, src, tgt = results["StyleMask"], results["source"], results["target"]
    return dict(pose_ratio=r["pose"] / src["pose"], expr_ratio=r["expr"] / src["expr"],
                identity_kept=(r["csim"] - tgt["csim"]) / (1 - tgt["csim"]))


def run_eval(cfg, folder, out, pairs=EVAL_PAIRS):
    """eval.py on the world in folder, at the world's truncation -> its results. The installed world runs as every
    user runs it (no paths: the embedded default); a work folder by its paths."""
    args = ["--out", str(out), "--overwrite", "--truncation", str(run_defaults(cfg)["truncation"]), "--pairs",
            str(pairs), "--size", "128", "--grid-pairs", "6"]
    installed = Path(folder).resolve() == weights.WORLD.resolve()
    if not installed:
        args += [*[a for kind in ("generator", "arcface", "deca") for a in (f"--{kind}", str(folder / FILES[kind]))],
                 "--mask", str(folder / FILES["masknet"]), "--flame", str(folder / FILES["flame"])]
    with mock.patch.dict(os.environ, {"STYLEMASK_DEFAULT": "world"} if installed else {}):
        rc = evaluation.main(args)
    if rc:
        raise StyleMaskError(f"eval.py failed (exit {rc})")
    return json.loads((out / "results.json").read_text())["results"]


def main(argv=None):
    cfg = parse_args(argv)
    work = Path(cfg.work)
    stages = cfg.stages.split(",")
    with cli.in_place(work, "build_world.py", continuing=True, marked=False, flag="--work"):  # resumes its own folder
        record = check_work(cfg, work)
        cli.write_text(work / "config.json", json.dumps({**dataclasses.asdict(cfg), **record}, indent=2) + "\n")
        if "generator" in stages and "encoders" in stages:  # independent: both at once, a process each
            train_both(cfg, work)
        elif "generator" in stages:
            train_generator(cfg, work)
        elif "encoders" in stages:
            train_encoders(cfg, work)
        if "adapt" in stages and cfg.adapt_steps:
            adapt_encoders(cfg, work)
        if "masks" in stages:
            weights.save(head.flame_head(), work / FILES["flame"], "flame")
            train_masks(cfg, work)
        if "install" in stages and cfg.install:
            install(cfg, work)
        if "report" in stages:
            folder = weights.WORLD if cfg.install else work
            gates = report(folder)
            results = run_eval(cfg, folder, work / "eval")
            gates["reenactment"] = g = reenactment_gates(results)
            print(f"eval.py, {EVAL_PAIRS} pairs: StyleMask's Pose error {g['pose_ratio']:.2f}× the source row's (gate <= 0.4), "
                  f"Expr. {g['expr_ratio']:.2f}× (gate <= 0.5), identity kept {g['identity_kept']:.2f} (gate >= 0.7)")
            check = run_eval(cfg, folder, work / "eval16", pairs=16)
            cli.write_text(work / "report.json", json.dumps(gates, indent=2) + "\n")
            if cfg.install:  # the README's pictures: generated samples, and source | target | reenacted
                write_manifest(gates=gates, eval16=check)
                cli.copy_file(work / "eval" / "grid.png", weights.WORLD / "reenactment.png")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_script(main))
