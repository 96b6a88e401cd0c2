"""The training loop the world's networks share: Adam over a dict of tensors, data drawn from (seed, step)
in a worker process, a progress bar, and a checkpoint that a killed run resumes from exactly.

A network is trained by `fit(...)` from a `Job`: its parameters, which of them train (and at which
learning rate), a `batch(step)` function that draws the step's data from the seed and the step alone (so
the data of a resumed run is the data the uninterrupted run would have seen), and a `loss(P, batch)`
function. The optimiser is torch.optim.Adam (one parameter group per trained tensor, for its own rate).
The checkpoint holds the parameters, Adam's moments and the step, in one parameter file of kind "fit"
(`weights.save`: written atomically, its kind in its header), so a run killed at any moment resumes from
its last checkpoint and ends bit for bit where an uninterrupted run ends.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import cli
import weights
from stylemask import StyleMaskError


@dataclass
class Job:
    """One network's training: name (files and the progress bar), params P, lr (name -> learning rate, for
    the trained tensors only), batch(step) -> data, loss(P, data) -> (loss, {name: float}), steps, and the
    Adam betas; every: steps between checkpoints."""
    name: str
    P: dict
    lr: dict
    batch: Callable
    loss: Callable
    steps: int
    betas: tuple = (0.9, 0.999)
    every: int = 200
    decay: Callable = field(default=lambda step: 1.0)  # learning-rate factor at step


class _Steps(torch.utils.data.IterableDataset):
    """The batches of steps start..stop-1, drawn in a worker process while the main process trains."""

    def __init__(self, batch, start, stop):
        self.batch, self.start, self.stop = batch, start, stop

    def __iter__(self):
        return (self.batch(k) for k in range(self.start, self.stop))


def batches(batch, start, stop, workers=1):
    """An iterator over batch(k) for k in start..stop-1, prefetched by a worker process (0: in this one)."""
    if workers == 0:
        return (batch(k) for k in range(start, stop))
    return iter(torch.utils.data.DataLoader(_Steps(batch, start, stop), batch_size=None, num_workers=workers,
                                            prefetch_factor=4, persistent_workers=False))


def save(path, P, opt, trained, step):
    """Write a checkpoint atomically: P's tensors, Adam's moments of the trained ones and the step."""
    state = {**weights.adam_state(opt, trained), "train.step": torch.tensor(step)}
    weights.save((P, state), path, "fit", step=step)


def load(path):
    """(P, state, step) of a checkpoint written by `save` (state: `weights.adam_state`'s tensors)."""
    try:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # damaged: weights.read names the problem below
        meta = {}
    if "step" in meta and "stylemask" not in meta:
        raise StyleMaskError(f"{path}: a checkpoint of an earlier build (before checkpoints had a kind and "
                             f"torch.optim.Adam's state): delete it to retrain that stage, or use a new --work")
    P, state = weights.read(path, "fit")
    return P, state, int(state["train.step"])


def adam(P, job):
    """torch.optim.Adam over the trained tensors of P, one parameter group per tensor at its own rate
    (no weight decay); -> (optimiser, {name: tensor} of the trained tensors)."""
    trained = {k: P[k] for k in job.lr}
    opt = torch.optim.Adam([{"params": [P[k]], "lr": r} for k, r in job.lr.items()], betas=job.betas, eps=1e-8)
    return opt, trained


def fit(job, work, workers=1, say=print, position=None):
    """Train job.P in place for job.steps steps, checkpointing to work/<name>.ckpt.safetensors and logging
    to work/<name>.log (one JSON line per 10 steps); resumes from the checkpoint if one is there. -> P.
    position: the progress bar's line, when several trainings run at once."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, log_path = work / f"{job.name}.ckpt.safetensors", work / f"{job.name}.log"
    P, start, state = job.P, 0, {}
    if ckpt.is_file():
        saved, state, start = load(ckpt)
        P.update(saved)
        say(f"{job.name}: resuming at step {start} from {ckpt}")
    opt, trained = adam(P, job)
    weights.restore_adam(opt, trained, state, ckpt)
    cli.trim_log(log_path, start - 1)  # lines past the checkpoint belong to the lost part of an interrupted run
    names = list(job.lr)
    bar = tqdm(range(start, job.steps), initial=start, total=job.steps, desc=job.name, unit="step",
               dynamic_ncols=True, position=position)
    data = batches(job.batch, start, job.steps, workers)
    with open(log_path, "a") as log:
        for step in bar:
            for k in names:
                P[k].requires_grad_(True)
            loss, logs = job.loss(P, next(data))
            grads = torch.autograd.grad(loss, [P[k] for k in names])
            for k in names:
                P[k].requires_grad_(False)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{job.name}: the loss is {loss.item()} at step {step}")
            f = job.decay(step)
            for group, k, g in zip(opt.param_groups, names, grads):
                group["lr"], P[k].grad = job.lr[k] * f, g
            opt.step()
            for k in names:
                P[k].grad = None
            if step % 10 == 0:
                log.write(json.dumps({"step": step, "loss": loss.item(), **logs}) + "\n")
                log.flush()
                bar.set_postfix({k: f"{v:.3g}" for k, v in [("loss", loss.item()), *logs.items()]})
            if (step + 1) % job.every == 0 or step + 1 == job.steps:
                save(ckpt, P, opt, trained, step + 1)
    return P
