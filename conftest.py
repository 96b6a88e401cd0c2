"""Test-session setup: the Triton interpreter on CPU-only machines, and hypothesis profiles.

TRITON_INTERPRET must be set before `kernels` is imported (triton.jit reads it when it decorates), so
it is set here, first. It changes nothing unless a test asks for the Triton backend.
"""
import os

import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
