"""Test-session setup: the Triton interpreter on CPU-only machines, hypothesis profiles, shared fixtures.

TRITON_INTERPRET must be set before `kernels` is imported (triton.jit reads it when it decorates), so
it is set here, first. It changes nothing unless a test asks for the Triton backend. STYLEMASK_DEFAULT=tiny
keeps the scripts' tests on the tiny random defaults whether or not the synthetic world is installed.
"""
import os

import pytest
import torch
from hypothesis import settings

from helpers import SMALL

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Script tests run on the tiny random defaults (fast, every code path); the synthetic head world's own tests
# (tests/test_world_*.py) ask for it by name. Subprocesses inherit this.
os.environ["STYLEMASK_DEFAULT"] = "tiny"

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def G():
    """A small custom generator (helpers.SMALL): every code path of config-f, fast enough for naive loops."""
    from weights import defaults  # here: after TRITON_INTERPRET is set, and only in sessions that use a generator
    return defaults.random_generator(SMALL, seed=1)


@pytest.fixture(scope="module")
def tiny():
    """The tiny default generator (no weights needed)."""
    from weights import defaults
    return defaults.tiny_generator()
