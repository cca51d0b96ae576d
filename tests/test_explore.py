"""explore.py, the neuron explorer: its JSON endpoints over HTTP on 127.0.0.1, and the page in a real
headless Chromium (skipped, with the reason, where Chromium or its driver is not installed)."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fixture_path

from sentiment_discovery import explore as ex
from sentiment_discovery.checkpoint import save_checkpoint
from sentiment_discovery.encoder import Encoder
from sentiment_discovery.featurize import byte_states, featurize
from sentiment_discovery.formats import DEFAULT_MODEL
from sentiment_discovery.model import ModelConfig, RNNModel
from sentiment_discovery.preprocess import encode, text_slice
from sentiment_discovery.progress import INTERVAL_ENV

H = 16
POSITIVE = "What a wonderful, lovely and great film!"
NEGATIVE = "A dull, boring, awful mess of a movie."
CORPUS = fixture_path("binary_sst", "val.csv")


def tiny_model() -> RNNModel:
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(emsize=8, nhid=H))
    with torch.no_grad():  # larger recurrent weights: values spread over more of their range
        for name, p in model.named_parameters():
            if "original0" in name:  # the weight-normed recurrent matrices' directions
                p.mul_(3.0)
    return model.eval()


def known_direction_classifier(model: RNNModel) -> dict:
    """A classifier on the mean cell state of the one unit whose value is higher on POSITIVE than on
    NEGATIVE (both over all bytes and over the characters shown), placed so that P(positive) is above
    0.5 for POSITIVE and below for NEGATIVE: the direction the page must show is then known."""
    means = featurize(model, [POSITIVE, NEGATIVE], pooling="mean", device="cpu")
    shown = []
    for text in (POSITIVE, NEGATIVE):
        tokens = encode(text)
        (values,) = byte_states(model, [tokens], device="cpu")
        shown.append(values[text_slice(tokens.tobytes())].mean(axis=0))
    margin = np.minimum(means[0] - means[1], shown[0] - shown[1])
    unit = int(np.argmax(margin))
    assert margin[unit] > 0
    weight = torch.zeros(H)
    weight[unit] = 4.0 / float(means[0, unit] - means[1, unit])
    bias = -float(weight[unit]) * float(means[0, unit] + means[1, unit]) / 2
    return {
        "weight": weight,
        "bias": torch.tensor(bias),
        "pooling": "mean",
        "state": "cell",
        "all_layers": False,
        "mean": None,
        "scale": None,
    }


def three_pooling_classifier() -> dict:
    torch.manual_seed(1)
    return {
        "weight": torch.randn(3 * H),
        "bias": torch.tensor(0.1),
        "pooling": "mean,max,last",
        "state": "cell",
        "all_layers": False,
        "mean": torch.randn(3 * H) * 0.1,
        "scale": torch.rand(3 * H) + 0.5,
    }


class Server:
    def __init__(self, explorer: ex.Explorer):
        self.explorer = explorer
        self.httpd = ex.ExploreServer(explorer, port=0)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def request(self, method: str, path: str, body=None, headers=None) -> tuple[int, str, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        if isinstance(body, (dict, list, str)) and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, response.getheader("Content-Type"), data

    def json(self, method: str, path: str, body=None, status: int = 200) -> dict:
        code, kind, data = self.request(method, path, body)
        assert code == status, data
        assert kind == "application/json"
        return json.loads(data)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def start(tmp_path: Path, classifier: dict | None, name: str) -> Server:
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, tiny_model(), classifier=classifier)
    explorer = ex.load_explorer(
        str(path), str(CORPUS), max_texts=60, cache_dir=tmp_path / "cache", log=lambda s: None, progress=False
    )
    return Server(explorer)


@pytest.fixture(scope="module")
def workdir():
    folder = Path(tempfile.mkdtemp(prefix="explore_test_"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def server(workdir):
    s = start(workdir, three_pooling_classifier(), "three")
    yield s
    s.close()


@pytest.fixture(scope="module")
def bare_server(workdir):
    s = start(workdir, None, "bare")
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------
# endpoints
# ---------------------------------------------------------------------------------------------


def test_page_and_assets_are_served_locally(server):
    code, kind, page = server.request("GET", "/")
    assert code == 200 and kind.startswith("text/html")
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset.encode() in page
        code, _, data = server.request("GET", asset)
        assert code == 200 and len(data) > 100
    assert b"http://" not in page and b"https://" not in page  # nothing from another host
    code, _, _ = server.request("GET", "/static/../explore.py")
    assert code == 404


def test_text_matches_the_encoder_and_the_featurizer(server):
    text = "An honest, funny film: ça marche."
    feature = 2 * H + 5  # last pooling, unit 5
    r = server.json("POST", "/api/text", {"text": text, "feature": feature})
    clf = server.explorer.readout
    assert r["p_positive"] == pytest.approx(
        float(Encoder(tiny_model(), clf).predict_proba([text])[0]), abs=1e-5
    )
    tokens = encode(text)
    shown = text_slice(tokens.tobytes())
    (values,) = byte_states(tiny_model(), [tokens], units=[5], device="cpu")
    polarity = 1 if float(clf["weight"][feature]) >= 0 else -1
    chars = tokens[shown].tobytes().decode()
    assert "".join(c for c, _ in r["chars"]) == chars
    # each character's value: after its last byte (ç is two bytes)
    ends = np.cumsum([len(c.encode()) for c in chars]) - 1
    expected = values[shown][ends, 0] * polarity
    assert np.allclose([v for _, v in r["chars"]], expected, atol=1e-3)
    assert r["unit"]["unit"] == 5 and r["unit"]["pooling"] == "last"
    assert 0 < len(r["traces"]) <= ex.N_TRACES and all(len(t["values"]) == len(chars) for t in r["traces"])


def test_a_text_extended_or_edited_reads_the_same_as_a_fresh_one(server, workdir):
    texts = ["The plot was thin", "The plot was thin and slow", "The plot was thick and slow", "The"]
    got = [server.json("POST", "/api/text", {"text": t, "feature": 3}) for t in texts]
    fresh = ex.Explorer(
        ex.load_checkpoint(str(workdir / "three.pt")),
        "fresh",
        server.explorer.texts,
        server.explorer.labels,
        server.explorer.stats,
    )
    for text, r in zip(texts, got):
        alone = fresh.analyse_text(text, 3)
        assert r["p_positive"] == pytest.approx(alone["p_positive"], abs=1e-6)
        assert np.allclose([v for _, v in r["chars"]], [v for _, v in alone["chars"]], atol=1e-4)


def test_unit_page_lists_the_extremes_and_the_histogram(server):
    r = server.json("GET", "/api/unit?feature=7")
    column = server.explorer.stats.features[:, 7]
    most = [t["value"] for t in r["most"]]
    least = [t["value"] for t in r["least"]]
    assert len(most) == len(least) == ex.N_EXTREME
    assert most == sorted(most, reverse=True) and most[0] == pytest.approx(column.max())
    assert least == sorted(least) and least[0] == pytest.approx(column.min())
    labels = server.explorer.labels
    assert sum(r["histogram"]["negative"]) == int((labels == 0).sum())
    assert sum(r["histogram"]["positive"]) == int((labels == 1).sum())
    assert all(t["chars"] and "label" in t for t in r["most"])
    explorer = server.explorer
    for t in (r["most"][0], r["least"][0], r["least"][-1]):  # read in a batch = read alone
        alone = ex.run_states(explorer.model, encode(explorer.texts[t["index"]]).tobytes())
        assert np.allclose(
            [v for _, v in t["chars"]],
            [v for _, v in explorer.coloured(alone, explorer.feature(7))],
            atol=1e-4,
        )
    assert 0.5 <= r["unit"]["accuracy"] <= 1


def test_threshold_accuracy_and_auc_on_known_columns():
    labels = np.array([0, 0, 0, 1, 1, 1])
    features = np.array([[1, 6, 1], [2, 5, 5], [3, 4, 2], [4, 3, 4], [5, 2, 3], [6, 1, 6]], dtype=float)
    assert np.allclose(ex.threshold_accuracy(features, labels), [1.0, 1.0, 5 / 6])
    assert np.allclose(ex.auc(features, labels), [1.0, 0.0, 7 / 9])


def test_units_are_ranked_and_searched(server):
    r = server.json("GET", "/api/units?rank=separation&limit=10")
    accuracies = [u["accuracy"] for u in r["units"]]
    assert accuracies == sorted(accuracies, reverse=True) and len(accuracies) == 10
    r = server.json("GET", "/api/units?rank=weight&q=4")
    assert sorted(u["feature"] for u in r["units"]) == [4, H + 4, 2 * H + 4]  # the unit under each pooling
    weights = [abs(u["weight"]) for u in r["units"]]
    assert weights == sorted(weights, reverse=True)


def test_steer_streams_the_text_with_the_unit_forced(server):
    request = {
        "prompt": "The film",
        "feature": 2 * H + 3,
        "value": 0.7,
        "mode": "cell",
        "length": 30,
        "seed": 5,
    }
    code, kind, data = server.request("POST", "/api/steer", request)
    assert code == 200 and kind == "application/x-ndjson"
    lines = [json.loads(line) for line in data.decode().splitlines()]
    assert lines[0]["unit"]["feature"] == 2 * H + 3 and lines[-1]["done"]
    assert lines[-1]["generated_bytes"] == request["length"]
    chars = [c for line in lines for c in line.get("chars", [])]
    assert "".join(c for c, _, _ in chars) == lines[-1]["text"]
    generated = [v for _, v, is_generated in chars if is_generated]
    assert generated and np.allclose(generated, 0.7, atol=1e-4)  # shown x polarity = the slider's value
    assert 0 <= lines[-1]["p_positive"] <= 1
    _, _, again = server.request("POST", "/api/steer", request)
    assert json.loads(again.decode().splitlines()[-1])["text"] == lines[-1]["text"]  # the seed repeats it


@pytest.mark.parametrize(
    "method, path, body, status, words",
    [
        ("POST", "/api/text", {"text": ""}, 400, "empty"),
        ("POST", "/api/text", {"text": "   \n "}, 400, "empty"),
        ("POST", "/api/text", {"text": "x" * 100_000}, 413, "at most"),
        ("POST", "/api/text", {"text": "fine", "feature": 10_000}, 400, "out of range"),
        ("POST", "/api/text", {"text": "fine", "feature": "abc"}, 400, "not a number"),
        ("POST", "/api/text", {"text": "fine", "feature": -1}, 400, "out of range"),
        ("POST", "/api/text", b'\xff\xfe{"text": "a"}', 400, "not valid UTF-8"),
        ("POST", "/api/text", b'{"text": ', 400, "not JSON"),
        ("POST", "/api/text", [1, 2], 400, "JSON object"),
        ("POST", "/api/text", {"text": 5}, 400, "string"),
        ("GET", "/api/unit?feature=99999", None, 400, "out of range"),
        ("GET", "/api/unit?feature=", None, 400, "give a unit"),
        ("POST", "/api/text", {"text": "fine", "feature": 2.5}, 400, "whole number"),
        ("GET", "/api/unit?feature=%ff", None, 400, "UTF-8"),
        ("GET", "/api/units?rank=nonsense", None, 400, "cannot rank"),
        ("GET", "/api/units?q=abc", None, 400, "number"),
        ("POST", "/api/steer", {"prompt": "a", "length": 10**9}, 400, "length"),
        ("POST", "/api/steer", {"prompt": "a", "temperature": "hot"}, 400, "temperature"),
        ("POST", "/api/steer", {"prompt": "a", "value": float("nan")}, 400, "value"),
        ("GET", "/nothing", None, 404, "no page"),
    ],
)
def test_bad_input_gets_a_clear_message_never_a_traceback(server, method, path, body, status, words):
    code, kind, data = server.request(method, path, body)
    assert code == status and kind == "application/json"
    message = json.loads(data)["error"]
    assert words in message and "Traceback" not in message


def test_oversized_body_and_foreign_host_are_refused(server):
    # refused on its Content-Length alone: the server reads none of it
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.putrequest("POST", "/api/text")
    conn.putheader("Content-Length", str(10**12))
    conn.endheaders(b"{")
    response = conn.getresponse()
    assert response.status == 413 and "at most" in json.loads(response.read())["error"]
    conn.close()
    code, _, data = server.request("GET", "/api/info", headers={"Host": "evil.example:80"})
    assert code == 403


def test_concurrent_requests_from_several_tabs_get_their_own_answers(server):
    texts = [f"Tab {i}: {'good ' * i}{'bad ' * (6 - i)}film" for i in range(6)]
    expected = Encoder(tiny_model(), server.explorer.readout).predict_proba(texts)

    def ask(i: int) -> float:
        return server.json("POST", "/api/text", {"text": texts[i], "feature": 1})["p_positive"]

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(ask, [i % 6 for i in range(24)]))
    assert np.allclose(got, [expected[i % 6] for i in range(24)], atol=1e-5)


def test_a_model_without_classifier_ranks_by_the_chosen_measure(bare_server):
    info = bare_server.json("GET", "/api/info")
    assert info["classifier"] is False and "weight" not in info["rankings"]
    assert info["default_ranking"] == "separation" and info["n_features"] == H
    r = bare_server.json("POST", "/api/text", {"text": "nice", "feature": 2})
    assert r["p_positive"] is None and r["unit"]["weight"] is None
    spread = [u["spread"] for u in bare_server.json("GET", "/api/units?rank=spread")["units"]]
    assert spread == sorted(spread, reverse=True)
    error = bare_server.json("GET", "/api/units?rank=weight", status=400)["error"]
    assert "no classifier" in error


def test_state_cache_stays_within_its_bytes():
    model = tiny_model()
    cache = ex.StateCache(max_bytes=20_000)
    for i in range(50):
        cache.put(ex.run_states(model, f"text number {i} ".encode() * 3))
    assert 0 < cache.used <= 20_000
    assert cache.used == sum(e.nbytes for e in cache.entries.values())


def test_statistics_are_cached_and_reused(workdir, monkeypatch, capsys):
    path = workdir / "cached.pt"
    save_checkpoint(path, tiny_model(), classifier=three_pooling_classifier())
    said = []
    monkeypatch.setenv(INTERVAL_ENV, "0")  # a progress line at every update (stderr is no terminal here)
    first = ex.load_explorer(str(path), str(CORPUS), max_texts=20, cache_dir=workdir / "c2", log=said.append)
    assert re.search(r"featurizing: .*\(100%\)", capsys.readouterr().err)
    second = ex.load_explorer(str(path), str(CORPUS), max_texts=20, cache_dir=workdir / "c2", log=said.append)
    assert "computed once" in said[0] and "from the cache" in said[-1]
    assert "featurizing" not in capsys.readouterr().err
    assert np.array_equal(first.stats.features, second.stats.features)
    expected = featurize(tiny_model(), first.texts, pooling="mean,max,last", device="cpu")
    assert np.allclose(first.stats.features, expected, atol=1e-5)


def three_class_classifier(names: list[str]) -> dict:
    torch.manual_seed(2)
    return {
        "weight": torch.randn(3, 2 * H),
        "bias": torch.randn(3),
        "pooling": "mean,last",
        "state": "hidden",
        "all_layers": False,
        "mean": None,
        "scale": None,
        "classes": names,
    }


@pytest.mark.parametrize("names", [["negative", "neutral", "positive"], ["drama", "comedy", "horror"]])
def test_a_classifier_of_several_classes(workdir, names):
    s = start(workdir, three_class_classifier(names), f"k3_{names[0]}")
    try:
        text = "A quiet, strange and tender film."
        r = s.json("POST", "/api/text", {"text": text, "feature": 2})
        readout = s.explorer.readout
        expected = readout.probs(featurize(tiny_model(), [text], spec=readout.spec, device="cpu"))[0]
        assert [c for c, _ in r["probabilities"]] == names
        assert np.allclose([p for _, p in r["probabilities"]], expected, atol=1e-5)
        W = readout.weight.double().numpy()
        weights = s.json("GET", "/api/units?rank=weight&limit=500")["units"]
        strength = [float(np.abs(W[:, u["feature"]]).max()) for u in weights]
        assert len(weights) == 2 * H and strength == sorted(strength, reverse=True)
        assert [w for _, w in weights[0]["class_weights"]] == pytest.approx(
            W[:, weights[0]["feature"]].tolist()
        )
        if "positive" in names:  # the weight towards positive: its class's weight less the others' mean
            assert r["p_positive"] == pytest.approx(expected[2], abs=1e-5)
            assert r["unit"]["weight"] == pytest.approx(W[2, 2] - (W[0, 2] + W[1, 2]) / 2, abs=1e-6)
            assert r["polarity"] == (1 if r["unit"]["weight"] >= 0 else -1)
        else:  # no sentiment direction: raw values, no P(positive)
            assert r["p_positive"] is None and r["unit"]["weight"] is None and r["polarity"] == 1
        steer = s.request("POST", "/api/steer", {"prompt": "It", "feature": 2, "length": 5, "seed": 1})[2]
        done = json.loads(steer.decode().splitlines()[-1])
        assert done["done"] and len(done["probabilities"]) == 3
    finally:
        s.close()


def test_all_layer_features_and_unit_ranges_match_the_per_byte_states(workdir):
    torch.manual_seed(3)
    model = RNNModel(ModelConfig(emsize=8, nhid=8, nlayers=2)).eval()
    classifier = {"weight": torch.randn(2 * 16), "bias": torch.tensor(0.0), "pooling": "max,last"}
    classifier.update(state="hidden", all_layers=True, mean=None, scale=None)
    path = workdir / "two_layers.pt"
    save_checkpoint(path, model, classifier=classifier)
    explorer = ex.load_explorer(
        str(path), str(CORPUS), max_texts=25, cache_dir=workdir / "c3", log=lambda s: None, progress=False
    )
    expected = featurize(
        model, explorer.texts, pooling="max,last", state="hidden", all_layers=True, device="cpu"
    )
    assert np.allclose(explorer.stats.features, expected, atol=1e-5)
    per_byte = byte_states(
        model, [encode(t) for t in explorer.texts], state="hidden", all_layers=True, device="cpu"
    )
    peaks = np.stack([np.abs(v).max(axis=0) for v in per_byte])  # [texts, layers * units]
    assert np.allclose(
        explorer.stats.unit_range, np.percentile(peaks, ex.RANGE_PERCENTILE, axis=0), atol=1e-5
    )
    r = explorer.analyse_text("Fine.", 16 + 9)  # the last pooling's block: layer 1, unit 1
    assert (r["unit"]["pooling"], r["unit"]["layer"], r["unit"]["unit"]) == ("last", 1, 1)


def test_openai_converted_weights(workdir):
    from test_formats import random_openai_shards, save_shards

    save_shards(workdir / "openai" / "model", random_openai_shards(np.random.default_rng(5), H=H, E=8))
    explorer = ex.load_explorer(
        str(workdir / "openai"), str(CORPUS), max_texts=12, cache_dir=workdir / "c4", log=lambda s: None
    )
    s = Server(explorer)
    try:
        info = s.json("GET", "/api/info")
        assert "preprocessing openai" in info["architecture"] and info["classifier"] is False
        text = "Line one.\nLine two &amp; a lone \ud800 surrogate"
        r = s.json("POST", "/api/text", {"text": text, "feature": 3})
        shown = "".join(c for c, _ in r["chars"])
        assert shown == "Line one. Line two & a lone \ufffd\ufffd\ufffd surrogate"  # OpenAI's preprocessing
        assert r["p_positive"] is None and len(r["traces"]) > 0
        assert len(s.json("GET", "/api/unit?feature=3")["most"]) == ex.N_EXTREME
    finally:
        s.close()


@pytest.mark.parametrize("name", [DEFAULT_MODEL.name, "mlstm1024_imdb_sst_finetuned.safetensors"])
def test_the_shipped_and_the_finetuned_models(workdir, name):
    explorer = ex.load_explorer(
        str(DEFAULT_MODEL.parent / name),
        str(CORPUS),
        max_texts=4,
        cache_dir=workdir / "c5",
        log=lambda s: None,
    )
    assert explorer.default_feature() == int(explorer.readout.neurons[0])
    liked = explorer.analyse_text("A wonderful, moving and beautiful film.", None)
    disliked = explorer.analyse_text("This movie was terrible. I hated it.", None)
    assert liked["p_positive"] > 0.5 > disliked["p_positive"]
    assert liked["unit"]["feature"] == explorer.default_feature() and len(liked["traces"]) == ex.N_TRACES


def test_statistics_are_cached_beside_the_model_else_in_the_user_cache(workdir, monkeypatch):
    folder = workdir / "beside"
    folder.mkdir()
    path = folder / "lm.pt"
    save_checkpoint(path, tiny_model())
    said = []
    ex.load_explorer(str(path), str(CORPUS), max_texts=10, log=said.append, progress=False)
    cached = list((folder / "lm.pt.explore").glob("*.npz"))
    assert len(cached) == 1 and str(cached[0]) in said[-1]
    ex.load_explorer(str(path), str(CORPUS), max_texts=10, log=said.append, progress=False)
    assert "from the cache" in said[-1]
    # where the model's folder takes no cache (here a file stands in its place): the user's cache
    other = workdir / "elsewhere"
    other.mkdir()
    save_checkpoint(other / "lm.pt", tiny_model())
    (other / "lm.pt.explore").write_text("in the way")
    monkeypatch.setenv(ex.CACHE_ENV, str(workdir / "user_cache"))
    said.clear()
    ex.load_explorer(str(other / "lm.pt"), str(CORPUS), max_texts=10, log=said.append, progress=False)
    assert any("cannot cache" in line for line in said)
    assert list((workdir / "user_cache" / "explore").glob("*.npz"))


def test_the_script_reports_bad_input_in_one_line(tmp_path, capsys):
    save_checkpoint(tmp_path / "lm.pt", tiny_model())
    missing = tmp_path / "nope.csv"
    assert ex.main(["--load_model", str(tmp_path / "lm.pt"), "--data", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and str(missing) in err and "\n" not in err
    assert ex.main(["--load_model", str(tmp_path / "absent.pt"), "--data", str(CORPUS)]) == 2
    assert "absent.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ex.main(["--max_texts", "0"])
    assert "--max_texts" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the page in a headless browser
# ---------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser(workdir):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no Chromium or chromedriver on this machine (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])"
    )
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1200,1000",
        f"--user-data-dir={workdir / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition())


def typed(driver, text: str) -> tuple[float, list[float], list[str]]:
    """Type ``text`` into Try text; wait for its colours; (P(positive), values, backgrounds)."""
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "text")
    box.clear()
    box.send_keys(text)
    read = """const spans = [...document.querySelectorAll('#chars span')];
        return [spans.map(s => s.textContent).join(''), spans.map(s => Number(s.dataset.v)),
                spans.map(s => getComputedStyle(s).backgroundColor),
                document.getElementById('p-positive').dataset.p];"""
    wait_for(driver, lambda: driver.execute_script(read)[0] == text)
    _, values, backgrounds, p = driver.execute_script(read)
    return float(p), values, backgrounds


def rgb(css: str) -> tuple[int, ...]:
    return tuple(int(x) for x in css[css.index("(") + 1 : css.index(")")].split(",")[:3])


def test_the_page_in_a_browser(browser, workdir):
    from selenium.webdriver.common.by import By

    model = tiny_model()
    save_checkpoint(workdir / "known.pt", model, classifier=known_direction_classifier(model))
    explorer = ex.load_explorer(
        str(workdir / "known.pt"), str(CORPUS), max_texts=60, cache_dir=workdir / "cache", log=lambda s: None
    )
    server = Server(explorer)
    screenshots = os.environ.get("EXPLORE_SCREENSHOTS")  # a folder: keep a PNG of each view
    try:
        browser.get(f"http://127.0.0.1:{server.port}/")
        wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#chars span"))

        p_pos, v_pos, bg_pos = typed(browser, POSITIVE)
        p_neg, v_neg, bg_neg = typed(browser, NEGATIVE)
        assert p_pos > 0.5 > p_neg
        assert np.mean(v_pos) > np.mean(v_neg)
        green_minus_red = lambda backgrounds: np.mean([rgb(b)[1] - rgb(b)[0] for b in backgrounds])
        assert green_minus_red(bg_pos) > green_minus_red(bg_neg)  # greener where the unit says positive
        assert "P(positive)" in browser.find_element(By.ID, "p-positive").text
        assert browser.find_elements(By.CSS_SELECTOR, "#traces polyline")

        too_long = "a" * (ex.MAX_TEXT_CHARS + 1)
        browser.execute_script(
            "document.getElementById('text').value = arguments[0];"
            "document.getElementById('text').dispatchEvent(new Event('input'));",
            too_long,
        )
        wait_for(browser, lambda: "at most" in browser.find_element(By.ID, "message").text)
        typed(browser, POSITIVE)
        if screenshots:
            browser.save_screenshot(str(Path(screenshots) / "explore_try.png"))

        browser.find_element(By.ID, "tab-units").click()
        wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#unit-list tbody tr"))
        browser.find_element(By.CSS_SELECTOR, "#unit-list tbody tr").click()
        wait_for(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#most li")) == ex.N_EXTREME)
        assert "feature" in browser.find_element(By.ID, "unit-title").text
        assert browser.find_elements(By.CSS_SELECTOR, "#histogram rect")
        assert browser.find_elements(By.CSS_SELECTOR, "#least li .chars span")
        if screenshots:
            browser.save_screenshot(str(Path(screenshots) / "explore_unit.png"))

        browser.find_element(By.ID, "tab-steer").click()
        length = browser.find_element(By.ID, "length")
        length.clear()
        length.send_keys("40")
        browser.find_element(By.ID, "generate").click()
        wait_for(browser, lambda: "done" in browser.find_element(By.ID, "steer-status").text)
        out = browser.find_elements(By.CSS_SELECTOR, "#steer-out span")
        assert len(out) >= 40 and browser.find_elements(By.CSS_SELECTOR, "#steer-out span.generated")
        assert browser.find_element(By.ID, "message").text == ""
        if screenshots:
            browser.save_screenshot(str(Path(screenshots) / "explore_steer.png"))
    finally:
        server.close()
