"""Latency of the neuron explorer's Try-text update, over HTTP, on a model (default: the shipped one).

    python bench/bench_explore.py [--load_model M] [--length 200] [--keystrokes 40]

A server runs in this process (a thread, as explore.py runs it); a client types a text of
``--length`` characters one keystroke at a time: each keystroke is one POST /api/text of the text so
far, timed from request to parsed answer (what the page waits for, less its 120 ms debounce). Also
timed: the same text read whole by a fresh server (a paste: no prefix to reuse) and an edit in the
middle of the text (the model reruns from the edit on).

First, the start: ``load_explorer`` on the first ``--max_texts`` texts of ``--data`` with an empty
statistics cache (a temporary folder: the first start of ``explore.py``, statistics computed), then
again from that cache (every later start).
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sentiment_discovery import explore as ex  # noqa: E402

TEXT = (
    "I went in expecting very little, and for the first half hour the film gave me exactly that: stiff "
    "dialogue, a plot you can see coming a mile away. Then the last act arrived and it was wonderful, "
    "moving and funny at once, and I left the cinema smiling. "
)


def post(port: int, text: str, feature: int) -> tuple[float, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = json.dumps({"text": text, "feature": feature}).encode()
    started = time.perf_counter()
    conn.request("POST", "/api/text", body=body, headers={"Content-Type": "application/json"})
    answer = json.loads(conn.getresponse().read())
    elapsed = time.perf_counter() - started
    conn.close()
    assert "error" not in answer, answer
    return 1000 * elapsed, answer


def summary(ms: list[float]) -> str:
    ms = sorted(ms)
    p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
    return f"median {statistics.median(ms):.1f} ms, p90 {p90:.1f} ms, max {ms[-1]:.1f} ms (n={len(ms)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load_model", default=None)
    p.add_argument("--data", default="data/binary_sst/val.csv")
    p.add_argument("--max_texts", type=int, default=1000, help="corpus texts for the statistics")
    p.add_argument("--length", type=int, default=200, help="characters of the typed text")
    p.add_argument("--keystrokes", type=int, default=40, help="timed keystrokes (the last ones of the text)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    text = (TEXT * (1 + args.length // len(TEXT)))[: args.length]

    cache = tempfile.mkdtemp(prefix="bench_explore_")
    try:
        started = time.perf_counter()
        ex.load_explorer(args.load_model, args.data, args.max_texts, cache_dir=cache)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        explorer = ex.load_explorer(args.load_model, args.data, args.max_texts, cache_dir=cache)
        warm = time.perf_counter() - started
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(
        f"first start (statistics of {len(explorer.texts)} texts computed): {cold:.1f} s; "
        f"later starts: {warm:.1f} s"
    )
    server = ex.ExploreServer(explorer, port=0)
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    port, feature = server.server_address[1], explorer.default_feature()
    print(f"model {explorer.model_name}: {explorer.info()['architecture']}; text of {len(text)} characters")

    post(port, "warm up the process", feature)  # first call: kernels, allocations
    paste = [post(port, text, feature)[0]]
    explorer.cache = ex.StateCache(explorer.cache.max_bytes)
    paste.append(post(port, text, feature)[0])
    first = len(text) - args.keystrokes
    post(port, text[:first], feature)  # typed so far (untimed)
    typing = []
    for end in range(first + 1, len(text) + 1):
        ms, answer = post(port, text[:end], feature)
        typing.append(ms)
    middle = len(text) // 2
    edits = [post(port, text[:middle] + c + text[middle + 1 :], feature)[0] for c in "xyz"]
    print(f"server-side time of the last keystroke: {answer['ms']} ms")
    print(f"keystroke at the end of a {len(text)}-character text: {summary(typing)}")
    print(f"edit in the middle (the model reruns from there): {summary(edits)}")
    print(f"whole text, nothing cached (a paste): {summary(paste)}")
    server.shutdown()
    server.server_close()


if __name__ == "__main__":
    main()
