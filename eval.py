"""Reenact random source/target pairs and write an image grid: source | target | reenacted.

    python eval.py                                   # tiny embedded default: a pipeline check
    python eval.py --n 8 --seed 1 --out out/run1     # more pairs, another seed
    python eval.py --generator weights/generator.safetensors --mask weights/masknet.safetensors --size 256

Without converted weights in weights/ this runs on the tiny random default generator and an
untrained mask, and says so: the images are noise-like patterns, the run checks the pipeline.
The paper's metrics (CSIM, pose, expression, NME, FID) come with the supervision networks.
"""
import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import stylemask as sm


@dataclass
class Config:
    n: int = 4                # pairs to reenact
    seed: int = 0             # seeds z_s, z_t (and the tiny default mask)
    truncation: float = 0.7   # toward w_avg; StyleMask trains and evaluates with 0.7 (trainer.py)
    batch: int = 4            # pairs per forward pass
    generator: str = ""       # converted generator (default: weights/generator.safetensors, else tiny)
    mask: str = ""            # converted mask networks (default: weights/masknet.safetensors)
    size: int = 0             # pool images to size×size in the grid (0: full generator resolution)
    out: str = "out"          # where the grid and the resolved config go


HELP = {
    "n": "number of random source/target pairs", "seed": "random seed of the pairs",
    "truncation": "truncation psi toward the average latent (paper/official: 0.7)",
    "batch": "pairs per forward pass",
    "generator": "generator .safetensors; empty: weights/generator.safetensors, else the tiny default",
    "mask": "mask networks .safetensors; empty: weights/masknet.safetensors",
    "size": "pool grid images to this size (0 = full resolution; the official code shows 256)",
    "out": "output folder",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        p.add_argument("--" + f.name, type=f.type, default=f.default,
                       help=f"{HELP[f.name]} (default: {f.default!r})")
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.n < 1 or cfg.batch < 1:
        p.error("--n and --batch must be at least 1")
    return cfg


def load_mask(cfg, G, is_tiny):
    """The mask networks: --mask, else weights/masknet.safetensors, else (tiny only) a fresh seeded one."""
    path = Path(cfg.mask) if cfg.mask else sm.WEIGHTS_DIR / "masknet.safetensors"
    if path.is_file() or cfg.mask:
        M = sm.load(path)
    elif is_tiny:
        print("note: no mask weights: using an UNTRAINED, seeded mask on the tiny generator")
        M = sm.init_mask(G, seed=cfg.seed)
    else:
        raise sm.StyleMaskError(f"{path} not found: convert StyleMask's checkpoint with "
                                f"`python weights/convert.py mask_net.pt {path}` or pass --mask")
    sm.check_mask(M, G)
    return M


def main(argv=None):
    cfg = parse_args(argv)
    torch.manual_seed(cfg.seed)
    G, is_tiny = sm.default_generator(cfg.generator or None)
    M = load_mask(cfg, G, is_tiny)
    z_dim = G["style.1.weight"].shape[1]
    gen = torch.Generator().manual_seed(cfg.seed)
    z_s, z_t = torch.randn(cfg.n, z_dim, generator=gen), torch.randn(cfg.n, z_dim, generator=gen)
    rows = []
    with torch.no_grad():
        for i in tqdm(range(0, cfg.n, cfg.batch), desc="reenacting", unit="batch", disable=cfg.n <= cfg.batch):
            s_s = sm.styles(G, sm.mapping(G, z_s[i:i + cfg.batch], cfg.truncation))
            s_t = sm.styles(G, sm.mapping(G, z_t[i:i + cfg.batch], cfg.truncation))
            s_r = sm.reenact(s_s, s_t, M)
            rows.append(sm.image_grid([sm.synthesis(G, s) for s in (s_s, s_t, s_r)], cfg.size or None))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    sm.write_png(out / "eval_grid.png", torch.cat(rows, 0))
    resolved = dict(dataclasses.asdict(cfg), tiny_default=is_tiny, generator_config=sm.config(G),
                    mask_layers=len(sm.mask_dims(M)))
    (out / "eval_config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    label = "TINY DEFAULT (pipeline check, not faces)" if is_tiny else f"{sm.config(G)['resolution']}px generator"
    print(f"{label}: {cfg.n} pairs -> {out / 'eval_grid.png'} (columns: source | target | reenacted)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except sm.StyleMaskError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
