"""The shipped synthetic head world (weights/world/): its files are the ones the build recorded, it is every
script's default, eval.py reproduces the numbers the build measured, and a short mask training on it learns
to transfer the target's pose while keeping the source's identity."""
import hashlib
import json

import pytest
import torch

import eval as evaluation
import facenets as fn
import stylemask as sm
import train
import weights

if not (weights.WORLD / "manifest.json").is_file():
    pytest.skip("the synthetic head world is not installed in weights/world/ (python build_world.py installs it)",
                allow_module_level=True)
MANIFEST = json.loads((weights.WORLD / "manifest.json").read_text())


@pytest.fixture
def world(monkeypatch, tmp_path):
    """The scripts' defaults as a user without converted weights has them: the world."""
    monkeypatch.setenv("STYLEMASK_DEFAULT", "world")
    monkeypatch.setattr(weights, "DIR", tmp_path / "no-weights")


def test_shipped_files_match_their_recorded_hashes():
    for name, digest in MANIFEST["sha256"].items():
        assert hashlib.sha256((weights.WORLD / name).read_bytes()).hexdigest() == digest, name


def test_the_shipped_flame_is_the_heads(world):
    """weights/world/flame.safetensors is world.head's FLAME, tensor for tensor (weights reads the file, never
    the world's code)."""
    from world import head
    shipped, built = weights.read(weights.WORLD / "flame.safetensors", "flame"), head.flame_head()
    assert shipped.keys() == built.keys()
    assert all(shipped[k].dtype == built[k].dtype and torch.equal(shipped[k], built[k]) for k in built)


def test_the_world_is_every_scripts_default(world):
    said = []
    nets, origin = weights.load_all(["generator", "masknet", "arcface", "deca", "flame"], say=said.append)
    assert origin.name == "world" and origin.defaulted == {"generator", "masknet", "arcface", "deca", "flame"}
    assert origin.defaults == MANIFEST["defaults"] and said[-1] == origin.note
    assert sm.architecture(nets["generator"])["resolution"] == 64 and len(nets["masknet"].dims) == 9
    assert any("synthetic head world" in s for s in said)
    assert all(v.dtype == torch.float32 for v in nets["generator"].values() if v.is_floating_point())


@pytest.mark.slow
def test_eval_reproduces_the_shipped_numbers(world, tmp_path, capsys):
    assert evaluation.main(["--pairs", "16", "--out", str(tmp_path / "e")]) == 0
    got = json.loads((tmp_path / "e" / "results.json").read_text())["results"]
    for method, row in MANIFEST["eval16"].items():
        for k, v in row.items():
            assert got[method][k] == pytest.approx(v, rel=1e-3, abs=1e-3), (method, k)
    out = capsys.readouterr().out
    assert "SYNTHETIC HEAD WORLD" in out and "Ground truth" in out


def _pose_and_identity(nets, M, z_s, z_t):
    """Mean pose error (degrees, DECA's Euler angles) of the reenacted images against the targets, and the
    mean ArcFace cosine of reenacted and source images."""
    G, A, D, _ = nets
    with torch.no_grad():
        w_s, w_t = sm.mapping(G, z_s), sm.mapping(G, z_t)
        img = {k: sm.synthesis(G, s) for k, s in (("s", sm.styles(G, w_s)), ("t", sm.styles(G, w_t)),
                                                   ("r", sm.reenact_w(G, w_s, w_t, M)))}
        e_t, e_r = fn.deca_params(D, img["t"])["euler"], fn.deca_params(D, img["r"])["euler"]
        cos = (fn.identity(A, img["r"]) * fn.identity(A, img["s"])).sum(1)
    return (e_r - e_t).abs().mean().item(), cos.mean().item()


@pytest.mark.slow
def test_a_short_training_run_learns_to_transfer_pose(world, tmp_path):
    out = tmp_path / "run"
    assert train.main(["--steps", "40", "--batch", "4", "--no-cycle", "--eval-pairs", "4", "--out", str(out)]) == 0
    nets, _ = train.load_nets(train.parse_args([]), say=lambda *_: None)
    g = torch.Generator().manual_seed(123)
    z_s, z_t = torch.randn(2, 32, sm.architecture(nets[0])["z_dim"], generator=g)
    before = _pose_and_identity(nets, sm.init_mask(nets[0], 9), z_s, z_t)
    after = _pose_and_identity(nets, weights.read(out / "masknet.safetensors", "masknet"), z_s, z_t)
    assert after[0] <= 0.5 * before[0], (before, after)   # the pose error at least halves
    assert after[1] >= 0.7, (before, after)                # and the source's identity stays
