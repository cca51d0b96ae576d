"""data/download.py openai against a local HTTP server: the whole download and conversion, the
``--load_model openai`` alias in every script, and the failures (interrupted, truncated, 404, wrong shape)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, load_script
from test_formats import random_openai_shards
from test_transfer import sst_slices

from sentiment_discovery.checkpoint import build_checkpoint, load_checkpoint
from sentiment_discovery.formats import openai_weights

download = load_script("data/download")
H = 64  # the release's layout (E = 64) with a small hidden size


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


class ShardServer:
    """Serves ``files`` (name -> bytes) on 127.0.0.1, with HTTP ranges; records each request's path and
    Range header. ``faults[name]``: "cut" sends half the body and hangs up, "truncate" serves half the
    file as if whole, "slow" pauses a second halfway."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.faults, self.requests = files, {}, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                body, fault = server.files[name], server.faults.get(name)
                if fault == "truncate":
                    body = body[: len(body) // 2]
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                body = body[start:]
                if fault == "slow":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    time.sleep(1.0)
                    self.wfile.write(body[len(body) // 2 :])
                else:
                    self.wfile.write(body[: len(body) // 2] if fault == "cut" else body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/model/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def fetched(self) -> list[str]:
        names, self.requests = [name for name, _ in self.requests], []
        return names

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def shards():
    return random_openai_shards(np.random.default_rng(5), H=H, E=64)


@pytest.fixture
def server(shards):
    server = ShardServer({f"{i}.npy": npy_bytes(a) for i, a in enumerate(shards)})
    yield server
    server.close()


def leftovers(root) -> list[str]:
    """Files under root/openai that could be taken for a finished download."""
    return sorted(p.name for p in (root / "openai").rglob("*") if p.suffix in (".npy", ".safetensors"))


def test_download_converts_once_and_every_script_loads_openai(tmp_path, server, shards, monkeypatch, capsys):
    root = tmp_path / "data"
    dest = download.download_openai(root, server.url, hidden=H)
    assert dest == root / "openai" / "mlstm_openai.safetensors"
    assert server.fetched() == [f"{i}.npy" for i in range(15)]
    assert [p.name for p in (root / "openai").iterdir()] == [dest.name]  # the shards are gone
    assert "--load_model openai" in capsys.readouterr().out
    want = build_checkpoint(openai_weights(shards, "served")).model.state_dict()
    got = load_checkpoint(dest)
    assert got.config.preprocess == "openai" and got.config.nhid == H
    for key, value in got.model.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=0, msg=key)

    # a rerun finds the checkpoint and fetches nothing
    download.download_openai(root, server.url, hidden=H)
    assert server.fetched() == [] and "already there" in capsys.readouterr().out

    # the alias, from the folder that holds data/ (the repository root for a user)
    monkeypatch.chdir(tmp_path)
    paths = sst_slices(tmp_path, (("train", 40), ("val", 20), ("test", 20)))
    sst = ["--data", paths["train"], "--valid", paths["val"], "--test", paths["test"], "--log2_C", "0", "0"]
    assert load_script("transfer").main(["--load_model", "openai", *sst]) == 0
    assert load_checkpoint(tmp_path / "openai_transfer" / "classifier.pt").config.preprocess == "openai"
    classifier = load_script("classifier")
    assert classifier.main(["--load_model", "openai", "--text", "A gem."]) == 2
    assert "no sentiment classifier: run transfer.py" in capsys.readouterr().err
    clf = ["--load_model", "openai_transfer/classifier.pt", "--text", "A gem.", "--save_probs", "p.npy"]
    assert classifier.main(clf) == 0
    gen = ["--load_model", "openai", "--gen_length", "-1", "--text", "fine", "--neuron", "3"]
    assert load_script("generate").main([*gen, "--save", str(tmp_path / "gen.txt")]) == 0
    assert (tmp_path / "gen.txt").read_text().strip() == "fine"


def test_a_missing_alias_says_how_to_download_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for script in ("transfer", "classifier", "generate"):
        assert load_script(script).main(["--load_model", "openai"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "run `python data/download.py openai` in the repository root" in err


def test_an_interrupted_shard_resumes_with_a_range_request(tmp_path, server):
    root = tmp_path / "data"
    server.faults["1.npy"] = "cut"
    with pytest.raises(download.DownloadError, match="rerun to resume"):
        download.download_openai(root, server.url, hidden=H)
    shard_dir = root / "openai" / "shards"
    partial = shard_dir / "1.npy.part"
    size = len(server.files["1.npy"])
    assert partial.stat().st_size == size // 2 and leftovers(root) == ["0.npy"]
    server.faults.clear()
    server.requests.clear()
    download.download_openai(root, server.url, hidden=H)
    assert server.requests[0] == ("1.npy", f"bytes={size // 2}-")  # 0.npy is not fetched again
    assert leftovers(root) == ["mlstm_openai.safetensors"]


def test_a_truncated_shard_is_rejected_and_a_rerun_recovers(tmp_path, server):
    root = tmp_path / "data"
    server.faults["7.npy"] = "truncate"  # the server itself sends a short file as if it were whole
    with pytest.raises(download.DownloadError, match=r"7\.npy\.part: .* bytes where its header announces"):
        download.download_openai(root, server.url, hidden=H)
    assert leftovers(root) == sorted(f"{i}.npy" for i in range(7))
    assert not (root / "openai" / "shards" / "7.npy.part").exists()
    server.faults.clear()
    server.fetched()
    download.download_openai(root, server.url, hidden=H)
    assert server.fetched() == [f"{i}.npy" for i in range(7, 15)]
    assert leftovers(root) == ["mlstm_openai.safetensors"]


def test_a_404_is_one_clear_line_and_leaves_nothing(tmp_path, server, capsys):
    del server.files["0.npy"]
    argv = ["openai", "--root", str(tmp_path), "--openai_url", server.url]
    assert download.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: could not download http://127.0.0.1:")
    assert "0.npy: HTTP 404" in err
    assert leftovers(tmp_path) == [] and not list(tmp_path.rglob("*.part"))


@pytest.mark.parametrize(
    "index, array, problem",
    [
        (6, np.zeros((64, H + 1), np.float32), r"shape \(64, 65\) <f4, expected \(64, 64\)"),
        (8, np.zeros(4 * H, np.float64), "<f8, expected"),
        (3, np.zeros((H, 4 * H + 1), np.float32), r"expected \(64, <= 256\)"),
        (9, np.array([{"a": 1}] * 4, dtype=object), "expected"),  # a pickle inside a .npy
    ],
)
def test_a_shard_of_the_wrong_shape_or_type_is_rejected(tmp_path, server, index, array, problem):
    root = tmp_path / "data"
    server.files[f"{index}.npy"] = npy_bytes(array)
    with pytest.raises(download.DownloadError, match=problem):
        download.download_openai(root, server.url, hidden=H)
    assert leftovers(root) == sorted(f"{i}.npy" for i in range(index))


def test_a_hostile_header_or_size_is_refused_before_reading(tmp_path, server):
    root = tmp_path / "data"
    huge = npy_bytes(np.zeros(4, np.float32)).replace(b"(4,)", b"(4000000000000,)")
    server.files["0.npy"] = huge
    with pytest.raises(download.DownloadError, match=r"shape \(4000000000000,\)"):
        download.download_openai(root, server.url, hidden=H)
    server.files["0.npy"] = b"\x93NUMPY\x01\x00" + b"\xff\xff" + b" " * 65535  # a 64 KiB header
    with pytest.raises(download.DownloadError, match="not a plain .npy array"):
        download.download_openai(root, server.url, hidden=H)
    server.files["0.npy"] = bytes(10_000_000)  # far more than [256, 64] float32 can take
    with pytest.raises(download.DownloadError, match="more than the .* expected"):
        download.download_openai(root, server.url, hidden=H)
    assert leftovers(root) == [] and not list(root.rglob("*.part"))


# ---------------------------------------------------------------------------------------------
# IMDB, with its unlabelled reviews as main.py's default corpus
# ---------------------------------------------------------------------------------------------

IMDB_FIXTURE_SIZES = {"train": 10, "test": 4, "unsup": 6}


def unsup_review(i: int) -> str:
    return f'Unlabelled review {i}: "quoted"<br /><br />naïve\\ end,\nwith a line break.'


def imdb_tarball() -> bytes:
    """A small aclImdb_v1.tar.gz in the release's layout, with the files the download must skip."""
    files = {"aclImdb/README": "readme", "aclImdb/imdb.vocab": "a\nb", "aclImdb/train/urls_unsup.txt": "x"}
    for split, n in (("train", 10), ("test", 4)):
        for i in range(n):
            folder, rating = ("pos", 7 + i % 4) if i % 2 else ("neg", 1 + i % 4)
            files[f"aclImdb/{split}/{folder}/{i}_{rating}.txt"] = f"{split} review {i}, rated {rating}."
    for i in range(6):
        files[f"aclImdb/train/unsup/{i}_0.txt"] = unsup_review(i)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_imdb_writes_the_unlabelled_corpus_that_main_reads_by_default(tmp_path, monkeypatch, capsys):
    tarball = imdb_tarball()
    server = ShardServer({"aclImdb_v1.tar.gz": tarball})
    server.faults["aclImdb_v1.tar.gz"] = "slow"
    monkeypatch.setenv("SENTIMENT_DISCOVERY_PROGRESS_INTERVAL", "0.05")
    try:
        download.download_imdb(tmp_path / "data", server.url + "aclImdb_v1.tar.gz", IMDB_FIXTURE_SIZES)
    finally:
        server.close()
    out, err = capsys.readouterr()
    assert "unsup.json (6 unlabelled reviews)" in out
    # the transfer paused a second: reported in lines while it waited (stderr is no terminal here)
    size = len(tarball)  # < 1000: no unit prefix
    assert re.search(rf"downloading aclImdb_v1\.tar\.gz: [\d.]+/{size} B \(0%\)", err), err
    assert f"downloading aclImdb_v1.tar.gz: {size}/{size} B (100%)" in err
    imdb = tmp_path / "data" / "imdb"
    unsup = json.loads((imdb / "unsup.json").read_text(encoding="utf-8"))  # one json value: no --loose_json
    assert unsup == [{"sentence": unsup_review(i)} for i in range(6)]
    lines = (imdb / "unsup.json").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 6 + 2 and lines[1].startswith('{"sentence": "Unlabelled review 0')  # one per line
    assert [len(pd.read_csv(imdb / f"{s}.csv")) for s in ("train", "val", "test")] == [8, 2, 4]
    assert set(pd.read_csv(imdb / "train.csv")["label"]) == {0, 1}

    # `python main.py` with no data flag (a tiny model) reads it; with no corpus it names the download
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    tiny = ["--nhid", "8", "--emsize", "4", "--batch_size", "2", "--seq_length", "16", "--train_iters", "2",
            "--num_shards", "6", "--split", "4,1,1", "--cpu"]  # fmt: skip
    run = subprocess.run([sys.executable, str(ROOT / "main.py"), *tiny], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "train: " in run.stdout and (tmp_path / "lang_model.pt").exists()
    (imdb / "unsup.json").unlink()
    run = subprocess.run([sys.executable, str(ROOT / "main.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 2 and run.stderr == (
        "error: data/imdb/unsup.json: no such file (run `python data/download.py imdb` in the repository "
        "root to get it)\n"
    )


def test_an_imdb_archive_of_another_size_is_refused(tmp_path):
    server = ShardServer({"aclImdb_v1.tar.gz": imdb_tarball()})
    try:
        sizes = {**IMDB_FIXTURE_SIZES, "unsup": 7}
        with pytest.raises(download.DownloadError, match="expected 10 train, 4 test, 7 unsup reviews, got"):
            download.download_imdb(tmp_path, server.url + "aclImdb_v1.tar.gz", sizes)
    finally:
        server.close()
    assert not list((tmp_path / "imdb").iterdir())
