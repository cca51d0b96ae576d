"""The files of a training run beside ``--save``: the path checked before training, the lock held while
it runs (``SaveLock``), the best model, metrics log (``MetricsLog``) and plot beside it (``sibling``),
the snapshot series (``snapshot_path``, ``prune_snapshots``), the temporary files a killed write left,
and earlier outputs moved aside rather than overwritten. ``RunFiles`` names them all once for the
Trainer.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from . import distributed
from .checkpoint import check_replaceable, stale_temp_files
from .errors import UsageError
from .safe_io import NAME_MAX, refuse_symlink, sibling_name

# bytes a name beside --save may add to <stem>.metrics.jsonl: a snapshot's step, a moved-aside date
SIBLING_MARGIN = 20


def sibling(save: str | Path, suffix: str) -> Path:
    """``lang_model.pt`` + ``.best.pt`` -> ``lang_model.best.pt``: outputs that live beside ``--save``."""
    save = Path(save)
    return save.with_name(save.stem + suffix)


def snapshot_path(save: str | Path, step: int | str) -> Path:
    """``lang_model.pt`` at step 2000 -> ``lang_model.step2000.pt``: one checkpoint of the series
    (step ``"*"``: the glob pattern of them all)."""
    return sibling(save, f".step{step}.pt")


def snapshots(save: str | Path) -> list[tuple[int, Path]]:
    """The snapshot series of ``save`` that exists, as (step, path) by step."""
    save = Path(save)
    pattern = re.compile(re.escape(save.stem) + r"\.step(\d+)\.pt")
    found = ((pattern.fullmatch(p.name), p) for p in save.parent.glob(snapshot_path(save, "*").name))
    return sorted((int(m.group(1)), p) for m, p in found if m)


def prune_snapshots(save: str | Path, step: int, keep: int) -> list[Path]:
    """Delete all but the last ``keep`` snapshots of ``save`` up to ``step``; returns those deleted.

    Snapshots beyond ``step`` (left by another run with the same ``--save``) are not this run's to delete.
    """
    found = [(n, p) for n, p in snapshots(save) if n <= step]
    doomed = [p for _, p in found[: max(0, len(found) - keep)]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def check_save_path(save: str | Path) -> None:
    """Fail before training, not after it: ``--save`` must be a writable file path of a format that can
    hold a training state (a ``.safetensors`` file holds weights only)."""
    if not str(save):
        raise UsageError("--save is empty: give the checkpoint's file path")
    save = Path(save)
    if save.suffix == ".safetensors":
        raise UsageError(
            f"--save {save}: a .safetensors file holds weights only, not the training state a run "
            "checkpoints; save as .pt (python -m sentiment_discovery.convert makes a .safetensors copy)"
        )
    files = RunFiles(save)
    longest = files.metrics.name
    if len(longest.encode()) + SIBLING_MARGIN > NAME_MAX:
        raise UsageError(
            f"--save {save}: the outputs beside it ({longest} ...) would pass the file system's "
            f"{NAME_MAX}-byte limit on a name; use a shorter name"
        )
    for path in (files.best, files.metrics, files.plot):
        refuse_symlink(path)  # a planted link: refused, not written through nor moved aside
        if path.is_dir():
            raise UsageError(f"--save {save}: {path} is a directory, expected a file path")
    check_replaceable(save, "--save")  # a new path or one of our checkpoints (by content), never data
    parent = save.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"--save {save}: {parent} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--save {save}: cannot create its folder {parent} ({e.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK) or (save.exists() and not os.access(save, os.W_OK)):
        raise UsageError(f"--save {save}: not writable")


class SaveLock:
    """An exclusive lock on ``--save``'s stem (``fcntl.flock`` of ``.<stem>.lock`` beside it) held for
    the whole run, so that two runs never write the same checkpoint, best model, metrics and plot (``d/m.pt``
    and ``d/m.pth`` share those, and so their lock). The lock
    file goes when the run ends."""

    def __init__(self, save: str | Path):
        save = Path(save)
        self.save, self.path = save, sibling_name(save.with_name(save.stem), ".", ".lock")
        self.file = None

    def acquire(self) -> None:
        while True:
            file = self.path.open("a+")
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = file.read().strip() or "unknown"
                file.close()
                raise UsageError(
                    f"--save {self.save}: another run (pid {holder}) is writing to it (lock {self.path}); "
                    "wait for it to end or choose another --save"
                ) from None
            # the holder before us may have removed the file after we opened it: lock the file that is there
            try:
                if os.stat(self.path).st_ino == os.fstat(file.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            file.close()
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self.file = file

    def release(self) -> None:
        if self.file is not None:
            self.path.unlink(missing_ok=True)  # while still locked: no other run holds this file
            self.file.close()
            self.file = None

    def acquire_on_main(self) -> None:
        """Rank 0 locks (it alone writes beside --save) and removes a killed save's temp files; every
        process learns whether that worked, so that none waits on a rank that refused to run."""
        refused = None
        if distributed.is_main_process():
            try:
                self.acquire()
            except ValueError as e:
                refused = str(e)
            else:
                for tmp in remove_stale_temp_files(self.save):
                    print(f"removed {tmp}, left by an interrupted checkpoint write")
        refused = distributed.broadcast(refused)
        if refused:
            raise UsageError(refused)

    def __enter__(self) -> SaveLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_temp_files(save: str | Path) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files that a killed checkpoint write left beside ``--save``, its best
    model and its snapshots (call it while holding the SaveLock: no write of this --save is under way)."""
    files = RunFiles(save)
    removed = []
    for path in (files.save, files.best, snapshot_path(save, "*")):
        for tmp in stale_temp_files(path):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def move_aside(path: Path) -> Path | None:
    """Rename ``path`` (if it exists) to ``<stem>.<its mtime>.<suffix>``, never over another file."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    stem, suffix = path.name[: -len(path.suffix)], path.suffix
    target, n = path.with_name(f"{stem}.{stamp}{suffix}"), 1
    while target.exists():
        target, n = path.with_name(f"{stem}.{stamp}-{n}{suffix}"), n + 1
    os.replace(path, target)
    return target


class MetricsLog:
    """One json object per line: step, epoch, bytes_seen, train_bpc, val_bpc, test_bpc, lr, chars_per_s."""

    FIELDS = ("step", "epoch", "bytes_seen", "train_bpc", "val_bpc", "test_bpc", "lr", "chars_per_s")

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        kept = []
        if resume_step is not None and path.exists() and not path.is_symlink():
            # a resumed run keeps what was logged up to its checkpoint, not what came after it
            kept = [r for r in self.read(path) if r["step"] <= resume_step and r["test_bpc"] is None]
        path.parent.mkdir(parents=True, exist_ok=True)
        refuse_symlink(path)  # appended to line by line: never through a planted link
        with path.open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, **values) -> None:
        row = {k: values.get(k) for k in self.FIELDS}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    @staticmethod
    def read(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunFiles:
    """The files of the training run that writes ``save``, named once: ``save`` itself, ``best`` (the best
    model by validation), ``metrics`` (the log) and ``plot`` (its picture), and the snapshot series."""

    def __init__(self, save: str | Path):
        self.save = Path(save)
        self.best = sibling(save, ".best.pt")
        self.metrics = sibling(save, ".metrics.jsonl")
        self.plot = sibling(save, ".bpc.png")

    def take_over(self, load: str | None, resumed: bool, log: Callable[[str], object]) -> None:
        """The checkpoint, best model, metrics and plot beside ``save`` belong to one run: a run resumed
        from ``save`` continues them; a new run (or one resumed from another ``load``) moves what is there
        aside (never overwritten by a new run's first save, a worse model, never truncated), and a run
        resumed into another --save brings the loaded run's best model and metrics along."""
        if resumed and (not load or Path(load).resolve() == self.save.resolve()):
            return
        series = [path for _, path in snapshots(self.save)]
        for path in (self.save, self.best, self.metrics, self.plot, *series):
            moved = move_aside(path)
            if moved is not None:
                log(f"{path} is another run's: moved it aside to {moved}")
        if resumed:
            loaded = RunFiles(load)
            for theirs, own in ((loaded.best, self.best), (loaded.metrics, self.metrics)):
                if theirs.is_file():
                    shutil.copy2(theirs, own)
