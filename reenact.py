"""Reenact faces with StyleMask: the source's identity with the target's head pose and expression.

    python reenact.py                                          # a generated pair (seeds 0, 1), embedded defaults
    python reenact.py --source a.jpg --target b.jpg            # photos: FFHQ-align, invert with e4e, reenact
    python reenact.py --source a.jpg --target clip.mp4 --paste-back   # a video (or a frame folder), full frames
    python reenact.py --source photos/ --target drivers/       # batch: every source × every target

Sources and targets are photos (aligned here, or pre-aligned with --aligned), W+ latent files (.pt or
.npy, as e4e inversions are saved: (18, 512), (1, 18, 512), or one w (512,)), or, when not given, faces
generated from --source-seed / --target-seed (truncation 0.7, the official trainer's; 1 on the world). A target may also
be a folder of frames or a video file: every frame is reenacted and streamed to disk (frames/NNNNN.png by
input frame, reenacted.mp4 at the input's frame count and fps, grid.mp4, GIF previews); frames where no
face is found are reported, skipped and listed with the reason in frames.json. A folder of sources is
batch mode (pairs/, pairs.json). Photos are inverted with e4e (sm.styles of e4e.e4e) as StyleMask's
run_inference.py does, which also truncates the inverted codes with psi 0.7 (--inversion-truncation;
toward the stored latent_avg here, toward a fresh mean_latent(4096) there). Latent files are used as
they are, untruncated.

--alpha is OUR EXTENSION, not the paper's: s_r = s_s + alpha · (reenact(s_s, s_t) − s_s) scales how much
of the target is taken (0: the source, 1: Eq. 1, in between: a partial transfer).
Outputs in --out (written only when the run succeeds; an --out that holds results needs --overwrite):
reenacted.png and grid.png (titled columns: the input photos beside source | target | reenacted, the
codes rendered by the generator, as the official grids), aligned/ crops and their W+ codes (.npy: pass
them again as --source/--target), config.json; the sequence and batch outputs above. Without converted
weights in weights/ everything runs on the embedded default and says so: the synthetic head world
(weights/world/ once built: a generator of rendered heads and its trained masks; its e4e is random, so
photos give meaningless codes), else the tiny random networks (a pipeline check). Neither is faces.
"""
# Inputs (photos, latents, frame sequences) and outputs only: reenactment is stylemask's, alignment
# align's, inversion e4e's, parameters weights', the command line and image writing cli's.
import dataclasses
import json
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import align
import cli
import e4e
import stylemask as sm
import weights
from cli import flag, pooled
from stylemask import StyleMaskError

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".gif")
LATENT_SUFFIXES = (".pt", ".pth", ".npy")


@dataclass
class Config:
    source: str = flag("", "source face: photo (.jpg, .png, ...) or W+ latent (.pt/.npy); empty: generated from "
                           "--source-seed")
    target: str = flag("", "target: photo, latent, folder of frames or video file (needs imageio-ffmpeg); empty: "
                           "generated from --target-seed")
    source_seed: int = flag(0, "seed of the generated source face")
    target_seed: int = flag(1, "seed of the generated target face")
    truncation: float = flag(-1.0, "truncation psi of generated faces " + cli.TRUNCATION_HELP)
    inversion_truncation: float = flag(0.7, "truncation psi applied to the e4e codes of photos, toward latent_avg "
                                            "(official run_inference.py: 0.7; 1 = the untruncated inversion)")
    alpha: float = flag(1.0, "OUR EXTENSION: how much of the target's pose/expression to take, "
                             "s_s + alpha·(s_r − s_s); 0 = source, 1 = Eq. 1")
    size: int = flag(0, "output size in pixels, average-pooled (0: full generator resolution; the official code "
                        "showed 256)")
    aligned: bool = flag(False, "inputs are already FFHQ-aligned face crops: skip detection (needed on the tiny "
                                "defaults' images)")
    fps: float = flag(0.0, "frame rate of the MP4 and GIF (0: the video's rate, else 10)")
    paste_back: bool = flag(False, "sequences: warp each reenacted face back into its input frame (full-size "
                                   "frames and MP4)")
    smooth: bool = flag(True, "sequences: smooth the alignment landmarks over time, against jitter (--no-smooth: "
                              "per frame)")
    num_pairs: int = flag(0, "batch mode (--source a folder): this many pairs, drawn at random with --source-seed "
                             "(0: all pairs)")
    generator: str = weights.path_flag("generator")
    mask: str = weights.path_flag("masknet")
    e4e: str = weights.path_flag("e4e")
    device: str = flag("", "torch device (empty: cuda when available, else cpu)")
    out: str = flag("out/reenact", cli.OUT_HELP)
    overwrite: bool = flag(False, cli.OVERWRITE_HELP)


def parse_args(argv=None):
    """The Config of this command line, every flag checked."""
    cfg = cli.parse_config(Config, argv, description=__doc__)
    psi = cli.finite(0, 1, note=" (0: the average face, 1: none)")
    cli.check_flags(cfg, source_seed=cli.at_least(0), target_seed=cli.at_least(0), num_pairs=cli.at_least(0),
                    truncation=cli.truncation_rule(),
                    inversion_truncation=psi,
                    alpha=cli.finite(-1, 2, note=" (0: the source, 1: Eq. 1; beyond [0, 1] it extrapolates)"),
                    size=((lambda v: 0 <= v <= 4096), "an integer in [0, 4096] (0: the generator's resolution)"),
                    fps=((lambda f: f == 0 or 1 <= f <= 100), "0 (the video's rate) or in [1, 100] (GIF timing)"))
    return cfg


# --- Mixing (Eq. 1 and our alpha) -----------------------------------------------------------------

def render(G, M, w_s, w_t, alpha):
    """W or W+ codes (1, [n_ws,] w_dim) of source and target -> (source, target, reenacted) images (1, 3, H, W).

    s_r = s_s + alpha · (reenact(s_s, s_t) − s_s), in the mask's space (S, or W+ for the Table III ablation).
    """
    s_r = sm.reenact_w(G, w_s, w_t, M, alpha)
    return sm.synthesis(G, sm.styles(G, w_s)), sm.synthesis(G, sm.styles(G, w_t)), sm.synthesis(G, s_r)


# --- Inputs: photos, latents, seeds, frame sequences ---------------------------------------------

def read_latent(path, G):
    """A W+ (1, n_ws, w_dim) or W (1, w_dim) code from a .pt (tensor) or .npy file."""
    n, w_dim = sm.n_ws(G), sm.architecture(G)["w_dim"]
    try:
        if path.suffix == ".npy":
            w = torch.from_numpy(np.load(path, allow_pickle=False)).float()
        else:
            w = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise StyleMaskError(f"{path}: refused to load: unpickling it would run code (or it is damaged); save "
                             f"latents as plain tensors (torch.save(w)) or .npy") from None
    except Exception as e:
        raise StyleMaskError(f"{path}: not a readable latent file ({type(e).__name__})") from None
    if isinstance(w, dict) and len(w) == 1:  # {'latent': tensor}
        w = next(iter(w.values()))
    if not isinstance(w, torch.Tensor):
        raise StyleMaskError(f"{path}: holds a {type(w).__name__}, not a tensor")
    w = w.float()
    if not torch.isfinite(w).all():
        raise StyleMaskError(f"{path}: the latent holds NaN or Inf values")
    if w.shape in ((n, w_dim), (1, n, w_dim)):
        return w.reshape(1, n, w_dim)
    if w.shape in ((w_dim,), (1, w_dim)):
        return w.reshape(1, w_dim)
    raise StyleMaskError(f"{path}: latent of shape {tuple(w.shape)}; this generator reads W+ ({n}, {w_dim}) or w ({w_dim},)")


class Inverter:
    """Photo -> W+ code: FFHQ alignment (or a resize with --aligned), e4e, loaded on first use."""

    def __init__(self, cfg, G, origin, say):
        self.cfg, self.G, self.origin, self.say, self.E = cfg, G, origin, say, None
        self.smoother = None  # an align.Smoother over the frames of a sequence

    def __call__(self, img, name):
        """(H, W, 3) uint8 photo -> (W+ (1, n_ws, w_dim), aligned crop (R, R, 3) uint8 at generator resolution R,
        the crop's corners in the photo (align.crop_corners))."""
        if self.E is None:
            self.E = self.load()
        R = sm.architecture(self.G)["resolution"]
        if self.cfg.aligned:
            crop = img if img.shape[:2] == (R, R) else resize(img, R)
            corners = align.frame_corners(*img.shape[:2])
        else:
            lm = align.landmarks(img, name, self.say)
            lm = self.smoother(lm) if self.smoother else lm
            crop, corners = align.align(img, lm, R), align.crop_corners(lm)
        x = torch.from_numpy(np.array(crop)).permute(2, 0, 1)[None].float().to(self.G["latent_avg"].device)
        x = x / 127.5 - 1  # [-1, 1]
        w, avg, psi = e4e.e4e(self.E, x), self.G["latent_avg"], self.cfg.inversion_truncation
        return avg + psi * (w - avg), crop, corners  # W+ truncated as the official generate_image does

    def load(self):
        """The e4e encoder by weights' default rule, of the same origin as the generator."""
        nets, _ = weights.load_all(["e4e"], say=lambda *_: None, origin=self.origin, e4e=self.cfg.e4e)
        E = nets["e4e"]
        weights.check_fits(E, "e4e", self.G, self.cfg.e4e or weights.DIR / "e4e.safetensors")
        return cli.to_device(E, self.G["latent_avg"].device)


def resize(img, R):
    """(H, W, 3) uint8 -> (R, R, 3) uint8 with Pillow's Lanczos (pre-aligned faces of another size)."""
    from PIL import Image
    return np.asarray(Image.fromarray(img).resize((R, R), Image.LANCZOS))


def seeded_w(G, seed, truncation):
    """The w (1, w_dim) of the face generated from seed (z ~ N(0, I), truncated toward latent_avg)."""
    z = torch.randn(1, sm.architecture(G)["z_dim"], generator=torch.Generator().manual_seed(seed))
    return sm.mapping(G, z.to(G["latent_avg"].device), truncation)  # the same faces on every device


def frames(path):
    """(frames: iterator of (name, (H, W, 3) uint8 or None, error), count, fps or None) of a folder or video."""
    if path.is_dir():
        files = align.image_files(path)
        if not files:
            raise StyleMaskError(f"{path}: no image files (png, jpg, jpeg, bmp, webp) in the folder")

        def read(p):
            try:
                return p.name, align.read_image(p), None
            except StyleMaskError as e:
                return p.name, None, str(e)
        return (read(p) for p in files), len(files), None
    try:
        import imageio_ffmpeg
    except ImportError:
        raise StyleMaskError(f"{path}: reading videos needs the optional extra: pip install imageio-ffmpeg "
                             f"(or extract the frames into a folder)") from None
    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
    except Exception as e:
        raise StyleMaskError(f"{path}: not a readable video ({type(e).__name__})") from None
    W, H = meta["size"]
    count = imageio_ffmpeg.count_frames_and_secs(str(path))[0]
    gen = ((f"frame {i:05d}", np.frombuffer(b, np.uint8).reshape(H, W, 3), None) for i, b in enumerate(reader))
    return gen, count, meta.get("fps")


def is_sequence(path):
    return path.is_dir() or path.suffix.lower() in VIDEO_SUFFIXES


# --- Main ------------------------------------------------------------------------------------------

def main(argv=None, say=print):
    def scoped(argv):
        cfg = parse_args(argv)
        with torch.no_grad():  # scoped: importers and tests keep autograd on
            return run(cfg, say)
    return cli.run_script(scoped, argv)


def run(cfg, say=print):
    """Reenact as cfg says; every result is written into a staged folder that becomes --out on success."""
    out = Path(cfg.out)
    cli.check_out(out, cfg.overwrite, "reenact.py")
    device = cli.device(cfg.device)
    source, target = (Path(p) if p else None for p in (cfg.source, cfg.target))
    for p, option, what in ((source, "--source", "file"), (target, "--target", "file or folder")):
        if p is not None and not p.exists():
            raise StyleMaskError(f"{p}: no such {what} ({option})")
    batch = source is not None and source.is_dir()
    if batch and (target is None or (target.is_file() and target.suffix.lower() in VIDEO_SUFFIXES)):
        raise StyleMaskError(f"{source}: a folder of sources (batch mode) needs --target: a photo, a latent file or "
                             f"a folder of them (to reenact a video, pass one --source at a time)")
    sequence = not batch and target is not None and is_sequence(target)
    for option, used in (("--num-pairs", not cfg.num_pairs or batch), ("--paste-back", not cfg.paste_back or sequence)):
        if not used:
            say(f"note: {option} applies to {'a folder of sources' if option == '--num-pairs' else 'a video or frame folder'}"
                f" only: ignored here")
    nets, origin = weights.load_all(["generator", "masknet"], say=say, generator=cfg.generator, masknet=cfg.mask)
    cfg.truncation = origin.truncation(cfg.truncation)
    G, M = cli.to_device(nets["generator"], device), cli.to_device(nets["masknet"], device)
    invert = Inverter(cfg, G, origin, say)
    with cli.staged(out, cfg.overwrite, "reenact.py") as tmp:
        cli.write_text(tmp / "config.json", json.dumps(dict(dataclasses.asdict(cfg), origin=origin.name), indent=1)
                       + "\n")
        if batch:
            message = run_batch(cfg, G, M, invert, source, target, tmp, out)
        else:
            w_s, photo_s = encode(cfg, G, invert, source, cfg.source_seed, tmp, "source")
            if target is None or not is_sequence(target):
                w_t, photo_t = encode(cfg, G, invert, target, cfg.target_seed, tmp, "target")
                src, tgt, rea = render(G, M, w_s, w_t, cfg.alpha)
                columns = titled(src, tgt, rea, photo_s, photo_t)
                cli.write_png(tmp / "reenacted.png", cli.to_uint8(pooled(rea, cfg.size))[0])
                cli.write_png(tmp / "grid.png", cli.image_grid([c for _, c in columns], cfg.size or None,
                                                               titles=[t for t, _ in columns]))
                message = (f"wrote {out / 'reenacted.png'} and {out / 'grid.png'} "
                           f"({' | '.join(t for t, _ in columns)}), {cfg.size or sm.architecture(G)['resolution']} px, "
                           f"alpha {cfg.alpha}")
            else:
                message = run_sequence(cfg, G, M, w_s, target, invert, tmp, out)
    say(message)
    return 0


def encode(cfg, G, invert, path, seed, tmp, name):
    """(w or W+ code (1, [n_ws,] w_dim), the aligned photo or None) of a source or target: a face generated from
    seed (no path), a latent file, or a photo (aligned and inverted; crop and code saved in aligned/<name>)."""
    if path is None:
        return seeded_w(G, seed, cfg.truncation), None
    if path.suffix.lower() in LATENT_SUFFIXES:
        return read_latent(path, G).to(G["latent_avg"].device), None
    w, crop, _ = invert(align.read_image(path), path.name)
    (tmp / "aligned").mkdir(exist_ok=True)
    cli.write_png(tmp / "aligned" / f"{name}.png", crop)
    np.save(tmp / "aligned" / f"{name}.npy", w[0].cpu().numpy())  # the W+ code used: pass it again
    return w, crop


def titled(src, tgt, rea, photo_s=None, photo_t=None):
    """[(title, (1, 3, H, W) image)] of a pair's grid: the input photos (when photos) beside their renders."""
    columns = [("source photo", photo_s), ("source", src), ("target photo", photo_t), ("target", tgt),
               ("reenacted", rea)]
    return [(t, crop_tensor(c, src) if isinstance(c, np.ndarray) else c) for t, c in columns if c is not None]


def run_batch(cfg, G, M, invert, source, target, tmp, out):
    """Batch mode, as the official run_inference.py: every source of a folder × every target (a file or the
    files of a folder), or --num-pairs of those pairs at random -> pairs/<source>__<target>.png, grid.png
    (the first 16 pairs), pairs.json (every pair: its output, or why it failed) -> the message to print."""
    def inputs(p):
        if p.is_file():
            return [p]
        files = [f for f in sorted(p.iterdir()) if f.suffix.lower() in align.IMAGE_SUFFIXES + LATENT_SUFFIXES]
        if not files:
            raise StyleMaskError(f"{p}: no photos ({', '.join(align.IMAGE_SUFFIXES)}) or latent files in the folder")
        return files
    sources, targets = inputs(source), inputs(target)
    pairs = [(s, t) for s in sources for t in targets if s != t]
    if cfg.num_pairs and cfg.num_pairs < len(pairs):
        pick = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.source_seed))[:cfg.num_pairs]
        pairs = [pairs[i] for i in sorted(pick.tolist())]
    codes = {}  # each input aligned and inverted once: (code, photo) or the reason it failed

    def code_of(p):
        if p not in codes:
            try:
                codes[p] = encode(cfg, G, invert, p, 0, tmp, p.name.replace(".", "_"))
            except StyleMaskError as e:
                if "optional extra" in str(e) or "not found: " in str(e):  # a setup problem, not a bad input
                    raise
                codes[p] = str(e)
        return codes[p]
    (tmp / "pairs").mkdir()
    manifest, rows = [], []
    for s, t in tqdm(pairs, desc="reenact pairs", unit="pair"):
        entry = dict(source=str(s), target=str(t))
        (cs, ps), (ct, pt) = ((c, None) if isinstance(c, str) else c for c in (code_of(s), code_of(t)))
        if isinstance(cs, str) or isinstance(ct, str):
            entry["skipped"] = cs if isinstance(cs, str) else ct
            tqdm.write(f"skipped {s.name} × {t.name}: {entry['skipped']}")
        else:
            src, tgt, rea = render(G, M, cs, ct, cfg.alpha)
            name = f"pairs/{s.name.replace('.', '_')}__{t.name.replace('.', '_')}.png"  # a.png, a.jpg: two names
            cli.write_png(tmp / name, cli.to_uint8(pooled(rea, cfg.size))[0])
            entry["output"] = name
            if len(rows) < 16:
                rows.append(titled(src, tgt, rea, ps, pt))
        manifest.append(entry)
    if not rows:
        raise StyleMaskError(f"no pair could be reenacted (of {len(pairs)}): see the reasons above")
    cell = min(cfg.size or 256, 256)
    widest = max(rows, key=len)  # a row without photos (latent inputs) is padded with grey cells
    grid = [cli.image_grid([dict(r).get(t, torch.zeros_like(r[0][1])) for t, _ in widest], cell) for r in rows]
    cli.write_png(tmp / "grid.png", torch.cat([cli.title_strip([t for t, _ in widest], cell), *grid]))
    done = sum("output" in e for e in manifest)
    cli.write_text(tmp / "pairs.json", json.dumps(dict(pairs=len(pairs), reenacted=done, list=manifest), indent=1) + "\n")
    return (f"reenacted {done} of {len(pairs)} pairs; wrote {out / 'pairs'}/, {out / 'grid.png'} (the first "
            f"{len(rows)}) and {out / 'pairs.json'}")


def run_sequence(cfg, G, M, w_s, target, invert, tmp, out):
    """Reenact every frame of a folder or video into tmp, streaming each result to disk as it is made:
    frames/NNNNN.png and grids/NNNNN.png numbered by input frame; reenacted.mp4 with one frame per input
    frame (a skipped frame shows the input frame with --paste-back, else the previous result); grid.mp4 and
    the GIF previews with the reenacted frames only; frames.json (every input frame: its output, or why it
    was skipped) -> the message to print."""
    seq, count, video_fps = frames(target)
    fps = cfg.fps or video_fps or 10.0
    notes = set()  # say each kind of note once per sequence ("N faces found" would repeat every frame)

    def once(msg):
        kind = msg.split(": ", 2)[-1].split(",")[0]
        if kind not in notes:
            notes.add(kind)
            tqdm.write(msg + " (said once for the sequence)")
    invert.say = once
    invert.smoother = align.Smoother() if cfg.smooth and not cfg.aligned else None
    (tmp / "frames").mkdir()
    (tmp / "grids").mkdir()
    videos = Videos(tmp, fps, once)
    manifest, skipped, last, leading = [], [], None, 0
    for index, (name, img, err) in enumerate(tqdm(seq, total=count, desc="reenact", unit="frame")):
        try:
            if err:
                raise StyleMaskError(err)
            w_t, crop, corners = invert(img, name)
        except StyleMaskError as e:
            if "optional extra" in str(e) or "not found: " in str(e):  # a setup problem, not a bad frame
                raise
            tqdm.write(f"skipped {e}")
            skipped.append(name)
            manifest.append(dict(index=index, name=name, skipped=str(e)))
            if invert.smoother:
                invert.smoother.reset()
            # the MP4 keeps the input's timing: the input frame itself (paste-back), else the last result
            filler = img if cfg.paste_back and img is not None else last
            if filler is None:
                leading += 1  # no result yet: black frames, written once the size is known
            else:
                videos.write("reenacted", filler)
            continue
        src, tgt, rea = render(G, M, w_s, w_t, cfg.alpha)
        if cfg.paste_back:
            frame = align.paste_back(img, cli.to_uint8(rea)[0].numpy(), corners)
        else:
            frame = cli.to_uint8(pooled(rea, cfg.size))[0].numpy()
        for _ in range(leading):
            videos.write("reenacted", np.zeros_like(frame))
        leading, last = 0, frame
        cell = min(cfg.size or 256, 256)
        grid = cli.image_grid([crop_tensor(crop, src), src, tgt, rea], cell, titles=GRID_COLUMNS).numpy()
        cli.write_png(tmp / "frames" / f"{index:05d}.png", frame)
        cli.write_png(tmp / "grids" / f"{index:05d}.png", grid)
        videos.write("reenacted", frame)
        videos.write("grid", grid)
        manifest.append(dict(index=index, name=name, output=f"frames/{index:05d}.png"))
    done = len(manifest) - len(skipped)
    if not done:
        raise StyleMaskError(f"{target}: no face found in any of its {len(manifest)} frames")
    written = videos.close()
    outputs = sorted(p for p in (tmp / "frames").iterdir())
    cli.write_gif(tmp / "reenacted.gif", (align.read_image(p) for p in outputs), fps)
    cli.write_gif(tmp / "grid.gif", (align.read_image(tmp / "grids" / p.name) for p in outputs), fps)
    cli.write_text(tmp / "frames.json", json.dumps(dict(
        input=str(target), fps=fps, frames=len(manifest), reenacted=done, skipped=len(skipped),
        grid_columns=GRID_COLUMNS, paste_back=cfg.paste_back, smooth=invert.smoother is not None, list=manifest),
        indent=1) + "\n")
    return (f"reenacted {done} of {len(manifest)} frames" + (f"; skipped {len(skipped)} (no face / unreadable): "
                                                             f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}"
                                                             if skipped else "")
            + f"; wrote {out / 'frames'}/, " + "".join(f"{out / n}, " for n in written)
            + f"{out / 'reenacted.gif'}, {out / 'grid.gif'} at {fps:g} fps ({out / 'frames.json'} lists every frame)")


GRID_COLUMNS = ["input (aligned)", "source", "target (inverted)", "reenacted"]


def crop_tensor(crop, like):
    """An (R, R, 3) uint8 crop as a (1, 3, R, R) image in [-1, 1] on like's device, for the grids."""
    return torch.from_numpy(np.array(crop)).permute(2, 0, 1)[None].to(like.device, torch.float32) / 127.5 - 1


class Videos:
    """reenacted.mp4 and grid.mp4, streamed; without imageio-ffmpeg, or when frames change size, none (said once)."""

    def __init__(self, folder, fps, say):
        self.folder, self.fps, self.say, self.writers, self.off = folder, fps, say, {}, set()

    def write(self, name, frame):
        if name in self.off:
            return
        try:
            if name not in self.writers:
                self.writers[name] = cli.VideoWriter(self.folder / f"{name}.mp4", self.fps)
            self.writers[name].write(frame)
        except StyleMaskError as e:
            self.say(f"note: no {name}.mp4: {e}")
            self.off.add(name)
            if name in self.writers:
                self.writers.pop(name).close()
                (self.folder / f"{name}.mp4").unlink(missing_ok=True)

    def close(self):
        """Finish every video; the names of those written."""
        for w in self.writers.values():
            w.close()
        return [f"{name}.mp4" for name in self.writers]


if __name__ == "__main__":
    sys.exit(main())
