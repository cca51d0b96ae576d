"""Shared test fixtures. Real data lives in ../shared/data (never copied into the project)."""

from __future__ import annotations

import importlib.util
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


def load_script(name: str):
    """A top-level script (main.py, transfer.py ...) imported as a module, to call its ``main(argv)``."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread_seeded():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine extra threads
    # make each step far slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
