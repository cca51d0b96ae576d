"""Shared test fixtures. Tests read only what the repository holds: small real data under tests/fixtures/."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def fixture_path(*parts: str) -> Path:
    """A file under tests/fixtures/ (see its README) that must exist: a missing one fails loudly."""
    path = FIXTURES.joinpath(*parts)
    assert path.exists(), f"test fixture missing: {path}"
    return path


def load_script(name: str):
    """A top-level script (main.py, transfer.py ...) imported as a module, to call its ``main(argv)``."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def keep_checkpoint_at_step(monkeypatch, step: int, saved: Path, copy: Path) -> None:
    """Make ``Trainer.save`` also copy ``saved`` to ``copy`` right after the save at ``step`` (to resume
    from that point later, as a run killed there would)."""
    from sentiment_discovery.train import Trainer

    real_save = Trainer.save

    def save_and_keep(trainer):
        real_save(trainer)
        if trainer.step == step:
            shutil.copy(saved, copy)

    monkeypatch.setattr(Trainer, "save", save_and_keep)


@pytest.fixture(autouse=True)
def _matmul_decisions_in_tmp(tmp_path_factory, monkeypatch):
    # Each test starts with no MKL/oneDNN decisions and never reads or writes the user's own.
    from sentiment_discovery import matmul

    monkeypatch.setenv(matmul.DECISIONS_ENV, str(tmp_path_factory.mktemp("matmul-decisions")))


@pytest.fixture(autouse=True)
def _one_thread_seeded():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine extra threads
    # make each step far slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
