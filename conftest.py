"""Hypothesis profiles, chosen with HYPOTHESIS_PROFILE (default: ci)."""
import os

from hypothesis import settings

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
