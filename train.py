"""Train StyleMask's mask networks on random generated pairs (Sect. III-B, IV-A).

    python train.py                                    # no weights: the embedded default (below)
    python train.py --out runs/paper                   # converted weights in weights/: the paper's setup
    python train.py --resume runs/paper/checkpoint.safetensors   # continue exactly where it stopped, in runs/paper

Each step samples source, target and (for the cycle loss) a second target latent, maps them with
truncation 0.7 (1 on the world), renders them and estimates their 3DMM parameters (no gradients), reenacts with the
mask networks, renders the reenacted images, and minimises Eq. 8 (L_r + L_cycle, with the official
eye and mouth terms). Without converted weights every network is the embedded default, and the run says
so: the synthetic head world's (weights/world/, once built by python -m world.build: it learns the world's
masks, not faces), else the tiny random networks (a pipeline check). See weights/README.md for real weights.
"""
# The training loop and its bookkeeping only: the math is stylemask's (Eq. 1-8), the networks and their
# files are weights', the command line and image writing cli's.
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import cli
import facenets as fn
import stylemask as sm
import weights


@dataclass
class Config:
    steps: int = 0               # 0: 70000 with real weights (Sect. IV-A), 250 on the world, 200 on the tiny defaults
    batch: int = 6               # Sect. IV-A (the official run_trainer.py default is 12)
    lr: float = 0.0              # 0: 1e-4 with real weights (Sect. IV-A, run_trainer.py), 1e-2 on the defaults
    weight_decay: float = 5e-4   # Adam weight decay of the official trainer.py
    n_layers: int = 0            # controlled conv layers, Supp. A: 0 = 12, or every conv layer of a smaller generator
    truncation: float = -1.0     # -1: trainer.py's 0.7 (1 on the synthetic head world)
    lambda_x: float = sm.LAMBDA_X    # run_trainer.py lambda_shape (shape, eye and mouth terms)
    lambda_id: float = sm.LAMBDA_ID  # run_trainer.py lambda_identity
    eye: bool = True             # official eye-opening term (--no-eye to drop it)
    mouth: bool = True           # official mouth-opening term (--no-mouth to drop it)
    cycle: bool = True           # recurrent cycle loss, Eq. 4-7 (--no-cycle: the Table V ablation)
    paper_id: bool = False       # add Eq. 7's third identity term (I_r1, I_r2), absent from the code
    space: str = "S"             # S: style space; W: mix W+ codes instead (Table III ablation)
    mask: str = "per-layer"      # per-layer networks or one global network (Table IV ablation)
    seed: int = 0                # initialisation and pair sampling
    generator: str = ""          # converted weights; empty: weights/<name>.safetensors, else tiny
    arcface: str = ""
    deca: str = ""
    flame: str = ""
    out: str = "runs/stylemask"  # checkpoints, logs and grids
    resume: str = ""             # a checkpoint.safetensors to continue from (its folder, its flags)
    overwrite: bool = False      # replace the results already in --out
    save_every: int = 0          # 0: 1000 with real weights (run_trainer.py), 100 on the defaults
    log_every: int = 10          # run_trainer.py steps_per_log
    image_every: int = 0         # grid of held-out pairs every K steps; 0: same as save_every
    eval_pairs: int = 8          # held-out pairs for the evaluation loss and the grid


HELP = dict(
    steps="training iterations (0: 70000 on real weights, 250 on the synthetic head world, 200 on the tiny defaults)",
    batch="pairs per step (paper: 6)",
    lr="Adam learning rate (0: the paper's 1e-4 on real weights; 1e-2 on the synthetic head world and the tiny defaults, whose 200-step run "
       "must move the masks visibly: Adam moves each weight by about lr per step)",
    weight_decay="Adam weight decay (official trainer: 5e-4)", n_layers="controlled conv layers n (0: the paper's 12, or all of a generator with fewer)",
    truncation="truncation psi of the sampled latents " + cli.TRUNCATION_HELP,
    lambda_x="weight of the shape, eye and mouth terms (official: 1)", lambda_id="weight of the identity terms (official: 10)",
    eye="official eye-opening landmark term", mouth="official mouth-opening landmark term",
    cycle="recurrent cycle consistency loss, Eq. 4-7 (--no-cycle: Table V ablation)",
    paper_id="also the (I_r1, I_r2) identity term of Eq. 7, which the official code omits",
    space="S: mix style codes (paper); W: mix W+ codes (Table III ablation)",
    mask="per-layer mask networks (paper) or one global network (Table IV ablation)", seed="random seed",
    generator="generator .safetensors", arcface="ArcFace IR-SE50 .safetensors", deca="DECA encoder .safetensors",
    flame="FLAME .safetensors", out="output folder (must not hold results, unless --overwrite)",  # train: in place
    resume="checkpoint to resume from: continues its run in its folder with its flags (--steps may grow)",
    overwrite="replace the results of an earlier run in --out",
    save_every="checkpoint every K steps (0: 1000 real, 100 tiny)", log_every="log line every K steps",
    image_every="image grid every K steps (0: with every checkpoint)", eval_pairs="held-out pairs (loss and grid)",
)


# The synthetic head world's masks (python -m world.build trains them so): a step there takes about 3 s on 2
# cores, so 250 steps keep `python train.py` within 15 minutes; lr 1e-2 as on the tiny defaults, for a short run.
WORLD_STEPS, WORLD_LR = 250, 1e-2

# Flags a resumed run may change; every other one is the checkpoint's (giving a different value is an error).
RESUME_MAY_CHANGE = ("steps", "save_every", "log_every", "image_every", "out", "resume", "overwrite")
ZERO_MEANS_DEFAULT = ("steps", "lr", "save_every", "image_every", "n_layers", "truncation")  # 0 (-1) = default


def parse_args(argv=None, given=None):
    """The Config of this command line, every flag checked (given receives the flags set explicitly)."""
    cfg = cli.parse_config(Config, HELP, argv, description=__doc__, given=given,
                           choices={"space": ["S", "W"], "mask": ["per-layer", "global"]})
    cli.check_flags(cfg, steps=cli.at_least(0, " (0: the default)"), batch=cli.at_least(1),
                    lr=cli.finite(0, note=" (0: the default)"), weight_decay=cli.finite(0),
                    n_layers=cli.at_least(0, " (0: the default)"), truncation=cli.truncation_rule(),
                    lambda_x=cli.finite(0), lambda_id=cli.finite(0), seed=cli.at_least(0),
                    save_every=cli.at_least(0, " (0: the default)"), log_every=cli.at_least(1),
                    image_every=cli.at_least(0, " (0: with every checkpoint)"), eval_pairs=cli.at_least(1))
    return cfg


def resumed_config(cfg, given):
    """The config of the run a --resume continues: the checkpoint's flags, its folder as --out, and only the
    flags of RESUME_MAY_CHANGE taken from the command line; any other flag must agree with the checkpoint."""
    path = Path(cfg.resume)
    stored = json.loads(weights.header(path, "checkpoint").get("config", "null") or "null")
    if not isinstance(stored, dict):
        raise sm.StyleMaskError(f"{path}: the checkpoint stores no run config; it was not written by train.py")
    for name in sorted(given - set(RESUME_MAY_CHANGE)):
        if name in ZERO_MEANS_DEFAULT and getattr(cfg, name) == (-1 if name == "truncation" else 0):
            continue  # "the default": the run's own value
        if name in stored and getattr(cfg, name) != stored[name]:
            flag = "--" + name.replace("_", "-")
            raise sm.StyleMaskError(f"{flag} {getattr(cfg, name)!r} contradicts the run being resumed ({flag} "
                                    f"{stored[name]!r}, from {path}): drop it, or start a new run in another --out")
    kept = {k: v for k, v in stored.items() if k in {f.name for f in dataclasses.fields(Config)}}
    new = Config(**{**kept, **{k: getattr(cfg, k) for k in RESUME_MAY_CHANGE if k in given}, "resume": cfg.resume})
    if "out" not in given:
        new.out = str(path.parent)
    return new


# --- Codes, images and supervision ----------------------------------------------------------------

def render(G, code, cfg):
    """A code the mask mixes (`sm.code`) -> image pooled to 256×256, as the official trainer feeds the supervision networks."""
    return cli.pooled(sm.synthesis(G, sm.code_to_s(G, code, cfg.space)))


def supervise(A, deca, Fl, img):
    """What the losses need of an image: DECA parameters, the posed shape and landmarks, ArcFace features."""
    p = fn.deca_params(deca, img)
    X, l = sm.shape_and_landmarks(Fl, p["shape"], p["exp"], p["pose"])
    return dict(p=p, X=X, l=l, f=fn.identity(A, img))


def pair_loss(nets, M, cfg, src, tgt, tgt2=None):
    """Eq. 8 for one batch: src/tgt/tgt2 carry code, image and supervision (no gradient) -> (L, terms)."""
    G, A, deca, Fl = nets
    kw = dict(lambda_x=cfg.lambda_x, lambda_id=cfg.lambda_id, eye=cfg.eye, mouth=cfg.mouth)
    code_r = sm.reenact(src["code"], tgt["code"], M)
    r = supervise(A, deca, Fl, render(G, code_r, cfg))
    X_gt, l_gt = sm.ground_truth_shape(Fl, src["p"], tgt["p"])
    L_r, terms = sm.loss_r(X_gt, r["X"], l_gt, r["l"], r["f"], src["f"], **kw)
    L_cycle = None
    if tgt2 is not None:  # Eq. 4: reenact the source and the reenacted code with the second target
        r1 = supervise(A, deca, Fl, render(G, sm.reenact(src["code"], tgt2["code"], M), cfg))
        r2 = supervise(A, deca, Fl, render(G, sm.reenact(code_r, tgt2["code"], M), cfg))
        X_gt2, l_gt2 = sm.ground_truth_shape(Fl, src["p"], tgt2["p"])
        L_cycle, cyc = sm.loss_cycle(X_gt2, r1["X"], r2["X"], l_gt2, r1["l"], r2["l"], src["f"], r1["f"], r2["f"],
                                     paper_id=cfg.paper_id, **kw)
        terms.update({f"cycle_{k}": v for k, v in cyc.items()})
    return sm.loss_total(L_r, L_cycle), terms


@torch.no_grad()
def sample(nets, cfg, z):
    """Codes, images and supervision of latents z, without gradients (the frozen part of a step)."""
    G, A, deca, Fl = nets
    code = sm.code(G, sm.mapping(G, z, truncation=cfg.truncation), cfg.space)
    img = render(G, code, cfg)
    return dict(code=code, img=img, **supervise(A, deca, Fl, img))


def draw_latents(gen, cfg, z_dim, device):
    """Source, target and second-target latents of one step, from the run's own generator."""
    n = 3 if cfg.cycle else 2
    z = torch.randn(n, cfg.batch, z_dim, generator=gen).to(device)
    return z[0], z[1], (z[2] if cfg.cycle else None)


@torch.no_grad()
def evaluate(nets, M, cfg, held_out):
    """Mean Eq. 8 loss over the held-out pairs."""
    src, tgt, tgt2 = held_out
    return float(pair_loss(nets, M, cfg, src, tgt, tgt2)[0])


# --- Checkpoints: mask weights, Adam state, step and RNG in one safetensors file -----------------------

def save_checkpoint(out, M, opt, step, gen, cfg):
    """Atomically write checkpoint.safetensors (everything to resume) and masknet.safetensors (weights)."""
    state = {f"train.adam.{name}.{k}": v for name, p in M.params.items()
             for k, v in opt.state.get(p, {}).items()}
    state["train.step"] = torch.tensor(step)
    state["train.rng"] = gen.get_state()
    weights.save((M, state), out / "checkpoint.safetensors", "checkpoint", config=json.dumps(dataclasses.asdict(cfg)),
                 step=step)
    weights.save(M, out / "masknet.safetensors", "masknet", step=step)


def load_checkpoint(path, M, opt, gen):
    """Restore mask weights (in place), Adam moments, the step and the sampling RNG; returns the step."""
    saved, state = weights.read(path, "checkpoint")
    ck = {**saved.params, **state}
    if "train.step" not in ck or "train.rng" not in ck:
        raise sm.StyleMaskError(f"{path}: mask weights only, no training state: pass a checkpoint.safetensors")
    if (saved.kind, saved.space) != (M.kind, M.space):
        raise sm.StyleMaskError(f"{path}: holds {saved.kind} masks in {saved.space}, this run trains {M.kind} masks "
                                f"in {M.space}: same --space and --mask needed")
    for name, p in M.params.items():
        if name not in ck or ck[name].shape != p.shape:
            raise sm.StyleMaskError(f"{path}: does not match this run's mask networks ({name}); same --space, "
                                    f"--mask, --n-layers and generator needed")
        with torch.no_grad():
            p.copy_(ck[name])
        moments = {k: ck[f"train.adam.{name}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")
                   if f"train.adam.{name}.{k}" in ck}
        if moments:
            opt.state[p] = {k: v.to(p.device) if k != "step" else v for k, v in moments.items()}
    gen.set_state(ck["train.rng"])
    return int(ck["train.step"])


def trim_log(log_path, step):
    """Drop log lines written after the checkpoint we resume from (a killed run's lost steps)."""
    if log_path.is_file():
        keep = [line for line in log_path.read_text().splitlines() if _logged_step(line) <= step]
        cli.write_text(log_path, "".join(l + "\n" for l in keep))


def _logged_step(line):
    """The step of a log line; a line cut short by a kill (or not JSON) counts as after every checkpoint."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, TypeError, AttributeError):
        return 1 << 62


def save_grid(path, G, M, cfg, held_out, n=4):
    """source | target | reenacted for the first n held-out pairs."""
    src, tgt, _ = held_out
    with torch.no_grad():
        rec = render(G, sm.reenact(src["code"][:n], tgt["code"][:n], M), cfg)
    cli.write_png(path, cli.image_grid([src["img"][:n], tgt["img"][:n], rec], titles=["source", "target", "reenacted"]))


def load_nets(cfg, say=print):
    """((G, A, deca, Fl), tiny): generator, ArcFace, DECA encoder and FLAME by weights' one default rule."""
    nets, defaulted = weights.load_all(["generator", "arcface", "deca", "flame"], say=say, generator=cfg.generator,
                                       arcface=cfg.arcface, deca=cfg.deca, flame=cfg.flame)
    return tuple(nets.values()), "generator" in defaulted


def resolve(cfg, G, tiny):
    """Fill in, in place, the flags whose default depends on the networks (0, or -1 for --truncation): real
    weights, the synthetic head world or the tiny defaults (tiny: an embedded default). -> on the world?"""
    world = tiny and weights.embedded() == "world"
    cfg.truncation = cli.truncation(cfg.truncation, world)
    cfg.steps = cfg.steps or (WORLD_STEPS if world else 200 if tiny else 70000)
    cfg.lr = cfg.lr or (WORLD_LR if world else 1e-2 if tiny else 1e-4)
    cfg.save_every = cfg.save_every or (100 if tiny else 1000)
    cfg.image_every = cfg.image_every or cfg.save_every
    cfg.n_layers = cfg.n_layers or min(12, sm.n_conv_layers(sm.architecture(G)))
    return world


# --- The loop --------------------------------------------------------------------------------------

class Stop:
    """SIGINT / SIGTERM during training: remembered, acted on between steps (a step is never cut in half)."""

    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        self.signal = signum


def main(argv=None):
    given = set()
    cfg = parse_args(argv, given)
    if cfg.resume:
        cfg = resumed_config(cfg, given)
    out = Path(cfg.out)
    continuing = bool(cfg.resume) and out.resolve() == Path(cfg.resume).resolve().parent
    if continuing and cfg.overwrite:
        raise sm.StyleMaskError("--overwrite with --resume: a resumed run continues its own folder; drop --overwrite "
                                "(or pass --out elsewhere to start a branch of the run there)")
    if not continuing:
        cli.check_out(out, cfg.overwrite, "train.py", resume_hint=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(cfg.seed)
    nets, tiny = load_nets(cfg)
    nets = tuple(cli.to_device(P, device) for P in nets)
    G = nets[0]
    world = resolve(cfg, G, tiny)
    origin = " (the synthetic head world)" if world else " (TINY defaults)" if tiny else ""

    M = cli.to_device(sm.init_mask(G, cfg.n_layers, seed=cfg.seed, kind=cfg.mask, space=cfg.space), device)
    for p in M.params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(M.params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = load_checkpoint(cfg.resume, M, opt, gen) if cfg.resume else 0
    if step >= cfg.steps:
        raise sm.StyleMaskError(f"{cfg.resume} is at step {step}, --steps is {cfg.steps}: pass a larger --steps "
                                f"to train further")
    z_dim = G["style.1.weight"].shape[1]
    held_gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)  # held-out pairs, never trained on
    held_z = torch.randn(3, cfg.eval_pairs, z_dim, generator=held_gen).to(device)
    held_out = tuple(sample(nets, cfg, z) for z in held_z)
    if not cfg.cycle:
        held_out = held_out[:2] + (None,)

    # Everything is checked and loaded: only now is --out touched, and only under its lock.
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise sm.StyleMaskError(f"--out {out}: cannot create it ({e.strerror}); choose another --out") from None
    stop = Stop()
    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with cli.lock(out, "another train.py"):
            cli.clean_stale(out)
            aside = None
            if not continuing:
                cli.check_out(out, cfg.overwrite, "train.py", resume_hint=True)  # again: another run may have ended here
                aside = set_aside(out)  # --overwrite: the old run waits beside until this one's first checkpoint
            cli.mark(out, "train.py")
            if cfg.resume:
                trim_log(out / "log.jsonl", step)
                print(f"resumed from {cfg.resume} at step {step}")
            cli.write_text(out / "config.json", json.dumps(dict(dataclasses.asdict(cfg), tiny_default=tiny), indent=2)
                           + "\n")
            print(f"training {cfg.mask} masks in {cfg.space} over {cfg.n_layers} layers, batch {cfg.batch}, "
                  f"steps {step}..{cfg.steps} on {device}{origin}; writing to {out}")
            try:
                return loop(cfg, nets, M, opt, gen, held_out, step, out, stop,
                            on_checkpoint=lambda: aside and shutil.rmtree(aside, ignore_errors=True))
            except BaseException:
                if aside and aside.exists():  # no checkpoint of this run yet: the old run comes back
                    restore(aside, out)
                raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def set_aside(out):
    """Move the files of an earlier run in out (--overwrite) into a hidden sibling folder; None if none."""
    old = [p for p in out.iterdir() if p.name not in (".lock", cli.MARK)]
    if not old:
        return None
    aside = out.parent / f".{out.name}.old{os.getpid()}"
    aside.mkdir()
    for p in old:
        os.rename(p, aside / p.name)
    return aside


def restore(aside, out):
    """Undo set_aside: this run's files go, the earlier run's come back."""
    for p in out.iterdir():
        if p.name not in (".lock", cli.MARK):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for p in aside.iterdir():
        os.rename(p, out / p.name)
    aside.rmdir()


def loop(cfg, nets, M, opt, gen, held_out, step, out, stop, on_checkpoint=lambda: None):
    """Steps step..cfg.steps: Eq. 8 on fresh pairs, logs, grids and checkpoints; a signal saves and stops."""
    G, z_dim, device = nets[0], nets[0]["style.1.weight"].shape[1], nets[0]["style.1.weight"].device
    running, t0 = {}, time.time()
    bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="train", unit="step", dynamic_ncols=True)
    for step in bar:
        z_s, z_t, z_t2 = draw_latents(gen, cfg, z_dim, device)
        src, tgt = sample(nets, cfg, z_s), sample(nets, cfg, z_t)
        tgt2 = sample(nets, cfg, z_t2) if cfg.cycle else None
        loss, terms = pair_loss(nets, M, cfg, src, tgt, tgt2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        vals = {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}
        if not all(map(math.isfinite, vals.values())):
            raise sm.StyleMaskError(f"step {step + 1}: the loss is not finite ({vals['loss']}); lower --lr, or "
                                    f"--resume from the last checkpoint")
        running = {k: 0.9 * running.get(k, v) + 0.1 * v for k, v in vals.items()}
        bar.set_postfix(loss=f"{running['loss']:.3f}", shape=f"{running['shape']:.3f}", id=f"{running['id']:.3f}")
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            rec = {"step": done, **{k: round(v, 6) for k, v in vals.items()},
                   "ms_per_step": round(1000 * (time.time() - t0) / cfg.log_every, 1)}
            if done % cfg.save_every == 0 or done == cfg.steps:
                rec["held_out_loss"] = round(evaluate(nets, M, cfg, held_out), 6)
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            t0 = time.time()
        if done % cfg.image_every == 0 or done == cfg.steps:
            save_grid(out / f"grid_{done:06d}.png", G, M, cfg, held_out)
        if done % cfg.save_every == 0 or done == cfg.steps or stop.signal:
            save_checkpoint(out, M, opt, done, gen, cfg)
            on_checkpoint()
        if stop.signal:
            bar.close()
            name = signal.Signals(stop.signal).name
            print(f"stopped by {name} at step {done}: checkpoint saved; continue with "
                  f"python train.py --resume {out / 'checkpoint.safetensors'}", file=sys.stderr)
            return 128 + stop.signal
    bar.close()
    print(f"done: {out / 'masknet.safetensors'} (held-out loss {evaluate(nets, M, cfg, held_out):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_script(main))
