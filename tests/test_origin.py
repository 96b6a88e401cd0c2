"""The run's origin has one home: `weights.load_all` decides converted | world | tiny, announces it in one line
and hands out the run defaults that depend on it; the scripts record it; weights reads the world as files and
never imports world/; every file is written by one atomic helper."""
import json
import subprocess
import sys

import pytest
import torch

import cli
import weights
from weights import defaults

PRETRAINED = ["generator", "arcface", "deca", "flame"]


@pytest.fixture
def no_converted(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "DIR", tmp_path / "no-weights")


def test_tiny_origin(no_converted):
    said = []
    _, origin = weights.load_all(PRETRAINED + ["masknet"], say=said.append)
    assert origin.name == "tiny" and origin.defaults == weights.RUN_DEFAULTS["tiny"]
    assert origin.defaulted == {"generator", "arcface", "deca", "flame", "masknet"}
    assert said == [origin.note] and "TINY" in origin.note and "UNTRAINED mask" in origin.note


def test_world_origin_reads_its_defaults_from_the_manifest(no_converted, monkeypatch):
    monkeypatch.setenv("STYLEMASK_DEFAULT", "world")
    if weights.embedded() != "world":
        pytest.skip("the synthetic head world is not installed in weights/world/")
    said = []
    nets, origin = weights.load_all(["generator", "flame"], say=said.append)
    manifest = json.loads((weights.WORLD / "manifest.json").read_text())
    assert origin.name == "world" and origin.defaults == manifest["defaults"] and said == [origin.note]
    assert (origin.defaults["truncation"], origin.defaults["train_steps"]) == (1.0, 250)
    assert nets["flame"]["shapedirs"].shape[2] == 400  # read from weights/world/flame.safetensors


def test_world_without_run_defaults_is_a_one_line_error(tmp_path, monkeypatch):
    world = tmp_path / "world"
    world.mkdir()
    (world / "manifest.json").write_text(json.dumps({"sha256": {}, "defaults": {"truncation": 1.0}}))
    monkeypatch.setattr(weights, "WORLD", world)
    with pytest.raises(weights.StyleMaskError, match="lack eval_pairs, range_samples, save_every"):
        weights.run_defaults("world")
    (world / "manifest.json").write_text("{")
    with pytest.raises(weights.StyleMaskError, match="no run defaults in it; rebuild the world"):
        weights.run_defaults("world")


def test_converted_origin(tmp_path, monkeypatch):
    """Converted files (here the tiny networks saved as converted) make a run's origin 'converted', said once,
    with the paper's run defaults; an e4e loaded later keeps that origin without saying it again."""
    monkeypatch.setattr(weights, "DIR", tmp_path)
    G = defaults.tiny_generator()
    for kind, P in (("generator", G), ("arcface", defaults.tiny_arcface()), ("deca", defaults.tiny_deca()),
                    ("flame", defaults.tiny_flame()), ("masknet", defaults.tiny_mask())):
        weights.save(P, tmp_path / weights.KINDS[kind].file, kind)
    said = []
    _, origin = weights.load_all(PRETRAINED + ["masknet"], say=said.append)
    assert origin.name == "converted" and origin.defaulted == set() and said == [origin.note]
    assert origin.defaults == weights.RUN_DEFAULTS["converted"] and origin.defaults["train_steps"] == 70000
    with pytest.raises(weights.StyleMaskError, match="the converted generator needs an e4e encoder of its own"):
        weights.load_all(["e4e"], say=said.append, origin=origin)  # no converted e4e: no default fits it
    weights.save(defaults.tiny_e4e(G=G), tmp_path / "e4e.safetensors", "e4e")
    _, again = weights.load_all(["e4e"], say=said.append, origin=origin)
    assert again.name == "converted" and len(said) == 1


def test_a_mix_of_converted_and_embedded_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "DIR", tmp_path)
    weights.save(defaults.tiny_generator(), tmp_path / "generator.safetensors", "generator")
    with pytest.raises(weights.StyleMaskError, match="converted weights found for generator but not"):
        weights.load_all(PRETRAINED, say=lambda *_: None)


def test_weights_never_imports_the_world():
    """The world is a library above weights: loading the world's networks (FLAME included) reads files only."""
    code = ("import os, sys; os.environ['STYLEMASK_DEFAULT'] = 'world'; import weights; "
            "weights.DIR = weights.DIR / 'absent'; nets, origin = weights.load_all("
            "['generator', 'masknet', 'arcface', 'deca', 'flame'], say=lambda *_: None); "
            "print(origin.name, any(m == 'world' or m.startswith('world.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False" and out[0] in ("world", "tiny")


def test_atomic_writes_all_or_nothing(tmp_path):
    target = tmp_path / "f.txt"
    cli.write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with cli.atomic(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    cli.write_png(tmp_path / "x.png", torch.arange(24, dtype=torch.uint8).reshape(2, 4, 3))
    assert (tmp_path / "x.png").stat().st_mode & 0o777 == 0o644 and len(list(tmp_path.iterdir())) == 2
