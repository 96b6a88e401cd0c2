"""world.fit: a run killed at a checkpoint resumes to exactly the parameters of an uninterrupted run (data drawn
from the step, torch.optim.Adam's moments and the step restored from a checkpoint written through weights)."""
import pytest
import torch

import weights
from world import fit


def _job(steps, every=2):
    P = {"w": torch.zeros(3), "b": torch.zeros(())}
    true_w = torch.tensor([1.0, -2.0, 0.5])

    def batch(k):
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(k))
        return x, x @ true_w + 0.3

    def loss(P, data):
        x, y = data
        return ((x @ P["w"] + P["b"] - y) ** 2).mean(), {}
    return fit.Job("toy", P, {"w": 0.3, "b": 0.3}, batch, loss, steps, every=every)


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    whole = fit.fit(_job(7), tmp_path / "a", workers=0, say=lambda *_: None)
    fit.fit(_job(4), tmp_path / "b", workers=0, say=lambda *_: None)   # "killed" after its step-4 checkpoint
    said = []
    resumed = fit.fit(_job(7), tmp_path / "b", workers=0, say=said.append)
    assert said and "resuming at step 4" in said[0]
    for k in whole:
        assert torch.equal(whole[k], resumed[k])
    assert (whole["w"] - torch.tensor([1.0, -2.0, 0.5])).abs().max() < 1.0  # it learns
    assert weights.header(tmp_path / "b" / "toy.ckpt.safetensors", "fit")["step"] == "7"  # a file of its kind
    lines = (tmp_path / "b" / "toy.log").read_text().splitlines()
    assert [int(l.split(",")[0].split(":")[1]) for l in lines] == [0]  # one line per 10 steps, none repeated


def test_workers_draw_the_same_batches(tmp_path):
    a = fit.fit(_job(5), tmp_path / "a", workers=0, say=lambda *_: None)
    b = fit.fit(_job(5), tmp_path / "b", workers=1, say=lambda *_: None)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_of_an_earlier_build_and_damaged_ones_are_one_line_errors(tmp_path):
    from safetensors.torch import save_file
    old = tmp_path / "old.ckpt.safetensors"  # the format before checkpoints had a kind: no header kind
    save_file({"p.w": torch.zeros(3), "m.w": torch.zeros(3), "v.w": torch.zeros(3)}, str(old), metadata={"step": "4"})
    with pytest.raises(weights.StyleMaskError, match="a checkpoint of an earlier build .* delete it to retrain"):
        fit.load(old)
    with pytest.raises(weights.StyleMaskError, match=r"no such file \(a training checkpoint"):
        fit.load(tmp_path / "absent.ckpt.safetensors")
    fit.fit(_job(2), tmp_path / "a", workers=0, say=lambda *_: None)
    P, state, step = fit.load(tmp_path / "a" / "toy.ckpt.safetensors")
    del state["train.adam.b.exp_avg_sq"]
    weights.save((P, state), tmp_path / "a" / "toy.ckpt.safetensors", "fit", step=step)
    with pytest.raises(weights.StyleMaskError, match="Adam's state of b is missing: the checkpoint is damaged"):
        fit.fit(_job(4), tmp_path / "a", workers=0, say=lambda *_: None)
