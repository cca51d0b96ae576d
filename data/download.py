"""Fetch what the repository does not ship (run from anywhere):

    python data/download.py imdb       # IMDB -> data/imdb/{train,val,test}.csv and data/imdb/unsup.json
    python data/download.py openai     # OpenAI's 4096-unit mLSTM -> data/openai/mlstm_openai.safetensors

IMDB: Maas et al. (2011) Large Movie Review Dataset v1.0 from Stanford, written as
label,sentence,rating; its 25,000 training reviews are split 20,000 train / 5,000 val (shuffled with a
fixed seed), and its 25,000 test reviews become test.csv. Its 50,000 unlabelled reviews (train/unsup/)
become unsup.json, main.py's default corpus where the original had it: a json list of
{"sentence": text} objects in the archive's order, one per line, which main.py reads with no flag
(the original read a .json file as one json value unless given --loose_json). (Binary SST ships in
data/binary_sst/.)

OpenAI: the 15 .npy shards of the model/ folder of OpenAI's generating-reviews-discovering-sentiment
release (MIT License), each downloaded under a temporary name (an interrupted download resumes on a
rerun), its header checked against the release's layout before it is read, then converted once into
one checkpoint that every script loads as ``--load_model openai``.
Nothing here runs at test time; without network access it stops with a clear message. With the
package installed (pip install -e .), a download reports its progress (a bar on a terminal, lines in a
log).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import json
import math
import random
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_SIZES = {"train": 25000, "test": 25000, "unsup": 50000}  # reviews in each folder of the release
IMDB_VAL = 5  # 1 in 5 training reviews (5,000) goes to val.csv
SEED = 1234
OPENAI_URL = "https://github.com/openai/generating-reviews-discovering-sentiment/raw/master/model/"
NPY_HEADER_MAX = 4096  # bytes; numpy writes ~128: a larger header is not a plain array file


class DownloadError(Exception):
    pass


def progress(**kwargs):
    """The package's progress report (a bar on a terminal, lines in a log), or none where the package is
    not installed (a download needs only the standard library)."""
    try:
        from sentiment_discovery.progress import progress_bar
    except ImportError:
        return contextlib.nullcontext(SimpleNamespace(update=lambda n=1: None))
    return progress_bar(**kwargs)


def fetch(
    url: str, dest: Path, max_bytes: int | None = None, check: Callable[[Path], None] | None = None
) -> None:
    """Download ``url`` to ``dest`` through ``dest.part``, renamed once every byte arrived and ``check``
    (which raises DownloadError) accepts it: a file at ``dest`` is always complete.

    An interrupted download leaves its ``.part``, which the next call resumes (an HTTP range request;
    a server that ignores it sends the whole file again). More than ``max_bytes`` is refused.
    """
    print(f"downloading {url}")
    partial = dest.with_name(dest.name + ".part")
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            content_range = response.headers.get("Content-Range", "")
            resumed = have > 0 and response.status == 206 and content_range.startswith(f"bytes {have}-")
            if not resumed:
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length and length.isdigit() else None
            if max_bytes is not None and total is not None and total > max_bytes:
                raise DownloadError(f"{url}: {total:,} bytes, more than the {max_bytes:,} expected")
            name = f"downloading {url.rsplit('/', 1)[-1]}"
            with (
                open(partial, "ab" if resumed else "wb") as out,
                progress(total=total, initial=have, desc=name, unit="B", unit_scale=True) as bar,
            ):
                while block := response.read(1 << 20):
                    received += len(block)
                    if max_bytes is not None and have + received > max_bytes:
                        raise DownloadError(f"{url}: more than the {max_bytes:,} bytes expected")
                    out.write(block)
                    bar.update(len(block))
            if total is not None and have + received < total:
                raise http.client.IncompleteRead(b"", total - have - received)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file is no prefix of this one: start over
            partial.unlink()
            return fetch(url, dest, max_bytes, check)
        partial.unlink(missing_ok=True)
        raise DownloadError(f"could not download {url}: HTTP {e.code} {e.reason}") from None
    except DownloadError:
        partial.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", None) or str(e) or type(e).__name__
        hint = "offline?"
        if partial.exists():
            hint = f"{have + received:,} bytes kept in {partial}: rerun to resume"
        raise DownloadError(f"could not download {url}: {reason} ({hint})") from None
    if check is not None:
        try:
            check(partial)
        except DownloadError:
            partial.unlink()
            raise
    partial.replace(dest)


def _imdb_reviews(archive: tarfile.TarFile, expected: int) -> dict[str, list]:
    """The reviews of the release in archive order, per folder: (label, text, rating) for train and test
    (label 1 for pos/, 0 for neg/, the rating from the file name), the text for train/unsup/."""
    name = re.compile(r"aclImdb/(train|test)/(pos|neg|unsup)/\d+_(\d+)\.txt$")
    reviews: dict[str, list] = {"train": [], "test": [], "unsup": []}
    with progress(total=expected, desc="reading the archive", unit="review") as bar:
        for member in archive:  # one pass in archive order: a gzip stream reads forward
            match = name.match(member.name)
            if not match:
                continue
            split, folder, rating = match.groups()
            text = archive.extractfile(member).read().decode("utf-8")
            if folder == "unsup":
                reviews["unsup"].append(text)
            else:
                reviews[split].append((int(folder == "pos"), text, int(rating)))
            bar.update(1)
    return reviews


def _write(path: Path, rows: list[tuple[int, str, int]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "sentence", "rating"])
        writer.writerows(rows)


def _write_unsup(path: Path, texts: list[str]) -> None:
    """A json list, one {"sentence": text} object per line (readable without --loose_json)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        f.write(",\n".join(json.dumps({"sentence": text}, ensure_ascii=False) for text in texts))
        f.write("\n]\n")


def download_imdb(root: Path, url: str = IMDB_URL, sizes: dict[str, int] = IMDB_SIZES) -> None:
    """IMDB into ``root/imdb/``: train/val/test.csv and unsup.json. ``sizes``: the reviews expected in
    each folder of the archive (a different count is refused)."""
    folder = root / "imdb"
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tarball = Path(tmp) / "aclImdb_v1.tar.gz"
        fetch(url, tarball)
        with tarfile.open(tarball) as archive:
            reviews = _imdb_reviews(archive, sum(sizes.values()))
    got = {split: len(rows) for split, rows in reviews.items()}
    if got != sizes:
        expected = ", ".join(f"{n:,} {split}" for split, n in sizes.items())
        found = ", ".join(f"{n:,} {split}" for split, n in got.items())
        raise DownloadError(f"{url}: expected {expected} reviews, got {found}")
    train, test = reviews["train"], reviews["test"]
    random.Random(SEED).shuffle(train)
    random.Random(SEED).shuffle(test)
    val = len(train) // IMDB_VAL
    _write(folder / "train.csv", train[val:])
    _write(folder / "val.csv", train[:val])
    _write(folder / "test.csv", test)
    _write_unsup(folder / "unsup.json", reviews["unsup"])
    unsup = len(reviews["unsup"])
    print(f"IMDB in {folder}: train.csv, val.csv, test.csv, and unsup.json ({unsup:,} unlabelled reviews)")


# --------------------------------------------------------------------------------------------
# OpenAI's released model
# --------------------------------------------------------------------------------------------


def npy_header(path: Path) -> tuple[tuple[int, ...], str, int]:
    """Shape, dtype and data offset of a ``.npy`` file, read from its header alone (bounded in size)."""
    import numpy as np

    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f, max_header_size=NPY_HEADER_MAX)
        except (ValueError, OSError) as e:
            raise DownloadError(f"{path}: not a plain .npy array ({e})") from None
        return shape, dtype.str, f.tell()


def check_openai_shard(path: Path, index: int, expected: tuple[int, ...]) -> None:
    """``index.npy`` must be float32 of the ``expected`` shape (docs/formats.md) and hold exactly its bytes.
    Files 2-5 (column blocks of Wh) need the rows and at most the columns of ``expected``."""
    shape, dtype, offset = npy_header(path)
    if 2 <= index <= 5:
        fits = len(shape) == 2 and shape[0] == expected[0] and 1 <= shape[1] <= expected[1]
        want = f"({expected[0]}, <= {expected[1]})"
    else:
        fits, want = shape == expected, str(expected)
    if not fits or dtype != "<f4":
        raise DownloadError(f"{path}: shape {shape} {dtype}, expected {want} float32 (<f4) for {index}.npy")
    size, needed = path.stat().st_size, offset + 4 * math.prod(shape)
    if size != needed:
        raise DownloadError(f"{path}: {size:,} bytes where its header announces {needed:,}: truncated?")


def download_openai(root: Path, url: str = OPENAI_URL, hidden: int | None = None) -> Path:
    """Fetch and check the 15 shards into ``root/openai/shards/``, convert them into ``root/OPENAI_MODEL``
    and delete them. ``hidden`` sets H of the expected shapes (default: the release's 4096)."""
    try:
        from sentiment_discovery.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
        from sentiment_discovery.formats import OPENAI_HIDDEN, OPENAI_MODEL, openai_shard_shapes
    except ImportError as e:
        raise DownloadError(f"{e}: install the package first (pip install -e . in the repository)") from None
    dest = root / OPENAI_MODEL
    if dest.exists():
        print(f"{dest} is already there (delete it to download again)")
        return dest
    shard_dir = dest.parent / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    shapes = openai_shard_shapes(hidden or OPENAI_HIDDEN)
    for index, shape in enumerate(shapes):
        shard = shard_dir / f"{index}.npy"
        if shard.exists():  # renamed into place only after its check passed
            continue
        max_bytes = NPY_HEADER_MAX + 4 * math.prod(shape)
        check = lambda path, index=index, shape=shape: check_openai_shard(path, index, shape)
        fetch(url.rstrip("/") + f"/{index}.npy", shard, max_bytes, check)
    try:
        ckpt = load_checkpoint(shard_dir)
        save_checkpoint(dest, ckpt.model, extra=ckpt.extra)
    except CheckpointError as e:
        raise DownloadError(str(e)) from None
    shutil.rmtree(shard_dir)
    config = ckpt.config
    print(
        f"wrote {dest}: OpenAI's {config.model} (1 x {config.nhid} units, OpenAI's text preprocessing"
        + (f", sentiment neuron {ckpt.extra['default_neuron']})" if "default_neuron" in ckpt.extra else ")")
    )
    print(
        "use it from the repository root as --load_model openai, e.g.\n"
        "    python transfer.py --load_model openai                 # Binary SST: the sentiment neuron\n"
        "    python classifier.py --load_model openai_transfer/classifier.pt --text \"A gem.\"\n"
        "    python generate.py --load_model openai --gen_length 200 --text \"This movie\" --overwrite 1"
    )
    return dest


def main(argv: list[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("what", nargs="+", choices=("imdb", "openai"), help="what to download")
    parser.add_argument("--root", default=str(HERE), help="folder to write into (default: this folder)")
    parser.add_argument("--openai_url", default=OPENAI_URL, help="where OpenAI's 0.npy ... 14.npy are")
    args = parser.parse_args(argv)
    downloaders = {"imdb": download_imdb, "openai": lambda root: download_openai(root, args.openai_url)}
    try:
        for name in dict.fromkeys(args.what):
            downloaders[name](Path(args.root))
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
