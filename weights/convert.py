"""Convert official checkpoints to stylemask safetensors: the one place that knows foreign key names.

    python -m weights.convert stylegan2-ffhq-config-f.pt weights/generator.safetensors
    python -m weights.convert network-snapshot.pkl weights/generator.safetensors   # NVlabs G_ema
    python -m weights.convert mask_net.pt weights/masknet.safetensors               # StyleMask
    python -m weights.convert generic_model.pkl weights/flame.safetensors --landmarks landmark_embedding.npy
    python -m weights.convert model_ir_se50.pth weights/arcface.safetensors         # ArcFace (pSp)
    python -m weights.convert deca_model.tar weights/deca.safetensors               # DECA E_flame
    python -m weights.convert pt_inception-2015-12-05-6726825d.pth weights/inception.safetensors  # FID
    python -m weights.convert e4e_ffhq_encode.pt weights/e4e.safetensors             # e4e inversion

Kinds (auto-detected; --kind forces one):
  rosinality  rosinality-format generator, as StyleMask distributes it: a .pt dict with `g_ema`
              (state dict) and `latent_avg`; any resolution and channel multiplier.
  masknet     StyleMask's trained mask networks: a .pt dict with `mask_net` and `num_layers_control`.
  nvlabs      NVlabs StyleGAN2-ADA / StyleGAN3-repo network pickle with `G_ema` ('skip' StyleGAN2
              generator), read by a restricted unpickler that never runs the pickled source code.
  flame       FLAME's generic_model.pkl (a Python-2 pickle with chumpy and scipy objects) plus DECA's
              landmark_embedding.npy (a pickled dict with legacy torch tensors), read by a restricted
              unpickler that rebuilds only arrays and tensors; chumpy and scipy are not needed.
  arcface     the ArcFace IR-SE50 of pSp/StyleMask (`model_ir_se50.pth`): a plain Backbone state dict
              (`input_layer.*`, `body.{i}.*`, `output_layer.*`), the identity supervision.
  deca        DECA's `deca_model.tar`: a dict of state dicts `E_flame`, `E_detail`, `D_detail`; only the
              coarse encoder E_flame is kept (the 3DMM supervision).
  inception   pytorch-fid's FID Inception-v3 (`pt_inception-2015-12-05-6726825d.pth`): a plain state dict
              (`Conv2d_1a_3x3.*`, `Mixed_5b.*` ... `Mixed_7c.*`, `fc.*`), the FID network.
  e4e         encoder4editing's `e4e_ffhq_encode.pt`: a dict with `state_dict` (`encoder.*`, `decoder.*`),
              `latent_avg` and `opts`; the Encoder4Editing weights (prefix `encoder.` stripped, as pSp's
              get_keys loads them) and latent_avg are kept, the decoder (a copy of the generator) dropped.
.pt/.pth/.tar files are read only with torch.load(..., weights_only=True). The output is written
atomically and an existing file is never replaced unless --force is given.

Not here: the layouts the results are checked against (`weights.layout`) and reading converted files
(`weights.read`); this module only translates foreign checkpoints.
"""
import sys

if __name__ == "__main__" and not __package__:  # run as a file: the package's imports would not resolve
    print("error: run the converter as a module, from the repository root: python -m weights.convert SRC DST",
          file=sys.stderr)
    sys.exit(2)

import _compat_pickle  # noqa: E402 (after the guard above)
import argparse
import codecs
import copyreg
import io
import pickle
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

import cli
import e4e
import facenets
import fid
import stylemask as sm
import weights
from stylemask import StyleMaskError
from weights import layout

KINDS = ("auto", "rosinality", "masknet", "nvlabs", "flame", "arcface", "deca", "inception", "e4e")


# --- .pt checkpoints (rosinality generator, StyleMask mask networks) -------------------------------

def read_pt(path):
    """torch.load with weights_only=True (argparse.Namespace allowed: rosinality stores `args`)."""
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler names the callable it refused; its wording changes between releases
        found = re.search(r"(?:[Uu]nsupported global:? GLOBAL|unsupported GLOBAL|GLOBAL) ([\w.]+)", str(e))
        if found or "Weights only load failed" in str(e):
            what = f" ({found.group(1)})" if found else ""
            raise StyleMaskError(f"{path}: refused to load: unpickling it would run code{what}. Only load such a "
                                 f"file if you trust it; official checkpoints never need this") from None
        raise StyleMaskError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt?") from None
    except Exception as e:
        raise StyleMaskError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt? ({type(e).__name__})") from None


def from_rosinality(ckpt, say=print):
    """rosinality checkpoint dict -> G: the g_ema state dict as is, plus latent_avg (w_dim,)."""
    if not isinstance(ckpt, dict) or "g_ema" not in ckpt:
        raise StyleMaskError("no 'g_ema' in the checkpoint: not a rosinality-format generator")
    G = {k: v.float() for k, v in ckpt["g_ema"].items() if isinstance(v, torch.Tensor)}
    want = layout.generator_shapes(sm.architecture(G))
    extra = sorted(set(G) - set(want))
    if extra:
        raise StyleMaskError(f"unexpected tensor {extra[0]!r} in g_ema: not a StyleGAN2 config-f generator")
    if "latent_avg" in ckpt:
        G["latent_avg"] = ckpt["latent_avg"].float().reshape(-1)
    else:
        say("note: the checkpoint has no latent_avg; storing the mean of 4096 mapped z (seed 0)")
        G["latent_avg"] = sm.mean_latent(G, n=4096, seed=0)
    layout.check_generator(G)
    return G


def from_masknet(ckpt):
    """StyleMask checkpoint {'mask_net': state dict, 'num_layers_control': n} -> M (same names)."""
    if not isinstance(ckpt, dict) or "mask_net" not in ckpt:
        raise StyleMaskError("no 'mask_net' in the checkpoint: not a StyleMask mask-network file")
    P = {k: v.float() for k, v in ckpt["mask_net"].items()}
    n_nets = sum(1 for k in P if re.fullmatch(r"network_\d\d\.masknet\.2\.bias", k))
    dims = [int(P[f"network_{i:02d}.masknet.2.bias"].shape[0]) for i in range(n_nets)
            if f"network_{i:02d}.masknet.2.bias" in P]
    if not dims:
        raise StyleMaskError("not a mask network: no network_*.masknet.* tensors")
    M = sm.Masks("per-layer", "S", dims, P)  # the official code has only per-layer masks in S
    layout.check_mask(M)
    n = ckpt.get("num_layers_control")
    if n is not None and len(M.dims) != int(n):
        raise StyleMaskError(f"num_layers_control = {n} but the file holds {len(M.dims)} mask networks")
    return M


# --- NVlabs network pickles, without running pickled code ---------------------------------------------

class _Persistent:
    """An NVlabs persistent object kept as data: class name and state; its module source never runs."""

    def __init__(self, meta):
        self.class_name, self.state = meta.get("class_name"), meta.get("state") or {}


class _Inert(dict):
    """Stand-in for any other NVlabs-side class (EasyDict, augment settings, ...): stores, never runs."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        self.state = state


def _storage_from_bytes(b):
    """torch.storage._load_from_bytes, but through the weights-only loader."""
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


class _NVlabsUnpickler(pickle.Unpickler):
    """Resolves only tensor-rebuilding functions and inert stand-ins; anything else is refused."""

    SAFE = {("collections", "OrderedDict"): OrderedDict,
            ("builtins", "set"): set,
            ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
            ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
            ("torch_utils.persistence", "_reconstruct_persistent_obj"): _Persistent}
    INERT = ("dnnlib", "torch_utils", "training", "numpy")

    def find_class(self, module, name):
        if (module, name) in self.SAFE:
            return self.SAFE[(module, name)]
        if module.split(".")[0] in self.INERT:
            return _Inert
        raise StyleMaskError(f"refused to unpickle {module}.{name}: not part of an NVlabs network pickle")


def _tensors(obj, prefix=""):
    """Flatten a tree of _Persistent modules into state-dict names -> tensors (params and buffers)."""
    out = {}
    for group in ("_parameters", "_buffers"):
        for k, v in (obj.state.get(group) or {}).items():
            if isinstance(v, torch.Tensor):
                out[prefix + k] = v.detach().float()
    for k, child in (obj.state.get("_modules") or {}).items():
        if isinstance(child, _Persistent):
            out.update(_tensors(child, prefix + k + "."))
    return out


def _modules(obj):
    """Every _Persistent module in the tree rooted at obj."""
    yield obj
    for child in (obj.state.get("_modules") or {}).values():
        if isinstance(child, _Persistent):
            yield from _modules(child)


def read_nvlabs(path):
    """The G_ema tree of an NVlabs pickle, via the restricted unpickler."""
    try:
        with open(path, "rb") as f:
            data = _NVlabsUnpickler(f).load()
    except StyleMaskError as e:
        raise StyleMaskError(f"{path}: {e}") from None
    except Exception as e:
        raise StyleMaskError(f"{path}: not a readable network pickle, truncated or corrupt? ({type(e).__name__})") from None
    G_ema = data.get("G_ema") if isinstance(data, dict) else None
    if not isinstance(G_ema, _Persistent):
        raise StyleMaskError(f"{path}: no G_ema network in the pickle (a TensorFlow-era pickle? convert it "
                             f"with NVlabs' legacy.py first)")
    return G_ema


def from_nvlabs(G_ema):
    """NVlabs Generator tree -> G in rosinality names (same math: see the key table below)."""
    T = _tensors(G_ema)
    for m in _modules(G_ema):
        arch = m.state.get("architecture")
        if arch not in (None, "skip"):
            raise StyleMaskError(f"synthesis architecture {arch!r} is not supported (StyleGAN2 config-f is 'skip')")
        if m.class_name == "MappingNetwork" and m.state.get("c_dim", 0):
            raise StyleMaskError("conditional generators (c_dim > 0) are not supported")
    clamps = {m.state.get("conv_clamp") for m in _modules(G_ema) if m.class_name in ("SynthesisLayer", "ToRGBLayer")}
    if not any(k.startswith("synthesis.b4.") for k in T):
        raise StyleMaskError("G_ema has no synthesis.b4 block: not a StyleGAN2 generator")
    G = {}
    # Mapping: fc{i} -> style.{i+1}. Fold NVlabs' lr_multiplier into the weights so that our fixed
    # LR_MLP gives the same effective weight: W_eff = W·lr/sqrt(in) = (W·lr/LR_MLP)·LR_MLP/sqrt(in).
    fcs = sorted({int(k.split(".")[1][2:]) for k in T if k.startswith("mapping.fc")})
    mapping = next(m for m in _modules(G_ema) if m.class_name == "MappingNetwork")
    fc_mods = mapping.state["_modules"]
    for i in fcs:
        lr = float(fc_mods[f"fc{i}"].state.get("bias_gain", sm.LR_MLP))
        G[f"style.{i + 1}.weight"] = T[f"mapping.fc{i}.weight"] * (lr / sm.LR_MLP)
        G[f"style.{i + 1}.bias"] = T[f"mapping.fc{i}.bias"] * (lr / sm.LR_MLP)
    G["latent_avg"] = T["mapping.w_avg"]
    G["input.input"] = T["synthesis.b4.const"][None]
    res = sorted({int(k.split(".")[1][1:]) for k in T if k.startswith("synthesis.b")})

    def layer(src, dst, noise_i):
        G[f"{dst}.conv.weight"] = T[f"{src}.weight"][None]
        G[f"{dst}.conv.modulation.weight"] = T[f"{src}.affine.weight"]
        G[f"{dst}.conv.modulation.bias"] = T[f"{src}.affine.bias"]
        G[f"{dst}.noise.weight"] = T[f"{src}.noise_strength"].reshape(1)
        G[f"{dst}.activate.bias"] = T[f"{src}.bias"]
        G[f"noises.noise_{noise_i}"] = T[f"{src}.noise_const"][None, None]

    def torgb(src, dst):
        G[f"{dst}.conv.weight"] = T[f"{src}.weight"][None]
        G[f"{dst}.conv.modulation.weight"] = T[f"{src}.affine.weight"]
        G[f"{dst}.conv.modulation.bias"] = T[f"{src}.affine.bias"]
        G[f"{dst}.bias"] = T[f"{src}.bias"].reshape(1, 3, 1, 1)

    try:
        layer("synthesis.b4.conv1", "conv1", 0)
        torgb("synthesis.b4.torgb", "to_rgb1")
        for j, r in enumerate(res[1:]):
            layer(f"synthesis.b{r}.conv0", f"convs.{2 * j}", 2 * j + 1)
            layer(f"synthesis.b{r}.conv1", f"convs.{2 * j + 1}", 2 * j + 2)
            torgb(f"synthesis.b{r}.torgb", f"to_rgbs.{j}")
            # NVlabs stores the filter normalised to sum 1 and applies gain up² when resampling;
            # rosinality stores it pre-multiplied by up² = 4.
            G[f"convs.{2 * j}.conv.blur.kernel"] = T[f"synthesis.b{r}.conv0.resample_filter"] * 4
            G[f"to_rgbs.{j}.upsample.kernel"] = T[f"synthesis.b{r}.resample_filter"] * 4
    except KeyError as e:
        raise StyleMaskError(f"G_ema lacks tensor {e.args[0]!r}: not a StyleGAN2 generator") from None
    clamps.discard(None)
    if len(clamps) > 1:
        raise StyleMaskError(f"layers use different conv_clamp values {sorted(clamps)}: not supported")
    if clamps:
        G["conv_clamp"] = torch.tensor(float(clamps.pop()))
    layout.check_generator(G)
    return G


# --- FLAME (generic_model.pkl) and DECA's landmark_embedding.npy, without chumpy or pickled code -----

class _Stub:
    """Stand-in for a chumpy Ch or a scipy sparse matrix in FLAME's pickle: keeps the pickled state only."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


_STUB_CLASSES = {}


def _stub(module, name):
    """One inert _Stub subclass per foreign class, so the converter can tell a Ch from a csc_matrix."""
    key = f"{module}.{name}"
    if key not in _STUB_CLASSES:
        _STUB_CLASSES[key] = type(name, (_Stub,), {"qualname": key})
    return _STUB_CLASSES[key]


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    return _reconstruct, scalar


class _FlameUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and (legacy) torch tensors; chumpy and scipy.sparse objects become stubs."""

    def find_class(self, module, name):
        import numpy as np
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python-2 names (copy_reg, __builtin__, ...)
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        _reconstruct, scalar = _numpy_reconstruct()
        safe = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                ("numpy.core.multiarray", "_reconstruct"): _reconstruct, ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
                ("numpy.core.multiarray", "scalar"): scalar, ("numpy._core.multiarray", "scalar"): scalar,
                ("copyreg", "_reconstructor"): copyreg._reconstructor, ("builtins", "object"): object,
                ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
                ("_codecs", "encode"): codecs.encode, ("collections", "OrderedDict"): OrderedDict,
                ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
                ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
                ("torch.storage", "_load_from_bytes"): _storage_from_bytes}
        if (module, name) in safe:
            return safe[(module, name)]
        if module.split(".")[0] == "chumpy" or module.startswith("scipy.sparse"):
            return _stub(module, name)
        raise StyleMaskError(f"refused to unpickle {module}.{name}: not part of a FLAME model or landmark file")


def _unpickle(f, path):
    try:
        return _FlameUnpickler(f, encoding="latin1").load()
    except StyleMaskError as e:
        raise StyleMaskError(f"{path}: {e}") from None
    except Exception as e:
        raise StyleMaskError(f"{path}: not a readable pickle, truncated or corrupt? ({type(e).__name__})") from None


def _array(v, key, path):
    """A numpy array from a FLAME value: ndarray, chumpy Ch (its array under 'x'), CSC/CSR sparse, tensor."""
    import numpy as np
    if isinstance(v, torch.Tensor):
        return v.numpy()
    if isinstance(v, _Stub) and v.qualname.startswith("chumpy") and "x" in getattr(v, "state", {}):
        return np.asarray(v.state["x"])
    if isinstance(v, _Stub) and v.qualname.startswith("scipy.sparse"):
        st = getattr(v, "state", {})
        fmt = st.get("format") or ("csr" if "csr" in v.qualname else "csc")
        shape = tuple(st.get("_shape") or st.get("shape"))
        data, indices, indptr = (np.asarray(st[k]) for k in ("data", "indices", "indptr"))
        dense = np.zeros(shape if fmt == "csc" else shape[::-1], dtype=np.float64)  # fill column by column
        for j in range(len(indptr) - 1):
            dense[indices[indptr[j]:indptr[j + 1]], j] = data[indptr[j]:indptr[j + 1]]
        return dense if fmt == "csc" else dense.T
    if isinstance(v, np.ndarray):
        return v
    raise StyleMaskError(f"{path}: entry {key!r} is a {type(v).__name__}, not an array")


def read_npy_object(path):
    """The object stored in a pickled .npy (DECA's landmark_embedding.npy) without np.load's unpickler."""
    import ast
    import struct
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise StyleMaskError(f"{path}: not a .npy file")
        major = f.read(2)[0]
        (n,) = struct.unpack("<H" if major == 1 else "<I", f.read(2 if major == 1 else 4))
        header = ast.literal_eval(f.read(n).decode("latin1"))
        if header.get("descr") != "|O":
            raise StyleMaskError(f"{path}: expected a pickled dict in the .npy (DECA's landmark_embedding.npy)")
        arr = _unpickle(f, path)
    return arr.item() if hasattr(arr, "item") and getattr(arr, "shape", None) == () else arr


FLAME_MODEL_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights", "f")
LANDMARK_KEYS = ("static_lmk_faces_idx", "static_lmk_bary_coords", "dynamic_lmk_faces_idx",
                 "dynamic_lmk_bary_coords", "full_lmk_faces_idx", "full_lmk_bary_coords")


def from_flame(model_path, landmarks_path):
    """FLAME generic_model.pkl + DECA landmark_embedding.npy -> Fl (official names, float32 / int64)."""
    import numpy as np
    if landmarks_path is None:
        raise StyleMaskError("a FLAME model needs DECA's landmark file too: add --landmarks landmark_embedding.npy")
    with open(model_path, "rb") as f:
        model = _unpickle(f, model_path)
    lmk = read_npy_object(landmarks_path)
    for name, d, keys in ((model_path, model, FLAME_MODEL_KEYS), (landmarks_path, lmk, LANDMARK_KEYS)):
        if not isinstance(d, dict) or any(k not in d for k in keys):
            missing = next((k for k in keys if not isinstance(d, dict) or k not in d), "?")
            raise StyleMaskError(f"{name}: no {missing!r} entry: not a FLAME model / DECA landmark file")
    Fl = {}
    for src, keys, path in ((model, FLAME_MODEL_KEYS, model_path), (lmk, LANDMARK_KEYS, landmarks_path)):
        for k in keys:
            a = np.ascontiguousarray(_array(src[k], k, path))  # some DECA arrays are Fortran-ordered
            integer = k in ("f", "kintree_table") or k.endswith("faces_idx")
            Fl[k] = torch.from_numpy(a.astype(np.int64 if integer else np.float32))
    layout.check_flame(Fl)
    return Fl


# --- Supervision and evaluation networks: ArcFace IR-SE50, DECA encoder, FID Inception --------------

def _plain_state(sd):
    """A state dict's tensors as float32, without BatchNorm's num_batches_tracked counters."""
    return {k: v.float() for k, v in sd.items() if isinstance(v, torch.Tensor) and not k.endswith("num_batches_tracked")}


def from_arcface(state_dict):
    """pSp/StyleMask `model_ir_se50.pth` (TreB1eN Backbone state dict) -> A: same names, no num_batches_tracked."""
    if not isinstance(state_dict, dict) or "input_layer.0.weight" not in state_dict:
        raise StyleMaskError("no 'input_layer.0.weight' in the checkpoint: not an ArcFace IR-SE50 state dict")
    A = _plain_state(state_dict)
    layout.check_arcface(A)
    return A


def from_deca(ckpt):
    """DECA `deca_model.tar` {'E_flame', 'E_detail', 'D_detail'} -> the E_flame state dict, same names."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("E_flame"), dict):
        raise StyleMaskError("no 'E_flame' state dict in the checkpoint: not a DECA model (deca_model.tar)")
    P = _plain_state(ckpt["E_flame"])
    layout.check_deca(P)
    return P


def from_inception(state_dict):
    """pytorch-fid `pt_inception-2015-12-05-6726825d.pth` (FID Inception-v3 state dict) -> I: same names."""
    if not isinstance(state_dict, dict) or "Mixed_7c.branch_pool.conv.weight" not in state_dict:
        raise StyleMaskError("no 'Mixed_7c.branch_pool.conv.weight' in the checkpoint: not an Inception-v3 state dict")
    fc = state_dict.get("fc.weight")
    if any(k.startswith("AuxLogits.") for k in state_dict) or (isinstance(fc, torch.Tensor) and fc.shape[0] == 1000):
        raise StyleMaskError(f"this is torchvision's ImageNet Inception-v3, not the FID Inception: FID needs "
                             f"pytorch-fid's TensorFlow-ported weights, {fid.FID_WEIGHTS}")
    I = _plain_state(state_dict)
    layout.check_inception(I)
    return I


# --- e4e inversion (encoder4editing's e4e_ffhq_encode.pt) --------------------------------------------

def from_e4e(ckpt, say=print):
    """e4e checkpoint {'state_dict': {'encoder.*', 'decoder.*'}, 'latent_avg', 'opts'} -> E (encoder. stripped)."""
    sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not any(k.startswith("encoder.") for k in sd):
        raise StyleMaskError("no 'state_dict' with encoder.* tensors in the checkpoint: not an e4e/pSp checkpoint")
    opts = ckpt.get("opts")
    opts = vars(opts) if isinstance(opts, argparse.Namespace) else opts if isinstance(opts, dict) else {}
    if opts.get("encoder_type", "Encoder4Editing") != "Encoder4Editing":  # pSp's GradualStyleEncoder has the same names
        raise StyleMaskError(f"the checkpoint's encoder is {opts['encoder_type']!r}, not e4e's Encoder4Editing")
    E = _plain_state({k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")})
    avg = ckpt.get("latent_avg")
    if avg is None:  # pSp then adds nothing
        say("note: the checkpoint has no latent_avg; storing zeros (pSp then adds nothing)")
        avg = torch.zeros(e4e.e4e_arch(E)["w_dim"])
    if not isinstance(avg, torch.Tensor):
        raise StyleMaskError(f"latent_avg is a {type(avg).__name__}, not a tensor")
    E["latent_avg"] = avg.float().reshape(-1) if avg.numel() == avg.shape[-1] else avg.float()  # (1, 512) -> (512,)
    layout.check_e4e(E)
    return E


# --- Detection and the command line -----------------------------------------------------------------

def detect(path):
    """'pt' for a torch checkpoint (zip, or a legacy pickle named .pt/.pth/.tar), 'pickle' for a network pickle."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":  # torch.save's zip container
        return "pt"
    if len(head) >= 2 and head[0] == 0x80:  # a pickle stream, protocol >= 2
        return "pt" if Path(path).suffix in (".pt", ".pth", ".tar") else "pickle"  # DECA: deca_model.tar
    raise StyleMaskError(f"{path}: neither a PyTorch checkpoint nor a network pickle (unknown format)")


def _is_flame_pickle(path):
    """Whether a pickle looks like FLAME's model (mentions chumpy or v_template), read without unpickling."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    return b"chumpy" in head or b"v_template" in head


def convert(src, kind="auto", say=print, landmarks=None):
    """Read src (and, for FLAME, DECA's landmark file) and return (params, kind) in stylemask's layout."""
    src = Path(src)
    if src.is_dir():
        raise StyleMaskError(f"{src}: is a folder; pass the official checkpoint file in it")
    if not src.is_file():
        raise StyleMaskError(f"{src}: no such file")
    if src.suffix == ".safetensors":
        raise StyleMaskError(f"{src}: already a safetensors file (converted?): pass it to the scripts as it is")
    fmt = detect(src)
    if kind == "flame" or (kind == "auto" and fmt == "pickle" and _is_flame_pickle(src)):
        return from_flame(src, landmarks), "flame"
    if kind == "nvlabs" or (kind == "auto" and fmt == "pickle"):
        return from_nvlabs(read_nvlabs(src)), "generator"
    ckpt = read_pt(src)
    if kind == "masknet" or (kind == "auto" and isinstance(ckpt, dict) and "mask_net" in ckpt):
        return from_masknet(ckpt), "masknet"
    if kind == "rosinality" or (kind == "auto" and isinstance(ckpt, dict) and "g_ema" in ckpt):
        return from_rosinality(ckpt, say=say), "generator"
    if kind == "deca" or (kind == "auto" and isinstance(ckpt, dict) and "E_flame" in ckpt):
        return from_deca(ckpt), "deca"
    if kind == "arcface" or (kind == "auto" and isinstance(ckpt, dict) and "input_layer.0.weight" in ckpt):
        return from_arcface(ckpt), "arcface"
    if kind == "inception" or (kind == "auto" and isinstance(ckpt, dict) and "Conv2d_1a_3x3.conv.weight" in ckpt
                               and "Mixed_7c.branch_pool.conv.weight" in ckpt):
        return from_inception(ckpt), "inception"
    if kind == "e4e" or (kind == "auto" and isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict)
                         and "encoder.latlayer1.weight" in ckpt["state_dict"]):
        return from_e4e(ckpt, say=say), "e4e"
    keys = ", ".join(list(ckpt)[:5]) if isinstance(ckpt, dict) else type(ckpt).__name__
    raise StyleMaskError(f"{src}: unknown checkpoint (top-level keys: {keys}); expected g_ema, mask_net, "
                         f"E_flame (DECA), input_layer.* (ArcFace), Mixed_7c.* (FID Inception) or state_dict (e4e)")


def run(argv=None):
    """The command line: convert src to dst (never replacing dst without --force); raises StyleMaskError."""
    p = argparse.ArgumentParser(prog="python -m weights.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="official checkpoint (.pt, .pth, .tar or .pkl)")
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument("--kind", choices=KINDS, default="auto", help="checkpoint kind (default: detect)")
    p.add_argument("--landmarks", help="FLAME only: DECA's landmark_embedding.npy")
    p.add_argument("--force", action="store_true", help="replace dst if it exists")
    a = p.parse_args(argv)
    dst = Path(a.dst)
    if dst.is_dir():
        raise StyleMaskError(f"{dst}: is a folder; name the .safetensors file to write")
    if not dst.parent.is_dir():
        raise StyleMaskError(f"{dst}: no such folder {dst.parent}; create it first")
    if dst.exists() and not a.force:
        raise StyleMaskError(f"{dst} exists; pass --force to replace it")
    if dst.suffix != ".safetensors":
        raise StyleMaskError(f"{dst}: the output must end in .safetensors")
    params, kind = convert(a.src, a.kind, landmarks=a.landmarks)
    weights.save(params, dst, kind, source=Path(a.src).name)
    tensors = params.params if kind == "masknet" else params
    n = sum(v.numel() for v in tensors.values())
    what = {"generator": lambda: f"generator {sm.arch_name(sm.architecture(params))} "
                                 f"{sm.architecture(params)['resolution']}px",
            "masknet": lambda: f"mask networks over {len(params.dims)} layers",
            "flame": lambda: f"FLAME with {params['v_template'].shape[0]} vertices and DECA's 68 landmarks",
            "arcface": lambda: f"ArcFace IR-SE with {len(facenets.arcface_arch(params)['units'])} units",
            "deca": lambda: f"DECA E_flame, ResNet blocks {[n for _, n in facenets.deca_arch(params)['layers']]}",
            "inception": lambda: f"FID Inception-v3 ({len(fid.CONVS)} BasicConv2d, {fid.FID_DIMS}-d pool3)",
            "e4e": lambda: "e4e encoder, W+ ({n_styles}, {w_dim})".format(**e4e.e4e_arch(params))}[kind]()
    print(f"wrote {dst}: {what}, {len(tensors)} tensors, {n / 1e6:.1f}M parameters")
    return 0


def main(argv=None):
    return cli.run_script(run, argv)


if __name__ == "__main__":
    sys.exit(main())
