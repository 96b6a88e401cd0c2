"""python build_world.py, a few steps of every training stage: it writes files of the right kinds, a second
run with the same flags resumes (finds every stage done) and ends with the same networks, an installed
world becomes every script's default, and bad flags are one-line errors. One quick build serves the
tests that need one."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import weights
import build_world as build


def _tensors(work):
    """Every built file's tensors (not its bytes: safetensors writes the metadata in no fixed order)."""
    return {name: load_file(str(work / name)) for name in build.FILES.values()}


QUICK = ["--quick", "--stages", "generator,encoders,adapt,masks,install"]


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory):
    """(work folder, installed world folder) of one quick build, installed into a scratch weights/world/."""
    root = tmp_path_factory.mktemp("quick")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(weights, "WORLD", root / "world")
        mp.setattr(weights, "DIR", root / "no-weights")
        mp.setenv("STYLEMASK_DEFAULT", "world")
        assert weights.embedded() == "tiny"  # nothing installed yet
        assert build.main(QUICK + ["--work", str(root / "w")]) == 0
        yield root / "w", root / "world"


@pytest.mark.slow
def test_quick_build_writes_the_world_and_resumes(quick_world):
    work, world = quick_world
    trained, _, step = build.fit.load(work / "encoders.ckpt.safetensors")
    adapted, _, a_step = build.fit.load(work / "adapt.ckpt.safetensors")
    assert (step, a_step) == (10, 4) and not torch.equal(trained["deca.layers.2.weight"], adapted["deca.layers.2.weight"])
    shipped = weights.read(work / "deca.safetensors", "deca")  # the adapted encoder ships (fp16)
    assert torch.equal(shipped["layers.2.weight"], adapted["deca.layers.2.weight"].half().float())
    for kind, name in build.FILES.items():
        weights.read(work / name, kind)  # complete and of its kind
        assert (world / name).read_bytes() == (work / name).read_bytes()  # installed as built
    G = weights.read(work / "generator.safetensors", "generator")
    assert G["conv1.conv.weight"].shape[1] == build.generator.ARCH["channels"][4]
    phase1, _, g_step = build.fit.load(work / "generator.ckpt.safetensors")
    phase2, _, e_step = build.fit.load(work / "expression.ckpt.safetensors")
    assert (g_step, e_step) == (20, 4)  # the generator ships after its expression phase
    assert torch.equal(G["convs.4.conv.weight"], phase2["convs.4.conv.weight"].half().float())
    assert not torch.equal(phase1["convs.4.conv.weight"], phase2["convs.4.conv.weight"])
    first = _tensors(work)
    assert build.main(QUICK + ["--work", str(work)]) == 0  # everything is done: nothing trains again, the same files
    again = _tensors(work)
    assert all(torch.equal(first[n][k], again[n][k]) for n in first for k in first[n])


@pytest.mark.slow
def test_an_installed_world_becomes_every_scripts_default(quick_world, tmp_path, capsys):
    """The quick world installed: eval.py and train.py pick it up with no flags, say so, run with the run
    defaults the build recorded (truncation 1, its mask steps and rate), and eval.py adds the ground-truth table."""
    import eval as evaluation
    import train
    _, world = quick_world
    assert weights.embedded() == "world"
    recorded = json.loads((world / "manifest.json").read_text())["defaults"]
    assert recorded["train_steps"] == 4 and recorded["truncation"] == 1.0  # --quick: 4 mask steps
    capsys.readouterr()
    assert evaluation.main(["--pairs", "4", "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC HEAD WORLD" in out and "Ground truth" in out and "truncation 1.0" in out
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    rows = results["results"]
    assert results["settings"]["origin"] == "world"
    assert all(math.isfinite(rows[m]["pose_gt"]) for m in rows) and set(rows) >= {"StyleMask", "source", "target"}
    assert train.main(["--batch", "2", "--eval-pairs", "2", "--out", str(tmp_path / "t")]) == 0
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert (config["truncation"], config["n_layers"], config["lr"], config["steps"]) == (1.0, 9, recorded["train_lr"], 4)
    assert config["origin"] == "world"


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    import cli
    assert cli.run_script(build.main, ["--stages", "generator,paint", "--work", str(tmp_path)]) == 2
    assert "unknown stage 'paint'" in capsys.readouterr().err
    assert cli.run_script(build.main, ["--gen-steps", "0", "--work", str(tmp_path)]) == 2
    assert cli.run_script(build.main, ["--mask-lr", "0", "--work", str(tmp_path)]) == 2  # recorded as train.py's lr
    assert "--mask-lr 0.0: must be a finite number > 0" in capsys.readouterr().err


def test_a_work_folder_of_another_build_is_refused_not_resumed(tmp_path, capsys, monkeypatch):
    """Checkpoints of other training flags or of another world (head, renderer, sampler) are never resumed:
    a one-line error, exit 2, and the folder is left as it was."""
    import cli
    work = tmp_path / "w"
    work.mkdir()
    cfg = build.parse_args(["--work", str(work)])
    record = build.check_work(cfg, work)      # an empty folder: nothing to check against
    assert len(record["world"]) == 16 and record["gen_steps"] == 12000
    (work / "config.json").write_text(json.dumps(record))
    (work / "generator.ckpt.safetensors").write_bytes(b"a checkpoint")
    assert build.check_work(cfg, work) == record  # the same build: resumed
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    assert cli.run_script(build.main, ["--work", str(work), "--gen-steps", "500", "--stages", "report"]) == 2
    assert "--gen-steps 12000 (now 500)" in capsys.readouterr().err
    (work / "config.json").write_text(json.dumps({**record, "world": "0" * 16}))
    before["config.json"] = (work / "config.json").read_bytes()
    assert cli.run_script(build.main, ["--work", str(work), "--stages", "report"]) == 2
    err = capsys.readouterr().err
    assert "another world" in err and "head.py" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before
    # each checkpoint is checked against the flags it depends on: other mask flags leave the generator's valid
    (work / "config.json").write_text(json.dumps(record))
    other = build.parse_args(["--work", str(work), "--mask-steps", "7"])
    assert build.check_work(other, work)["mask_steps"] == 7
    (work / "masks").mkdir()
    with pytest.raises(build.StyleMaskError, match=f"--mask-steps {record['mask_steps']} \\(now 7\\)"):
        build.check_work(other, work)
    # and the fingerprint does follow the head: a changed albedo is another world
    fp = build.world_fingerprint()
    real = build.head.albedo
    monkeypatch.setattr(build.head, "albedo", lambda *a, **k: real(*a, **k) * 0.99)
    assert build.world_fingerprint() != fp
