"""Writing output files safely: whole or not at all, never through a symlink planted at the destination.

Every output goes to a temporary file in the destination's folder, is flushed to disk, then renamed
over the destination. A destination that is a symlink is refused: following it would overwrite
whatever it points to, and replacing it silently would hide that someone planted it. A write that
fails (disk full, quota, permissions) is one ``OutputError`` line naming the destination.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import OutputError

NAME_MAX = 255  # bytes of one file name on Linux, macOS and Windows file systems
_RANDOM_PART = 8  # the characters tempfile.mkstemp puts between prefix and suffix


def short_name(name: str, reserve: int = 0) -> str:
    """``name``, or when it and ``reserve`` more bytes would pass ``NAME_MAX``, its start and a hash of the
    whole: distinct names stay distinct, and any legal name leaves room for the affixes it gets."""
    limit = NAME_MAX - reserve
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    head = name.encode()[: limit - len(digest) - 1].decode(errors="ignore")
    return f"{head}~{digest}"


def sibling_name(path: str | os.PathLike, prefix: str = ".", suffix: str = "") -> Path:
    """``<prefix><name><suffix>`` beside ``path`` (a lock, a marker), its name within ``NAME_MAX``."""
    path = Path(path)
    return path.with_name(
        prefix + short_name(path.name, len(prefix.encode()) + len(suffix.encode())) + suffix
    )


def temp_affixes(path: str | os.PathLike) -> tuple[str, str]:
    """Prefix and suffix of the temporary files that writes of ``path`` use (``.<name>.*.tmp``), short
    enough that the whole temporary name fits ``NAME_MAX``."""
    name = short_name(Path(path).name, len(".") + len(".") + _RANDOM_PART + len(".tmp"))
    return f".{name}.", ".tmp"


def refuse_symlink(path: str | os.PathLike) -> None:
    """An ``OutputError`` when ``path`` is a symlink: outputs never write through one."""
    if os.path.islink(path):
        raise OutputError(
            f"{path}: is a symlink (to {os.readlink(path)}); refusing to write through it: remove it "
            "or choose another output path"
        )


def check_output(path: str | os.PathLike, flag: str) -> None:
    """Before any work: an output file ``path`` (given by ``flag``) can be written: not a symlink nor a
    folder, its folder there (created) and writable, an existing file writable; an ``OutputError``
    naming the flag otherwise."""
    path = Path(path)
    refuse_symlink(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path}: is a directory, expected a file path")
    check_output_folder(path.parent, flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{flag} {path}: not writable")


def check_output_folder(folder: str | os.PathLike, flag: str) -> None:
    """Before any work: ``folder`` exists (created) and files can be created in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{flag}: cannot create the folder {folder} ({e.strerror or e})") from None
    if not folder.is_dir():
        raise OutputError(f"{flag}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{flag}: cannot write in {folder} (permission denied)")


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def _reason(error: BaseException, folder: Path) -> str:
    """The cause of a failed write in words; torch.save's C++ writer reports a full disk only as
    ``basic_ios::clear: iostream error`` or ``unexpected pos``."""
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or _disk_full(folder):
        return "no space left on the device"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], mode: int = 0o666) -> None:
    """``write(tmp)`` a temporary file beside ``path``, flush it to disk, rename it over ``path``: the
    destination is the whole new file or the old one, never half of one, and never a symlink's target.

    ``mode`` (less the umask) is the file's permissions: mkstemp's owner-only default is not wanted
    for ordinary outputs."""
    path = Path(path)
    refuse_symlink(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix, suffix = temp_affixes(path)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write it ({_reason(e, path.parent)})") from None
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, mode & ~umask)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        refuse_symlink(path)  # planted while we wrote
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, OutputError):
            raise OutputError(f"{path}: writing it failed ({_reason(e, path.parent)})") from None
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``path`` holds ``data`` (atomically, see ``atomic_write``)."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    """``path`` holds ``text`` as UTF-8 (atomically, see ``atomic_write``)."""
    write_bytes(path, text.encode("utf-8"))


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> None:
    """A matplotlib figure as ``path`` (its format from the suffix), atomically."""
    fmt = Path(path).suffix.lstrip(".") or None
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig_kwargs))


def save_npy(path: str | os.PathLike, array) -> None:
    """``numpy.save`` to exactly ``path``, atomically."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


JSON_SUFFIXES = (".json", ".jsonl")  # a table path with these is json (readers.is_json_path), else csv


def write_table(frame, path: str | Path) -> None:
    """A pandas ``frame`` as json records when ``path`` ends in .json (.jsonl: one object per line), csv
    otherwise (the forms readers.py reads back); written atomically, its folder made if need be."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in JSON_SUFFIXES:
        lines = path.suffix.lower() == ".jsonl"
        atomic_write(path, lambda tmp: frame.to_json(tmp, orient="records", lines=lines, force_ascii=False))
    else:
        atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
