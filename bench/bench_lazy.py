"""Peak memory and throughput of building the --lazy cache of a loose-json corpus, by corpus size.

    python bench/bench_lazy.py --sizes 20 1000 [--workdir /tmp/lazy_bench]

Each size gets a synthetic corpus of review-like json lines (50-400 words, html tags and entities
as in Amazon reviews, one text in five with a non-ASCII word; an 8 MB block repeated), built into
a cache in a fresh process; that process reports its own peak RSS and that of its encoding
workers (resource.getrusage). Corpus and cache are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "great good bad terrible movie book film plot actor story <br /> &amp; &quot;fine&quot; the a of "
    "really quite never always loved hated boring wonderful <i>must</i> see it was and to this"
).split()
NON_ASCII = ("caf\u00e9", "na\u00efve", "\u201cquoted\u201d", "it\u2019s", "\u2605\u2605\u2605")

CHILD = """
import json, resource, sys, time
from pathlib import Path
from sentiment_discovery.lazycache import lazy_corpus
path = Path(sys.argv[1])
cpu_before = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
start = time.perf_counter()
corpus = lazy_corpus(path, text_key="reviewText", loose_json=True, rebuild=True)
seconds = time.perf_counter() - start
use = {who: resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)}
main, workers = (use[who].ru_maxrss / 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
cpu = sum(u.ru_utime + u.ru_stime for u in use.values()) - cpu_before
result = {"seconds": seconds, "cpu_seconds": cpu, "samples": corpus.num_samples, "rss_main_mb": main,
          "rss_worker_mb": workers}
print(json.dumps(result))
"""

BASELINE = """
import json, resource
import sentiment_discovery.lazycache
print(json.dumps({"rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_corpus(path: Path, megabytes: float, seed: int = 0, block_mb: float = 8) -> int:
    """Write ~``megabytes`` MB of json lines (texts of 50-400 words): a block of ``block_mb`` MB of
    distinct lines, repeated (each line is encoded all the same); returns the byte count."""
    rng = random.Random(seed)
    lines, size = [], 0
    while size < min(megabytes, block_mb) * 1e6:
        words = rng.choices(WORDS, k=rng.randint(50, 400))
        if rng.random() < 0.2:  # one text in five has a non-ASCII word
            words[rng.randrange(len(words))] = rng.choice(NON_ASCII)
        row = {"reviewText": " ".join(words), "overall": rng.randint(1, 5), "summary": " ".join(words[:5])}
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        size += len(lines[-1].encode("utf-8"))
    block = "".join(lines).encode("utf-8")
    with path.open("wb") as f:
        for _ in range(max(1, round(megabytes * 1e6 / len(block)))):
            f.write(block)
    return path.stat().st_size


def run_child(code: str, *args: str, env: dict) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env
    )
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=float, nargs="+", default=[20, 1000], help="corpus sizes in MB")
    parser.add_argument("--workdir", default="/tmp/lazy_bench")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache"), "PYTHONPATH": pythonpath}
    base = run_child(BASELINE, env=env)
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores; "
        f"import only: {base['rss_main_mb']:.0f} MB RSS"
    )
    print(
        f"{'corpus MB':>10} {'samples':>9} {'build s':>8} {'MB/s':>6} {'CPU s':>7} {'MB/CPU-s':>9} "
        f"{'peak RSS main':>14} {'peak RSS worker':>16}"
    )
    try:
        for megabytes in args.sizes:
            corpus = work / f"corpus_{megabytes:g}MB.json"
            started = time.perf_counter()
            size = make_corpus(corpus, megabytes)
            made = time.perf_counter() - started
            r = run_child(CHILD, str(corpus), env=env)
            print(
                f"{size / 1e6:>10.1f} {r['samples']:>9} {r['seconds']:>8.1f} "
                f"{size / 1e6 / r['seconds']:>6.1f} {r['cpu_seconds']:>7.1f} "
                f"{size / 1e6 / r['cpu_seconds']:>9.1f} "
                f"{r['rss_main_mb']:>11.0f} MB "
                f"{r['rss_worker_mb']:>13.0f} MB   (corpus written in {made:.0f} s)",
                flush=True,
            )
            corpus.unlink()
            shutil.rmtree(work / "cache", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
