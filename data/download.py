"""Fetch the transfer datasets into this folder (run from anywhere):

    python data/download.py            # both
    python data/download.py sst        # Binary SST -> data/binary_sst/{train,val,test}.csv
    python data/download.py imdb       # IMDB -> data/imdb/{train,val,test}.csv

Binary SST: the raw-text binary split (label,sentence) distributed with the NVIDIA
sentiment-discovery repository. IMDB: Maas et al. (2011) Large Movie Review Dataset v1.0 from
Stanford, written as label,sentence,rating; its 25,000 training reviews are split 20,000 train /
5,000 val (shuffled with a fixed seed), and its 25,000 test reviews become test.csv.
Nothing here runs at test time; without network access it stops with a clear message.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
SST_URL = "https://raw.githubusercontent.com/NVIDIA/sentiment-discovery/master/data/binary_sst/{split}.csv"
IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_VAL = 5000
SEED = 1234


class DownloadError(Exception):
    pass


def fetch(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` through a temporary name: never a half-written file."""
    print(f"downloading {url}")
    partial = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"could not download {url}: {getattr(e, 'reason', e)} (offline?)") from None
    partial.replace(dest)


def download_sst(root: Path) -> None:
    folder = root / "binary_sst"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        dest = folder / f"{split}.csv"
        fetch(SST_URL.format(split=split), dest)
        with open(dest, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if header[:2] != ["label", "sentence"]:
            raise DownloadError(f"{dest}: unexpected header {header}; the source may have moved")
    print(f"Binary SST in {folder}")


def _imdb_rows(archive: tarfile.TarFile, split: str) -> list[tuple[int, str, int]]:
    rows = []
    name = re.compile(rf"aclImdb/{split}/(pos|neg)/\d+_(\d+)\.txt$")
    for member in archive.getmembers():
        match = name.match(member.name)
        if match:
            text = archive.extractfile(member).read().decode("utf-8")
            rows.append((int(match.group(1) == "pos"), text, int(match.group(2))))
    return rows


def _write(path: Path, rows: list[tuple[int, str, int]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "sentence", "rating"])
        writer.writerows(rows)


def download_imdb(root: Path) -> None:
    folder = root / "imdb"
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tarball = Path(tmp) / "aclImdb_v1.tar.gz"
        fetch(IMDB_URL, tarball)
        with tarfile.open(tarball) as archive:
            train, test = _imdb_rows(archive, "train"), _imdb_rows(archive, "test")
    if len(train) != 25000 or len(test) != 25000:
        got = f"{len(train)} train and {len(test)} test reviews"
        raise DownloadError(f"{IMDB_URL}: expected 25,000 train and 25,000 test reviews, got {got}")
    random.Random(SEED).shuffle(train)
    random.Random(SEED).shuffle(test)
    _write(folder / "train.csv", train[IMDB_VAL:])
    _write(folder / "val.csv", train[:IMDB_VAL])
    _write(folder / "test.csv", test)
    print(f"IMDB in {folder}")


def main(argv: list[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("datasets", nargs="*", metavar="{sst,imdb}", help="default: both")
    parser.add_argument("--root", default=str(HERE), help="folder to write into (default: this folder)")
    args = parser.parse_args(argv)
    downloaders = {"sst": download_sst, "imdb": download_imdb}
    unknown = [d for d in args.datasets if d not in downloaders]
    if unknown:
        parser.error(f"unknown dataset(s) {', '.join(unknown)}: choose sst and/or imdb")
    try:
        for name in dict.fromkeys(args.datasets or downloaders):
            downloaders[name](Path(args.root))
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
