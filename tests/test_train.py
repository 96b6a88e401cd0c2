"""train.py on the tiny defaults: it learns, it resumes exactly, and it refuses bad checkpoints."""
import json

import pytest
import torch

import stylemask as sm
from weights import defaults
import train
import weights

# Small and quick, but the real loop: the cycle loss on, every loss term, the tiny default's lr.
FAST = ["--batch", "2", "--eval-pairs", "4", "--log-every", "1", "--lr", "1e-2"]
LEARN = ["--batch", "4", "--eval-pairs", "8", "--log-every", "1", "--lr", "1e-2"]


@pytest.fixture(autouse=True)
def no_real_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "DIR", tmp_path / "no-weights")


def _log(out):
    return [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_short_run_lowers_the_held_out_loss(tmp_path):
    out = tmp_path / "run"
    assert train.main(LEARN + ["--steps", "60", "--save-every", "30", "--out", str(out)]) == 0
    log = _log(out)
    held = {r["step"]: r["held_out_loss"] for r in log if "held_out_loss" in r}
    assert list(held) == [0, 30, 60]  # the untrained masks' loss first, then at every checkpoint
    assert held[60] < 0.85 * held[0], held  # a clear margin on pairs never trained on
    assert (out / "grid_000060.png").is_file() and json.loads((out / "config.json").read_text())["origin"] == "tiny"
    assert set(log[1]) >= {"step", "loss", "shape", "id", "eye", "mouth", "cycle_shape", "cycle_id", "ms_per_step"}


def test_resume_equals_an_uninterrupted_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(FAST + ["--steps", "6", "--save-every", "3", "--out", str(straight)]) == 0
    assert train.main(FAST + ["--steps", "3", "--save-every", "3", "--out", str(split)]) == 0
    with open(split / "log.jsonl", "a") as f:  # a killed run may have logged steps past its checkpoint
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    assert train.main(FAST + ["--steps", "6", "--save-every", "3", "--out", str(split),
                              "--resume", str(split / "checkpoint.safetensors")]) == 0
    a, b = _log(straight), _log(split)
    assert [r["step"] for r in b] == list(range(0, 7))  # step 0: the untrained masks' held-out loss
    for ra, rb in zip(a[1:], b[1:]):
        assert ra["loss"] == rb["loss"] and ra["shape"] == rb["shape"], (ra, rb)
    (Ma, state_a), (Mb, state_b) = (weights.read(run / "checkpoint.safetensors", "checkpoint") for run in (straight, split))
    Ma, Mb = {**Ma.params, **state_a}, {**Mb.params, **state_b}
    assert Ma.keys() == Mb.keys() and all(torch.equal(Ma[k], Mb[k]) for k in Ma)


def test_bad_checkpoints_give_one_line_and_touch_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    for ckpt, message in ((tmp_path / "absent.safetensors", "no such file"), (bad, "not a readable safetensors")):
        with pytest.raises(sm.StyleMaskError, match=message):
            train.main(FAST + ["--steps", "2", "--out", str(out), "--resume", str(ckpt)])
    M = sm.init_mask(defaults.tiny_generator())
    weights.save(M, tmp_path / "weights_only.safetensors", "masknet")
    with pytest.raises(sm.StyleMaskError, match="no training state"):
        train.main(FAST + ["--steps", "2", "--out", str(out), "--resume", str(tmp_path / "weights_only.safetensors")])
    assert (out / "log.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    assert not (out / "checkpoint.safetensors").exists()


def test_ablation_flags_build_the_right_masks(tmp_path):
    for flags, check in ((["--space", "W"], lambda M: M.space == "W" and M.dims == [32] * 12),
                         (["--mask", "global"], lambda M: "network_global.masknet.0.weight" in M.params),
                         (["--no-cycle", "--no-eye", "--no-mouth"], lambda M: "network_00.masknet.0.weight" in M.params)):
        out = tmp_path / "_".join(flags)
        assert train.main(FAST + ["--steps", "2", "--save-every", "2", "--out", str(out)] + flags) == 0
        assert check(weights.read(out / "masknet.safetensors", "masknet"))
    log = _log(tmp_path / "--no-cycle_--no-eye_--no-mouth")
    assert "cycle_shape" not in log[1] and "eye" not in log[1]
