"""What the scripts share: the error exit, flags and their checks, run folders, devices, images on disk.

The scripts (train.py, eval.py, reenact.py, build_world.py, weights/convert.py, bench/) and the modules that
write files for them (weights, world.fit) use these so that each rule is written once:
- a StyleMaskError ends a script with one `error:` line and exit code 2, Ctrl-C / SIGTERM with one line
  and exit code 130 / 143 (a training loop instead stops between steps and saves: `stop_between_steps`);
- a config dataclass whose fields carry their help (`flag`) is the command line, and every flag is checked
  before any work;
- one run-folder rule: a folder that holds a run's results is never modified unless the user says so
  (`--overwrite`, or train.py's `--resume`); results appear only after success, all at once (`staged`), or,
  for runs that write as they go (training, the world build), under a lock with the replaced results set
  aside until the first checkpoint (`in_place`); every finished file is written atomically (`atomic`),
  readable by all (streams, an MP4 or an appended log, are written in place, inside a staged or locked folder);
- parameters move to a device in one call; images are PNG (Pillow), GIF and MP4.

Not here: model math (`stylemask.py` and the network modules), parameter files (`weights/`).
"""
import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import kernels
import stylemask as sm
from stylemask import StyleMaskError


# --- Running a script -----------------------------------------------------------------------------------

class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the same cleanup runs."""


def _raise_interrupted(signum, frame):
    raise Interrupted()


def run_script(main, argv=None):
    """A script's exit code: main(argv)'s; 2 after a StyleMaskError, printed as one `error:` line; 130 / 143
    after Ctrl-C / SIGTERM, with one line (whatever the script staged is removed on the way out)."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        return main(argv)
    except (StyleMaskError, kernels.KernelCheckError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, torch.OutOfMemoryError) as e:
        print(f"error: out of memory ({type(e).__name__}): lower --batch, --size, --eval-pairs or the like", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if "allocate" not in str(e):
            raise
        print(f"error: out of memory ({str(e).splitlines()[0][:120]}): lower --batch, --size, --eval-pairs or the like",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        name = "SIGTERM" if isinstance(e, Interrupted) else "Ctrl-C"
        print(f"interrupted ({name}): nothing more was written", file=sys.stderr)
        return 143 if isinstance(e, Interrupted) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def flag(default, help):
    """A Config field and its --help text, so each flag is described once, where it is declared."""
    return dataclasses.field(default=default, metadata={"help": help})


# the --out and --overwrite of a script whose results are staged (`staged`)
OUT_HELP = "output folder (must not hold results, unless --overwrite; written only when the run succeeds)"
OVERWRITE_HELP = "replace the results of an earlier run of this script in --out"


def parse_config(Config, argv=None, description=None, choices=None, check=None, given=None):
    """Config dataclass (fields made by `flag`) -> a filled Config from the command line (`--help` lists every
    flag's text and default).

    Booleans become --flag / --no-flag; choices maps field names to their allowed values; check(cfg)
    returns an error message (argparse prints it with the usage line and exits 2) or None. given, a set,
    receives the names of the fields set on the command line.
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = choices or {}
    for f in dataclasses.fields(Config):
        flag_name, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:
            p.add_argument(flag_name, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                           help=f"{help} (default: {f.default})")
        else:
            p.add_argument(flag_name, dest=f.name, type=f.type, default=f.default, choices=choices.get(f.name),
                           help=f"{help} (default: {f.default!r})")
    cfg = Config(**vars(p.parse_args(argv)))
    if given is not None:  # parse again with no defaults at all: what remains was on the command line
        for a in p._actions:
            a.default = argparse.SUPPRESS
        given.update(vars(p.parse_args(argv)))
    problem = check(cfg) if check else None
    if problem:
        p.error(problem)
    return cfg


# --- Checking flags: before any work or write ---------------------------------------------------------

def at_least(lo, note=""):
    """A rule for an integer flag: at least lo."""
    return (lambda v: v >= lo), f"an integer >= {lo}{note}"


def finite(lo=-math.inf, hi=math.inf, note=""):
    """A rule for a real flag: finite, in [lo, hi]."""
    span = "" if (lo, hi) == (-math.inf, math.inf) else f" >= {lo}" if hi == math.inf else f" in [{lo}, {hi}]"
    return (lambda v: math.isfinite(v) and lo <= v <= hi), f"a finite number{span}{note}"


def check_flags(cfg, **rules):
    """Raise a StyleMaskError naming the first flag that breaks its rule (field=(ok(value), what it must be))."""
    for name, (ok, what) in rules.items():
        value = getattr(cfg, name)
        if not ok(value):
            raise StyleMaskError(f"--{name.replace('_', '-')} {value!r}: must be {what}")


TRUNCATION_HELP = ("(-1: by the networks' origin: the official 0.7 on real weights; 1, none, on the synthetic head world, "
                   "whose every latent is a known head)")


def truncation_rule():
    """The rule of a --truncation flag: -1 (the default of the run's origin, `weights.Origin`) or a psi in [0, 1]."""
    return (lambda v: v == -1 or 0 <= v <= 1), "-1 (the default) or a number in [0, 1] (0: the average face, 1: none)"


def device(name):
    """The torch device named by a --device flag ('' : cuda when available, else cpu), checked to exist."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise StyleMaskError(f"--device {name!r}: not a torch device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise StyleMaskError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible); "
                             f"use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise StyleMaskError(f"--device {name}: only cpu and cuda are supported")
    return dev


# --- Output folders: a run's results are never touched unless the user says so --------------------------

def _results(out):
    """The entries of folder out, hidden temporary files of a killed run aside."""
    return sorted(p.name for p in Path(out).iterdir()
                  if p.name not in (".lock", MARK) and not re.fullmatch(r"\..*\.tmp\d+", p.name))


MARK = ".stylemask-run"  # in every run folder: the script that wrote it; --overwrite replaces only such folders


def mark(folder, script):
    """Mark folder as a run of script (train.py, eval.py, reenact.py)."""
    write_text(Path(folder) / MARK, script + "\n")


def clean_stale(out):
    """Remove what killed runs left beside or in out: the hidden staging folders (.<name>.tmp<pid>) and temp
    files of processes gone. A set-aside old run (.<name>.old<pid>) is never deleted here: it may be all
    that is left of it."""
    out = Path(out)
    for folder, pattern in ((out.parent, rf"\.{re.escape(out.name)}\.(tmp)(\d+)"), (out, r"\..*\.(tmp)(\d+)")):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = re.fullmatch(pattern, p.name)
            if m and not _alive(int(m.group(2))):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def glob_escape(name):
    """name with glob's special characters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _alive(pid):
    if pid == os.getpid():
        return False  # our own leftovers from an earlier call
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_out(out, overwrite=False, script="", resume_hint=False):
    """Raise unless folder out may receive a new run's results: absent, empty, or a run of this script and
    --overwrite given; writable; a folder of its own (not ., .., / or a folder the run would sit in)."""
    out = Path(out)
    if out.name in ("", ".", "..") or out.resolve() == Path.cwd() or out.resolve().parent == out.resolve():
        raise StyleMaskError(f"--out {str(out) or repr('')}: name a folder of its own for the results (not ., .. or /)")
    if out.exists() and not out.is_dir():
        raise StyleMaskError(f"--out {out}: is a file, not a folder; choose another --out")
    for p in out.parent.glob(f".{glob_escape(out.name)}.old*") if out.parent.is_dir() else []:
        pid = p.name.rsplit(".old", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            raise StyleMaskError(f"--out {out}: a run killed while replacing it left the earlier results in {p}; "
                                 f"move them back into {out} (or delete {p}), then run again")
    names = _results(out) if out.is_dir() else []
    if names and not overwrite:
        how = "--resume its checkpoint.safetensors to continue it, " if resume_hint else ""
        raise StyleMaskError(f"--out {out} already holds results ({len(names)} entries, e.g. {names[0]}): pass "
                             f"{how}--overwrite to replace them, or choose another --out")
    marker = out / MARK
    if names and (not marker.is_file() or marker.read_text().strip() != script):
        what = marker.read_text().strip() if marker.is_file() else "not a run folder"
        raise StyleMaskError(f"--out {out} holds files that {script} did not write ({what}; e.g. {names[0]}): "
                             f"--overwrite replaces only a folder of a {script} run; choose another --out")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise StyleMaskError(f"--out {out}: cannot write into {parent} (permission denied); choose another --out")


@contextmanager
def staged(out, overwrite, script):
    """A hidden folder beside out to write a run's results into; on success it becomes out (replacing what
    --overwrite allowed, all at once), on any failure it is removed and out stays exactly as it was."""
    out = Path(out)
    check_out(out, overwrite, script)
    clean_stale(out)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise StyleMaskError(f"--out {out}: cannot create {tmp.parent} ({e.strerror}); choose another --out") from None
    try:
        yield tmp
        mark(tmp, script)
        _publish(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp, out, overwrite):
    """Make tmp's files 0644 (folders 0755) and put tmp in out's place; the old out, if any, goes."""
    if not overwrite and out.is_dir() and _results(out):  # another run filled it since check_out
        raise StyleMaskError(f"--out {out}: another run wrote results there while this one ran; nothing of this run "
                             f"was kept: run again with another --out, or --overwrite")
    for p in [tmp, *tmp.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    old = out.parent / f".{out.name}.old{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def lock(out, what, flag="--out"):
    """Hold out/.lock while a run writes into the folder in place (train.py): a second run into the same
    folder is a one-line error, not two runs interleaving their checkpoints; a dead run's lock is taken over.
    flag: the option that named the folder, for the messages."""
    path = Path(out) / ".lock"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                raise StyleMaskError(f"{flag} {out}: {what} (pid {pid}) is writing there now; wait for it, or "
                                     f"choose another {flag}") from None
            path.unlink(missing_ok=True)  # left by a run that was killed
    else:
        raise StyleMaskError(f"{flag} {out}: cannot take its lock file {path}; choose another {flag}")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        path.unlink(missing_ok=True)


def set_aside(out):
    """Move the files of an earlier run in out (--overwrite) into a hidden sibling folder; None if none."""
    old = [p for p in out.iterdir() if p.name not in (".lock", MARK)]
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
        if p.name not in (".lock", MARK):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for p in aside.iterdir():
        os.rename(p, out / p.name)
    aside.rmdir()


@contextmanager
def in_place(out, script, overwrite=False, continuing=False, resume_hint=False, marked=True, flag="--out"):
    """A run that writes into out as it goes (train.py's checkpoints and logs, the world build's stages): out is
    created, held under its lock, cleaned of killed runs' temp files and (marked) marked as script's. A new run
    (not continuing a run in its own folder) needs out free (`check_out`); the earlier results that --overwrite
    replaces wait beside it until the run calls keep() (at its first checkpoint), and a run that fails before
    puts them back. flag: the option that named out, for the messages. Yields keep."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StyleMaskError(f"{flag} {out}: cannot create it ({e.strerror}); choose another {flag}") from None
    with lock(out, f"another {script}", flag):
        clean_stale(out)
        aside = None
        if not continuing:
            check_out(out, overwrite, script, resume_hint)  # again, under the lock: another run may have ended here
            aside = set_aside(out)
        if marked:
            mark(out, script)
        try:
            yield lambda: aside and shutil.rmtree(aside, ignore_errors=True)
        except BaseException:
            if aside and aside.exists():  # no checkpoint of this run yet: the old run comes back
                restore(aside, out)
            raise


class Stop:
    """SIGINT / SIGTERM during a loop (`stop_between_steps`): remembered in .signal, acted on between steps."""

    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        self.signal = signum


@contextmanager
def stop_between_steps():
    """While the block runs, SIGINT and SIGTERM only set the yielded Stop's .signal, so that a training loop
    finishes its step and saves a checkpoint before it stops (a step is never cut in half); restored after."""
    stop = Stop()
    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@contextmanager
def atomic(path):
    """Write the file at path all at once, the one way every file here is written: yield a hidden temp path
    beside it (.<name>.tmp<pid>, which `clean_stale` removes after a kill) to write, then make it readable by
    all (0644) and rename it over path; on any failure the temp file goes and path stays as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text):
    """Write a text file atomically, readable by all."""
    with atomic(path) as tmp:
        tmp.write_text(text)


def copy_file(src, dst):
    """Copy a file atomically (the copy appears whole or not at all)."""
    with atomic(dst) as tmp:
        shutil.copyfile(src, tmp)


def trim_log(path, last):
    """Drop the lines of a JSONL log logged after step `last` (the lost steps of a killed run being resumed);
    a line cut short by the kill (or not JSON) counts as after every step."""
    path = Path(path)
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if _logged_step(line) <= last]
        write_text(path, "".join(line + "\n" for line in keep))


def _logged_step(line):
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, TypeError, AttributeError):
        return 1 << 62


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


def image_grid(columns, size=None, titles=None):
    """Columns of (B, 3, H, W) images -> one (B·H [+ a title strip], n·W, 3) uint8 grid: row b shows sample b of
    every column; titles (one per column) are written above the columns, in a strip TITLE_HEIGHT pixels high."""
    if size is not None:
        columns = [F.adaptive_avg_pool2d(c, size) if c.shape[-1] != size else c for c in columns]
    cells = torch.stack([to_uint8(c) for c in columns], 1)  # (B, n, H, W, 3)
    B, n, H, W, _ = cells.shape
    grid = cells.permute(0, 2, 1, 3, 4).reshape(B * H, n * W, 3)
    return grid if titles is None else torch.cat([title_strip(titles, W), grid])


TITLE_HEIGHT = 14


def title_strip(titles, width):
    """(TITLE_HEIGHT, len(titles)·width, 3) uint8: each title centred over its column, white on dark grey,
    in Pillow's built-in bitmap font (shortened with '…' where a column is too narrow)."""
    from PIL import Image, ImageDraw, ImageFont
    strip = Image.new("RGB", (len(titles) * width, TITLE_HEIGHT), (40, 40, 40))
    draw, font = ImageDraw.Draw(strip), ImageFont.load_default()
    for i, title in enumerate(titles):
        text = str(title)
        while len(text) > 1 and draw.textlength(text, font=font) > width - 2:
            text = text[:-2] + "…"
        x = i * width + (width - draw.textlength(text, font=font)) / 2
        draw.text((x, 1), text, fill=(255, 255, 255), font=font)
    return torch.from_numpy(np.array(strip))


def write_png(path, img):
    """Write an (H, W, 3) uint8 image (tensor or numpy) as an 8-bit RGB PNG (Pillow), atomically."""
    from PIL import Image
    img = img.numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    with atomic(path) as tmp:
        Image.fromarray(np.ascontiguousarray(img)).save(tmp, format="PNG")


def write_gif(path, images, fps):
    """(H, W, 3) uint8 frames -> a looping animated GIF (Pillow's encoder), written atomically."""
    from PIL import Image
    pics = [Image.fromarray(im) for im in images]
    duration = max(20, int(round(1000 / fps)))  # GIF timing is in 1/100 s, and players slow anything under 20 ms
    with atomic(path) as tmp:
        pics[0].save(tmp, format="GIF", save_all=True, append_images=pics[1:], duration=duration, loop=0)


class VideoWriter:
    """Frames -> an H.264 MP4 (yuv420p, through imageio-ffmpeg's ffmpeg), streamed: each frame goes to the
    encoder as it comes, so memory does not grow with the video's length. Frames are (H, W, 3) uint8, all
    of one size; odd sizes are padded to even ones (yuv420p's chroma is subsampled 2×2)."""

    def __init__(self, path, fps):
        try:
            import imageio_ffmpeg
        except ImportError:
            raise StyleMaskError("writing MP4 needs the optional extra: pip install imageio-ffmpeg") from None
        self.path, self.fps, self.size, self._ffmpeg, self._out = Path(path), fps, None, imageio_ffmpeg, None
        self.count = 0

    def write(self, frame):
        frame = np.ascontiguousarray(frame)
        H, W, _ = frame.shape
        if self._out is None:
            self.size = (W + W % 2, H + H % 2)
            self._out = self._ffmpeg.write_frames(str(self.path), self.size, fps=self.fps, codec="libx264",
                                                  pix_fmt_out="yuv420p", macro_block_size=1, quality=8)
            self._out.send(None)  # start ffmpeg
        if (W + W % 2, H + H % 2) != self.size:
            raise StyleMaskError(f"frame {self.count} is {W}×{H}, the video's frames are {self.size[0]}×{self.size[1]}")
        if W % 2 or H % 2:
            frame = np.pad(frame, ((0, H % 2), (0, W % 2), (0, 0)), mode="edge")
        self._out.send(frame.tobytes())
        self.count += 1

    def close(self):
        """Finish the file (ffmpeg writes the index); the file is complete only after this."""
        if self._out is not None:
            self._out.close()
            os.chmod(self.path, 0o644)
            self._out = None
