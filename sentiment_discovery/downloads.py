"""What ``python data/download.py`` fetches: a script that misses one of those files says how to get it."""

from __future__ import annotations

from pathlib import Path

# data/download.py's outputs under its default --root (data/), as the scripts' defaults name them:
# relative to the repository root
DOWNLOADED_FILES = {
    Path("data/imdb") / name: "python data/download.py imdb"
    for name in ("unsup.json", "train.csv", "val.csv", "test.csv")
}


def download_hint(path: str | Path) -> str:
    """`` (run `python data/download.py ...` in the repository root to get it)`` for a file that
    download.py writes (however the path is spelled: ./data/imdb/unsup.json, /abs/data/imdb/...), else ''."""
    relative = Path(*Path(path).parts[-3:])  # data/imdb/<file>
    command = DOWNLOADED_FILES.get(relative)
    return f" (run `{command}` in the repository root to get it)" if command else ""
