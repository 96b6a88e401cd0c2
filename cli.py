"""What the scripts share: the error exit, config dataclasses as command lines, devices, images on disk.

train.py, eval.py, reenact.py and weights/convert.py use these so that each rule is written once:
a StyleMaskError ends a script with one `error:` line and exit code 2; a config dataclass plus a help
table is the command line; parameters move to a device in one call; images are written atomically.

Not here: model math (`stylemask.py` and the network modules), parameter files (`weights/`).
"""
import argparse
import dataclasses
import os
import struct
import sys
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

import stylemask as sm
from stylemask import StyleMaskError


# --- Running a script -----------------------------------------------------------------------------------

def run_script(main, argv=None):
    """A script's exit code: main(argv)'s, or 2 after printing a StyleMaskError as one `error:` line."""
    try:
        return main(argv)
    except StyleMaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def parse_config(Config, help, argv=None, description=None, choices=None, check=None):
    """Config dataclass + {field: help} -> a filled Config from the command line (`--help` lists every default).

    Booleans become --flag / --no-flag; choices maps field names to their allowed values; check(cfg)
    returns an error message (argparse prints it with the usage line and exits 2) or None.
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = choices or {}
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                           help=f"{help[f.name]} (default: {f.default})")
        else:
            p.add_argument(flag, dest=f.name, type=f.type, default=f.default, choices=choices.get(f.name),
                           help=f"{help[f.name]} (default: {f.default!r})")
    cfg = Config(**vars(p.parse_args(argv)))
    problem = check(cfg) if check else None
    if problem:
        p.error(problem)
    return cfg


def to_device(P, device):
    """Parameters (a dict of tensors or an sm.Masks) on device."""
    if isinstance(P, sm.Masks):
        return P._replace(params=to_device(P.params, device))
    return {k: v.to(device) for k, v in P.items()}


# --- Images ---------------------------------------------------------------------------------------------

def pooled(img, size=256):
    """(B, 3, H, W) -> (B, 3, size, size) by average pooling, as the official code feeds its networks
    256×256 images (size 0 or None: unchanged)."""
    return img if not size or img.shape[-1] == size else F.adaptive_avg_pool2d(img, size)


def to_uint8(img):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as the official save_image(normalize, range=(-1, 1))."""
    x = (img.detach().float().clamp(-1, 1) + 1) * 127.5
    return (x + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def image_grid(columns, size=None):
    """Columns of (B, 3, H, W) images -> one (B·H, n·W, 3) uint8 grid: row b shows sample b of every column."""
    if size is not None:
        columns = [F.adaptive_avg_pool2d(c, size) if c.shape[-1] != size else c for c in columns]
    cells = torch.stack([to_uint8(c) for c in columns], 1)  # (B, n, H, W, 3)
    B, n, H, W, _ = cells.shape
    return cells.permute(0, 2, 1, 3, 4).reshape(B * H, n * W, 3)


def write_png(path, img):
    """Write an (H, W, 3) uint8 image (tensor or numpy) as an 8-bit RGB PNG, atomically (zlib, no image library)."""
    img = img if isinstance(img, torch.Tensor) else torch.tensor(img)  # numpy frames: copied, so writable

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    H, W, _ = img.shape
    raw = torch.cat([torch.zeros(H, 1, dtype=torch.uint8), img.reshape(H, W * 3)], 1)  # filter 0 per row
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw.numpy().tobytes(), 6)) + chunk(b"IEND", b""))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(png)
    os.replace(tmp, path)


def write_gif(path, images, fps):
    """(H, W, 3) uint8 frames -> a looping animated GIF (Pillow's encoder), written atomically."""
    from PIL import Image
    path = Path(path)
    pics = [Image.fromarray(im) for im in images]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pics[0].save(tmp, format="GIF", save_all=True, append_images=pics[1:], duration=int(round(1000 / fps)), loop=0)
    os.replace(tmp, path)
