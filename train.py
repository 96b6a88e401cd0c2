"""Train StyleMask's mask networks on random generated pairs (Sect. III-B, IV-A).

    python train.py                                    # no weights: the embedded default (below)
    python train.py --out runs/paper                   # converted weights in weights/: the paper's setup
    python train.py --resume runs/paper/checkpoint.safetensors   # continue exactly where it stopped, in runs/paper

Each step samples source, target and (for the cycle loss) a second target latent, maps them with
truncation 0.7 (1 on the world), renders them and estimates their 3DMM parameters (no gradients), reenacts with the
mask networks, renders the reenacted images, and minimises Eq. 8 (L_r + L_cycle, with the official
eye and mouth terms). Without converted weights every network is the embedded default, and the run says
so: the synthetic head world's (weights/world/, once built by python build_world.py: it learns the world's
masks, not faces), else the tiny random networks (a pipeline check). See weights/README.md for real weights.
"""
# The training loop and its bookkeeping only: the math is stylemask's (Eq. 1-8), the networks and their
# files are weights', the command line and image writing cli's.
import dataclasses
import json
import math
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
from cli import flag


@dataclass
class Config:
    steps: int = flag(0, "training iterations (0: by the networks' origin: 70000 on real weights, Sect. IV-A; "
                         "the synthetic head world's, in weights/world/manifest.json; 200 on the tiny defaults)")
    batch: int = flag(6, "pairs per step (Sect. IV-A; the official run_trainer.py default is 12)")
    lr: float = flag(0.0, "Adam learning rate (0: by the networks' origin: the paper's 1e-4 on real weights, Sect. IV-A "
                          "and run_trainer.py; the synthetic head world's, in weights/world/manifest.json; 1e-2 on the "
                          "tiny defaults, whose short runs must move the masks visibly: Adam moves each weight by about "
                          "lr per step)")
    weight_decay: float = flag(5e-4, "Adam weight decay (the official trainer.py)")
    n_layers: int = flag(0, "controlled conv layers n (0: the paper's 12, Supp. A, or all of a generator with fewer)")
    truncation: float = flag(-1.0, "truncation psi of the sampled latents " + cli.TRUNCATION_HELP)
    lambda_x: float = flag(sm.LAMBDA_X, "weight of the shape, eye and mouth terms (run_trainer.py lambda_shape: 1)")
    lambda_id: float = flag(sm.LAMBDA_ID, "weight of the identity terms (run_trainer.py lambda_identity: 10)")
    eye: bool = flag(True, "the official eye-opening landmark term")
    mouth: bool = flag(True, "the official mouth-opening landmark term")
    cycle: bool = flag(True, "recurrent cycle consistency loss, Eq. 4-7 (--no-cycle: the Table V ablation)")
    paper_id: bool = flag(False, "also the (I_r1, I_r2) identity term of Eq. 7, which the official code omits")
    space: str = flag("S", "S: mix style codes (paper); W: mix W+ codes (the Table III ablation)")
    mask: str = flag("per-layer", "per-layer mask networks (paper) or one global network (the Table IV ablation)")
    seed: int = flag(0, "random seed: initialisation and pair sampling")
    generator: str = weights.path_flag("generator")
    arcface: str = weights.path_flag("arcface")
    deca: str = weights.path_flag("deca")
    flame: str = weights.path_flag("flame")
    out: str = flag("runs/stylemask", "output folder: checkpoints, logs and grids (must not hold results, unless "
                                   "--overwrite)")
    resume: str = flag("", "checkpoint to resume from: continues its run in its folder with its flags (--steps may grow)")
    overwrite: bool = flag(False, "replace the results of an earlier run in --out")
    save_every: int = flag(0, "checkpoint every K steps (0: by the networks' origin: 1000 on real weights, "
                              "run_trainer.py; the synthetic head world's, in weights/world/manifest.json; 100 on the "
                              "tiny defaults)")
    log_every: int = flag(10, "log line every K steps (run_trainer.py steps_per_log)")
    image_every: int = flag(0, "image grid of held-out pairs every K steps (0: with every checkpoint)")
    eval_pairs: int = flag(8, "held-out pairs for the evaluation loss and the grid")


# Flags a resumed run may change; every other one is the checkpoint's (giving a different value is an error).
RESUME_MAY_CHANGE = ("steps", "save_every", "log_every", "image_every", "out", "resume", "overwrite")
ZERO_MEANS_DEFAULT = ("steps", "lr", "save_every", "image_every", "n_layers", "truncation")  # 0 (-1) = default


def parse_args(argv=None, given=None):
    """The Config of this command line, every flag checked (given receives the flags set explicitly)."""
    cfg = cli.parse_config(Config, argv, description=__doc__, given=given,
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


# --- Codes, images and what the losses read from them -------------------------------------------------

def render(G, code, cfg):
    """A code the mask mixes (`sm.code`) -> image pooled to 256×256, as the official trainer feeds the supervision networks."""
    return cli.pooled(sm.synthesis(G, sm.code_to_s(G, code, cfg.space)))


def loss_inputs(A, deca, Fl, img):
    """What the losses read from an image: DECA parameters, the posed shape and landmarks, ArcFace features."""
    p = fn.deca_params(deca, img)
    X, l = sm.shape_and_landmarks(Fl, p["shape"], p["exp"], p["pose"])
    return dict(p=p, X=X, l=l, f=fn.identity(A, img))


def pair_loss(nets, M, cfg, src, tgt, tgt2=None):
    """Eq. 8 for one batch: src/tgt/tgt2 carry code, image and loss inputs (no gradient) -> (L, terms)."""
    G, A, deca, Fl = nets
    kw = dict(lambda_x=cfg.lambda_x, lambda_id=cfg.lambda_id, eye=cfg.eye, mouth=cfg.mouth)
    code_r = sm.reenact(src["code"], tgt["code"], M)
    r = loss_inputs(A, deca, Fl, render(G, code_r, cfg))
    X_gt, l_gt = sm.ground_truth_shape(Fl, src["p"], tgt["p"])
    L_r, terms = sm.loss_r(X_gt, r["X"], l_gt, r["l"], r["f"], src["f"], **kw)
    L_cycle = None
    if tgt2 is not None:  # Eq. 4-7: the source and the reenacted code, each reenacted with the second target
        r1, r2 = (loss_inputs(A, deca, Fl, render(G, c, cfg)) for c in sm.cycle(M, src["code"], code_r, tgt2["code"]))
        X_gt2, l_gt2 = sm.ground_truth_shape(Fl, src["p"], tgt2["p"])
        L_cycle, cyc = sm.loss_cycle(X_gt2, r1["X"], r2["X"], l_gt2, r1["l"], r2["l"], src["f"], r1["f"], r2["f"],
                                     paper_id=cfg.paper_id, **kw)
        terms.update({f"cycle_{k}": v for k, v in cyc.items()})
    return sm.loss_total(L_r, L_cycle), terms


@torch.no_grad()
def sample(nets, cfg, z):
    """Codes, images and loss inputs of latents z, without gradients (the frozen part of a step)."""
    G, A, deca, Fl = nets
    code = sm.code(G, sm.mapping(G, z, truncation=cfg.truncation), cfg.space)
    img = render(G, code, cfg)
    return dict(code=code, img=img, **loss_inputs(A, deca, Fl, img))


def draw_latents(gen, n, batch, z_dim, device):
    """n sets of batch latents (n, batch, z_dim) from a seeded generator: a step's source, target and second
    target, or the held-out pairs."""
    return torch.randn(n, batch, z_dim, generator=gen).to(device)


@torch.no_grad()
def evaluate(nets, M, cfg, held_out):
    """Mean Eq. 8 loss over the held-out pairs."""
    src, tgt, tgt2 = held_out
    return float(pair_loss(nets, M, cfg, src, tgt, tgt2)[0])


# --- Checkpoints: mask weights, Adam state, step and RNG in one safetensors file -----------------------

def save_checkpoint(out, M, opt, step, gen, cfg):
    """Atomically write checkpoint.safetensors (everything to resume) and masknet.safetensors (weights)."""
    state = {**weights.adam_state(opt, M.params), "train.step": torch.tensor(step), "train.rng": gen.get_state()}
    weights.save((M, state), out / "checkpoint.safetensors", "checkpoint", config=json.dumps(dataclasses.asdict(cfg)),
                 step=step)
    weights.save(M, out / "masknet.safetensors", "masknet", step=step)


def load_checkpoint(path, M, opt, gen):
    """Restore mask weights (in place), Adam moments, the step and the sampling RNG; returns the step."""
    saved, state = weights.read(path, "checkpoint")
    if "train.step" not in state or "train.rng" not in state:
        raise sm.StyleMaskError(f"{path}: mask weights only, no training state: pass a checkpoint.safetensors")
    if (saved.kind, saved.space) != (M.kind, M.space):
        raise sm.StyleMaskError(f"{path}: holds {saved.kind} masks in {saved.space}, this run trains {M.kind} masks "
                                f"in {M.space}: same --space and --mask needed")
    for name, p in M.params.items():
        if name not in saved.params or saved.params[name].shape != p.shape:
            raise sm.StyleMaskError(f"{path}: does not match this run's mask networks ({name}); same --space, "
                                    f"--mask, --n-layers and generator needed")
        with torch.no_grad():
            p.copy_(saved.params[name])
    weights.restore_adam(opt, M.params, state, path)
    gen.set_state(state["train.rng"])
    return int(state["train.step"])


def save_grid(path, G, M, cfg, held_out, n=4):
    """source | target | reenacted for the first n held-out pairs."""
    src, tgt, _ = held_out
    with torch.no_grad():
        rec = render(G, sm.reenact(src["code"][:n], tgt["code"][:n], M), cfg)
    cli.write_png(path, cli.image_grid([src["img"][:n], tgt["img"][:n], rec], titles=["source", "target", "reenacted"]))


def load_nets(cfg, say=print):
    """((G, A, deca, Fl), weights.Origin): generator, ArcFace, DECA encoder and FLAME by weights' one default rule."""
    nets, origin = weights.load_all(["generator", "arcface", "deca", "flame"], say=say, generator=cfg.generator,
                                    arcface=cfg.arcface, deca=cfg.deca, flame=cfg.flame)
    return tuple(nets.values()), origin


def resolve(cfg, G, origin):
    """Fill in, in place, the flags whose default depends on the networks (0, or -1 for --truncation): the
    run defaults of their origin (`weights.Origin`: real weights, the synthetic head world or the tiny defaults)."""
    d = origin.defaults
    cfg.truncation = origin.truncation(cfg.truncation)
    cfg.steps = cfg.steps or d["train_steps"]
    cfg.lr = cfg.lr or d["train_lr"]
    cfg.save_every = cfg.save_every or d["save_every"]
    cfg.image_every = cfg.image_every or cfg.save_every
    cfg.n_layers = cfg.n_layers or min(12, sm.n_conv_layers(sm.architecture(G)))


# --- The loop --------------------------------------------------------------------------------------

ORIGIN_SAID = {"world": " (the synthetic head world)", "tiny": " (TINY defaults)", "converted": ""}


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
    nets, origin = load_nets(cfg)
    nets = tuple(cli.to_device(P, device) for P in nets)
    G = nets[0]
    resolve(cfg, G, origin)

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
    held_out = tuple(sample(nets, cfg, z) for z in draw_latents(held_gen, 3, cfg.eval_pairs, z_dim, device))
    if not cfg.cycle:
        held_out = held_out[:2] + (None,)

    # Everything is checked and loaded: only now is --out touched, and only under its lock.
    with cli.stop_between_steps() as stop, \
            cli.in_place(out, "train.py", cfg.overwrite, continuing, resume_hint=True) as keep:
        if cfg.resume:
            cli.trim_log(out / "log.jsonl", step)
            print(f"resumed from {cfg.resume} at step {step}")
        cli.write_text(out / "config.json", json.dumps(dict(dataclasses.asdict(cfg), origin=origin.name), indent=2)
                       + "\n")
        print(f"training {cfg.mask} masks in {cfg.space} over {cfg.n_layers} layers, batch {cfg.batch}, "
              f"steps {step}..{cfg.steps} on {device}{ORIGIN_SAID[origin.name]}; writing to {out}")
        return loop(cfg, nets, M, opt, gen, held_out, step, out, stop, on_checkpoint=keep)


def log(out, rec):
    """Append one record to the run's JSONL log."""
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def loop(cfg, nets, M, opt, gen, held_out, step, out, stop, on_checkpoint=lambda: None):
    """Steps step..cfg.steps: Eq. 8 on fresh pairs, logs, grids and checkpoints; a signal saves and stops."""
    G, z_dim, device = nets[0], nets[0]["style.1.weight"].shape[1], nets[0]["style.1.weight"].device
    if step == 0:  # the untrained masks' held-out loss: what training lowers
        log(out, {"step": 0, "held_out_loss": round(evaluate(nets, M, cfg, held_out), 6)})
    running, t0 = {}, time.time()
    bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="train", unit="step", dynamic_ncols=True)
    for step in bar:
        z = draw_latents(gen, 3 if cfg.cycle else 2, cfg.batch, z_dim, device)  # source, target, second target
        src, tgt = sample(nets, cfg, z[0]), sample(nets, cfg, z[1])
        tgt2 = sample(nets, cfg, z[2]) if cfg.cycle else None
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
            log(out, rec)
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
