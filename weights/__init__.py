"""The one home of parameters: every parameter file is read, checked and written here, by one rule.

    load(kind, path=None, say=print, embedded_name=None) -> (params, is_default)
        The default rule, the same for every network and script: an explicit path (it must exist),
        else weights/<kind>.safetensors, else the embedded default (the synthetic head world in
        weights/world/, or the tiny stand-ins of `weights.defaults`), said out loud.
    load_all(kinds, say=print, origin=None, **paths) -> (nets, Origin)
        Several kinds by that rule, all converted files or all embedded defaults, never a silent mix, and
        the run's origin: converted | world | tiny, its one-line announcement and its run defaults.
    read(path, kind) / save(params, path, kind, **meta) / header(path, kind)
        One safetensors file, checked fully against its kind's layout (`weights.layout`); its metadata.
    find(name, path=None), DIR, KINDS, convert_command(kind), path_flag(kind)
        The rule for other files (eval's expression ranges), where defaults live, the kinds, the
        command that makes a kind's file, and a script's flag for a kind's path.
    adam_state(opt, params) / restore_adam(opt, params, state)
        A torch.optim.Adam's moments as a checkpoint's tensors and back (train.py, world.fit).

A file's kind is stated in its safetensors metadata (`stylemask`: generator, masknet, checkpoint, fit,
flame, arcface, deca, e4e, inception), never guessed from its tensor names; mask files also state the
mask's kind, space and layer widths. Mask networks travel as `sm.Masks`, the others as flat dicts.
Official checkpoints become such files with `python -m weights.convert` (weights/convert.py, the one
place that knows foreign key names); weights/README.md says where each official file comes from.

Not here: forward code (the model modules) and the tensors' names and shapes (`weights.layout`).
"""
import json
import os
from collections import namedtuple
from pathlib import Path

import torch

import cli
import stylemask as sm
from fid import FID_WEIGHTS
from stylemask import StyleMaskError
from weights import defaults, layout

DIR = Path(__file__).resolve().parent  # where converted files are found by default (read at call time)

Kind = namedtuple("Kind", "file what check default source needed_for", defaults=(None,))
Kind.__doc__ = """One kind of parameter file: its default file name in weights/, what it is (for messages), its
check, its embedded default (None: there is none), the official file `python -m weights.convert` reads
for it (with any extra flags after {path}) and, without a default, what cannot be computed without it."""

KINDS = {
    "generator": Kind("generator.safetensors", "a StyleGAN2 generator", layout.check_generator,
                      defaults.tiny_generator, "stylegan2-ffhq-config-f.pt {path}"),
    "masknet": Kind("masknet.safetensors", "StyleMask mask networks", layout.check_mask,
                    defaults.tiny_mask, "mask_network_1024.pt {path}"),
    "checkpoint": Kind(None, "a train.py checkpoint", layout.check_mask, None, None),
    "fit": Kind(None, "a training checkpoint of the world's build (world.fit)", layout.check_fit, None, None),
    "flame": Kind("flame.safetensors", "a FLAME model", layout.check_flame, defaults.tiny_flame,
                  "generic_model.pkl {path} --landmarks landmark_embedding.npy"),
    "arcface": Kind("arcface.safetensors", "an ArcFace IR-SE network", layout.check_arcface,
                    defaults.tiny_arcface, "model_ir_se50.pth {path}"),
    "deca": Kind("deca.safetensors", "a DECA E_flame encoder", layout.check_deca, defaults.tiny_deca,
                 "deca_model.tar {path}"),
    "e4e": Kind("e4e.safetensors", "an e4e encoder", layout.check_e4e, defaults.tiny_e4e, "e4e_ffhq_encode.pt {path}"),
    "inception": Kind("inception.safetensors", "the FID Inception-v3", layout.check_inception, None,
                      FID_WEIGHTS + " {path}", "FID"),
}
PRETRAINED = ("generator", "arcface", "deca", "flame", "e4e")  # all converted or all embedded defaults


def path_flag(kind):
    """A script Config's field for the path of a network of this kind (--generator, --mask, ...), its help
    written once, here: the default rule it follows."""
    k = KINDS[kind]
    return cli.flag("", f"{k.what} .safetensors (empty: weights/{k.file}, else the embedded default; "
                        f"python -m weights.convert makes it from {k.source.split()[0]})")


def convert_command(kind, path=None):
    """The command that makes the file of this kind from its official checkpoint."""
    return "python -m weights.convert " + KINDS[kind].source.format(path=path or DIR / KINDS[kind].file)


# --- One file ---------------------------------------------------------------------------------------

def save(params, path, kind, **meta):
    """Write params of this kind to a safetensors file atomically, the kind and its description in the header.

    masknet: params is an sm.Masks. checkpoint: params is (sm.Masks, training-state tensors). fit: params is
    (a network's tensors, training-state tensors), the network's stored under "p.".
    """
    header = {"stylemask": kind, **{k: str(v) for k, v in meta.items()}}
    tensors = params
    if kind in ("masknet", "checkpoint"):
        M, state = (params, {}) if kind == "masknet" else params
        header.update(mask_kind=M.kind, mask_space=M.space, ctrl_dims=json.dumps(list(M.dims)))
        tensors = {**M.params, **state}
    elif kind == "fit":
        P, state = params
        tensors = {**{f"p.{k}": v for k, v in P.items()}, **state}
    elif kind == "generator":
        header["arch"] = json.dumps(sm.architecture(params))
    from safetensors.torch import save_file
    try:
        with cli.atomic(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=header)
    except Exception as e:  # OSError, or safetensors' own error for an unwritable path
        raise StyleMaskError(f"{path}: cannot write it ({e})") from None


def _missing(path, kind):
    """The one-line error for a path that is not a file, with the advice that fits the kind."""
    path = Path(path)
    if path.is_dir():
        return StyleMaskError(f"{path}: is a folder, not a file; pass the .safetensors file in it")
    if kind == "checkpoint":
        return StyleMaskError(f"{path}: no such file; train.py writes checkpoint.safetensors into its --out folder")
    if KINDS[kind].source is None:
        return StyleMaskError(f"{path}: no such file ({KINDS[kind].what})")
    if kind == "masknet":
        return StyleMaskError(f"{path}: no such file; train.py writes masknet.safetensors into its --out folder, or "
                              f"convert StyleMask's: {convert_command(kind, path)}")
    return StyleMaskError(f"{path}: no such file; convert the official weights: {convert_command(kind, path)} "
                          f"(see weights/README.md)")


def _file_kind(meta, names):
    """The kind a file's header states; a 'masknet' with training state is a checkpoint written before
    checkpoints had a kind of their own."""
    found = meta.get("stylemask")
    return "checkpoint" if found == "masknet" and "train.step" in names else found


def check_fits(P, kind, G, path, why=""):
    """Raise a StyleMaskError naming path unless mask networks or an e4e encoder P fit generator G."""
    try:
        (layout.check_mask if kind == "masknet" else layout.check_e4e)(P, G)
    except StyleMaskError as e:
        raise StyleMaskError(f"{path}: {e}{why}") from None


def _check_kind(path, found, kind):
    """Raise unless a file whose header says `found` may be read as `kind` (a masknet may come from a checkpoint)."""
    if found not in KINDS:
        raise StyleMaskError(f"{path}: not a stylemask parameter file (its header names no kind); convert the "
                             f"official checkpoint with python -m weights.convert")
    if kind == "checkpoint" and found == "masknet":
        raise StyleMaskError(f"{path}: mask weights only, no training state: pass a checkpoint.safetensors")
    if found != kind and not (kind == "masknet" and found == "checkpoint"):
        raise StyleMaskError(f"{path}: not {KINDS[kind].what}: it holds {KINDS[found].what} (kind {found!r})")


def _masks(path, meta, tensors):
    """(sm.Masks, training state) of a mask or checkpoint file, from the kind, space and widths in its header.

    Files written before the header stated them (stylemask before its layout change) marked a global mask by a
    `ctrl_dims` tensor and a W+ mask by a `ctrl_index` tensor: those are read once, here, and dropped.
    """
    state = {k: v for k, v in tensors.items() if k.startswith("train.")}
    params = {k: v for k, v in tensors.items() if not k.startswith("train.") and k not in ("ctrl_dims", "ctrl_index")}
    kind, space = meta.get("mask_kind"), meta.get("mask_space")
    try:
        if kind is None:  # an older file
            kind = "global" if "network_global.masknet.0.weight" in params else "per-layer"
            space = "W" if "ctrl_index" in tensors else "S"
        if "ctrl_dims" in tensors:
            dims = [int(d) for d in tensors["ctrl_dims"]]
        elif "ctrl_dims" in meta:
            dims = [int(d) for d in json.loads(meta["ctrl_dims"])]
        else:
            n = sum(1 for k in params if k.endswith(".masknet.2.bias"))
            dims = [int(params[f"network_{i:02d}.masknet.2.bias"].shape[0]) for i in range(n)]
    except (ValueError, TypeError, KeyError):
        raise StyleMaskError(f"{path}: damaged mask header (ctrl_dims); re-create the file") from None
    return sm.Masks(kind, space, dims, params), state


def header(path, kind):
    """The metadata header of a file of this kind (e.g. a checkpoint's run config), without reading its tensors."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise _missing(path, kind)
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise StyleMaskError(f"{path}: not a readable safetensors file ({e})") from None
    with f:
        meta = f.metadata() or {}
        found = _file_kind(meta, f.keys())
    _check_kind(path, found, kind)
    return meta


def read(path, kind, device="cpu"):
    """The parameters in the file at path, which must hold this kind (a masknet may also come from a
    checkpoint), checked fully. masknet: an sm.Masks; checkpoint: (sm.Masks, training-state tensors)."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise _missing(path, kind)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors = {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v  # fp16 storage (the world)
                   for k, v in tensors.items()}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise StyleMaskError(f"{path}: not a readable safetensors file ({e}); re-convert it with "
                             f"python -m weights.convert") from None
    found = _file_kind(meta, tensors)
    _check_kind(path, found, kind)
    params, state = tensors, {}
    if found in ("masknet", "checkpoint"):
        params, state = _masks(path, meta, tensors)
    elif found == "fit":
        params = {k[2:]: v for k, v in tensors.items() if k.startswith("p.")}
        state = {k: v for k, v in tensors.items() if k.startswith("train.")}
    try:
        KINDS[kind].check(params)
    except StyleMaskError as e:
        raise StyleMaskError(f"{path}: {e}") from None
    return (params, state) if kind in ("checkpoint", "fit") else params


def adam_state(opt, params):
    """A torch.optim.Adam's state of the named tensors params ({name: tensor}) as a checkpoint's training-state
    tensors: train.adam.<name>.<step | exp_avg | exp_avg_sq>."""
    return {f"train.adam.{name}.{k}": v for name, p in params.items() for k, v in opt.state.get(p, {}).items()}


def restore_adam(opt, params, state, path=None):
    """Put the moments of `adam_state` back into opt, for the named tensors params (the ones it optimises); a
    checkpoint (path) with the moments of some but not all of them is damaged: a one-line error."""
    keys = ("step", "exp_avg", "exp_avg_sq")
    found = {name: all(f"train.adam.{name}.{k}" in state for k in keys) for name in params}
    if any(found.values()) and not all(found.values()):
        missing = next(name for name, ok in found.items() if not ok)
        raise StyleMaskError(f"{path}: Adam's state of {missing} is missing: the checkpoint is damaged")
    for name, p in params.items():
        if found[name]:
            opt.state[p] = {k: state[f"train.adam.{name}.{k}"] if k == "step" else
                            state[f"train.adam.{name}.{k}"].to(p.device) for k in keys}


# --- The default rule -----------------------------------------------------------------------------------

def find(name, path=None, hint=""):
    """The file the default rule picks: path if given (it must be a file), else weights/<name> if present, else None.
    hint ends the error for a missing path (how to make the file)."""
    if path:
        path = Path(path)
        if path.is_dir():
            raise StyleMaskError(f"{path}: is a folder, not a file{hint}")
        if not path.is_file():
            raise StyleMaskError(f"{path}: no such file{hint}")
        return path
    p = DIR / name
    return p if p.is_file() else None


# --- The run's origin: converted weights, the synthetic head world, or the tiny stand-ins ----------------

WORLD = DIR / "world"  # the built world (python build_world.py): its networks, FLAME and manifest.json
WORLD_KINDS = ("generator", "masknet", "arcface", "deca", "flame")  # its e4e is the tiny one, sized for its generator

class Origin(namedtuple("Origin", "name note defaults defaulted")):
    """Where a run's networks come from, the one place that says so. name: 'converted' (official weights
    converted into weights/, or files given by flag), 'world' (the synthetic head world, weights/world/) or
    'tiny' (seeded random stand-ins, `weights.defaults`: a pipeline check); note: the one line that announces
    it; defaults: the run defaults that depend on it (`run_defaults`); defaulted: the kinds taken from an
    embedded default (the rest came from files)."""
    __slots__ = ()

    def truncation(self, psi):
        """A --truncation flag's psi: its own, or for -1 this origin's default."""
        return self.defaults["truncation"] if psi == -1 else psi

# The run defaults by origin. Real weights: the paper's and the official scripts'. The tiny stand-ins: short
# runs that still move the masks visibly (Adam moves each weight by about lr per step). The world's are data
# in weights/world/manifest.json, written by the build that trained its masks with them (so that a plain
# `python train.py` there reproduces the shipped masks).
RUN_DEFAULTS = {
    "converted": dict(truncation=0.7,      # the official trainer.py and evaluation
                      train_steps=70000,   # Sect. IV-A
                      train_lr=1e-4,       # Sect. IV-A, run_trainer.py
                      save_every=1000,     # run_trainer.py
                      eval_pairs=5000,     # Table I (the ablations use 2000)
                      range_samples=2000),  # extract_statistics.py
    "tiny": dict(truncation=0.7, train_steps=200, train_lr=1e-2, save_every=100, eval_pairs=32, range_samples=64),
}


def run_defaults(name):
    """The run defaults of an origin (RUN_DEFAULTS; the world's from its manifest.json)."""
    if name != "world":
        return dict(RUN_DEFAULTS[name])
    path = WORLD / "manifest.json"
    try:
        found = json.loads(path.read_text())["defaults"]
    except (OSError, ValueError, KeyError, TypeError):
        raise StyleMaskError(f"{path}: no run defaults in it; rebuild the world (python build_world.py) or set "
                             f"STYLEMASK_DEFAULT=tiny") from None
    missing = set(RUN_DEFAULTS["tiny"]) - set(found)
    if missing:
        raise StyleMaskError(f"{path}: its run defaults lack {', '.join(sorted(missing))}; rebuild the world "
                             f"(python build_world.py)")
    return found


def embedded():
    """Which embedded default the scripts fall back to: 'world' when weights/world/ holds the built world
    (and STYLEMASK_DEFAULT is not 'tiny'), else 'tiny' (seeded random networks: a pipeline check)."""
    choice = os.environ.get("STYLEMASK_DEFAULT", "world")
    if choice not in ("world", "tiny"):
        raise StyleMaskError(f"STYLEMASK_DEFAULT={choice!r}: must be 'world' or 'tiny'")
    files = [WORLD / "manifest.json"] + [WORLD / KINDS[k].file for k in WORLD_KINDS]
    return "world" if choice == "world" and all(f.is_file() for f in files) else "tiny"


def default(kind, name):
    """The embedded default parameters of a kind for the embedded origin name ('world' or 'tiny')."""
    if name == "world" and kind in WORLD_KINDS:
        return read(WORLD / KINDS[kind].file, kind)
    if name == "world" and kind == "e4e":
        return defaults.tiny_e4e(G=read(WORLD / KINDS["generator"].file, "generator"))
    return KINDS[kind].default()


def load(kind, path=None, say=print, embedded_name=None):
    """(params, is_default): the file at path; with no path weights/<kind>.safetensors; else the embedded
    default named embedded_name ('world' or 'tiny'; None: `embedded()`), said out loud. Kinds without a default
    (inception) give (None, True) with a note."""
    k = KINDS[kind]
    if path:  # asked for by name: it must be there
        return read(path, kind), False
    if k.file is None:
        raise StyleMaskError(f"{k.what} has no default file: pass its path")
    p = DIR / k.file
    if p.is_file():
        return read(p, kind), False
    if k.default is None:
        say(f"note: {p} not found: {k.what} has no embedded default (random weights would give meaningless "
            f"numbers), so {k.needed_for} is not computed. To compute it: {convert_command(kind)}")
        return None, True
    name = embedded_name or embedded()
    if name == "world":
        say(f"note: {p} not found: using the synthetic head world's {k.what} ({WORLD}; not faces). "
            f"For real weights: {convert_command(kind)}")
    else:
        say(f"note: {p} not found: using the TINY random default (a pipeline check, not a face model). "
            f"For real weights: {convert_command(kind)}")
    return default(kind, name), True


def _announce(name, kinds, defaulted):
    """The one line that says where a run's networks come from."""
    if name == "converted":
        return f"networks: from files (converted weights in {DIR}, or the files given by flag)"
    if name == "world":
        return (f"note: no converted weights in weights/: using the synthetic head world ({WORLD}: a generator of "
                f"rendered heads, its trained mask networks, ArcFace and DECA encoders; python build_world.py). It "
                f"shows the method on a known toy world; real faces need the official weights (weights/README.md).")
    untrained = ", UNTRAINED mask networks" if "masknet" in defaulted else ""
    nets_said = ", ".join(k for k in kinds if k in PRETRAINED)
    return (f"note: no converted weights in weights/: using the TINY defaults (random {nets_said}{untrained}). "
            f"This checks the pipeline; it says nothing about faces. See weights/README.md.")


def load_all(kinds, say=print, origin=None, **paths):
    """({kind: params}, Origin): each kind by the default rule, the networks of PRETRAINED all from converted
    files or all embedded defaults (real faces scored by random networks, or the reverse, would mean nothing),
    the origin announced once (said when it comes from an embedded default, or from converted files). With
    converted networks, mask networks and e4e must be converted too (no default fits them); masks must fit the
    generator. origin: the Origin of networks loaded earlier, for kinds loaded later on (reenact.py's e4e, on
    first use); it is not announced again."""
    for kind in kinds:
        if paths.get(kind) and not Path(paths[kind]).is_file():
            flag = "--mask" if kind == "masknet" else f"--{kind}"
            raise StyleMaskError(f"{_missing(paths[kind], kind)} ({flag})")
    group = [k for k in kinds if k in PRETRAINED and k != "e4e"]  # e4e: like the generator, told by the origin
    found = {k: bool(paths.get(k)) or (DIR / KINDS[k].file).is_file() for k in group}
    if origin is not None:
        found["the networks loaded before"] = origin.name == "converted"
    if any(found.values()) and not all(found.values()):
        have = ", ".join(k for k, v in found.items() if v)
        lack = ", ".join(f"weights/{KINDS[k].file}" if k in KINDS else k for k, v in found.items() if not v)
        raise StyleMaskError(f"converted weights found for {have} but not {lack}: convert all of "
                             f"{', '.join(group)} (see weights/README.md), or none for the embedded defaults")
    name = origin.name if origin is not None else "converted" if any(found.values()) else embedded()
    converted = name == "converted"
    quiet = say if converted else (lambda *_: None)
    nets, defaulted = {}, set()
    for kind in kinds:
        if kind in ("masknet", "e4e"):
            present = find(KINDS[kind].file, paths.get(kind))
            if converted and not present:
                how = "or pass --mask" if kind == "masknet" else f"or pass --{kind}"
                raise StyleMaskError(f"{DIR / KINDS[kind].file} not found: the converted generator needs "
                                     f"{KINDS[kind].what} of its own ({convert_command(kind)}) {how}")
            if not converted and present and kind == "e4e":
                raise StyleMaskError(f"{present}: a converted e4e encoder, but the generator is the {name} default "
                                     f"({DIR / KINDS['generator'].file} not found): convert the generator too")
        nets[kind], is_default = load(kind, paths.get(kind), say=say if kind == "inception" else quiet,
                                      embedded_name=None if converted else name)
        if is_default:
            defaulted.add(kind)
    if "masknet" in nets and "generator" in nets:
        why = (f" (the generator is the {name} default: {DIR / KINDS['generator'].file} not found)"
               if "generator" in defaulted else "")
        check_fits(nets["masknet"], "masknet", nets["generator"], paths.get("masknet") or DIR / KINDS["masknet"].file,
                   why)
    if origin is not None:
        return nets, origin._replace(defaulted=origin.defaulted | defaulted)
    origin = Origin(name, _announce(name, kinds, defaulted), run_defaults(name), frozenset(defaulted))
    if converted or defaulted - {"inception"}:
        say(origin.note)
    return nets, origin
