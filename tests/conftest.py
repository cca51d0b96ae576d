"""Shared test fixtures. Real data lives in ../shared/data (never copied into the project)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data"
REFERENCE = SHARED / "reference"


def shared_path(*parts: str) -> Path:
    """A path under ../shared that must exist: a missing one fails the test loudly, never skips."""
    path = SHARED.joinpath(*parts)
    assert path.exists(), f"shared data missing: {path} (tests read real data from ../shared)"
    return path


@pytest.fixture(autouse=True)
def _one_thread_seeded():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine extra threads
    # make each step far slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
