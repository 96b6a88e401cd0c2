"""Evaluate face reenactment on random generated pairs: the paper's metrics (Sect. IV-B, Tables I, III-V).

    python eval.py                                      # no weights: the embedded default (below), minutes
    python eval.py --pairs 5000                         # converted weights in weights/: Table I's protocol
    python eval.py --pairs 2000 --global-mask runs/global/masknet.safetensors --w-mask runs/w/masknet.safetensors

For N seeded source/target pairs (independent latents, truncation 0.7) every method reenacts the same
pairs, and one table reports per method:
  CSIM    ArcFace cosine similarity between source and reenacted images (higher is better);
  Pose    mean |Δ| of yaw, pitch, roll between reenacted and target, degrees (DECA);
  Expr.   mean |Δ| of the 50 expression coefficients between reenacted and target (DECA), and
  Expr.n  the official normalised form: jaw opening and the first 20 coefficients scaled by their
          ranges over generated images (utils_inference.calculate_evaluation_metrics);
  NME     mean distance of the reenacted image's 68 3-D landmarks to the ground truth of Eq. 2 (source
          shape, target expression and pose), over the ground truth's outer-eye-corner distance (36-45);
  FID     of the reenacted images against the generated sources and targets (pytorch-fid's Inception).
Rows "source" (no reenactment) and "target" (the target image itself) need no training and bound
every metric. Without converted weights the networks are the embedded default: the synthetic head world
(weights/world/, once built by python build_world.py; truncation 1, 64 pairs, and a second table of
errors against every head's true parameters), else the tiny random networks (a pipeline check).
Outputs in --out: a markdown table (also printed), results.json, grid.png.
"""
# The evaluation protocol and its metrics only: the model is stylemask's, the networks and their files
# weights', the command line and image writing cli's.
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
import facenets as fn
import fid
import stylemask as sm
import weights
from cli import flag, pooled


@dataclass
class Config:
    pairs: int = flag(0, "number of random source/target pairs (0: by the networks' origin: 5000 on real weights, "
                         "Table I, whose ablations use 2000; the synthetic head world's, in "
                         "weights/world/manifest.json; 32 tiny)")
    seed: int = flag(0, "random seed of the pairs")
    truncation: float = flag(-1.0, "truncation psi " + cli.TRUNCATION_HELP)
    batch: int = flag(0, "pairs per forward pass (0: 16 on a GPU, 8 on a CPU)")
    generator: str = weights.path_flag("generator")
    mask: str = weights.path_flag("masknet")
    global_mask: str = flag("", "also evaluate this global-mask checkpoint (Table IV)")
    no_cycle_mask: str = flag("", "also evaluate this checkpoint trained without the cycle loss (Table V)")
    w_mask: str = flag("", "also evaluate this W+-space checkpoint (Table III)")
    arcface: str = weights.path_flag("arcface")
    deca: str = weights.path_flag("deca")
    flame: str = weights.path_flag("flame")
    inception: str = flag("", "FID Inception .safetensors (empty: weights/inception.safetensors; absent: the FID "
                              "column says so)")
    ranges: str = flag("", "expression ranges JSON (empty: weights/expression_ranges.json with converted weights, "
                           "else computed from generated images and saved in --out)")
    range_samples: int = flag(0, "generated images for the expression ranges (0: by origin: 2000 real, as "
                                 "extract_statistics.py; the world's, in manifest.json; 64 tiny)")
    grid_pairs: int = flag(4, "pairs shown in grid.png")
    size: int = flag(256, "grid cell size in pixels (the official code shows 256; 0: full resolution)")
    out: str = flag("out/eval", cli.OUT_HELP)
    overwrite: bool = flag(False, cli.OVERWRITE_HELP)


def parse_args(argv=None):
    """The Config of this command line, every flag checked."""
    cfg = cli.parse_config(Config, argv, description=__doc__)
    cli.check_flags(cfg, pairs=cli.at_least(0, " (0: the default)"), seed=cli.at_least(0),
                    truncation=cli.truncation_rule(),
                    batch=cli.at_least(0, " (0: the default)"),
                    range_samples=((lambda n: n == 0 or n >= 2), "0 (the default) or >= 2: ranges need two images"),
                    grid_pairs=cli.at_least(1),
                    size=((lambda v: 0 <= v <= 4096), "an integer in [0, 4096] (0: full resolution)"))
    return cfg


# --- Metrics: small pure functions, one per column ------------------------------------------------

def csim(f_r, f_s):
    """CSIM per pair: cosine similarity of ArcFace features (B, 512) -> (B,)."""
    return F.cosine_similarity(f_r, f_s, dim=1, eps=1e-6)


def pose_error(euler_r, euler_t):
    """Pose per pair: mean |Δ| over yaw, pitch, roll in degrees, (B, 3) -> (B,)."""
    return (euler_r - euler_t).abs().mean(1)


def expr_error(exp_r, exp_t):
    """Expr. per pair: mean |Δ| of the expression coefficients (B, 50) -> (B,)."""
    return (exp_r - exp_t).abs().mean(1)


def expr_error_normalized(jaw_r, exp_r, jaw_t, exp_t, ranges):
    """The official normalised Expr.: |Δ| of jaw and exp[:20], each over its range, averaged (B,).

    ranges (54, 2) min/max rows in extract_statistics.py order: yaw, pitch, roll, jaw, exp_0..exp_49.
    """
    lo, hi = ranges[:, 0], ranges[:, 1]
    a = torch.cat([jaw_r[:, None], exp_r[:, :20]], 1)
    b = torch.cat([jaw_t[:, None], exp_t[:, :20]], 1)
    span = hi[3:24] - lo[3:24]
    return ((a - lo[3:24]) / span - (b - lo[3:24]) / span).abs().mean(1)


def nme(l_r, l_gt):
    """NME per pair: mean landmark distance over the ground truth's outer-eye-corner distance (36, 45)."""
    iod = (l_gt[:, 36] - l_gt[:, 45]).norm(dim=-1)
    return (l_r - l_gt).norm(dim=-1).mean(1) / iod


# --- Networks, pairs and supervision ------------------------------------------------------------

def load_nets(cfg, say=print):
    """(nets, weights.Origin): generator, ArcFace, DECA, FLAME, the mask networks of every method and FID's
    Inception, all by weights' one default rule ({method name: mask} under "masks")."""
    nets, origin = weights.load_all(["generator", "arcface", "deca", "flame", "masknet", "inception"], say=say,
                                    generator=cfg.generator, arcface=cfg.arcface, deca=cfg.deca, flame=cfg.flame,
                                    masknet=cfg.mask, inception=cfg.inception)
    untrained = "masknet" in origin.defaulted and origin.name == "tiny"  # the world's default masks are trained
    masks = {"StyleMask (untrained)" if untrained else "StyleMask": nets.pop("masknet")}
    for name, p in (("global mask", cfg.global_mask), ("w/o cycle loss", cfg.no_cycle_mask), ("W+ space", cfg.w_mask)):
        if p:
            masks[name] = weights.read(p, "masknet")
            weights.check_fits(masks[name], "masknet", nets["generator"], p)
    nets["masks"] = masks
    return nets, origin


def metric_inputs(nets, img):
    """Everything the metrics read from an image: DECA params, Euler angles, ArcFace features, landmarks."""
    A, deca, Fl = nets["arcface"], nets["deca"], nets["flame"]
    p = fn.deca_params(deca, img)
    out = sm.flame(Fl, p["shape"], p["exp"], p["pose"])
    lmk = sm.project(out["landmarks3d"], sm.fixed_camera(img.shape[0], img.dtype, img.device))
    return dict(p=p, f=fn.identity(A, img), l3d=lmk)


def expression_ranges(G, deca, n, seed, batch, truncation):
    """Min/max over n generated images of yaw, pitch, roll, jaw, exp_0..49 (extract_statistics.py) -> (54, 2)."""
    rows = []
    for z in tqdm(latent_batches(torch.Generator().manual_seed(seed), n, G["style.1.weight"].shape[1], batch),
                  total=-(-n // batch), desc="expression ranges", unit="batch", leave=False):
        p = fn.deca_params(deca, image(G, sm.styles(G, sm.mapping(G, z.to(G["style.1.weight"]), truncation))))
        rows.append(torch.cat([p["euler"], p["pose"][:, 3:4], p["exp"]], 1))
    stats = torch.cat(rows).double()
    return torch.stack([stats.min(0).values, stats.max(0).values], 1)  # (54, 2)


def load_ranges(cfg, G, deca, origin, batch, out, say=print):
    """(ranges, where from, the JSON to save or None): by weights' default rule --ranges, else
    weights/expression_ranges.json (converted weights only: they belong to the real generator), else
    computed now, to be saved in --out."""
    path = weights.find("expression_ranges.json", cfg.ranges or None,
                        hint=" (--ranges); eval.py writes expression_ranges.json into --out when --ranges is not given")
    if path and (cfg.ranges or origin.name == "converted"):
        try:
            ranges = torch.tensor(json.loads(path.read_text())["ranges"], dtype=torch.float64)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise sm.StyleMaskError(f"{path}: not an expression-ranges file ({type(e).__name__}); eval.py writes "
                                    f"one (expression_ranges.json) when --ranges is not given") from None
        if ranges.shape != (54, 2) or not torch.isfinite(ranges).all() or not (ranges[:, 1] > ranges[:, 0]).all():
            raise sm.StyleMaskError(f"{path}: expression ranges must be 54 finite (min, max) rows with min < max")
        return ranges, str(path), None
    n = cfg.range_samples or origin.defaults["range_samples"]
    say(f"note: computing the expression ranges from {n} generated images (as extract_statistics.py)")
    ranges = expression_ranges(G, deca, n, cfg.seed + 7919, batch, cfg.truncation)
    labels = ["yaw", "pitch", "roll", "jaw"] + [f"exp_{i:02d}" for i in range(50)]
    record = json.dumps({"samples": n, "truncation": cfg.truncation, "labels": labels, "ranges": ranges.tolist()},
                        indent=1) + "\n"
    return ranges, f"computed from {n} images ({out / 'expression_ranges.json'})", record


# --- The evaluation loop -----------------------------------------------------------------------

def latent_batches(gen, n, z_dim, batch, skip=0):
    """n seeded latents, batch (batch, z_dim) at a time, after skipping `skip` draws of gen: the same numbers as
    one randn(skip + n, z_dim), with memory bounded by the batch (CPU randn is chunk-invariant for chunks of
    16·k values)."""
    for i in range(0, skip, batch):
        torch.randn(min(batch, skip - i), z_dim, generator=gen)
    for i in range(0, n, batch):
        yield torch.randn(min(batch, n - i), z_dim, generator=gen)


def pair_latents(seed, n, z_dim, batch):
    """Two iterators over the source and target latents (batch, z_dim) of n seeded pairs, drawn as
    z_s = randn(n, z_dim), then z_t = randn(n, z_dim) from one generator (the targets' skips the sources')."""
    return (latent_batches(torch.Generator().manual_seed(seed), n, z_dim, batch),
            latent_batches(torch.Generator().manual_seed(seed), n, z_dim, batch, skip=n))


def image(G, s):
    """Style codes (B, D) -> the image (B, 3, 256, 256) every metric network reads (pooled as the official code)."""
    return pooled(sm.synthesis(G, s))


def evaluate(cfg, nets, ranges, grid_pairs, truth=False):
    """Per-method metric sums over the pairs, Inception features for FID, and the grid's images; truth: also
    the errors against the true parameters of the synthetic head world (`truth_errors`)."""
    G, Fl, masks, inception = nets["generator"], nets["flame"], nets["masks"], nets["inception"]
    z_s, z_t = pair_latents(cfg.seed, cfg.pairs, G["style.1.weight"].shape[1], cfg.batch)
    methods = [*masks, "source", "target"]  # the table's rows; the grid shows source | target | methods
    sums = {m: dict(csim=0.0, pose=0.0, expr=0.0, expr_norm=0.0, nme=0.0, **(TRUTH_ZERO if truth else {}))
            for m in methods}
    feats = {m: [] for m in methods + ["reference"]}
    grid = {m: [] for m in ["source", "target", *masks]}
    for zs, zt in tqdm(zip(z_s, z_t), total=-(-cfg.pairs // cfg.batch), desc="evaluating", unit="batch"):
        zs, zt = zs.to(G["style.1.weight"]), zt.to(G["style.1.weight"])
        w_s, w_t = sm.mapping(G, zs, cfg.truncation), sm.mapping(G, zt, cfg.truncation)
        s_s, s_t = sm.styles(G, w_s), sm.styles(G, w_t)
        img_s, img_t = image(G, s_s), image(G, s_t)
        sup_s, sup_t = metric_inputs(nets, img_s), metric_inputs(nets, img_t)
        p_gt = sm.flame(Fl, sup_s["p"]["shape"], sup_t["p"]["exp"], sup_t["p"]["pose"])  # Eq. 2 ground truth
        l_gt = sm.project(p_gt["landmarks3d"], sm.fixed_camera(zs.shape[0], img_s.dtype, img_s.device))
        images = {"source": img_s, "target": img_t}
        gt = truth_params(zs, zt) if truth else None  # once per batch: every method is held to the same truth
        for name, M in masks.items():
            images[name] = image(G, sm.reenact_w(G, w_s, w_t, M))
        for name in methods:
            sup_r = sup_s if name == "source" else sup_t if name == "target" else metric_inputs(nets, images[name])
            pr, pt = sup_r["p"], sup_t["p"]
            acc = sums[name]
            acc["csim"] += float(csim(sup_r["f"], sup_s["f"]).sum())
            acc["pose"] += float(pose_error(pr["euler"], pt["euler"]).sum())
            acc["expr"] += float(expr_error(pr["exp"], pt["exp"]).sum())
            acc["expr_norm"] += float(expr_error_normalized(pr["pose"][:, 3], pr["exp"], pt["pose"][:, 3],
                                                            pt["exp"], ranges.to(pr["exp"])).sum())
            acc["nme"] += float(nme(sup_r["l3d"], l_gt).sum())
            if truth:
                for k, v in truth_errors(pr, gt).items():
                    acc[k] += float(v.sum())
            if inception is not None:
                feats[name].append(fid.features(inception, images[name]).double().cpu())
            if sum(t.shape[0] for t in grid[name]) < grid_pairs:
                grid[name].append(images[name][:grid_pairs].cpu())
        if inception is not None:
            feats["reference"] += [fid.features(inception, img_s).double().cpu(), fid.features(inception, img_t).double().cpu()]
    results = {m: {k: v / cfg.pairs for k, v in sums[m].items()} for m in methods}
    if inception is not None:
        ref = fid.statistics(torch.cat(feats["reference"]).numpy())
        for m in methods:
            results[m]["fid"] = float(fid.frechet_distance(*fid.statistics(torch.cat(feats[m]).numpy()), *ref))
    return results, {m: torch.cat(v)[:grid_pairs] for m, v in grid.items()}


# --- Ground truth on the synthetic head world (world/): every generated head's parameters are known -----

TRUTH_ZERO = dict(pose_gt=0.0, expr_gt=0.0, jaw_gt=0.0, shape_gt=0.0)


def truth_params(z_s, z_t):
    """The true parameters the world's latents name (`world.sample.from_z`): the sources' identities and the
    targets' views, with the targets' Euler angles (degrees, DECA's convention), on the CPU in float64."""
    from world import sample
    ident_s, _ = sample.from_z(z_s.cpu())
    _, view_t = sample.from_z(z_t.cpu())
    return dict(shape_s=ident_s["shape"], view_t=view_t,
                euler_t=fn.axis_angle_to_euler(view_t["pose"][:, :3]) * (180 / math.pi))


def truth_errors(p, gt):
    """Per pair, the world encoder's reading p of an image against the true parameters gt (`truth_params`):
    pose (yaw, pitch, roll, degrees) and expression (its coefficients; jaw in degrees) against the target's,
    shape coefficients against the source's (identity)."""
    from world import head
    ne, ns = len(head.EXPRESSION), len(head.SHAPE)
    dev, view_t = p["pose"].device, gt["view_t"]
    return dict(pose_gt=pose_error(p["euler"].double().cpu(), gt["euler_t"]).to(dev),
                expr_gt=(p["exp"][:, :ne].double().cpu() - view_t["exp"][:, :ne]).abs().mean(1).to(dev),
                jaw_gt=((p["pose"][:, 3].double().cpu() - view_t["pose"][:, 3]).abs() * (180 / math.pi)).to(dev),
                shape_gt=(p["shape"][:, :ns].double().cpu() - gt["shape_s"][:, :ns]).abs().mean(1).to(dev))


def truth_table(results, deca):
    """The ground-truth errors per method, and the world encoder's own error on renders for scale."""
    from world import quality
    enc = quality.encoder_errors(deca, n=128)
    cols = [("Pose° vs target ↓", "pose_gt", 2), ("Expr. vs target ↓", "expr_gt", 3), ("Jaw° vs target ↓", "jaw_gt", 2),
            ("Shape vs source ↓", "shape_gt", 3)]
    lines = ["Ground truth (synthetic head world): each image's parameters as the world's encoder reads them, "
             "against the true ones", "", "| Method | " + " | ".join(c[0] for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for m, r in results.items():
        lines.append(f"| {m} | " + " | ".join(f"{r[k]:.{d}f}" for _, k, d in cols) + " |")
    lines += ["", f"The encoder's own error on 128 held-out renders: pose {enc['pose_deg']:.2f}°, expression "
              f"{enc['exp']:.3f}, jaw {enc['jaw_deg']:.2f}°, shape {enc['shape']:.3f}."]
    return "\n".join(lines)


def markdown_table(results, has_fid):
    """Table I layout: one row per method, arrows say which way is better."""
    cols = [("CSIM ↑", "csim", 3), ("Pose ↓", "pose", 2), ("Expr. ↓", "expr", 3), ("Expr.n ↓", "expr_norm", 3),
            ("NME ↓", "nme", 3), ("FID ↓", "fid", 2)]
    lines = ["| Method | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m, r in results.items():
        cells = [f"{r[k]:.{d}f}" if k in r else ("n/a: no Inception weights" if not has_fid else "-") for _, k, d in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


ORIGIN_SAID = {"world": " — the SYNTHETIC HEAD WORLD (not faces)", "tiny": " — TINY DEFAULTS, pipeline check only",
               "converted": ""}


def main(argv=None):
    cfg = parse_args(argv)
    out = Path(cfg.out)
    cli.check_out(out, cfg.overwrite, "eval.py")  # fail before any work; results are staged, published at the end
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(cfg.seed)
    nets, origin = load_nets(cfg)
    cfg.truncation = origin.truncation(cfg.truncation)
    cfg.pairs = cfg.pairs or origin.defaults["eval_pairs"]
    truth = origin.name == "world" and cfg.truncation == 1  # every image's parameters are known: ground truth too
    cfg.batch = min(cfg.batch or (16 if device == "cuda" else 8), cfg.pairs)  # never more than there are pairs
    nets = {k: ({m: cli.to_device(M, device) for m, M in P.items()} if k == "masks" else
                cli.to_device(P, device) if P is not None else None) for k, P in nets.items()}
    with torch.no_grad():
        ranges, ranges_src, ranges_json = load_ranges(cfg, nets["generator"], nets["deca"], origin, cfg.batch,
                                                      out)
        results, grid = evaluate(cfg, nets, ranges, cfg.grid_pairs, truth)
    has_fid = nets["inception"] is not None
    table = markdown_table(results, has_fid)
    title = f"{cfg.pairs} pairs, seed {cfg.seed}, truncation {cfg.truncation}{ORIGIN_SAID[origin.name]}"
    if truth:
        table += "\n\n" + truth_table(results, nets["deca"])
    settings = dict(dataclasses.asdict(cfg), origin=origin.name, device=device,
                    generator_arch=sm.architecture(nets["generator"]),
                    expression_ranges=ranges_src, nme_normaliser="outer-eye-corner distance (landmarks 36, 45) "
                    "of the ground-truth 3-D landmarks", fid_reference="the generated sources and targets"
                    if has_fid else "n/a: no weights/inception.safetensors")
    with cli.staged(out, cfg.overwrite, "eval.py") as tmp:  # all of it, or none of it
        cli.write_text(tmp / "table.md", f"{title}\n\n{table}\n")
        cli.write_text(tmp / "results.json", json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
        cli.write_png(tmp / "grid.png", cli.image_grid(list(grid.values()), cfg.size or None, titles=list(grid)))
        if ranges_json:
            cli.write_text(tmp / "expression_ranges.json", ranges_json)
    print(f"{title}\n\n{table}\n\ncolumns of {out / 'grid.png'}: {' | '.join(grid)}; numbers in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_script(main))
